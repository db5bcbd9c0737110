"""The version-2 world as a world of the package's demo recipe (`dreamllm_hf.shapes_world.demo_worlds.DemoWorld`):
its sizes, data, tokenizer texts, checks, and what its model card says, plus its recipe and the recipe's
comprehension-only control (the synergy study's other arm).

`train_scene_demo(output_dir)` trains a model of this world with the package's one recipe (`train_demo`), its own
defaults (`SCENE_RECIPE_DEFAULTS`) applied: a 6-layer vision tower on 64x64, about 47 minutes on two cores.
"""

import random
from dataclasses import dataclass, replace
from pathlib import Path

from dreamllm_hf.shapes_world.demo_recipe import DemoRecipe
from dreamllm_hf.shapes_world.demo_stages import DemoStage, demo_stage_configs, trainer_settings
from dreamllm_hf.shapes_world.demo_training import train_demo
from dreamllm_hf.shapes_world.demo_worlds import CHECK_SEED, DemoWorld
from dreamllm_hf.shapes_world.tokenizer import prompt_texts


@dataclass(frozen=True)
class SceneWorld(DemoWorld):
    """The version-2 world. `creation=False`: the world of the comprehension-only control, whose conversations hold
    pictures in only (no stories to illustrate)."""

    creation: bool = True

    def pairs(self, num_samples, seed):
        from .scene_data import scene_pairs_dataset

        return scene_pairs_dataset(num_samples, seed=seed)

    def tokenizer_texts(self):
        return scene_world_texts()

    def story_sampler(self):
        from .scene_data import illustrated_scene_story

        return illustrated_scene_story

    def conversation_sampler(self):
        from .scene_data import sample_reading_conversation, sample_scene_conversation

        return sample_scene_conversation if self.creation else sample_reading_conversation

    def check_captions(self, count):
        from .scenes import sample_scene

        rng = random.Random(CHECK_SEED)
        return [sample_scene(rng).scene.caption() for _ in range(count)]

    def caption_right(self, answer, truth):
        from .scenes import captions_agree, parse_caption

        return captions_agree(answer, parse_caption(truth))

    def drawing_right(self, picture, caption):
        from .scene_judge import drawing_shows
        from .scenes import parse_caption

        return drawing_shows(picture, parse_caption(caption))

    def card_texts(self):
        return dict(SCENE_CARD_TEXTS)

    def evaluation_table(self, evaluation):
        return scene_evaluation_table(evaluation)


def scene_world_texts() -> list[str]:
    """The tokenizer's texts: the world's sentences, questions and answers, plus the prompts (sorted)."""
    from .scenes import world_v2_texts

    return sorted(set(world_v2_texts()) | prompt_texts())


SCENE_WORLD = SceneWorld(
    name="scenes",
    image_size=64,
    patch_size=8,  # 8x8 = 64 image tokens
    # deeper than the first world's: two things, their sizes and where they stand (3 x 64 captioned 0.40 exactly
    # after 700 steps, 4 x 128 0.60 after 1500)
    vision_sizes=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4),
    vae_blocks=(16, 16, 32, 32),  # 64x64x3 <-> 4x8x8, Stable Diffusion's factor of 8
    unet_blocks=(64, 128),
    stand_in_length=16,
    max_length=1024,
    max_caption_tokens=24,
)

# The `DemoRecipe` fields whose defaults differ from the shipped model's recipe.
SCENE_RECIPE_DEFAULTS = dict(
    num_pictures=8192,
    story_pictures=(3, 4),
    vae_steps=600,
    unet_steps=2000,
    stand_in_layers=2,
    comprehension_steps=2500,
    creation_steps=400,
    creation_i2t_probability=0.5,  # half the creation pairs stay captions: creation alone unlearns reading
    joint_steps=600,
    instruction_steps=500,
    instruction_threads=None,
)


def scene_recipe(**fields) -> DemoRecipe:
    """The recipe of this world: `SCENE_RECIPE_DEFAULTS`, then `fields`."""
    return DemoRecipe(**{**SCENE_RECIPE_DEFAULTS, **fields})


def comprehension_only_stages(recipe: DemoRecipe, data: dict[str, str], cache_dir: str | None = None) -> list:
    """The recipe's stages with their creation removed, the synergy study's control: the same steps, batch sizes,
    learning rates and seeds, all on picture -> text (pairs as captions; stage III's conversations hold no stories,
    as `SceneWorld(creation=False)` writes them)."""
    reading = dict(
        language_model="full",
        vision_tower="full",
        train_condition_projector=False,
        train_dream_queries=False,
        i2t_probability=1.0,
        loss_weight_lm=1.0,
        loss_weight_vm=0.0,
    )
    plan = (
        ("I-comprehension", "stage I comprehension", "alignment", [data["pairs"]], None, "comprehension", 3),
        ("I-creation", "stage I creation", "alignment", [data["pairs"]], None, "creation", 4),
        ("II-joint", "stage II joint", "pretraining", [data["pairs"]], None, "joint", 5),
        (
            "III-instruction",
            "stage III instruction",
            "instruction",
            [data["conversations"], data["pairs"]],
            [recipe.instruction_conversation_fraction, 1.0 - recipe.instruction_conversation_fraction],
            "instruction",
            8,
        ),
    )
    stages = []
    for name, timing, stage, sources, weights, prefix, seed_offset in plan:
        arguments = dict(stage=stage, data=sources, **reading)
        if weights:
            arguments["data_weights"] = weights
        steps, batch_size, lr = (getattr(recipe, f"{prefix}_{field}") for field in ("steps", "batch_size", "lr"))
        arguments.update(trainer_settings(recipe, steps, batch_size, lr, recipe.seed + seed_offset, cache_dir))
        threads = recipe.instruction_threads if prefix == "instruction" else None
        stages.append(DemoStage(name, timing, arguments, threads=threads))
    return [stage for stage in stages if stage.arguments["max_steps"] > 0]


def train_scene_demo(
    output_dir: str | Path,
    recipe: DemoRecipe | None = None,
    creation: bool = True,
    log=print,
    reuse_decoder: str | Path | None = None,
) -> dict:
    """A model of this world, by the package's `train_demo` (`recipe`: default `scene_recipe()`); `creation=False`
    trains the comprehension-only control instead. Returns the training report."""
    return train_demo(
        output_dir,
        recipe or scene_recipe(),
        log=log,
        reuse_decoder=reuse_decoder,
        world=SCENE_WORLD if creation else replace(SCENE_WORLD, creation=False),
        stage_configs=demo_stage_configs if creation else comprehension_only_stages,
    )


# What the demo card says of this world ("{size}": the picture size).
SCENE_CARD_TEXTS = dict(
    world_intro=(
        "It lives in a synthetic world of {size}x{size}\npictures of one or two shapes (small or big; red, green, "
        "blue or yellow; circle, square or triangle) and\nwhere they stand (left of, right of, above, below), and "
        "it does what DreamLLM does: it **captions** pictures\nand **answers questions** about them, **draws** a "
        "caption, and **writes illustrated stories** in which each picture\nis the previous one changed as its "
        "sentence says, deciding by itself where a picture goes (`<dream_start>`),\ndrawing it from its dream "
        "queries and reading it back through its vision tower."
    ),
    knows="it knows the world's captions, questions and story\nsentences and nothing else.",
    draw_example="a small red circle left of a big blue square",
    ask_example="What colour is the square?",
    story_tokens=96,
    chat_note="stage III, see `chat_caption_accuracy`",
    prompts=(
        'questions of the world ("How many circles are there?", "Is the\ntriangle big?", "What colour is the '
        'shape left of the square?") take a picture in a chat and get one word;\ndrawing takes a caption (`a '
        "<size> <colour> <shape>`, optionally followed by `<relation> a <size> <colour> <shape>`)"
    ),
    answered="answered in one\nword, or by its caption when it asks for one",
    judge="scene_judge.read_scene",
    recipe_notes=(
        "The recipe's measured runs in this world, what limits them and the synergy study are in\n"
        "`examples/research_projects/shapes_world_v2/README.md`."
    ),
    limits=(
        "* A toy: the world's captions, questions and story sentences, {size}x{size} pictures; no knowledge of "
        "anything\n  else.\n* Stories are short (three or four pictures, as in its training data) and their "
        "sentences follow a few\n  templates."
    ),
)


def scene_evaluation_table(evaluation: dict) -> str:
    """The figures of `scene_evaluation.evaluate_pipeline` as the card's table."""
    settings = evaluation.get("settings", {})
    kinds = ", ".join(f"{kind} {value:.2f}" for kind, value in evaluation["question_accuracy_by_kind"].items())
    return (
        "| figure | value | goal | what |\n| --- | --- | --- | --- |\n"
        f"| `caption_accuracy` | {evaluation['caption_accuracy']:.3f} | 0.80 | "
        f"{settings.get('num_caption_pictures', '?')} held-out pictures, greedy, everything the caption says right "
        "(every size, colour, shape and the relation) |\n"
        f"| `question_accuracy` | {evaluation['question_accuracy']:.3f} | 0.85 | "
        f"{settings.get('num_questions', '?')} held-out pictures, one question each in a chat, greedy, the one-word "
        f"answer right (by kind: {kinds}) |\n"
        f"| `t2i_accuracy` | {evaluation['t2i_accuracy']:.3f} | 0.60 | {settings.get('num_t2i_scenes', '?')} "
        f"captions of held-out scenes x {settings.get('t2i_per_scene', '?')} seeds, every thing and the relation read "
        f"right by the judge (things alone: {evaluation['t2i_attribute_accuracy']:.3f}) |\n"
        f"| `interleaved_match` | {evaluation['interleaved_match']:.3f} | 0.60 | "
        f"{evaluation.get('interleaved_pictures', '?')} pictures in {settings.get('num_stories', '?')} sampled stories "
        "that show the scene their story's sentences reached |\n"
        f"| `chat_caption_accuracy` | {evaluation['chat_caption_accuracy']:.3f} | - | the caption pictures asked "
        'about in a chat ("What is in the picture?" / "Describe the picture.") |\n\n'
        f"Settings: {settings.get('num_inference_steps', '?')} DDIM steps, guidance scale "
        f"{settings.get('guidance_scale', '?')}, seed {settings.get('seed', '?')}."
    )


__all__ = [
    "SCENE_CARD_TEXTS",
    "SCENE_RECIPE_DEFAULTS",
    "SCENE_WORLD",
    "SceneWorld",
    "comprehension_only_stages",
    "scene_evaluation_table",
    "scene_recipe",
    "scene_world_texts",
    "train_scene_demo",
]
