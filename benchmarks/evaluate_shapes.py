"""The shapes-world column of the README's evaluation table: the README's `dreamllm-hf evaluate` commands, run as
they are written there, on the shipped demo model (or --model DIR), then the figures as a Markdown table.

    python benchmarks/evaluate_shapes.py [--model DIR] [--work-dir outputs/evaluate_shapes]

Besides the commands' own scores it reports how many of the kept pictures `classify_shape_image` reads as the
caption asks (with one seed, with CLIP selection among eight, and over all eight), which no command prints.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image


def run(command: list[str], cwd: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def judged(folder: Path, seeds: list[int] | None = None) -> tuple[int, int]:
    """(right, total) of the kept pictures of an `evaluate fid` output, or of every seed's picture with `seeds`."""
    from dreamllm_hf.shapes_world import classify_shape_image
    from dreamllm_hf.shapes_world.evaluation import named_colour_and_shape

    rows = [json.loads(line) for line in (folder / "selected.jsonl").read_text().splitlines()]
    files = [
        (folder / (row["file_name"] if seeds is None else f"pictures/{row['id']}-s{seed}.png"), row["caption"])
        for row in rows
        for seed in (seeds or [None])
    ]
    right = sum(
        classify_shape_image(PIL.Image.open(path).convert("RGB")) == named_colour_and_shape(caption)
        for path, caption in files
    )
    return right, len(files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--work-dir", type=Path, default=Path("outputs/evaluate_shapes"))
    args = parser.parse_args()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "dreamllm_hf.cli", "evaluate"]
    fid = ["--captions", "shapes_eval/captions.jsonl", "--reference", "shapes_eval/reference", "--resolution", "32"]
    clip = "shapes_eval/clip"
    drawing = ["--model", args.model, "--steps", "25", "--guidance", "2", "--feature-model", clip]
    commands = {
        "shapes-data": ["shapes-data", "--output-dir", "shapes_eval"],
        "fid-clip8": [
            "fid", *drawing, *fid, "--seeds", "42-49", "--select-with", clip, "--output-dir", "out/fid-clip8",
        ],
        "fid-1seed": ["fid", *drawing, *fid, "--seeds", "42", "--clip-model", clip, "--output-dir", "out/fid-1seed"],
        "fid-drawn": [
            "fid", "--generated", "shapes_eval/drawn", "--reference", "shapes_eval/reference", "--clip-model", clip,
            "--feature-model", clip, "--resolution", "32", "--output-dir", "out/fid-drawn",
        ],
        "captions": [
            "captions", "--model", args.model, "--data", "shapes_eval/captioning.jsonl", "--prompt", "<image>",
            "--no-chat-template", "--output-dir", "out/captions",
        ],
        "vqa": [
            "vqa", "--model", args.model, "--data", "shapes_eval/vqa.jsonl", "--prompt", "{question}",
            "--no-chat-template", "--output-dir", "out/vqa",
        ],
    }  # fmt: skip
    results, seconds = {}, {}
    for name, command in commands.items():
        results[name], seconds[name] = run([*cli, *command], work)
        print(f"{name}: {seconds[name]:.0f} s", file=sys.stderr)
    one, kept, every = (
        judged(work / "out/fid-1seed"),
        judged(work / "out/fid-clip8"),
        judged(work / "out/fid-clip8", list(range(42, 50))),
    )
    figures = {
        name: {key: value for key, value in result.items() if key not in ("settings", "examples", "unavailable")}
        for name, result in results.items()
    }
    figures["judged"] = {"seed 42": one, "kept of 8": kept, "all 8": every}
    figures["seconds"] = {name: round(value) for name, value in seconds.items()}
    print(json.dumps(figures, indent=1))
    fid_rows = (
        ("the world's own pictures of the captions (`drawn/`)", "fid-drawn", None),
        ("demo model, seed 42 (the LN-COCO protocol)", "fid-1seed", one),
        ("demo model, best of seeds 42-49 by CLIP (the MS-COCO protocol)", "fid-clip8", kept),
    )
    print("| set | FID | CLIP score | judged right |\n| --- | --- | --- | --- |")
    for label, name, right in fid_rows:
        share = "-" if right is None else f"{100 * right[0] / right[1]:.1f} %"
        print(f"| {label} | {results[name]['fid']:.3f} | {results[name]['clip_score']:.1f} | {share} |")
    captions = results["captions"]
    print(
        f"captions: CIDEr {captions['CIDEr']:.1f}, METEOR {captions.get('METEOR', float('nan')):.1f}, ROUGE-L "
        f"{captions['ROUGE-L']:.1f}, BLEU-4 {captions['BLEU-4']:.1f}; vqa: {results['vqa']['accuracy']:.1f}; all 8 "
        f"seeds judged right: {100 * every[0] / every[1]:.1f} %"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
