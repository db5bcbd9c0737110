"""The model's captions and answers for evaluation, written as documents by `dreamllm-hf generate`'s machinery.

Each picture (and question) becomes a text-only document (`allow_images=False`) through `prompt_files`: batched, one
record per document written as soon as it ends, resumable, and shared between the processes of `accelerate launch`.
The answers are then read back from the records, in input order.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..pipelines.prompt_files import (
    DOCUMENTS_FILE,
    PromptRecord,
    batches,
    generate_batch,
    pending_records,
    rebuild_documents_jsonl,
)
from .data import ImageExample, read_json, read_json_lines


ANSWERS_DIR = "answers"
QUESTION_FIELD = "{question}"
# The model's prompts when none is given: those LLaVA-1.5-era models are usually evaluated with (the original's
# evaluation prompts are not recorded in this project's notes on its code).
DEFAULT_CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
DEFAULT_VQA_PROMPT = "{question}\nAnswer the question using a single word or phrase."


def build_prompt(template: str, example: ImageExample) -> str:
    if example.question is None:
        return template
    if QUESTION_FIELD not in template:
        raise SystemExit(f"error: --prompt {template!r} has no {QUESTION_FIELD}; it marks where the question goes.")
    return template.replace(QUESTION_FIELD, example.question)


def prompt_records(examples: Sequence[ImageExample], template: str) -> list[PromptRecord]:
    """One document per example (the input's ids stay with the examples, not in the records)."""
    return [
        PromptRecord(index=example.index, prompt=build_prompt(template, example), images=[example.image], seed=0)
        for example in examples
    ]


def write_answers(pipe, records: Sequence[PromptRecord], output_dir: Path, batch_size: int, progress, **call_kwargs):
    """Writes the documents of `records` into `output_dir` (the caller splits the work between processes)."""
    for batch in batches(list(records), batch_size):
        generate_batch(pipe, batch, output_dir, lambda entry: progress.update(1), **call_kwargs)


def read_written_answers(output_dir: Path, count: int) -> list[str]:
    """The text of documents 0..count-1 from `documents.jsonl`, stripped."""
    rebuild_documents_jsonl(output_dir)
    texts: dict[int, str] = {}
    for _, entry in read_json_lines(output_dir / DOCUMENTS_FILE):
        texts[entry["index"]] = (entry.get("text") or "").strip()
    missing = [index for index in range(count) if index not in texts]
    if missing:
        raise RuntimeError(f"{len(missing)} answer(s) are missing in {output_dir} (first: document {missing[0]}).")
    return [texts[index] for index in range(count)]


def answer_key(examples: Sequence[ImageExample], format_key: str | None) -> str:
    """The key that names an entry in a results file: the format's, else an id every entry has, else "index"."""
    if format_key is not None:
        return format_key
    for key in ("question_id", "image_id", "id"):
        values = [example.ids.get(key) for example in examples]
        if all(value is not None for value in values) and len(set(map(json.dumps, values))) == len(values):
            return key
    return "index"


def key_value(example: ImageExample, key: str) -> Any:
    return example.index if key == "index" else example.ids[key]


def results_rows(examples: Sequence[ImageExample], texts: Sequence[str], key: str, field: str) -> list[dict]:
    """The standard results file: `[{"question_id": ..., "answer": ...}]` (`{"image_id", "caption"}` for captions)."""
    return [{key: key_value(example, key), field: text} for example, text in zip(examples, texts)]


def read_answer_file(path: Path, examples: Sequence[ImageExample], key: str, field: str) -> list[str]:
    """Answers given in a results file (a JSON list or JSON Lines of `{key: ..., field: ...}`), in example order."""
    if not path.is_file():
        raise SystemExit(f"error: --answers {path} does not exist.")
    if path.suffix.lower() == ".json":
        rows = read_json(path, "--answers")
        if not isinstance(rows, list):
            raise SystemExit(f'error: --answers {path} must be a JSON list of {{"{key}": ..., "{field}": ...}}.')
        numbered = list(enumerate(rows))
    else:
        numbered = list(read_json_lines(path))
    given: dict[str, str] = {}
    for number, row in numbered:
        if not isinstance(row, dict) or key not in row or not isinstance(row.get(field), str):
            raise SystemExit(f'error: --answers {path} entry {number}: expected {{"{key}": ..., "{field}": "..."}}.')
        given[json.dumps(row[key])] = row[field]
    texts = []
    for example in examples:
        value = json.dumps(key_value(example, key))
        if value not in given:
            raise SystemExit(f"error: --answers {path} has no {field} for {key} {value}.")
        texts.append(given[value])
    return texts


__all__ = [
    "ANSWERS_DIR",
    "DEFAULT_CAPTION_PROMPT",
    "DEFAULT_VQA_PROMPT",
    "answer_key",
    "pending_records",
    "prompt_records",
    "read_answer_file",
    "read_written_answers",
    "results_rows",
    "write_answers",
]
