"""DreamLLMText2ImagePipeline on the converted fixture checkpoint against the ORIGINAL code's text-to-image goldens (fp32, CPU).

Prompt, sizes, seeds and guidance are read from goldens.json (README §3 conditioning, §4 diffusion).
"""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers import scheduling_ddpm

from dreamllm_hf import DreamLLMForConditionalGeneration
from dreamllm_hf.modeling.processing_dreamllm import DreamLLMProcessor
from dreamllm_hf.pipelines import DreamLLMText2ImagePipeline


ATOL = 1e-4  # the fixtures README: fp32 reduction-order noise is ~1e-5 on latents; never loosen


def assert_close(actual, expected, atol=ATOL):
    actual = torch.as_tensor(np.asarray(actual) if not isinstance(actual, torch.Tensor) else actual).float()
    assert tuple(actual.shape) == tuple(expected.shape), (actual.shape, expected.shape)
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


@pytest.fixture(scope="module")
def pipe(converted_tiny):
    pipe = DreamLLMText2ImagePipeline(
        mllm=DreamLLMForConditionalGeneration.from_pretrained(converted_tiny / "mllm", dtype=torch.float32).eval(),
        processor=DreamLLMProcessor.from_pretrained(converted_tiny / "processor"),
        unet=UNet2DConditionModel.from_pretrained(converted_tiny / "unet", torch_dtype=torch.float32),
        vae=AutoencoderKL.from_pretrained(converted_tiny / "vae", torch_dtype=torch.float32),
        scheduler=DDPMScheduler.from_pretrained(converted_tiny / "scheduler"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def diffusion(goldens_json):
    return goldens_json["diffusion"]


def test_scheduler_is_the_originals(pipe, diffusion):
    assert type(pipe.scheduler).__name__ == diffusion["scheduler_class_used"]
    used = diffusion["scheduler_config_used"]
    for key in (
        "beta_schedule",
        "beta_start",
        "beta_end",
        "steps_offset",
        "timestep_spacing",
        "variance_type",
        "prediction_type",
        "clip_sample",
        "num_train_timesteps",
    ):
        assert pipe.scheduler.config[key] == used[key], key
    for steps in (2, 3):
        pipe.scheduler.set_timesteps(steps)
        assert pipe.scheduler.timesteps.tolist() == diffusion[f"timesteps_steps{steps}"]


def test_text_to_image_prompt_tokenization(pipe, goldens_json):
    creation = goldens_json["creation"]
    ids, mask, _ = pipe._tokenize([creation["prompt"]], None, torch.device("cpu"))
    assert ids[0].tolist() == creation["prompt_input_ids"]
    ids, mask, _ = pipe._tokenize([creation["negative_prompt"]], None, torch.device("cpu"))
    assert ids[0].tolist() == creation["negative_input_ids"]
    # Batched with the unconditional row, the prompt keeps its ids and the `<s>` row is left-padded.
    ids, mask, _ = pipe._tokenize([creation["negative_prompt"], creation["prompt"]], None, torch.device("cpu"))
    assert ids[1].tolist() == creation["prompt_input_ids"]
    assert ids[0][mask[0].bool()].tolist() == creation["negative_input_ids"]


def test_conditioning(pipe, goldens, goldens_json):
    creation = goldens_json["creation"]
    cond, uncond, _, _ = pipe.encode_prompt(creation["prompt"], torch.device("cpu"), 1, True, None)
    assert_close(cond, goldens["cond_encoder_hidden_states"])
    assert_close(uncond, goldens["cond_negative_encoder_hidden_states"])


@pytest.mark.parametrize("steps", [2, 3])
@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_text_to_image_goldens(pipe, goldens, goldens_json, diffusion, steps, output_type):
    out = pipe(
        goldens_json["creation"]["prompt"],
        num_inference_steps=steps,
        guidance_scale=diffusion["guidance_scale"],
        height=diffusion["height"],
        width=diffusion["width"],
        generator=torch.Generator("cpu").manual_seed(diffusion["generator_seed"]),
        output_type=output_type,
    )
    assert_close(out.images, goldens[f"sd_steps{steps}_{output_type}"])
    if output_type == "np":
        assert isinstance(out.images, np.ndarray) and out.images.dtype == np.float32


def test_explicit_latents_step_by_step(pipe, goldens, diffusion, goldens_json, monkeypatch):
    explicit = diffusion["explicit"]
    unet_inputs, unet_outputs, encoder_states, noises, latents_after = [], [], [], [], []

    def record_unet(module, args, kwargs, output):
        unet_inputs.append(args[0].clone())
        encoder_states.append(kwargs["encoder_hidden_states"].clone())
        unet_outputs.append(output[0].clone())

    original_randn = scheduling_ddpm.randn_tensor

    def record_noise(*args, **kwargs):
        noise = original_randn(*args, **kwargs)
        noises.append(noise.clone())
        return noise

    def record_latents(pipeline, step, timestep, callback_kwargs):
        latents_after.append(callback_kwargs["latents"].clone())
        return {}

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", record_noise)
    handle = pipe.unet.register_forward_hook(record_unet, with_kwargs=True)

    def call(**kwargs):
        return pipe(
            goldens_json["creation"]["prompt"],
            num_inference_steps=len(explicit["unet_timesteps"]),
            guidance_scale=diffusion["guidance_scale"],
            latents=goldens["explicit_initial_latents"].clone(),
            generator=torch.Generator("cpu").manual_seed(explicit["step_generator_seed"]),
            **kwargs,
        )

    try:
        out = call(output_type="latent", callback_on_step_end=record_latents)
    finally:
        handle.remove()

    assert pipe.scheduler.timesteps.tolist() == explicit["unet_timesteps"]
    assert len(noises) == explicit["num_variance_noise_draws"]
    expected_states = torch.cat(
        [goldens["cond_negative_encoder_hidden_states"], goldens["cond_encoder_hidden_states"]]
    )
    for step in range(len(explicit["unet_timesteps"])):
        assert_close(encoder_states[step], expected_states)  # [uncond, cond]: uncond first
        assert_close(unet_inputs[step], goldens[f"sd_explicit_step{step}_unet_input"])
        assert_close(unet_outputs[step], goldens[f"sd_explicit_step{step}_unet_output"])
        assert_close(noises[step], goldens[f"sd_explicit_step{step}_variance_noise"])
        assert_close(latents_after[step], goldens[f"sd_explicit_step{step}_latents_after"])
    assert_close(out.images, goldens["sd_explicit_latents_steps2_latent"])

    decoded = call(output_type="np")
    assert_close(decoded.images, goldens["sd_explicit_latents_steps2_np"])


def test_prompt_embeds_reproduce_the_goldens(pipe, goldens, diffusion):
    """The diffusion half alone: the goldens' UNet conditioning passed as `prompt_embeds`."""
    out = pipe(
        prompt_embeds=goldens["cond_encoder_hidden_states"],
        negative_prompt_embeds=goldens["cond_negative_encoder_hidden_states"],
        num_inference_steps=2,
        guidance_scale=diffusion["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(diffusion["generator_seed"]),
        output_type="latent",
    )
    assert_close(out.images, goldens["sd_steps2_latent"])
