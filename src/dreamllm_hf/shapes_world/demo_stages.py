"""Stages I to III of the demo recipe: configurations of the one trainer (`dreamllm_hf.training.train`, what
`dreamllm-hf train` runs), on data the world writes in the layouts it reads (a Parquet shard of pairs, MMC4 JSON Lines
of stories, JSON Lines of conversations). Each stage's output folder is the next one's model.

**Stage I, alignment, UNet and VAE frozen,** in the paper's two halves: *comprehension* (image -> caption pairs, LM
loss; the vision tower, the image projector and the LLM train, because nothing here is pretrained), then *creation*
(caption -> image pairs, diffusion loss through the frozen UNet into the condition projector, the dream queries and
the LLM), a share of the captions dropped (`caption_dropout`: `<s>` + dream block is what classifier-free guidance
reads as its unconditional, so it must mean "any picture"). **Stage II, I-GPT:** illustrated stories (each the answer
to a story instruction, whose chat prompt is not learned) and pairs both ways, three batches of stories to one of
pairs, `lm + 10 x diffusion`, the vision tower frozen as in the paper. **Stage III, instruction tuning:** conversations
whose turns hold pictures in (a question about a picture, answered in a word, or a caption asked for) and out (a story
the assistant illustrates), tokenized exactly as the pipeline reads a conversation, mixed with pairs.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import write_conversations_folder, write_stories_folder
from .demo_checks import stage_checks
from .demo_recipe import DemoRecipe
from .demo_worlds import FIRST_WORLD, DemoWorld
from .tokenizer import STORY_INSTRUCTIONS


DEMO_DATA = ("pairs", "stories", "conversations")  # the folders `write_demo_data` writes


def write_demo_data(
    data_dir: str | Path,
    recipe: DemoRecipe,
    kinds: tuple[str, ...] = DEMO_DATA,
    pairs=None,
    world: DemoWorld = FIRST_WORLD,
) -> dict[str, str]:
    """The world's data in layouts `dreamllm-hf train` reads: `pairs/` (a Parquet shard, the pictures embedded: the
    same pairs as stage 0's, `pairs` when given), `stories/stories.jsonl` (MMC4, each story the answer to a story
    instruction) and `conversations/conversations.jsonl`. Returns the data path of each kind."""
    from ..training.data import source_from_dataset, write_parquet_shards

    data_dir = Path(data_dir)
    paths = {}
    if "pairs" in kinds:
        # Parquet rather than an image folder: `datasets` resolves an image folder's files pattern by pattern, which
        # took ~10 s a stage for these 4096 pictures on a loaded 2-core machine; a shard loads at once.
        pairs = pairs if pairs is not None else world.pairs(recipe.num_pictures, recipe.seed)
        write_parquet_shards(source_from_dataset(pairs), data_dir / "pairs")
        paths["pairs"] = str(data_dir / "pairs")
    if "stories" in kinds:
        folder = write_stories_folder(
            data_dir / "stories",
            recipe.num_stories,
            seed=recipe.seed + 1,
            image_size=world.image_size,
            pictures=recipe.story_pictures,
            instructions=STORY_INSTRUCTIONS,
            sampler=world.story_sampler(),
        )
        paths["stories"] = str(folder / "stories.jsonl")
    if "conversations" in kinds:
        folder = write_conversations_folder(
            data_dir / "conversations",
            recipe.num_conversations,
            seed=recipe.seed + 8,
            image_size=world.image_size,
            pictures=recipe.story_pictures,
            sampler=world.conversation_sampler(),
        )
        paths["conversations"] = str(folder / "conversations.jsonl")
    return paths


@dataclass
class DemoStage:
    """One trainer run of the recipe: its name in the history, its key in the timings, the `DreamLLMTrainingArguments`
    fields (all but `model` and `output_dir`) and the torch threads it runs on (None: as set)."""

    name: str
    timing: str
    arguments: dict
    threads: int | None = None


def trainer_settings(
    recipe: DemoRecipe, steps: int, batch_size: int, lr: float, seed: int, cache_dir: str | None = None
) -> dict:
    """The `DreamLLMTrainingArguments` fields every stage of the recipe shares: its steps, batch size, learning rate
    and seed, the recipe's schedule, float32 on the CPU, no checkpoints."""
    return dict(
        max_steps=steps,
        per_device_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler="cosine",
        warmup_steps=max(1, int(steps * recipe.warmup_fraction)),
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=seed,
        dtype="float32",
        mixed_precision="no",
        checkpointing_steps=0,
        logging_steps=recipe.logging_steps,
        cache_dir=cache_dir,
    )


def demo_stage_configs(recipe: DemoRecipe, data: dict[str, str], cache_dir: str | None = None) -> list[DemoStage]:
    """Stages I to III of the recipe as configurations of `dreamllm_hf.training.train` (stages with 0 steps left out);
    `data` maps "pairs", "stories" and "conversations" to their paths (`write_demo_data`)."""

    def common(steps, batch_size, lr, seed):
        return trainer_settings(recipe, steps, batch_size, lr, seed, cache_dir)

    mixed_pairs = dict(i2t_probability=0.5, caption_dropout=recipe.unconditional_probability)
    stages = [
        DemoStage(
            "I-comprehension",
            "stage I comprehension",
            dict(
                stage="alignment",
                language_model="full",  # nothing is pretrained here: the LLM and the tower learn to read
                vision_tower="full",
                train_condition_projector=False,
                train_dream_queries=False,
                data=[data["pairs"]],
                i2t_probability=1.0,
                loss_weight_lm=1.0,
                loss_weight_vm=0.0,
                **common(
                    recipe.comprehension_steps,
                    recipe.comprehension_batch_size,
                    recipe.comprehension_lr,
                    recipe.seed + 3,
                ),
            ),
        ),
        DemoStage(
            "I-creation",
            "stage I creation",
            dict(
                stage="alignment",
                language_model="full" if recipe.creation_train_llm else "frozen",
                train_image_projector=False,
                data=[data["pairs"]],
                i2t_probability=recipe.creation_i2t_probability,
                caption_dropout=recipe.unconditional_probability,
                loss_weight_lm=1.0 if recipe.creation_i2t_probability else 0.0,
                loss_weight_vm=1.0,
                **common(recipe.creation_steps, recipe.creation_batch_size, recipe.creation_lr, recipe.seed + 4),
            ),
        ),
        DemoStage(
            "II-joint",
            "stage II joint",
            dict(
                stage="pretraining",
                data=[data["stories"], data["pairs"]],
                data_weights=[recipe.joint_story_fraction, 1.0 - recipe.joint_story_fraction],
                loss_weight_lm=1.0,
                loss_weight_vm=recipe.loss_weight_vm,
                **mixed_pairs,
                **common(recipe.joint_steps, recipe.joint_batch_size, recipe.joint_lr, recipe.seed + 5),
            ),
        ),
        DemoStage(
            "III-instruction",
            "stage III instruction",
            dict(
                stage="instruction",
                data=[data["conversations"], data["pairs"]],
                data_weights=[
                    recipe.instruction_conversation_fraction,
                    1.0 - recipe.instruction_conversation_fraction,
                ],
                loss_weight_lm=1.0,
                loss_weight_vm=recipe.loss_weight_vm,
                **mixed_pairs,
                **common(
                    recipe.instruction_steps, recipe.instruction_batch_size, recipe.instruction_lr, recipe.seed + 8
                ),
            ),
            threads=recipe.instruction_threads,
        ),
    ]
    return [stage for stage in stages if stage.arguments["max_steps"] > 0]


def run_demo_stage(
    stage: DemoStage,
    model_dir: str | Path,
    output_dir: str | Path,
    recipe: DemoRecipe,
    log,
    world: DemoWorld = FIRST_WORLD,
) -> list[dict]:
    """Trains one stage with `dreamllm_hf.training.train` (a complete pipeline folder in `output_dir`), then runs its
    checks (`DemoRecipe.run_checks`). Returns the stage's history: its logged steps and its checks."""
    from ..training import DreamLLMTrainingArguments, train

    threads = torch.get_num_threads()
    if stage.threads:
        torch.set_num_threads(stage.threads)
    try:
        args = DreamLLMTrainingArguments(model=str(model_dir), output_dir=str(output_dir), **stage.arguments)
        result = train(args)
    finally:
        torch.set_num_threads(threads)
    history = []
    for line in result.log_path.read_text().splitlines():
        record = json.loads(line)
        history.append(
            {
                "stage": stage.name,
                "step": record["step"],
                **{key: record[key] for key in ("loss", "lm_loss", "vm_loss", "lr", "elapsed_s")},
            }
        )
        log(json.dumps(history[-1]))
    if not recipe.run_checks:
        return history
    for record in stage_checks(
        output_dir, stage.name, recipe, world, with_drawing=stage.arguments["loss_weight_vm"] != 0
    ):
        history.append(record)
        log(json.dumps(record))
    return history


__all__ = [
    "DEMO_DATA",
    "DemoStage",
    "demo_stage_configs",
    "run_demo_stage",
    "trainer_settings",
    "write_demo_data",
]
