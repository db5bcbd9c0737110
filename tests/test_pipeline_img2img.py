"""DreamLLMImg2ImgPipeline and DreamLLMInpaintPipeline on tiny components (random weights, 16x16 pictures, few steps)
and on the shipped demo model (what a picture keeps); diffusers' Auto pipelines on a DreamLLM folder. The checks every
pipeline is held to (save/load, batching, callbacks, offload, from_pipe) are in test_contracts.py."""

import random

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
    EulerDiscreteScheduler,
)
from test_pipeline import FAST, CountTokens, picture, seeded

from dreamllm_hf.pipelines import (
    DreamLLMImg2ImgPipeline,
    DreamLLMInpaintPipeline,
    DreamLLMPipeline,
    DreamLLMText2ImagePipeline,
)
from dreamllm_hf.shapes_world import draw_shape, sample_spec
from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH
from dreamllm_hf.testing_utils import tiny_pipeline, tiny_pipeline_components, tiny_unet


SIZE = 16  # the tiny decoder's pictures
LATENT = (1, 4, 8, 8)


@pytest.fixture(scope="module")
def t2i():
    return tiny_pipeline(DreamLLMText2ImagePipeline)


@pytest.fixture(scope="module")
def i2i(t2i):
    return DreamLLMImg2ImgPipeline.from_pipe(t2i)


@pytest.fixture(scope="module")
def inpaint(t2i):
    return DreamLLMInpaintPipeline.from_pipe(t2i)


@pytest.fixture(scope="module")
def demo():
    pipe = DreamLLMText2ImagePipeline.from_pretrained(DEMO_MODEL_PATH)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def start_picture(seed=0):
    return picture(seed, size=(SIZE, SIZE))


def left_half_mask(size=SIZE):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, : size // 2] = 255  # white: redrawn
    return PIL.Image.fromarray(mask)


def image_latents_after_the_noise(pipe, image, seed=0):
    """The VAE's sample of `image` that a call with `generator=seeded(seed)` draws: after the noise."""
    generator = seeded(seed)
    torch.randn(LATENT, generator=generator)
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image)
        return pipe.vae.encode(pixels).latent_dist.sample(generator) * pipe.vae.config.scaling_factor


# ----------------------------------------------------------------------------------------------------------------------
# Img2img


def test_strength_one_is_text_to_image_from_the_same_noise(t2i, i2i):
    expected = t2i("a red circle", generator=seeded(3), output_type="np", **FAST).images
    drawn = i2i("a red circle", image=start_picture(), strength=1.0, generator=seeded(3), output_type="np", **FAST)
    np.testing.assert_array_equal(drawn.images, expected)


def test_small_strength_keeps_the_picture_and_strength_one_repaints_it(i2i):
    """At strength 0.1 of 10 steps one step is run from the picture's latents noised to the last timestep: what comes
    out is those latents (the VAE's round trip); at strength 1 it is far from them."""
    image = start_picture()
    expected = image_latents_after_the_noise(i2i, image)
    steps = dict(num_inference_steps=10, guidance_scale=3.5, output_type="latent")
    kept = i2i("a red circle", image=image, strength=0.1, generator=seeded(), **steps).images
    repainted = i2i("a red circle", image=image, strength=1.0, generator=seeded(), **steps).images
    half = i2i("a red circle", image=image, strength=0.5, generator=seeded(), **steps).images
    off = {
        name: float((out - expected).abs().mean())
        for name, out in (("kept", kept), ("half", half), ("new", repainted))
    }
    # The one step left moves the latents by sqrt(1 - alpha_bar) of the last timestep (0.04) times the noise the
    # random UNet gets wrong; the noise itself is of scale 1.
    assert off["kept"] < 0.05 and off["kept"] < off["half"] < off["new"] and off["new"] > 10 * off["kept"]


def test_the_loop_runs_the_steps_strength_asks_from_the_noised_picture(i2i):
    timesteps = []
    handle = i2i.unet.register_forward_hook(lambda module, args, output: timesteps.append(int(args[1])))
    try:
        i2i("a red circle", image=start_picture(), strength=0.5, num_inference_steps=10, output_type="latent")
    finally:
        handle.remove()
    i2i.scheduler.set_timesteps(10)
    assert timesteps == i2i.scheduler.timesteps[5:].tolist()  # the last 5 of the 10


def test_demo_model_keeps_the_picture_at_small_strength_and_redraws_it_at_strength_one(demo):
    """On trained weights the picture itself is kept, as a person sees it (the VAE's round trip is within 0.015)."""
    pipe = DreamLLMImg2ImgPipeline.from_pipe(demo)
    red_circle = draw_shape(sample_spec(random.Random(0), colour="red", shape="circle"))
    pixels = np.asarray(red_circle) / 255
    settings = dict(num_inference_steps=10, guidance_scale=2.0, output_type="np")
    kept = pipe("a blue square", image=red_circle, strength=0.1, generator=seeded(), **settings).images[0]
    redrawn = pipe("a blue square", image=red_circle, strength=1.0, generator=seeded(), **settings).images[0]
    assert np.abs(kept - pixels).mean() < 0.04
    assert np.abs(redrawn - pixels).mean() > 0.2


def test_pictures_follow_their_prompts_with_copies(i2i):
    """One picture per prompt, two copies each: each copy starts from its own prompt's picture (rows in the order of
    `encode_prompt`), as when drawn alone."""
    images = [start_picture(1), start_picture(2)]
    settings = dict(strength=0.5, num_inference_steps=4, guidance_scale=3.5, output_type="np")
    batch = i2i(
        ["a red circle", "a blue square"],
        image=images,
        num_images_per_prompt=2,
        generator=[seeded(i) for i in range(4)],
        **settings,
    ).images
    for index in range(2):
        alone = i2i(
            "a red circle" if index == 0 else "a blue square",
            image=images[index],
            num_images_per_prompt=2,
            generator=[seeded(2 * index), seeded(2 * index + 1)],
            **settings,
        ).images
        np.testing.assert_allclose(batch[2 * index : 2 * index + 2], alone, atol=1e-5)


def test_reference_pictures_of_the_prompt_are_prompt_image(i2i):
    settings = dict(image=start_picture(), strength=0.5, output_type="latent", num_inference_steps=4)
    plain = i2i("a bird", generator=seeded(), **settings).images
    with_reference = i2i("a bird like <image>", prompt_image=[picture(5)], generator=seeded(), **settings).images
    assert not torch.allclose(plain, with_reference)


def test_other_schedulers_start_at_the_strength_timestep(i2i):
    pipe = DreamLLMImg2ImgPipeline.from_pipe(i2i, scheduler=EulerDiscreteScheduler.from_config(i2i.scheduler.config))
    out = pipe("a red circle", image=start_picture(), strength=0.5, num_inference_steps=4, output_type="np")
    assert out.images.shape == (1, SIZE, SIZE, 3) and np.isfinite(out.images).all()


# ----------------------------------------------------------------------------------------------------------------------
# Inpainting


def test_inpainting_keeps_the_unmasked_latents_and_redraws_the_masked_ones(inpaint):
    """With a text-to-image UNet the kept region is put back at every step: at the end it is the picture's own
    latents (its VAE round trip), bit for bit; the masked region is drawn anew."""
    image = start_picture()
    expected = image_latents_after_the_noise(inpaint, image)
    out = inpaint(
        "a red circle", image=image, mask_image=left_half_mask(), generator=seeded(), output_type="latent", **FAST
    ).images
    torch.testing.assert_close(out[..., 4:], expected[..., 4:], atol=1e-5, rtol=0)
    assert (out[..., :4] - expected[..., :4]).abs().mean() > 0.5 * expected.abs().mean()
    pixels = inpaint(
        "a red circle", image=image, mask_image=left_half_mask(), generator=seeded(), output_type="np", **FAST
    ).images
    assert pixels.shape == (1, SIZE, SIZE, 3) and np.isfinite(pixels).all()


def test_inpainting_at_partial_strength_starts_the_masked_region_from_the_picture(inpaint):
    image, mask = start_picture(), left_half_mask()
    expected = image_latents_after_the_noise(inpaint, image)
    settings = dict(image=image, mask_image=mask, generator=seeded(), output_type="latent", num_inference_steps=10)
    near = inpaint("a red circle", strength=0.1, **settings).images
    far = inpaint("a red circle", strength=1.0, **settings).images
    masked = (slice(None), slice(None), slice(None), slice(0, 4))
    assert (near[masked] - expected[masked]).abs().mean() < (far[masked] - expected[masked]).abs().mean() / 5


def test_an_inpainting_unet_reads_the_mask_and_the_masked_picture():
    components = tiny_pipeline_components()
    components["unet"] = tiny_unet(cross_attention_dim=components["mllm"].config.cross_attention_dim, in_channels=9)
    pipe = DreamLLMInpaintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    channels = []
    pipe.unet.register_forward_hook(lambda module, args, output: channels.append(args[0].shape[1]))
    settings = dict(image=start_picture(), generator=seeded(), output_type="np", **FAST)
    left = pipe("a red circle", mask_image=left_half_mask(), **settings).images
    assert channels == [9, 9] and left.shape == (1, SIZE, SIZE, 3)
    right = pipe("a red circle", mask_image=left_half_mask().transpose(PIL.Image.FLIP_LEFT_RIGHT), **settings).images
    assert np.abs(left - right).mean() > 1e-3  # the mask is read
    # The other pipelines cannot give it what it reads, and say which one can.
    with pytest.raises(ValueError, match="takes 9 input channels.*DreamLLMInpaintPipeline"):
        DreamLLMText2ImagePipeline.from_pipe(pipe)


# ----------------------------------------------------------------------------------------------------------------------
# Loading: the same folder, diffusers' loader and the Auto pipelines


def test_auto_pipelines_find_the_dreamllm_pipelines(saved_pipeline, tmp_path):
    import dreamllm_hf  # noqa: F401  (registers the pipelines with diffusers)

    expected = {
        AutoPipelineForText2Image: DreamLLMText2ImagePipeline,
        AutoPipelineForImage2Image: DreamLLMImg2ImgPipeline,
        AutoPipelineForInpainting: DreamLLMInpaintPipeline,
    }
    documents = DreamLLMPipeline.from_pretrained(saved_pipeline)  # what the folder's model_index.json names
    for auto_class, pipeline_class in expected.items():
        loaded = auto_class.from_pretrained(saved_pipeline)
        assert type(loaded) is pipeline_class
        shared = auto_class.from_pipe(documents)
        assert type(shared) is pipeline_class and shared.mllm is documents.mllm and shared.unet is documents.unet
        for other_auto, other_class in expected.items():
            between = other_auto.from_pipe(loaded)
            assert type(between) is other_class and between.unet is loaded.unet
    # A folder one of the new pipelines saved loads as it, through diffusers' loader and the Auto pipelines.
    DreamLLMInpaintPipeline.from_pipe(documents).save_pretrained(tmp_path)
    assert type(DiffusionPipeline.from_pretrained(tmp_path)) is DreamLLMInpaintPipeline
    assert type(AutoPipelineForImage2Image.from_pretrained(tmp_path)) is DreamLLMImg2ImgPipeline


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs: refused before any work, naming the argument and the fix


BAD_IMG2IMG = [
    (dict(strength=-0.1), "`strength` must be a finite number in [0, 1], got -0.1"),
    (dict(strength=1.5), "`strength` must be a finite number in [0, 1], got 1.5"),
    (dict(strength="0.5"), "`strength` must be"),
    (dict(strength=0.05, num_inference_steps=10), "leaves no denoising step of 10.*at least 0.1"),
    (dict(image=None), "Pass `image`: the picture to start from"),
    (dict(image=[]), "`image` is empty"),
    (dict(image="photo.png"), "`image` must be a PIL image"),
    (dict(prompt=["a", "b"], image=[start_picture()] * 3), "`image` has 3 pictures for 2 prompts"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 4, 8), prompt_image=[picture()]), "`prompt_image` goes with"),
    (dict(prompt=["a", "b"], prompt_image=[picture()]), "give `prompt_image` as 2 lists"),
]
BAD_INPAINT = [
    (dict(mask_image=None), "Pass `mask_image`: white where `image` is redrawn"),
    (dict(mask_image=left_half_mask(8)), r"`mask_image` is 8x8 but `image` is 16x16 \(height x width\)"),
    (dict(image=None), "Pass `image`: the picture to repaint"),
    (dict(strength=2), "`strength` must be a finite number in [0, 1], got 2"),
]


def refused_before_any_work(pipe, kwargs, message):
    counter = CountTokens(pipe.mllm)
    encoded = []
    handle = pipe.vae.encoder.register_forward_hook(lambda *args: encoded.append(1))
    try:
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            pipe(**kwargs)
    finally:
        handle.remove()
        counter.handle.remove()
    assert counter.calls == [] and encoded == []


@pytest.mark.parametrize("bad, message", BAD_IMG2IMG, ids=[m[:32] for _, m in BAD_IMG2IMG])
def test_bad_img2img_inputs_are_refused_before_any_work(i2i, bad, message):
    kwargs = dict(prompt="a red circle", image=start_picture(), strength=0.5, output_type="np", **FAST)
    refused_before_any_work(i2i, {**kwargs, **bad}, message)


@pytest.mark.parametrize("bad, message", BAD_INPAINT, ids=[m[:32] for _, m in BAD_INPAINT])
def test_bad_inpainting_inputs_are_refused_before_any_work(inpaint, bad, message):
    kwargs = dict(prompt="a red circle", image=start_picture(), mask_image=left_half_mask(), output_type="np", **FAST)
    refused_before_any_work(inpaint, {**kwargs, **bad}, message)
