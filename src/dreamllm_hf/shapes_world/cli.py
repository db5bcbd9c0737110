"""`dreamllm-hf train-demo` and `dreamllm-hf evaluate-demo`: the shipped demo model, rebuilt and measured.

`add_demo_parsers(subparsers)` adds both subcommands to an `argparse` sub-parser set (the main `dreamllm-hf` parser
does so). They can also run on their own: `python -m dreamllm_hf.shapes_world.cli train-demo --seed 0 --output DIR`.
"""

import argparse
import json
import sys
from pathlib import Path

from .. import checks


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
    train.add_argument("--output", required=True, help="Folder to write the pipeline to (created if needed).")
    train.add_argument(
        "--seed", type=checks.SEED.parse, default=0, help="Seeds the data, the initialisation and the noise."
    )
    train.add_argument(
        "--backbone",
        default=None,
        metavar="NAME",
        help="The LLM and vision tower: llama-clip (the shipped model's, default) or qwen2-siglip (a Qwen2 LLM with "
        "a SigLIP tower, the same sizes otherwise).",
    )
    train.add_argument(
        "--world",
        default="shapes",
        metavar="NAME",
        help="shapes (one shape on 32x32: the shipped model's world, default) or scenes (version 2: one or two shapes "
        "on 64x64 with sizes and where they stand, questions, stories of changes; its own recipe defaults).",
    )
    train.add_argument("--overwrite", action="store_true", help="Allow an output folder that is not empty.")
    train.add_argument(
        "--threads",
        type=checks.POSITIVE_INT.parse,
        default=None,
        help="torch CPU threads (default: torch's choice, one per core).",
    )
    train.add_argument(
        "--recipe", default=None, help="A JSON file of DemoRecipe fields to override (for experiments)."
    )
    train.add_argument(
        "--evaluate",
        action="store_true",
        help="Run evaluate-demo (default settings) on the result afterwards and put its figures in the model card.",
    )
    train.set_defaults(func=_run_train_demo)

    evaluate = subparsers.add_parser(
        "evaluate-demo",
        help="Caption, question, text-to-image and interleaved-story accuracy of the demo model, judged "
        "deterministically.",
        description=(
            "Prints the figures; the last line is one JSON object with caption_accuracy, question_accuracy, "
            "t2i_accuracy and interleaved_match. The world is the one the model's training report names. In the "
            "version-2 world (scenes) a caption is right when everything it says is, a drawing when every thing and "
            "the relation are, and settings left out take the defaults of SceneEvaluationSettings (192 held-out "
            "pictures captioned, 192 questions, 24 captions drawn 4 times each, 32 stories, the demo model's sampling, "
            "seed 0). In the first world (the shipped model's) DemoEvaluationSettings holds them (192 pictures, its 12 "
            "captions drawn 8 times each, 32 stories), and question_accuracy is null."
        ),
    )
    evaluate.add_argument("--model", default=None, help="A pipeline folder (default: the shipped demo model).")
    evaluate.add_argument(
        "--seed", type=checks.SEED.parse, default=None, help="Seeds the held-out pictures and the sampling."
    )
    evaluate.add_argument("--num-caption-pictures", type=checks.POSITIVE_INT.parse, default=None)
    evaluate.add_argument("--num-questions", type=checks.POSITIVE_INT.parse, default=None)
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
    evaluate.add_argument("--num-stories", type=checks.POSITIVE_INT.parse, default=None)
    evaluate.add_argument("--num-inference-steps", type=checks.STEPS.parse, default=None)
    evaluate.add_argument("--guidance-scale", type=checks.GUIDANCE_SCALE.parse, default=None)
    evaluate.add_argument("--threads", type=checks.POSITIVE_INT.parse, default=None, help="torch CPU threads.")
    evaluate.add_argument(
        "--save-dir", default=None, help="Also write the text-to-image grid and the example stories there."
    )
    evaluate.add_argument(
        "--update-card",
        action="store_true",
        help="Rewrite the model card (README.md) of --model with these figures (needs its training_report.json).",
    )
    evaluate.set_defaults(func=_run_evaluate_demo, parser=evaluate)


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
SCENE_ONLY_OPTIONS = {"num_questions": "--num-questions", "num_t2i_scenes": "--num-t2i-captions"}


def _set_threads(threads) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _run_train_demo(args) -> int:
    from .demo_training import DemoRecipe, train_demo

    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise SystemExit(
            f"train-demo: the output folder {output} is not empty. Choose a new folder, or pass --overwrite to replace "
            "the pipeline files in it (other files are left alone)."
        )
    overrides = json.loads(Path(args.recipe).read_text()) if args.recipe else {}
    chosen = {"seed": args.seed, "num_threads": args.threads}
    if args.backbone is not None:
        chosen["backbone"] = args.backbone
    try:
        recipe = DemoRecipe.for_world(args.world, **{**overrides, **chosen})
    except ValueError as error:  # an unknown backbone or world: the message lists the known ones
        raise SystemExit(f"train-demo: {error}") from error
    report = train_demo(args.output, recipe)
    for stage, seconds in report["timings_s"].items():
        print(f"{stage:>28}: {seconds:7.1f} s")
    print(f"{'total':>28}: {report['total_s']:7.1f} s ({report['torch_threads']} threads)")
    if args.evaluate:
        evaluate_args = argparse.Namespace(
            model=args.output, threads=args.threads, update_card=True, save_dir=None, **dict.fromkeys(SETTING_OPTIONS)
        )
        return _run_evaluate_demo(evaluate_args)
    return 0


def _run_evaluate_demo(args) -> int:
    from .demo_model_path import DEMO_MODEL_PATH

    _set_threads(args.threads)
    # Options left out keep the settings' defaults (one source of truth; they are listed in the card).
    chosen = {name: getattr(args, name) for name in SETTING_OPTIONS if getattr(args, name) is not None}
    model = args.model or DEMO_MODEL_PATH
    if demo_world(model) == "scenes":
        from .scene_evaluation import SceneEvaluationSettings, evaluate_pipeline, load_demo_pipeline

        settings = SceneEvaluationSettings(**chosen)
    else:
        from .evaluation import DemoEvaluationSettings, evaluate_pipeline, load_demo_pipeline

        settings = DemoEvaluationSettings(**_first_world_settings(args, chosen))
    results = evaluate_pipeline(load_demo_pipeline(model), settings)
    _print_details(results, settings.num_stories)
    if args.save_dir:
        _save_outputs(results, Path(args.save_dir))
    if args.update_card:
        from .model_card import write_demo_model_card

        write_demo_model_card(model, evaluation=results)
    summary = {
        "caption_accuracy": round(results["caption_accuracy"], 4),
        # null for a model of the first world, which was never asked questions
        "question_accuracy": round(results["question_accuracy"], 4) if "question_accuracy" in results else None,
        "t2i_accuracy": round(results["t2i_accuracy"], 4),
        "interleaved_match": round(results["interleaved_match"], 4),
        "interleaved_pictures": results["interleaved_pictures"],
        "chat_caption_accuracy": round(results["chat_caption_accuracy"], 4),
    }
    print(json.dumps(summary))
    return 0


def demo_world(model_dir) -> str:
    """The world a demo model was trained in, as its training report records it: "scenes" (the version-2 world of
    `scenes.py`) or "shapes" (the first demo model's, `world.py`, whose report names none). A folder without a report
    is taken to be of the version-2 world."""
    report = Path(model_dir) / "training_report.json"
    return json.loads(report.read_text()).get("world", "shapes") if report.is_file() else "scenes"


def _first_world_settings(args, chosen: dict) -> dict:
    """The options as `DemoEvaluationSettings` of the first world (12 captions, no questions) reads them."""
    unknown = [flag for name, flag in SCENE_ONLY_OPTIONS.items() if name in chosen]
    if unknown:
        options = " and ".join(unknown)
        checks.usage_error(
            args,
            f"{options}: the model {args.model or '(the shipped one)'} was trained in the first shapes world "
            "(one shape, 12 captions, no questions); leave them out for it.",
        )
    if "t2i_per_scene" in chosen:
        chosen["t2i_per_caption"] = chosen.pop("t2i_per_scene")
    return chosen


def _print_details(results: dict, num_stories: int) -> None:
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


def _save_outputs(results: dict, folder: Path) -> None:
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
