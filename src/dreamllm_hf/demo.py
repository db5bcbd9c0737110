"""The README's main job on a fresh clone, offline.

Until a trained demo model ships with the package, this converts the tiny fixture checkpoint (original release
layout, random weights) and runs comprehension, text-to-image and an interleaved document on it. The outputs are noise;
what it shows is every path working end to end.
"""

import random
from pathlib import Path

import torch

FIXTURE_CHECKPOINT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "original_tiny"


def run_tiny_demo(output_dir: str | Path, seed: int = 42) -> Path:
    from .conversion import convert_original_checkpoint
    from .pipelines import DreamLLMPipeline
    from .shapes_world import draw_shape, sample_spec

    if not FIXTURE_CHECKPOINT.is_dir():
        raise FileNotFoundError(
            f"The demo needs the fixture checkpoint at {FIXTURE_CHECKPOINT}; run it from a clone of the repository."
        )
    output_dir = Path(output_dir)
    checkpoint = output_dir / "dreamllm-tiny"
    summary = convert_original_checkpoint(FIXTURE_CHECKPOINT, checkpoint, overwrite=True)
    print(f"[convert] {FIXTURE_CHECKPOINT} -> {checkpoint} ({summary.num_tensors} tensors, {summary.seconds:.1f} s)")

    pipe = DreamLLMPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    picture = draw_shape(sample_spec(random.Random(seed), colour="red", shape="circle"))
    question = "<image>\nWhat is in the picture?"
    answer = pipe(question, images=[picture], generation_mode="text", max_new_tokens=12, do_sample=False)
    print(f"[comprehension] {question!r} + a {picture.size[0]}x{picture.size[1]} picture -> {answer.text[0]!r}")

    caption = "a photo of a red bird sitting on a tree branch"
    image = pipe(
        caption, generation_mode="image", num_inference_steps=2, guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    image_path = output_dir / "text_to_image.png"
    image.save(image_path)
    print(f"[text-to-image] {caption!r} -> {image.size[0]}x{image.size[1]} picture at {image_path}")

    document = pipe(
        "Tell a short illustrated story.", generation_mode="interleaved", max_new_tokens=24, max_images=2,
        num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(seed),
    )
    html_path = output_dir / "document.html"
    document.save_html(html_path)
    print(
        f"[interleaved] {len(document.documents[0])} segment(s), {len(document.images[0])} picture(s), "
        f"stopped: {document.stop_reasons[0]} -> {html_path}"
    )
    return html_path
