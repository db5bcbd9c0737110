"""Many documents from a file of prompts, written one file per document, resumable and data parallel.

The input (JSON Lines or a `datasets` dataset) is read and checked whole before anything is generated. Every document
is written as soon as the pipeline's stream finishes it: its pictures, its HTML, then its record (which marks it done),
each under a temporary name renamed into place, so nothing is ever half-written and an interrupted run resumes.
`documents.jsonl` gathers the records in prompt order. Used by `dreamllm-hf generate --prompts`.
"""

import io
import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from .. import checks
from ..modeling.processing_dreamllm import rgb_picture
from .pipeline_dreamllm import DreamLLMPipeline
from .pipeline_output import DreamLLMPipelineOutput, segment_to_pil


IMAGE_PLACEHOLDER = "<image>"
# The keys a line / row may set; every other key is copied into the document's record.
INPUT_KEYS = ("prompt", "images", "seed")
# The keys of a record (one JSON object per document in `records/` and `documents.jsonl`).
RECORD_KEYS = ("id", "index", "prompt", "seed", "segments", "text", "images", "stop_reason", "html")
RECORDS_DIR = "records"
DOCUMENTS_FILE = "documents.jsonl"
DATASET_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".json": "json"}


def with_placeholders(prompt: str, image_count: int) -> str:
    """Puts the pictures before the prompt when it does not say where they go."""
    if image_count and IMAGE_PLACEHOLDER not in prompt:
        return IMAGE_PLACEHOLDER * image_count + "\n" + prompt
    return prompt


# --------------------------------------------------------------------------------------------------------------------
# Reading and checking the input


@dataclass
class PromptRecord:
    """One document to write: a prompt of the --prompts input, checked."""

    index: int  # 0-based line (JSON Lines, blank lines not counted) or row (dataset)
    prompt: str  # as given
    images: list = field(default_factory=list)  # absolute `Path`s or PIL images, in order
    seed: int = 0
    extra: dict = field(default_factory=dict)  # the input's other keys, copied into the record

    @property
    def id(self) -> str:
        return document_id(self.index)

    @property
    def model_prompt(self) -> str:
        return with_placeholders(self.prompt, len(self.images))

    def load_images(self) -> list[PIL.Image.Image]:
        return [rgb_picture(PIL.Image.open(image) if isinstance(image, Path) else image) for image in self.images]


def document_id(index: int) -> str:
    return f"doc-{index:05d}"


class InputError(ValueError):
    """What is wrong with one line or row of an input file (the caller says where)."""


def _check_seed(value: Any, index: int, base_seed: int) -> int:
    if value is None:
        value = base_seed + index
    if isinstance(value, float) and value.is_integer():  # CSV columns with gaps are read as floats
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f'"seed" must be an integer, got {value!r}; write for example "seed": 7, or leave it out.')
    try:
        return checks.SEED.check("seed", value)
    except ValueError as error:
        raise InputError(f'"seed" {value} is out of range; use {checks.SEED.description}.') from error


def check_picture(item: Any, base_dir: Path, name: str = '"image"') -> Path | PIL.Image.Image:
    """A picture of an input file: a path (relative to `base_dir`) that PIL can read, or a picture of a dataset
    (decoded or not). Anything else is an `InputError` that names the entry (`name`) and says what to give."""
    if isinstance(item, PIL.Image.Image):
        return item
    if isinstance(item, dict) and ("bytes" in item or "path" in item):  # a `datasets` Image feature not decoded
        if item.get("bytes"):
            return PIL.Image.open(io.BytesIO(item["bytes"]))
        item = item.get("path")
    if not isinstance(item, (str, os.PathLike)) or not str(item):
        raise InputError(
            f"{name} is {item!r:.60}; each picture must be a file path (relative to the folder of the input file, or "
            "absolute) or, in a dataset, a picture."
        )
    path = Path(item).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise InputError(
            f"picture {name} not found: {item} (looked for {path}); paths are relative to the folder of the input "
            "file, or absolute."
        )
    try:
        with PIL.Image.open(path):
            pass
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise InputError(f"{name} {path} is not a picture PIL can read ({error}).") from error
    return path.resolve()


def _check_entry(entry: Any, index: int, base_dir: Path, base_seed: int) -> PromptRecord:
    """One line or row as a `PromptRecord`, or an `InputError` saying what is wrong and how to fix it."""
    if not isinstance(entry, dict):
        raise InputError(
            f'expected a JSON object such as {{"prompt": "Tell me a story."}}, '
            f"got {type(entry).__name__} {entry!r:.60}."
        )
    prompt = entry.get("prompt")
    if prompt is None:
        raise InputError('no "prompt"; every line needs one, e.g. {"prompt": "Tell me a story."}.')
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f'"prompt" must be a non-empty string, got {prompt!r:.60}.')
    images = entry.get("images")
    if images is None:
        images = []
    if not isinstance(images, (list, tuple)):
        raise InputError(
            f'"images" must be a list of picture paths, got {type(images).__name__} {images!r:.60}; '
            'write for example "images": ["cat.png"].'
        )
    pictures = [check_picture(item, base_dir, f'"images"[{number}]') for number, item in enumerate(images)]
    placeholders = prompt.count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(pictures):
        raise InputError(
            f'the prompt has {placeholders} "{IMAGE_PLACEHOLDER}" but "images" lists {len(pictures)} picture(s); '
            f'give one "{IMAGE_PLACEHOLDER}" per picture, or none to put the pictures before the prompt.'
        )
    seed = _check_seed(entry.get("seed"), index, base_seed)
    extra = {key: value for key, value in entry.items() if key not in INPUT_KEYS}
    for key, value in extra.items():
        if key in RECORD_KEYS:
            raise InputError(f'the key "{key}" is taken by the output record; rename it (e.g. "source_{key}").')
        try:
            json.dumps(value)
        except (TypeError, ValueError) as error:
            raise InputError(
                f'the value of "{key}" cannot be written to a JSON record ({error}); drop that key or make it plain.'
            ) from error
    return PromptRecord(index=index, prompt=prompt, images=pictures, seed=seed, extra=extra)


def _read_json_lines(path: Path, base_seed: int) -> list[PromptRecord]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # not splitlines: JSON strings may hold U+2028
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"error: cannot read --prompts {path}: {error}") from error
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines do not count as prompts
        try:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(
                    f"not valid JSON ({error.msg} at column {error.colno}); each line must be one JSON object such "
                    'as {"prompt": "Tell me a story.", "images": ["cat.png"], "seed": 3}.'
                ) from error
            records.append(_check_entry(entry, len(records), path.parent, base_seed))
        except InputError as error:
            raise SystemExit(f"error: {path} line {line_number}: {error}") from error
    return records


def load_dataset_split(path: Path, required: tuple[str, ...], what: str, suffixes: dict[str, str] = DATASET_SUFFIXES):
    """The one split of a `datasets` dataset: a `save_to_disk` folder, or a data file whose extension `suffixes`
    maps to its builder. `what` names it in the errors, which say what to change."""
    import datasets

    try:
        if path.is_dir():
            dataset = datasets.load_from_disk(str(path))
        else:
            dataset = datasets.load_dataset(suffixes[path.suffix.lower()], data_files=str(path), split="train")
    except Exception as error:  # noqa: BLE001 (datasets raises many kinds; the user needs the message)
        raise SystemExit(f"error: cannot load {what} as a dataset: {error}") from error
    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1:
            raise SystemExit(
                f"error: {what} holds the splits {', '.join(dataset)}; save the one to use by itself "
                "(`dataset_dict[split].save_to_disk(...)`)."
            )
        dataset = next(iter(dataset.values()))
    missing = [column for column in required if column not in dataset.column_names]
    if missing:
        raise SystemExit(
            f"error: {what} has no {', '.join(repr(c) for c in missing)} column (columns: "
            f"{', '.join(dataset.column_names)})."
        )
    return dataset


def _read_dataset(path: Path, base_seed: int) -> list[PromptRecord]:
    records = []
    for row_index, row in enumerate(load_dataset_split(path, ("prompt",), f"--prompts {path}")):
        try:
            records.append(_check_entry(row, row_index, path.parent, base_seed))
        except InputError as error:
            raise SystemExit(f"error: {path} row {row_index} ({document_id(row_index)}): {error}") from error
    return records


def read_prompts(path: Path, base_seed: int = 0) -> list[PromptRecord]:
    """
    Reads and checks the whole --prompts input before anything is generated; exits (`SystemExit`) naming the first
    broken line or row. Documents are numbered by 0-based line (blank lines skipped) or row.
    """
    if not path.exists():
        raise SystemExit(f"error: --prompts {path} does not exist.")
    if path.is_dir() or path.suffix.lower() in DATASET_SUFFIXES:
        records = _read_dataset(path, base_seed)
    else:
        records = _read_json_lines(path, base_seed)
    if not records:
        raise SystemExit(f'error: --prompts {path} holds no prompts; write one {{"prompt": ...}} per line.')
    return records


# --------------------------------------------------------------------------------------------------------------------
# Writing


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(temporary_path)` in `path`'s folder, flushed to disk, then renamed over `path`: never half-written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_text(text: str) -> Callable[[Path], Any]:
    return lambda path: path.write_text(text, encoding="utf-8")


def _record_path(output_dir: Path, index: int) -> Path:
    return output_dir / RECORDS_DIR / f"{document_id(index)}.json"


def write_document(output_dir: Path, record: PromptRecord, output: DreamLLMPipelineOutput) -> dict:
    """
    Writes document 0 of `output` (the pictures, the HTML, then the record, which marks it done) and returns the
    record. Every segment of the record has the keys type/text/path, so that `documents.jsonl` has one schema.
    """
    segments, picture_names = [], []
    for segment in output.documents[0]:
        if isinstance(segment, str):
            segments.append({"type": "text", "text": segment, "path": None})
            continue
        name = f"{record.id}_image_{len(picture_names)}.png"
        picture = segment_to_pil(segment)
        write_atomically(output_dir / name, lambda path, picture=picture: picture.save(path, format="PNG"))
        picture_names.append(name)
        segments.append({"type": "image", "text": None, "path": name})
    html_name = f"{record.id}.html"
    write_atomically(output_dir / html_name, lambda path: output.save_html(path, 0, title=record.prompt[:80]))
    text = output.text[0] if output.text else "\n".join(s["text"] for s in segments if s["type"] == "text")
    entry = {
        "id": record.id,
        "index": record.index,
        "prompt": record.prompt,
        "seed": record.seed,
        "segments": segments,
        "text": text,
        "images": picture_names,
        "stop_reason": output.stop_reasons[0],
        "html": html_name,
        **record.extra,
    }
    write_atomically(_record_path(output_dir, record.index), _write_text(json.dumps(entry, ensure_ascii=False) + "\n"))
    return entry


def rebuild_documents_jsonl(output_dir: Path) -> int:
    """Gathers every record of `output_dir/records` into `output_dir/documents.jsonl`, by index; returns the count.
    Keys a record lacks (another line's extra keys) are written as nulls, so every row has the same keys."""
    entries = [json.loads(path.read_text(encoding="utf-8")) for path in (output_dir / RECORDS_DIR).glob("doc-*.json")]
    entries.sort(key=lambda entry: entry["index"])
    keys = list(RECORD_KEYS)
    for entry in entries:
        keys.extend(key for key in entry if key not in keys)
    lines = "".join(json.dumps({key: entry.get(key) for key in keys}, ensure_ascii=False) + "\n" for entry in entries)
    write_atomically(output_dir / DOCUMENTS_FILE, _write_text(lines))
    return len(entries)


def pending_records(records: list[PromptRecord], output_dir: Path) -> list[PromptRecord]:
    """The records without a record file; exits if a record file was written for another prompt or seed."""
    pending = []
    for record in records:
        path = _record_path(output_dir, record.index)
        if not path.is_file():
            pending.append(record)
            continue
        try:
            done = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SystemExit(
                f"error: cannot read {path} ({error}); delete it to write that document again."
            ) from error
        if done.get("prompt") != record.prompt or done.get("seed") != record.seed:
            raise SystemExit(
                f"error: {path} was written for another prompt or seed (prompt {done.get('prompt')!r:.60}, seed "
                f"{done.get('seed')}; now {record.prompt!r:.60}, seed {record.seed}). Use a new --output-dir, or "
                "delete that record to write the document again."
            )
    return pending


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate_batch(
    pipe: DreamLLMPipeline,
    batch: Sequence[PromptRecord],
    output_dir: Path,
    on_document: Callable[[dict], None],
    **call_kwargs,
) -> None:
    """One pipeline call for `batch` (`call_kwargs`: the pipeline's arguments); each document is written as soon as
    it ends."""
    images = [record.load_images() for record in batch]
    events = pipe.stream(
        prompt=[record.model_prompt for record in batch],
        image=images if any(images) else None,
        # One generator per document, seeded by the document alone: its output does not depend on the batching.
        generator=[torch.Generator(device="cpu").manual_seed(record.seed) for record in batch],
        output_type="pil",
        **call_kwargs,
    )
    written = set()
    for event in events:
        if event.type == "document_end":
            on_document(write_document(output_dir, batch[event.document], event.output))
            written.add(event.document)
    if len(written) != len(batch):
        missing = ", ".join(record.id for number, record in enumerate(batch) if number not in written)
        raise RuntimeError(f"The pipeline's stream ended without finishing {missing}.")


__all__ = [
    "DOCUMENTS_FILE",
    "RECORDS_DIR",
    "InputError",
    "PromptRecord",
    "batches",
    "check_picture",
    "generate_batch",
    "load_dataset_split",
    "pending_records",
    "read_prompts",
    "rebuild_documents_jsonl",
    "with_placeholders",
    "write_atomically",
    "write_document",
]
