"""`dreamllm-hf evaluate fid|captions|vqa` end to end on the shipped demo model and the shapes-world benchmark."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from test_evaluation import shapes_benchmark

from dreamllm_hf.cli import main
from dreamllm_hf.evaluation.text_to_image import picture_seed
from dreamllm_hf.shapes_world.evaluation import named_colour_and_shape


pytestmark = pytest.mark.usefixtures("one_thread")


FEW_STEPS = ["--steps", "2", "--guidance", "2", "--resolution", "32"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """The commands create an `Accelerator`; its process-wide state must not leak into later tests."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def run(capsys, *argv) -> dict:
    """Runs `dreamllm-hf evaluate ...`; returns the JSON of the last line of stdout."""
    assert main(["evaluate", *map(str, argv)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def benchmark():
    return shapes_benchmark()


def test_fid_draws_selects_scores_and_resumes(benchmark, tmp_path, capsys):
    output = tmp_path / "fid"
    clip = benchmark / "clip"
    argv = [
        "fid",
        "--model",
        "demo",
        "--captions",
        benchmark / "captions.jsonl",
        "--num-captions",
        "3",
        "--reference",
        benchmark / "reference",
        "--seeds",
        "0-1",
        "--select-with",
        clip,
        "--feature-model",
        clip,
        *FEW_STEPS,
        "--batch-size",
        "4",
        "--output-dir",
        output,
    ]
    result = run(capsys, *argv)
    assert result["task"] == "fid" and result["selection"] == "clip" and result["pictures"] == 3
    assert np.isfinite(result["fid"]) and result["fid"] >= 0 and 0 < result["clip_score"] <= 100
    assert result["reference_pictures"] == 60 and result["feature_network"] == "features:clip"
    assert result["settings"]["seeds"] == [0, 1] and result["settings"]["steps"] == 2
    assert json.loads((output / "scores.json").read_text()) == result  # the same JSON beside the pictures
    assert len(list((output / "pictures").glob("*.png"))) == 6  # 3 captions x 2 seeds
    rows = [json.loads(line) for line in (output / "selected.jsonl").read_text().splitlines()]
    for row in rows:  # the kept picture is the one with the best CLIP score
        scores = row["clip_scores"]
        assert row["seed"] == int(max(scores, key=scores.get)) and row["file_name"].endswith(f"-s{row['seed']}.png")
        assert "image_id" in row  # the caption's ids are kept

    # A picture does not depend on the batch it was drawn in: the same caption and seed, drawn alone.
    from dreamllm_hf.pipelines import DreamLLMText2ImagePipeline
    from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH

    pipe = DreamLLMText2ImagePipeline.from_pretrained(str(DEMO_MODEL_PATH), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    alone = pipe(
        rows[1]["caption"],
        num_inference_steps=2,
        guidance_scale=2.0,
        output_type="np",
        generator=torch.Generator().manual_seed(picture_seed(1, 1)),
    ).images[0]
    written = np.asarray(PIL.Image.open(output / "pictures" / "c000001-s1.png"), dtype=np.float32) / 255
    assert np.abs(alone - written).max() <= 1 / 255 + 1e-6  # PNG rounding

    # A re-run draws nothing and gives the same scores; a lost picture is drawn again.
    (output / "pictures" / "c000002-s0.png").unlink()
    again = run(capsys, *argv)
    assert again["timings"]["pictures_drawn"] == 1
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-4)

    # Other settings in the same folder are refused before anything is drawn.
    changed = [value if value != "2" or argv[i - 1] != "--steps" else "3" for i, value in enumerate(map(str, argv))]
    with pytest.raises(SystemExit, match="drawn with other settings.*steps: 2 then, 3 now"):
        main(["evaluate", *changed])

    # --generated scores the kept pictures again, here with the reference as saved statistics.
    stats = tmp_path / "reference.npz"
    run(
        capsys,
        "fid",
        "--generated",
        output / "selected.jsonl",
        "--reference",
        benchmark / "reference",
        "--save-reference-stats",
        stats,
        "--feature-model",
        clip,
        "--resolution",
        "32",
        "--output-dir",
        tmp_path / "re",
    )
    rescored = run(
        capsys,
        "fid",
        "--generated",
        output / "selected.jsonl",
        "--reference",
        stats,
        "--feature-model",
        clip,
        "--clip-model",
        clip,
        "--resolution",
        "32",
        "--output-dir",
        tmp_path / "re",
    )
    assert rescored["fid"] == pytest.approx(result["fid"], rel=1e-4)
    assert rescored["clip_score"] == pytest.approx(result["clip_score"], rel=1e-4)


def test_fid_input_errors_are_named_before_drawing(benchmark, tmp_path):
    base = [
        "evaluate",
        "fid",
        "--model",
        "demo",
        "--captions",
        str(benchmark / "captions.jsonl"),
        "--reference",
        str(benchmark / "reference"),
        "--output-dir",
        str(tmp_path / "out"),
    ]
    clip = str(benchmark / "clip")
    with pytest.raises(SystemExit, match="--inception-weights FILE .* or --feature-model DIR"):
        main(base)
    with pytest.raises(SystemExit, match="give --select-with CLIP_DIR"):
        main([*base, "--feature-model", clip, "--seeds", "42-49"])
    with pytest.raises(SystemExit, match="--inception-weights .*missing.pt does not exist"):
        main([*base, "--inception-weights", str(tmp_path / "missing.pt")])
    broken = tmp_path / "captions.jsonl"
    broken.write_text('{"caption": "a red circle"}\n{"caption": ""}\n')
    with pytest.raises(SystemExit, match='line 2: "caption" must be a non-empty string'):
        main([*base[:5], str(broken), *base[6:], "--feature-model", clip])
    assert not (tmp_path / "out" / "pictures").exists()


def test_captions_of_the_demo_model_scored_and_resumed(benchmark, tmp_path, capsys):
    argv = [
        "captions",
        "--model",
        "demo",
        "--data",
        benchmark / "captioning.jsonl",
        "--prompt",
        "<image>",
        "--no-chat-template",
        "--limit",
        "4",
        "--metrics",
        "ROUGE-L,CIDEr",
        "--output-dir",
        tmp_path,
    ]
    result = run(capsys, *argv)
    results = json.loads((tmp_path / "results.json").read_text())
    references = [json.loads(line) for line in (benchmark / "captioning.jsonl").read_text().splitlines()][:4]
    assert [row["image_id"] for row in results] == [0, 1, 2, 3]  # COCO's results format
    right = sum(
        named_colour_and_shape(row["caption"]) == named_colour_and_shape(ref["references"][0])
        for row, ref in zip(results, references)
    )
    assert right >= 3  # the demo model captions held-out pictures (98 % in evaluate-demo)
    assert result["count"] == 4 and result["ROUGE-L"] > 50 and result["CIDEr"] > 100
    assert run(capsys, *argv) == result  # resumed: the written answers are read back


def test_captions_answers_file_with_meteor_and_spice_status(benchmark, tmp_path, capsys):
    rows = [json.loads(line) for line in (benchmark / "captioning.jsonl").read_text().splitlines()]
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps([{"image_id": row["image_id"], "caption": row["references"][0]} for row in rows]))
    result = run(capsys, "captions", "--data", benchmark / "captioning.jsonl", "--answers", answers)
    assert result["METEOR"] > 90 and result["ROUGE-L"] > 90 and result["CIDEr"] > 100 and "BLEU-4" in result
    assert ("SPICE" in result) != ("SPICE" in result["unavailable"])  # scored, or said why not
    assert (tmp_path / "scores.json").is_file()


def test_vqa_accuracy_of_planted_answers_and_of_the_demo_model(benchmark, tmp_path, capsys):
    questions = [json.loads(line) for line in (benchmark / "vqa.jsonl").read_text().splitlines()]
    right = [
        {
            "question_id": q["question_id"],
            "answer": q["answers"][0]
            if q["answers"][0] == q["answers"][1]
            else max(set(q["answers"]), key=q["answers"].count),
        }
        for q in questions
    ]
    (tmp_path / "right.json").write_text(json.dumps(right))
    result = run(capsys, "vqa", "--data", benchmark / "vqa.jsonl", "--answers", tmp_path / "right.json")
    assert result["accuracy"] == 100.0 and result["scored"] == len(questions)

    shutil.rmtree(tmp_path / "model", ignore_errors=True)
    result = run(
        capsys,
        "vqa",
        "--model",
        "demo",
        "--data",
        benchmark / "vqa.jsonl",
        "--prompt",
        "{question}",
        "--no-chat-template",
        "--limit",
        "4",
        "--output-dir",
        tmp_path / "model",
    )
    per_question = [json.loads(line) for line in (tmp_path / "model" / "per_question.jsonl").read_text().splitlines()]
    assert [row["question_id"] for row in per_question] == [0, 1, 2, 3]
    expected = 100 * sum(row["accuracy"] for row in per_question) / 4
    assert result["accuracy"] == pytest.approx(expected, abs=0.01) and result["format"] == "jsonl"
    with pytest.raises(SystemExit, match="has no \\{question\\}"):
        main(
            [
                "evaluate",
                "vqa",
                "--model",
                "demo",
                "--data",
                str(benchmark / "vqa.jsonl"),
                "--prompt",
                "Answer.",
                "--output-dir",
                str(tmp_path / "other"),
            ]
        )
