"""`dreamllm-hf train`: trains a DreamLLM on both losses - the paper's three stages, LoRA or full fine-tuning.

    dreamllm-hf train --model DIR --data PATH [--data PATH ...] --output-dir DIR --max-steps N --seed S [options]
    dreamllm-hf train --stage 1|2|3 --model DIR --data PATH ... --output-dir DIR [--language-model lora ...]
    accelerate launch [--config_file CFG.yaml] -m dreamllm_hf.training.cli --model DIR --data PATH ... [options]

Without `--stage` it fine-tunes with a LoRA adapter; `--stage 1` (alignment: the LLM frozen), `2` (I-GPT
pretraining: the LLM in full) and `3` (instruction tuning: the LLM in full) set what trains, each part overridable
(`--language-model`, `--vision-tower`, `--[no-]train-*`). A run whose LLM is not LoRA-wrapped (or `--merge-lora`)
writes a complete pipeline folder, the next stage's `--model`.

Options can also come from a YAML or JSON file (`--config FILE`, keys = option names with `_` or `-`); flags given on
the command line win over the file, which wins over the defaults. peft, datasets and diffusers load only when a run
starts.
"""

import argparse
import sys

from ..dtypes import DTYPE_NAMES


_HELP = {
    "model": "DreamLLM folder (mllm/, processor/, unet/, vae/, scheduler/), as `dreamllm-hf convert` or a previous "
    "stage writes it.",
    "data": "Data source, repeatable: an image folder with metadata.jsonl (pairs), MMC4 JSON Lines (documents), "
    "JSON Lines of `messages` (conversations), Parquet shards, or webdataset .tar shards of pairs.",
    "output_dir": "Where the adapter or the pipeline, train_log.jsonl and checkpoint-STEP/ folders go.",
    "max_steps": "Optimizer steps to run.",
    "seed": "Seed of the adapter init, the data order and choices, and the diffusion noise.",
}


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the training options to `parser` (defaults are applied later, so a config file can fill the gaps)."""
    S = argparse.SUPPRESS
    parser.add_argument("--config", default=S, help="YAML or JSON file of options (flags override it).")
    parser.add_argument("--model", default=S, help=_HELP["model"])
    parser.add_argument("--data", action="extend", nargs="+", default=S, metavar="PATH", help=_HELP["data"])
    parser.add_argument("--output-dir", dest="output_dir", default=S, help=_HELP["output_dir"])
    parser.add_argument("--max-steps", dest="max_steps", type=int, default=S, help=_HELP["max_steps"])
    parser.add_argument("--seed", type=int, default=S, help=_HELP["seed"])

    parts = parser.add_argument_group("what trains (a stage preset, then per-part overrides)")
    parts.add_argument(
        "--stage",
        default=S,
        metavar="STAGE",
        help="1 / alignment (LLM frozen), 2 / pretraining (I-GPT, LLM full), 3 / instruction (LLM full); "
        "default: LoRA fine-tuning.",
    )
    parts.add_argument(
        "--language-model",
        dest="language_model",
        choices=["frozen", "lora", "full"],
        default=S,
        help="The LLM: frozen, LoRA-wrapped or trained in full (default: the stage's).",
    )
    parts.add_argument(
        "--vision-tower",
        dest="vision_tower",
        choices=["frozen", "full"],
        default=S,
        help="The vision tower (default: frozen).",
    )
    for name, what in (
        ("image-projector", "the image projector"),
        ("condition-projector", "the condition projector"),
        ("dream-queries", "the dream queries"),
    ):
        parts.add_argument(
            f"--train-{name}",
            dest=f"train_{name.replace('-', '_')}",
            action=argparse.BooleanOptionalAction,
            default=S,
            help=f"Train {what} in full (default on).",
        )

    lora = parser.add_argument_group("adapter")
    lora.add_argument("--lora-rank", dest="lora_rank", type=int, default=S, help="LoRA rank r (default 16).")
    lora.add_argument("--lora-alpha", dest="lora_alpha", type=float, default=S, help="LoRA alpha (default 32).")
    lora.add_argument(
        "--lora-dropout", dest="lora_dropout", type=float, default=S, help="LoRA dropout (default 0.05)."
    )
    lora.add_argument(
        "--lora-lm-head",
        dest="lora_lm_head",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="Also put a LoRA on lm_head (default: only the format-token rows of lm_head are trained).",
    )
    lora.add_argument(
        "--train-format-tokens",
        dest="train_format_tokens",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="Train the embedding (and lm_head) rows of the format tokens, when the LLM is not trained in full "
        "(default on).",
    )
    lora.add_argument(
        "--merge-lora",
        dest="merge_lora",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="After a LoRA run, also write the complete pipeline with the adapter merged in.",
    )
    lora.add_argument(
        "--load-in-4bit",
        dest="load_in_4bit",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="QLoRA: the LLM decoder layers in 4-bit NF4 (bitsandbytes).",
    )
    lora.add_argument(
        "--activation-checkpointing",
        dest="activation_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="Recompute activations in the backward pass (less memory, ~30%% more compute).",
    )

    loss = parser.add_argument_group("loss")
    loss.add_argument("--loss-weight-lm", dest="loss_weight_lm", type=float, default=S, help="Default 1.")
    loss.add_argument(
        "--loss-weight-vm", dest="loss_weight_vm", type=float, default=S, help="Default 10 (the original's)."
    )

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, default=S, help="Default 2e-4.")
    optim.add_argument(
        "--lr-scheduler",
        dest="lr_scheduler",
        default=S,
        help="Any transformers.get_scheduler name: cosine (default), linear, constant, ...",
    )
    optim.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=S, help="Default 0.")
    optim.add_argument("--weight-decay", dest="weight_decay", type=float, default=S, help="Default 0.")
    optim.add_argument(
        "--max-grad-norm", dest="max_grad_norm", type=float, default=S, help="Default 1 (0: no clipping)."
    )
    optim.add_argument(
        "--batch-size",
        "--per-device-batch-size",
        dest="per_device_batch_size",
        type=int,
        default=S,
        help="Samples per process per micro-batch (default 1).",
    )
    optim.add_argument(
        "--gradient-accumulation-steps",
        dest="gradient_accumulation_steps",
        type=int,
        default=S,
        help="Micro-batches per optimizer step (default 1).",
    )
    optim.add_argument(
        "--mixed-precision",
        dest="mixed_precision",
        choices=["no", "bf16", "fp16"],
        default=S,
        help="Autocast precision (default: from `accelerate launch`'s config, else no).",
    )
    optim.add_argument(
        "--dtype",
        choices=["auto", *DTYPE_NAMES],
        default=S,
        help="Dtype of the frozen weights (default auto: follows --mixed-precision).",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--max-length",
        dest="max_length",
        type=int,
        default=S,
        help="Longest sample in tokens (default: the tokenizer's `model_max_length`).",
    )
    data.add_argument(
        "--i2t-probability",
        dest="i2t_probability",
        type=float,
        default=S,
        help="Chance a pair is image-to-text rather than text-to-image (default 0.5).",
    )
    data.add_argument(
        "--caption-dropout",
        dest="caption_dropout",
        type=float,
        default=S,
        help="Chance a text-to-image pair loses its caption, the guidance unconditional (default 0).",
    )
    data.add_argument(
        "--data-weights",
        dest="data_weights",
        type=float,
        nargs="+",
        default=S,
        metavar="W",
        help="One weight per --data source: each batch comes from one source, with these shares of the batches "
        "(default: sources mixed in proportion to their sizes).",
    )
    data.add_argument(
        "--random-flip",
        dest="random_flip",
        action=argparse.BooleanOptionalAction,
        default=S,
        help="Random horizontal flip of the diffusion pictures (default on).",
    )
    data.add_argument(
        "--num-workers", dest="num_workers", type=int, default=S, help="Data-loader workers (default 0)."
    )
    data.add_argument("--cache-dir", dest="cache_dir", default=S, help="`datasets` cache folder.")

    run = parser.add_argument_group("checkpoints and logs")
    run.add_argument(
        "--checkpointing-steps",
        dest="checkpointing_steps",
        type=int,
        default=S,
        help="Save a resumable checkpoint every N steps (default 500; 0: never).",
    )
    run.add_argument(
        "--checkpoints-total-limit",
        dest="checkpoints_total_limit",
        type=int,
        default=S,
        help="Keep at most N checkpoints.",
    )
    run.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=S,
        metavar="CHECKPOINT",
        help="Resume from the latest checkpoint in --output-dir, or from CHECKPOINT.",
    )
    run.add_argument(
        "--logging-steps",
        dest="logging_steps",
        type=int,
        default=S,
        help="Append to train_log.jsonl every N steps (default 1).",
    )
    run.add_argument(
        "--report-to",
        dest="report_to",
        action="extend",
        nargs="+",
        default=S,
        help="Also log to accelerate trackers (tensorboard, wandb, ...).",
    )
    return parser


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `train` on a `dreamllm-hf` sub-command parser."""
    parser = subparsers.add_parser(
        "train",
        help="Train a DreamLLM: the paper's stages (--stage 1|2|3), LoRA or full fine-tuning (accelerate-ready).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run_train, parser=parser)
    return parser


def training_arguments_from_namespace(namespace: argparse.Namespace):
    """Defaults < `--config` file < flags given on the command line."""
    from .trainer import DreamLLMTrainingArguments, read_config_file

    given = {key: value for key, value in vars(namespace).items() if key not in ("func", "command", "parser")}
    values = read_config_file(given.pop("config")) if "config" in given else {}
    values.update(given)
    return DreamLLMTrainingArguments.from_dict(values)


def run_train(namespace: argparse.Namespace) -> int:
    from ..checks import usage_error
    from .trainer import train

    try:
        args = training_arguments_from_namespace(namespace)
    except ValueError as error:  # a value out of range, from a flag or the --config file: nothing has started
        usage_error(namespace, str(error))
    missing = [name for name in ("model", "data", "output_dir") if not getattr(args, name)]
    if missing:
        usage_error(namespace, f"missing {', '.join('--' + m.replace('_', '-') for m in missing)}")
    result = train(args)
    if not result.is_main_process:
        return 0
    record = result.last_record or {}
    summary = ", ".join(
        f"{key} {record[key]:.4f}" for key in ("loss", "lm_loss", "vm_loss") if record.get(key) is not None
    )
    written = "pipeline" if result.pipeline_dir is not None else "adapter"
    print(f"Trained {result.global_step} steps -> {written} in {result.output_dir} ({summary})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m dreamllm_hf.training.cli`, `accelerate launch -m ...`)."""
    parser = argparse.ArgumentParser(
        prog="dreamllm-hf train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_train_arguments(parser)
    parser.set_defaults(parser=parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
