"""The `dreamllm-hf serve` page (Gradio): a conversation in which DreamLLM writes and draws, shown as it is written.

The conversation is kept as what `DreamLLMPipeline` reads: a list of `{"role", "content"}` turns, a user turn being
the message (with an attached picture as `{"type": "image", "image": pil}`), an assistant turn the document it wrote
(`out.documents[0]`: text and PIL pictures). Every turn is written from the whole conversation, pictures included.
"""

import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import PIL.Image

from ..modeling.processing_dreamllm import rgb_picture
from ..pipelines import DreamLLMPipelineOutput, DreamLLMText2ImagePipeline
from ..pipelines.pipeline_output import StopReason
from .engine import ServingEngine
from .render import DOCUMENT_CSS, conversation_html, status_html, turn_html
from .writer import MODES, STOPPED, TurnSettings, write_turn


logger = logging.getLogger(__name__)

MAX_PICTURES_LIMIT = 8
MAX_STEPS_LIMIT = 200
MAX_GUIDANCE = 30.0


class InputError(ValueError):
    """A request the page refuses, with the message the user sees."""


@dataclass
class PageDefaults:
    """The controls' starting values (the demo model's are `for_demo_model()`)."""

    seed: int = 0
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    max_images: int = 4
    max_new_tokens: int = 256

    @classmethod
    def for_demo_model(cls) -> "PageDefaults":
        from ..shapes_world.demo_model_path import DEMO_GUIDANCE_SCALE, DEMO_NUM_INFERENCE_STEPS, DEMO_SEED

        return cls(seed=DEMO_SEED, guidance_scale=DEMO_GUIDANCE_SCALE, num_inference_steps=DEMO_NUM_INFERENCE_STEPS)


_FINISHED = {
    StopReason.EOS: "Done.",
    StopReason.IMAGE: "Done.",
    StopReason.MAX_IMAGES: "Done: the model asked for more pictures than the maximum.",
    StopReason.MAX_NEW_TOKENS: "Done: the answer reached its length limit.",
    StopReason.CONTEXT_LIMIT: "Done: the model's context is full. Start a new conversation to go on.",
    STOPPED: "Stopped.",
}


def read_picture(path: str | os.PathLike) -> PIL.Image.Image:
    """The uploaded file as an RGB picture, or an `InputError` saying why it cannot be read."""
    name = Path(path).name
    try:
        with PIL.Image.open(path) as picture:
            picture.load()
            return rgb_picture(picture)
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise InputError(f"The attached file {name} could not be read as a picture ({error}).") from error


def read_settings(mode, seed, guidance_scale, steps, max_pictures, max_new_tokens: int) -> TurnSettings:
    """The controls' values, checked (a client of the API can send anything)."""
    if mode not in MODES:
        raise InputError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
    checked = {}
    for name, value, low, high, whole in (
        ("Seed", seed, 0, 2**63 - 1, True),
        ("Guidance", guidance_scale, 0.0, MAX_GUIDANCE, False),
        ("Steps", steps, 1, MAX_STEPS_LIMIT, True),
        ("Maximum pictures", max_pictures, 0, MAX_PICTURES_LIMIT, True),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and value != int(value)):
            kind = "a whole number" if whole else "a number"
            raise InputError(f"{name} must be {kind}, got {value!r}.")
        if not low <= value <= high:
            raise InputError(f"{name} must be between {low} and {high}, got {value}.")
        checked[name] = int(value) if whole else float(value)
    return TurnSettings(
        mode=mode,
        seed=checked["Seed"],
        guidance_scale=checked["Guidance"],
        num_inference_steps=checked["Steps"],
        max_images=checked["Maximum pictures"],
        max_new_tokens=max_new_tokens,
    )


def user_turn(message: str | None, attachment: str | None, mode: str) -> dict:
    """The user's turn: the message, or `[picture, text]` with an attached picture."""
    text = (message or "").strip()
    if mode == "Picture only":
        if not text:
            raise InputError(
                "Type what to draw in the Prompt box first (with an attached picture: the change, e.g. Make it blue.)."
            )
        if not attachment:
            return {"role": "user", "content": text}
        # An attached picture is edited: drawn from the picture read before the message (`edit_prompt`).
        return {
            "role": "user",
            "content": [{"type": "image", "image": read_picture(attachment)}, {"type": "text", "text": text}],
        }
    if not text and not attachment:
        raise InputError("The message is empty: type something in the Prompt box (or attach a picture) first.")
    if not attachment:
        return {"role": "user", "content": text}
    content: list[Any] = [{"type": "image", "image": read_picture(attachment)}]
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _progress_message(live) -> str:
    if live.drawing is not None:
        index, step, total = live.drawing
        return f"Drawing picture {index + 1}: step {step} of {total}…"
    return "Writing…"


class DreamLLMPage:
    """
    The page's logic on one pipeline: `generate` (a Gradio generator handler), `stop`, `clear`, and `build()`, the
    `gr.Blocks`. The turns of everyone using the page are documents of one [`ServingEngine`]'s running batch, written
    together; bad input gets a message in the page.
    """

    def __init__(
        self,
        pipe,
        defaults: PageDefaults | None = None,
        title: str = "DreamLLM",
        description: str = "",
        engine: ServingEngine | None = None,
    ):
        self.pipe = pipe
        self.engine = engine if engine is not None else ServingEngine(pipe)
        self.text2image = DreamLLMText2ImagePipeline.from_pipe(pipe)  # shares the components
        self.defaults = defaults or PageDefaults()
        self.title = title
        self.description = description
        self._stops: dict[str, threading.Event] = {}
        self._downloads = Path(tempfile.mkdtemp(prefix="dreamllm-serve-"))
        self._download_count = 0
        self._lock = threading.Lock()

    @staticmethod
    def _session(request) -> str:
        return getattr(request, "session_hash", None) or "local"  # Gradio passes the request; a direct call may not

    def generate(
        self,
        message,
        attachment,
        mode,
        seed,
        guidance_scale,
        steps,
        max_pictures,
        conversation,
        request: gr.Request | None = None,
    ):
        """Yields (document, status, conversation, prompt box, attachment, download button) as the answer grows."""
        conversation = list(conversation or [])
        try:
            settings = read_settings(mode, seed, guidance_scale, steps, max_pictures, self.defaults.max_new_tokens)
            asked = conversation + [user_turn(message, attachment, mode)]
        except InputError as error:
            yield (
                conversation_html(conversation),
                status_html(str(error), error=True),
                conversation,
                gr.skip(),
                gr.skip(),
                gr.skip(),
            )
            return

        session, stop = self._session(request), threading.Event()
        self._stops[session] = stop
        live = None
        yield (
            conversation_html(asked, turn_html("assistant", [], note="Writing…")),
            status_html("Writing…"),
            gr.skip(),
            "",
            None,
            gr.skip(),
        )
        try:
            for live in write_turn(self.engine, self.text2image, asked, settings, stop):
                live_html = turn_html("assistant", live.segments, live.drawing)
                yield (
                    conversation_html(asked, live_html),
                    status_html(_progress_message(live)),
                    gr.skip(),
                    gr.skip(),
                    gr.skip(),
                    gr.skip(),
                )
        except Exception as error:
            logger.exception("Generation failed")
            yield (
                conversation_html(conversation),
                status_html(f"Could not write the answer: {error}", error=True),
                conversation,
                message,
                attachment,
                gr.skip(),
            )
            return
        finally:
            if self._stops.get(session) is stop:
                del self._stops[session]

        answer = {"role": "assistant", "content": live.document()}
        conversation = asked + [answer]
        message_done = _FINISHED.get(live.stop_reason, "Done.")
        if not answer["content"]:
            message_done += " The answer is empty."
        download = self.write_download(answer["content"], live.stop_reason, title=(message or "").strip())
        yield (
            conversation_html(conversation),
            status_html(message_done),
            conversation,
            gr.skip(),
            gr.skip(),
            gr.update(value=download, interactive=True),
        )

    def write_download(self, document: list, stop_reason: str | None, title: str = "") -> str:
        """The answer as a self-contained HTML file (`save_html`); returns its path."""
        pictures = [segment for segment in document if not isinstance(segment, str)]
        text = "\n".join(segment for segment in document if isinstance(segment, str))
        output = DreamLLMPipelineOutput(
            images=[pictures], text=[text], documents=[document], stop_reasons=[stop_reason or STOPPED]
        )
        with self._lock:
            self._download_count += 1
            path = self._downloads / f"dreamllm-document-{self._download_count}.html"
        output.save_html(path, title=f"DreamLLM: {title}" if title else "DreamLLM")
        return str(path)

    def stop(self, request: gr.Request | None = None) -> str:
        """Asks this session's running turn to stop (at the next denoising step or text event)."""
        stop = self._stops.get(self._session(request))
        if stop is None:
            return status_html("Nothing is being written.")
        stop.set()
        return status_html("Stopping…")

    def clear(self, request: gr.Request | None = None):
        """A new conversation (a running turn of this session is stopped)."""
        stop = self._stops.get(self._session(request))
        if stop is not None:
            stop.set()
        return conversation_html([]), status_html(""), [], gr.update(value=None, interactive=False)

    def build(self):
        """The `gr.Blocks` of the page. Generations run at once (the engine writes them together, up to its
        `max_queue`); stopping and starting anew are not queued behind them."""
        d = self.defaults
        with gr.Blocks(title=self.title, analytics_enabled=False) as blocks:
            gr.Markdown(f"# {self.title}\n{self.description}")
            conversation = gr.State([])
            with gr.Row():
                with gr.Column(scale=3):
                    document = gr.HTML(
                        conversation_html([]), css_template=DOCUMENT_CSS, js_on_load=None, elem_id="document"
                    )
                    status = gr.HTML(status_html(""), css_template=DOCUMENT_CSS, js_on_load=None, elem_id="status")
                    with gr.Row(equal_height=True):
                        prompt = gr.Textbox(
                            label="Prompt", placeholder="Tell me a story.", lines=3, max_lines=8, scale=3
                        )
                        # gr.File, not gr.Image: Gradio would open an unreadable upload itself and fail with its own
                        # error; read_picture gives the page's message instead.
                        attachment = gr.File(
                            label="Picture (optional)",
                            file_types=["image"],
                            type="filepath",
                            height=140,
                            scale=1,
                            min_width=180,
                            elem_id="attachment",
                        )
                    with gr.Row():
                        generate = gr.Button("Generate", variant="primary", scale=2)
                        stop = gr.Button("Stop", variant="stop", scale=1)
                with gr.Column(scale=1, min_width=220):
                    new = gr.Button("New conversation", size="md")
                    download = gr.DownloadButton("Download as HTML", interactive=False, size="md")
                    mode = gr.Radio(
                        list(MODES),
                        value=MODES[0],
                        label="Mode",
                        info="Document: text and pictures. Answer only: text. Picture only: one picture "
                        "of the message (with an attached picture: its edit).",
                    )
                    seed = gr.Number(d.seed, label="Seed", precision=0, minimum=0)
                    guidance = gr.Slider(0.0, MAX_GUIDANCE, value=d.guidance_scale, step=0.5, label="Guidance")
                    steps = gr.Slider(1, MAX_STEPS_LIMIT, value=d.num_inference_steps, step=1, label="Steps")
                    max_pictures = gr.Slider(
                        0, MAX_PICTURES_LIMIT, value=d.max_images, step=1, label="Maximum pictures"
                    )
            gr.on(
                [generate.click, prompt.submit],
                self.generate,
                inputs=[prompt, attachment, mode, seed, guidance, steps, max_pictures, conversation],
                outputs=[document, status, conversation, prompt, attachment, download],
                show_progress="minimal",
                show_progress_on=status,
                api_name="generate",
            )
            # Not queued behind the generation it stops.
            stop.click(self.stop, None, status, concurrency_limit=None, show_progress="hidden", api_name="stop")
            new.click(
                self.clear,
                None,
                [document, status, conversation, download],
                concurrency_limit=None,
                show_progress="hidden",
                api_name="new_conversation",
            )
        return blocks.queue(default_concurrency_limit=self.engine.max_queue)


def build_app(pipe, defaults: PageDefaults | None = None, title: str = "DreamLLM", description: str = ""):
    """The page on `pipe` as a queued `gr.Blocks` (call `.launch()`); its `dreamllm_engine` is the [`ServingEngine`]
    that writes everyone's turns together."""
    page = DreamLLMPage(pipe, defaults, title=title, description=description)
    blocks = page.build()
    blocks.dreamllm_engine = page.engine
    return blocks


__all__ = ["DreamLLMPage", "InputError", "PageDefaults", "build_app", "read_picture", "read_settings", "user_turn"]
