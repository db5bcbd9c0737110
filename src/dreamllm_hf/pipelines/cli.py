"""
`dreamllm-hf generate`: documents (text, a picture, or both) from prompts.

* One prompt: `dreamllm-hf generate --model DIR "PROMPT" --out doc.html` writes one document as HTML or Markdown;
  `--mode image --image red.png "Make it blue." --out blue.png` draws an edit of the picture (`edit_prompt`).
* Many prompts: `dreamllm-hf generate --model DIR --prompts FILE --output-dir OUT` writes, for every prompt,
  `OUT/doc-00000.html` (pictures embedded), its pictures `OUT/doc-00000_image_<k>.png` and a record
  `OUT/records/doc-00000.json`, then gathers the records, in prompt order, into `OUT/documents.jsonl`. Data parallel:
  `accelerate launch --num_processes N -m dreamllm_hf.cli generate ...` shares the prompts among the processes. A
  re-run skips the documents that already have a record, so an interrupted run resumes where it stopped.
"""

import argparse
import json
import sys
from pathlib import Path

import PIL.Image
import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from .. import checks
from ..checks import usage_error
from ..decoder_conditioning import vae_scale_factor
from ..dtypes import DTYPE_NAMES, parse_dtype
from ..modeling.processing_dreamllm import rgb_picture
from .pipeline_dreamllm import DreamLLMPipeline
from .pipeline_dreamllm_text2img import DreamLLMText2ImagePipeline, edit_prompt
from .pipeline_output import DreamLLMPipelineOutput, StopReason
from .prompt_files import (
    DOCUMENTS_FILE,
    RECORDS_DIR,
    batches,
    generate_batch,
    pending_records,
    read_prompts,
    rebuild_documents_jsonl,
    with_placeholders,
)


MODES = ("interleaved", "text", "image")


class TokenProgressBar(BaseStreamer):
    """A `generate` streamer that shows sampled tokens as a progress bar (the prompt of each call is skipped)."""

    def __init__(self, total: int, desc: str = "text"):
        self.bar = tqdm(total=total, desc=desc, unit="tok", leave=False)
        self._next_is_prompt = True

    def put(self, value):
        if self._next_is_prompt:  # `generate` first puts the prompt, once per call
            self._next_is_prompt = False
            return
        self.bar.update(value.numel())

    def end(self):
        self._next_is_prompt = True

    def close(self):
        self.bar.close()


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `generate` sub-command to an `argparse` sub-parser group."""
    parser = subparsers.add_parser(
        "generate",
        help="write interleaved documents, answers or a picture",
        description=(
            "Run a converted DreamLLM pipeline on one prompt and save the result as HTML (or Markdown), or on every "
            "prompt of --prompts FILE, writing one document per prompt into --output-dir (resumable; data parallel "
            "under `accelerate launch`)."
        ),
    )
    parser.add_argument(
        "prompt", nargs="?", default=None, help="the prompt; `<image>` marks where each --image goes (or --prompts)"
    )
    parser.add_argument(
        "--model", required=True, help="a saved DreamLLM pipeline folder (e.g. from `dreamllm-hf convert`)"
    )
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="a picture for the prompt, in order (repeatable); without `<image>` in the prompt, the pictures go first; "
        'with --mode image, the picture(s) to edit ("Make it blue.")',
    )
    parser.add_argument("--mode", choices=MODES, default="interleaved", help="what to generate")
    parser.add_argument(
        "--seed",
        type=checks.SEED.parse,
        default=0,
        help="seed of the diffusion noise and the text sampling; with --prompts, a line without its own seed gets "
        "this seed + its index",
    )
    parser.add_argument("--steps", type=checks.STEPS.parse, default=50, help="denoising steps per picture")
    parser.add_argument(
        "--guidance-scale", type=checks.GUIDANCE_SCALE.parse, default=7.5, help="classifier-free guidance (<= 1: off)"
    )
    parser.add_argument("--negative-prompt", default=None, help="what the unconditional branch reads instead of ''")
    add_picture_size_options(parser)
    parser.add_argument(
        "--max-new-tokens", type=checks.MAX_NEW_TOKENS.parse, default=256, help="text tokens the model may sample"
    )
    parser.add_argument(
        "--max-images",
        type=checks.MAX_IMAGES.parse,
        default=None,
        help="stop when the model asks for one more picture",
    )
    parser.add_argument(
        "--temperature",
        type=checks.TEMPERATURE.parse,
        default=None,
        help="sample the text at this temperature (default: greedy)",
    )
    parser.add_argument(
        "--top-p", type=checks.TOP_P.parse, default=None, help="nucleus sampling threshold (with --temperature)"
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cuda, cpu, ... (default: cuda when available; with --prompts, the device accelerate gives the process)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default=None,
        help="compute dtype (default: float16 on cuda, float32 on cpu)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output file: .html, or .md (pictures beside it); with --mode image also .png (the picture alone)",
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        default=None,
        metavar="FILE",
        help='many prompts: JSON Lines, one {"prompt": str, "images": [paths], "seed": int} per line (images and seed '
        "optional, paths relative to FILE's folder; other keys are copied into the records), or a `datasets` "
        "dataset: a `save_to_disk` folder or a .parquet/.csv/.json file",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="with --prompts: where the documents and their records go"
    )
    parser.add_argument(
        "--batch-size",
        type=checks.BATCH_SIZE.parse,
        default=8,
        help="with --prompts: prompts per pipeline call in each process",
    )
    parser.set_defaults(func=run_generate, parser=parser)
    return parser


def add_picture_size_options(parser: argparse.ArgumentParser) -> None:
    """`--height` and `--width`, checked against the model folder by `check_picture_size` before it is loaded."""
    for name in ("height", "width"):
        parser.add_argument(
            f"--{name}",
            type=checks.PICTURE_SIDE.parse,
            default=None,
            help=f"picture {name} (default: the UNet's size)",
        )


def check_picture_size(args: argparse.Namespace, model: str | Path) -> None:
    """`--height` / `--width` against the VAE configuration of the pipeline folder `model`, read from their
    config files so that a size the pipeline would refuse is refused before the model loads (exit code 2)."""
    if args.height is None and args.width is None:
        return
    try:
        vae_config = json.loads((Path(model) / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return  # a folder without one: the pipeline says what is missing
    multiple = vae_scale_factor(vae_config)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value % multiple:
            usage_error(
                args,
                f"argument --{name}: must be a multiple of {multiple} for this model (its VAE factor), got {value}; try {max(multiple, round(value / multiple) * multiple)}.",
            )


def _check_model_folder(model: str) -> None:
    if not (Path(model) / "model_index.json").is_file():
        raise SystemExit(
            f"error: {model} has no model_index.json; give a folder written by `dreamllm-hf convert` or "
            "`DreamLLMPipeline.save_pretrained`."
        )


def _load_pipeline(model: str, device: str | torch.device, dtype: torch.dtype) -> DreamLLMPipeline:
    _check_model_folder(model)
    pipe = DreamLLMPipeline.from_pretrained(model, dtype=dtype)
    return pipe.to(device)


def _default_dtype(name: str | None, device: str | torch.device) -> torch.dtype:
    if name:
        return parse_dtype(name, "--dtype")
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        do_sample=args.temperature is not None or args.top_p is not None,
        temperature=args.temperature,
        top_p=args.top_p,
    )


def run_generate(args: argparse.Namespace) -> int:
    if args.prompts is not None:
        return run_generate_many(args)
    if args.prompt is None:
        raise SystemExit('error: give a prompt ("PROMPT" --out doc.html) or a file of prompts (--prompts FILE).')
    if args.output_dir is not None:
        raise SystemExit("error: --output-dir goes with --prompts FILE; for one prompt use --out FILE.")
    if args.out is None:
        raise SystemExit("error: give --out FILE (.html or .md) for the document.")
    suffixes = (".html", ".htm", ".md", ".png") if args.mode == "image" else (".html", ".htm", ".md")
    if args.out.suffix.lower() not in suffixes:
        raise SystemExit(f"error: --out must end in .html or .md (or .png with --mode image), got {args.out.name}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _default_dtype(args.dtype, device)
    images = [rgb_picture(PIL.Image.open(path)) for path in args.image]
    if args.mode == "image":  # a picture drawn from pictures is an edit, read as text-to-image reads it
        try:
            prompt = edit_prompt(args.prompt, len(images))
        except ValueError as error:
            usage_error(args, str(error))
    else:
        prompt = with_placeholders(args.prompt, len(images))
    _check_model_folder(args.model)
    check_picture_size(args, args.model)

    pipe = _load_pipeline(args.model, device, dtype)
    pipe.set_progress_bar_config(desc="denoising", leave=False)
    # One generator seeds the whole document: the diffusion noise and the sampled text.
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    progress = None
    try:
        if args.mode == "image":
            text_to_image = DreamLLMText2ImagePipeline.from_pipe(pipe)
            text_to_image.set_progress_bar_config(desc="denoising", leave=False)
            picture = text_to_image(
                prompt,
                image=images or None,
                height=args.height,
                width=args.width,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                negative_prompt=args.negative_prompt,
                generator=generator,
            ).images[0]
            output = DreamLLMPipelineOutput(
                images=[[picture]], text=None, documents=[[picture]], stop_reasons=[StopReason.IMAGE]
            )
        else:
            progress = TokenProgressBar(args.max_new_tokens)
            output = pipe(
                prompt,
                image=images or None,
                allow_images=args.mode == "interleaved",
                height=args.height,
                width=args.width,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                negative_prompt=args.negative_prompt,
                generator=[generator],
                max_new_tokens=args.max_new_tokens,
                max_images=args.max_images,
                streamer=progress,
                **_sampling_kwargs(args),
            )
    except ValueError as error:  # the pipeline's `check_inputs`: nothing was computed
        usage_error(args, str(error))
    finally:
        if progress is not None:
            progress.close()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix.lower() == ".png":
        output.images[0][0].save(args.out)
    elif args.out.suffix.lower() == ".md":
        output.save_markdown(args.out)
    else:
        output.save_html(args.out, title=args.prompt[:80])
    pictures = sum(not isinstance(segment, str) for segment in output.documents[0])
    print(f"wrote {args.out} ({pictures} picture(s); stopped: {output.stop_reasons[0]})", file=sys.stderr)
    return 0


def _check_many_arguments(args: argparse.Namespace) -> None:
    problems = [
        (args.prompt is not None, "give either a PROMPT or --prompts FILE, not both."),
        (args.out is not None, "--out is for one prompt; with --prompts give --output-dir DIR."),
        (bool(args.image), '--image is for one prompt; with --prompts list each line\'s pictures in its "images".'),
        (args.output_dir is None, "--prompts needs --output-dir DIR (where the documents go)."),
        (args.mode == "image", '--mode image is not supported with --prompts; use "interleaved" or "text".'),
    ]
    for broken, message in problems:
        if broken:
            raise SystemExit(f"error: {message}")


def run_generate_many(args: argparse.Namespace) -> int:
    """`generate --prompts FILE --output-dir DIR`: see the module docstring."""
    _check_many_arguments(args)
    records = read_prompts(args.prompts, args.seed)  # everything is checked before anything is written
    _check_model_folder(args.model)
    check_picture_size(args, args.model)
    output_dir: Path = args.output_dir
    pending = pending_records(records, output_dir)

    from accelerate import Accelerator

    # Without a GPU, processes started by `accelerate launch`/torchrun join a gloo group on the CPU.
    accelerator = Accelerator(cpu=not torch.accelerator.is_available() or args.device == "cpu")
    (output_dir / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    # Every process lists the pending documents before any of them writes one, so all split the same list.
    accelerator.wait_for_everyone()

    device = args.device or accelerator.device
    pipe = _load_pipeline(args.model, device, _default_dtype(args.dtype, device))
    pipe.set_progress_bar_config(desc="denoising", leave=False, disable=not accelerator.is_local_main_process)

    with accelerator.split_between_processes(pending) as share:
        progress = tqdm(total=len(share), desc="documents", unit="doc", disable=not accelerator.is_local_main_process)
        try:
            for batch in batches(share, args.batch_size):
                try:
                    generate_batch(
                        pipe,
                        batch,
                        output_dir,
                        lambda entry: progress.update(1),
                        num_inference_steps=args.steps,
                        guidance_scale=args.guidance_scale,
                        negative_prompt=args.negative_prompt,
                        height=args.height,
                        width=args.width,
                        max_new_tokens=args.max_new_tokens,
                        max_images=args.max_images,
                        allow_images=args.mode == "interleaved",
                        **_sampling_kwargs(args),
                    )
                except ValueError as error:  # refused by the pipeline's `check_inputs`, before its model work
                    usage_error(args, f"{', '.join(r.id for r in batch)}: {error}")
        finally:
            progress.close()
        print(
            f"process {accelerator.process_index}/{accelerator.num_processes}: wrote {len(share)} document(s)",
            file=sys.stderr,
        )

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        count = rebuild_documents_jsonl(output_dir)
        skipped = len(records) - len(pending)
        print(
            f"wrote {len(pending)} document(s) ({skipped} already done) with {accelerator.num_processes} "
            f"process(es); {output_dir / DOCUMENTS_FILE} lists {count}",
            file=sys.stderr,
        )
    return 0


__all__ = [
    "add_generate_parser",
    "add_picture_size_options",
    "check_picture_size",
    "run_generate",
    "run_generate_many",
    "TokenProgressBar",
]
