"""Shared fixtures: the original-code goldens and the tiny original checkpoint converted once per session."""

import json
import os
from pathlib import Path

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "original_tiny"


@pytest.fixture(scope="session")
def original_tiny_dir() -> Path:
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def goldens_json() -> dict:
    return json.loads((FIXTURE_DIR / "goldens.json").read_text())


@pytest.fixture(scope="session")
def goldens() -> dict:
    from safetensors.torch import load_file

    return load_file(FIXTURE_DIR / "goldens.safetensors")


@pytest.fixture(scope="session")
def converted_tiny(tmp_path_factory) -> Path:
    """The fixture checkpoint through `dreamllm-hf convert`, kept in its stored dtype (bf16)."""
    from dreamllm_hf.conversion import convert_original_checkpoint

    output = tmp_path_factory.mktemp("converted") / "dreamllm-tiny"
    convert_original_checkpoint(FIXTURE_DIR, output)
    return output


@pytest.fixture(scope="session")
def tiny_mllm(converted_tiny):
    """The converted model in fp32, eval mode: the dtype every golden was computed in."""
    import torch

    from dreamllm_hf import DreamLLMForConditionalGeneration

    return DreamLLMForConditionalGeneration.from_pretrained(converted_tiny / "mllm", dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def saved_pipeline(converted_tiny, tmp_path_factory):
    """The converted components saved as one fp32 pipeline folder (model_index.json), as the CLI loads it."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from dreamllm_hf import DreamLLMForConditionalGeneration, DreamLLMProcessor
    from dreamllm_hf.pipelines import DreamLLMPipeline

    folder = tmp_path_factory.mktemp("pipeline")
    DreamLLMPipeline(
        mllm=DreamLLMForConditionalGeneration.from_pretrained(converted_tiny / "mllm", dtype=torch.float32),
        processor=DreamLLMProcessor.from_pretrained(converted_tiny / "processor"),
        unet=UNet2DConditionModel.from_pretrained(converted_tiny / "unet", torch_dtype=torch.float32),
        vae=AutoencoderKL.from_pretrained(converted_tiny / "vae", torch_dtype=torch.float32),
        scheduler=DDPMScheduler.from_pretrained(converted_tiny / "scheduler"),
    ).save_pretrained(folder)
    return folder
