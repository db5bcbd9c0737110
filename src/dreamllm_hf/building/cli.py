"""The `dreamllm-hf init` subcommand: an untrained DreamLLM pipeline folder from an LLM, a vision tower and a decoder."""

import argparse

from .. import checks
from ..dtypes import DTYPE_NAMES, parse_dtype


def add_init_parser(subparsers) -> None:
    from .. import constants as C

    parser = subparsers.add_parser(
        "init",
        help="Build an untrained DreamLLM from a causal LM, a CLIP/SigLIP vision tower and a Stable Diffusion decoder.",
        description="Each input is a local `save_pretrained` folder. Writes a DreamLLMPipeline folder (model_index.json, "
        "mllm/, processor/, unet/, vae/, scheduler/, README.md, building.json) into a temporary folder beside "
        "--output and renames it at the end.",
    )
    parser.add_argument(
        "--llm", required=True, help="A decoder-only causal LM with its tokenizer (Llama, Qwen2, ...)."
    )
    parser.add_argument(
        "--vision",
        required=True,
        help="A CLIP or SigLIP vision model (or a full CLIP/SigLIP model, whose vision part is taken) with its "
        "image processor.",
    )
    parser.add_argument(
        "--diffusion", required=True, help="A diffusers pipeline folder with unet/, vae/ and scheduler/."
    )
    parser.add_argument("--output", required=True, help="The pipeline folder to write.")
    parser.add_argument(
        "--num-dream-queries",
        type=checks.POSITIVE_INT.parse,
        default=C.NUM_DREAM_QUERIES,
        help=f"Learned queries per picture (default {C.NUM_DREAM_QUERIES}, as the release).",
    )
    parser.add_argument(
        "--vision-feature-layer",
        type=int,
        default=-2,
        help="The tower's hidden state the projector reads (default -2; 0 is the patch embedding, -1 the last layer).",
    )
    parser.add_argument(
        "--eos-token",
        default=None,
        help="The token that ends a document, if not the tokenizer's end of sequence (e.g. <end_of_turn> for Gemma).",
    )
    parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, default=None, help="Cast every component (default: as stored)."
    )
    parser.add_argument(
        "--seed", type=checks.SEED.parse, default=0, help="Seeds the initialisation of the new parts (default 0)."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace a non-empty output folder (once the new one is complete)."
    )
    parser.set_defaults(func=_run_init, parser=parser)


def _run_init(args: argparse.Namespace) -> int:
    # The command writes a pipeline folder, so it sits above the pipelines; the building it drives does not.
    from ..pipelines import DreamLLMPipeline
    from .builder import build_components_with_info
    from .save import check_output, save_built_pipeline

    check_output(args.output, args.overwrite)  # before loading anything for an output that would be refused
    try:
        components, info = build_components_with_info(
            llm=args.llm,
            vision=args.vision,
            diffusion=args.diffusion,
            num_dream_queries=args.num_dream_queries,
            vision_feature_layer=args.vision_feature_layer,
            eos_token=args.eos_token,
            dtype=parse_dtype(args.dtype, "--dtype"),
            seed=args.seed,
        )
    except ValueError as error:  # parts that do not fit (a layer the tower lacks, ...): one line, exit code 2
        checks.usage_error(args, str(error))
    output = save_built_pipeline(DreamLLMPipeline(**components), info, args.output, overwrite=args.overwrite)
    print(output)
    return 0


__all__ = ["add_init_parser"]
