"""The figures of the shapes world, version 2 (`scene_evaluation.py`), on stand-in pipelines that answer right, wrong
or partly right. The stand-ins see and draw real pictures; the judge is the real one."""

import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
from PIL import Image
from shapes_world_v2.scene_evaluation import (
    ANSWER_MAX_NEW_TOKENS,
    CAPTION_MAX_NEW_TOKENS,
    SceneEvaluationSettings,
    caption_accuracy,
    evaluate_pipeline,
    held_out_questions,
    held_out_scenes,
    interleaved_match,
    question_accuracy,
    split_sentences,
    t2i_accuracy,
)
from shapes_world_v2.scene_judge import read_scene
from shapes_world_v2.scenes import (
    COUNT_WORDS,
    OPPOSITE,
    QUESTION_KINDS,
    SCENE_SIZE,
    Scene,
    draw_scene,
    layout_scene,
    parse_caption,
    question_kind,
    sample_story,
    scene_questions,
)

from dreamllm_hf.shapes_world.tokenizer import CAPTION_QUESTIONS, STORY_INSTRUCTIONS
from dreamllm_hf.shapes_world.world import COLOURS, SHAPES


SMALL = SceneEvaluationSettings(
    num_caption_pictures=40, num_questions=60, num_t2i_scenes=10, t2i_per_scene=2, num_stories=3
)
BLANK = Image.new("RGB", (SCENE_SIZE, SCENE_SIZE), (255, 255, 255))


class StandIn:
    """Answers like the pipelines. `answer(prompt, picture)` decides a text answer (`allow_images=False`);
    `draw(prompt, generator)` a text-to-image picture; `documents[i]` is written for the i-th story instruction."""

    def __init__(self, answer=None, draw=None, documents=None):
        self.answer, self.draw, self.documents = answer, draw, documents
        self.calls, self.progress_bar = [], None

    def set_progress_bar_config(self, **kwargs):
        self.progress_bar = kwargs

    def __call__(self, prompt, image=None, allow_images=True, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        self.calls.append(dict(prompts=prompts, image=image, allow_images=allow_images, **kwargs))
        if not allow_images:
            return SimpleNamespace(text=[self.answer(p, pictures[0]) for p, pictures in zip(prompts, image)])
        if "max_images" in kwargs:
            documents = [self.documents[index % len(self.documents)] for index in range(len(prompts))]
            return SimpleNamespace(documents=documents, stop_reasons=["eos"] * len(prompts))
        return SimpleNamespace(images=[self.draw(p, g) for p, g in zip(prompts, kwargs["generator"])])


def _question_of(prompt) -> str | None:
    """The text of a chat prompt's user turn (None for the bare `<image>` prompt)."""
    return None if isinstance(prompt, str) else prompt[0]["content"][1]


def _place(scene: Scene, seed: int):
    rng = random.Random(seed)
    while (layout := layout_scene(rng, scene)) is None:
        pass
    return layout


def _said_the_other_way(scene: Scene) -> str:
    if len(scene.things) == 1:
        return f"A {scene.things[0].name}."
    first, second = scene.things
    return f"A {second.name} {OPPOSITE[scene.relation]} a {first.name}."


def _near_miss(scene: Scene) -> Scene:
    """The scene with its first thing's size changed: one word wrong."""
    first = scene.things[0]
    return Scene((replace(first, size="small" if first.size == "big" else "big"), *scene.things[1:]), scene.relation)


def _reversed(scene: Scene) -> Scene:
    return scene if len(scene.things) == 1 else Scene(scene.things, OPPOSITE[scene.relation])


def _share_of_one_thing(layouts) -> float:
    share = sum(len(layout.scene.things) == 1 for layout in layouts) / len(layouts)
    assert 0 < share < 1  # both kinds of scene are asked, so a half-right stand-in is told apart
    return share


# --------------------------------------------------------------------------------------------------------------------
# Captions


def test_held_out_scenes_are_fixed_by_the_seed_and_differ_by_task():
    assert held_out_scenes("captions", 20) == held_out_scenes("captions", 20)
    assert held_out_scenes("captions", 20) != held_out_scenes("captions", 20, seed=1)
    assert held_out_scenes("captions", 20) != held_out_scenes("t2i", 20)
    assert held_out_questions(10) == held_out_questions(10)


def test_caption_accuracy_counts_exact_captions():
    seeing = StandIn(answer=lambda prompt, picture: _said_the_other_way(read_scene(picture)))
    figures = caption_accuracy(seeing, SMALL, batch_size=16)
    assert figures["caption_accuracy"] == figures["chat_caption_accuracy"] == 1.0
    assert [example["ok"] for example in figures["caption_examples"]] == [True] * 6
    truths = [layout.scene.caption() for layout in held_out_scenes("captions", SMALL.num_caption_pictures)]
    assert [example["truth"] for example in figures["caption_examples"]] == truths[:6]
    # two calls per batch of 16 (40 pictures: 3 batches), greedy text answers, the pretraining prompt without the
    # chat template and the chat questions with it
    assert len(seeing.calls) == 6
    bare, chat = seeing.calls[:2]
    for call in (bare, chat):
        assert call["allow_images"] is False and call["do_sample"] is False
        assert call["max_new_tokens"] == CAPTION_MAX_NEW_TOKENS
    assert bare["prompts"] == ["<image>"] * 16 and bare["use_chat_template"] is False
    assert "use_chat_template" not in chat
    assert {_question_of(prompt) for prompt in chat["prompts"]} == set(CAPTION_QUESTIONS)

    one_word_wrong = StandIn(answer=lambda prompt, picture: _near_miss(read_scene(picture)).caption())
    figures = caption_accuracy(one_word_wrong, SMALL)
    assert figures["caption_accuracy"] == figures["chat_caption_accuracy"] == 0.0

    # Right on pictures of one thing; the relation said the wrong way round on pictures of two.
    half = StandIn(answer=lambda prompt, picture: _reversed(read_scene(picture)).caption())
    figures = caption_accuracy(half, SMALL)
    expected = _share_of_one_thing(held_out_scenes("captions", SMALL.num_caption_pictures))
    assert figures["caption_accuracy"] == figures["chat_caption_accuracy"] == pytest.approx(expected)

    # Only the chat prompts are answered right: the two figures are measured apart.
    chat_only = StandIn(
        answer=lambda prompt, picture: read_scene(picture).caption() if _question_of(prompt) else "a big red circle"
    )
    figures = caption_accuracy(chat_only, SMALL)
    assert figures["chat_caption_accuracy"] == 1.0 and figures["caption_accuracy"] < 0.2


# --------------------------------------------------------------------------------------------------------------------
# Questions

OTHER_WORD = {
    **{word: COUNT_WORDS[(i + 1) % len(COUNT_WORDS)] for i, word in enumerate(COUNT_WORDS)},
    **{word: list(COLOURS)[(i + 1) % len(COLOURS)] for i, word in enumerate(COLOURS)},
    **{word: SHAPES[(i + 1) % len(SHAPES)] for i, word in enumerate(SHAPES)},
    "yes": "no",
    "no": "yes",
}


def _answer_seen(prompt, picture) -> str:
    """The answer to the question as the picture shows it (the judge's reading of the picture)."""
    return dict(scene_questions(read_scene(picture)))[_question_of(prompt)]


def test_question_accuracy_and_its_kinds():
    asked = held_out_questions(SMALL.num_questions)
    kinds = [question_kind(question) for _, question, _ in asked]
    assert set(kinds) == set(QUESTION_KINDS)  # this sample asks every kind, so each is checked below

    right = StandIn(answer=lambda prompt, picture: f"{_answer_seen(prompt, picture).capitalize()}.")
    figures = question_accuracy(right, SMALL, batch_size=25)
    assert figures["question_accuracy"] == 1.0
    assert figures["question_accuracy_by_kind"] == dict.fromkeys(QUESTION_KINDS, 1.0)
    assert [(e["question"], e["truth"]) for e in figures["question_examples"]] == [(q, a) for _, q, a in asked[:6]]
    call = right.calls[0]
    assert len(right.calls) == 3 and call["allow_images"] is False and call["do_sample"] is False
    assert call["max_new_tokens"] == ANSWER_MAX_NEW_TOKENS and "use_chat_template" not in call
    # a user turn of the picture, then the question; the picture is the held-out scene's
    assert call["prompts"][0] == [{"role": "user", "content": [{"type": "image"}, asked[0][1]]}]
    assert read_scene(call["image"][0][0]) == asked[0][0].scene.canonical()

    # the right word said, but not first: the first word is the answer
    wrong = StandIn(
        answer=lambda prompt, picture: (
            f"{OTHER_WORD[_answer_seen(prompt, picture)]}, not {_answer_seen(prompt, picture)}"
        )
    )
    figures = question_accuracy(wrong, SMALL)
    assert figures["question_accuracy"] == 0.0
    assert figures["question_accuracy_by_kind"] == dict.fromkeys(QUESTION_KINDS, 0.0)

    known = {"count", "relation"}
    partly = StandIn(
        answer=lambda prompt, picture: (
            _answer_seen(prompt, picture)
            if question_kind(_question_of(prompt)) in known
            else OTHER_WORD[_answer_seen(prompt, picture)]
        )
    )
    figures = question_accuracy(partly, SMALL)
    assert figures["question_accuracy"] == pytest.approx(sum(kind in known for kind in kinds) / len(kinds))
    assert figures["question_accuracy_by_kind"] == {kind: float(kind in known) for kind in QUESTION_KINDS}


# --------------------------------------------------------------------------------------------------------------------
# Text to image


def _drawing(change=lambda scene: scene, keep=None):
    """A stand-in text-to-image pipeline drawing the prompt's scene changed by `change`, placed by the generator's
    seed; `keep` leaves only the first `keep` things."""

    def draw(prompt, generator):
        scene = change(parse_caption(prompt))
        if keep is not None and len(scene.things) > keep:
            scene = Scene(scene.things[:keep])
        return draw_scene(_place(scene, generator.initial_seed()))

    return StandIn(draw=draw)


def test_t2i_accuracy_judges_the_drawn_scene():
    scenes = [layout.scene for layout in held_out_scenes("t2i", SMALL.num_t2i_scenes)]
    one_share = _share_of_one_thing(held_out_scenes("t2i", SMALL.num_t2i_scenes))
    num_things = sum(len(scene.things) for scene in scenes)

    right = _drawing()
    figures = t2i_accuracy(right, SMALL)
    assert figures["t2i_accuracy"] == figures["t2i_attribute_accuracy"] == 1.0
    assert figures["t2i_prompts"] == [scene.caption() for scene in scenes for _ in range(SMALL.t2i_per_scene)]
    assert len(figures["t2i_images"]) == len(figures["t2i_prompts"])
    assert set(figures["t2i_per_caption"]) == {scene.caption() for scene in scenes}
    assert set(figures["t2i_per_caption"].values()) == {1.0}
    (call,) = right.calls
    assert [g.initial_seed() for g in call["generator"]] == [SMALL.seed * 10_000 + i for i in range(20)]
    assert call["num_inference_steps"] == SMALL.num_inference_steps
    assert call["guidance_scale"] == SMALL.guidance_scale

    figures = t2i_accuracy(_drawing(_near_miss), SMALL)
    assert figures["t2i_accuracy"] == 0.0
    assert figures["t2i_attribute_accuracy"] == pytest.approx((num_things - len(scenes)) / num_things)

    blank = StandIn(draw=lambda prompt, generator: BLANK)
    assert t2i_accuracy(blank, SMALL)["t2i_accuracy"] == t2i_accuracy(blank, SMALL)["t2i_attribute_accuracy"] == 0

    # The relation drawn the wrong way round: every thing is right, only pictures of one thing are.
    figures = t2i_accuracy(_drawing(_reversed), SMALL)
    assert figures["t2i_accuracy"] == pytest.approx(one_share) and figures["t2i_attribute_accuracy"] == 1.0
    for caption, share in figures["t2i_per_caption"].items():
        assert share == (1.0 if len(parse_caption(caption).things) == 1 else 0.0), caption

    # Only the first thing drawn: pictures of one thing right; of the things, all but the second ones.
    figures = t2i_accuracy(_drawing(keep=1), SMALL)
    assert figures["t2i_accuracy"] == pytest.approx(one_share)
    assert figures["t2i_attribute_accuracy"] == pytest.approx(len(scenes) / num_things)


# --------------------------------------------------------------------------------------------------------------------
# Stories


def test_split_sentences():
    assert split_sentences(" First there was a big red circle.  The circle\nshrinks. ") == [
        "First there was a big red circle.",
        "The circle shrinks.",
    ]
    assert split_sentences("") == [] and split_sentences("The circle") == ["The circle"]


def _story(seed: int, num_pictures: int = 4):
    return [(sentence, draw_scene(layout)) for sentence, layout in sample_story(random.Random(seed), num_pictures)]


def test_interleaved_match_judges_each_picture_against_the_scene_its_sentences_reached():
    right = [segment for sentence, picture in _story(1) for segment in (sentence, picture)] + ["The end."]
    stand_in = StandIn(documents=[right])
    figures = interleaved_match(stand_in, SMALL)
    assert figures["interleaved_match"] == 1.0
    assert figures["interleaved_pictures"] == 4 * SMALL.num_stories
    assert figures["stories_with_pictures"] == SMALL.num_stories
    (call,) = stand_in.calls  # all stories in one call, each sampled and drawn from its own generator
    assert call["prompts"] == [STORY_INSTRUCTIONS[i % len(STORY_INSTRUCTIONS)] for i in range(3)]
    assert call["do_sample"] is True and call["max_images"] == SMALL.max_story_images
    assert call["max_new_tokens"] == SMALL.max_story_tokens
    assert [g.initial_seed() for g in call["generator"]] == [SMALL.seed * 10_000 + i for i in range(3)]

    (s1, p1), (s2, p2), (s3, p3), (s4, p4) = _story(2)
    # Read in order: the picture after the second sentence is the first one again (wrong); the third picture follows
    # the third sentence (right, the second sentence was read too); a picture with no new sentence, and one after a
    # sentence the reader cannot follow, are misses.
    mixed = [s1, p1, s2, p1, s3, p3, p3, "The circle flies away.", p4]
    # Two sentences before one picture, or a sentence split over two pieces of text, are read all the same; a
    # picture before any sentence is a miss.
    gathered = [p1, f"{s1} {s2}", p2, s3, f" {s4}", p4]
    unillustrated = [s1, s2]
    figures = interleaved_match(StandIn(documents=[mixed, gathered, unillustrated]), SMALL)
    assert figures["interleaved_pictures"] == 5 + 3
    assert figures["interleaved_match"] == pytest.approx((2 + 2) / 8)
    assert figures["stories_with_pictures"] == 2
    mixed_record = figures["story_examples"][0]["document"]
    assert mixed_record.count("(mismatch") == 3 and mixed_record.count("[picture:") == 5
    assert "no scene asked" in mixed_record

    figures = interleaved_match(StandIn(documents=[[s1, BLANK, s2, BLANK]]), SMALL)
    assert figures["interleaved_match"] == 0.0 and "[picture: unreadable" in figures["story_examples"][0]["document"]
    figures = interleaved_match(StandIn(documents=[unillustrated]), SMALL)
    assert figures["interleaved_match"] == 0.0 and figures["interleaved_pictures"] == 0


# --------------------------------------------------------------------------------------------------------------------
# All four


def test_evaluate_pipeline_reports_all_four_figures():
    everything = StandIn(
        answer=lambda prompt, picture: (
            _answer_seen(prompt, picture)
            if _question_of(prompt) not in (None, *CAPTION_QUESTIONS)
            else read_scene(picture).caption()
        ),
        draw=lambda prompt, generator: draw_scene(_place(parse_caption(prompt), generator.initial_seed())),
        documents=[[segment for sentence, picture in _story(3, 3) for segment in (sentence, picture)]],
    )
    settings = SceneEvaluationSettings(
        num_caption_pictures=8, num_questions=8, num_t2i_scenes=4, t2i_per_scene=1, num_stories=2
    )
    logged = []
    results = evaluate_pipeline(everything, settings, log=logged.append)
    for figure in ("caption_accuracy", "chat_caption_accuracy", "question_accuracy", "t2i_accuracy"):
        assert results[figure] == 1.0, figure
    assert results["t2i_attribute_accuracy"] == results["interleaved_match"] == 1.0
    assert results["settings"]["num_questions"] == 8
    assert list(results["eval_timings_s"]) == ["caption", "question", "t2i", "interleaved"]
    assert len(logged) == 4 and everything.progress_bar == {"disable": True}
