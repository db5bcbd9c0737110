"""`accelerate launch` with two CPU processes (DDP over gloo) runs the training script end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dreamllm_hf.shapes_world.data import write_pairs_folder


REPO = Path(__file__).resolve().parents[1]


def test_accelerate_launch_two_cpu_processes(converted_tiny, tmp_path):
    """Batch size 1 of pairs: every step leaves the dream path or the image projector unused on some rank, which DDP
    (no `find_unused_parameters`) only survives because the loss keeps every trainable module in the graph."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("the accelerate launcher is not installed next to this Python")
    data = write_pairs_folder(tmp_path / "pairs", 4, seed=0)
    output = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [
        str(accelerate),
        "launch",
        "--config_file",
        str(REPO / "examples/accelerate/cpu_2proc.yaml"),
        "--main_process_port",
        "29561",
        str(REPO / "examples/train_lora.py"),
        "--model",
        str(converted_tiny),
        "--data",
        str(data),
        "--output-dir",
        str(output),
        "--max-steps",
        "3",
        "--seed",
        "0",
        "--batch-size",
        "1",
        "--checkpointing-steps",
        "2",
        "--dtype",
        "float32",
        "--cache-dir",
        str(tmp_path / "hf-cache"),
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("Trained 3 steps") == 1  # printed by the main process only
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2, 3]  # written once, by the main process
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_step"] == 3
    assert sorted(p.name for p in (output / "checkpoint-2").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert (output / "adapter_model.safetensors").exists()
