"""Shared fixtures: the original-code goldens, the tiny original checkpoint converted once per session, and a tiny
pipeline folder from the factory of `dreamllm_hf.testing_utils`."""

import json
import os
from pathlib import Path

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DIR = Path(__file__).parent / "fixtures" / "original_tiny"


@pytest.fixture(scope="module")
def one_thread():
    """For a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): one intra-op thread is as
    fast as two on an idle machine and far faster on a busy one (OpenMP threads spin-wait for each other). Module
    scope, so that the module's own fixtures (a training run, say) run on one thread too."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def accelerate_launch():
    """`launch(port, *arguments, cwd=None, config="cpu_2proc.yaml")` runs `accelerate launch` with two CPU processes
    (examples/accelerate/cpu_2proc.yaml: DDP; cpu_2proc_fsdp.yaml: FSDP2), offline and on one thread each, and returns
    the finished process, its exit status checked. Skips where the launcher is not installed next to this Python."""
    import subprocess
    import sys

    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        pytest.skip("the accelerate launcher is not installed next to this Python")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def launch(port: int, *arguments, cwd=None, config="cpu_2proc.yaml") -> "subprocess.CompletedProcess":
        config = REPO / "examples" / "accelerate" / config
        command = [str(launcher), "launch", "--config_file", str(config), "--main_process_port", str(port)]
        command += [str(argument) for argument in arguments]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return run

    return launch


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
