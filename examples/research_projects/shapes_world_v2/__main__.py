"""`python -m shapes_world_v2`: train, evaluate and study models of the version-2 world (run from
`examples/research_projects/`, or with it on `PYTHONPATH`).

    python -m shapes_world_v2 train --seed 0 --output DIR [--evaluate]
    python -m shapes_world_v2 evaluate --model DIR [--update-card]
    python -m shapes_world_v2 synergy --seeds 0 1 2 --work DIR

`train` and `evaluate` take the options of `dreamllm-hf train-demo` and `evaluate-demo`; the world's own defaults are
`scene_world.SCENE_RECIPE_DEFAULTS` and `scene_evaluation.SceneEvaluationSettings`.
"""

import argparse
import json
import sys
from pathlib import Path

from dreamllm_hf import checks
from dreamllm_hf.shapes_world.cli import (
    add_evaluate_output_arguments,
    add_train_arguments,
    print_details,
    print_timings,
    recipe_from_arguments,
    save_outputs,
    set_threads,
    trained_world,
)

from . import synergy
from .scene_world import SCENE_RECIPE_DEFAULTS, SCENE_WORLD, train_scene_demo


SETTING_OPTIONS = (
    "num_caption_pictures",
    "num_questions",
    "num_t2i_scenes",
    "t2i_per_scene",
    "num_stories",
    "num_inference_steps",
    "guidance_scale",
    "seed",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shapes_world_v2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", required=True)

    train = subparsers.add_parser(
        "train",
        help="Train a model of the version-2 world from scratch on the CPU (about 47 minutes on two cores).",
        description="The package's demo recipe (`dreamllm-hf train-demo`) in the version-2 world, with its defaults.",
    )
    add_train_arguments(train)
    train.set_defaults(func=run_train, parser=train)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="Caption, question, text-to-image and interleaved-story accuracy of a model of the version-2 world.",
        description=(
            "Prints the figures; the last line is one JSON object with caption_accuracy, question_accuracy, "
            "t2i_accuracy, interleaved_match, interleaved_pictures and chat_caption_accuracy. A caption is right when "
            "everything it says is, a drawing when every thing and the relation are; settings left out take the "
            "defaults of SceneEvaluationSettings (192 held-out pictures captioned, 192 questions, 24 captions drawn 4 "
            "times each, 32 stories, the demo model's sampling, seed 0)."
        ),
    )
    evaluate.add_argument("--model", required=True, help="A pipeline folder of the version-2 world.")
    evaluate.add_argument(
        "--seed", type=checks.SEED.parse, default=None, help="Seeds the held-out pictures and the sampling."
    )
    evaluate.add_argument("--num-caption-pictures", type=checks.POSITIVE_INT.parse, default=None, metavar="N")
    evaluate.add_argument("--num-questions", type=checks.POSITIVE_INT.parse, default=None, metavar="N")
    evaluate.add_argument(
        "--num-t2i-captions",
        dest="num_t2i_scenes",
        metavar="N",
        type=checks.POSITIVE_INT.parse,
        default=None,
        help="Captions of held-out scenes drawn.",
    )
    evaluate.add_argument(
        "--t2i-per-caption",
        dest="t2i_per_scene",
        metavar="N",
        type=checks.POSITIVE_INT.parse,
        default=None,
        help="Pictures drawn per caption.",
    )
    evaluate.add_argument("--num-stories", type=checks.POSITIVE_INT.parse, default=None, metavar="N")
    evaluate.add_argument("--num-inference-steps", type=checks.STEPS.parse, default=None, metavar="N")
    evaluate.add_argument("--guidance-scale", type=checks.GUIDANCE_SCALE.parse, default=None)
    add_evaluate_output_arguments(evaluate)
    evaluate.set_defaults(func=run_evaluate, parser=evaluate)

    study = subparsers.add_parser(
        "synergy",
        help="The synergy study: the joint recipe against its comprehension-only control, seed by seed.",
        description=synergy.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    synergy.add_arguments(study)
    study.set_defaults(func=run_synergy)
    return parser


def run_synergy(args) -> int:
    synergy.run_study(args)
    return 0


def run_train(args) -> int:
    recipe = recipe_from_arguments(args, SCENE_RECIPE_DEFAULTS)
    report = train_scene_demo(args.output, recipe)
    print_timings(report)
    if args.evaluate:
        evaluate_args = argparse.Namespace(
            model=args.output, threads=args.threads, update_card=True, save_dir=None, **dict.fromkeys(SETTING_OPTIONS)
        )
        return run_evaluate(evaluate_args)
    return 0


def run_evaluate(args) -> int:
    from dreamllm_hf.shapes_world.demo_training import write_demo_model_card
    from dreamllm_hf.shapes_world.evaluation import load_demo_pipeline

    from .scene_evaluation import SceneEvaluationSettings, evaluate_pipeline

    set_threads(args.threads)
    world = trained_world(args.model)
    if world != SCENE_WORLD.name:
        checks.usage_error(
            args,
            f"{args.model} was trained in the world {world!r} (its training_report.json says so, or it has none), not "
            "in the version-2 world; measure a model of the shipped world with `dreamllm-hf evaluate-demo`.",
        )
    chosen = {name: getattr(args, name) for name in SETTING_OPTIONS if getattr(args, name) is not None}
    settings = SceneEvaluationSettings(**chosen)
    results = evaluate_pipeline(load_demo_pipeline(args.model), settings)
    print_details(results, settings.num_stories)
    if args.save_dir:
        save_outputs(results, Path(args.save_dir))
    if args.update_card:
        write_demo_model_card(args.model, evaluation=results, world=SCENE_WORLD)
    keys = ("caption_accuracy", "question_accuracy", "t2i_accuracy", "interleaved_match", "chat_caption_accuracy")
    summary = {key: round(results[key], 4) for key in keys}
    summary["interleaved_pictures"] = results["interleaved_pictures"]
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
