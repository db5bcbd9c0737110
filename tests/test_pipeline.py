"""DreamLLMPipeline behaviour on the tiny converted checkpoint (random weights, 16x16 pictures, 2 steps)."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from dreamllm_hf import DreamLLMForConditionalGeneration
from dreamllm_hf.modeling.processing_dreamllm import DreamLLMProcessor
from dreamllm_hf.pipelines import DreamLLMPipeline, DreamLLMPipelineOutput, StopReason

FAST = dict(num_inference_steps=2, guidance_scale=3.5)


def load_pipeline(converted) -> DreamLLMPipeline:
    pipe = DreamLLMPipeline(
        mllm=DreamLLMForConditionalGeneration.from_pretrained(converted / "mllm", dtype=torch.float32).eval(),
        processor=DreamLLMProcessor.from_pretrained(converted / "processor"),
        unet=UNet2DConditionModel.from_pretrained(converted / "unet", torch_dtype=torch.float32),
        vae=AutoencoderKL.from_pretrained(converted / "vae", torch_dtype=torch.float32),
        scheduler=DDPMScheduler.from_pretrained(converted / "scheduler"),
    )
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


# ----------------------------------------------------------------------------------------------------------------------
# Text-to-image


def test_image_mode_returns_what_stable_diffusion_returns(shared_pipe):
    np_out = shared_pipe("a red bird", generation_mode="image", generator=seeded(), output_type="np", **FAST)
    assert isinstance(np_out.images, np.ndarray) and np_out.images.shape == (1, 16, 16, 3)
    assert np_out.text is None and np_out.stop_reasons == [StopReason.IMAGE]
    pil_out = shared_pipe("a red bird", generation_mode="image", generator=seeded(), **FAST)
    assert isinstance(pil_out.images, list) and isinstance(pil_out.images[0], PIL.Image.Image)
    assert np.array_equal(np.asarray(pil_out.images[0]), (np_out.images[0] * 255).round().astype(np.uint8))
    pt_out = shared_pipe("a red bird", generation_mode="image", generator=seeded(), output_type="pt", **FAST)
    assert pt_out.images.shape == (1, 3, 16, 16)
    torch.testing.assert_close(pt_out.images.permute(0, 2, 3, 1).numpy(), np_out.images)
    latent_out = shared_pipe("a red bird", generation_mode="image", generator=seeded(), output_type="latent", **FAST)
    assert latent_out.images.shape == (1, 4, 8, 8)


def test_same_seed_same_bytes(shared_pipe):
    first = shared_pipe("a red bird", generation_mode="image", generator=seeded(3), **FAST).images[0]
    second = shared_pipe("a red bird", generation_mode="image", generator=seeded(3), **FAST).images[0]
    other = shared_pipe("a red bird", generation_mode="image", generator=seeded(4), **FAST).images[0]
    assert first.tobytes() == second.tobytes()
    assert first.tobytes() != other.tobytes()


def test_dict_output_equals_tuple_output(shared_pipe):
    as_dict = shared_pipe("a red bird", generation_mode="image", generator=seeded(), output_type="np", **FAST)
    as_tuple = shared_pipe(
        "a red bird", generation_mode="image", generator=seeded(), output_type="np", return_dict=False, **FAST
    )
    assert isinstance(as_dict, DreamLLMPipelineOutput) and isinstance(as_tuple, tuple)
    assert len(as_tuple) == 3  # images, documents, stop_reasons (text is None in image mode)
    np.testing.assert_array_equal(as_tuple[0], as_dict.images)
    assert as_tuple[2] == as_dict.stop_reasons
    text_dict = shared_pipe("Hello", generation_mode="text", max_new_tokens=4)
    text_tuple = shared_pipe("Hello", generation_mode="text", max_new_tokens=4, return_dict=False)
    assert text_tuple == text_dict.to_tuple() and text_tuple[1] == text_dict.text


def test_batch_of_different_lengths_equals_one_by_one(shared_pipe):
    prompts = ["a red bird", "a small blue house on a green hill next to the sea"]
    batch = shared_pipe(
        prompts, generation_mode="image", generator=[seeded(1), seeded(2)], output_type="np", **FAST
    ).images
    for index, prompt in enumerate(prompts):
        single = shared_pipe(prompt, generation_mode="image", generator=seeded(index + 1), output_type="np", **FAST)
        np.testing.assert_allclose(batch[index], single.images[0], atol=1e-5)
    with_negative = shared_pipe(
        prompts,
        negative_prompt=["blurry", "dark and noisy"],
        generation_mode="image",
        generator=[seeded(1), seeded(2)],
        output_type="latent",
        **FAST,
    ).images
    for index, prompt in enumerate(prompts):
        single = shared_pipe(
            prompt,
            negative_prompt=["blurry", "dark and noisy"][index],
            generation_mode="image",
            generator=seeded(index + 1),
            output_type="latent",
            **FAST,
        )
        torch.testing.assert_close(with_negative[index], single.images[0], atol=1e-5, rtol=0)


def test_cond_and_uncond_go_through_the_language_model_in_one_pass(pipe):
    counter = CountTokens(pipe.mllm)
    pipe(["a red bird", "a cat"], generation_mode="image", output_type="latent", **FAST)
    assert len(counter.calls) == 1 and counter.calls[0][0] == 3  # one `<s>` row + two prompts


def test_guidance_at_most_one_disables_the_unconditional(pipe):
    counter = CountTokens(pipe.mllm)
    unet_batches = []
    pipe.unet.register_forward_hook(lambda module, args, output: unet_batches.append(args[0].shape[0]))
    pipe("a red bird", generation_mode="image", num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    assert unet_batches == [1, 1] and counter.calls[0][0] == 1
    unet_batches.clear()
    pipe("a red bird", generation_mode="image", num_inference_steps=2, guidance_scale=2.0, output_type="latent")
    assert unet_batches == [2, 2]


def test_num_images_per_prompt(shared_pipe):
    out = shared_pipe(
        ["a red bird", "a cat"],
        generation_mode="image",
        num_images_per_prompt=3,
        generator=seeded(),
        output_type="np",
        **FAST,
    )
    assert out.images.shape == (6, 16, 16, 3) and len(out.documents) == 6
    assert not np.allclose(out.images[0], out.images[1])  # different noise for each picture
    with pytest.raises(ValueError, match="generators"):
        shared_pipe("a red bird", generation_mode="image", num_images_per_prompt=2, generator=[seeded()], **FAST)


def test_callback_can_change_latents(shared_pipe):
    seen = []

    def zero_at_last_step(pipeline, step, timestep, callback_kwargs):
        seen.append((step, int(timestep), set(callback_kwargs)))
        if step == pipeline.num_timesteps - 1:
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}
        return {}

    out = shared_pipe(
        "a red bird",
        generation_mode="image",
        output_type="latent",
        callback_on_step_end=zero_at_last_step,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        **FAST,
    )
    assert torch.count_nonzero(out.images) == 0
    assert [s for s, _, _ in seen] == [0, 1] and seen[0][2] == {"latents", "prompt_embeds"}


def test_other_schedulers_are_accepted(pipe):
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    out = pipe("a red bird", generation_mode="image", generator=seeded(), output_type="np", **FAST)
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()


def test_prompt_with_a_picture_conditions_the_drawing(shared_pipe):
    plain = shared_pipe("a bird", generation_mode="image", output_type="latent", generator=seeded(), **FAST).images
    with_picture = shared_pipe(
        "a bird like <image>",
        images=[picture()],
        generation_mode="image",
        output_type="latent",
        generator=seeded(),
        **FAST,
    ).images
    assert with_picture.shape == plain.shape and not torch.allclose(with_picture, plain)


def test_save_load_round_trip(shared_pipe, tmp_path):
    shared_pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["mllm"] == ["dreamllm_hf.modeling.modeling_dreamllm", "DreamLLMForConditionalGeneration"]
    assert index["processor"] == ["dreamllm_hf.modeling.processing_dreamllm", "DreamLLMProcessor"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    loaded = DreamLLMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for pipeline in (shared_pipe, loaded):
        pipeline.result = pipeline("a red bird", generation_mode="image", generator=seeded(), output_type="np", **FAST)
    np.testing.assert_array_equal(loaded.result.images, shared_pipe.result.images)
    answers = [
        p("Hello <image>", images=picture(), generation_mode="text", max_new_tokens=5).text
        for p in (shared_pipe, loaded)
    ]
    assert answers[0] == answers[1]


def test_text_only_pipeline_saves_and_loads_without_diffusion_parts(shared_pipe, tmp_path):
    text_only = DreamLLMPipeline(mllm=shared_pipe.mllm, processor=shared_pipe.processor)
    text_only.save_pretrained(tmp_path)
    loaded = DreamLLMPipeline.from_pretrained(tmp_path)
    assert loaded.unet is None and loaded.vae is None
    assert (
        loaded("Hello", generation_mode="text", max_new_tokens=3).text
        == shared_pipe("Hello", generation_mode="text", max_new_tokens=3).text
    )
    with pytest.raises(ValueError, match="no unet, vae, scheduler"):
        loaded("a red bird", generation_mode="image")


def test_model_cpu_offload_runs_on_cpu(pipe):
    reference = pipe("a red bird", generation_mode="image", generator=seeded(), output_type="np", **FAST).images
    story = pipe(
        "Tell a story",
        generation_mode="interleaved",
        generation_kwargs=scripted([5, 7, 1003, 9, 2]),
        generator=seeded(),
        output_type="np",
        **FAST,
    )
    if not torch.cuda.is_available():  # diffusers 0.42 wants an accelerator unless the device is named
        with pytest.raises(RuntimeError, match="requires accelerator"):
            pipe.enable_model_cpu_offload()
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe._execution_device.type == "cpu" and pipe._all_hooks  # offload hooks are in place
    offloaded = pipe("a red bird", generation_mode="image", generator=seeded(), output_type="np", **FAST).images
    np.testing.assert_array_equal(offloaded, reference)
    again = pipe(
        "Tell a story",
        generation_mode="interleaved",
        generation_kwargs=scripted([5, 7, 1003, 9, 2]),
        generator=seeded(),
        output_type="np",
        **FAST,
    )
    assert again.text == story.text
    np.testing.assert_array_equal(again.images[0][0], story.images[0][0])


# ----------------------------------------------------------------------------------------------------------------------
# Text


def test_text_mode_is_generate_on_the_chat_prompt(shared_pipe):
    mllm, processor = shared_pipe.mllm, shared_pipe.processor
    image = picture()
    out = shared_pipe("<image>What is in the picture?", images=image, generation_mode="text", max_new_tokens=6)
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
    verbatim = shared_pipe(chat, images=image, generation_mode="text", max_new_tokens=6, use_chat_template=False)
    conversation = shared_pipe(
        [{"role": "user", "content": "<image>What is in the picture?"}],
        images=image,
        generation_mode="text",
        max_new_tokens=6,
    )
    assert verbatim.text == conversation.text == out.text


def test_text_mode_batch_equals_one_by_one_and_stops_at_eos(shared_pipe):
    prompts = ["Hi", "Describe <image> and <image> in detail please"]
    images = [[], [picture(1), picture(2)]]
    batch = shared_pipe(prompts, images=images, generation_mode="text", max_new_tokens=5)
    for index, prompt in enumerate(prompts):
        single = shared_pipe(prompt, images=images[index], generation_mode="text", max_new_tokens=5)
        assert single.text[0] == batch.text[index]
    eos = shared_pipe("Hi", generation_mode="text", max_new_tokens=5, generation_kwargs=scripted([5, 2]))
    assert eos.stop_reasons == [StopReason.EOS]
    assert eos.text == [shared_pipe.tokenizer.decode([5])]


def test_text_streamer_receives_the_tokens(shared_pipe):
    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens, self.ended = [], 0

        def put(self, value):
            self.tokens.append(value.reshape(-1).tolist())

        def end(self):
            self.ended += 1

    streamer = Collect()
    shared_pipe("Hi", generation_mode="text", max_new_tokens=3, streamer=streamer)
    assert len(streamer.tokens) == 1 + 3 and streamer.ended == 1  # the prompt, then each new token


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

    # Fed positions: the `<s>` unconditional (1 + Q + 2), then the stream once: prompt, 5, 7, the dream block,
    # `<im_start>` + N features, `<im_end>`, 9, 11 (the final `</s>` is sampled, never fed).
    stream_len = prompt_len + 2 + (q + 2) + (n + 2) + 2
    assert counter.positions == (1 + q + 2) + stream_len
    assert counter.calls[0] == (1, 1 + q + 2)  # the unconditional
    assert counter.calls[1] == (1, prompt_len)  # the prompt, once
    assert counter.calls[4] == (1, q + 2)  # dream block, appended to the cache
    assert counter.calls[5] == (1, 1 + n)  # the picture read back
    assert all(length == 1 for _, length in counter.calls[6:])


def test_interleaved_reads_prompt_pictures_once_and_each_drawn_picture_once(pipe):
    clip_batches = []
    pipe.mllm.model.vision_tower.register_forward_hook(
        lambda module, args, output: clip_batches.append(args[0].shape[0])
    )
    out = pipe(
        "Continue from <image>",
        images=picture(),
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
        cond = pipe.mllm.get_dream_embeddings(context)
        uncond = pipe.mllm.get_dream_embeddings(torch.tensor([[config.bos_token_id]]))
    direct = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        generation_mode="image",
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
    picture_cost = config.num_dream_queries + 2 + config.num_image_tokens + 2
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


def test_interleaved_batches_and_copies(pipe):
    out = pipe(
        ["Write", "Tell me more please"],
        num_images_per_prompt=2,
        generation_kwargs={"logits_processor": LogitsProcessorList([AlwaysDreamThenStop()])},
        generator=[seeded(i) for i in range(4)],
        output_type="np",
        **FAST,
    )
    assert len(out.documents) == 4 and out.stop_reasons == [StopReason.EOS] * 4
    assert all(len(images) == 1 for images in out.images)
    assert not np.allclose(out.images[0][0], out.images[1][0])  # each document has its own generator


class AlwaysDreamThenStop(LogitsProcessor):
    """A picture first, then `</s>`, for every document (decided from the tokens so far, so it needs no state)."""

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        forced[:, 2 if (input_ids == 1005).any() else 1003] = 0
        return forced


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


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="<image> and <image>", images=[picture()], generation_mode="text"), "2 `<image>`"),
        (dict(prompt="Hi", images=[picture()], generation_mode="text"), "0 `<image>`"),
        (dict(prompt="Hi <image>", images=[{"not": "an image"}], generation_mode="text"), "Unsupported image type"),
        (dict(prompt="Hi <image>", images=[42], generation_mode="text"), "Unsupported image type"),
        (dict(prompt="a bird", generation_mode="image", height=15), "divisible by the VAE factor 2"),
        (dict(prompt="a bird", generation_mode="image", width=17), "divisible by the VAE factor 2"),
        (dict(prompt="a bird", generation_mode="image", num_inference_steps=0), "positive integer"),
        (dict(prompt="a bird", generation_mode="image", num_inference_steps=-3), "positive integer"),
        (dict(prompt="a bird", generation_mode="video"), "Unknown generation_mode 'video'"),
        (dict(prompt="a bird", generation_mode="image", output_type="jpeg"), "Unknown output_type"),
        (dict(prompt="a bird", output_type="latent"), "interleaved"),
        (dict(prompt="a bird", generation_mode="text", max_new_tokens=0), "max_new_tokens"),
        (dict(prompt="a bird", max_images=-1), "max_images"),
        (dict(prompt="a bird", latents=torch.zeros(1, 4, 8, 8)), "generation_mode='image' only"),
        (dict(prompt=["a", "b"], negative_prompt=["x"], generation_mode="image"), "one per prompt"),
        (dict(prompt="a", negative_prompt="<image>", generation_mode="image"), "takes no pictures"),
        (dict(prompt="a bird", generation_mode="image", callback_on_step_end_tensor_inputs=["noise"]), "noise"),
        (dict(prompt="a bird", generation_kwargs={"max_new_tokens": 3}), "may not set"),
        (dict(prompt=42, generation_mode="text"), "`prompt` must be"),
        (dict(prompt=None, generation_mode="image"), "Pass `prompt` or `prompt_embeds`"),
        (
            dict(prompt=None, prompt_embeds=torch.zeros(1, 4, 16), images=[picture()], generation_mode="image"),
            "`images` go with",
        ),
        (dict(prompt=["a <image>", "b"], images=[picture()], generation_mode="text"), "give `images` as 2 lists"),
        (dict(prompt="a", generation_mode="image", latents=torch.zeros(1, 4, 4, 4)), "expected"),
    ],
)
def test_bad_inputs_are_value_errors_that_say_what_to_change(shared_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        shared_pipe(**kwargs, **{k: v for k, v in FAST.items() if k not in kwargs})


@pytest.mark.parametrize("mode", ["image", "text", "interleaved"])
def test_prompt_longer_than_the_context(pipe, mode):
    pipe.mllm.config.text_config.max_position_embeddings = 40
    with pytest.raises(ValueError, match="context is 40 positions"):
        pipe("word " * 60, generation_mode=mode, **FAST)
