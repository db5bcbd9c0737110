"""`dreamllm-hf`: convert the original release, generate documents, run the tiny demo."""

import argparse
import sys


def _add_convert_parser(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="Convert an original DreamLLM release folder to the Hugging Face layout.")
    parser.add_argument("--original", required=True, help="Folder in the original release layout (config.json, *.bin, tokenizer.model).")
    parser.add_argument("--output", required=True, help="Output folder (mllm/, processor/, unet/, vae/, scheduler/, model_index.json).")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="Cast weights (default: keep the stored dtype).")
    parser.add_argument("--max-shard-size", default="5GB", help="Largest safetensors shard (default 5GB).")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty output folder.")
    parser.set_defaults(func=_run_convert)


def _run_convert(args) -> int:
    from .conversion import convert_original_checkpoint

    summary = convert_original_checkpoint(
        args.original, args.output, dtype=args.dtype, overwrite=args.overwrite, max_shard_size=args.max_shard_size
    )
    print(
        f"Converted {args.original} -> {summary.output_dir}: {summary.num_tensors} tensors, "
        f"{summary.num_bytes / 2**20:.1f} MiB in {summary.seconds:.1f} s"
    )
    return 0


def _add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="Convert the tiny fixture checkpoint and run comprehension and text-to-image on it.")
    parser.add_argument("--output-dir", default="outputs/demo", help="Where the converted checkpoint and the picture go.")
    parser.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_tiny_demo

    run_tiny_demo(args.output_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamllm-hf", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_convert_parser(subparsers)
    _add_demo_parser(subparsers)
    try:
        from .pipelines.cli import add_generate_parser
    except ImportError:  # the pipeline package is optional while it is being built
        pass
    else:
        add_generate_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
