"""`dreamllm-hf`: generate documents, convert the original release and publish it, fine-tune, run the demo."""

import argparse
import sys


def _add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="Convert the tiny fixture checkpoint and run comprehension and text-to-image on it.")
    parser.add_argument("--output-dir", default="outputs/demo", help="Where the converted checkpoint and the picture go.")
    parser.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_tiny_demo

    run_tiny_demo(args.output_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .conversion.cli import add_convert_parser, add_push_parser
    from .pipelines.cli import add_generate_parser
    from .training.cli import add_train_parser

    parser = argparse.ArgumentParser(prog="dreamllm-hf", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    add_convert_parser(subparsers)
    add_push_parser(subparsers)
    add_train_parser(subparsers)
    _add_demo_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
