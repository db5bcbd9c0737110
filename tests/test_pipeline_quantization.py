"""The pipeline in bf16, with per-component dtypes, and with a 4-bit or 8-bit mllm."""

import numpy as np
import pytest
import torch
from diffusers import PipelineQuantizationConfig
from transformers import BitsAndBytesConfig

from dreamllm_hf import DreamLLMForConditionalGeneration, DreamLLMPipeline, DreamLLMText2ImagePipeline


pytest.importorskip("bitsandbytes")

FAST = dict(num_inference_steps=2, guidance_scale=3.5, height=16, width=16)
# The fixture's CLIP tower is 32 wide: bitsandbytes' CPU 4-bit kernels need in_features % 64 == 0, so it stays out.
SKIP = ["model.vision_tower", "model.multi_modal_projector", "model.condition_projector", "lm_head"]


def nf4():
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=SKIP
    )


def seeded(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def draw(pipe, prompt="a red bird"):
    """Text-to-image on `pipe`'s components, which `from_pipe` shares with their dtypes (bf16, mixed, quantized)."""
    return DreamLLMText2ImagePipeline.from_pipe(pipe)(prompt, generator=seeded(), output_type="np", **FAST).images


def run_all_modes(pipe, goldens):
    image = draw(pipe)
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    picture = (goldens["raw_image_0"].numpy()).astype(np.uint8)
    text = pipe("<image>\nWhat is it?", image=[picture], allow_images=False, max_new_tokens=4, do_sample=False)
    assert isinstance(text.text[0], str)
    doc = pipe("Tell a story.", max_new_tokens=4, generator=seeded(), **FAST)
    assert doc.stop_reasons[0] in ("eos", "max_new_tokens", "max_images", "context_limit")
    return image


def linear_kinds(mllm):
    return {type(m).__name__ for n, m in mllm.model.language_model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_prequantized_mllm_runs_all_three_modes(converted_tiny, goldens):
    mllm = DreamLLMForConditionalGeneration.from_pretrained(
        converted_tiny / "mllm", quantization_config=nf4(), dtype=torch.float32
    )
    assert linear_kinds(mllm) == {"Linear4bit"}
    pipe = DreamLLMPipeline.from_pretrained(converted_tiny, mllm=mllm, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    quantized = run_all_modes(pipe, goldens)
    reference = DreamLLMPipeline.from_pretrained(converted_tiny, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    full = draw(reference)
    assert 0 < np.abs(quantized - full).max() < 0.25  # observed ~1e-2 on this random tiny model


def test_pipeline_quantization_config_quantizes_the_mllm(converted_tiny, goldens):
    config = PipelineQuantizationConfig(
        quant_mapping={"mllm": BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP)}
    )
    pipe = DreamLLMPipeline.from_pretrained(converted_tiny, quantization_config=config, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert linear_kinds(pipe.mllm) == {"Linear8bitLt"}
    assert type(pipe.mllm.lm_head) is torch.nn.Linear
    run_all_modes(pipe, goldens)


def test_moving_a_4bit_mllm_to_another_dtype_is_a_clear_error(converted_tiny):
    mllm = DreamLLMForConditionalGeneration.from_pretrained(
        converted_tiny / "mllm", quantization_config=nf4(), dtype=torch.float32
    )
    with pytest.raises(ValueError, match="(?i)bitsandbytes model in a new `dtype`"):
        mllm.to(torch.float16)


def test_bf16_pipeline_and_per_component_dtypes(converted_tiny, goldens):
    pipe = DreamLLMPipeline.from_pretrained(converted_tiny, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.mllm.dtype == pipe.unet.dtype == torch.bfloat16
    run_all_modes(pipe, goldens)
    assert pipe.mllm.dtype == pipe.unet.dtype == torch.bfloat16  # drawing through from_pipe left them as they were
    mixed = DreamLLMPipeline.from_pretrained(converted_tiny, dtype={"mllm": torch.float32, "default": torch.bfloat16})
    assert (
        mixed.mllm.dtype == torch.float32 and mixed.unet.dtype == torch.bfloat16 and mixed.vae.dtype == torch.bfloat16
    )
    mixed.set_progress_bar_config(disable=True)
    image = draw(mixed)
    assert np.isfinite(image).all()
    assert mixed.mllm.dtype == torch.float32 and mixed.unet.dtype == torch.bfloat16


def test_sequential_offload_hooks_match_plain_run(converted_tiny):
    """Every module's weights live off-device and are brought in per forward, as `enable_sequential_cpu_offload` does.

    diffusers' own `enable_sequential_cpu_offload` needs an accelerator (on a CPU it rewrites the device to "cpu:0",
    where accelerate 1.15 fails even for a stock LlamaForCausalLM), so the same accelerate hooks are attached directly.
    """
    from accelerate import cpu_offload

    reference = DreamLLMPipeline.from_pretrained(converted_tiny, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    expected = draw(reference)
    pipe = DreamLLMPipeline.from_pretrained(converted_tiny, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for component in (pipe.mllm, pipe.unet, pipe.vae):
        cpu_offload(component, execution_device="cpu")
    assert pipe.mllm.model.language_model.embed_tokens.weight.device.type == "meta"
    image = draw(pipe)
    np.testing.assert_allclose(image, expected, atol=1e-5)
