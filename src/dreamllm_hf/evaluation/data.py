"""Reading the inputs of `dreamllm-hf evaluate`: captions to draw, pictures to caption, questions to answer.

Every reader checks its whole input before anything is generated and exits (`SystemExit`) naming the first broken
entry and how to fix it. Entries are numbered in input order; that number names the files written for them, so a
re-run finds what is already done.

* Captions to draw (`read_captions`): COCO's `captions_val2014.json` (`annotations`: `image_id`, `id`, `caption`),
  JSON Lines (one `{"caption": ...}` object a line, e.g. Localized Narratives' `coco_val_captions.jsonl`; the other
  keys with plain values are kept as ids) or a `datasets` dataset with a `caption` column.
* Pictures to caption (`read_captioning_examples`): a COCO caption file (`images` + `annotations`) with `--images
  DIR`, JSON Lines of `{"image": path, "references": [...]}` (other keys kept) or a dataset with `image` and
  `references` columns.
* Questions are read by `vqa.read_vqa_examples`, which knows the VQA formats.
"""

import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image

from ..pipelines.prompt_files import InputError, check_picture, load_dataset_split


DATASET_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class CaptionRecord:
    """One caption to draw."""

    index: int  # position in the (sub-sampled) input; names the pictures drawn for it
    caption: str
    ids: dict = field(default_factory=dict)  # the input's other keys (COCO: image_id, id)

    @property
    def id(self) -> str:
        return caption_id(self.index)


def caption_id(index: int) -> str:
    return f"c{index:06d}"


@dataclass
class ImageExample:
    """One picture to caption, or one question about a picture to answer."""

    index: int
    image: Path | PIL.Image.Image  # a checked file, or a picture from a dataset
    question: str | None = None  # None for captioning
    references: list[str] = field(default_factory=list)  # reference captions, or the annotators' answers
    ids: dict = field(default_factory=dict)  # keys that identify the entry in results files (question_id, image_id)


def fail(source: Path | str, where: str, error: Exception | str) -> SystemExit:
    return SystemExit(f"error: {source}{' ' + where if where else ''}: {error}")


# --------------------------------------------------------------------------------------------------------------------
# Small shared readers


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise SystemExit(f"error: {what} {path} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SystemExit(f"error: cannot read {what} {path} as JSON: {error}") from error


def read_json_lines(path: Path) -> Iterable[tuple[int, Any]]:
    """(line number, decoded object) for every non-blank line; exits naming the first line that is not JSON."""
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # not splitlines: JSON strings may hold U+2028
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"error: cannot read {path}: {error}") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise fail(path, f"line {number}", f"not valid JSON ({error.msg} at column {error.colno}).") from error


def is_dataset(path: Path) -> bool:
    return path.is_dir() or path.suffix.lower() in DATASET_SUFFIXES


def load_dataset_rows(path: Path, required: tuple[str, ...]) -> list[dict]:
    """The rows of a `datasets` dataset (a `save_to_disk` folder, or a .parquet/.csv/.arrow file), one split."""
    return list(load_dataset_split(path, required, str(path), DATASET_SUFFIXES))


def check_text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f'"{key}" must be a non-empty string, got {value!r:.60}.')
    return value


def check_ids(entry: dict, skip: Iterable[str], scalars_only: bool = False) -> dict:
    ids = {key: value for key, value in entry.items() if key not in set(skip)}
    if scalars_only:  # ids, not payloads: Localized Narratives' mouse traces would fill every output row
        ids = {key: value for key, value in ids.items() if value is None or isinstance(value, (str, int, float, bool))}
    for key, value in ids.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as error:
            raise InputError(f'the value of "{key}" cannot be written to JSON ({error}); drop that key.') from error
    return ids


def open_picture(image: Path | PIL.Image.Image) -> PIL.Image.Image:
    """A picture file (or a PIL image) as an RGB image, the file closed again."""
    from ..modeling.processing_dreamllm import rgb_picture

    if isinstance(image, PIL.Image.Image):
        return rgb_picture(image)
    with PIL.Image.open(image) as picture:
        return rgb_picture(picture)


def open_pictures(files: Iterable[Path]) -> Iterator[PIL.Image.Image]:
    """`open_picture` of each file, one at a time (a set of pictures is never held in memory at once)."""
    for path in files:
        yield open_picture(path)


# --------------------------------------------------------------------------------------------------------------------
# Captions to draw


def _coco_captions(path: Path, data: dict) -> list[tuple[str, dict]]:
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise SystemExit(
            f'error: {path} has no "annotations" list; give COCO\'s captions file, or JSON Lines (.jsonl) of '
            '{"caption": ...}.'
        )
    entries = []
    for number, annotation in enumerate(annotations):
        try:
            if not isinstance(annotation, dict):
                raise InputError(f"expected an object, got {annotation!r:.60}.")
            text = check_text(annotation.get("caption"), "caption")
            entries.append((text.strip(), check_ids(annotation, ("caption",), scalars_only=True)))
        except InputError as error:
            raise fail(path, f"annotations[{number}]", error) from error
    return entries


def read_captions(path: Path, limit: int | None = None, sample_seed: int = 0) -> list[CaptionRecord]:
    """
    The captions to draw, checked. With `limit`, a random sample of that many (seeded by `sample_seed`, kept in input
    order), as the paper draws 30K captions from COCO val2014.
    """
    if not path.exists():
        raise SystemExit(f"error: --captions {path} does not exist.")
    if is_dataset(path):
        entries = []
        for number, row in enumerate(load_dataset_rows(path, ("caption",))):
            try:
                entries.append(
                    (check_text(row["caption"], "caption").strip(), check_ids(row, ("caption",), scalars_only=True))
                )
            except InputError as error:
                raise fail(path, f"row {number}", error) from error
    elif path.suffix.lower() == ".json":
        entries = _coco_captions(path, read_json(path, "--captions"))
    else:
        entries = []
        for number, entry in read_json_lines(path):
            try:
                if not isinstance(entry, dict):
                    raise InputError('expected an object such as {"caption": "a red circle"}.')
                if "caption" not in entry:
                    raise InputError('no "caption"; every line needs one, e.g. {"caption": "a red circle"}.')
                entries.append(
                    (
                        check_text(entry["caption"], "caption").strip(),
                        check_ids(entry, ("caption",), scalars_only=True),
                    )
                )
            except InputError as error:
                raise fail(path, f"line {number}", error) from error
    if not entries:
        raise SystemExit(f"error: --captions {path} holds no captions.")
    if limit is not None:
        if limit < 1:
            raise SystemExit(f"error: --num-captions must be at least 1, got {limit}.")
        if limit < len(entries):
            chosen = sorted(random.Random(sample_seed).sample(range(len(entries)), limit))
            entries = [entries[i] for i in chosen]
    return [CaptionRecord(index, text, ids) for index, (text, ids) in enumerate(entries)]


_SEEDS = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?$")


def parse_seeds(text: str) -> list[int]:
    """'42-49' -> [42, ..., 49]; '0,3,7' and '42' work too."""
    seeds = []
    for part in str(text).split(","):
        match = _SEEDS.match(part)
        if not match:
            raise SystemExit(f"error: --seeds {text!r}: write seeds as 42, 42-49 or 0,3,7.")
        first, last = int(match.group(1)), int(match.group(2) if match.group(2) is not None else match.group(1))
        if last < first:
            raise SystemExit(
                f"error: --seeds {text!r}: the range {first}-{last} is empty; write the lower seed first."
            )
        seeds.extend(range(first, last + 1))
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: --seeds {text!r} names a seed twice.")
    if any(not 0 <= seed < 2**31 for seed in seeds):
        raise SystemExit(f"error: --seeds {text!r}: seeds must lie between 0 and 2**31 - 1.")
    return seeds


# --------------------------------------------------------------------------------------------------------------------
# Pictures to caption


def _coco_captioning(path: Path, data: dict, images_dir: Path | None) -> list[ImageExample]:
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise SystemExit(f'error: {path} needs the "images" and "annotations" lists of a COCO caption file.')
    if images_dir is None:
        raise SystemExit(f"error: {path} is a COCO caption file; give --images DIR, the folder of its pictures.")
    references: dict[Any, list[str]] = {}
    for number, annotation in enumerate(data["annotations"]):
        try:
            text = check_text(annotation.get("caption") if isinstance(annotation, dict) else None, "caption")
        except InputError as error:
            raise fail(path, f"annotations[{number}]", error) from error
        references.setdefault(annotation.get("image_id"), []).append(text)
    examples = []
    for number, image in enumerate(data["images"]):
        try:
            if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
                raise InputError('each entry of "images" needs "id" and "file_name".')
            if image["id"] not in references:
                raise InputError(f'image {image["id"]} has no caption in "annotations".')
            picture = check_picture(image["file_name"], images_dir)
        except InputError as error:
            raise fail(path, f"images[{number}]", error) from error
        examples.append(ImageExample(len(examples), picture, None, references[image["id"]], {"image_id": image["id"]}))
    return examples


def _references(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise InputError(f'"references" must be a non-empty list of captions, got {value!r:.60}.')
    return [check_text(item, "references[]") for item in value]


def read_captioning_examples(path: Path, images_dir: Path | None = None) -> list[ImageExample]:
    """The pictures to caption with their reference captions, checked (formats: see the module docstring)."""
    if not path.exists():
        raise SystemExit(f"error: --data {path} does not exist.")
    base_dir = images_dir or path.parent
    if is_dataset(path):
        examples = []
        for number, row in enumerate(load_dataset_rows(path, ("image", "references"))):
            try:
                examples.append(
                    ImageExample(
                        number,
                        check_picture(row["image"], base_dir),
                        None,
                        _references(row["references"]),
                        check_ids(row, ("image", "references")),
                    )
                )
            except InputError as error:
                raise fail(path, f"row {number}", error) from error
    elif path.suffix.lower() == ".json":
        examples = _coco_captioning(path, read_json(path, "--data"), images_dir)
    else:
        examples = []
        for number, entry in read_json_lines(path):
            try:
                if not isinstance(entry, dict) or "image" not in entry:
                    raise InputError('expected {"image": "pic.png", "references": ["a caption", ...]}.')
                examples.append(
                    ImageExample(
                        len(examples),
                        check_picture(entry["image"], base_dir),
                        None,
                        _references(entry.get("references")),
                        check_ids(entry, ("image", "references")),
                    )
                )
            except InputError as error:
                raise fail(path, f"line {number}", error) from error
    if not examples:
        raise SystemExit(f"error: --data {path} holds no pictures.")
    return examples


__all__ = [
    "CaptionRecord",
    "ImageExample",
    "InputError",
    "caption_id",
    "open_picture",
    "open_pictures",
    "parse_seeds",
    "read_captioning_examples",
    "read_captions",
]
