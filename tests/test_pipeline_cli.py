"""`dreamllm-hf generate` on the tiny converted checkpoint, through its own argparse sub-command."""

import argparse
import random

import numpy as np
import PIL.Image
import pytest
import torch

from dreamllm_hf.pipelines import DreamLLMText2ImagePipeline
from dreamllm_hf.pipelines.cli import add_generate_parser
from dreamllm_hf.shapes_world import draw_shape, sample_spec
from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH


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


def test_an_edit_of_a_picture_is_the_text_to_image_pipelines_edit(tmp_path, capsys):
    """`--mode image --image PATH "Make it blue."` on the demo model: the picture is read where `<image>` goes, before
    the instruction, as `DreamLLMText2ImagePipeline` reads a caption (no chat template); `--out .png` saves it."""
    red = draw_shape(sample_spec(random.Random(1), colour="red", shape="circle"))
    red.save(tmp_path / "red.png")
    options = "--mode image --steps 3 --guidance-scale 2 --seed 5"
    assert (
        run(DEMO_MODEL_PATH, "Make it blue.", f"{options} --image {tmp_path / 'red.png'}", tmp_path / "blue.png") == 0
    )
    assert "stopped: image" in capsys.readouterr().err
    with PIL.Image.open(tmp_path / "blue.png") as saved:
        assert saved.format == "PNG"
        edited = np.asarray(saved.convert("RGB"), dtype=np.int16)

    pipe = DreamLLMText2ImagePipeline.from_pretrained(DEMO_MODEL_PATH, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        prompt="<image>Make it blue.",
        image=[red],
        num_inference_steps=3,
        guidance_scale=2.0,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    assert np.abs(edited - np.asarray(expected, dtype=np.int16)).max() <= 1  # 8-bit rounding of the saved PNG

    # The picture is read: the same command without it draws another picture.
    run(DEMO_MODEL_PATH, "Make it blue.", options, tmp_path / "plain.png")
    with PIL.Image.open(tmp_path / "plain.png") as plain:
        assert np.abs(edited - np.asarray(plain.convert("RGB"), dtype=np.int16)).max() > 16

    # As a document too, and a prompt whose placeholders do not match the pictures is refused before the model loads.
    run(DEMO_MODEL_PATH, "Make it blue.", f"{options} --image {tmp_path / 'red.png'}", tmp_path / "blue.html")
    assert (tmp_path / "blue.html").read_text().count("data:image/png;base64,") == 1
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "<image><image>Make it blue.", f"{options} --image {tmp_path / 'red.png'}", tmp_path / "x.png")
    assert exit_info.value.code == 2
    assert "`prompt` has 2 <image> for 1 picture(s)" in capsys.readouterr().err


def test_bad_arguments_exit_with_a_message(saved_pipeline, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--out must end in .html or .md"):
        run(saved_pipeline, "x", "", tmp_path / "x.txt")
    with pytest.raises(SystemExit, match=r"\(or .png with --mode image\), got x.png"):  # a document is not a picture
        run(saved_pipeline, "x", "--mode text", tmp_path / "x.png")
    with pytest.raises(SystemExit) as exit_info:  # a size the model refuses: argparse's error, before it loads
        run(saved_pipeline, "x", "--mode image --height 15", tmp_path / "x.html")
    assert exit_info.value.code == 2
    assert "argument --height: must be a multiple of 2 for this model" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="model_index.json"):
        run(tmp_path, "x", "", tmp_path / "x.html")
