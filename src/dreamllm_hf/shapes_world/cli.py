"""`dreamllm-hf train-demo` and `dreamllm-hf evaluate-demo`: the shipped demo model, rebuilt and measured.

`add_demo_parsers(subparsers)` adds both subcommands to an `argparse` sub-parser set (the main `dreamllm-hf` parser
does so). They can also run on their own: `python -m dreamllm_hf.shapes_world.cli train-demo --seed 0 --output DIR`.
A model of the research project's harder world (`examples/research_projects/shapes_world_v2/`) has its own commands
there.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .. import checks


RESEARCH_ENTRY = "python -m shapes_world_v2"  # run from examples/research_projects/
FIRST_WORLD_NAME = "shapes"


def add_demo_parsers(subparsers) -> None:
    train = subparsers.add_parser(
        "train-demo",
        help="Train the tiny shapes-world DreamLLM from scratch on the CPU (the shipped demo model's recipe).",
        description=(
            "Trains the demo model end to end (tokenizer, autoencoder, diffusion decoder, then DreamLLM stages I to "
            "III through the one trainer, `dreamllm-hf train`) and writes a DreamLLMPipeline folder. About 23 "
            "minutes on two CPU cores."
        ),
    )
    add_train_arguments(train)
    train.set_defaults(func=_run_train_demo, parser=train)

    evaluate = subparsers.add_parser(
        "evaluate-demo",
        help="Caption, text-to-image and interleaved-story accuracy of the demo model, judged deterministically.",
        description=(
            "Prints the figures; the last line is one JSON object with caption_accuracy, t2i_accuracy, "
            "interleaved_match, interleaved_pictures and chat_caption_accuracy. Settings left out take the defaults "
            "of DemoEvaluationSettings (192 held-out pictures captioned, the world's 12 captions drawn 8 times each, "
            "32 stories, the demo model's sampling, seed 0)."
        ),
    )
    evaluate.add_argument("--model", default=None, help="A pipeline folder (default: the shipped demo model).")
    evaluate.add_argument(
        "--seed", type=checks.SEED.parse, default=None, help="Seeds the held-out pictures and the sampling."
    )
    evaluate.add_argument("--num-caption-pictures", type=checks.POSITIVE_INT.parse, default=None, metavar="N")
    evaluate.add_argument(
        "--t2i-per-caption",
        metavar="N",
        type=checks.POSITIVE_INT.parse,
        default=None,
        help="Pictures drawn per caption.",
    )
    evaluate.add_argument("--num-stories", type=checks.POSITIVE_INT.parse, default=None, metavar="N")
    evaluate.add_argument("--num-inference-steps", type=checks.STEPS.parse, default=None, metavar="N")
    evaluate.add_argument("--guidance-scale", type=checks.GUIDANCE_SCALE.parse, default=None)
    add_evaluate_output_arguments(evaluate)
    evaluate.set_defaults(func=_run_evaluate_demo, parser=evaluate)


def add_train_arguments(parser) -> None:
    """The options `train-demo` shares with a research world's training command."""
    parser.add_argument("--output", required=True, help="Folder to write the pipeline to (created if needed).")
    parser.add_argument(
        "--seed", type=checks.SEED.parse, default=0, help="Seeds the data, the initialisation and the noise."
    )
    parser.add_argument(
        "--backbone",
        default=None,
        metavar="NAME",
        help="The LLM and vision tower: llama-clip (the shipped model's, default) or qwen2-siglip (a Qwen2 LLM with "
        "a SigLIP tower, the same sizes otherwise).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Allow an output folder that is not empty.")
    parser.add_argument(
        "--threads",
        type=checks.POSITIVE_INT.parse,
        default=None,
        help="torch CPU threads (default: torch's choice, one per core).",
    )
    parser.add_argument(
        "--recipe", default=None, help="A JSON file of DemoRecipe fields to override (for experiments)."
    )
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="Evaluate the result afterwards (default settings) and put its figures in the model card.",
    )


def add_evaluate_output_arguments(parser) -> None:
    """The options `evaluate-demo` shares with a research world's evaluation command."""
    parser.add_argument("--threads", type=checks.POSITIVE_INT.parse, default=None, help="torch CPU threads.")
    parser.add_argument(
        "--save-dir", default=None, help="Also write the text-to-image grid and the example stories there."
    )
    parser.add_argument(
        "--update-card",
        action="store_true",
        help="Rewrite the model card (README.md) of --model with these figures (needs its training_report.json).",
    )


SETTING_OPTIONS = (
    "num_caption_pictures",
    "t2i_per_caption",
    "num_stories",
    "num_inference_steps",
    "guidance_scale",
    "seed",
)


def set_threads(threads) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def recipe_from_arguments(args, defaults: dict | None = None):
    """The `DemoRecipe` of `train-demo`'s options: `defaults` (a world's), then the `--recipe` file, then `--seed`,
    `--threads` and `--backbone`. An unknown field or backbone is a one-line error."""
    from .demo_recipe import DemoRecipe

    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise SystemExit(
            f"{args.command}: the output folder {output} is not empty. Choose a new folder, or pass --overwrite to "
            "replace the pipeline files in it (other files are left alone)."
        )
    overrides = json.loads(Path(args.recipe).read_text()) if args.recipe else {}
    known = {field.name for field in dataclasses.fields(DemoRecipe)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SystemExit(
            f"{args.command}: --recipe {args.recipe} sets {unknown}, which DemoRecipe lacks; its fields are "
            f"{sorted(known)}."
        )
    chosen = {"seed": args.seed, "num_threads": args.threads}
    if args.backbone is not None:
        chosen["backbone"] = args.backbone
    try:
        return DemoRecipe(**{**(defaults or {}), **overrides, **chosen})
    except ValueError as error:  # an unknown backbone: the message lists the known ones
        raise SystemExit(f"{args.command}: {error}") from error


def print_timings(report: dict) -> None:
    for stage, seconds in report["timings_s"].items():
        print(f"{stage:>28}: {seconds:7.1f} s")
    print(f"{'total':>28}: {report['total_s']:7.1f} s ({report['torch_threads']} threads)")


def _run_train_demo(args) -> int:
    from .demo_training import train_demo

    recipe = recipe_from_arguments(args)
    report = train_demo(args.output, recipe)
    print_timings(report)
    if args.evaluate:
        evaluate_args = argparse.Namespace(
            model=args.output, threads=args.threads, update_card=True, save_dir=None, **dict.fromkeys(SETTING_OPTIONS)
        )
        return _run_evaluate_demo(evaluate_args)
    return 0


def trained_world(model_dir) -> str:
    """The world a demo model was trained in, as its training report records it ("shapes" for the shipped model,
    whose report names none, and for a folder without a report)."""
    report = Path(model_dir) / "training_report.json"
    return json.loads(report.read_text()).get("world", FIRST_WORLD_NAME) if report.is_file() else FIRST_WORLD_NAME


def _run_evaluate_demo(args) -> int:
    from .demo_model_path import DEMO_MODEL_PATH
    from .evaluation import DemoEvaluationSettings, evaluate_pipeline, load_demo_pipeline

    set_threads(args.threads)
    model = args.model or DEMO_MODEL_PATH
    world = trained_world(model)
    if world != FIRST_WORLD_NAME:
        message = (
            f"{model} was trained in the world {world!r} (its training_report.json says so), not in the shapes world "
            f"this command measures; the research project's world has its own command: `{RESEARCH_ENTRY} evaluate "
            "--model DIR`, from examples/research_projects/."
        )
        checks.usage_error(args, message)
    # Options left out keep the settings' defaults (one source of truth; they are listed in the card).
    chosen = {name: getattr(args, name) for name in SETTING_OPTIONS if getattr(args, name) is not None}
    settings = DemoEvaluationSettings(**chosen)
    results = evaluate_pipeline(load_demo_pipeline(model), settings)
    print_details(results, settings.num_stories)
    if args.save_dir:
        save_outputs(results, Path(args.save_dir))
    if args.update_card:
        from .demo_training import write_demo_model_card

        write_demo_model_card(model, evaluation=results)
    keys = ("caption_accuracy", "t2i_accuracy", "interleaved_match", "chat_caption_accuracy")
    summary = {key: round(results[key], 4) for key in keys}
    summary["interleaved_pictures"] = results["interleaved_pictures"]
    print(json.dumps(summary))
    return 0


def print_details(results: dict, num_stories: int) -> None:
    """The examples and breakdowns of an evaluation, before its summary line."""
    print("captions (truth -> caption):")
    for example in results["caption_examples"]:
        print(f"  {example['truth']:>48} -> {example['caption']!r}")
    if "question_examples" in results:
        print("questions (question: truth -> answer):")
        for example in results["question_examples"]:
            print(f"  {example['question']} {example['truth']} -> {example['answer']!r}")
        print("question accuracy by kind: " + json.dumps(results["question_accuracy_by_kind"]))
    print("text-to-image, judged right per caption:")
    for caption, fraction in results["t2i_per_caption"].items():
        print(f"  {caption:>48}: {fraction:.2f}")
    if "t2i_attribute_accuracy" in results:
        print(f"things drawn right (size, colour, shape): {results['t2i_attribute_accuracy']:.3f}")
    print(
        f"stories: {results['stories_with_pictures']}/{num_stories} drew pictures, "
        f"{results['interleaved_pictures']} pictures in all"
    )
    for story in results["story_examples"]:
        print(f"  {story['instruction']!r} -> {story['document']} <{story['stop']}>")


def save_outputs(results: dict, folder: Path) -> None:
    """The text-to-image grid (`t2i_grid.png`, one row per caption) and the example stories (`stories.json`)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = results["t2i_images"]
    rows = len(results["t2i_per_caption"])
    per_row = len(images) // rows
    size = images[0].size[0]
    grid = Image.new("RGB", (size * per_row, size * rows), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % per_row) * size, (index // per_row) * size))
    grid.save(folder / "t2i_grid.png")
    (folder / "stories.json").write_text(json.dumps(results["story_examples"], indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreamllm-hf", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_demo_parsers(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
