"""DreamLLMText2ImagePipeline on the tiny converted checkpoint (random weights, 16x16 pictures, 2 steps): shaped like
StableDiffusionPipeline; the golden parity is in test_pipeline_parity.py, the checks every pipeline is held to
(save/load, dict vs tuple, batching, num_images_per_prompt, callbacks, offload, from_pipe) in test_contracts.py."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler, ImagePipelineOutput
from test_pipeline import FAST, CountTokens, load_pipeline, picture, seeded

from dreamllm_hf.pipelines import DreamLLMText2ImagePipeline


@pytest.fixture
def t2i(converted_tiny):
    """A fresh pipeline per test: several tests change its config or hooks."""
    return DreamLLMText2ImagePipeline.from_pipe(load_pipeline(converted_tiny))


@pytest.fixture(scope="module")
def shared_t2i(converted_tiny):
    return DreamLLMText2ImagePipeline.from_pipe(load_pipeline(converted_tiny))


# ----------------------------------------------------------------------------------------------------------------------
# Text-to-image


def test_image_mode_returns_what_stable_diffusion_returns(shared_t2i):
    np_out = shared_t2i("a red bird", generator=seeded(), output_type="np", **FAST)
    assert isinstance(np_out, ImagePipelineOutput) and set(np_out.keys()) == {"images"}
    assert isinstance(np_out.images, np.ndarray) and np_out.images.shape == (1, 16, 16, 3)
    pil_out = shared_t2i("a red bird", generator=seeded(), **FAST)
    assert isinstance(pil_out.images, list) and isinstance(pil_out.images[0], PIL.Image.Image)
    assert np.array_equal(np.asarray(pil_out.images[0]), (np_out.images[0] * 255).round().astype(np.uint8))
    pt_out = shared_t2i("a red bird", generator=seeded(), output_type="pt", **FAST)
    assert pt_out.images.shape == (1, 3, 16, 16)
    torch.testing.assert_close(pt_out.images.permute(0, 2, 3, 1).numpy(), np_out.images)
    latent_out = shared_t2i("a red bird", generator=seeded(), output_type="latent", **FAST)
    assert latent_out.images.shape == (1, 4, 8, 8)


def test_same_seed_same_bytes(shared_t2i):
    first = shared_t2i("a red bird", generator=seeded(3), **FAST).images[0]
    second = shared_t2i("a red bird", generator=seeded(3), **FAST).images[0]
    other = shared_t2i("a red bird", generator=seeded(4), **FAST).images[0]
    assert first.tobytes() == second.tobytes()
    assert first.tobytes() != other.tobytes()


def test_cond_and_uncond_go_through_the_language_model_in_one_pass(t2i):
    counter = CountTokens(t2i.mllm)
    t2i(["a red bird", "a cat"], output_type="latent", **FAST)
    assert len(counter.calls) == 1 and counter.calls[0][0] == 3  # one `<s>` row + two prompts


def test_guidance_at_most_one_disables_the_unconditional(t2i):
    counter = CountTokens(t2i.mllm)
    unet_batches = []
    t2i.unet.register_forward_hook(lambda module, args, output: unet_batches.append(args[0].shape[0]))
    t2i("a red bird", num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    assert unet_batches == [1, 1] and counter.calls[0][0] == 1
    unet_batches.clear()
    t2i("a red bird", num_inference_steps=2, guidance_scale=2.0, output_type="latent")
    assert unet_batches == [2, 2]


def test_other_schedulers_are_accepted(t2i):
    t2i.scheduler = EulerDiscreteScheduler.from_config(t2i.scheduler.config)
    out = t2i("a red bird", generator=seeded(), output_type="np", **FAST)
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()


def test_prompt_with_a_picture_conditions_the_drawing(shared_t2i):
    plain = shared_t2i("a bird", output_type="latent", generator=seeded(), **FAST).images
    with_picture = shared_t2i(
        "a bird like <image>",
        image=[picture()],
        output_type="latent",
        generator=seeded(),
        **FAST,
    ).images
    assert with_picture.shape == plain.shape and not torch.allclose(with_picture, plain)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="a bird", height=15), "divisible by the VAE factor 2"),
        (dict(prompt="a bird", width=17), "divisible by the VAE factor 2"),
        (dict(prompt="a bird", num_inference_steps=0), "positive integer"),
        (dict(prompt="a bird", num_inference_steps=-3), "positive integer"),
        (dict(prompt="a bird", output_type="jpeg"), "Unknown output_type"),
        (dict(prompt=["a", "b"], negative_prompt=["x"]), "one per prompt"),
        (dict(prompt="a", negative_prompt="<image>"), "takes no pictures"),
        (dict(prompt="a bird", callback_on_step_end_tensor_inputs=["noise"]), "noise"),
        (dict(prompt=None), "Pass `prompt` or `prompt_embeds`"),
        (dict(prompt=[{"role": "user", "content": "a"}]), "no chat template"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 4, 16), image=[picture()]), "`image` goes with"),
        (dict(prompt="a", latents=torch.zeros(1, 4, 4, 4)), "expected"),
    ],
)
def test_bad_inputs_are_value_errors_that_say_what_to_change(shared_t2i, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        shared_t2i(**kwargs, **{k: v for k, v in FAST.items() if k not in kwargs})


def test_prompt_longer_than_the_context(t2i):
    t2i.mllm.config.text_config.max_position_embeddings = 40
    with pytest.raises(ValueError, match="context is 40 positions"):
        t2i("word " * 60, **FAST)
