"""The version-2 world as a world of the package's demo recipe (`examples/research_projects/shapes_world_v2/`): its
sizes, checks, recipe, comprehension-only control and its own command line."""

import json
import random

import pytest
import torch
from shapes_world_v2.__main__ import main as research_main
from shapes_world_v2.scene_world import (
    SCENE_RECIPE_DEFAULTS,
    SCENE_WORLD,
    comprehension_only_stages,
    scene_recipe,
    scene_world_texts,
)
from shapes_world_v2.scenes import draw_scene, parse_caption, sample_scene
from test_shapes_world import check_demo_backbone

from dreamllm_hf.shapes_world.demo_recipe import DemoRecipe
from dreamllm_hf.shapes_world.demo_stages import demo_stage_configs


DATA = {"pairs": "/data/pairs", "stories": "/data/stories/stories.jsonl", "conversations": "/data/c/c.jsonl"}


@pytest.mark.parametrize("backbone", ["llama-clip", "qwen2-siglip"])
def test_the_world_sizes_the_demo_backbones(tmp_path, backbone):
    """6 x 128 on 64 px, patch 8: 64 image tokens, as in the first world."""
    from dreamllm_hf.shapes_world.tokenizer import build_demo_tokenizer

    tokenizer = build_demo_tokenizer(tmp_path)
    config = check_demo_backbone(tokenizer, backbone, draw_scene(sample_scene(random.Random(0))), SCENE_WORLD)
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size) == (128, 6, 64)


def test_the_checks_judge_the_scenes_their_captions_say(monkeypatch):
    """The recipe's checks call the world's judge, whatever it decides, on the scenes their captions say."""
    from shapes_world_v2 import scene_judge

    from dreamllm_hf.shapes_world.demo_checks import share_shown

    captions = SCENE_WORLD.check_captions(4)
    assert len(set(captions)) > 1 and all(parse_caption(caption) is not None for caption in captions)
    assert captions == SCENE_WORLD.check_captions(4)  # held out and fixed
    judged = []
    monkeypatch.setattr(scene_judge, "drawing_shows", lambda picture, scene: judged.append(scene) or True)
    assert share_shown(torch.zeros(2, 3, 64, 64), captions[:2], SCENE_WORLD) == 1.0
    assert judged == [parse_caption(caption) for caption in captions[:2]]
    assert SCENE_WORLD.caption_right(captions[0], captions[0]) and not SCENE_WORLD.caption_right("a cat", captions[0])


def test_the_recipe_is_the_packages_with_the_worlds_defaults():
    recipe = scene_recipe(seed=3)
    assert recipe.seed == 3 and all(getattr(recipe, key) == value for key, value in SCENE_RECIPE_DEFAULTS.items())
    assert DemoRecipe().comprehension_steps != recipe.comprehension_steps  # the shipped model's recipe is another
    texts = scene_world_texts()
    assert texts == sorted(set(texts)) and "Tell me a story." in texts and "a small red circle" in texts


def test_the_comprehension_only_control_keeps_the_updates_and_drops_creation():
    """The synergy study's control: the same stages, steps, batch sizes, learning rates and seeds as the recipe, every
    one on picture -> text with no diffusion loss and no stories."""
    from dataclasses import replace

    recipe = scene_recipe()
    joint = demo_stage_configs(recipe, DATA)
    alone = comprehension_only_stages(recipe, DATA)
    assert [stage.name for stage in alone] == [stage.name for stage in joint]
    fields = ("max_steps", "per_device_batch_size", "learning_rate", "seed")
    for a, j in zip(alone, joint):
        assert {k: a.arguments[k] for k in fields} == {k: j.arguments[k] for k in fields}, a.name
        assert a.arguments["loss_weight_vm"] == 0 and a.arguments["i2t_probability"] == 1.0, a.name
        assert DATA["stories"] not in a.arguments["data"], a.name
    assert any(stage.arguments["loss_weight_vm"] > 0 for stage in joint)
    reading = replace(SCENE_WORLD, creation=False).conversation_sampler()
    for seed in range(40):
        for message in reading(random.Random(seed)):
            if message["role"] == "assistant":
                assert isinstance(message["content"], str)  # an answer in words, never pictures out


def test_the_research_command_line_and_the_products_refuse_each_others_models(tmp_path, capsys):
    """`python -m shapes_world_v2 evaluate` measures models of its world only, `dreamllm-hf evaluate-demo` those of
    the shipped world only; each names the other command."""
    from dreamllm_hf.cli import main
    from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH

    with pytest.raises(SystemExit) as exit_info:
        research_main(["evaluate", "--model", str(DEMO_MODEL_PATH)])
    assert exit_info.value.code == 2 and "dreamllm-hf evaluate-demo" in capsys.readouterr().err
    scenes_model = tmp_path / "scenes-model"
    scenes_model.mkdir()
    (scenes_model / "training_report.json").write_text(json.dumps({"world": "scenes"}))
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate-demo", "--model", str(scenes_model)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "python -m shapes_world_v2 evaluate" in error
    (tmp_path / "out" / "notes.txt").parent.mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="train: the output folder .* is not empty"):
        research_main(["train", "--output", str(tmp_path / "out")])
