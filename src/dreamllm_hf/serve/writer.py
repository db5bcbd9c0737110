"""One turn of the conversation, written by the serving engine while the page shows it as it grows.

The turn is one document of the engine's running batch ([`ServingEngine`]): turns of several people are written
together, each joining the batch at the next step. A reader thread moves the document's events (and the denoising
steps of its pictures, which is how the page shows "drawing picture k: step i of n") to the page's generator. A stop
cancels the document: the page's turn ends at once, keeping what was finished (not a half-drawn picture), and the
document leaves the batch at its next step (a picture it alone was drawing stops at the next denoising step).
"Picture only" draws with text-to-image on the engine's model thread, and a stop interrupts its denoising loop.
"""

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..pipelines.document_writer import DocumentRequest
from ..pipelines.pipeline_dreamllm_text2img import edit_prompt
from ..pipelines.pipeline_output import DocumentEvent, DreamLLMPipelineOutput, StopReason
from .engine import DenoisingStep


MODES = ("Document", "Answer only", "Picture only")
STOPPED = "stopped"  # the stop reason of a turn the user stopped


@dataclass
class TurnSettings:
    """How a turn is written. `mode` is one of `MODES`."""

    mode: str = "Document"
    seed: int = 0
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    max_images: int = 4
    max_new_tokens: int = 256


@dataclass
class LiveTurn:
    """The answer as written so far: `segments` (text and PIL pictures, in reading order, as a document's segments),
    `drawing` = (picture index, steps done, steps) while a picture is drawn, `stop_reason` once it is finished."""

    segments: list = field(default_factory=list)
    drawing: tuple[int, int, int] | None = None
    stop_reason: str | None = None

    final: list | None = None  # the finished document as the pipeline returns it (`document_end`)

    def add_text(self, text: str) -> None:
        if self.segments and isinstance(self.segments[-1], str):
            self.segments[-1] += text
        elif self.segments:
            self.segments.append(text.removeprefix("\n"))  # the stream joins segments with a newline
        else:
            self.segments.append(text)

    def document(self) -> list:
        """The answer as `out.documents[i]` holds it (a stopped one: what was finished, no empty text)."""
        if self.final is not None:
            return list(self.final)
        return [s for s in self.segments if not (isinstance(s, str) and not s.strip())]


_DONE = object()


def write_turn(
    engine,
    text2image,
    conversation: list[dict],
    settings: TurnSettings,
    stop: threading.Event,
    min_interval: float = 0.1,
) -> Iterator[LiveTurn]:
    """
    Writes the assistant's answer to `conversation` (which ends with the user's turn) on `engine` (a
    [`ServingEngine`]), yielding the growing [`LiveTurn`] (the same object, updated) at most every `min_interval`
    seconds and whenever a picture starts or arrives. "Picture only" draws the last user turn's text with `text2image`
    on the engine's model thread. When `stop` is set, the turn ends at the next event or denoising step with
    `stop_reason` `STOPPED`, keeping what was finished. The model's errors are raised here.
    """
    events: queue.Queue = queue.Queue()
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    if settings.mode == "Picture only":
        cancel = _draw_picture(engine, text2image, conversation, settings, generator, stop, events)
    else:
        request = DocumentRequest(
            prompt=conversation,
            max_images=settings.max_images,
            allow_images=settings.mode == "Document",
            do_sample=True,
            max_new_tokens=settings.max_new_tokens,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=generator,
        )
        stream = engine.submit(request, denoising_progress=True)
        cancel = stream.cancel
        threading.Thread(target=_read, args=(stream, events), name="dreamllm-turn", daemon=True).start()

    live, last_yield, changed, drawing = LiveTurn(), 0.0, False, 0
    try:
        while not stop.is_set():
            try:
                item = events.get(timeout=min_interval)
            except queue.Empty:
                item = None
            if item is _DONE:
                break
            if isinstance(item, Exception):
                raise item
            urgent = False
            if isinstance(item, DenoisingStep):
                live.drawing = (drawing, item.step, item.total)
            elif isinstance(item, DocumentEvent):
                if item.type == "text":
                    live.add_text(item.text)
                elif item.type == "picture_start":
                    drawing = item.index
                    live.drawing, urgent = (item.index, 0, settings.num_inference_steps), True
                elif item.type == "picture":
                    live.segments.append(item.image)
                    live.drawing, urgent = None, True
                elif item.type == "document_end":
                    live.stop_reason, live.final = item.stop_reason, item.output.documents[0]
            changed = changed or item is not None
            if changed and (urgent or time.monotonic() - last_yield >= min_interval):
                yield live
                last_yield, changed = time.monotonic(), False
        if stop.is_set():
            live.drawing = None  # what follows a stop request is not shown
            live.stop_reason = live.stop_reason or STOPPED
        yield live
    finally:
        # Also when the page goes away mid-turn: the document leaves the batch instead of being written for nobody.
        stop.set()
        cancel()


def _read(stream, events: queue.Queue) -> None:
    """The document's events, from its stream to the page's queue."""
    try:
        for event in stream:
            events.put(event)
    except Exception as error:  # handed to the page's thread, which reports it
        events.put(error)
    finally:
        events.put(_DONE)


def _draw_picture(engine, text2image, conversation, settings, generator, stop, events: queue.Queue):
    """ "Picture only": text-to-image of the last user turn on the engine's model thread (with its picture, the edit
    of that picture: `edit_prompt`); returns how to cancel it."""
    caption, pictures = _last_user_text(conversation), _last_user_pictures(conversation)
    if pictures:
        caption = edit_prompt(caption, len(pictures))

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        events.put(DenoisingStep(0, step + 1, pipeline.num_timesteps))
        if stop.is_set():
            pipeline._interrupt = True  # the denoising loop skips its remaining steps
        return callback_kwargs

    def draw():
        return text2image(
            caption,
            image=pictures or None,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=generator,
            callback_on_step_end=on_step_end,
        ).images[0]

    def finished(future):
        if future.cancelled():
            events.put(_DONE)
            return
        error = future.exception()
        if error is not None:
            events.put(error)
        else:
            picture = future.result()
            events.put(DocumentEvent(type="picture", document=0, image=picture, index=0))
            output = DreamLLMPipelineOutput(
                images=[[picture]], text=None, documents=[[picture]], stop_reasons=[StopReason.IMAGE]
            )
            events.put(DocumentEvent(type="document_end", document=0, stop_reason=StopReason.IMAGE, output=output))
        events.put(_DONE)

    events.put(DocumentEvent(type="picture_start", document=0, index=0))
    future = engine.run_in_model_thread(draw)
    future.add_done_callback(finished)
    return future.cancel


def _last_user_pictures(conversation: list[dict]) -> list:
    content = conversation[-1]["content"]
    if isinstance(content, str):
        return []
    return [item["image"] for item in content if isinstance(item, dict) and item.get("type") == "image"]


def _last_user_text(conversation: list[dict]) -> str:
    content = conversation[-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(
        item if isinstance(item, str) else item.get("text", "") for item in content if isinstance(item, (str, dict))
    ).strip()


__all__ = ["MODES", "STOPPED", "LiveTurn", "TurnSettings", "write_turn"]
