"""The synergy study of the version-2 world (`examples/research_projects/shapes_world_v2/synergy.py`): the joint
recipe against its comprehension-only control, seed by seed, at toy step counts (the code path and the bookkeeping,
not the finding)."""

import json

import pytest
from shapes_world_v2 import synergy
from test_shapes_world import TOY_RECIPE


pytestmark = pytest.mark.usefixtures("one_thread")


def test_both_arms_over_seeds_with_as_many_updates_and_one_decoder(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({key: value for key, value in TOY_RECIPE.items() if key != "num_threads"}))
    argv = ["--seeds", "0", "1", "--work", str(tmp_path / "work"), "--recipe", str(recipe), "--num-pictures", "4"]
    report = synergy.main(argv)

    assert set(report) == {"joint", "comprehension", "joint_minus_comprehension"}
    for metric, difference in report["joint_minus_comprehension"].items():
        joint, alone = report["joint"][metric]["values"], report["comprehension"][metric]["values"]
        assert difference["values"] == pytest.approx([j - c for j, c in zip(joint, alone)], abs=1e-4)
    for arm in (report["joint"], report["comprehension"]):
        for metric in ("caption_accuracy", "question_accuracy"):
            values = arm[metric]["values"]
            assert len(values) == 2 and all(0.0 <= value <= 1.0 for value in values)
            assert arm[metric]["mean"] == pytest.approx(sum(values) / 2, abs=1e-4)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["seeds"] == [0, 1]

    runs = {
        path.name: json.loads((path / "training_report.json").read_text()) for path in (tmp_path / "work").iterdir()
    }
    assert set(runs) == {"joint-seed0", "comprehension-seed0", "joint-seed1", "comprehension-seed1"}
    for name, run in runs.items():
        updates = [
            record["step"] for record in run["history"] if "step" in record and record["stage"] != "0a-autoencoder"
        ]
        stages = {stage["name"]: stage["arguments"] for stage in run["stages"]}
        # as many LLM updates in both arms: every stage keeps its steps
        assert [stage["max_steps"] for stage in stages.values()] == [2, 2, 2, 2], name
        creation = [stage["loss_weight_vm"] for stage in stages.values()]
        assert (max(creation) > 0) == name.startswith("joint"), name
        assert all("stories" not in stage["data"] for stage in stages.values()) or name.startswith("joint"), name
        assert updates, name
    # stage 0 is trained once, by the first joint run; every later run reuses its decoder
    assert "stage 0a autoencoder" in runs["joint-seed0"]["timings_s"]
    for name in ("comprehension-seed0", "joint-seed1", "comprehension-seed1"):
        assert "stage 0a autoencoder" not in runs[name]["timings_s"], name

    # finished runs are reused: the same report, no training
    again = synergy.main(argv)
    assert again == report
