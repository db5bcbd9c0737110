"""`dreamllm-hf generate`: one document (text, a picture, or both) from a prompt, written as HTML or Markdown."""

import argparse
import sys
from pathlib import Path

import PIL.Image
import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from .pipeline_dreamllm import GENERATION_MODES, DreamLLMPipeline

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        help="write an interleaved document, an answer or a picture",
        description="Run a converted DreamLLM pipeline on one prompt and save the result as HTML (or Markdown).",
    )
    parser.add_argument("prompt", help="the prompt; `<image>` marks where each --image goes")
    parser.add_argument(
        "--model", required=True, help="a saved DreamLLM pipeline folder (e.g. from `dreamllm-hf convert`)"
    )
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="a picture for the prompt, in order (repeatable); without `<image>` in the prompt, the pictures go first",
    )
    parser.add_argument("--mode", choices=GENERATION_MODES, default="interleaved", help="what to generate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the diffusion noise and the text sampling")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps per picture")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (<= 1: off)")
    parser.add_argument("--negative-prompt", default=None, help="what the unconditional branch reads instead of ''")
    parser.add_argument("--height", type=int, default=None, help="picture height (default: the UNet's size)")
    parser.add_argument("--width", type=int, default=None, help="picture width (default: the UNet's size)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="text tokens the model may sample")
    parser.add_argument("--max-images", type=int, default=None, help="stop when the model asks for one more picture")
    parser.add_argument(
        "--temperature", type=float, default=None, help="sample the text at this temperature (default: greedy)"
    )
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (with --temperature)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="compute dtype (default: float16 on cuda, float32 on cpu)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output file: .html, or .md (pictures beside it)")
    parser.set_defaults(func=run_generate)
    return parser


def _load_pipeline(model: str, device: str, dtype: torch.dtype) -> DreamLLMPipeline:
    if not (Path(model) / "model_index.json").is_file():
        raise SystemExit(
            f"error: {model} has no model_index.json; give a folder written by `dreamllm-hf convert` or "
            "`DreamLLMPipeline.save_pretrained`."
        )
    pipe = DreamLLMPipeline.from_pretrained(model, dtype=dtype)
    return pipe.to(device)


def run_generate(args: argparse.Namespace) -> int:
    if args.out.suffix.lower() not in (".html", ".htm", ".md"):
        raise SystemExit(f"error: --out must end in .html or .md, got {args.out.name}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    images = [PIL.Image.open(path).convert("RGB") for path in args.image]
    prompt = args.prompt
    if images and "<image>" not in prompt:
        prompt = "<image>" * len(images) + "\n" + prompt

    pipe = _load_pipeline(args.model, device, dtype)
    pipe.set_progress_bar_config(desc="denoising", leave=False)
    torch.manual_seed(args.seed)  # text sampling uses the global RNG
    progress = TokenProgressBar(args.max_new_tokens) if args.mode != "image" else None
    try:
        output = pipe(
            prompt,
            images=images or None,
            generation_mode=args.mode,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt,
            generator=torch.Generator(device="cpu").manual_seed(args.seed),
            max_new_tokens=args.max_new_tokens,
            max_images=args.max_images,
            do_sample=args.temperature is not None or args.top_p is not None,
            temperature=args.temperature,
            top_p=args.top_p,
            streamer=progress,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    finally:
        if progress is not None:
            progress.close()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix.lower() == ".md":
        output.save_markdown(args.out)
    else:
        output.save_html(args.out, title=args.prompt[:80])
    pictures = sum(not isinstance(segment, str) for segment in output.documents[0])
    print(f"wrote {args.out} ({pictures} picture(s); stopped: {output.stop_reasons[0]})", file=sys.stderr)
    return 0


__all__ = ["add_generate_parser", "run_generate", "TokenProgressBar"]
