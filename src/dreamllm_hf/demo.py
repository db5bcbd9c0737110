"""The README's main job on a fresh clone, offline: the shipped demo model writes an illustrated story.

The demo model (`dreamllm_hf/demo_model/`) is a tiny DreamLLM trained on the shapes world by `dreamllm-hf train-demo`.
The story is a document: the model writes, emits `<dream_start>` where it wants a picture, draws it from its dream
queries and reads it back through its vision tower before going on. A caption (a text answer, `allow_images=False`)
and a drawing (`DreamLLMText2ImagePipeline`) show the other two things it does.
"""

import random
from pathlib import Path

import torch


def run_demo(
    output_dir: str | Path,
    prompt: str = "Tell me a story.",
    seed: int | None = None,
    model_dir: str | Path | None = None,
    max_images: int = 4,
) -> Path:
    """
    Writes `output_dir/story.html` (and the text-to-image drawing) and returns the story's path. `seed` (default
    `DEMO_SEED`) seeds the story's sampled text and its pictures, and the drawing.
    """
    from .pipelines import DreamLLMPipeline, DreamLLMText2ImagePipeline
    from .shapes_world import draw_shape, sample_spec
    from .shapes_world.demo_model_path import DEMO_GUIDANCE_SCALE, DEMO_MODEL_PATH, DEMO_NUM_INFERENCE_STEPS, DEMO_SEED

    seed = DEMO_SEED if seed is None else seed

    model_dir = Path(model_dir or DEMO_MODEL_PATH)
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No DreamLLM pipeline at {model_dir} (no model_index.json). Reinstall the package, or train one with "
            "`dreamllm-hf train-demo --output DIR` and pass `--model DIR`."
        )
    sampling = dict(num_inference_steps=DEMO_NUM_INFERENCE_STEPS, guidance_scale=DEMO_GUIDANCE_SCALE)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pipe = DreamLLMPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    print(f"[model] {model_dir}")

    # The generator seeds both the sampled text and the pictures of the story.
    story = pipe(
        prompt,
        do_sample=True,
        max_new_tokens=64,
        max_images=max_images,
        generator=torch.Generator("cpu").manual_seed(seed),
        **sampling,
    )
    story_path = output_dir / "story.html"
    story.save_html(story_path, title=f"DreamLLM demo: {prompt}")
    rendered = " ".join(segment.strip() if isinstance(segment, str) else "[picture]" for segment in story.documents[0])
    print(f"[interleaved] {prompt!r} -> {rendered}")
    print(f"[interleaved] {len(story.images[0])} picture(s), stopped: {story.stop_reasons[0]}")

    picture = draw_shape(sample_spec(random.Random(seed), colour="blue", shape="triangle"))
    caption = pipe(
        "<image>", image=[picture], allow_images=False, use_chat_template=False, do_sample=False, max_new_tokens=8
    ).text[0]
    print(f"[comprehension] a blue triangle -> {caption.strip()!r}")

    draw = DreamLLMText2ImagePipeline.from_pipe(pipe)  # text-to-image on the same components
    drawing = draw("a yellow circle", generator=torch.Generator("cpu").manual_seed(seed), **sampling).images[0]
    drawing_path = output_dir / "a_yellow_circle.png"
    drawing.save(drawing_path)
    print(f"[text-to-image] 'a yellow circle' -> {drawing_path}")

    print(f"Story written to {story_path.resolve()}")
    return story_path
