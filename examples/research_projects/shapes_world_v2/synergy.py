"""The paper's synergy claim at toy scale: does learning to draw help the demo model to see?

For each seed, two models of the version-2 world's recipe on the same data and the same stage-0 decoder: the joint
recipe (`scene_recipe()`, comprehension and creation) and its comprehension-only control (`creation=False`: the same
stages, steps, batch sizes and learning rates, so as many LLM updates, all spent on picture -> text). Both are measured
by the world's caption exact match and question accuracy on the same held-out pictures. From
`examples/research_projects/`:

    python -m shapes_world_v2 synergy --seeds 0 1 2 --work DIR                 # six trainings
    python -m shapes_world_v2 synergy --seeds 0 1 2 --work DIR --joint-seed0 MODEL   # five: seed 0's joint is MODEL

The first joint run trains stage 0 (the part the original takes pretrained) and every later run reuses its decoder;
`--joint-seed0` gives a model already trained with the recipe and seed 0 (`python -m shapes_world_v2 train --seed 0`)
for that run and its decoder. Finished runs in `--work` are reused, so the study can be resumed or its runs spread over
processes (`--only joint|comprehension`). The last line is one JSON object: each arm's mean and spread, and with both
arms the per-seed difference joint - comprehension (a seed gives both arms the same data and decoder).
"""

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from dreamllm_hf.shapes_world.evaluation import load_demo_pipeline

from .scene_evaluation import SceneEvaluationSettings, caption_accuracy, question_accuracy
from .scene_world import scene_recipe, train_scene_demo


ARMS = {"joint": True, "comprehension": False}  # each arm's `creation`
METRICS = ("caption_accuracy", "question_accuracy")


def run(work: Path, arm: str, seed: int, decoder: Path | None, overrides: dict, pictures: int) -> dict:
    """Trains (unless done) and measures one model; its figures are kept in `figures.json` beside it."""
    folder = work / f"{arm}-seed{seed}"
    figures_path = folder / "figures.json"
    if figures_path.exists():
        return json.loads(figures_path.read_text())
    if not (folder / "model_index.json").exists():
        recipe = replace(scene_recipe(**overrides), seed=seed)
        train_scene_demo(folder, recipe, creation=ARMS[arm], log=lambda line: None, reuse_decoder=decoder)
    return measure(folder, figures_path, pictures)


def measure(folder: Path, figures_path: Path, pictures: int) -> dict:
    settings = SceneEvaluationSettings(num_caption_pictures=pictures, num_questions=pictures)
    pipe = load_demo_pipeline(folder)
    figures = {
        "caption_accuracy": caption_accuracy(pipe, settings)["caption_accuracy"],
        "question_accuracy": question_accuracy(pipe, settings)["question_accuracy"],
    }
    figures_path.write_text(json.dumps(figures) + "\n")
    return figures


def summary(values: list[float]) -> dict:
    return {
        "mean": round(statistics.mean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "values": [round(value, 4) for value in values],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", required=True, help="Where the models are written (and found when resuming).")
    parser.add_argument("--joint-seed0", default=None, help="A default-recipe seed-0 model to use for that run.")
    parser.add_argument("--only", choices=sorted(ARMS), default=None, help="Run one arm only.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each training.")
    parser.add_argument("--recipe", default=None, help="A JSON file of DemoRecipe fields to override (both arms).")
    parser.add_argument("--num-pictures", type=int, default=192, help="Held-out pictures captioned and asked about.")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_study(parser.parse_args(argv))


def run_study(args: argparse.Namespace) -> dict:
    """The study of `add_arguments`' options; returns (and prints last) its report."""
    overrides = json.loads(Path(args.recipe).read_text()) if args.recipe else {}
    overrides["num_threads"] = args.threads

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    decoder = Path(args.joint_seed0) if args.joint_seed0 else None
    if decoder is not None:
        seed0 = work / "joint-seed0"
        if not (seed0 / "figures.json").exists():
            seed0.mkdir(exist_ok=True)
            print(json.dumps(measure(decoder, seed0 / "figures.json", args.num_pictures)))
    results = {arm: [] for arm in ARMS if args.only in (None, arm)}
    for seed in args.seeds:
        for arm in results:
            figures = run(work, arm, seed, decoder, overrides, args.num_pictures)
            if decoder is None and arm == "joint":
                decoder = work / f"joint-seed{seed}"  # the first joint run's stage 0 serves every later run
            results[arm].append(figures)
            print(json.dumps({"arm": arm, "seed": seed, **figures}), flush=True)
    report = {
        arm: {metric: summary([run[metric] for run in runs]) for metric in METRICS} for arm, runs in results.items()
    }
    if len(results) == len(ARMS):  # seeds share their data and decoder, so the per-seed difference is the finding
        report["joint_minus_comprehension"] = {
            metric: summary([j[metric] - c[metric] for j, c in zip(results["joint"], results["comprehension"])])
            for metric in METRICS
        }
    for arm, metrics in report.items():
        line = ", ".join(f"{metric} {m['mean']:.3f} ± {m['std']:.3f}" for metric, m in metrics.items())
        print(f"{arm:>25}: {line}  (seeds {args.seeds})")
    print(json.dumps({"seeds": args.seeds, **report}))
    return report


if __name__ == "__main__":
    main()
