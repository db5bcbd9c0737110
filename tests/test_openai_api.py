"""The OpenAI-compatible API (`dreamllm-hf serve --api`): uvicorn for real on the shipped demo model, talked to with the
official `openai` client (and raw HTTP where the client cannot say it), and the serving engine beneath it."""

import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import random
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import PIL.Image
import pytest
import torch
import uvicorn

from dreamllm_hf.cli import build_parser
from dreamllm_hf.pipelines import DocumentRequest, DreamLLMPipeline, DreamLLMText2ImagePipeline, edit_prompt
from dreamllm_hf.serve import cli as serve_cli
from dreamllm_hf.serve import engine as engine_module
from dreamllm_hf.serve.engine import DocumentStream, EngineClosed, QueueFull, ServingEngine, seeded_generator
from dreamllm_hf.serve.openai_api import GenerationDefaults, build_api_app
from dreamllm_hf.serve.openai_api.pictures import png_data_url
from dreamllm_hf.serve.openai_api.protocol import MAX_CHOICES
from dreamllm_hf.shapes_world import draw_shape, sample_spec
from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH, DEMO_SEED
from dreamllm_hf.shapes_world.evaluation import named_colour_and_shape


pytestmark = pytest.mark.usefixtures("one_thread")

API_KEY = "test-key-0123"
MODEL = "dreamllm-demo"
MAX_QUEUE = 4
MAX_REQUEST_MB = 1
STEPS = 3  # denoising steps of the pictures in these tests (the demo model's own setting is 25)
GUIDANCE = 2.0
MAX_IMAGES = 4
DEFAULTS = GenerationDefaults(
    max_tokens=256, max_images=MAX_IMAGES, num_inference_steps=STEPS, guidance_scale=GUIDANCE
)
STORY = [{"role": "user", "content": "Tell me a story."}]


# ---------------------------------------------------------------------------------------------------------------------
# The server


@pytest.fixture(scope="module")
def demo_pipe():
    pipe = DreamLLMPipeline.from_pretrained(DEMO_MODEL_PATH, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def running(app):
    """`app` under uvicorn on 127.0.0.1, on a free port, in a background thread; stopped (lifespan included) after."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def server(demo_pipe):
    app = build_api_app(
        demo_pipe,
        api_key=API_KEY,
        max_queue=MAX_QUEUE,
        max_request_mb=MAX_REQUEST_MB,
        model_name=MODEL,
        defaults=DEFAULTS,
    )
    with running(app) as port:
        yield SimpleNamespace(
            app=app, engine=app.state.engine, pipe=demo_pipe, port=port, url=f"http://127.0.0.1:{port}"
        )
    assert not app.state.engine.is_running  # the app closed its engine when it stopped


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as session:
        yield session


def red_circle() -> PIL.Image.Image:
    return draw_shape(sample_spec(random.Random(1), colour="red", shape="circle"))


def direct(server, conversation, seed: int, **kwargs):
    """The pipeline called directly (on the model thread, between the engine's steps) with the server's settings."""
    settings = dict(
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_images=MAX_IMAGES, max_new_tokens=256, do_sample=True
    )
    settings.update(kwargs)

    def call():
        return server.pipe(conversation, generator=[torch.Generator("cpu").manual_seed(seed)], **settings)

    return server.engine.run_in_model_thread(call).result(timeout=300)


def read_picture(url: str) -> PIL.Image.Image:
    assert url.startswith("data:image/png;base64,")
    picture = PIL.Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert picture.format == "PNG"
    return picture.convert("RGB")


def document_of(content) -> list:
    """A message's content as a document's segments (text, PIL pictures)."""
    if isinstance(content, str):
        return [content]
    segments = []
    for part in content:
        part = part if isinstance(part, dict) else part.model_dump()
        if part["type"] == "text":
            segments.append(part["text"])
        else:
            assert part["type"] == "image_url"
            segments.append(read_picture(part["image_url"]["url"]))
    return segments


def assert_same_document(got: list, expected: list) -> None:
    """Same text, same pictures (8-bit pixels within one level: the batched UNet may round differently in fp32)."""
    assert len(got) == len(expected), (got, expected)
    for a, b in zip(got, expected):
        if isinstance(b, str):
            assert a == b
        else:
            assert not isinstance(a, str), (a, b)
            difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b.convert("RGB"), dtype=np.int16))
            assert a.size == b.size and difference.max() <= 1


def stream_chunks(client, **kwargs) -> list:
    return list(client.chat.completions.create(model=MODEL, stream=True, **kwargs))


def streamed_document(chunks, choice: int = 0) -> list:
    """The document a client rebuilds from the stream: text deltas joined, each picture where it came."""
    segments = []
    for chunk in chunks:
        for item in chunk.choices:
            if item.index != choice or item.delta.content is None:
                continue
            content = item.delta.content
            if isinstance(content, str):
                if not content:
                    continue
                if segments and isinstance(segments[-1], str):
                    segments[-1] += content
                else:
                    segments.append(content)
            else:
                segments.extend(document_of(content))
    return segments


# ---------------------------------------------------------------------------------------------------------------------
# Chat completions end to end


def test_a_text_answer_is_the_pipelines_text_for_the_same_seed(client, server):
    answer = client.chat.completions.create(
        model=MODEL, messages=STORY, modalities=["text"], seed=11, max_tokens=40, temperature=1.0
    )
    expected = direct(server, STORY, 11, allow_images=False, max_new_tokens=40, temperature=1.0)
    (choice,) = answer.choices
    assert isinstance(choice.message.content, str) and choice.message.content == expected.text[0]
    assert choice.message.role == "assistant" and answer.object == "chat.completion" and answer.model == MODEL
    assert choice.finish_reason == {"eos": "stop", "max_new_tokens": "length"}[expected.stop_reasons[0]]
    assert choice.model_extra["stop_reason"] == expected.stop_reasons[0]
    usage = answer.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 40
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.model_extra["pictures"] == 0


def test_a_document_with_pictures_is_the_pipelines_document_for_the_same_seed(client, server):
    answer = client.chat.completions.create(model=MODEL, messages=STORY, seed=DEMO_SEED)
    expected = direct(server, STORY, DEMO_SEED)
    content = answer.choices[0].message.content
    assert isinstance(content, list) and {part["type"] for part in content} == {"text", "image_url"}
    document = document_of(content)
    assert_same_document(document, expected.documents[0])
    pictures = [segment for segment in document if not isinstance(segment, str)]
    assert len(pictures) >= 1 and all(picture.size == (32, 32) for picture in pictures)
    assert answer.usage.model_extra["pictures"] == len(pictures)


def test_the_stream_sends_text_as_sampled_pictures_as_drawn_then_usage(client, server):
    whole = client.chat.completions.create(model=MODEL, messages=STORY, seed=DEMO_SEED)
    chunks = stream_chunks(client, messages=STORY, seed=DEMO_SEED)
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [
        c for c in chunks if c.choices and isinstance(c.choices[0].delta.content, str) and c.choices[0].delta.content
    ]
    pictures = [c for c in chunks if c.choices and isinstance(c.choices[0].delta.content, list)]
    assert len(texts) > 3  # token by token, not the whole text at the end
    assert pictures and all(c.model_extra["modality"] == "image" for c in pictures)
    assert_same_document(streamed_document(chunks), document_of(whole.choices[0].message.content))
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == whole.choices[0].finish_reason
    last = chunks[-1]
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()


def test_the_raw_stream_is_server_sent_events_ending_in_done(http):
    body = {"model": MODEL, "messages": STORY, "seed": 2, "stream": True, "stream_options": {"include_usage": False}}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and all(line.startswith(("data: ", ": ")) for line in lines)
    chunks = [json.loads(item) for item in data[:-1]]
    assert all(chunk["choices"] for chunk in chunks)  # no usage chunk when it is not asked for
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_picture_in_is_read_as_the_pipeline_reads_it(client, server):
    picture = red_circle()
    question = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(picture)}},
                {"type": "text", "text": "What is in the picture?"},
            ],
        }
    ]
    answer = client.chat.completions.create(model=MODEL, messages=question, modalities=["text"], temperature=0)
    pipeline_question = [{"role": "user", "content": [{"type": "image", "image": picture}, "What is in the picture?"]}]
    expected = direct(server, pipeline_question, 0, allow_images=False, do_sample=False)
    text = answer.choices[0].message.content
    assert text == expected.text[0]
    assert named_colour_and_shape(text) == ("red", "circle")


def test_a_second_turn_rebuilds_the_assistants_pictures_as_the_model_drew_them(client, server):
    first = client.chat.completions.create(model=MODEL, messages=STORY, seed=DEMO_SEED)
    drawn = first.choices[0].message.content
    assert isinstance(drawn, list) and any(part["type"] == "image_url" for part in drawn)
    follow_up = "Tell me another story."
    conversation = STORY + [{"role": "assistant", "content": drawn}, {"role": "user", "content": follow_up}]
    second = client.chat.completions.create(model=MODEL, messages=conversation, seed=5)

    # The same conversation handed to the pipeline: the assistant turn holds the (PNG round-tripped) PIL pictures.
    as_document = document_of(drawn)
    pipeline_conversation = STORY + [
        {"role": "assistant", "content": as_document},
        {"role": "user", "content": follow_up},
    ]
    expected = direct(server, pipeline_conversation, 5)
    assert_same_document(document_of(second.choices[0].message.content), expected.documents[0])
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_n_documents_take_seeds_seed_and_up(client):
    both = client.chat.completions.create(model=MODEL, messages=STORY, seed=20, n=2)
    assert [choice.index for choice in both.choices] == [0, 1]
    for index, choice in enumerate(both.choices):
        alone = client.chat.completions.create(model=MODEL, messages=STORY, seed=20 + index)
        assert_same_document(document_of(choice.message.content), document_of(alone.choices[0].message.content))
    chunks = stream_chunks(client, messages=STORY, seed=20, n=2)
    assert_same_document(streamed_document(chunks, 1), document_of(both.choices[1].message.content))


def test_images_generate_draws_the_text_to_image_pipelines_pictures(client, server):
    result = client.images.generate(
        model=MODEL,
        prompt="a red circle",
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE},
    )
    text2image = DreamLLMText2ImagePipeline.from_pipe(server.pipe)

    def call():
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in (7, 8)]
        settings = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE)
        return text2image("a red circle", num_images_per_prompt=2, generator=generators, **settings).images

    expected = server.engine.run_in_model_thread(call).result(timeout=300)
    got = [PIL.Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB") for item in result.data]
    assert len(got) == 2 and result.created > 0
    assert_same_document(got, expected)


EDIT = "Make it blue."
EDIT_SETTINGS = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE}


def png_bytes(picture: PIL.Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=format)
    return buffer.getvalue()


def b64_pictures(result) -> list:
    pictures = [PIL.Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
    assert all(picture.format == "PNG" for picture in pictures)
    return [picture.convert("RGB") for picture in pictures]


def text_to_image(server, prompt, seeds, **kwargs):
    """`DreamLLMText2ImagePipeline` called directly (on the model thread) with the server's settings."""
    text2image = DreamLLMText2ImagePipeline.from_pipe(server.pipe)

    def call():
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        return text2image(prompt, num_images_per_prompt=len(seeds), generator=generators, **EDIT_SETTINGS, **kwargs)

    return server.engine.run_in_model_thread(call).result(timeout=300).images


def blue_square() -> PIL.Image.Image:
    return draw_shape(sample_spec(random.Random(2), colour="blue", shape="square"))


def test_images_edit_draws_the_text_to_image_pipelines_edit_of_the_picture(client, server, tmp_path):
    picture = red_circle()
    result = client.images.edit(
        model=MODEL,
        image=("red.png", png_bytes(picture), "image/png"),
        prompt=EDIT,
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 7, **EDIT_SETTINGS},
    )
    got = b64_pictures(result)
    assert len(got) == 2 and result.created > 0 and all(p.size == (32, 32) for p in got)
    # The pipeline's own call: the picture read at `<image>`, before the instruction (BOS + prompt, no chat template).
    assert edit_prompt(EDIT) == "<image>Make it blue."
    expected = text_to_image(server, "<image>Make it blue.", [7, 8], image=[picture])
    assert_same_document(got, expected)

    # The same seed again (the picture as an open file this time): the same pictures.
    (tmp_path / "red.png").write_bytes(png_bytes(picture))
    with open(tmp_path / "red.png", "rb") as handle:
        again = client.images.edit(model=MODEL, image=handle, prompt=EDIT, extra_body={"seed": 7, **EDIT_SETTINGS})
    (first,) = b64_pictures(again)
    assert np.array_equal(np.asarray(first), np.asarray(got[0]))

    # The picture is read: without it (the instruction alone, as a plain generation) the drawing differs.
    plain = client.images.generate(
        model=MODEL, prompt=EDIT, response_format="b64_json", extra_body={"seed": 7, **EDIT_SETTINGS}
    )
    (without,) = b64_pictures(plain)
    difference = np.abs(np.asarray(without, dtype=np.int16) - np.asarray(got[0], dtype=np.int16))
    assert difference.max() > 16, difference.max()


def test_images_edit_reads_several_pictures_in_order_and_jpeg_and_webp(client, server):
    red, blue = red_circle(), blue_square()
    result = client.images.edit(
        model=MODEL,
        image=[png_bytes(red), ("blue.webp", png_bytes(blue, "WEBP"), "image/webp")],  # sent as `image[]`, twice
        prompt=EDIT,
        extra_body={"seed": 3, **EDIT_SETTINGS},
    )
    (got,) = b64_pictures(result)
    webp = PIL.Image.open(io.BytesIO(png_bytes(blue, "WEBP"))).convert("RGB")  # lossy: as the server decodes it
    (expected,) = text_to_image(server, "<image><image>Make it blue.", [3], image=[red, webp])
    assert_same_document([got], [expected])
    (swapped,) = text_to_image(server, "<image><image>Make it blue.", [3], image=[webp, red])
    assert np.abs(np.asarray(swapped, dtype=np.int16) - np.asarray(got, dtype=np.int16)).max() > 16

    jpeg = png_bytes(red, "JPEG")
    (from_jpeg,) = b64_pictures(
        client.images.edit(model=MODEL, image=("red.jpg", jpeg, "image/jpeg"), prompt=EDIT, extra_body={"seed": 3})
    )
    decoded = PIL.Image.open(io.BytesIO(jpeg)).convert("RGB")
    assert_same_document([from_jpeg], text_to_image(server, edit_prompt(EDIT), [3], image=[decoded]))


def test_images_edits_as_curl_sends_them(http, server):
    """`curl -F image=@red.png -F prompt=... -F seed=5`: a multipart form of text fields and a file, as in the docs."""
    picture = red_circle()
    form = {"prompt": EDIT, "seed": "5", "num_inference_steps": str(STEPS), "guidance_scale": str(GUIDANCE)}
    response = http.post("/v1/images/edits", data=form, files={"image": ("red.png", png_bytes(picture), "image/png")})
    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    got = PIL.Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB")
    assert_same_document([got], text_to_image(server, edit_prompt(EDIT), [5], image=[picture]))


def test_models_and_health(client, http, server):
    (listed,) = client.models.list().data
    assert listed.id == MODEL and listed.object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(f"{server.url}/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["max_queue"] == MAX_QUEUE


def test_a_client_that_leaves_mid_stream_cancels_its_document_and_others_go_on(server, http, client, monkeypatch):
    writer = server.engine.writer
    recorded, original_step = [], writer.step_parts

    def slow_step():  # a few ms a step, so that the long document is surely still being written when its client goes
        for events in original_step():
            recorded.extend(events)
            yield events
        time.sleep(0.005)

    monkeypatch.setattr(writer, "step_parts", slow_step)
    other = {}

    def other_request():
        other["answer"] = client.chat.completions.create(model=MODEL, messages=STORY, seed=31, max_tokens=60)

    long_document = {"model": MODEL, "messages": STORY, "stream": True, "modalities": ["text"], "seed": 1}
    with http.stream("POST", "/v1/chat/completions", json={**long_document, "max_tokens": 400}) as response:
        lines = response.iter_lines()
        role = next(line for line in lines if line.startswith("data: "))
        assert json.loads(role.removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
        thread = threading.Thread(target=other_request)
        thread.start()
        first_text = next(line for line in lines if '"content":"' in line and '"content":""' not in line)
        assert first_text
    # Leaving the block closes the connection mid-stream.
    thread.join(300)
    deadline = time.monotonic() + 60
    while (writer.has_work or server.engine.load) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not writer.has_work and server.engine.load == 0  # the left document's rows are free
    ends = [event for event in recorded if event.type == "document_end"]
    cancelled = [event for event in ends if event.stop_reason == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0].usage["completion_tokens"] < 400
    monkeypatch.undo()
    alone = client.chat.completions.create(model=MODEL, messages=STORY, seed=31, max_tokens=60)
    assert_same_document(
        document_of(other["answer"].choices[0].message.content), document_of(alone.choices[0].message.content)
    )


# ---------------------------------------------------------------------------------------------------------------------
# Bad requests: OpenAI's error schema, the pipelines' messages, and the server keeps serving


def _circle_data_url() -> str:
    return png_data_url(red_circle())


def _with_picture(url) -> list:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}],
        }
    ]


def chat(**fields):
    """A bad chat request through the openai client."""

    def call(env):
        body = {"model": MODEL, "messages": STORY, **fields}
        extra = {name: body.pop(name) for name in list(body) if name in EXTRA_FIELDS}
        return env.client.chat.completions.create(**body, extra_body=extra or None)

    return call


EXTRA_FIELDS = ("max_images", "num_inference_steps", "guidance_scale", "height", "width", "size", "max_image")


def raw(path="/v1/chat/completions", body=None, content=None, headers=None, key=API_KEY):
    """A bad request sent as raw HTTP (what the openai client cannot send: NaN, broken JSON, no key...)."""

    def call(env):
        sent = {} if key is None else {"Authorization": f"Bearer {key}"}
        sent.update(headers or {})
        if body is not None:
            content_bytes = json.dumps(body).encode()  # json.dumps writes NaN as the client would not
        else:
            content_bytes = content
        return httpx.post(f"{env.url}{path}", content=content_bytes, headers=sent, timeout=120)

    return call


def images(**fields):
    def call(env):
        extra = {name: fields.pop(name) for name in list(fields) if name in ("seed", "num_inference_steps")}
        return env.client.images.generate(model=MODEL, prompt="a red circle", extra_body=extra or None, **fields)

    return call


def edits(**fields):
    """A bad edit through the openai client (a red circle to edit unless `image` is given)."""

    def call(env):
        body = {"model": MODEL, "image": ("red.png", png_bytes(red_circle()), "image/png"), "prompt": EDIT, **fields}
        extra = {name: body.pop(name) for name in list(body) if name in ("seed", "num_inference_steps", "stream")}
        return env.client.images.edit(**body, extra_body=extra or None)

    return call


def raw_edit(files, key=API_KEY):
    """A bad edit as a raw multipart form (`files` as httpx takes them; `(None, text)` is a text field)."""

    def call(env):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        return httpx.post(f"{env.url}/v1/images/edits", files=files, headers=headers, timeout=120)

    return call


def _png(size=(8, 8), format="PNG") -> tuple:
    return ("x." + format.lower(), png_bytes(PIL.Image.new("RGB", size, (200, 40, 40)), format), "image/png")


def chunked_body(size: int):
    """A body sent in chunks, without `Content-Length`: the guard counts it as it arrives."""

    def parts():
        yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(size // 65536 + 1):
            yield b"x" * 65536
        yield b'"}]}'

    def call(env):
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.post(f"{env.url}/v1/chat/completions", content=parts(), headers=headers, timeout=120)

    return call


def with_full_queue(env):
    """The model thread held by a job (load 1) while a request for 3 documents waits (load 4 = `max_queue`): one
    more document is refused with 429. Afterwards both finish."""
    release, waiting = threading.Event(), {}
    held = env.engine.run_in_model_thread(release.wait)
    waiter = threading.Thread(
        target=lambda: waiting.update(answer=env.client.chat.completions.create(model=MODEL, messages=STORY, n=3))
    )
    waiter.start()
    try:
        deadline = time.monotonic() + 60
        while env.engine.load < MAX_QUEUE and time.monotonic() < deadline:
            time.sleep(0.02)
        return env.client.chat.completions.create(model=MODEL, messages=STORY)
    finally:
        release.set()
        held.result(timeout=60)
        waiter.join(300)
        assert len(waiting["answer"].choices) == 3  # the queued request was written once the model was free


MEGABYTE = 2**20
BAD_REQUESTS = [
    ("temperature-wrong-type", chat(temperature="hot"), 400, "temperature"),
    (
        "temperature-nan",
        raw(body={"model": MODEL, "messages": STORY, "temperature": float("nan")}),
        400,
        "temperature",
    ),
    ("temperature-too-high", chat(temperature=2.5), 400, "temperature"),
    ("top-p-zero", chat(top_p=0), 400, "top_p"),
    ("top-p-above-one", chat(top_p=1.5), 400, "top_p"),
    ("max-tokens-zero", chat(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-not-whole", chat(max_tokens=2.5), 400, "max_tokens"),
    ("n-zero", chat(n=0), 400, "n"),
    ("n-above-the-most-choices", chat(n=MAX_CHOICES + 1), 400, "n"),
    ("n-above-max-queue", chat(n=MAX_QUEUE + 1), 400, "n"),
    ("seed-negative", chat(seed=-1), 400, "seed"),
    ("stream-not-a-boolean", raw(body={"model": MODEL, "messages": STORY, "stream": "yes"}), 400, "stream"),
    ("unknown-model", chat(model="gpt-4o"), 404, "model"),
    ("no-messages", chat(messages=[]), 400, "messages"),
    ("content-wrong-type", chat(messages=[{"role": "user", "content": 42}]), 400, "content"),
    ("tool-role", chat(messages=[{"role": "tool", "content": "42", "tool_call_id": "x"}]), 400, "role"),
    ("unknown-part-type", chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), 400, "type"),
    ("broken-base64", chat(messages=_with_picture("data:image/png;base64,iVBOR%%%")), 400, "image_url"),
    ("not-a-picture", chat(messages=_with_picture("data:image/png;base64,aGVsbG8=")), 400, "image_url"),
    ("not-an-image-type", chat(messages=_with_picture("data:text/plain;base64,aGVsbG8=")), 400, "image_url"),
    ("remote-url", chat(messages=_with_picture("https://example.com/cat.png")), 400, "image_url"),
    ("too-many-pictures", chat(messages=_with_picture(_circle_data_url()) * 8, modalities=["text"]), 400, "images"),
    ("max-images-negative", chat(max_images=-1), 400, "max_images"),
    ("steps-zero", chat(num_inference_steps=0), 400, "num_inference_steps"),
    ("guidance-negative", chat(guidance_scale=-1.0), 400, "guidance_scale"),
    ("height-not-a-multiple", chat(height=33), 400, "height"),
    ("size-unreadable", chat(size="big"), 400, "size"),
    ("pictures-alone", chat(modalities=["image"]), 400, "modalities"),
    ("unknown-field", chat(max_image=2), 400, "max_image"),
    ("unsupported-field", chat(stop=["."]), 400, "stop"),
    ("not-json", raw(content=b"{not json"), 400, "JSON"),
    ("oversize-body", chat(messages=[{"role": "user", "content": "x" * (MAX_REQUEST_MB * MEGABYTE)}]), 413, "MiB"),
    ("oversize-chunked-body", chunked_body(MAX_REQUEST_MB * MEGABYTE + 1), 413, "MiB"),
    ("missing-key", raw(body={"model": MODEL, "messages": STORY}, key=None), 401, "API key"),
    ("wrong-key", lambda env: _client(env, "not-the-key").models.list(), 401, "API key"),
    ("wrong-scheme", raw(body={"messages": STORY}, headers={"Authorization": f"Basic {API_KEY}"}), 401, "API key"),
    ("images-url-format", images(response_format="url"), 400, "response_format"),
    ("images-n-zero", images(n=0), 400, "n"),
    ("images-size-unreadable", images(size="1024"), 400, "size"),
    ("images-size-zero", images(size="0x32"), 400, "size"),
    ("images-size-not-a-multiple", images(size="30x30"), 400, "size"),
    ("edits-missing-image", raw_edit({"prompt": (None, EDIT)}), 400, "image"),
    ("edits-image-as-text", raw_edit({"prompt": (None, EDIT), "image": (None, "red.png")}), 400, "image"),
    ("edits-not-a-picture", edits(image=("red.png", b"hello", "image/png")), 400, "image"),
    ("edits-gif", edits(image=_png(format="GIF")), 400, "image"),
    ("edits-too-many-pictures", edits(image=[_png()] * 8), 400, "image"),  # the demo's context holds 7
    ("edits-placeholders-and-pictures-disagree", edits(prompt="<image><image>" + EDIT), 400, "prompt"),
    ("edits-mask", edits(mask=_png()), 400, "DreamLLMInpaintPipeline"),
    ("edits-size-unreadable", edits(size="big"), 400, "size"),
    ("edits-size-not-a-multiple", edits(size="30x30"), 400, "size"),
    ("edits-n-too-large", edits(n=MAX_CHOICES + 1), 400, "n"),
    ("edits-n-not-a-number", raw_edit({"prompt": (None, EDIT), "n": (None, "two"), "image": _png()}), 400, "n"),
    ("edits-seed-twice", raw_edit([("image", _png()), ("seed", (None, "1")), ("seed", (None, "2"))]), 400, "seed"),
    ("edits-url-format", edits(response_format="url"), 400, "response_format"),
    ("edits-stream", edits(stream=True), 400, "stream"),
    ("edits-unknown-model", edits(model="dall-e-2"), 404, "model"),
    ("edits-json-body", raw(path="/v1/images/edits", body={"prompt": EDIT}), 400, "multipart/form-data"),
    ("edits-oversize-body", edits(image=("big.png", b"x" * (MAX_REQUEST_MB * MEGABYTE), "image/png")), 413, "MiB"),
    ("edits-missing-key", raw_edit({"prompt": (None, EDIT), "image": _png()}, key=None), 401, "API key"),
    (
        "edits-wrong-key",
        lambda env: _client(env, "not-the-key").images.edit(image=_png(), prompt=EDIT),
        401,
        "API key",
    ),
    ("unknown-route", raw(path="/v1/completions", body={"prompt": "x"}), 404, "/v1/chat/completions"),
    ("full-queue", with_full_queue, 429, "max_queue"),
]


def _client(env, key):
    return openai.OpenAI(base_url=f"{env.url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.mark.parametrize(
    ("call", "status", "names"), [row[1:] for row in BAD_REQUESTS], ids=[r[0] for r in BAD_REQUESTS]
)
def test_bad_requests_get_openais_error_schema_with_the_pipelines_messages(server, client, call, status, names):
    env = SimpleNamespace(client=client, url=server.url, engine=server.engine)
    try:
        result = call(env)
    except openai.APIStatusError as error:
        assert error.status_code == status, error
        body = error.response.json()
    else:
        assert isinstance(result, httpx.Response), f"the request was accepted: {result}"
        assert result.status_code == status, result.text
        body = result.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert names in error["message"], error
    assert error["param"] is None or error["param"] in error["message"] or names in error["param"], error
    assert error["type"] == ("rate_limit_error" if status == 429 else "invalid_request_error")


def test_the_server_keeps_serving_after_bad_requests(client, server):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=STORY, temperature=-1)
    answer = client.chat.completions.create(model=MODEL, messages=STORY, seed=3, max_tokens=20)
    assert answer.choices[0].message.content and server.engine.load == 0


def test_unsupported_fields_at_their_off_value_are_accepted(client):
    answer = client.chat.completions.create(
        model=MODEL, messages=STORY, seed=3, max_tokens=8, presence_penalty=0.0, frequency_penalty=0, logprobs=False
    )
    assert answer.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.chat.completions.create(model=MODEL, messages=STORY, presence_penalty=0.5)


def test_a_model_failure_is_a_500_and_the_next_request_is_served(client, server, monkeypatch):
    failed = server.engine.writer

    def broken_step():
        raise RuntimeError("out of memory, say")
        yield  # a generator, as `step_parts` is

    monkeypatch.setattr(failed, "step_parts", broken_step)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=MODEL, messages=STORY, seed=3, max_tokens=8)
    assert raised.value.code == "model_error" and "out of memory, say" in raised.value.message
    assert raised.value.body["type"] == "server_error"
    assert server.engine.writer is not failed  # a fresh writer took over
    answer = client.chat.completions.create(model=MODEL, messages=STORY, seed=3, max_tokens=8)
    assert answer.choices[0].message.content and server.engine.load == 0


def test_the_bad_parameter_is_named_in_param(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=_with_picture("https://example.com/x.png"))
    assert raised.value.param == "messages[0].content[0].image_url" and raised.value.code == "remote_url_not_supported"
    assert "data:image/png;base64" in raised.value.message  # the fix


# ---------------------------------------------------------------------------------------------------------------------
# The engine under the API


def test_a_document_stream_is_read_by_a_thread_or_an_event_loop():
    cancelled = []
    stream = DocumentStream(7, cancelled.append)
    events = [SimpleNamespace(type="text", document=7, text=str(i)) for i in range(3)]

    def produce():
        for event in events:
            time.sleep(0.01)
            stream._put(event)
        stream._put(SimpleNamespace(type="document_end", document=7))
        stream._put(engine_module._END)

    threading.Thread(target=produce).start()

    async def read():
        return [event async for event in stream]

    got = asyncio.run(read())
    assert [event.type for event in got] == ["text"] * 3 + ["document_end"]

    # Read in batches: every event delivered so far at once, then [] at the end.
    batched = DocumentStream(9, cancelled.append)
    for event in events:
        batched._put(event)

    async def read_batches():
        first = await batched.next_events()
        batched._put(engine_module._END)
        return first, await batched.next_events()

    first, last = asyncio.run(read_batches())
    assert first == events and last == []
    assert list(stream) == []  # an ended stream stays ended
    stream.cancel()
    assert cancelled == []  # finished: nothing to cancel

    failing = DocumentStream(8, cancelled.append)
    failing.cancel()
    assert cancelled == [8]
    failing._put(RuntimeError("the model broke"))
    with pytest.raises(RuntimeError, match="the model broke"):
        next(iter(failing))


def test_the_engine_refuses_past_max_queue_and_after_close(demo_pipe):
    engine = ServingEngine(demo_pipe, max_queue=2)
    release = threading.Event()
    try:
        held = engine.run_in_model_thread(release.wait)
        request = DocumentRequest("Tell me a story.", max_new_tokens=5, generator=seeded_generator(0))
        stream = engine.submit(request)
        assert engine.load == 2
        with pytest.raises(QueueFull, match="max_queue"):
            engine.submit(DocumentRequest("Hi.", max_new_tokens=5))
        with pytest.raises(QueueFull):
            engine.run_in_model_thread(lambda: None)
        release.set()
        assert held.result(timeout=60) is True
        assert [event.type for event in stream][-1] == "document_end"
        with pytest.raises(ValueError, match="max_new_tokens"):
            engine.submit(DocumentRequest("Hi.", max_new_tokens=0))
        assert engine.load == 0
    finally:
        release.set()
        engine.close()
    with pytest.raises(EngineClosed):
        engine.submit(DocumentRequest("Hi."))


def test_a_stream_may_carry_the_denoising_steps_of_its_pictures(demo_pipe):
    request = DocumentRequest(
        "Tell me a story.",
        generator=seeded_generator(DEMO_SEED),
        do_sample=True,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
    )
    with ServingEngine(demo_pipe) as engine:
        events = list(engine.submit(request, denoising_progress=True))
        plain = list(engine.submit(dataclasses.replace(request, generator=seeded_generator(DEMO_SEED))))
    kinds = [event.type for event in events]
    pictures = kinds.count("picture")
    assert pictures >= 1 and kinds.count("denoising_step") == pictures * STEPS
    # Live, as the UNet runs: each picture's steps 1..STEPS come between the picture before it and itself.
    steps = []
    for event in events:
        if event.type == "denoising_step":
            steps.append((event.step, event.total))
        elif event.type == "picture":
            assert steps == [(step, STEPS) for step in range(1, STEPS + 1)]
            steps = []
    assert [e.type for e in plain] == [kind for kind in kinds if kind != "denoising_step"]


# ---------------------------------------------------------------------------------------------------------------------
# The command line


def test_serve_api_options_and_the_seam_that_runs_uvicorn(monkeypatch):
    args = build_parser().parse_args(
        ["serve", "--api", "--api-key", "k", "--max-queue", "3", "--max-request-mb", "2.5", "--port", "8123"]
    )
    assert (args.api, args.api_key, args.max_queue, args.max_request_mb, args.port) == (True, "k", 3, 2.5, 8123)
    defaults = build_parser().parse_args(["serve", "--api"])
    assert defaults.host == "127.0.0.1" and defaults.max_queue == 64
    assert args.port_given and not defaults.port_given  # the API's default port is 8000, the page's 7860
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(["serve", "--api", "--max-queue", "0"])
    assert raised.value.code == 2

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    assert serve_cli.run_serve(defaults) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 8000
    routes = {route.path for route in served["app"].routes}
    assert {"/v1/chat/completions", "/v1/images/generations", "/v1/images/edits", "/v1/models", "/health"} <= routes


def test_the_page_refuses_the_apis_key(monkeypatch):
    monkeypatch.delenv("DREAMLLM_API_KEY", raising=False)
    args = build_parser().parse_args(["serve", "--api-key", "k"])
    with pytest.raises(SystemExit) as raised:
        serve_cli.run_serve(args)
    assert raised.value.code == 2
