"""How well a DreamLLM knows the shapes world, version 2 (`scenes.py`): captions, questions, drawings and stories of
one or two things, judged deterministically (`scene_judge.py`).

* `caption_accuracy`: held-out pictures (scenes drawn with a seed no training set uses) captioned as text answers
  (`allow_images=False`, greedy) with the pretraining prompt (`<image>` alone, no chat template) and in a chat ("What
  is in the picture?"); a caption is right when it says exactly the picture's scene (`captions_agree`: every thing's
  size, colour and shape, and the relation either way round).
* `question_accuracy`: one question of the world per held-out picture, asked in a chat, greedy; right when the first
  word of the answer is the answer (`answers_agree`), with a breakdown by kind of question (`question_kind`).
* `t2i_accuracy`: text-to-image on the captions of held-out scenes, several seeds each; a picture is right when the
  judge reads the caption's scene in it (`drawing_shows`). `t2i_attribute_accuracy` gives partial credit: the share of
  asked things drawn with the right size, colour and shape, wherever they stand.
* `interleaved_match`: stories written for story instructions (sampled text, all in one call, each story sampled and
  drawn from its own generator). A `StoryReader` follows each story's sentences; a picture is right when it shows the
  scene the reader reached with the sentences written since the previous picture. A picture after text the reader
  cannot follow, or with no new sentence before it, is a miss.
"""

import random
import re
from dataclasses import dataclass

import torch

from dreamllm_hf.shapes_world.demo_model_path import DEMO_GUIDANCE_SCALE, DEMO_NUM_INFERENCE_STEPS
from dreamllm_hf.shapes_world.evaluation import HELD_OUT_SEED, judged_stories, measure_figures, text_to_image_pipeline
from dreamllm_hf.shapes_world.tokenizer import CAPTION_QUESTIONS

from .scene_judge import drawing_shows, read_scene, things_drawn_right
from .scenes import (
    QUESTION_KINDS,
    Layout,
    StoryReader,
    answers_agree,
    captions_agree,
    draw_scene,
    question_kind,
    sample_question,
    sample_scene,
)


CAPTION_MAX_NEW_TOKENS = 24  # the longest caption of the world, with room for a tokenizer that splits words finely
ANSWER_MAX_NEW_TOKENS = 8  # one word and the end of the turn
NUM_EXAMPLES = 6  # examples kept for the report of each figure


@dataclass
class SceneEvaluationSettings:
    num_caption_pictures: int = 192
    num_questions: int = 192
    num_t2i_scenes: int = 24
    t2i_per_scene: int = 4
    num_stories: int = 32
    num_inference_steps: int = DEMO_NUM_INFERENCE_STEPS
    guidance_scale: float = DEMO_GUIDANCE_SCALE
    max_story_tokens: int = 96
    max_story_images: int = 4
    seed: int = 0


def held_out_scenes(task: str, count: int, seed: int = 0) -> list[Layout]:
    """`count` scenes for the figure `task` ("captions", "questions", "t2i"), from a seed no training set uses."""
    rng = random.Random(f"{task}/{HELD_OUT_SEED + seed}")
    return [sample_scene(rng) for _ in range(count)]


def held_out_questions(count: int, seed: int = 0) -> list[tuple[Layout, str, str]]:
    """`count` (scene, question, answer): one question of the world about each held-out scene."""
    rng = random.Random(f"question choice/{HELD_OUT_SEED + seed}")
    return [(layout, *sample_question(rng, layout.scene)) for layout in held_out_scenes("questions", count, seed)]


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, split after each full stop, question or exclamation mark followed by a space."""
    return [part for part in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if part]


def _generators(settings: SceneEvaluationSettings, count: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(settings.seed * 10_000 + index) for index in range(count)]


def caption_accuracy(pipe, settings: SceneEvaluationSettings, batch_size: int = 32) -> dict:
    """Greedy captions of held-out pictures, right when they say exactly the picture's scene: prompted as in training
    (`<image>` alone, `caption_accuracy`) and asked in a chat ("What is in the picture?" / "Describe the picture.",
    `chat_caption_accuracy`)."""
    layouts = held_out_scenes("captions", settings.num_caption_pictures, settings.seed)
    right, chat_right, examples = 0, 0, []
    greedy = dict(allow_images=False, do_sample=False, max_new_tokens=CAPTION_MAX_NEW_TOKENS)
    for start in range(0, len(layouts), batch_size):
        rows = layouts[start : start + batch_size]
        images = [[draw_scene(layout)] for layout in rows]
        out = pipe(["<image>"] * len(images), image=images, use_chat_template=False, **greedy)
        questions = [CAPTION_QUESTIONS[(start + i) % len(CAPTION_QUESTIONS)] for i in range(len(images))]
        chat = pipe([[{"role": "user", "content": [{"type": "image"}, q]}] for q in questions], image=images, **greedy)
        for answer, chat_answer, layout in zip(out.text, chat.text, rows):
            ok = captions_agree(answer, layout.scene)
            right += ok
            chat_right += captions_agree(chat_answer, layout.scene)
            if len(examples) < NUM_EXAMPLES:
                examples.append({"truth": layout.scene.caption(), "caption": answer.strip(), "ok": ok})
    return {
        "caption_accuracy": right / len(layouts),
        "chat_caption_accuracy": chat_right / len(layouts),
        "caption_examples": examples,
    }


def question_accuracy(pipe, settings: SceneEvaluationSettings, batch_size: int = 32) -> dict:
    """One question of the world about each held-out picture, asked in a chat (the picture, then the question), greedy;
    right when the answer's first word is the answer. `question_accuracy_by_kind` holds the kinds asked."""
    asked = held_out_questions(settings.num_questions, settings.seed)
    right_by_kind, asked_by_kind, examples = {}, {}, []
    greedy = dict(allow_images=False, do_sample=False, max_new_tokens=ANSWER_MAX_NEW_TOKENS)
    for start in range(0, len(asked), batch_size):
        rows = asked[start : start + batch_size]
        out = pipe(
            [[{"role": "user", "content": [{"type": "image"}, question]}] for _, question, _ in rows],
            image=[[draw_scene(layout)] for layout, _, _ in rows],
            **greedy,
        )
        for text, (_, question, truth) in zip(out.text, rows):
            ok = answers_agree(text, truth)
            kind = question_kind(question)
            right_by_kind[kind] = right_by_kind.get(kind, 0) + ok
            asked_by_kind[kind] = asked_by_kind.get(kind, 0) + 1
            if len(examples) < NUM_EXAMPLES:
                examples.append({"question": question, "truth": truth, "answer": text.strip(), "ok": ok})
    return {
        "question_accuracy": sum(right_by_kind.values()) / len(asked),
        "question_accuracy_by_kind": {
            kind: right_by_kind[kind] / asked_by_kind[kind] for kind in QUESTION_KINDS if kind in asked_by_kind
        },
        "question_examples": examples,
    }


def t2i_accuracy(pipe, settings: SceneEvaluationSettings) -> dict:
    """The captions of held-out scenes drawn `t2i_per_scene` times each (one generator per picture); a picture is
    right when the judge reads the caption's scene in it."""
    scenes = [layout.scene for layout in held_out_scenes("t2i", settings.num_t2i_scenes, settings.seed)]
    asked = [scene for scene in scenes for _ in range(settings.t2i_per_scene)]
    prompts = [scene.caption() for scene in asked]
    images = text_to_image_pipeline(pipe)(
        prompts,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        generator=_generators(settings, len(prompts)),
    ).images
    right, drawn, things_right = {}, {}, 0
    for prompt, scene, image in zip(prompts, asked, images):
        # two held-out scenes may share a caption: its share is over all of its pictures
        right[prompt] = right.get(prompt, 0) + drawing_shows(image, scene)
        drawn[prompt] = drawn.get(prompt, 0) + 1
        things_right += things_drawn_right(image, scene)
    return {
        "t2i_accuracy": sum(right.values()) / len(prompts),
        "t2i_attribute_accuracy": things_right / sum(len(scene.things) for scene in asked),
        "t2i_per_caption": {prompt: right[prompt] / drawn[prompt] for prompt in right},
        "t2i_images": images,
        "t2i_prompts": prompts,
    }


def _judge_story(document: list) -> tuple[int, int, list[str]]:
    """(pictures right, pictures drawn, the story written out with what the judge read in each picture)."""
    reader, pending, record = StoryReader(), [], []
    matched = drawn = 0
    for segment in document:
        if isinstance(segment, str):
            pending.append(segment)
            record.append(segment.strip())
            continue
        drawn += 1
        sentences = split_sentences(" ".join(pending))
        for sentence in sentences:
            reader.read(sentence)
        # a picture with no sentence of its own, or after a sentence the reader cannot follow, says no scene
        expected = reader.scene if sentences and not reader.lost else None
        ok = drawing_shows(segment, expected)
        matched += ok
        seen = read_scene(segment)
        note = "" if ok else f" (mismatch: {expected.caption() if expected is not None else 'no scene'} asked)"
        record.append(f"[picture: {seen.caption() if seen is not None else 'unreadable'}{note}]")
        pending = []
    return matched, drawn, record


def interleaved_match(pipe, settings: SceneEvaluationSettings) -> dict:
    """Stories written and drawn in one call; each picture judged against the scene its story's sentences reached."""
    return judged_stories(pipe, settings, _judge_story)


def evaluate_pipeline(pipe, settings: SceneEvaluationSettings | None = None, log=print) -> dict:
    """All four figures (and their details) of `pipe` on the shapes world, version 2, with the time each took."""
    figures = (
        ("caption", caption_accuracy),
        ("question", question_accuracy),
        ("t2i", t2i_accuracy),
        ("interleaved", interleaved_match),
    )
    return measure_figures(pipe, settings or SceneEvaluationSettings(), figures, log)


__all__ = [
    "SceneEvaluationSettings",
    "caption_accuracy",
    "evaluate_pipeline",
    "held_out_questions",
    "held_out_scenes",
    "interleaved_match",
    "question_accuracy",
    "split_sentences",
    "t2i_accuracy",
]
