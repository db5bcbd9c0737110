"""The shapes world as training data, in the layouts `dreamllm-hf train` reads.

* pairs: an image folder with `metadata.jsonl` (`file_name`, `text`), as `datasets`' imagefolder;
* stories: JSON Lines in the MMC4 schema (`text_list`, `image_info: [{image_name, matched_text_index}]`), images beside.

`pairs_dataset` / `stories_dataset` give the same samples as in-memory `datasets.Dataset`s.
"""

import json
import random
from pathlib import Path

import datasets

from .world import IMAGE_SIZE, caption, draw_shape, sample_spec, sample_story


def _pair_rows(num_samples: int, seed: int, image_size: int):
    rng = random.Random(seed)
    for index in range(num_samples):
        spec = sample_spec(rng, image_size=image_size)
        yield {"image": draw_shape(spec, image_size), "text": caption(spec), "colour": spec.colour, "shape": spec.shape, "index": index}


def _story_rows(num_samples: int, seed: int, image_size: int, pictures: tuple[int, int]):
    rng = random.Random(seed)
    for index in range(num_samples):
        story = sample_story(rng, rng.randint(*pictures))
        yield {
            "text_list": [sentence for sentence, _ in story],
            "images": [draw_shape(spec, image_size) for _, spec in story],
            "image_info": [{"image_name": f"story{index:06d}_{k}.png", "matched_text_index": k} for k in range(len(story))],
            "index": index,
        }


def pairs_dataset(num_samples: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> datasets.Dataset:
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "colour": datasets.Value("string"),
         "shape": datasets.Value("string"), "index": datasets.Value("int64")}
    )
    rows = list(_pair_rows(num_samples, seed, image_size))
    return datasets.Dataset.from_list(rows, features=features)


def stories_dataset(num_samples: int, seed: int = 0, image_size: int = IMAGE_SIZE, pictures=(1, 3)) -> datasets.Dataset:
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
    out_dir: str | Path, num_samples: int, seed: int = 0, image_size: int = IMAGE_SIZE, pictures=(1, 3)
) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "stories.jsonl", "w") as lines:
        for row in _story_rows(num_samples, seed, image_size, pictures):
            for image, info in zip(row["images"], row["image_info"]):
                image.save(out_dir / info["image_name"])
            lines.write(json.dumps({"text_list": row["text_list"], "image_info": row["image_info"]}) + "\n")
    return out_dir
