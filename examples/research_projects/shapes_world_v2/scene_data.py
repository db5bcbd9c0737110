"""The version-2 shapes world (`scenes`) as training data, in the layouts `data` writes and `dreamllm-hf train`
reads: pairs (picture, caption), MMC4 stories of changes, and conversations (questions about a picture, captions,
stories)."""

import random

import datasets

from dreamllm_hf.shapes_world.tokenizer import CAPTION_QUESTIONS, STORY_INSTRUCTIONS

from .scenes import SCENE_SIZE, draw_scene, sample_question, sample_scene, sample_story


# What a conversation holds, in turn order: a question about a picture (picture in, a one-word answer), a caption
# asked for (picture in), a story (pictures out).
SCENE_CONVERSATION_KINDS = (
    ("question",),
    ("question", "question"),
    ("caption",),
    ("story",),
    ("story", "question"),
    ("question", "story"),
)


def illustrated_scene_story(rng: random.Random, num_pictures: int, image_size: int = SCENE_SIZE) -> list[tuple]:
    """(sentence, picture) pairs of `scenes.sample_story` (the `sampler` of `data.write_stories_folder`)."""
    _check_size(image_size)
    return [(sentence, draw_scene(layout)) for sentence, layout in sample_story(rng, num_pictures)]


# The same without stories: what the comprehension-only control of the synergy benchmark is instruction-tuned on.
READING_CONVERSATION_KINDS = tuple(kinds for kinds in SCENE_CONVERSATION_KINDS if "story" not in kinds)


def sample_scene_conversation(
    rng: random.Random,
    image_size: int = SCENE_SIZE,
    pictures: tuple[int, int] = (3, 4),
    kinds: tuple[tuple[str, ...], ...] = SCENE_CONVERSATION_KINDS,
) -> list[dict]:
    """A conversation of one or two exchanges (one of `kinds`); the `sampler` of `data.write_conversations_folder`."""
    _check_size(image_size)
    messages = []
    for exchange in rng.choice(kinds):
        if exchange == "story":
            answer = [part for pair in illustrated_scene_story(rng, rng.randint(*pictures)) for part in pair]
            messages.append({"role": "user", "content": rng.choice(STORY_INSTRUCTIONS)})
            messages.append({"role": "assistant", "content": answer})
            continue
        layout = sample_scene(rng)
        if exchange == "question":
            question, answer = sample_question(rng, layout.scene)
        else:
            question, answer = rng.choice(CAPTION_QUESTIONS), layout.scene.caption()
        messages.append({"role": "user", "content": [draw_scene(layout), question]})
        messages.append({"role": "assistant", "content": answer})
    return messages


def sample_reading_conversation(
    rng: random.Random, image_size: int = SCENE_SIZE, pictures: tuple[int, int] = (3, 4)
) -> list[dict]:
    """`sample_scene_conversation` of `READING_CONVERSATION_KINDS` (pictures in only)."""
    return sample_scene_conversation(rng, image_size, pictures, READING_CONVERSATION_KINDS)


def scene_pairs_dataset(num_samples: int, seed: int = 0) -> datasets.Dataset:
    """Pictures and their captions (`image`, `text`, `index`), scene k of one generator seeded with `seed`."""
    rng = random.Random(seed)
    rows = []
    for index in range(num_samples):
        layout = sample_scene(rng)
        rows.append({"image": draw_scene(layout), "text": layout.scene.caption(), "index": index})
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "index": datasets.Value("int64")}
    )
    return datasets.Dataset.from_list(rows, features=features)


def _check_size(image_size: int) -> None:
    if image_size != SCENE_SIZE:
        raise ValueError(f"The version-2 world draws {SCENE_SIZE}x{SCENE_SIZE} pictures; got image_size={image_size}.")
