"""The synthetic shapes world and its judge."""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from dreamllm_hf.shapes_world import (
    COLOURS,
    SHAPES,
    caption,
    classify_shape_image,
    draw_shape,
    sample_spec,
    sample_story,
)
from dreamllm_hf.shapes_world.data import pairs_dataset, stories_dataset, write_pairs_folder, write_stories_folder


def test_judge_names_every_colour_and_shape_of_the_generator():
    rng = random.Random(0)
    for colour in COLOURS:
        for shape in SHAPES:
            for _ in range(40):
                spec = sample_spec(rng, colour=colour, shape=shape)
                assert classify_shape_image(draw_shape(spec)) == (colour, shape), spec


def test_judge_survives_blur_and_noise():
    """Generated pictures are soft and noisy; the judge must still read clean intent."""
    rng, noise_rng = random.Random(1), np.random.default_rng(1)
    correct = 0
    for _ in range(300):
        spec = sample_spec(rng)
        image = draw_shape(spec).filter(ImageFilter.GaussianBlur(0.6))
        pixels = np.asarray(image, dtype=np.float32) + noise_rng.normal(0, 12, (32, 32, 3))
        correct += classify_shape_image(Image.fromarray(pixels.clip(0, 255).astype(np.uint8))) == (
            spec.colour,
            spec.shape,
        )
    assert correct / 300 >= 0.95


def test_judge_sees_nothing_in_a_blank_picture():
    assert classify_shape_image(Image.new("RGB", (32, 32), (255, 255, 255))) == (None, None)
    assert classify_shape_image(np.full((32, 32, 3), 0.5, dtype=np.float32)) == (None, None)


def test_stories_and_captions_name_their_pictures():
    rng = random.Random(2)
    story = sample_story(rng, 3)
    assert len(story) == 3
    for sentence, spec in story:
        assert spec.name in sentence
    assert caption(story[0][1]) == f"a {story[0][1].name}"
    with pytest.raises(ValueError):
        sample_story(rng, 0)


def test_datasets_and_folders(tmp_path):
    pairs = pairs_dataset(6, seed=3)
    assert len(pairs) == 6 and pairs[0]["text"] == f"a {pairs[0]['colour']} {pairs[0]['shape']}"
    assert classify_shape_image(pairs[0]["image"]) == (pairs[0]["colour"], pairs[0]["shape"])
    stories = stories_dataset(4, seed=3)
    assert all(len(row["images"]) == len(row["text_list"]) == len(row["image_info"]) for row in stories)

    pairs_dir = write_pairs_folder(tmp_path / "pairs", 5, seed=3)
    lines = (pairs_dir / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(
        (pairs_dir / __import__("json").loads(line)["file_name"]).is_file() for line in lines
    )
    stories_dir = write_stories_folder(tmp_path / "stories", 3, seed=3)
    assert len((stories_dir / "stories.jsonl").read_text().splitlines()) == 3


def test_demo_tokenizer_is_deterministic_and_llama_like(tmp_path):
    from dreamllm_hf import constants as C
    from dreamllm_hf.shapes_world.tokenizer import build_demo_tokenizer, train_sentencepiece

    assert train_sentencepiece() == train_sentencepiece()
    tokenizer = build_demo_tokenizer(tmp_path)
    vocab = tokenizer.get_vocab()
    first = vocab[C.PAD_TOKEN]
    assert [vocab[token] - first for token in C.RELEASE_ADDED_TOKEN_IDS] == [
        token_id - C.RELEASE_ADDED_TOKEN_IDS[C.PAD_TOKEN] for token_id in C.RELEASE_ADDED_TOKEN_IDS.values()
    ]
    ids = tokenizer("Then a  green square appeared.")["input_ids"]  # whitespace is kept, not folded
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Then a  green square appeared."
    assert tokenizer.decode(tokenizer("zebra 42")["input_ids"], skip_special_tokens=True) == "zebra 42"  # bytes


TOY_RECIPE = dict(
    num_pictures=64,
    num_stories=16,
    num_conversations=16,
    vae_steps=2,
    vae_batch_size=8,
    unet_steps=2,
    unet_batch_size=8,
    comprehension_steps=2,
    comprehension_batch_size=4,
    creation_steps=2,
    creation_batch_size=4,
    joint_steps=2,
    joint_batch_size=4,
    instruction_steps=2,
    instruction_batch_size=4,
    logging_steps=1,
    check_pictures=12,
    check_per_caption=1,
    check_steps=2,
    num_threads=1,
)


@pytest.fixture(scope="module")
def toy_demo(tmp_path_factory):
    """One `train_demo` run at toy step counts (one thread): its folder and its report."""
    from dreamllm_hf.shapes_world.demo_recipe import DemoRecipe
    from dreamllm_hf.shapes_world.demo_training import train_demo

    folder = tmp_path_factory.mktemp("toy-demo") / "demo"
    return folder, train_demo(folder, DemoRecipe(**TOY_RECIPE), log=lambda line: None)


def test_demo_recipe_runs_end_to_end_at_toy_step_counts(toy_demo):
    """Every stage of `train-demo` for a few steps on a few pictures: the code path, not the quality. Stages I to III
    run through the one trainer, each stage's pipeline folder the next one's model."""
    import json

    from dreamllm_hf.pipelines import DreamLLMPipeline, DreamLLMText2ImagePipeline

    folder, report = toy_demo
    assert set(report["timings_s"]) >= {
        "stage 0a autoencoder",
        "stage 0b diffusion decoder",
        "stage I comprehension",
        "stage I creation",
        "stage II joint",
        "stage III instruction",
    }
    stages = {stage["name"]: stage["arguments"] for stage in report["stages"]}
    assert stages["I-comprehension"]["stage"] == "alignment" and stages["III-instruction"]["stage"] == "instruction"
    assert stages["II-joint"]["data"] == ["stories", "pairs"] and stages["II-joint"]["data_weights"] == [0.75, 0.25]
    steps = [(record["stage"], record["step"]) for record in report["history"] if "step" in record]
    for name in ("I-comprehension", "I-creation", "II-joint", "III-instruction"):
        assert [step for stage, step in steps if stage == name] == [1, 2], name
    assert {record["stage"] for record in report["history"] if "check" in record} >= set(stages)
    assert json.loads((folder / "training_report.json").read_text())["recipe"]["joint_steps"] == 2
    assert not (folder / ".work").exists()
    assert not (folder / "train_log.jsonl").exists()  # the stages' logs are in the report
    config = json.loads((folder / "mllm" / "config.json").read_text())
    assert "_name_or_path" not in config and "dtype" not in config["text_config"]
    pipe = DreamLLMText2ImagePipeline.from_pipe(DreamLLMPipeline.from_pretrained(folder))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2).images[0]
    assert image.size == (32, 32)
    assert report["world"] == "shapes"  # the default recipe is the shipped model's


def test_demo_runs_are_deterministic_and_stage3_continues_a_stage2_model(toy_demo, tmp_path):
    """Same seed and thread count, same run: a run through stage II, then `continue_demo_training`, gives the very
    weights of the whole run; a model that went through stage III is refused."""
    import dataclasses
    import json

    from safetensors.torch import load_file

    from dreamllm_hf.shapes_world.demo_recipe import DemoRecipe
    from dreamllm_hf.shapes_world.demo_training import continue_demo_training, train_demo

    folder, _ = toy_demo
    recipe = DemoRecipe(**TOY_RECIPE)
    with pytest.raises(ValueError, match="already went through stage III"):
        continue_demo_training(folder, tmp_path / "again", recipe, log=lambda line: None)
    train_demo(tmp_path / "until-2", dataclasses.replace(recipe, instruction_steps=0), log=lambda line: None)
    report = continue_demo_training(tmp_path / "until-2", tmp_path / "continued", recipe, log=lambda line: None)
    assert report["timings_s"]["stage III instruction"] > 0
    whole = load_file(folder / "mllm" / "model.safetensors")
    continued = load_file(tmp_path / "continued" / "mllm" / "model.safetensors")
    assert whole.keys() == continued.keys() and all(torch.equal(whole[key], continued[key]) for key in whole)
    assert json.loads((folder / "mllm" / "config.json").read_text()) == json.loads(
        (tmp_path / "continued" / "mllm" / "config.json").read_text()
    )


@pytest.mark.parametrize("backbone", ["llama-clip", "qwen2-siglip"])
def test_demo_backbones_build_tiny_models_of_transformers_classes(tmp_path, backbone):
    """`--backbone`: LLaMA + CLIP or Qwen2 + SigLIP, of the same sizes; the processor expands a picture into as many
    slots as the model reads features, and one training step of the model runs."""
    from dreamllm_hf.shapes_world.demo_recipe import DEMO_BACKBONES
    from dreamllm_hf.shapes_world.tokenizer import build_demo_tokenizer

    assert set(DEMO_BACKBONES) == {"llama-clip", "qwen2-siglip"}
    config = check_demo_backbone(build_demo_tokenizer(tmp_path), backbone, draw_shape(sample_spec(random.Random(0))))
    # the first world: 3 x 64 on 32 px, patch 4
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size) == (64, 3, 32)


def check_demo_backbone(tokenizer, backbone: str, picture, world=None):
    """The demo config of `backbone` in `world` (default: the first) is of transformers' classes, with the LLM's
    sizes and 64 image tokens; a picture fills as many slots as the model reads features, and a training step runs.
    Returns the config."""
    from dreamllm_hf.modeling import DreamLLMForConditionalGeneration
    from dreamllm_hf.shapes_world.demo_recipe import demo_mllm_config, demo_processor
    from dreamllm_hf.shapes_world.demo_worlds import FIRST_WORLD

    world = world or FIRST_WORLD
    config = demo_mllm_config(tokenizer, backbone, world)
    text_type, vision_type = {
        "llama-clip": ("llama", "clip_vision_model"),
        "qwen2-siglip": ("qwen2", "siglip_vision_model"),
    }[backbone]
    assert (config.text_config.model_type, config.vision_config.model_type) == (text_type, vision_type)
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (128, 4)
    assert config.num_image_tokens == 64
    processor = demo_processor(tokenizer, backbone, config.num_image_tokens, world)
    torch.manual_seed(0)
    model = DreamLLMForConditionalGeneration(config)
    inputs = processor(text=["<image> a picture"], images=[picture], return_tensors="pt")
    features = model.get_image_features(inputs["pixel_values"]).pooler_output
    assert features.shape[1] == processor.num_image_tokens
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    return config


def test_train_demo_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    from dreamllm_hf.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty.*--overwrite"):
        main(["train-demo", "--output", str(tmp_path)])
    assert (tmp_path / "notes.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(SystemExit, match="`backbone` must be one of \\['llama-clip', 'qwen2-siglip'\\], got 'gpt'"):
        main(["train-demo", "--output", str(tmp_path / "new"), "--backbone", "gpt"])
    recipe = tmp_path / "recipe.json"
    recipe.write_text('{"joint_steps": 2, "world": "scenes"}')
    with pytest.raises(SystemExit, match=r"--recipe .* sets \['world'\], which DemoRecipe lacks; its fields are"):
        main(["train-demo", "--output", str(tmp_path / "new"), "--recipe", str(recipe)])
    # The version-2 world is a research project with its own command, not an option of the product's.
    with pytest.raises(SystemExit) as exit_info:
        main(["train-demo", "--output", str(tmp_path / "new"), "--world", "scenes"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --world" in capsys.readouterr().err


class _StubPipe:
    """
    Answers like the pipelines: `answer(prompt, images)` decides a text answer (`allow_images=False`), `draw(text)` a
    text-to-image picture (a stub given `draw` stands for `DreamLLMText2ImagePipeline`), `story(prompt)` a document.
    """

    def __init__(self, answer=None, draw=None, story=None):
        self.answer, self.draw, self.story = answer, draw, story
        self.calls = []

    def __call__(self, prompt, image=None, allow_images=True, **kwargs):
        from types import SimpleNamespace

        assert "generation_mode" not in kwargs
        prompts = [prompt] if isinstance(prompt, str) else prompt
        self.calls.append(dict(prompts=prompts, allow_images=allow_images, **kwargs))
        if not allow_images:
            return SimpleNamespace(text=[self.answer(p, i) for p, i in zip(prompts, image)])
        if self.draw is not None:
            return SimpleNamespace(images=[self.draw(p) for p in prompts])
        return SimpleNamespace(documents=[self.story(p) for p in prompts], stop_reasons=["eos"] * len(prompts))


def _picture(colour, shape):
    return draw_shape(sample_spec(random.Random(1), colour=colour, shape=shape))


def test_evaluation_figures_follow_what_the_model_says_and_draws():
    from dreamllm_hf.shapes_world.evaluation import (
        DemoEvaluationSettings,
        caption_accuracy,
        interleaved_match,
        t2i_accuracy,
    )

    settings = DemoEvaluationSettings(num_caption_pictures=24, t2i_per_caption=1, num_stories=2)
    seeing = _StubPipe(answer=lambda prompt, images: "a {} {}".format(*classify_shape_image(images[0])))
    figures = caption_accuracy(seeing, settings)
    assert figures["caption_accuracy"] == figures["chat_caption_accuracy"] == 1.0
    always_red_circle = _StubPipe(answer=lambda prompt, images: "a red circle.")
    figures = caption_accuracy(always_red_circle, settings)
    assert figures["caption_accuracy"] < 0.5 and figures["chat_caption_accuracy"] < 0.5
    # Only the chat prompts are answered right: the two figures are measured apart.
    chat_only = _StubPipe(
        answer=lambda prompt, images: (
            "a {} {}".format(*classify_shape_image(images[0])) if not isinstance(prompt, str) else "a red circle."
        )
    )
    figures = caption_accuracy(chat_only, settings)
    assert figures["chat_caption_accuracy"] == 1.0 and figures["caption_accuracy"] < 0.5

    drawing = _StubPipe(draw=lambda text: _picture(*text.split()[1:]))
    assert t2i_accuracy(drawing, settings)["t2i_accuracy"] == 1.0
    drawing_circles = _StubPipe(draw=lambda text: _picture(text.split()[1], "circle"))
    assert t2i_accuracy(drawing_circles, settings)["t2i_accuracy"] == pytest.approx(1 / 3)

    # A picture counts when it matches the sentence just before it; after a sentence naming no shape it is a miss.
    story = _StubPipe(
        story=lambda prompt: [
            "First there was a red circle.",
            _picture("red", "circle"),
            "Then a blue square appeared.",
            _picture("green", "square"),
            "The end.",
            _picture("blue", "triangle"),
        ]
    )
    figures = interleaved_match(story, settings)
    assert figures["interleaved_pictures"] == 6 and figures["interleaved_match"] == pytest.approx(1 / 3)
    # All stories in one call, each sampled and drawn from its own generator.
    (call,) = story.calls
    assert len(call["prompts"]) == settings.num_stories and call["do_sample"]
    seeds = [generator.initial_seed() for generator in call["generator"]]
    assert seeds == [settings.seed * 10_000 + i for i in range(settings.num_stories)]


def test_the_training_checks_score_with_the_evaluation_metrics(monkeypatch):
    """One metric per world: the first world's checks judge by the colour and the shape named, with the first
    evaluation's metrics, on decoded tensors and pictures alike."""
    from dreamllm_hf.shapes_world import evaluation
    from dreamllm_hf.shapes_world.demo_checks import pictures_tensor, share_shown
    from dreamllm_hf.shapes_world.demo_worlds import FIRST_WORLD as first

    assert len(first.check_captions(4)) == 12  # the world's every caption
    assert first.caption_right("A Red circle.", "a red circle")
    assert first.caption_right("a circle that is red", "a red circle")
    assert not first.caption_right("a red square", "a red circle")
    assert first.drawing_right(_picture("blue", "triangle"), "a blue triangle")
    assert not first.drawing_right(_picture("blue", "triangle"), "a blue square")
    assert not first.drawing_right(Image.new("RGB", (32, 32), (255, 255, 255)), "a white picture")
    pictures = [_picture("blue", "triangle"), _picture("red", "circle")]
    captions = ["a blue triangle", "a red square"]
    assert share_shown(pictures, captions) == 0.5
    assert share_shown(pictures_tensor({"image": pictures}), captions) == 0.5  # [-1, 1] tensors, as a VAE decodes
    judged = []
    monkeypatch.setattr(evaluation, "caption_is_right", lambda caption, *want: judged.append(want) or False)
    assert not first.caption_right("a red circle", "a blue square") and judged[-1] == ("blue", "square")


def test_the_checks_draw_through_the_text_to_image_pipeline(monkeypatch):
    """The recipe's drawing checks call `DreamLLMText2ImagePipeline` (no denoising loop of their own): from the dream
    path's captions, and, with no language model, from a stand-in encoder's `prompt_embeds` against the empty
    caption's; on the shipped model the dream check reads its known quality."""
    from dreamllm_hf.pipelines import DreamLLMPipeline, DreamLLMText2ImagePipeline
    from dreamllm_hf.shapes_world.demo_checks import dream_drawing_accuracy, stand_in_drawing_checks
    from dreamllm_hf.shapes_world.demo_decoder import StandInCaptionEncoder
    from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH
    from dreamllm_hf.shapes_world.demo_recipe import DemoRecipe

    calls = []
    call = DreamLLMText2ImagePipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append(dict(kwargs, has_mllm=self.mllm is not None))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(DreamLLMText2ImagePipeline, "__call__", spy)
    pipe = DreamLLMPipeline.from_pretrained(DEMO_MODEL_PATH)
    assert dream_drawing_accuracy(pipe, per_caption=1, num_inference_steps=25) >= 0.75  # 0.958 in its card
    (dream,) = calls
    assert len(dream["prompt"]) == 12 and dream["guidance_scale"] == 2.0 and dream["num_inference_steps"] == 25
    assert dream["has_mllm"]
    tokenizer = pipe.tokenizer
    torch.manual_seed(0)
    encoder = StandInCaptionEncoder(len(tokenizer), 8, 64, tokenizer.pad_token_id)
    recipe = DemoRecipe(check_per_caption=1, check_steps=2)
    records = stand_in_drawing_checks(pipe.unet, pipe.vae, encoder, tokenizer, recipe)
    assert [record["check"] for record in records] == ["stand_in_t2i_accuracy@2", "stand_in_t2i_accuracy@4"]
    assert all(0.0 <= record["value"] <= 1.0 for record in records)
    for stand_in, scale in zip(calls[1:], (2.0, 4.0)):
        assert "prompt" not in stand_in and not stand_in["has_mllm"] and stand_in["guidance_scale"] == scale
        assert stand_in["prompt_embeds"].shape == (12, 8, 64) and stand_in["negative_prompt_embeds"].shape == (
            1,
            8,
            64,
        )
