"""One model thread that writes every document of a server together: the `DocumentWriter` of the pipelines, driven.

[`ServingEngine`] owns the model. Its thread loops `writer.step()` while documents are queued or being written (each
step admits the documents submitted since the last one, so a request never waits for the others to finish), runs the
jobs handed to `run_in_model_thread` (text-to-image) between two steps, and sleeps when there is nothing to do. Every
submitted document gets a [`DocumentStream`] of its own events, which a web handler reads with `async for` and a
worker thread with `for`. Nothing here knows HTTP: the OpenAI-compatible API and the web page both sit on it.
"""

import asyncio
import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import checks
from ..pipelines import DocumentRequest, DocumentWriter


logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 64


class QueueFull(RuntimeError):
    """More documents (and model jobs) are waiting or being written than the engine's `max_queue` allows."""


class EngineClosed(RuntimeError):
    """The engine was closed: it takes no more work."""


@dataclass
class DenoisingStep:
    """A step of the picture a document is drawing (only in streams submitted with `denoising_progress=True`):
    `step` of `total` UNet steps are done. Sent live, as each denoising step of the picture is done: after the
    document's `"picture_start"` and before its `"picture"`."""

    document: int
    step: int
    total: int
    type: str = "denoising_step"


def seeded_generator(seed: int) -> torch.Generator:
    """A document's own random numbers: a CPU generator seeded with `seed` (the pipelines sample CUDA rows from it
    too), so that the document is the same whatever else is written beside it."""
    return torch.Generator("cpu").manual_seed(checks.SEED.check("seed", seed))


_END = object()  # put after a stream's last event


class DocumentStream:
    """
    The events of one document (`DocumentEvent`s as `DreamLLMPipeline.stream` yields them, ending with
    `"document_end"`), from the model thread to whoever reads them: `for event in stream` blocks a thread,
    `async for event in stream` awaits in an event loop, and `await stream.next_events()` takes every event that has
    arrived at once (what a server that writes them out together wants). An error of the model thread is raised by the
    reading. `cancel()` asks the writer to drop the document at its next step (its stream then ends with a
    `"document_end"` whose `stop_reason` is `"cancelled"`).
    """

    def __init__(self, document: int, cancel: Callable[[int], None]):
        self.document = document
        self._cancel = cancel
        self._items: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._done = False  # the last item was read
        self.finished = False  # the model thread delivered the end (or an error)
        self.cancelled = False

    # Model thread side -------------------------------------------------------------------------------------------
    def _put(self, item: Any, wake: bool = True) -> list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]:
        """Delivers `item`. `wake=False` returns the event-loop readers to wake instead of waking them, so that the
        engine wakes each loop once for all the streams of a step (`_wake_all`)."""
        with self._ready:
            self._items.append(item)
            if item is _END or isinstance(item, BaseException):
                self.finished = True
            self._ready.notify_all()
            waiters, self._waiters = self._waiters, []
        if wake:
            _wake_all(waiters)
            return []
        return waiters

    # Reader side --------------------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Drops the document (thread-safe; nothing happens when it is already finished)."""
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self._cancel(self.document)

    def _take(self, most: int | None) -> list:
        """Up to `most` delivered events (all with `None`), under `_ready`; at the end marker the stream is done, at an
        error it is raised (after the events before it were taken by an earlier call)."""
        taken = []
        while self._items and (most is None or len(taken) < most):
            item = self._items[0]
            if isinstance(item, BaseException) and taken:
                break  # hand out what came before the error first
            self._items.popleft()
            if item is _END:
                self._done = True
                break
            if isinstance(item, BaseException):
                self._done = True
                raise item
            taken.append(item)
        return taken

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        with self._ready:
            while True:
                if self._done:
                    raise StopIteration
                while not self._items:
                    self._ready.wait()
                taken = self._take(1)
                if taken:
                    return taken[0]

    async def next_events(self, most: int | None = None) -> list:
        """Every event delivered and not yet read (at least one, waiting for it; at most `most`); `[]` once the stream
        has ended."""
        loop = asyncio.get_running_loop()
        while True:
            with self._ready:
                if self._done:
                    return []
                if self._items:
                    taken = self._take(most)
                    if taken or self._done:
                        return taken
                future = loop.create_future()
                self._waiters.append((loop, future))
            await future

    def __aiter__(self):
        return self

    async def __anext__(self):
        taken = await self.next_events(1)
        if not taken:
            raise StopAsyncIteration
        return taken[0]


def _wake_all(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]) -> None:
    """Wakes the readers waiting in event loops: one call into each loop, whatever the number of streams."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
    for loop, future in waiters:
        by_loop.setdefault(loop, []).append(future)
    for loop, futures in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, futures)
        except RuntimeError:  # that event loop is closed: nobody is waiting any more
            pass


def _resolve(futures: list[asyncio.Future]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


class ServingEngine:
    """
    Writes the documents submitted from any thread together, on one model thread (see the module's docstring).

    Args:
        pipe ([`DreamLLMPipeline`]): the model; from now on only the engine's thread uses it (hand it other work with
            `run_in_model_thread`).
        max_queue (`int`, defaults to 64): the most documents and model jobs waiting or being written at once; past it
            `submit` and `run_in_model_thread` raise [`QueueFull`].

    Its `writer` is the [`DocumentWriter`] it drives (a fresh one replaces it when a step fails).

    ```py
    >>> engine = ServingEngine(pipe)
    >>> stream = engine.submit(DocumentRequest("Tell me a story.", generator=seeded_generator(0)))
    >>> for event in stream:
    ...     print(event.type)
    >>> engine.close()
    ```
    """

    def __init__(self, pipe, max_queue: int = DEFAULT_MAX_QUEUE):
        self.pipe = pipe
        self.max_queue = checks.POSITIVE_INT.check("max_queue", max_queue)
        self._lock = threading.Condition()
        self._streams: dict[int, DocumentStream] = {}  # the documents submitted and not finished
        self._progress: set[int] = set()  # the documents whose streams get `DenoisingStep`s
        self._jobs: collections.deque = collections.deque()  # (function, future) for `run_in_model_thread`
        self._running_jobs = 0
        self._closed = False
        self.writer = self._new_writer()
        self._thread = threading.Thread(target=self._run, name="dreamllm-model", daemon=True)
        self._thread.start()

    def _new_writer(self) -> DocumentWriter:
        # Continuous denoising: pictures that documents ask for at different steps share the UNet's batches, and the
        # other documents write on while a picture is drawn.
        return DocumentWriter(self.pipe, on_denoising_step=self._on_denoising_step, denoising="continuous")

    # Submitting ---------------------------------------------------------------------------------------------------
    @property
    def load(self) -> int:
        """Documents and model jobs waiting or being written (what `max_queue` bounds)."""
        with self._lock:
            return self._load()

    @property
    def is_running(self) -> bool:
        """Whether the model thread is alive and taking work."""
        return self._thread.is_alive() and not self._closed

    def submit(self, request: DocumentRequest, denoising_progress: bool = False) -> DocumentStream:
        """Queues one document (checked first: a `ValueError` names a bad argument); its stream delivers its events.
        `denoising_progress=True` also puts a [`DenoisingStep`] in the stream after each UNet step of its pictures."""
        return self.submit_many([request], denoising_progress=denoising_progress)[0]

    def submit_many(
        self, requests: Sequence[DocumentRequest], denoising_progress: bool = False
    ) -> list[DocumentStream]:
        """Queues all of `requests` or none of them (a bad one or a full queue refuses the lot)."""
        requests = list(requests)
        with self._lock:
            self._check_open()
            self._check_room(len(requests))
            streams = []
            try:
                for request in requests:
                    # Registered under the lock that event dispatch takes, so no event of it can come before.
                    document = self.writer.submit(request)
                    stream = DocumentStream(document, self._cancel)
                    self._streams[document] = stream
                    if denoising_progress:
                        self._progress.add(document)
                    streams.append(stream)
            except BaseException:
                for stream in streams:  # the ones already queued leave at the next step
                    stream.cancel()
                raise
            self._lock.notify_all()
        return streams

    def run_in_model_thread(self, function: Callable[[], Any]) -> concurrent.futures.Future:
        """Runs `function()` on the model thread between two writer steps (text-to-image with
        `DreamLLMText2ImagePipeline.from_pipe(pipe)`, say), so that the model is never used by two threads at once.
        Returns a `concurrent.futures.Future` of its result (`asyncio.wrap_future` awaits it)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._check_open()
            self._check_room(1)
            self._jobs.append((function, future))
            self._lock.notify_all()
        return future

    def close(self, timeout: float | None = 60.0) -> None:
        """Stops the model thread after its current step; documents still queued or written end with an
        [`EngineClosed`] error, jobs not started are cancelled."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._fail_all(EngineClosed("The serving engine was closed while this document was being written."))

    def __enter__(self) -> "ServingEngine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed or not self._thread.is_alive():
            raise EngineClosed("The serving engine is closed; it takes no more requests.")

    def _load(self) -> int:
        return len(self._streams) + len(self._jobs) + self._running_jobs

    def _check_room(self, count: int) -> None:
        load = self._load()
        if load + count > self.max_queue:
            raise QueueFull(
                f"The server is busy: {load} documents are waiting or being written and at most {self.max_queue} are "
                f"allowed (`max_queue`); this request asks for {count} more. Retry in a moment."
            )

    def _cancel(self, document: int) -> None:
        self.writer.cancel(document)
        with self._lock:
            self._lock.notify_all()

    # The model thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._jobs and not self.writer.has_work:
                    self._lock.wait()
                if self._closed:
                    break
                jobs, self._jobs = list(self._jobs), collections.deque()
                self._running_jobs = len(jobs)  # they count in `load` until they are done
            for function, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(function())
                    except BaseException as error:  # handed to whoever waits on it
                        future.set_exception(error)
                with self._lock:
                    self._running_jobs -= 1
            if self.writer.has_work:
                self._step()
        for _, future in self._jobs:
            future.cancel()

    def _step(self) -> None:
        try:
            for events in self.writer.step_parts():  # the step's text goes out before its pictures are drawn
                self._dispatch(events)
        except Exception as error:
            # The writer's state is unknown after a failed step: its documents get the error, a fresh writer serves on.
            logger.exception("A writer step failed; the documents being written end with its error.")
            self._fail_all(error, new_writer=True)

    def _dispatch(self, events: list) -> None:
        waiters = []
        with self._lock:
            for event in events:
                stream = self._streams.get(event.document)
                if stream is None:
                    continue
                waiters += stream._put(event, wake=False)
                if event.type == "document_end":
                    waiters += stream._put(_END, wake=False)
                    del self._streams[event.document]
                    self._progress.discard(event.document)
        _wake_all(waiters)

    def _on_denoising_step(self, documents: list[int], step: int, total: int) -> None:
        waiters = []
        with self._lock:
            for document in documents:
                if document in self._progress and document in self._streams:
                    waiters += self._streams[document]._put(DenoisingStep(document, step, total), wake=False)
        _wake_all(waiters)

    def _fail_all(self, error: BaseException, new_writer: bool = False) -> None:
        """Ends every document with `error` (and, with `new_writer`, swaps in a fresh writer in the same breath, so
        that no request is submitted to the old one after its documents were failed)."""
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
            self._progress.clear()
            if new_writer:
                self.writer = self._new_writer()
        _wake_all([waiter for stream in streams for waiter in stream._put(error, wake=False)])


__all__ = [
    "DEFAULT_MAX_QUEUE",
    "DenoisingStep",
    "DocumentStream",
    "EngineClosed",
    "QueueFull",
    "ServingEngine",
    "seeded_generator",
]
