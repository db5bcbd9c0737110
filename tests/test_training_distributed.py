"""`accelerate launch` with two CPU processes (DDP over gloo) runs the training script end to end."""

import json
from pathlib import Path

from dreamllm_hf.shapes_world.data import write_pairs_folder


REPO = Path(__file__).resolve().parents[1]


def test_accelerate_launch_two_cpu_processes(converted_tiny, tmp_path, accelerate_launch):
    """Batch size 1 of pairs: every step leaves the dream path or the image projector unused on some rank, which DDP
    (no `find_unused_parameters`) only survives because the loss keeps every trainable module in the graph."""
    data = write_pairs_folder(tmp_path / "pairs", 4, seed=0)
    output = tmp_path / "run"
    arguments = [REPO / "examples/train_lora.py", "--model", converted_tiny, "--data", data, "--output-dir", output]
    arguments += ["--max-steps", 3, "--seed", 0, "--batch-size", 1, "--checkpointing-steps", 2, "--dtype", "float32"]
    run = accelerate_launch(29561, *arguments, "--cache-dir", tmp_path / "hf-cache")
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
