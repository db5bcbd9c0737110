"""How well a DreamLLM knows the shapes world: captioning, drawing, and illustrated stories, judged deterministically.

* `caption_accuracy`: held-out pictures (drawn with a seed no training set uses) are captioned as text answers
  (`allow_images=False`) with the pretraining prompt (`<image>` alone, no chat template, greedy); a caption is right
  when the first colour word and the first shape word in it are the picture's.
* `t2i_accuracy`: text-to-image (`DreamLLMText2ImagePipeline`) on every caption of the world ("a red circle", ...),
  several seeds each; a picture is right when `classify_shape_image` reads the asked colour and shape.
* `interleaved_match`: documents written for story instructions, sampled text, all stories in one call, each sampled
  and drawn from its own generator; every picture the model draws is judged and compared with the colour and shape
  named by the sentence just before it. Pictures after a sentence that names no shape count as misses.
"""

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .classifier import classify_shape_image
from .data import pairs_dataset
from .demo_model_path import DEMO_GUIDANCE_SCALE, DEMO_NUM_INFERENCE_STEPS
from .tokenizer import CAPTION_QUESTIONS, STORY_INSTRUCTIONS
from .world import COLOURS, SHAPES


HELD_OUT_SEED = 1_000_003  # no training set of the recipe uses it
_WORDS = re.compile(r"[a-z]+")


@dataclass
class DemoEvaluationSettings:
    num_caption_pictures: int = 192
    t2i_per_caption: int = 8
    num_stories: int = 32
    num_inference_steps: int = DEMO_NUM_INFERENCE_STEPS
    guidance_scale: float = DEMO_GUIDANCE_SCALE
    max_story_tokens: int = 64
    max_story_images: int = 4
    seed: int = 0


def named_colour_and_shape(text: str) -> tuple[str | None, str | None]:
    """The first colour word and the first shape word of `text` (None where there is none)."""
    words = _WORDS.findall(text.lower())
    colour = next((word for word in words if word in COLOURS), None)
    shape = next((word for word in words if word in SHAPES), None)
    return colour, shape


def caption_is_right(caption: str, colour: str, shape: str) -> bool:
    """The captioning metric: `caption` names the picture's colour and shape (its first colour and shape words)."""
    return named_colour_and_shape(caption) == (colour, shape)


def drawing_is_right(picture, colour: str | None, shape: str | None) -> bool:
    """The drawing metric: the judge (`classify_shape_image`) reads `picture` (PIL, `[H, W, 3]` array) as the colour
    and shape asked for (a request that names none of them is never met)."""
    return None not in (colour, shape) and classify_shape_image(picture) == (colour, shape)


def _last_sentence(text: str) -> str:
    sentences = [part for part in re.split(r"(?<=[.!?])\s+", text.strip()) if part]
    return sentences[-1] if sentences else ""


def text_to_image_pipeline(pipe):
    """
    `DreamLLMText2ImagePipeline.from_pipe(pipe)` for a `DreamLLMPipeline` (the components are shared); anything else
    (a text-to-image pipeline already, or a stand-in of the tests) is returned as it is.
    """
    from ..pipelines import DreamLLMPipeline, DreamLLMText2ImagePipeline

    return DreamLLMText2ImagePipeline.from_pipe(pipe) if isinstance(pipe, DreamLLMPipeline) else pipe


def caption_accuracy(pipe, settings: DemoEvaluationSettings, batch_size: int = 32) -> dict:
    """Greedy captions of held-out pictures, right when colour and shape are both named: prompted as in training
    (`<image>` alone, `caption_accuracy`) and asked in a chat ("What is in the picture?" / "Describe the picture.",
    `chat_caption_accuracy`)."""
    pictures = pairs_dataset(settings.num_caption_pictures, seed=HELD_OUT_SEED + settings.seed)
    right, chat_right, examples = 0, 0, []
    greedy = dict(allow_images=False, do_sample=False, max_new_tokens=8)
    for start in range(0, len(pictures), batch_size):
        rows = pictures[start : start + batch_size]
        images = [[image] for image in rows["image"]]
        out = pipe(["<image>"] * len(images), image=images, use_chat_template=False, **greedy)
        questions = [CAPTION_QUESTIONS[(start + i) % len(CAPTION_QUESTIONS)] for i in range(len(images))]
        chat = pipe([[{"role": "user", "content": [{"type": "image"}, q]}] for q in questions], image=images, **greedy)
        for answer, chat_answer, colour, shape in zip(out.text, chat.text, rows["colour"], rows["shape"]):
            ok = caption_is_right(answer, colour, shape)
            right += ok
            chat_right += caption_is_right(chat_answer, colour, shape)
            if len(examples) < 6:
                examples.append({"truth": f"{colour} {shape}", "caption": answer.strip(), "ok": ok})
    return {
        "caption_accuracy": right / len(pictures),
        "chat_caption_accuracy": chat_right / len(pictures),
        "caption_examples": examples,
    }


def t2i_accuracy(pipe, settings: DemoEvaluationSettings) -> dict:
    captions = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    prompts = [caption for caption in captions for _ in range(settings.t2i_per_caption)]
    generators = [torch.Generator("cpu").manual_seed(settings.seed * 10_000 + i) for i in range(len(prompts))]
    images = text_to_image_pipeline(pipe)(
        prompts,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        generator=generators,
    ).images
    per_caption = dict.fromkeys(captions, 0)
    for prompt, image in zip(prompts, images):
        if drawing_is_right(image, *named_colour_and_shape(prompt)):
            per_caption[prompt] += 1
    right = sum(per_caption.values())
    return {
        "t2i_accuracy": right / len(prompts),
        "t2i_per_caption": {k: v / settings.t2i_per_caption for k, v in per_caption.items()},
        "t2i_images": images,
        "t2i_prompts": prompts,
    }


def _judge_story(document: list) -> tuple[int, int, list[str]]:
    """(pictures right, pictures drawn, the story written out with what the judge read in each picture)."""
    last_text, matched, drawn, record = "", 0, 0, []
    for segment in document:
        if isinstance(segment, str):
            last_text = segment
            record.append(segment.strip())
            continue
        drawn += 1
        asked = named_colour_and_shape(_last_sentence(last_text))
        seen = classify_shape_image(segment)
        ok = drawing_is_right(segment, *asked)
        matched += ok
        record.append(f"[picture: {seen[0]} {seen[1]}{'' if ok else ' (mismatch)'}]")
        last_text = ""  # a second picture right after the first has no sentence of its own
    return matched, drawn, record


def interleaved_match(pipe, settings: DemoEvaluationSettings) -> dict:
    return judged_stories(pipe, settings, _judge_story)


def judged_stories(pipe, settings, judge_story) -> dict:
    """Stories written for the story instructions in one call (story i samples its text and draws its pictures from
    its own generator), each judged by `judge_story(document) -> (pictures right, pictures drawn, record)`."""
    instructions = [STORY_INSTRUCTIONS[index % len(STORY_INSTRUCTIONS)] for index in range(settings.num_stories)]
    generators = [torch.Generator("cpu").manual_seed(settings.seed * 10_000 + i) for i in range(len(instructions))]
    out = pipe(
        instructions,
        do_sample=True,
        max_new_tokens=settings.max_story_tokens,
        max_images=settings.max_story_images,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        generator=generators,
    )
    matched = pictures = stories_with_pictures = 0
    documents = []
    for instruction, document, stop in zip(instructions, out.documents, out.stop_reasons):
        right, drawn, record = judge_story(document)
        matched += right
        pictures += drawn
        stories_with_pictures += drawn > 0
        documents.append({"instruction": instruction, "document": " ".join(record), "stop": stop})
    return {
        "interleaved_match": matched / pictures if pictures else 0.0,
        "interleaved_pictures": pictures,
        "stories_with_pictures": stories_with_pictures,
        "story_examples": documents[:4],
    }


def evaluate_pipeline(pipe, settings: DemoEvaluationSettings | None = None, log=print) -> dict:
    """All three figures (and their details) of `pipe` on the shapes world."""
    figures = (("caption", caption_accuracy), ("t2i", t2i_accuracy), ("interleaved", interleaved_match))
    return measure_figures(pipe, settings or DemoEvaluationSettings(), figures, log)


def measure_figures(pipe, settings, figures, log=print) -> dict:
    """Every `(name, fn)` of `figures` on `pipe` (`fn(pipe, settings)` gives a dict of figures), with the settings and
    the time each took."""
    pipe.set_progress_bar_config(disable=True)
    results, timings = {}, {}
    for name, fn in figures:
        started = time.perf_counter()
        results.update(fn(pipe, settings))
        timings[name] = round(time.perf_counter() - started, 1)
        log(f"[evaluate] {name}: {timings[name]} s")
    results["settings"] = asdict(settings)
    results["eval_timings_s"] = timings
    return results


def load_demo_pipeline(model_dir: str | Path | None = None):
    """The shipped demo model (or the pipeline folder `model_dir`), fp32 on the CPU."""
    from ..pipelines import DreamLLMPipeline
    from .demo_model_path import DEMO_MODEL_PATH

    pipe = DreamLLMPipeline.from_pretrained(str(model_dir or DEMO_MODEL_PATH), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = [
    "HELD_OUT_SEED",
    "DemoEvaluationSettings",
    "caption_accuracy",
    "caption_is_right",
    "drawing_is_right",
    "evaluate_pipeline",
    "interleaved_match",
    "judged_stories",
    "load_demo_pipeline",
    "measure_figures",
    "named_colour_and_shape",
    "t2i_accuracy",
    "text_to_image_pipeline",
]
