"""Shared fixtures: the original-code goldens, the tiny original checkpoint converted once per session, and a tiny
pipeline folder from the factory of `dreamllm_hf.testing_utils`."""

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
def saved_pipeline(tmp_path_factory) -> Path:
    """A tiny fp32 pipeline folder (model_index.json) from `dreamllm_hf.testing_utils`, as the CLI loads it."""
    from dreamllm_hf.testing_utils import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))
