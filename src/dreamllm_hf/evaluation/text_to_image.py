"""Zero-shot text-to-image evaluation: pictures for captions (one per seed), the best by CLIP score, FID.

The protocol of the paper's MS-COCO row (`scripts/eval/text2img/eval_coco_zero_shot_clip8_select.sh` in the original
code): 30K captions of COCO val2014, one picture per caption for each of the seeds 42..49 (guidance 2.0, 150 DDPM
steps), for every caption the picture that CLIP ViT-L/14 scores best against it, then FID at 256² against COCO's
pictures. The LN-COCO row draws one picture per caption and selects nothing.

Pictures are written as `pictures/<caption id>-s<seed>.png`, each under a temporary name and renamed, and a re-run
draws only the pictures that are missing. The picture of caption `i` with seed `s` is drawn from its own generator
(`picture_seed(s, i)`), so it is the same however the work is batched or shared between processes.
"""

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..pipelines.prompt_files import batches, write_atomically
from .clip_score import CLIPScorer, select_best
from .data import CaptionRecord, open_picture


# The paper's MS-COCO FID settings (see the module docstring); the command's defaults.
PAPER_SEEDS = "42-49"
PAPER_STEPS = 150
PAPER_GUIDANCE = 2.0
PAPER_RESOLUTION = 256
DEFAULT_SEEDS = "42"  # one picture per caption, no selection (the LN-COCO row)

PICTURES_DIR = "pictures"
SELECTION_FILE = "selected.jsonl"
GENERATION_FILE = "generation.json"


# torch's CPU generator keeps only the low 32 bits of a seed. seed * _SEED_STRIDE + index, modulo 2**32, differs for
# every (seed, caption) pair while there are fewer captions than the stride and the seeds span fewer than 4294.
_SEED_STRIDE = 1_000_003


def picture_seed(seed: int, index: int) -> int:
    """The generator seed of caption `index`'s picture for `seed`: one noise stream per (seed, caption)."""
    return (seed * _SEED_STRIDE + index) % 2**32


@dataclass(frozen=True)
class PictureJob:
    record: CaptionRecord
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.record.id}-s{self.seed}.png"


def picture_jobs(records: Sequence[CaptionRecord], seeds: Sequence[int]) -> list[PictureJob]:
    return [PictureJob(record, seed) for record in records for seed in seeds]


def captions_digest(records: Sequence[CaptionRecord]) -> str:
    text = json.dumps([record.caption for record in records], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_generation_settings(output_dir: Path, settings: dict) -> None:
    """Exits if `output_dir` holds pictures drawn with other settings; records the settings otherwise."""
    path = output_dir / GENERATION_FILE
    if path.is_file():
        try:
            done = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: cannot read {path} ({error}); delete it, or use a new --output-dir.") from error
        changed = {key: (done.get(key), value) for key, value in settings.items() if done.get(key) != value}
        if changed:
            listed = "; ".join(f"{key}: {old!r} then, {new!r} now" for key, (old, new) in changed.items())
            raise SystemExit(
                f"error: the pictures in {output_dir} were drawn with other settings ({listed}). Use a new "
                f"--output-dir, or delete {path} and {output_dir / PICTURES_DIR} to draw them again."
            )
        return
    write_atomically(path, lambda target: target.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8"))


def pending_jobs(jobs: Sequence[PictureJob], output_dir: Path) -> list[PictureJob]:
    folder = output_dir / PICTURES_DIR
    return [job for job in jobs if not (folder / job.file_name).is_file()]


def draw_pictures(
    pipe,
    jobs: Sequence[PictureJob],
    output_dir: Path,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
    **call_kwargs,
) -> None:
    """Draws `jobs` with a `DreamLLMText2ImagePipeline`, `batch_size` pictures a call, each written when its batch
    ends; `call_kwargs` are the pipeline's arguments (steps, guidance, size)."""
    folder = output_dir / PICTURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for batch in batches(list(jobs), batch_size):
        output = pipe(
            [job.record.caption for job in batch],
            generator=[torch.Generator("cpu").manual_seed(picture_seed(job.seed, job.record.index)) for job in batch],
            output_type="pil",
            **call_kwargs,
        )
        for job, picture in zip(batch, output.images):
            write_atomically(folder / job.file_name, lambda path, picture=picture: picture.save(path, format="PNG"))
        if on_batch is not None:
            on_batch(len(batch))


def select_pictures(
    records: Sequence[CaptionRecord], seeds: Sequence[int], output_dir: Path, scorer: CLIPScorer | None
) -> list[dict]:
    """
    One picture per caption: with several seeds the one `scorer` rates best against its caption. Writes
    `selected.jsonl` (`file_name` relative to `output_dir`, `caption`, the input's ids, the chosen seed and every
    seed's CLIP score) and returns its rows.
    """
    if len(seeds) > 1 and scorer is None:
        raise SystemExit("error: several --seeds need --select-with CLIP_DIR to keep one picture per caption.")
    rows = []
    for record in tqdm(records, desc="CLIP selection" if len(seeds) > 1 else "pictures", unit="caption", leave=False):
        files = [output_dir / PICTURES_DIR / PictureJob(record, seed).file_name for seed in seeds]
        scores = None
        chosen = 0
        if len(seeds) > 1:
            scores = scorer.scores([open_picture(path) for path in files], [record.caption] * len(files))
            chosen = select_best(scores)
        rows.append(
            {
                **record.ids,
                "id": record.id,
                "caption": record.caption,
                "file_name": f"{PICTURES_DIR}/{files[chosen].name}",
                "seed": seeds[chosen],
                "clip_scores": None if scores is None else {str(s): round(float(v), 4) for s, v in zip(seeds, scores)},
            }
        )
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_atomically(output_dir / SELECTION_FILE, lambda path: path.write_text(lines, encoding="utf-8"))
    return rows


def read_generated(path: Path) -> tuple[list[Path], list[str] | None]:
    """
    The pictures of `--generated`: a metadata file (`selected.jsonl` as written here, or any JSON Lines of
    `{"file_name": ..., "caption": ...}`, paths relative to its folder), a folder with such a `metadata.jsonl` (the
    `datasets` imagefolder layout), or a plain folder (every picture in it, no captions).
    """
    from .data import read_json_lines
    from .fid import picture_files

    if path.is_dir() and not (path / "metadata.jsonl").is_file():
        return picture_files(path), None
    metadata = path / "metadata.jsonl" if path.is_dir() else path
    if not metadata.is_file():
        raise SystemExit(f"error: --generated {path} is neither a folder of pictures nor a metadata file.")
    files, captions = [], []
    for number, row in read_json_lines(metadata):
        name = row.get("file_name") if isinstance(row, dict) else None
        if not isinstance(name, str) or not (metadata.parent / name).is_file():
            raise SystemExit(
                f'error: {metadata} line {number}: "file_name" {name!r} is not a picture beside it; each line needs '
                '{"file_name": "pictures/x.png", "caption": "..."}.'
            )
        files.append(metadata.parent / name)
        caption = row.get("caption", row.get("text"))
        captions.append(caption if isinstance(caption, str) else None)
    if len(files) < 2:
        raise SystemExit(f"error: {metadata} lists {len(files)} picture(s); FID needs at least 2.")
    return files, (captions if all(caption is not None for caption in captions) else None)


__all__ = [
    "DEFAULT_SEEDS",
    "PAPER_GUIDANCE",
    "PAPER_RESOLUTION",
    "PAPER_SEEDS",
    "PAPER_STEPS",
    "PictureJob",
    "check_generation_settings",
    "draw_pictures",
    "pending_jobs",
    "picture_jobs",
    "picture_seed",
    "read_generated",
    "select_pictures",
]
