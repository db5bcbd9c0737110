"""`dreamllm-hf generate --prompts FILE --output-dir DIR`: many documents, resumable, data parallel under accelerate."""

import argparse
import json
import re
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest

from dreamllm_hf.pipelines import DreamLLMPipeline
from dreamllm_hf.pipelines.cli import add_generate_parser
from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH


TINY = "--steps 2 --max-new-tokens 6 --max-images 1 --guidance-scale 1"
RECORD_KEYS = ["id", "index", "prompt", "seed", "segments", "text", "images", "stop_reason", "html"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """`generate --prompts` creates an `Accelerator`; its process-wide state must not leak into later tests."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def streamed_prompts(monkeypatch):
    """The prompts each `DreamLLMPipeline.stream` call receives, in order (one list per call)."""
    calls = []
    stream = DreamLLMPipeline.stream

    def counting_stream(self, *args, **kwargs):
        calls.append(list(kwargs["prompt"]))
        return stream(self, *args, **kwargs)

    monkeypatch.setattr(DreamLLMPipeline, "stream", counting_stream)
    return calls


def generate(model, options: str, *extra: str):
    parser = argparse.ArgumentParser(prog="dreamllm-hf")
    add_generate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["generate", "--model", str(model), *options.split(), *extra])
    return args.func(args)


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its modification time and size."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def read_documents(output: Path, tmp_path: Path) -> datasets.Dataset:
    """`documents.jsonl` through `datasets`, with a cache of its own for each version of the file."""
    data_files = output / "documents.jsonl"
    cache_dir = tmp_path / f"hf-cache-{data_files.stat().st_mtime_ns}"
    return datasets.load_dataset("json", data_files=str(data_files), split="train", cache_dir=str(cache_dir))


@pytest.fixture
def prompts_file(tmp_path):
    PIL.Image.fromarray(np.full((32, 32, 3), (200, 40, 40), dtype=np.uint8)).save(tmp_path / "red.png")
    return write_lines(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "Tell me a story.", "name": "story"},
            {"prompt": "What is this?", "images": ["red.png"], "seed": 7},
            "",  # blank lines are skipped, not counted
            {"prompt": "<image> Tell me a story.", "images": [str(tmp_path / "red.png")]},
        ],
    )


def test_many_prompts_write_one_document_each_and_resume(prompts_file, tmp_path, streamed_prompts):
    """On the shipped demo model, which draws a picture after its first sentence."""
    output = tmp_path / "out"
    options = f"--prompts {prompts_file} --output-dir {output} --seed 10 {TINY} --max-new-tokens 24"
    assert generate(DEMO_MODEL_PATH, options, "--batch-size", "2") == 0
    assert streamed_prompts == [["Tell me a story.", "<image>\nWhat is this?"], ["<image> Tell me a story."]]
    ids = ["doc-00000", "doc-00001", "doc-00002"]
    assert sorted(p.name for p in (output / "records").iterdir()) == [f"{i}.json" for i in ids]
    assert not list(output.rglob(".*.tmp"))

    table = read_documents(output, tmp_path)
    assert table["id"] == ids and table["index"] == [0, 1, 2]
    assert table["seed"] == [10, 7, 12]  # --seed + index unless the line gives one
    assert table["name"] == ["story", None, None]  # other keys are copied; absent ones read as nulls
    assert table.column_names[: len(RECORD_KEYS)] == RECORD_KEYS
    for row in table:
        assert row["html"] == f"{row['id']}.html"
        assert (output / row["html"]).read_text().startswith("<!DOCTYPE html>")
        assert row["images"] == [f"{row['id']}_image_{k}.png" for k in range(len(row["images"]))]
        assert [s["path"] for s in row["segments"] if s["type"] == "image"] == row["images"]
        assert all(set(s) == {"type", "text", "path"} for s in row["segments"])
        assert (output / row["html"]).read_text().count("data:image/png") == len(row["images"])
        for name in row["images"]:
            with PIL.Image.open(output / name) as picture:
                assert picture.format == "PNG" and picture.size[0] > 0
        assert row["text"] == "\n".join(s["text"] for s in row["segments"] if s["type"] == "text")
        assert row["stop_reason"] in {"eos", "max_new_tokens", "max_images", "context_limit"}
    assert table["images"][0] == ["doc-00000_image_0.png"]  # the story has its picture

    before = snapshot(output)
    streamed_prompts.clear()
    generate(DEMO_MODEL_PATH, options)
    assert streamed_prompts == []  # nothing regenerated
    after = snapshot(output)
    assert {k: v for k, v in after.items() if k != "documents.jsonl"} == {
        k: v for k, v in before.items() if k != "documents.jsonl"
    }

    for name in ("doc-00000", "doc-00001"):
        (output / "records" / f"{name}.json").unlink()
    generate(DEMO_MODEL_PATH, options, "--batch-size", "1")
    assert streamed_prompts == [["Tell me a story."], ["<image>\nWhat is this?"]]  # only those without a record
    assert after["records/doc-00002.json"] == snapshot(output)["records/doc-00002.json"]
    again = read_documents(output, tmp_path)
    assert again["id"] == ids
    assert again["text"] == table["text"] and again["segments"] == table["segments"]  # alone as in a batch

    with pytest.raises(SystemExit, match="another prompt or seed"):  # the same folder for other seeds
        generate(DEMO_MODEL_PATH, options.replace("--seed 10", "--seed 11"))


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", ', "line 3: not valid JSON"),
        ({"text": "a"}, 'line 3: no "prompt"'),
        ({"prompt": "  "}, 'line 3: "prompt" must be a non-empty string'),
        ({"prompt": "a", "images": "red.png"}, 'line 3: "images" must be a list'),
        ({"prompt": "a", "images": ["gone.png"]}, "line 3: picture .* not found: gone.png"),
        ({"prompt": "a", "seed": "7"}, 'line 3: "seed" must be an integer'),
        ({"prompt": "a", "seed": 1.5}, 'line 3: "seed" must be an integer'),
        ({"prompt": "<image><image>", "images": ["red.png"]}, 'line 3: the prompt has 2 "<image>"'),
        ({"prompt": "a", "id": 3}, 'line 3: the key "id" is taken'),
    ],
)
def test_a_broken_line_stops_before_anything_is_written(saved_pipeline, tmp_path, line, message, streamed_prompts):
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "red.png")
    output = tmp_path / "out"
    (output / "records").mkdir(parents=True)
    (output / "records" / "doc-00000.json").write_text("{}\n")  # earlier outputs
    (output / "documents.jsonl").write_text("earlier\n")
    before = snapshot(output)
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b"}, line, {"prompt": "d"}])
    with pytest.raises(SystemExit, match=re.escape(str(prompts)) + " " + message):
        generate(saved_pipeline, f"--prompts {prompts} --output-dir {output} {TINY}")
    assert snapshot(output) == before and streamed_prompts == []


def test_bad_options_with_prompts(saved_pipeline, tmp_path):
    prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": "a"}])
    for options, message in [
        (f"--prompts {prompts} --output-dir {tmp_path} --mode image", "--mode image is not supported"),
        (f"--prompts {prompts}", "needs --output-dir"),
        (f"--prompts {prompts} --output-dir {tmp_path} --out x.html", "--out is for one prompt"),
        (f"--prompts {tmp_path / 'none.jsonl'} --output-dir {tmp_path}", "does not exist"),
        ("", "give a prompt"),
    ]:
        with pytest.raises(SystemExit, match=message):
            generate(saved_pipeline, options)
    assert not (tmp_path / "records").exists()


def test_a_saved_dataset_as_input(saved_pipeline, tmp_path):
    picture = PIL.Image.fromarray(np.full((20, 20, 3), 90, dtype=np.uint8))
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "blank.png")
    datasets.Dataset.from_list(
        [
            {"prompt": "What is this?", "images": [picture], "seed": 3, "source": "a"},
            {"prompt": "Say hello", "images": [], "seed": None, "source": "b"},
        ]
    ).save_to_disk(tmp_path / "dataset")
    output = tmp_path / "out"
    generate(saved_pipeline, f"--prompts {tmp_path / 'dataset'} --output-dir {output} --mode text {TINY}")
    table = read_documents(output, tmp_path)
    assert table["id"] == ["doc-00000", "doc-00001"] and table["source"] == ["a", "b"]
    assert table["seed"] == [3, 1] and table["images"] == [[], []]  # text mode draws nothing

    datasets.Dataset.from_list([{"prompt": "a", "images": ["blank.png", "gone.png"]}]).save_to_disk(tmp_path / "bad")
    with pytest.raises(SystemExit, match=r"bad row 0 \(doc-00000\): picture \"images\"\[1\] not found"):
        generate(saved_pipeline, f"--prompts {tmp_path / 'bad'} --output-dir {output} {TINY}")


def test_accelerate_launch_two_processes_share_the_documents(saved_pipeline, tmp_path, accelerate_launch):
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": f"Story number {i}"} for i in range(5)])
    output = tmp_path / "out"
    arguments = ["-m", "dreamllm_hf.cli", "generate", "--model", saved_pipeline, "--prompts", prompts]
    arguments += ["--output-dir", output, "--batch-size", 2, *TINY.split()]

    def launch() -> list[int]:
        run = accelerate_launch(29563, *arguments, cwd=tmp_path)
        written = re.findall(r"process (\d)/2: wrote (\d+) document", run.stderr)
        assert sorted(process for process, _ in written) == ["0", "1"], run.stderr[-3000:]
        return [int(count) for _, count in written]

    assert sum(launch()) == 5  # 3 + 2: every document once
    ids = [f"doc-{i:05d}" for i in range(5)]
    assert sorted(p.stem for p in (output / "records").glob("*.json")) == ids
    assert [json.loads(line)["id"] for line in (output / "documents.jsonl").read_text().splitlines()] == ids

    for name in ("doc-00001", "doc-00004"):
        (output / "records" / f"{name}.json").unlink()
    assert sorted(launch()) == [1, 1]  # only the two without a record
    assert [json.loads(line)["id"] for line in (output / "documents.jsonl").read_text().splitlines()] == ids
