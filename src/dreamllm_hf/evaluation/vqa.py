"""VQA accuracy as the VQA challenge defines it, and the question files of VQAv2, OK-VQA, TextVQA and VizWiz.

Accuracy of an answer among ten annotators' answers: min(#annotators who gave it / 3, 1), averaged over the ten
subsets of nine annotators; answers are compared after the normalisation the VQA evaluation describes (lower case;
periods dropped unless a decimal point; other punctuation but apostrophes and colons turned into spaces, commas
between digits dropped; number words as digits; articles dropped; missing apostrophes of contractions put back).
Predictions and annotators' answers are both normalised, as the VQA challenge's server does for predictions (the
VQAv2 annotations are normalised already). TextVQA and VizWiz use the same accuracy.
"""

import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import (
    ImageExample,
    InputError,
    check_ids,
    check_picture,
    check_text,
    fail,
    is_dataset,
    load_dataset_rows,
    read_json,
    read_json_lines,
)


ARTICLES = frozenset({"a", "an", "the"})
# "none" counts as 0, as the VQA evaluation has it.
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
# Contractions people type without their apostrophe. Forms whose bare spelling is another word (we'll/well,
# we're/were, i'll/ill, she'd/shed, it's/its, let's/lets, ...) are left out: "well" must stay "well".
_CONTRACTIONS = (
    "aren't can't couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've he's "
    "how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't "
    "must've needn't not've o'clock oughtn't shan't she'd've she's should've shouldn't shouldn't've somebody'd "
    "somebody's someone'd someone'll someone's something'd something's that'd that's there'd there're there's "
    "they'd they'd've they'll they're they've wasn't we'd've we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'd've who'll who're who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
CONTRACTIONS = {form.replace("'", ""): form for form in _CONTRACTIONS}

_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # every period but one between two digits
_PUNCTUATION = re.compile("[" + re.escape("".join(c for c in string.punctuation if c not in "':.")) + "]")
ANSWERS_PER_QUESTION = 10
_MATCHES_FOR_FULL_CREDIT = 3


def normalize_answer(answer: str) -> str:
    """An answer as the VQA evaluation compares it (see the module docstring)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _DIGIT_COMMA.sub("", text)
    text = _PERIOD.sub("", text)
    text = _PUNCTUATION.sub(" ", text)
    words = []
    for word in text.split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(#matching annotators / 3, 1) averaged over every leave-one-annotator-out subset (one answer: exact)."""
    if not answers:
        raise ValueError("an accuracy needs the annotators' answers.")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(answer) == predicted for answer in answers]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    return sum(min(1.0, (total - match) / _MATCHES_FOR_FULL_CREDIT) for match in matches) / len(matches)


# --------------------------------------------------------------------------------------------------------------------
# Question files


def _answer_list(value: Any) -> list[str]:
    """Annotators' answers: strings, or VQAv2/VizWiz dicts with an "answer"."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise InputError(f'"answers" must be a list of answers, got {value!r:.60}.')
    answers = []
    for item in value:
        text = item.get("answer") if isinstance(item, dict) else item
        answers.append(check_text(text, "answers[]"))
    return answers


def _vqav2(path: Path, data: dict, images_dir: Path | None, annotations: Path | None, template: str | None):
    subtype = data.get("data_subtype")
    template = template or (f"COCO_{subtype}_{{image_id:012d}}.jpg" if subtype else None)
    if template is None:
        raise SystemExit(
            f"error: {path} names no data_subtype; give --image-template (e.g. 'COCO_val2014_{{image_id:012d}}.jpg')."
        )
    if images_dir is None:
        raise SystemExit(f"error: {path} is a VQA questions file; give --images DIR, the folder of its pictures.")
    answers: dict[Any, list[str]] = {}
    if annotations is not None:
        annotation_data = read_json(annotations, "--annotations")
        for number, annotation in enumerate(
            annotation_data.get("annotations", []) if isinstance(annotation_data, dict) else []
        ):
            try:
                answers[annotation["question_id"]] = _answer_list(annotation.get("answers"))
            except (InputError, KeyError, TypeError) as error:
                raise fail(annotations, f"annotations[{number}]", error) from error
        if not answers:
            raise SystemExit(f'error: --annotations {annotations} has no "annotations" list of a VQA annotation file.')
    examples = []
    for number, question in enumerate(data["questions"]):
        try:
            if not isinstance(question, dict) or "question_id" not in question or "image_id" not in question:
                raise InputError('each question needs "question_id", "image_id" and "question".')
            if annotations is not None and question["question_id"] not in answers:
                raise InputError(f"question {question['question_id']} has no entry in --annotations {annotations}.")
            picture = check_picture(template.format(**question), images_dir)
            examples.append(
                ImageExample(
                    len(examples),
                    picture,
                    check_text(question.get("question"), "question"),
                    answers.get(question["question_id"], []),
                    {"question_id": question["question_id"], "image_id": question["image_id"]},
                )
            )
        except (InputError, KeyError, ValueError) as error:
            raise fail(path, f"questions[{number}]", error) from error
    return examples, "question_id"


def _textvqa(path: Path, data: dict, images_dir: Path | None, template: str | None):
    template = template or "{image_id}.jpg"
    if images_dir is None:
        raise SystemExit(f"error: {path} is a TextVQA file; give --images DIR (its train_images folder).")
    examples = []
    for number, entry in enumerate(data["data"]):
        try:
            if not isinstance(entry, dict) or "question_id" not in entry or "image_id" not in entry:
                raise InputError('each entry needs "question_id", "image_id" and "question".')
            examples.append(
                ImageExample(
                    len(examples),
                    check_picture(template.format(**entry), images_dir),
                    check_text(entry.get("question"), "question"),
                    _answer_list(entry.get("answers")),
                    {"question_id": entry["question_id"], "image_id": entry["image_id"]},
                )
            )
        except (InputError, KeyError, ValueError) as error:
            raise fail(path, f"data[{number}]", error) from error
    return examples, "question_id"


def _vizwiz(path: Path, data: list, images_dir: Path | None):
    if images_dir is None:
        raise SystemExit(f"error: {path} is a VizWiz file; give --images DIR, the folder of its pictures.")
    examples = []
    for number, entry in enumerate(data):
        try:
            if not isinstance(entry, dict) or "image" not in entry:
                raise InputError('each entry needs "image" and "question".')
            examples.append(
                ImageExample(
                    len(examples),
                    check_picture(entry["image"], images_dir),
                    check_text(entry.get("question"), "question"),
                    _answer_list(entry.get("answers")),
                    {"image": entry["image"]},
                )
            )
        except InputError as error:
            raise fail(path, f"[{number}]", error) from error
    return examples, "image"


def _plain_entry(entry: Any, index: int, base_dir: Path) -> ImageExample:
    if not isinstance(entry, dict) or "image" not in entry or "question" not in entry:
        raise InputError('expected {"image": "pic.png", "question": "...", "answers": [...]} (answers optional).')
    return ImageExample(
        index,
        check_picture(entry["image"], base_dir),
        check_text(entry["question"], "question"),
        _answer_list(entry.get("answers")),
        check_ids(entry, ("image", "question", "answers")),
    )


def read_vqa_examples(
    path: Path,
    images_dir: Path | None = None,
    annotations: Path | None = None,
    image_template: str | None = None,
) -> tuple[list[ImageExample], str, str | None]:
    """
    Questions (and annotators' answers where known) of a VQA file; returns the examples, the format's name and the
    key that names a question in results files (None: all the input's ids are kept).

    Formats: VQAv2 and OK-VQA (a questions JSON with `--annotations`, pictures `COCO_<subtype>_<id>.jpg` in --images),
    TextVQA (`{"data": [...]}`, pictures `<image_id>.jpg`), VizWiz (a JSON list of `{"image", "question",
    "answers"}`), JSON Lines of `{"image", "question", "answers"}` (other keys kept) or a `datasets` dataset with
    `image`, `question` and `answers` columns.
    """
    if not path.exists():
        raise SystemExit(f"error: --data {path} does not exist.")
    if is_dataset(path):
        examples = []
        for number, row in enumerate(load_dataset_rows(path, ("image", "question"))):
            try:
                examples.append(_plain_entry(row, number, images_dir or path.parent))
            except InputError as error:
                raise fail(path, f"row {number}", error) from error
        name, key = "dataset", None
    elif path.suffix.lower() == ".json":
        data = read_json(path, "--data")
        if isinstance(data, dict) and isinstance(data.get("questions"), list):
            (examples, key), name = _vqav2(path, data, images_dir, annotations, image_template), "vqav2"
        elif isinstance(data, dict) and isinstance(data.get("data"), list):
            (examples, key), name = _textvqa(path, data, images_dir, image_template), "textvqa"
        elif isinstance(data, list):
            (examples, key), name = _vizwiz(path, data, images_dir), "vizwiz"
        else:
            raise SystemExit(
                f'error: {path} is not a VQA file this command knows: a VQAv2/OK-VQA questions file ("questions"), '
                'TextVQA ("data") or VizWiz (a list).'
            )
    else:
        examples = []
        for number, entry in read_json_lines(path):
            try:
                examples.append(_plain_entry(entry, len(examples), images_dir or path.parent))
            except InputError as error:
                raise fail(path, f"line {number}", error) from error
        name, key = "jsonl", None
    if annotations is not None and name != "vqav2":
        raise SystemExit(f"error: --annotations goes with a VQAv2/OK-VQA questions file; {path} holds its answers.")
    if not examples:
        raise SystemExit(f"error: --data {path} holds no questions.")
    return examples, name, key


def score_answers(examples: Sequence[ImageExample], predictions: Sequence[str]) -> dict:
    """Mean VQA accuracy × 100 over the examples that have annotators' answers."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} questions but {len(predictions)} answers.")
    accuracies = [vqa_accuracy(p, e.references) for e, p in zip(examples, predictions) if e.references]
    return {
        "accuracy": 100 * sum(accuracies) / len(accuracies) if accuracies else None,
        "scored": len(accuracies),
        "unanswered_by_annotators": len(examples) - len(accuracies),
    }


__all__ = [
    "ANSWERS_PER_QUESTION",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "normalize_answer",
    "read_vqa_examples",
    "score_answers",
    "vqa_accuracy",
]
