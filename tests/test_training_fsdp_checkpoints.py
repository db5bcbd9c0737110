"""Checkpoints of `dreamllm-hf train` under FSDP2 on two CPU processes (examples/accelerate/cpu_2proc_fsdp.yaml): the
sharded `save_state` resumes exactly, the run ends in a pipeline folder of full safetensors, and a run killed with
SIGKILL resumes from its last complete checkpoint, never from one whose writing was cut short."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreamllm_hf.shapes_world.data import write_pairs_folder


pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "examples" / "accelerate" / "cpu_2proc_fsdp.yaml"
LOSS_RTOL = 1e-5  # as tests/test_training_fsdp.py
WEIGHT_ATOL = 1e-4  # as tests/test_training_fsdp.py
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
STEPS = 6  # 8 pairs / 2 processes: 4 steps an epoch, so a resume also crosses an epoch


def _command(port: int, options: dict) -> list[str]:
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        pytest.skip("the accelerate launcher is not installed next to this Python")
    command = [str(launcher), "launch", "--config_file", str(FSDP_CONFIG), "--main_process_port", str(port)]
    command += ["-m", "dreamllm_hf.cli", "train"]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return command


def _launch(port: int, options: dict) -> subprocess.CompletedProcess:
    run = subprocess.run(_command(port, options), env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _options(model, data, output, **overrides) -> dict:
    values = {
        "model": model,
        "data": data,
        "output_dir": output,
        "max_steps": STEPS,
        "seed": 0,
        "stage": 2,
        "learning_rate": 1e-2,
        "lr_scheduler": "constant",  # the same learning rates whatever `max_steps` says (the killed run's differs)
        "per_device_batch_size": 1,
        "checkpointing_steps": 2,
        "dtype": "float32",
    }
    return values | overrides


def _log(folder: Path) -> list[dict]:
    records = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    return [{key: value for key, value in record.items() if key != "elapsed_s"} for record in records]


def _assert_same_records(ours: list[dict], theirs: list[dict]) -> None:
    assert [record["step"] for record in ours] == [record["step"] for record in theirs]
    for mine, other in zip(ours, theirs):
        assert mine.keys() == other.keys()
        for key, value in other.items():
            if key.endswith("loss") and value is not None:
                assert mine[key] == pytest.approx(value, rel=LOSS_RTOL), (key, mine, other)
            else:
                assert mine[key] == value, (key, mine, other)


def _assert_same_weights(folder: Path, reference: Path) -> None:
    ours, theirs = (load_file(path / "mllm" / "model.safetensors") for path in (folder, reference))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert (ours[key].float() - theirs[key].float()).abs().max().item() <= WEIGHT_ATOL, key


@pytest.fixture(scope="module")
def setup(converted_tiny, tmp_path_factory):
    """The data, and the uninterrupted FSDP run of `STEPS` steps (checkpoints at 2, 4, 6) everything is compared to."""
    root = tmp_path_factory.mktemp("fsdp-checkpoints")
    data = {"data": write_pairs_folder(root / "pairs", 8, seed=0), "cache_dir": root / "hf-cache"}
    straight = root / "straight"
    _launch(29591, _options(converted_tiny, output=straight, **data))
    return {"model": converted_tiny, "data": data, "straight": straight}


def test_sharded_checkpoint_resumes_exactly_into_a_complete_pipeline(setup, tmp_path):
    """Resumed from the uninterrupted run's sharded checkpoint-2 into another folder: steps 3-6 log the losses of the
    uninterrupted run and the weights end the same; the output is a pipeline of full safetensors that loads."""
    from dreamllm_hf import DreamLLMPipeline
    from dreamllm_hf.training.trainer import PARTIAL_CHECKPOINT_SUFFIX, complete_checkpoints

    straight = setup["straight"]
    assert [path.name for path in complete_checkpoints(straight)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    checkpoint = straight / "checkpoint-2"
    shards = sorted(path.name for path in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # FSDP's sharded state dict, one file per process
    assert not list(straight.glob(f"*{PARTIAL_CHECKPOINT_SUFFIX}"))
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2

    resumed = tmp_path / "resumed"
    run = _launch(29592, _options(setup["model"], output=resumed, resume=checkpoint, **setup["data"]))
    assert f"Resumed from {checkpoint} at step 2." in run.stdout
    straight_log = _log(straight)
    assert any(record["lm_loss"] is not None for record in straight_log[2:])  # both terms are compared
    _assert_same_records(_log(resumed), straight_log[2:])
    _assert_same_weights(resumed, straight)

    # Full tensors in one safetensors file, written once by the main process, not the shards of a process.
    (weights,) = (resumed / "mllm").glob("*.safetensors")
    trained = load_file(weights)
    pipe = DreamLLMPipeline.from_pretrained(resumed, dtype=torch.float32)
    loaded = pipe.mllm.state_dict()
    for key, value in trained.items():
        assert loaded[key].shape == value.shape and torch.equal(loaded[key], value.float()), key


def _kill_with_workers(process: subprocess.Popen) -> None:
    """SIGKILL to the launcher and every process under it. Killing its process group is not enough: torch's elastic
    agent starts each worker in a session of its own, and they would train on."""
    import psutil

    launcher = psutil.Process(process.pid)
    everyone = [launcher, *launcher.children(recursive=True)]
    for member in everyone:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=60)
    _, alive = psutil.wait_procs(everyone, timeout=60)
    assert not alive, alive


def test_run_killed_with_sigkill_resumes_from_its_last_complete_checkpoint(setup, tmp_path):
    """A run saving every step is killed with SIGKILL (the launcher and both workers) once a checkpoint is complete,
    as a lost node would be. Left also with a half-written `.partial` checkpoint and a newer folder without its
    completion marker, `--resume` takes the last complete checkpoint, overwrites the broken ones as it reaches their
    steps, and ends with the uninterrupted run's losses and weights."""
    from dreamllm_hf.training.trainer import PARTIAL_CHECKPOINT_SUFFIX, complete_checkpoints, find_latest_checkpoint

    output = tmp_path / "killed"
    options = _options(setup["model"], output=output, **setup["data"], checkpointing_steps=1)
    killed = subprocess.Popen(
        _command(29593, options | {"max_steps": 1000}),  # far more steps than it gets to run
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while find_latest_checkpoint(output) is None:
            assert killed.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no complete checkpoint in 300 s"
            time.sleep(0.02)
    finally:
        _kill_with_workers(killed)
    assert killed.returncode == -signal.SIGKILL

    last = find_latest_checkpoint(output)
    step = int(last.name.split("-")[1])
    assert 1 <= step < STEPS - 2, f"killed too late to test: {last}"
    print(f"killed after {last.name}; resuming from it")
    assert len(_log(output)) >= step
    # What a kill at a worse moment leaves: the next checkpoint half-written, and one after it (being deleted, say)
    # without its completion marker. Neither is complete; a run reading them would fail or resume wrongly.
    half_written = output / f"checkpoint-{step + 1}{PARTIAL_CHECKPOINT_SUFFIX}"
    (half_written / "pytorch_model_fsdp_0").mkdir(parents=True, exist_ok=True)
    (half_written / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"cut short")
    unmarked = output / f"checkpoint-{step + 2}"
    shutil.copytree(last, unmarked)
    (unmarked / "trainer_state.json").unlink()
    (unmarked / "random_states_0.pkl").write_bytes(b"cut short")
    assert find_latest_checkpoint(output) == last

    run = _launch(29594, options | {"resume": True})
    assert f"Resumed from {last} at step {step}." in run.stdout
    _assert_same_records(_log(output), _log(setup["straight"]))  # the killed run's later lines are dropped
    _assert_same_weights(output, setup["straight"])
    steps = [int(path.name.split("-")[1]) for path in complete_checkpoints(output)]
    assert steps == list(range(1, STEPS + 1)) and not list(output.glob(f"*{PARTIAL_CHECKPOINT_SUFFIX}"))
    for checkpoint in complete_checkpoints(output):
        assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == int(
            checkpoint.name.split("-")[1]
        )
    assert (output / f"checkpoint-{step + 2}" / "random_states_0.pkl").read_bytes() != b"cut short"  # rewritten


def test_resume_refuses_an_incomplete_checkpoint(tmp_path):
    """`--resume PATH` to a checkpoint folder without its completion marker is refused before anything loads."""
    from dreamllm_hf.training import DreamLLMTrainingArguments, train

    (tmp_path / "model").mkdir()
    broken = tmp_path / "out" / "checkpoint-3"
    broken.mkdir(parents=True)
    args = DreamLLMTrainingArguments(
        model=str(tmp_path / "model"), data=[str(tmp_path)], output_dir=str(tmp_path / "out"), resume=str(broken)
    )
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        train(args)
