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
import dataclasses
import sys
import typing


def training_options() -> argparse.ArgumentParser:
    """
    A parent parser (`parents=[...]`) of the training options: one per field of `DreamLLMTrainingArguments`, made by
    `transformers.HfArgumentParser` from the field's type, default and metadata (`help`, `choices`, `aliases`...), as
    `--name` and `--name-with-dashes`; a `--no-NAME` for each bool; and `--config`.

    The defaults stay in the dataclass: here they are only printed in the help. A flag that is not given leaves no
    value (`argparse.SUPPRESS`), so that a `--config` file fills what the command line leaves out.
    """
    from transformers import HfArgumentParser

    from .trainer import DreamLLMTrainingArguments

    parser = HfArgumentParser(DreamLLMTrainingArguments, add_help=False)
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="YAML or JSON file of options (keys: option names with `_` or `-`).",
    )
    fields = {field.name: field for field in dataclasses.fields(DreamLLMTrainingArguments)}
    types = typing.get_type_hints(DreamLLMTrainingArguments)
    flags = [name for name in fields if types[name] in (bool, bool | None)]
    for name in flags:
        # HfArgumentParser makes `--no-NAME` only for the bools that default to True; every bool gets one here
        # (a flag can then turn off what a config file turned on).
        if fields[name].default is not True:
            parser.add_argument(f"--no_{name}", f"--no-{name.replace('_', '-')}", action="store_false", dest=name)
    for action in parser._actions:
        field = fields.get(action.dest)
        if field is None:
            continue
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        if action.option_strings[0] == f"--no_{action.dest}":
            action.help = argparse.SUPPRESS  # told in the help of the flag it turns off
        elif action.dest in flags:
            action.metavar = "{true,false}"
            negative = f"--no-{action.dest.replace('_', '-')}"
            action.help += (
                " (default: off)" if default is False else f" ({'default: on; ' if default else ''}{negative}: off)"
            )
        elif default not in (None, "", []):
            action.help += f" (default: {default})"
        action.default = argparse.SUPPRESS
    return parser


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `train` on a `dreamllm-hf` sub-command parser."""
    parser = subparsers.add_parser(
        "train",
        help="Train a DreamLLM: the paper's stages (--stage 1|2|3), LoRA or full fine-tuning (accelerate-ready).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[training_options()],
    )
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
    from .sharding import check_launch_settings
    from .trainer import train

    try:
        args = training_arguments_from_namespace(namespace)
        check_launch_settings(args)  # the options against the processes and the device
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
        prog="dreamllm-hf train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[training_options()],
    )
    parser.set_defaults(parser=parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
