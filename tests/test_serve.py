"""The web page (`dreamllm-hf serve`): its logic on the demo model, then the real server in headless Chromium."""

import base64
import html
import io
import os
import random
import re
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace


os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry

import numpy as np
import PIL.Image
import pytest
import torch

from dreamllm_hf.cli import build_parser
from dreamllm_hf.pipelines import DreamLLMPipeline, DreamLLMText2ImagePipeline, edit_prompt
from dreamllm_hf.serve.app import DreamLLMPage, PageDefaults
from dreamllm_hf.serve.cli import serve
from dreamllm_hf.serve.render import conversation_html, placeholder_html, status_html, turn_html
from dreamllm_hf.shapes_world import COLOURS, SHAPES, draw_shape, sample_spec
from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH, DEMO_SEED
from dreamllm_hf.shapes_world.evaluation import named_colour_and_shape


# Gradio's queue (its own code) calls pandas options that pandas 3 deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:'future.no_silent_downcasting' is deprecated", "ignore:The copy keyword is deprecated"
)

# Outputs of `DreamLLMPage.generate`, in order.
DOCUMENT, STATUS, CONVERSATION, PROMPT, ATTACHMENT, DOWNLOAD = range(6)
STEPS = 8  # denoising steps in the tests of the page's logic (the browser test uses the demo model's 25)
WORLD_WORDS = re.compile(r"\b(" + "|".join(list(COLOURS) + list(SHAPES)) + r")\b")


@pytest.fixture(scope="module")
def demo_pipe():
    pipe = DreamLLMPipeline.from_pretrained(DEMO_MODEL_PATH, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def page(demo_pipe):
    return DreamLLMPage(demo_pipe, PageDefaults.for_demo_model())


def _run(page, message, attachment=None, mode="Document", conversation=(), seed=DEMO_SEED, session="a"):
    """Every update `generate` yields (guidance 2, `STEPS` steps, at most 4 pictures)."""
    request = SimpleNamespace(session_hash=session)
    return list(page.generate(message, attachment, mode, seed, 2.0, STEPS, 4, list(conversation), request))


def _shape_picture(path, colour="red", shape="circle"):
    picture = draw_shape(sample_spec(random.Random(1), colour=colour, shape=shape))
    picture.save(path)
    return picture


def _decoded_pictures(page_html: str) -> list[PIL.Image.Image]:
    return [
        PIL.Image.open(io.BytesIO(base64.b64decode(data)))
        for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page_html)
    ]


def _wait_until_idle(engine, timeout=60.0):
    """Until the engine has nothing queued or being written (a cancelled document leaves at its next step)."""
    deadline = time.monotonic() + timeout
    while engine.load or engine.writer.has_work:
        assert time.monotonic() < deadline, "the engine did not become idle"
        time.sleep(0.05)


def _same_picture(a, b) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


# ---------------------------------------------------------------------------------------------------------------------
# The page's HTML


def test_conversation_html_shows_text_escaped_and_small_pictures_scaled_up_crisply():
    small = PIL.Image.new("RGB", (32, 32), (200, 30, 30))
    large = PIL.Image.new("RGB", (300, 200), (30, 30, 200))
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": small}, {"type": "text", "text": "What <b>is</b>&?"}]},
        {"role": "assistant", "content": ["A red circle.", large]},
    ]
    page_html = conversation_html(conversation, turn_html("assistant", ["Then"], drawing=(1, 3, 25)))

    assert page_html.startswith('<div class="dreamllm-document" role="log" aria-label="Document"')
    assert "What &lt;b&gt;is&lt;/b&gt;&amp;?" in page_html and "<b>is</b>" not in page_html
    images = re.findall(r"<img [^>]*>", page_html)
    assert len(images) == 2
    assert 'width="256" height="256"' in images[0] and "scaled" in images[0]  # 32 px shown 8x, pixels kept sharp
    assert 'width="300" height="200"' in images[1] and "scaled" not in images[1]
    decoded = _decoded_pictures(page_html)
    assert _same_picture(decoded[0], small) and _same_picture(decoded[1], large)
    assert "Drawing picture 2: step 3 of 25" in page_html and '<progress max="25" value="3">' in page_html
    assert page_html.index("Then") < page_html.index("Drawing picture 2")
    assert "Type a message" in conversation_html([])
    assert 'role="alert"' in status_html("bad", error=True) and 'role="status"' in status_html("fine")
    assert placeholder_html(0, 0, 25).count("Drawing picture 1") == 2  # its label and its visible text


# ---------------------------------------------------------------------------------------------------------------------
# The page's logic on the demo model


def test_bad_input_gets_a_message_and_changes_nothing(page, tmp_path):
    earlier = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": ["A red circle."]}]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a picture")
    red_circle = tmp_path / "red_circle.png"
    _shape_picture(red_circle)
    cases = [
        (dict(message="  "), "The message is empty"),
        (dict(message="What is it?", attachment=str(broken)), "broken.png could not be read as a picture"),
        (dict(message="", mode="Picture only"), "Type what to draw"),
        (dict(message=" ", attachment=str(red_circle), mode="Picture only"), "the change, e.g. Make it blue."),
        (dict(message="Hi", seed=1.5), "Seed must be a whole number"),
        (dict(message="Hi", seed=-1), "Seed must be between"),
        (dict(message="Hi", mode="Poem"), "Unknown mode 'Poem'"),
    ]
    for arguments, expected in cases:
        updates = _run(page, conversation=earlier, **arguments)
        assert len(updates) == 1, arguments
        (update,) = updates
        assert 'role="alert"' in update[STATUS] and expected in html.unescape(update[STATUS]), arguments
        assert update[CONVERSATION] == earlier
        assert "A red circle." in update[DOCUMENT]
        assert update[PROMPT] == {"__type__": "update"}  # the message stays in the box to be fixed


def test_a_story_is_streamed_with_drawing_progress_and_equals_the_pipeline_output(page, demo_pipe):
    updates = _run(page, "Tell me a story.")

    first, last = updates[0], updates[-1]
    assert "Tell me a story." in first[DOCUMENT] and first[PROMPT] == "" and first[ATTACHMENT] is None
    progress = [u for u in updates if "Drawing picture 1: step" in u[STATUS]]
    assert progress and "dreamllm-placeholder" in progress[0][DOCUMENT]
    expected = demo_pipe(
        [{"role": "user", "content": "Tell me a story."}],
        do_sample=True,
        max_new_tokens=256,
        max_images=4,
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        generator=torch.Generator("cpu").manual_seed(DEMO_SEED),
    ).documents[0]
    pictures = sum(not isinstance(segment, str) for segment in expected)
    assert pictures >= 2  # the demo seed's story is illustrated
    picture_counts = [u[DOCUMENT].count("<img") for u in updates]
    assert picture_counts == sorted(picture_counts) and picture_counts[-1] == pictures  # they appear one by one
    assert "Done." in last[STATUS] and 'role="status"' in last[STATUS]

    user, answer = last[CONVERSATION]
    assert user == {"role": "user", "content": "Tell me a story."}
    assert answer["role"] == "assistant" and len(answer["content"]) == len(expected)
    for shown, wanted in zip(answer["content"], expected):
        assert shown == wanted if isinstance(wanted, str) else _same_picture(shown, wanted)
    assert WORLD_WORDS.search(" ".join(s for s in answer["content"] if isinstance(s, str)))

    download = last[DOWNLOAD]
    assert download["interactive"] is True
    saved = Path(download["value"]).read_text(encoding="utf-8")
    assert expected[0] in saved and saved.count("<img") == pictures and "DreamLLM: Tell me a story." in saved


def test_a_second_turn_reads_the_whole_conversation_with_the_attached_picture(page, demo_pipe, tmp_path, monkeypatch):
    story_picture = PIL.Image.new("RGB", (32, 32), (250, 220, 0))
    earlier = [
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": ["It all began with a yellow square.", story_picture]},
    ]
    uploaded = _shape_picture(tmp_path / "red_circle.png")
    asked = []
    submit = page.engine.submit

    def recording_submit(request, **kwargs):
        asked.append(request)
        return submit(request, **kwargs)

    monkeypatch.setattr(page.engine, "submit", recording_submit)
    updates = _run(page, "What is in the picture?", str(tmp_path / "red_circle.png"), "Answer only", earlier)

    (request,) = asked
    conversation = request.prompt
    assert conversation[:2] == earlier and len(conversation) == 3
    picture_part, text_part = conversation[2]["content"]
    assert picture_part["type"] == "image" and _same_picture(picture_part["image"], uploaded)
    assert text_part == {"type": "text", "text": "What is in the picture?"}
    assert request.allow_images is False and request.do_sample is True and request.num_inference_steps == STEPS
    final = updates[-1][CONVERSATION]
    assert final[:3] == conversation and final[3]["role"] == "assistant"
    assert final[3]["content"] and all(isinstance(segment, str) for segment in final[3]["content"])
    assert updates[-1][DOCUMENT].count("<img") == 2  # the story's picture and the one attached


def test_picture_only_draws_the_message(page, demo_pipe):
    updates = _run(page, "a red circle", mode="Picture only", seed=3)
    expected = DreamLLMText2ImagePipeline.from_pipe(demo_pipe)(
        "a red circle", num_inference_steps=STEPS, guidance_scale=2.0, generator=torch.Generator("cpu").manual_seed(3)
    ).images[0]
    user, answer = updates[-1][CONVERSATION]
    assert user == {"role": "user", "content": "a red circle"}
    (picture,) = answer["content"]
    assert picture.size == (32, 32) and _same_picture(picture, expected)
    assert any("Drawing picture 1: step" in u[STATUS] for u in updates)
    assert "Done." in updates[-1][STATUS]


def test_picture_only_with_an_attached_picture_draws_its_edit(page, demo_pipe, tmp_path):
    red_circle = tmp_path / "red_circle.png"
    attached = _shape_picture(red_circle)
    updates = _run(page, "Make it blue.", attachment=str(red_circle), mode="Picture only", seed=3)
    text2image = DreamLLMText2ImagePipeline.from_pipe(demo_pipe)
    seeded = dict(num_inference_steps=STEPS, guidance_scale=2.0)
    expected = text2image(
        edit_prompt("Make it blue."), image=[attached], generator=torch.Generator("cpu").manual_seed(3), **seeded
    ).images[0]
    without = text2image("Make it blue.", generator=torch.Generator("cpu").manual_seed(3), **seeded).images[0]
    user, answer = updates[-1][CONVERSATION]
    assert user["content"][1] == {"type": "text", "text": "Make it blue."}
    (picture,) = answer["content"]
    assert _same_picture(picture, expected) and not _same_picture(picture, without)  # the picture was read
    assert "Done." in updates[-1][STATUS]


def test_stop_ends_the_turn_within_a_denoising_step_and_the_next_turn_runs_in_full(page, demo_pipe):
    session = SimpleNamespace(session_hash="b")
    assert "Nothing is being written" in page.stop(session)
    unet_calls = []
    hook = demo_pipe.unet.register_forward_hook(lambda *args: unet_calls.append(1))
    try:
        updates, stopped = [], False
        for update in page.generate("Tell me a story.", None, "Document", DEMO_SEED, 2.0, 25, 4, [], session):
            updates.append(update)
            if not stopped and "dreamllm-placeholder" in update[DOCUMENT]:
                assert "Nothing is being written" in page.stop(SimpleNamespace(session_hash="someone else"))
                assert "Stopping" in page.stop(session)
                stopped = True
    finally:
        hook.remove()
    assert stopped and "Stopped." in updates[-1][STATUS]
    assert len(unet_calls) < 25  # the first picture's 25 steps were cut short
    user, answer = updates[-1][CONVERSATION]
    assert answer["content"] and all(isinstance(segment, str) for segment in answer["content"])  # no half picture
    assert "dreamllm-placeholder" not in updates[-1][DOCUMENT]

    # The interrupt does not leak into the next turn: it draws its whole picture.
    _wait_until_idle(page.engine)
    unet_calls.clear()
    hook = demo_pipe.unet.register_forward_hook(lambda *args: unet_calls.append(1))
    try:
        after = _run(page, "a red circle", mode="Picture only", session="b")
    finally:
        hook.remove()
    assert len(after[-1][CONVERSATION][1]["content"]) == 1 and "Done." in after[-1][STATUS]
    assert len(unet_calls) == STEPS


def test_the_blocks_queue_generations_and_the_serve_command_line(page):
    blocks = page.build()
    handlers = {fn.name: fn for fn in blocks.fns.values()}
    assert blocks.analytics_enabled is False
    # Generations are not queued one after the other: the engine writes them together, up to its queue's size.
    assert blocks._queue.default_concurrency_limit == page.engine.max_queue
    assert handlers["generate"].concurrency_limit == "default"
    assert handlers["stop"].concurrency_limit is None  # not queued behind the generation it stops
    assert {event for target, event in handlers["generate"].targets} == {"click", "submit"}
    document, _, conversation, download = page.clear(SimpleNamespace(session_hash="c"))
    assert conversation == [] and "Type a message" in document and download["interactive"] is False

    args = build_parser().parse_args(["serve"])
    assert (args.model, args.host, args.port, args.share) == (None, "127.0.0.1", 7860, False)
    args = build_parser().parse_args(["serve", "--model", "m", "--host", "0.0.0.0", "--port", "8000", "--share"])
    assert (args.model, args.host, args.port, args.share) == ("m", "0.0.0.0", 8000, True)
    assert args.func.__module__ == "dreamllm_hf.serve.cli"


# ---------------------------------------------------------------------------------------------------------------------
# The real server, in a real browser


@pytest.fixture
def server(tmp_path, monkeypatch):
    """What `dreamllm-hf serve` runs (the demo model, its settings), on a free local port; yields its URL."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # uploads and downloads
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = serve(port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def test_the_page_in_chromium(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (scripts/test.sh installs it as root: apt-get install -y chromium)"
    red_circle, broken = tmp_path / "red_circle.png", tmp_path / "broken.png"
    _shape_picture(red_circle)
    broken.write_bytes(b"not a picture")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            browser_page = browser.new_page(viewport={"width": 1200, "height": 900}, accept_downloads=True)
            outside = []  # the page must not reach beyond this machine
            browser_page.on(
                "request",
                lambda r: outside.append(r.url) if not r.url.startswith((server, "data:", "blob:")) else None,
            )
            browser_page.goto(server)
            prompt = browser_page.get_by_label("Prompt")
            generate = browser_page.get_by_role("button", name="Generate")
            document = browser_page.get_by_role("log", name="Document")
            status = browser_page.get_by_label("Status")

            # An empty message: a clear message in the page, and the server goes on serving.
            generate.click()
            expect(browser_page.get_by_role("alert")).to_contain_text("The message is empty")

            prompt.fill("Tell me a story.")
            generate.click()
            browser_page.wait_for_selector(".dreamllm-placeholder", timeout=60_000)  # drawing, with its progress
            expect(document.locator("img").first).to_be_visible(timeout=60_000)
            expect(status).to_have_text("Done.", timeout=60_000)
            browser_page.screenshot(path=tmp_path / "story.png", full_page=True)
            story = document.locator(".dreamllm-turn.assistant").last
            assert WORLD_WORDS.search(story.inner_text()), story.inner_text()
            sizes = story.locator("img").evaluate_all(
                "els => els.map(e => [e.naturalWidth, e.clientWidth, getComputedStyle(e).imageRendering])"
            )
            assert sizes and all(size == [32, 256, "pixelated"] for size in sizes), sizes

            with browser_page.expect_download() as download:
                browser_page.get_by_role("button", name="Download as HTML").click()
            saved = download.value.path().read_text(encoding="utf-8")
            assert "<img" in saved and story.locator("p").first.inner_text() in saved

            # An unreadable upload: a message, not a crash.
            attachment = browser_page.locator("#attachment")
            attachment.locator("input[type=file]").set_input_files(broken)
            expect(attachment.get_by_label("broken.png")).to_be_visible()
            prompt.fill("What is in the picture?")
            generate.click()
            expect(browser_page.get_by_role("alert")).to_contain_text("could not be read as a picture")

            # A picture of a red circle, asked about in the same conversation.
            attachment.get_by_role("button", name="Clear").click()
            attachment.locator("input[type=file]").set_input_files(red_circle)
            expect(attachment.get_by_label("red_circle.png")).to_be_visible()
            browser_page.get_by_role("radio", name="Answer only").check()
            generate.click()
            expect(document.locator(".dreamllm-turn.user")).to_have_count(2, timeout=30_000)
            expect(status).to_have_text("Done.", timeout=60_000)
            asked = document.locator(".dreamllm-turn.user").last
            assert asked.locator("img").evaluate("e => e.naturalWidth") == 32
            expect(asked).to_contain_text("What is in the picture?")
            answer = document.locator(".dreamllm-turn.assistant").last
            # The demo model answers in a chat after the story (stage III): it names the picture's colour.
            assert named_colour_and_shape(answer.inner_text())[0] == "red", answer.inner_text()
            assert answer.locator("img").count() == 0  # Answer only
            browser_page.screenshot(path=tmp_path / "conversation.png", full_page=True)

            # A new conversation, stopped while its first picture is drawn.
            browser_page.get_by_role("button", name="New conversation").click()
            expect(document.locator(".dreamllm-turn")).to_have_count(0)
            browser_page.get_by_role("radio", name="Document").check()
            prompt.fill("Tell me a story.")
            generate.click()
            browser_page.wait_for_selector(".dreamllm-placeholder", timeout=60_000)
            browser_page.get_by_role("button", name="Stop").click()
            expect(status).to_have_text("Stopped.", timeout=60_000)
            expect(document.locator(".dreamllm-placeholder")).to_have_count(0)
            expect(document.locator(".dreamllm-turn.assistant")).to_have_count(1)
            assert outside == []
        finally:
            browser.close()
    assert (tmp_path / "story.png").stat().st_size > 10_000 and (tmp_path / "conversation.png").stat().st_size > 10_000


def test_two_pages_at_once_are_written_together(tmp_path, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = serve(port=port, block=False)
    writer, together = app.dreamllm_engine.writer, []
    step = writer.step_parts

    def counting_step():  # how many documents the running batch holds after each step
        yield from step()
        together.append(len(writer.batch.live_documents))

    monkeypatch.setattr(writer, "step_parts", counting_step)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            try:
                pages = [browser.new_context().new_page() for _ in range(2)]  # two people, two sessions
                for page in pages:
                    page.goto(f"http://127.0.0.1:{port}/")
                    page.get_by_label("Prompt").fill("Tell me a story.")
                for page in pages:
                    page.get_by_role("button", name="Generate").click()
                for page in pages:
                    expect(page.get_by_label("Status")).to_have_text("Done.", timeout=120_000)
                    story = page.get_by_role("log", name="Document").locator(".dreamllm-turn.assistant").last
                    assert WORLD_WORDS.search(story.inner_text()), story.inner_text()
            finally:
                browser.close()
    finally:
        app.close()
        app.dreamllm_engine.close()
    assert max(together) == 2  # both pages' documents were in the batch at once, not one after the other
