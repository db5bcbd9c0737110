"""The `dreamllm-hf convert` and `dreamllm-hf push` subcommands."""

import argparse
import logging
import signal
import sys
from contextlib import contextmanager

from ..checks import NON_NEGATIVE_NUMBER
from ..dtypes import DTYPE_NAMES


def _card_field(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip(), yaml.safe_load(value) if value else None


def _add_card_arguments(parser) -> None:
    parser.add_argument(
        "--card-template",
        default=None,
        metavar="PATH",
        help="Jinja template for README.md (must keep '---\\n{{ card_data }}\\n---'); default: the built-in card.",
    )
    parser.add_argument(
        "--card-field",
        action="append",
        type=_card_field,
        default=[],
        metavar="KEY=VALUE",
        help="Model card metadata to set (YAML value, e.g. license=apache-2.0, 'tags=[a, b]'; "
        "KEY=null removes it). Repeatable.",
    )


def _add_hub_arguments(parser) -> None:
    parser.add_argument("--private", action="store_true", default=None, help="Create the repository as private.")
    parser.add_argument("--revision", default=None, metavar="BRANCH", help="Branch to commit to (created if missing).")
    parser.add_argument("--commit-message", default=None, help="Commit message of the upload.")


def add_convert_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="Convert an original DreamLLM release folder to the Hugging Face layout (and optionally publish it).",
        description="Streams the release's pickles into safetensors shards (never two copies of the model in memory), "
        "writes into a temporary folder beside --output and renames it at the end.",
    )
    parser.add_argument(
        "--original",
        required=True,
        help="Folder in the original release layout (config.json, *.bin, tokenizer.model).",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="Output folder (model_index.json, mllm/, processor/, unet/, vae/, scheduler/, README.md).",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default=None,
        help="Cast weights (default: keep the stored dtype, bf16).",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="Largest safetensors shard (default 5GB).")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace a non-empty output folder (once the new one is complete)."
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="Compare the converted weights and outputs with an independent reading of the release; "
        "fail (leaving no output) beyond tolerance. The figures go into the model card.",
    )
    parser.add_argument(
        "--verify-dtype",
        choices=DTYPE_NAMES,
        default="float32",
        help="Precision of the verification. It loads one model at a time: float32 peaks at about 3x the bf16 "
        "checkpoint in RAM (about 40 GB for the 7B), bfloat16 at about 2x.",
    )
    parser.add_argument("--verify-device", default="cpu", help="Device of the verification (cpu, cuda, ...).")
    parser.add_argument(
        "--verify-atol",
        type=NON_NEGATIVE_NUMBER.parse,
        default=None,
        help="Absolute tolerance (default per dtype).",
    )
    parser.add_argument(
        "--verify-rtol",
        type=NON_NEGATIVE_NUMBER.parse,
        default=None,
        help="Tolerance relative to the largest reference value.",
    )
    parser.add_argument(
        "--base-model",
        default="RunpeiDong/dreamllm-7b-chat-v1.0",
        help="Hub id of the release, for the model card's base_model.",
    )
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    parser.add_argument(
        "--push-to-hub",
        default=None,
        metavar="USER/REPO",
        help="Upload the output to this Hub repository once conversion (and --verify) succeeded.",
    )
    _add_hub_arguments(parser)
    _add_card_arguments(parser)
    parser.set_defaults(func=run_convert)


def add_push_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="Upload a converted folder to the Hugging Face Hub in one commit.",
        description="Token from HF_TOKEN or `hf auth login`; endpoint from HF_ENDPOINT. README.md is rendered again "
        "for the repository from conversion.json (the folder is not modified) unless --keep-card.",
    )
    parser.add_argument("folder", help="A folder written by `dreamllm-hf convert`.")
    parser.add_argument("repo_id", metavar="USER/REPO", help="Hub repository (created if missing).")
    _add_hub_arguments(parser)
    parser.add_argument("--keep-card", action="store_true", help="Upload the folder's README.md as it is.")
    _add_card_arguments(parser)
    parser.set_defaults(func=run_push)


@contextmanager
def _sigterm_as_interrupt():
    """A `kill` (SIGTERM) unwinds like Ctrl-C, so the temporary output is removed."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _log_to_stderr() -> None:
    logger = logging.getLogger("dreamllm_hf.conversion")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _fail(error: Exception) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 1


def run_convert(args) -> int:
    from . import HubPushError, OriginalCheckpointError, VerificationError, convert_original_checkpoint, push_to_hub
    from .hub import check_can_push

    _log_to_stderr()
    fields = dict(args.card_field)
    try:
        if args.push_to_hub:
            check_can_push(args.push_to_hub)  # before hours of work, not after
        with _sigterm_as_interrupt():
            summary = convert_original_checkpoint(
                args.original,
                args.output,
                dtype=args.dtype,
                overwrite=args.overwrite,
                max_shard_size=args.max_shard_size,
                verify=args.verify,
                verify_dtype=args.verify_dtype,
                verify_device=args.verify_device,
                verify_atol=args.verify_atol,
                verify_rtol=args.verify_rtol,
                repo_id=args.push_to_hub,
                base_model=args.base_model,
                card_template=args.card_template,
                card_fields=fields,
                progress=False if args.no_progress else None,
            )
    except (OriginalCheckpointError, VerificationError, HubPushError, OSError) as error:  # FileExistsError, disk full
        return _fail(error)
    except KeyboardInterrupt:
        print(f"interrupted: {args.output} was not written (or left as it was)", file=sys.stderr)
        return 130
    if summary.verification is not None:
        print(summary.verification.format_table())
    print(f"Converted {args.original} -> {summary.output_dir}: {summary.describe()}")
    if args.push_to_hub:
        try:
            info = push_to_hub(
                summary.output_dir,
                args.push_to_hub,
                private=args.private,
                revision=args.revision,
                commit_message=args.commit_message,
                card_template=args.card_template,
                card_fields=fields,
            )
        except HubPushError as error:
            return _fail(error)
        print(f"Uploaded to {args.push_to_hub}: {info.commit_url}")
    return 0


def run_push(args) -> int:
    from . import HubPushError, push_to_hub

    _log_to_stderr()
    try:
        info = push_to_hub(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            update_card=not args.keep_card,
            card_template=args.card_template,
            card_fields=dict(args.card_field),
        )
    except HubPushError as error:
        return _fail(error)
    print(f"Uploaded {args.folder} to {args.repo_id}: {info.commit_url}")
    return 0
