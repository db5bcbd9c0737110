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


def _launch_command(config: str, port: int, arguments) -> tuple[list[str], dict]:
    """The `accelerate launch` command line of `config` (in examples/accelerate/) and its environment: offline, one
    thread a process. Skips where the launcher is not installed next to this Python."""
    import sys

    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        pytest.skip("the accelerate launcher is not installed next to this Python")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    config = REPO / "examples" / "accelerate" / config
    command = [str(launcher), "launch", "--config_file", str(config), "--main_process_port", str(port)]
    return command + [str(argument) for argument in arguments], env


@pytest.fixture
def accelerate_launch():
    """`launch(port, *arguments, cwd=None, config="cpu_2proc.yaml")` runs `accelerate launch` with two CPU processes
    (examples/accelerate/cpu_2proc.yaml: DDP; cpu_2proc_fsdp.yaml: FSDP2), offline and on one thread each, and returns
    the finished process, its exit status checked. Skips where the launcher is not installed next to this Python."""
    import subprocess

    def launch(port: int, *arguments, cwd=None, config="cpu_2proc.yaml") -> "subprocess.CompletedProcess":
        command, env = _launch_command(config, port, arguments)
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return run

    return launch


@pytest.fixture
def accelerate_launch_two_nodes(tmp_path):
    """`launch(port, *arguments, config=...)` starts `accelerate launch` twice at once, as machine 0 and machine 1 of
    two (`--num_machines 2 --num_processes 2`: one process each, meeting at 127.0.0.1:`port`), and returns both
    finished processes, their exit statuses checked. When one machine fails, the other (which would wait for it) is
    stopped with its processes."""
    import signal
    import subprocess
    import time

    def launch(port: int, *arguments, config="cpu_2proc_fsdp.yaml") -> list["subprocess.CompletedProcess"]:
        nodes = []
        for rank in (0, 1):
            flags = ["--num_machines", 2, "--num_processes", 2, "--machine_rank", rank]
            flags += ["--main_process_ip", "127.0.0.1"]
            command, env = _launch_command(config, port, [*flags, *arguments])
            out, err = (open(tmp_path / f"machine{rank}.{name}", "w+") for name in ("out", "err"))
            node = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
            nodes.append((command, node, out, err))
        deadline = time.monotonic() + 600
        try:
            while any(node.poll() is None for _, node, _, _ in nodes) and time.monotonic() < deadline:
                if any(node.poll() not in (None, 0) for _, node, _, _ in nodes):
                    break
                time.sleep(0.2)
        finally:
            for _, node, _, _ in nodes:
                if node.poll() is None:
                    os.killpg(node.pid, signal.SIGKILL)  # its own session: the launcher and the processes it started
                    node.wait()
        runs = []
        for command, node, out, err in nodes:
            out.seek(0), err.seek(0)
            runs.append(subprocess.CompletedProcess(command, node.returncode, out.read(), err.read()))
            out.close(), err.close()
        for rank, run in enumerate(runs):
            assert run.returncode == 0, f"machine {rank}: " + run.stdout[-3000:] + run.stderr[-3000:]
        return runs

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
