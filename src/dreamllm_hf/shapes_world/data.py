"""The shapes world as training data, in the layouts `dreamllm-hf train` reads.

* pairs: an image folder with `metadata.jsonl` (`file_name`, `text`), as `datasets`' imagefolder;
* stories: JSON Lines in the MMC4 schema (`text_list`, `image_info: [{image_name, matched_text_index}]`, optionally
  the story `instruction` each answers), images beside;
* conversations (`sample_conversation`): chat turns with pictures in (a question about a picture) and out (a story);
  as JSON Lines of `messages` (text and image parts, images beside).

`pairs_dataset` / `stories_dataset` give the same samples as in-memory `datasets.Dataset`s.
"""

import json
import random
from pathlib import Path

import datasets
from PIL import Image

from .tokenizer import CAPTION_QUESTIONS, STORY_INSTRUCTIONS
from .world import IMAGE_SIZE, caption, draw_shape, sample_spec, sample_story


# What a conversation holds, in turn order: a question about a picture (picture in) and/or a story (pictures out).
CONVERSATION_KINDS = (("question",), ("story",), ("story", "question"), ("question", "story"))


def sample_conversation(
    rng: random.Random, image_size: int = IMAGE_SIZE, pictures: tuple[int, int] = (1, 3)
) -> list[dict]:
    """A conversation of one or two exchanges: "What is in the picture?" about a picture the user gives (answered by
    its caption), and/or a story instruction answered by a story whose pictures the assistant draws."""
    messages = []
    for exchange in rng.choice(CONVERSATION_KINDS):
        if exchange == "question":
            spec = sample_spec(rng, image_size=image_size)
            messages.append({"role": "user", "content": [draw_shape(spec, image_size), rng.choice(CAPTION_QUESTIONS)]})
            messages.append({"role": "assistant", "content": caption(spec)})
        else:
            story = sample_story(rng, rng.randint(*pictures))
            answer = [part for sentence, spec in story for part in (sentence, draw_shape(spec, image_size))]
            messages.append({"role": "user", "content": rng.choice(STORY_INSTRUCTIONS)})
            messages.append({"role": "assistant", "content": answer})
    return messages


def _pair_rows(num_samples: int, seed: int, image_size: int):
    rng = random.Random(seed)
    for index in range(num_samples):
        spec = sample_spec(rng, image_size=image_size)
        yield {
            "image": draw_shape(spec, image_size),
            "text": caption(spec),
            "colour": spec.colour,
            "shape": spec.shape,
            "index": index,
        }


def _illustrated_story(rng: random.Random, num_pictures: int, image_size: int) -> list[tuple[str, Image.Image]]:
    return [(sentence, draw_shape(spec, image_size)) for sentence, spec in sample_story(rng, num_pictures)]


def _story_rows(num_samples: int, seed: int, image_size: int, pictures: tuple[int, int], sampler=None):
    rng = random.Random(seed)
    for index in range(num_samples):
        story = (sampler or _illustrated_story)(rng, rng.randint(*pictures), image_size)
        yield {
            "text_list": [sentence for sentence, _ in story],
            "images": [picture for _, picture in story],
            "image_info": [
                {"image_name": f"story{index:06d}_{k}.png", "matched_text_index": k} for k in range(len(story))
            ],
            "index": index,
        }


def pairs_dataset(num_samples: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> datasets.Dataset:
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "colour": datasets.Value("string"),
            "shape": datasets.Value("string"),
            "index": datasets.Value("int64"),
        }
    )
    rows = list(_pair_rows(num_samples, seed, image_size))
    return datasets.Dataset.from_list(rows, features=features)


def stories_dataset(
    num_samples: int, seed: int = 0, image_size: int = IMAGE_SIZE, pictures=(1, 3)
) -> datasets.Dataset:
    features = datasets.Features(
        {
            "text_list": datasets.Sequence(datasets.Value("string")),
            "images": datasets.Sequence(datasets.Image()),
            "image_info": [{"image_name": datasets.Value("string"), "matched_text_index": datasets.Value("int64")}],
            "index": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_list(list(_story_rows(num_samples, seed, image_size, pictures)), features=features)


def write_pairs_folder(out_dir: str | Path, num_samples: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metadata.jsonl", "w") as metadata:
        for row in _pair_rows(num_samples, seed, image_size):
            name = f"shape{row['index']:06d}.png"
            row["image"].save(out_dir / name)
            metadata.write(json.dumps({"file_name": name, "text": row["text"]}) + "\n")
    return out_dir


def write_stories_folder(
    out_dir: str | Path,
    num_samples: int,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    pictures=(1, 3),
    instructions: tuple[str, ...] | None = None,
    sampler=None,
) -> Path:
    """The stories of `stories_dataset` as MMC4 JSON Lines; with `instructions`, each story answers one of them
    (drawn with its own seeded generator, so the stories are the same either way). `sampler(rng, num_pictures,
    image_size)` gives a story's (sentence, picture) pairs (default: this world's)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chooser = random.Random(f"instructions/{seed}")
    with open(out_dir / "stories.jsonl", "w") as lines:
        for row in _story_rows(num_samples, seed, image_size, pictures, sampler):
            for image, info in zip(row["images"], row["image_info"]):
                image.save(out_dir / info["image_name"])
            record = {"text_list": row["text_list"], "image_info": row["image_info"]}
            if instructions:
                record["instruction"] = chooser.choice(instructions)
            lines.write(json.dumps(record) + "\n")
    return out_dir


def write_conversations_folder(
    out_dir: str | Path,
    num_samples: int,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    pictures=(1, 3),
    sampler=None,
) -> Path:
    """`num_samples` conversations (`sample_conversation`, or `sampler(rng, image_size, pictures)`; conversation k
    drawn from its own seeded generator) as `conversations.jsonl`: one `{"messages": [...]}` per line, contents as
    text and image parts, pictures beside."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "conversations.jsonl", "w") as lines:
        for index in range(num_samples):
            messages = (sampler or sample_conversation)(random.Random(f"{seed}/{index}"), image_size, pictures)
            count = 0
            for message in messages:
                items = message["content"] if isinstance(message["content"], list) else [message["content"]]
                parts = []
                for item in items:
                    if isinstance(item, str):
                        parts.append({"type": "text", "text": item})
                        continue
                    name = f"conversation{index:06d}_{count}.png"
                    item.save(out_dir / name)
                    parts.append({"type": "image", "image": name})
                    count += 1
                message["content"] = parts
            lines.write(json.dumps({"messages": messages}) + "\n")
    return out_dir
