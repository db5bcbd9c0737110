"""The shapes world, version 2 (`scenes.py`), and its judge (`scene_judge.py`): the judge reads what the world draws,
the world's words read back as the scenes they say, and stories change their pictures as their sentences say."""

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter
from shapes_world_v2.scene_judge import drawing_shows, read_scene, read_things, things_drawn_right
from shapes_world_v2.scenes import (
    COUNT_WORDS,
    OPPOSITE,
    QUESTION_KINDS,
    RELATIONS,
    SCENE_SIZE,
    Layout,
    Scene,
    StoryReader,
    Thing,
    answers_agree,
    captions_agree,
    draw_scene,
    parse_caption,
    question_kind,
    referring_name,
    sample_scene,
    sample_story,
    scene_questions,
)

from dreamllm_hf.shapes_world.world import COLOURS, SHAPES


RED_CIRCLE = Thing("big", "red", "circle")
BLUE_SQUARE = Thing("small", "blue", "square")


def _alone(thing: Thing, centre: tuple[int, int]) -> np.ndarray:
    return np.asarray(draw_scene(Layout(Scene((thing,)), (centre,))))


def _blurred_and_noisy(image: Image.Image, blur: float, sigma: float, noise: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    pixels = pixels + noise.normal(0, sigma, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------------------------------
# The judge


def test_judge_reads_every_generated_scene():
    rng = random.Random(0)
    counts = {1: 0, 2: 0}
    for _ in range(300):
        layout = sample_scene(rng)
        counts[len(layout.scene.things)] += 1
        assert read_scene(draw_scene(layout)) == layout.scene.canonical(), layout
        assert drawing_shows(draw_scene(layout), layout.scene)
    assert min(counts.values()) > 80  # both kinds of scene were judged


def test_judge_reads_hand_placed_scenes_and_their_relations():
    for centres, relation in (
        (((16, 32), (48, 32)), "left of"),
        (((48, 30), (14, 34)), "right of"),
        (((30, 14), (34, 48)), "above"),
        (((32, 50), (32, 14)), "below"),
    ):
        scene = Scene((RED_CIRCLE, BLUE_SQUARE), relation)
        picture = draw_scene(Layout(scene, centres))
        assert read_scene(picture) == scene.canonical()
        assert drawing_shows(picture, scene)
        assert drawing_shows(picture, Scene((BLUE_SQUARE, RED_CIRCLE), OPPOSITE[relation]))
        for wrong in set(RELATIONS) - {relation}:
            assert not drawing_shows(picture, Scene((RED_CIRCLE, BLUE_SQUARE), wrong)), wrong
        assert not drawing_shows(picture, Scene((RED_CIRCLE,)))  # one thing of two is not the scene
        assert not drawing_shows(picture, None)
    for size in ("small", "big"):
        for colour in COLOURS:
            for shape in SHAPES:
                thing = Thing(size, colour, shape)
                assert read_scene(_alone(thing, (32, 32))) == Scene((thing,)), thing


def test_judge_survives_blur_and_noise():
    """Generated pictures are soft and noisy: the judge must still read the scene meant (measured: 1.000)."""
    rng, noise = random.Random(1), np.random.default_rng(1)
    layouts = [sample_scene(rng) for _ in range(300)]
    read_right = sum(
        read_scene(_blurred_and_noisy(draw_scene(layout), 0.8, 12, noise)) == layout.scene.canonical()
        for layout in layouts
    )
    assert read_right / len(layouts) >= 0.97


def test_judge_sees_no_scene_in_a_blank_picture_or_three_things_or_two_alike():
    blank = Image.new("RGB", (SCENE_SIZE, SCENE_SIZE), (255, 255, 255))
    assert read_scene(blank) is None and read_things(blank) == []
    assert read_scene(np.full((SCENE_SIZE, SCENE_SIZE, 3), 0.5, dtype=np.float32)) is None  # grey, floats in [0, 1]
    assert not drawing_shows(blank, Scene((RED_CIRCLE,)))

    green_triangle = Thing("small", "green", "triangle")
    three = np.minimum(
        np.minimum(_alone(RED_CIRCLE, (16, 16)), _alone(BLUE_SQUARE, (50, 14))), _alone(green_triangle, (32, 50))
    )
    assert read_scene(three) is None
    assert sorted(read_things(three), key=str) == sorted([RED_CIRCLE, BLUE_SQUARE, green_triangle], key=str)
    twins = np.minimum(_alone(RED_CIRCLE, (16, 32)), _alone(RED_CIRCLE, (48, 32)))
    assert read_scene(twins) is None  # words could not tell them apart

    # a drawn picture's stray stroke: a diagonal line, no row or column holding two of its pixels
    stroke = np.asarray(_alone(RED_CIRCLE, (16, 16))).copy()
    for k in range(50):
        stroke[k + 14, 63 - k] = (40, 80, 220)
    assert read_scene(stroke) is None
    assert read_things(stroke) == [RED_CIRCLE]


def test_things_drawn_right_gives_partial_credit():
    scene = Scene((RED_CIRCLE, BLUE_SQUARE), "left of")
    right = draw_scene(Layout(scene, ((16, 32), (48, 32))))
    swapped = draw_scene(Layout(scene, ((48, 32), (16, 32))))  # both things right, the relation wrong
    assert things_drawn_right(right, scene) == things_drawn_right(swapped, scene) == 2
    assert drawing_shows(right, scene) and not drawing_shows(swapped, scene)
    assert things_drawn_right(_alone(RED_CIRCLE, (20, 20)), scene) == 1
    assert things_drawn_right(_alone(Thing("small", "red", "circle"), (20, 20)), scene) == 0  # wrong size
    green_triangle = Thing("small", "green", "triangle")
    crowded = np.minimum(np.asarray(right), _alone(green_triangle, (32, 54)))
    assert things_drawn_right(crowded, scene) == 2 and read_scene(crowded) is None
    blank = Image.new("RGB", (SCENE_SIZE, SCENE_SIZE), (255, 255, 255))
    assert things_drawn_right(blank, scene) == 0


# --------------------------------------------------------------------------------------------------------------------
# Captions


def test_captions_round_trip_and_agree_either_way_round():
    rng = random.Random(2)
    for _ in range(200):
        scene = sample_scene(rng).scene
        assert parse_caption(scene.caption()) == scene
        assert captions_agree(scene.caption(), scene)
        assert captions_agree(f"  {scene.caption().upper()}. ", scene)
        if len(scene.things) == 2:
            first, second = scene.things
            flipped = f"A {second.name} {OPPOSITE[scene.relation]} a {first.name}."
            assert parse_caption(flipped).canonical() == scene.canonical()
            assert captions_agree(flipped, scene)
            assert scene.canonical().relation in ("left of", "above")


def test_captions_disagree_on_any_wrong_word():
    scene = Scene((RED_CIRCLE, BLUE_SQUARE), "left of")
    assert captions_agree("a big red circle left of a small blue square", scene)
    assert captions_agree("a small blue square right of a big red circle", scene)
    for wrong in (
        "a small red circle left of a small blue square",  # size
        "a big green circle left of a small blue square",  # colour
        "a big red circle left of a small blue triangle",  # shape
        "a big red circle right of a small blue square",  # relation
        "a big red circle above a small blue square",
        "a small blue square left of a big red circle",  # the relation read the wrong way round
        "a big red circle",  # a thing left out
        "a red circle left of a blue square",  # sizes left out
        "a big red circle left of a small blue square and a small green triangle",
        "",
    ):
        assert not captions_agree(wrong, scene), wrong
    assert parse_caption("a big red circle left of a big red circle") is None  # two alike things
    assert parse_caption("a purple circle") is None
    with pytest.raises(ValueError, match="one thing, or two"):
        Scene((RED_CIRCLE, BLUE_SQUARE))


# --------------------------------------------------------------------------------------------------------------------
# Questions


def test_questions_of_a_hand_built_scene():
    scene = Scene((Thing("small", "green", "square"), Thing("big", "red", "triangle")), "left of")
    asked = dict(scene_questions(scene))
    expected = {
        "How many shapes are there?": "two",
        "How many circles are there?": "none",
        "How many squares are there?": "one",
        "What colour is the square?": "green",
        "What colour is the triangle?": "red",
        "Is the square big?": "no",
        "Is the triangle big?": "yes",
        "Is the triangle small?": "no",
        "What shape is the red one?": "triangle",
        "What colour is the shape right of the square?": "red",
        "What shape is left of the triangle?": "square",
        "Is the square left of the triangle?": "yes",
        "Is the square above the triangle?": "no",
        "Is the triangle right of the square?": "yes",
        "Is the triangle left of the square?": "no",
    }
    assert {question: asked.get(question) for question in expected} == expected

    # Two circles: counted together, and each named by its colour in relations; their colours are never asked
    # about by the name "circle", which would not say which one.
    circles = Scene((Thing("big", "blue", "circle"), Thing("small", "yellow", "circle")), "above")
    asked = dict(scene_questions(circles))
    assert asked["How many circles are there?"] == "two" and asked["How many shapes are there?"] == "two"
    assert asked["Is the blue circle above the yellow circle?"] == "yes"
    assert asked["What shape is the yellow one?"] == "circle"
    assert "What colour is the circle?" not in asked and "Is the circle big?" not in asked

    one = dict(scene_questions(Scene((Thing("big", "yellow", "triangle"),))))
    assert one["How many shapes are there?"] == "one" and one["How many triangles are there?"] == "one"
    assert one["Is the triangle small?"] == "no" and one["What colour is the triangle?"] == "yellow"
    assert not any(question_kind(question) == "relation" for question in one)


def test_every_question_is_answered_by_the_scene_its_picture_shows():
    rng = random.Random(3)
    kinds = set()
    words = set(COUNT_WORDS) | set(COLOURS) | set(SHAPES) | {"yes", "no"}
    for _ in range(200):
        layout = sample_scene(rng)
        questions = scene_questions(layout.scene)
        asked = dict(questions)
        assert len(asked) == len(questions)  # no question asked twice
        # the judge's reading of the picture (said the canonical way) asks the same questions with the same answers
        assert dict(scene_questions(read_scene(draw_scene(layout)))) == asked
        for question, answer in questions:
            assert answer in words and answers_agree(f"{answer.capitalize()}.", answer)
            kind = question_kind(question)
            kinds.add(kind)
            if kind in ("colour", "shape"):
                assert answer not in question.lower().split(), question  # the answer is not in the question
        names = [referring_name(layout.scene, index) for index in range(len(layout.scene.things))]
        assert len(set(names)) == len(names), names
    assert kinds == set(QUESTION_KINDS)


def test_answers_agree_on_the_first_word_and_question_kinds_by_wording():
    assert answers_agree("Yes.", "yes") and answers_agree("two, I think", "two")
    assert not answers_agree("no", "yes") and not answers_agree("", "yes") and not answers_agree("I see two", "two")
    assert question_kind("How many squares are there?") == "count"
    assert question_kind("What colour is the circle?") == "colour"
    assert question_kind("Is the circle small?") == "size"
    assert question_kind("What shape is the red one?") == "shape"
    assert question_kind("What shape is above the square?") == "relation"
    assert question_kind("What colour is the shape left of the circle?") == "relation"
    assert question_kind("Is the red circle below the blue circle?") == "relation"
    with pytest.raises(ValueError, match="`question` must be a question of `scene_questions`, got 'Why'"):
        question_kind("Why")


# --------------------------------------------------------------------------------------------------------------------
# Stories


@pytest.mark.parametrize("num_pictures", [3, 4])
def test_the_reader_follows_every_story_to_the_scene_of_its_picture(num_pictures):
    rng = random.Random(4 + num_pictures)
    for _ in range(40):
        story = sample_story(rng, num_pictures)
        assert len(story) == num_pictures
        reader = StoryReader()
        previous = None
        for sentence, layout in story:
            assert reader.read(sentence).canonical() == layout.scene.canonical(), (sentence, layout)
            assert read_scene(draw_scene(layout)) == layout.scene.canonical(), (sentence, layout)
            if previous is not None:
                # what the sentence does not change stays where it was
                if " appears " in sentence:
                    assert layout.centres[1] == previous.centres[0]
                elif sentence.endswith("goes away."):
                    assert layout.centres[0] in previous.centres
                else:
                    assert layout.centres == previous.centres
                assert layout.scene != previous.scene
            previous = layout
        assert not reader.lost


def test_the_reader_is_lost_on_a_sentence_it_cannot_follow():
    reader = StoryReader()
    assert reader.read("First there was a big red square.") == Scene((Thing("big", "red", "square"),))
    assert reader.read("The square turns blue.") == Scene((Thing("big", "blue", "square"),))
    assert reader.read("A small red circle appears left of the square.") == Scene(
        (Thing("small", "red", "circle"), Thing("big", "blue", "square")), "left of"
    )
    assert reader.read("The circle grows big.").things[0] == Thing("big", "red", "circle")
    assert reader.read("The square goes away.") == Scene((Thing("big", "red", "circle"),))
    assert not reader.lost
    assert reader.read("The triangle turns green.") is None  # there is no triangle
    assert reader.lost and reader.read("The circle shrinks.") is None  # lost for good

    for opening, absent in (
        ("It all began with a small green triangle.", "The square turns red."),
        ("It all began with a small green triangle.", "A big red circle appears above the square."),
        ("It all began with a small green triangle.", "The triangle goes away."),  # the last thing cannot go
        ("Once upon a time there was a big red circle left of a big blue circle.", "The circle turns green."),
    ):
        reader = StoryReader()
        assert reader.read(opening) is not None
        assert reader.read(absent) is None, absent
    assert StoryReader().read("The square turns red.") is None  # no opening yet
    assert StoryReader().read("Once upon a time there was a dragon.") is None


def test_sample_story_is_deterministic_for_a_seed():
    assert sample_story(random.Random(11), 4) == sample_story(random.Random(11), 4)
    assert sample_story(random.Random(11), 4) != sample_story(random.Random(12), 4)
    with pytest.raises(ValueError, match="at least one picture"):
        sample_story(random.Random(0), 0)
