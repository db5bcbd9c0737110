"""`dreamllm-hf generate` on the tiny converted checkpoint, through its own argparse sub-command."""

import argparse

import numpy as np
import PIL.Image
import pytest

from dreamllm_hf.pipelines.cli import add_generate_parser


def run(model, prompt, options, out):
    parser = argparse.ArgumentParser(prog="dreamllm-hf")
    add_generate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["generate", "--model", str(model), prompt, *options.split(), "--out", str(out)])
    return args.func(args)


def test_generate_a_picture_to_html(saved_pipeline, tmp_path, capsys):
    out = tmp_path / "bird.html"
    assert run(saved_pipeline, "a red bird", "--mode image --steps 2 --seed 3", out) == 0
    assert out.read_text().count("data:image/png;base64,") == 1
    assert "stopped: image" in capsys.readouterr().err


def test_answer_about_a_picture_to_markdown(saved_pipeline, tmp_path):
    image_path = tmp_path / "in.png"
    PIL.Image.fromarray(np.full((20, 20, 3), 200, dtype=np.uint8)).save(image_path)
    out = tmp_path / "answer.md"
    run(saved_pipeline, "What is this?", f"--image {image_path} --mode text --max-new-tokens 4", out)
    assert out.read_text().strip()


def test_interleaved_document_runs(saved_pipeline, tmp_path):
    out = tmp_path / "story.html"
    run(saved_pipeline, "Tell a story", "--steps 2 --max-new-tokens 5 --temperature 0.7", out)
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_bad_arguments_exit_with_a_message(saved_pipeline, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--out must end in .html or .md"):
        run(saved_pipeline, "x", "", tmp_path / "x.txt")
    with pytest.raises(SystemExit) as exit_info:  # a size the model refuses: argparse's error, before it loads
        run(saved_pipeline, "x", "--mode image --height 15", tmp_path / "x.html")
    assert exit_info.value.code == 2
    assert "argument --height: must be a multiple of 2 for this model" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="model_index.json"):
        run(tmp_path, "x", "", tmp_path / "x.html")
