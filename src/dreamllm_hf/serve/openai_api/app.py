"""The OpenAI-compatible HTTP API: a FastAPI app on a [`ServingEngine`], so that every request's documents are written
together with the others' (see docs/api.md for the fields, the answers and the errors)."""

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ... import checks
from ...pipelines import DreamLLMText2ImagePipeline, edit_prompt
from ..engine import DEFAULT_MAX_QUEUE, EngineClosed, QueueFull, ServingEngine, seeded_generator
from . import protocol
from .errors import APIError, RequestGuard, read_json
from .pictures import EDIT_FORMATS, png_base64, read_picture
from .settings import DEFAULT_MAX_REQUEST_MB, DEFAULT_MODEL_NAME


MAX_REQUEST_MB = checks.POSITIVE_NUMBER
# How often a handler waiting on the model checks that its client is still there.
DISCONNECT_POLL_S = 0.25

# The pipelines' argument names in their messages, as the API calls them.
_CHAT_NAMES = {
    "max_new_tokens": "max_tokens",
    "prompt": "messages",
    "image": "messages",
    "allow_images": "modalities",
}
_IMAGE_NAMES = {"num_images_per_prompt": "n"}
# Pipeline arguments that an API field sets: a message about them is said to be about that field.
_IMAGE_FIELDS = {"height": "size", "width": "size"}


def build_api_app(
    pipe,
    *,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
    model_name: str = DEFAULT_MODEL_NAME,
    defaults: protocol.GenerationDefaults | None = None,
    engine: ServingEngine | None = None,
) -> FastAPI:
    """
    The API on `pipe` (a [`DreamLLMPipeline`]): `POST /v1/chat/completions`, `POST /v1/images/generations`,
    `POST /v1/images/edits`, `GET /v1/models`, `GET /health`.

    Args:
        pipe ([`DreamLLMPipeline`]): the model. The app starts a [`ServingEngine`] on it when it starts (uvicorn's
            lifespan) and closes it when it stops; from then on only the engine's thread uses the model.
        api_key (`str`, *optional*): when set, every route but `/health` needs `Authorization: Bearer <api_key>`.
        max_queue (`int`, defaults to 64): the most documents (and pictures jobs) waiting or being written; past it a
            request gets 429.
        max_request_mb (`float`, defaults to 20): the largest request body, in MiB (413 past it).
        model_name (`str`, defaults to `"dreamllm"`): the model's name in `GET /v1/models` and the answers; a request
            naming another model gets 404.
        defaults ([`GenerationDefaults`], *optional*): what a request that leaves a field out gets.
        engine ([`ServingEngine`], *optional*): an engine already running on `pipe` (the web page's, say) to use
            instead of starting one; the app then leaves it running when it stops.
    """
    checks.POSITIVE_INT.check("max_queue", max_queue)
    MAX_REQUEST_MB.check("max_request_mb", max_request_mb)
    if engine is not None and engine.pipe is not pipe:
        raise ValueError("`engine` runs another pipeline than `pipe`; give the engine's own `pipe`.")
    defaults = defaults or protocol.GenerationDefaults()
    text2image = DreamLLMText2ImagePipeline.from_pipe(pipe) if getattr(pipe, "unet", None) is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = engine if engine is not None else ServingEngine(pipe, max_queue=max_queue)
        try:
            yield
        finally:
            if engine is None:
                await run_in_threadpool(app.state.engine.close)

    app = FastAPI(title="DreamLLM", summary="An OpenAI-compatible API for DreamLLM documents", lifespan=lifespan)
    max_request_bytes = int(max_request_mb * 2**20)
    app.add_middleware(RequestGuard, api_key=api_key, max_bytes=max_request_bytes)
    app.add_exception_handler(APIError, lambda request, error: error.response())
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, lambda request, error: _api_error(error).response())

    @app.get("/health")
    async def health(request: Request):
        serving = request.app.state.engine
        if not serving.is_running:
            raise APIError(503, "The model thread is not running.", code="engine_closed")
        return {"status": "ok", "model": model_name, "load": serving.load, "max_queue": serving.max_queue}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_name)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        protocol.check_model(name, model_name)
        return _model_card(model_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = protocol.parse_request(read_json(await request.body()), protocol.ChatCompletionRequest)
        protocol.check_model(chat.model, model_name)
        serving: ServingEngine = request.app.state.engine
        if chat.n > serving.max_queue:
            raise APIError(
                400,
                f"`n` must be at most {serving.max_queue} on this server (the documents it writes at once, "
                f"`--max-queue`), got {chat.n}.",
                param="n",
            )

        def submit():
            documents = protocol.chat_documents(chat, defaults)
            return serving.submit_many(documents)

        try:
            streams = await run_in_threadpool(submit)
        except Exception as error:
            raise _api_error(error, _CHAT_NAMES) from None
        if chat.stream:
            include_usage = chat.stream_options is None or chat.stream_options.include_usage
            return StreamingResponse(
                _stream_chat(request, streams, model_name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete_chat(request, streams, model_name)

    def check_drawing(body) -> None:
        """What `/v1/images/generations` and `/v1/images/edits` refuse before any work."""
        protocol.check_model(body.model, model_name)
        if text2image is None:
            raise APIError(400, "This model has no picture decoder (no UNet): it writes text only.", param="model")
        if body.response_format not in (None, "b64_json"):
            raise APIError(
                400,
                f"`response_format` {body.response_format!r} is not supported: this server keeps no files and returns "
                "pictures inline; ask for 'b64_json'.",
                param="response_format",
            )

    async def draw(request: Request, body, prompt: str, pictures: list | None = None):
        """`body.n` pictures of `prompt` (reading `pictures` at its `<image>`s) by text-to-image on the model thread,
        as OpenAI's images answer."""
        try:
            height, width = protocol.picture_size(body.size, None, None)
            seeds = protocol.document_seeds(body.seed, body.n)
            settings = dict(
                image=pictures,
                height=height,
                width=width,
                num_inference_steps=body.num_inference_steps or defaults.num_inference_steps,
                guidance_scale=body.guidance_scale if body.guidance_scale is not None else defaults.guidance_scale,
                negative_prompt=body.negative_prompt,
                num_images_per_prompt=body.n,
                output_type="pil",
            )

            def run():
                generators = [seeded_generator(seed) for seed in seeds]
                return text2image(prompt, generator=generators, **settings).images

            job = request.app.state.engine.run_in_model_thread(run)
            drawn = await _wait(request, asyncio.wrap_future(job), on_gone=job.cancel)
            if drawn is None:
                return Response(status_code=499)  # the client left; nobody reads this
            data = await run_in_threadpool(
                lambda: [{"b64_json": png_base64(p), "revised_prompt": None} for p in drawn]
            )
        except Exception as error:
            raise _api_error(error, _IMAGE_NAMES, _IMAGE_FIELDS) from None
        return {"created": protocol.now(), "data": data}

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        body = protocol.parse_request(read_json(await request.body()), protocol.ImageGenerationRequest)
        check_drawing(body)
        return await draw(request, body, body.prompt)

    # (without a decoder, `check_drawing` says so)
    max_edit_pictures = (
        protocol.edit_picture_limit(text2image) if text2image is not None else protocol.MAX_EDIT_PICTURES
    )

    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise APIError(
                400,
                "An edit is sent as multipart/form-data, the picture as a file (as the openai client's `images.edit` "
                f"and `curl -F image=@red.png -F prompt=...` send it), got `Content-Type: {content_type}`.",
                code="invalid_content_type",
            )
        # Parts as large as the body may be (the guard bounds the body); the pictures are read here, off the model.
        async with request.form(max_part_size=max_request_bytes) as form:
            body, files = protocol.edit_request(form.multi_items(), max_edit_pictures)
            check_drawing(body)
            pictures = []
            for index, upload in enumerate(files):
                param = "image" if len(files) == 1 else f"image[{index}]"
                data = await upload.read()
                pictures.append(await run_in_threadpool(read_picture, data, param, "", EDIT_FORMATS))
        try:
            prompt = edit_prompt(body.prompt, len(pictures))
        except ValueError as error:
            raise _api_error(error) from None
        return await draw(request, body, prompt, pictures)

    return app


# ---------------------------------------------------------------------------------------------------------------------
# Chat answers


class _ClientGone(Exception):
    """The client disconnected while its documents were written."""


_END = object()


async def _events(request: Request, streams: list) -> AsyncIterator[list[tuple[int, object]]]:
    """The `(choice, event)`s of the request's documents, in batches of those that have arrived (a writer step's, or
    more while this event loop was busy); when the client disconnects, every document is cancelled (freeing its rows in
    the running batch) and `_ClientGone` is raised."""
    gone = asyncio.Event()

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        gone.set()
        for stream in streams:
            stream.cancel()  # they end at the writer's next step, and so does the loop below

    watcher = asyncio.create_task(watch())
    tasks = []
    try:
        if len(streams) == 1:  # the common case, without a task between the stream and the answer
            while batch := await streams[0].next_events():
                yield [(0, event) for event in batch]
        else:
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(index, stream):
                try:
                    while batch := await stream.next_events():
                        await queue.put([(index, event) for event in batch])
                except Exception as error:
                    await queue.put(error)
                await queue.put(_END)

            tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
            running = len(streams)
            while running:
                item = await queue.get()
                if item is _END:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        if gone.is_set():
            raise _ClientGone()
    finally:
        # Also when the response is cancelled (starlette cancels a streaming response whose client left).
        for stream in streams:
            stream.cancel()
        watcher.cancel()
        for task in tasks:
            task.cancel()


async def _complete_chat(request: Request, streams: list, model_name: str):
    count = len(streams)
    documents, stop_reasons, usages = [None] * count, [None] * count, [None] * count
    try:
        async for batch in _events(request, streams):
            for index, event in batch:
                if event.type == "document_end":
                    stop_reasons[index], usages[index] = event.stop_reason, event.usage
                    documents[index] = event.output.documents[0] if event.output is not None else []
    except _ClientGone:
        return Response(status_code=499)  # nobody reads it
    except Exception as error:
        raise _api_error(error) from None
    choices = await run_in_threadpool(
        lambda: [
            {
                "index": index,
                "message": {"role": "assistant", "content": protocol.message_content(documents[index])},
                "finish_reason": protocol.finish_reason(stop_reasons[index]),
                "stop_reason": stop_reasons[index],
            }
            for index in range(count)
        ]
    )
    return JSONResponse(
        {
            "id": protocol.completion_id(),
            "object": "chat.completion",
            "created": protocol.now(),
            "model": model_name,
            "choices": choices,
            "usage": protocol.usage(usages),
        }
    )


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _stream_chat(request: Request, streams: list, model_name: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-Sent Events: per choice a first chunk with the role, text deltas as they are sampled, each picture as an
    image part when it is drawn, the choice's `finish_reason`; then the usage (unless `stream_options.include_usage`
    is false) and `data: [DONE]`."""
    completion, created = protocol.completion_id(), protocol.now()

    def chunk(choices, modality="text", **fields):
        return _sse(protocol.chunk(completion, created, model_name, choices, modality, **fields))

    usages = [None] * len(streams)
    after_picture = [False] * len(streams)  # the text after a picture starts with the newline that joins segments
    for index in range(len(streams)):
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    try:
        async for batch in _events(request, streams):
            out, texts = [], {}  # the batch's chunks, written out together; the text of each choice, as one delta

            def flush_text():
                for index, text in texts.items():
                    out.append(chunk([{"index": index, "delta": {"content": text}, "finish_reason": None}]))
                texts.clear()

            for index, event in batch:
                if event.type == "text":
                    text = event.text
                    if after_picture[index]:
                        text, after_picture[index] = text.removeprefix("\n"), False
                    if text:
                        texts[index] = texts.get(index, "") + text
                    continue
                flush_text()  # what came before this event goes out before it
                if event.type == "picture_start":
                    out.append(f": picture {event.index} of choice {index} is being drawn\n\n")  # an SSE comment
                elif event.type == "picture":
                    part = await run_in_threadpool(protocol.image_part, event.image)
                    after_picture[index] = True
                    delta = {"index": index, "delta": {"content": [part]}, "finish_reason": None}
                    out.append(chunk([delta], modality="image"))
                elif event.type == "document_end":
                    usages[index] = event.usage
                    reason = event.stop_reason
                    end = {"index": index, "delta": {}, "finish_reason": protocol.finish_reason(reason)}
                    out.append(chunk([{**end, "stop_reason": reason}]))
            flush_text()
            if out:
                yield "".join(out)
        if include_usage:
            yield chunk([], usage=protocol.usage(usages))
    except _ClientGone:
        return
    except Exception as error:
        yield _sse(_api_error(error).body())
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


async def _wait(request: Request, awaitable, on_gone):
    """The result of `awaitable`, or `None` (after `on_gone()`) when the client disconnects first."""
    task = asyncio.ensure_future(awaitable)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            on_gone()
            task.cancel()
            return None


def _model_card(model_name: str) -> dict:
    return {"id": model_name, "object": "model", "created": 0, "owned_by": "dreamllm-hf"}


def _api_error(error: Exception, names: dict | None = None, fields: dict | None = None) -> APIError:
    """Any error of a request as OpenAI reports it: the pipelines' `ValueError`s (bad input) as 400 with their own
    message, the argument names said as the API says them (`names`), or the message put under the API field that set
    the argument (`fields`)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, QueueFull):
        return APIError(429, str(error), code="queue_full")
    if isinstance(error, EngineClosed):
        return APIError(503, str(error), code="engine_closed")
    if isinstance(error, ValueError):
        names = names or {}
        message = re.sub(r"`(\w+)`", lambda match: f"`{names.get(match[1], match[1])}`", str(error))
        named = re.search(r"`(\w+)`", message)
        param = named[1] if named else None
        if param in (fields or {}):
            param = fields[param]
            message = f"`{param}`: {message}"
        return APIError(400, message, param=param)
    return APIError(500, f"The model failed on this request: {type(error).__name__}: {error}", code="model_error")


def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (an unknown route, a wrong method) in OpenAI's schema."""
    message = f"{request.method} {request.url.path}: {error.detail}."
    if error.status_code == 404:
        message += (
            " The routes are POST /v1/chat/completions, POST /v1/images/generations, POST /v1/images/edits, "
            "GET /v1/models, GET /health."
        )
    return APIError(error.status_code, message, code=None).response()


__all__ = ["build_api_app"]
