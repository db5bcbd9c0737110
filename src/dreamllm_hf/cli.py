"""`dreamllm-hf`: generate documents, convert the original release and publish it, build a DreamLLM from other
backbones, fine-tune, run, train and evaluate the demo model."""

import argparse
import sys


def _add_demo_parser(subparsers) -> None:
    from .checks import SEED
    from .shapes_world.demo_model_path import DEMO_SEED

    parser = subparsers.add_parser(
        "demo",
        help="The shipped demo model (a tiny DreamLLM trained on the shapes world) writes an illustrated story.",
        description="Runs interleaved generation offline and writes an HTML document with the text and the pictures.",
    )
    parser.add_argument("--output-dir", default="outputs/demo", help="Where story.html and the drawing go.")
    parser.add_argument("--prompt", default="Tell me a story.", help="The instruction (the demo model knows stories).")
    parser.add_argument(
        "--seed",
        type=SEED.parse,
        default=DEMO_SEED,
        help=f"Seeds the sampled text and the pictures; each seed tells another story ({DEMO_SEED}: three pictures, "
        "each of what its sentence names; 0: one).",
    )
    parser.add_argument("--model", default=None, help="A pipeline folder (default: the shipped demo model).")
    parser.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.output_dir, prompt=args.prompt, seed=args.seed, model_dir=args.model)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .building.cli import add_init_parser
    from .conversion.cli import add_convert_parser, add_push_parser
    from .evaluation.cli import add_evaluate_parser
    from .pipelines.cli import add_generate_parser
    from .serve.cli import add_serve_parser
    from .shapes_world.cli import add_demo_parsers
    from .training.cli import add_train_parser

    parser = argparse.ArgumentParser(prog="dreamllm-hf", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    add_convert_parser(subparsers)
    add_push_parser(subparsers)
    add_init_parser(subparsers)
    add_train_parser(subparsers)
    _add_demo_parser(subparsers)
    add_demo_parsers(subparsers)
    add_evaluate_parser(subparsers)
    add_serve_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
