"""One turn of the conversation, written in a worker thread so that the page can show it as it grows.

`DreamLLMPipeline.stream` yields between engine steps, not while a picture is denoised; the worker also reports each
denoising step (through `callback_on_step_end`), which is how the page shows "drawing picture k: step i of n". A stop
request interrupts the denoising loop at its next step (diffusers' `_interrupt`) and ends the stream at its next event.
"""

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..pipelines.pipeline_output import StopReason


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


@dataclass
class _Step:
    index: int
    step: int
    total: int


_DONE = object()


def write_turn(
    pipe,
    text2image,
    conversation: list[dict],
    settings: TurnSettings,
    stop: threading.Event,
    min_interval: float = 0.1,
) -> Iterator[LiveTurn]:
    """
    Writes the assistant's answer to `conversation` (which ends with the user's turn), yielding the growing
    [`LiveTurn`] (the same object, updated) at most every `min_interval` seconds and whenever a picture starts or
    arrives. "Picture only" draws the last user turn's text with `text2image`. When `stop` is set, the turn ends at
    the next denoising step or event with `stop_reason` `STOPPED`, keeping what was finished (not a half-drawn
    picture). The pipeline's errors are raised here. Returns only when the worker is done with the model.
    """
    events: queue.Queue = queue.Queue()
    drawing = {"index": 0}

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        events.put(_Step(drawing["index"], step + 1, pipeline.num_timesteps))
        if stop.is_set():
            pipeline._interrupt = True  # the denoising loop skips its remaining steps
        return callback_kwargs

    def work():
        try:
            generator = torch.Generator("cpu").manual_seed(settings.seed)
            sampling = dict(
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                generator=generator,
                callback_on_step_end=on_step_end,
            )
            if settings.mode == "Picture only":
                events.put(("picture_start", 0))
                caption = _last_user_text(conversation)
                events.put(("picture", text2image(caption, **sampling).images[0]))
                events.put(("end", (StopReason.IMAGE, None)))
                return
            stream = pipe.stream(
                conversation,
                max_images=settings.max_images,
                allow_images=settings.mode == "Document",
                do_sample=True,
                max_new_tokens=settings.max_new_tokens,
                **sampling,
            )
            try:
                for event in stream:
                    if event.type == "text":
                        events.put(("text", event.text))
                    elif event.type == "picture_start":
                        drawing["index"] = event.index
                        events.put(("picture_start", event.index))
                    elif event.type == "picture":
                        events.put(("picture", event.image))
                    elif event.type == "document_end":
                        events.put(("end", (event.stop_reason, event.output.documents[0])))
                    if stop.is_set():
                        break
            finally:
                stream.close()
        except Exception as error:  # handed to the page's thread, which reports it
            events.put(error)
        finally:
            events.put(_DONE)

    worker = threading.Thread(target=work, name="dreamllm-turn", daemon=True)
    worker.start()
    live, last_yield, changed = LiveTurn(), 0.0, False
    try:
        while True:
            try:
                item = events.get(timeout=min_interval)
            except queue.Empty:
                item = None
            if item is _DONE:
                break
            if isinstance(item, Exception):
                raise item
            if stop.is_set():
                live.drawing = None  # what follows a stop request is not shown
                live.stop_reason = live.stop_reason or STOPPED
                continue
            urgent = False
            if isinstance(item, _Step):
                live.drawing = (item.index, item.step, item.total)
            elif isinstance(item, tuple):
                kind, value = item
                if kind == "text":
                    live.add_text(value)
                elif kind == "picture_start":
                    live.drawing, urgent = (value, 0, settings.num_inference_steps), True
                elif kind == "picture":
                    live.segments.append(value)
                    live.drawing, urgent = None, True
                elif kind == "end":
                    live.stop_reason, live.final = value
            changed = changed or item is not None
            if changed and (urgent or time.monotonic() - last_yield >= min_interval):
                yield live
                last_yield, changed = time.monotonic(), False
        if stop.is_set():
            live.drawing = None
            live.stop_reason = live.stop_reason or STOPPED
        yield live
    finally:
        # Also when the page goes away mid-turn: the next turn must not share the model with this one.
        stop.set()
        worker.join()


def _last_user_text(conversation: list[dict]) -> str:
    content = conversation[-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(
        item if isinstance(item, str) else item.get("text", "") for item in content if isinstance(item, (str, dict))
    ).strip()


__all__ = ["MODES", "STOPPED", "LiveTurn", "TurnSettings", "write_turn"]
