"""DreamLLMPipeline behaviour on the tiny converted checkpoint (random weights, 16x16 pictures, 2 steps); the checks
every pipeline is held to (save/load, batching, copies, callbacks, offload, from_pipe) are in test_contracts.py."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from dreamllm_hf.modeling import DreamLLMProcessor
from dreamllm_hf.pipelines import DreamLLMPipeline, DreamLLMText2ImagePipeline, StopReason
from dreamllm_hf.testing_utils import tiny_pipeline_components


FAST = dict(num_inference_steps=2, guidance_scale=3.5)


def load_pipeline(converted) -> DreamLLMPipeline:
    """The converted checkpoint in fp32 (it is stored in bf16)."""
    pipe = DreamLLMPipeline.from_pretrained(converted, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(converted_tiny):
    """A fresh pipeline per test: several tests change its config or hooks."""
    return load_pipeline(converted_tiny)


@pytest.fixture(scope="module")
def shared_pipe(converted_tiny):
    """For tests that leave the pipeline as they found it."""
    return load_pipeline(converted_tiny)


def seeded(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def picture(seed=0, size=(20, 24)):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


class Script(LogitsProcessor):
    """Forces the model to emit `tokens` in order, one per sampled token, across `generate` calls."""

    def __init__(self, tokens):
        self.tokens, self.step = list(tokens), 0

    def __call__(self, input_ids, scores):
        token = self.tokens[min(self.step, len(self.tokens) - 1)]
        self.step += 1
        forced = torch.full_like(scores, -float("inf"))
        forced[:, token] = 0
        return forced


def scripted(tokens):
    return {"logits_processor": LogitsProcessorList([Script(tokens)])}


class CountTokens:
    """Counts the positions fed to the language model, per call (rows x length)."""

    def __init__(self, mllm):
        self.calls = []
        self.handle = mllm.model.language_model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.calls.append(tuple(kwargs["inputs_embeds"].shape[:2]))

    @property
    def positions(self):
        return sum(length for _, length in self.calls)


def test_saved_folder_loads_the_ways_people_try_first(shared_pipe, tmp_path):
    """`DiffusionPipeline.from_pretrained` after `import dreamllm_hf`, and the mllm folder as a transformers repo."""
    import diffusers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import dreamllm_hf  # noqa: F401  (registers the pipelines where diffusers looks for `_class_name`)

    assert diffusers.DreamLLMPipeline is DreamLLMPipeline
    assert diffusers.DreamLLMText2ImagePipeline is DreamLLMText2ImagePipeline
    shared_pipe.save_pretrained(tmp_path / "documents")
    DreamLLMText2ImagePipeline.from_pipe(shared_pipe).save_pretrained(tmp_path / "text2image")
    expected = DreamLLMText2ImagePipeline.from_pipe(shared_pipe)(
        "a red bird", generator=seeded(), output_type="np", **FAST
    ).images
    for folder, cls in (("documents", DreamLLMPipeline), ("text2image", DreamLLMText2ImagePipeline)):
        assert json.loads((tmp_path / folder / "model_index.json").read_text())["_class_name"] == cls.__name__
        loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / folder)
        assert type(loaded) is cls
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_array_equal(
            DreamLLMText2ImagePipeline.from_pipe(loaded)(
                "a red bird", generator=seeded(), output_type="np", **FAST
            ).images,
            expected,
        )
        # The language model's folder is a complete transformers repository: model, tokenizer and processor.
        mllm_dir = tmp_path / folder / "mllm"
        processor = AutoProcessor.from_pretrained(mllm_dir)
        assert type(processor) is DreamLLMProcessor
        for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
            assert (mllm_dir / name).read_bytes() == (tmp_path / folder / "processor" / name).read_bytes(), name
        model = AutoModelForImageTextToText.from_pretrained(mllm_dir, dtype=torch.float32).eval()
        inputs = processor(text="Hello <image>", images=picture(), return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, shared_pipe.mllm(**inputs).logits)


def test_text_only_pipeline_saves_and_loads_without_diffusion_parts(shared_pipe, tmp_path):
    text_only = DreamLLMPipeline(mllm=shared_pipe.mllm, processor=shared_pipe.processor)
    text_only.save_pretrained(tmp_path)
    loaded = DreamLLMPipeline.from_pretrained(tmp_path)
    assert loaded.unet is None and loaded.vae is None
    assert (
        loaded("Hello", allow_images=False, max_new_tokens=3).text
        == shared_pipe("Hello", allow_images=False, max_new_tokens=3).text
    )
    with pytest.raises(ValueError, match="no unet, vae, scheduler.*allow_images=False"):
        loaded("Tell a story")


# ----------------------------------------------------------------------------------------------------------------------
# Text


def test_text_mode_is_generate_on_the_chat_prompt(shared_pipe):
    mllm, processor = shared_pipe.mllm, shared_pipe.processor
    image = picture()
    out = shared_pipe("<image>What is in the picture?", image=image, allow_images=False, max_new_tokens=6)
    chat = processor.apply_chat_template(
        [{"role": "user", "content": "<image>What is in the picture?"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.endswith("ASSISTANT:")
    inputs = processor(text=chat, images=[image], return_tensors="pt")
    generated = mllm.generate(**inputs, max_new_tokens=6, do_sample=False, suppress_tokens=list(range(1000, 1008)))
    expected = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.text == [expected] and out.documents == [[expected]] and out.images == [[]]
    assert out.stop_reasons == [StopReason.MAX_NEW_TOKENS]
    # A formatted prompt is used as it is; a conversation goes through the template.
    verbatim = shared_pipe(chat, image=image, allow_images=False, max_new_tokens=6, use_chat_template=False)
    conversation = shared_pipe(
        [{"role": "user", "content": "<image>What is in the picture?"}],
        image=image,
        allow_images=False,
        max_new_tokens=6,
    )
    assert verbatim.text == conversation.text == out.text


def test_text_mode_stops_at_eos(shared_pipe):
    eos = shared_pipe("Hi", allow_images=False, max_new_tokens=5, generation_kwargs=scripted([5, 2]))
    assert eos.stop_reasons == [StopReason.EOS]
    assert eos.text == [shared_pipe.tokenizer.decode([5])]


class CollectStreamer(BaseStreamer):
    """What a `generate` streamer receives: every `put` (the prompt, then each sampled token) and the `end`s."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended += 1

    @property
    def prompt(self) -> list[int]:
        """The prompt ids (the first `put`)."""
        return self.puts[0]

    @property
    def sampled(self) -> list[int]:
        """Every sampled token, in order (the later `put`s)."""
        return [token for put in self.puts[1:] for token in put]


class LogitsRecorder(LogitsProcessor):
    """The scores of every decode step, as the engine computed them (before any processor changes them)."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores[0].clone())
        return scores


def written_stream(pipe, streamer: CollectStreamer) -> tuple[list[int], list[int]]:
    """The ids the model's context held (a `<dream_start>` becomes its dream and image blocks) and, for every
    sampled token, the position whose logits chose it."""
    block = pipe.processor.drawn_picture_ids
    stream, chosen_at = list(streamer.prompt), []
    for token in streamer.sampled:
        chosen_at.append(len(stream) - 1)
        stream.extend(block if token == pipe.mllm.config.dream_start_token_id else [token])
    return stream, chosen_at


def test_text_streamer_receives_the_tokens(shared_pipe):
    streamer = CollectStreamer()
    shared_pipe("Hi", allow_images=False, max_new_tokens=3, streamer=streamer)
    assert len(streamer.puts) == 1 + 3 and streamer.ended == 1  # the prompt, then each new token


# ----------------------------------------------------------------------------------------------------------------------
# Interleaved


def test_interleaved_text_image_text_without_recomputing(pipe):
    config = pipe.mllm.config
    q, n = config.num_dream_queries, config.num_image_tokens
    prompt_len = pipe._tokenize([pipe.format_chat_prompt("Tell a story")], None, torch.device("cpu"))[0].shape[1]
    counter = CountTokens(pipe.mllm)
    unet_batches = []
    pipe.unet.register_forward_hook(lambda module, args, output: unet_batches.append(args[0].shape[0]))
    out = pipe("Tell a story", generation_kwargs=scripted([5, 7, 1003, 9, 11, 2]), generator=seeded(), **FAST)

    assert out.stop_reasons == [StopReason.EOS]
    document = out.documents[0]
    assert [type(s) for s in document] == [str, PIL.Image.Image, str]
    assert document[0] == pipe.tokenizer.decode([5, 7]) and document[2] == pipe.tokenizer.decode([9, 11])
    assert out.images[0] == [document[1]] and out.text == [f"{document[0]}\n{document[2]}"]
    assert unet_batches == [2, 2]  # [uncond, cond] for each step of the one picture

    # Fed positions: the stream once: prompt, 5, 7, the dream block, `<im_start>` + N features, `<im_end>`, 9, 11
    # (the final `</s>` is sampled, never fed); and once, when the first picture is drawn, the `<s>` unconditional
    # (1 + Q + 2).
    stream_len = prompt_len + 2 + (q + 2) + (n + 2) + 2
    assert counter.positions == (1 + q + 2) + stream_len
    assert counter.calls[0] == (1, prompt_len)  # the prompt, once
    assert counter.calls[3] == (1, q + 2)  # dream block, appended to the cache
    assert counter.calls[4] == (1, 1 + q + 2)  # the unconditional
    assert counter.calls[5] == (1, 1 + n)  # the picture read back
    assert all(length == 1 for _, length in counter.calls[1:3] + counter.calls[6:])


def test_interleaved_reads_prompt_pictures_once_and_each_drawn_picture_once(pipe):
    clip_batches = []
    pipe.mllm.model.vision_tower.embeddings.register_forward_hook(  # once per tower pass
        lambda module, args, output: clip_batches.append(args[0].shape[0])
    )
    out = pipe(
        "Continue from <image>",
        image=picture(),
        generation_kwargs=scripted([5, 1003, 7, 1003, 2]),
        generator=seeded(),
        **FAST,
    )
    assert out.stop_reasons == [StopReason.EOS] and len(out.images[0]) == 2
    assert clip_batches == [1, 1, 1]  # the prompt's picture at prefill, then each drawn picture, never on decode


def test_interleaved_picture_is_reproducible_and_matches_the_image_path(pipe):
    """The picture of a document equals the image mode's drawing from the same conditioning and seed."""
    out = pipe("Tell a story", generation_kwargs=scripted([5, 1003, 2]), generator=seeded(5), output_type="np", **FAST)
    again = pipe(
        "Tell a story", generation_kwargs=scripted([5, 1003, 2]), generator=seeded(5), output_type="np", **FAST
    )
    np.testing.assert_array_equal(out.images[0][0], again.images[0][0])

    config = pipe.mllm.config
    chat = pipe.format_chat_prompt("Tell a story")
    ids, mask, _ = pipe._tokenize([chat], None, torch.device("cpu"))
    context = torch.cat([ids, torch.tensor([[5]])], dim=1)
    with torch.no_grad():
        cond = pipe.mllm.get_dream_embeddings(context).dream_embeddings
        uncond = pipe.mllm.get_dream_embeddings(torch.tensor([[config.bos_token_id]])).dream_embeddings
    direct = DreamLLMText2ImagePipeline.from_pipe(pipe)(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        generator=seeded(5),
        output_type="np",
        **FAST,
    )
    np.testing.assert_allclose(out.images[0][0], direct.images[0], atol=1e-5)


def test_interleaved_stops_at_max_images(pipe):
    out = pipe("Draw", generation_kwargs=scripted([1003]), max_images=2, generator=seeded(), **FAST)
    assert out.stop_reasons == [StopReason.MAX_IMAGES]
    assert len(out.images[0]) == 2 and all(isinstance(s, PIL.Image.Image) for s in out.documents[0])
    none = pipe("Draw", generation_kwargs=scripted([5, 1003]), max_images=0, **FAST)
    assert none.stop_reasons == [StopReason.MAX_IMAGES] and none.images == [[]] and len(none.documents[0]) == 1


def test_interleaved_stops_at_max_new_tokens(pipe):
    counter = CountTokens(pipe.mllm)
    out = pipe(
        "Write",
        generation_kwargs=scripted([5, 1003, 7]),
        max_new_tokens=4,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=seeded(),
    )
    assert out.stop_reasons == [StopReason.MAX_NEW_TOKENS]
    assert [type(s) for s in out.documents[0]] == [str, PIL.Image.Image, str]  # 5, <dream_start>, then 7 7
    q = pipe.mllm.config.num_dream_queries
    assert (1, 1 + q + 2) not in counter.calls  # no guidance: no unconditional pass


def test_interleaved_stops_at_the_context_limit(pipe):
    config = pipe.mllm.config
    picture_cost = len(pipe.processor.drawn_picture_ids)  # a dream block and the picture read back
    prompt_len = pipe._tokenize([pipe.format_chat_prompt("Write")], None, torch.device("cpu"))[0].shape[1]
    # Room for the first picture (after one text token) but not for a second one.
    config.text_config.max_position_embeddings = prompt_len + 1 + picture_cost + 1 + picture_cost - 1
    out = pipe("Write", generation_kwargs=scripted([5, 1003, 7, 1003]), max_new_tokens=50, generator=seeded(), **FAST)
    assert out.stop_reasons == [StopReason.CONTEXT_LIMIT]
    assert [type(s) for s in out.documents[0]] == [str, PIL.Image.Image, str]
    # Text alone also stops at the context, not at max_new_tokens.
    config.text_config.max_position_embeddings = prompt_len + 3
    text = pipe("Write", generation_kwargs=scripted([5]), max_new_tokens=50, **FAST)
    assert text.stop_reasons == [StopReason.CONTEXT_LIMIT]
    assert text.text == [pipe.tokenizer.decode([5, 5, 5])]


def test_rendering_to_html_and_markdown(pipe, tmp_path):
    out = pipe("Tell a story", generation_kwargs=scripted([5, 7, 1003, 9, 2]), generator=seeded(), **FAST)
    page = out.to_html()
    first_text = out.documents[0][0]
    assert page.count('<img alt="image') == 1 and "data:image/png;base64," in page
    assert page.index(first_text.strip()) < page.index("<img")
    out.save_html(tmp_path / "story.html")
    assert (tmp_path / "story.html").read_text() == page
    markdown = out.save_markdown(tmp_path / "story.md")
    assert "![image 0](story_image_0.png)" in markdown
    saved = PIL.Image.open(tmp_path / "story_image_0.png")
    assert np.array_equal(np.asarray(saved), np.asarray(out.images[0][0]))
    np_out = pipe("Tell a story", generation_kwargs=scripted([5, 1003, 2]), output_type="np", **FAST)
    assert "data:image/png;base64," in np_out.to_html()


@pytest.mark.parametrize("size, shown", [(32, 256), (48, 288), (256, 256), (512, 512)])
def test_small_pictures_are_shown_scaled_up_crisply(size, shown):
    from dreamllm_hf.pipelines.pipeline_output import DreamLLMPipelineOutput

    picture = PIL.Image.new("RGB", (size, size), (200, 40, 40))
    page = DreamLLMPipelineOutput(images=[[picture]], text=[""], documents=[[picture]], stop_reasons=["eos"]).to_html()
    assert f'width="{shown}"' in page  # a whole multiple of the picture's width, at least 256 px
    assert ("image-rendering:pixelated" in page) == (shown > size)  # sharp pixels when scaled up


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="<image> and <image>", image=[picture()], allow_images=False), "2 `<image>`"),
        (dict(prompt="Hi", image=[picture()], allow_images=False), "0 `<image>`"),
        (dict(prompt="Hi <image>", image=[{"not": "an image"}], allow_images=False), "Unsupported image type"),
        (dict(prompt="Hi <image>", image=[42], allow_images=False), "Unsupported image type"),
        (dict(prompt="a bird", height=15), "divisible by the VAE factor 2"),
        (dict(prompt="a bird", num_inference_steps=0), "positive integer"),
        (dict(prompt="a bird", output_type="latent"), "decoded to be read back"),
        (dict(prompt="a bird", output_type="jpeg"), "Unknown output_type"),
        (dict(prompt="a bird", allow_images=False, max_new_tokens=0), "max_new_tokens"),
        (dict(prompt="a bird", max_images=-1), "max_images"),
        (dict(prompt=["a", "b"], negative_prompt=["x"]), "one per prompt"),
        (dict(prompt="a", negative_prompt="<image>"), "takes no pictures"),
        (dict(prompt="a bird", callback_on_step_end_tensor_inputs=["noise"]), "noise"),
        (dict(prompt="a bird", generation_kwargs={"max_new_tokens": 3}), "may not set"),
        (dict(prompt="a bird", generation_kwargs={"num_beams": 2}), "num_beams"),
        (dict(prompt="a bird", generation_kwargs={"no_such_option": 2}), "no_such_option"),
        (dict(prompt="a bird", generation_kwargs={"min_new_tokens": 2}), "count positions"),
        (dict(prompt="a bird", cache_implementation="paged"), "cache_implementation"),
        (dict(prompt=42, allow_images=False), "`prompt` must be"),
        (dict(prompt=None), "Pass a `prompt`"),
        (dict(prompt=["a", 42]), "Do not mix"),
        (dict(prompt=["a", "b"], generator=[seeded()]), "1 generators for 2 documents"),
        (dict(prompt="a", num_images_per_prompt=2, generator=[seeded()] * 3), "3 generators for 2 documents"),
        (dict(prompt="a", generator=[0]), "list of them"),
        (dict(prompt="a", generator=7), "torch.Generator"),
        (dict(prompt=["a", "b"], streamer=object()), "A `streamer` follows one document"),
        (dict(prompt=["a <image>", "b"], image=[picture()], allow_images=False), "give `image` as 2 lists"),
    ],
)
def test_bad_inputs_are_value_errors_that_say_what_to_change(shared_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        shared_pipe(**kwargs, **{k: v for k, v in FAST.items() if k not in kwargs})


def test_a_processor_that_lays_pictures_out_otherwise_than_the_model_is_refused():
    """The engine writes pictures in the processor's layout and the model reads them in its own: they must agree."""
    components = tiny_pipeline_components()
    components["processor"].num_dream_queries += 1
    with pytest.raises(ValueError, match="4 query slots.*reads 4 and 3"):
        DreamLLMPipeline(**components)("Hi", allow_images=False, max_new_tokens=2)
    components = tiny_pipeline_components()
    components["processor"].special_token_ids["<im_end>"] = 7
    with pytest.raises(ValueError, match="special token ids differ.*'<im_end>': \\(7, "):
        DreamLLMPipeline(**components)("Hi", allow_images=False, max_new_tokens=2)


@pytest.mark.parametrize("allow_images", [True, False])
def test_prompt_longer_than_the_context(pipe, allow_images):
    pipe.mllm.config.text_config.max_position_embeddings = 40
    with pytest.raises(ValueError, match="context is 40 positions"):
        pipe("word " * 60, allow_images=allow_images, **FAST)
