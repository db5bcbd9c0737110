"""The shapes world, version 2: 64x64 pictures of one or two shapes, their sizes and where they stand.

A `Scene` is what words can say about a picture: one or two `Thing`s (size, colour, shape) and, for two, the relation
of the first to the second ("left of", "right of", "above", "below"). A `Layout` places a scene's things on the
canvas. Captions say everything a scene holds ("a small red circle left of a big blue square"); two scenes are the same
when they say the same thing (`Scene.canonical`: "A right of B" is "B left of A").

Questions have one-word answers; stories are three or four pictures, each the previous one changed as its sentence
says ("The square turns green."). `parse_caption` and `StoryReader` read the world's sentences back, so that what a
model writes can be judged against what it draws.
"""

import math
import random
import re
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

from dreamllm_hf.shapes_world.world import COLOURS, SHAPES


SCENE_SIZE = 64
SIZES = {"small": 16, "big": 26}  # side of the bounding box in pixels; the judge splits them at the midpoint
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BACKGROUND = (255, 255, 255)
GAP = 4  # least empty pixels between two things' boxes along the relation's axis
TWO_THING_SHARE = 0.6

STORY_OPENINGS = ("First there was {}.", "Once upon a time there was {}.", "It all began with {}.")
COUNT_WORDS = ("none", "one", "two")


@dataclass(frozen=True)
class Thing:
    size: str
    colour: str
    shape: str

    @property
    def name(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One or two things; `relation` says where `things[0]` stands with respect to `things[1]` (None for one)."""

    things: tuple[Thing, ...]
    relation: str | None = None

    def __post_init__(self):
        if len(self.things) not in (1, 2) or (len(self.things) == 2) != (self.relation in RELATIONS):
            raise ValueError(f"A scene is one thing, or two and one of {RELATIONS}; got {self}.")

    def canonical(self) -> "Scene":
        """The same scene said one fixed way: two things as "left of" or "above", the first named first."""
        if self.relation in ("right of", "below"):
            return Scene(self.things[::-1], OPPOSITE[self.relation])
        return self

    def caption(self) -> str:
        if len(self.things) == 1:
            return f"a {self.things[0].name}"
        return f"a {self.things[0].name} {self.relation} a {self.things[1].name}"


@dataclass(frozen=True)
class Layout:
    """A scene on the canvas: the centre (x, y) of each thing, in pixels."""

    scene: Scene
    centres: tuple[tuple[int, int], ...]


# --------------------------------------------------------------------------------------------------------------------
# Sampling and drawing
# --------------------------------------------------------------------------------------------------------------------


def sample_thing(rng: random.Random) -> Thing:
    return Thing(rng.choice(tuple(SIZES)), rng.choice(tuple(COLOURS)), rng.choice(SHAPES))


def _free_centre(rng: random.Random, side: int) -> int:
    half = side // 2 + 1
    return rng.randint(half, SCENE_SIZE - half)


def _place_pair(rng: random.Random, first: Thing, second: Thing, relation: str) -> tuple[tuple[int, int], ...] | None:
    """Centres putting `first` `relation` `second`: apart by a gap along the axis, the other axis at most half as far
    off, so that the relation is plain to see. None when this draw does not fit."""
    a, b = SIZES[first.size], SIZES[second.size]
    horizontal = relation in ("left of", "right of")
    sign = -1 if relation in ("left of", "above") else 1  # first's coordinate minus second's along the axis
    least = (a + b) // 2 + GAP
    for _ in range(50):
        along_second = _free_centre(rng, b)
        along_first = along_second + sign * rng.randint(least, SCENE_SIZE)
        if not (a // 2 + 1 <= along_first <= SCENE_SIZE - a // 2 - 1):
            continue
        distance = abs(along_first - along_second)
        across_first = _free_centre(rng, a)
        across_second = across_first + rng.randint(-distance // 2, distance // 2)
        if not (b // 2 + 1 <= across_second <= SCENE_SIZE - b // 2 - 1):
            continue
        if horizontal:
            return (along_first, across_first), (along_second, across_second)
        return (across_first, along_first), (across_second, along_second)
    return None


def layout_scene(rng: random.Random, scene: Scene, keep: dict[int, tuple[int, int]] | None = None) -> Layout | None:
    """Places `scene`; `keep` pins some things' centres (a story's picture keeps what did not move). None when it
    cannot be placed that way."""
    keep = keep or {}
    if len(scene.things) == 1:
        side = SIZES[scene.things[0].size]
        return Layout(scene, (keep.get(0) or (_free_centre(rng, side), _free_centre(rng, side)),))
    for _ in range(100):
        centres = _place_pair(rng, *scene.things, scene.relation)
        if centres is None:
            return None
        if keep:
            # keep the pinned centre; the other must still stand in the relation and fit
            pinned = next(iter(keep))
            centres = list(centres)
            shift = (keep[pinned][0] - centres[pinned][0], keep[pinned][1] - centres[pinned][1])
            centres = [(x + shift[0], y + shift[1]) for x, y in centres]
            if not all(_inside(thing, centre) for thing, centre in zip(scene.things, centres)):
                continue
        layout = Layout(scene, tuple(tuple(c) for c in centres))
        if relation_of(layout) == scene.relation:
            return layout
    return None


def _inside(thing: Thing, centre: tuple[int, int]) -> bool:
    half = SIZES[thing.size] // 2 + 1
    return all(half <= value <= SCENE_SIZE - half for value in centre)


def relation_of(layout: Layout) -> str | None:
    """Where the first thing stands with respect to the second, by the larger offset of their centres."""
    if len(layout.centres) == 1:
        return None
    (x1, y1), (x2, y2) = layout.centres
    if abs(x1 - x2) >= abs(y1 - y2):
        return "left of" if x1 < x2 else "right of"
    return "above" if y1 < y2 else "below"


def sample_scene(rng: random.Random, num_things: int | None = None) -> Layout:
    if num_things is None:
        num_things = 2 if rng.random() < TWO_THING_SHARE else 1
    while True:
        things = tuple(sample_thing(rng) for _ in range(num_things))
        if len(set(things)) != len(things):
            continue  # two alike things could not be told apart in words
        layout = layout_scene(rng, Scene(things, rng.choice(RELATIONS) if num_things == 2 else None))
        if layout is not None:
            return layout


def draw_scene(layout: Layout) -> Image.Image:
    image = Image.new("RGB", (SCENE_SIZE, SCENE_SIZE), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for thing, (x, y) in zip(layout.scene.things, layout.centres):
        side = SIZES[thing.size]
        half = side / 2
        left, top, right, bottom = x - half, y - half, x + half - 1, y + half - 1
        fill = COLOURS[thing.colour]
        if thing.shape == "circle":
            pen.ellipse((left, top, right, bottom), fill=fill)
        elif thing.shape == "square":
            pen.rectangle((left, top, right, bottom), fill=fill)
        else:
            height = side * math.sqrt(3) / 2
            base = y + height / 2
            pen.polygon([(x, base - height), (left, base), (right, base)], fill=fill)
    return image


# --------------------------------------------------------------------------------------------------------------------
# Reading the world's words back
# --------------------------------------------------------------------------------------------------------------------

_THING = r"(small|big) (red|green|blue|yellow) (circle|square|triangle)"
_RELATION = "|".join(RELATIONS)
_CAPTION = re.compile(rf"^an? {_THING}(?: ({_RELATION}) an? {_THING})?$")


def parse_caption(text: str) -> Scene | None:
    """The scene a caption says ("a small red circle left of a big blue square"), or None when it is not a caption of
    the world. Case, surrounding spaces and a final full stop do not matter."""
    words = " ".join(text.strip().rstrip(".").lower().split())
    match = _CAPTION.match(words)
    if match is None:
        return None
    groups = match.groups()
    first = Thing(*groups[:3])
    if groups[3] is None:
        return Scene((first,))
    second = Thing(*groups[4:])
    return Scene((first, second), groups[3]) if first != second else None


def captions_agree(text: str, truth: Scene) -> bool:
    """The caption metric: `text` says exactly what `truth` holds (every thing's size, colour and shape, and the
    relation either way round)."""
    said = parse_caption(text)
    return said is not None and said.canonical() == truth.canonical()


# --------------------------------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------------------------------


def _plural(shape: str) -> str:
    return shape + "s"


def referring_name(scene: Scene, index: int) -> str:
    """The shortest words that pick `scene.things[index]` out: its shape, else colour and shape, else all three."""
    thing, others = scene.things[index], [t for k, t in enumerate(scene.things) if k != index]
    if all(other.shape != thing.shape for other in others):
        return thing.shape
    if all((other.colour, other.shape) != (thing.colour, thing.shape) for other in others):
        return f"{thing.colour} {thing.shape}"
    return thing.name


def scene_questions(scene: Scene) -> list[tuple[str, str]]:
    """Every (question, one-word answer) the world asks about `scene`."""
    things = scene.things
    questions = [("How many shapes are there?", COUNT_WORDS[len(things)])]
    for shape in SHAPES:
        count = sum(thing.shape == shape for thing in things)
        questions.append((f"How many {_plural(shape)} are there?", COUNT_WORDS[count]))
    for index, thing in enumerate(things):
        name = referring_name(scene, index)
        if name != thing.shape:
            continue  # asked only about things their shape alone picks out, so the answer is not in the question
        questions.append((f"What colour is the {name}?", thing.colour))
        questions.append((f"Is the {name} big?", "yes" if thing.size == "big" else "no"))
        questions.append((f"Is the {name} small?", "yes" if thing.size == "small" else "no"))
    colours = [thing.colour for thing in things]
    for thing in things:
        if colours.count(thing.colour) == 1:
            questions.append((f"What shape is the {thing.colour} one?", thing.shape))
    if len(things) == 2:
        for index, relation in ((0, scene.relation), (1, OPPOSITE[scene.relation])):
            other = referring_name(scene, 1 - index)
            subject = things[index]
            questions.append((f"What colour is the shape {relation} the {other}?", subject.colour))
            questions.append((f"What shape is {relation} the {other}?", subject.shape))
            for asked in RELATIONS:
                answer = "yes" if asked == relation else "no"
                questions.append((f"Is the {referring_name(scene, index)} {asked} the {other}?", answer))
    return questions


def sample_question(rng: random.Random, scene: Scene) -> tuple[str, str]:
    return rng.choice(scene_questions(scene))


def answers_agree(text: str, answer: str) -> bool:
    """The question metric: the first word of `text` is the answer."""
    words = re.findall(r"[a-z]+", text.lower())
    return bool(words) and words[0] == answer


QUESTION_KINDS = ("count", "colour", "size", "shape", "relation")


def question_kind(question: str) -> str:
    """Which of `QUESTION_KINDS` a question of `scene_questions` asks: one that names a relation is a relation question,
    whatever it asks of the thing standing there."""
    words = " ".join(question.strip().lower().split())
    if any(f" {relation} " in words for relation in RELATIONS):
        return "relation"
    for start, kind in (("how many ", "count"), ("what colour ", "colour"), ("what shape ", "shape")):
        if words.startswith(start):
            return kind
    if words.startswith("is the ") and words.endswith((" big?", " small?")):
        return "size"
    raise ValueError(f"`question` must be a question of `scene_questions`, got {question!r}.")


# --------------------------------------------------------------------------------------------------------------------
# Stories: each picture is the previous one changed as its sentence says
# --------------------------------------------------------------------------------------------------------------------


def _change_sentences(rng: random.Random, layout: Layout) -> list[tuple[str, Scene, dict[int, tuple[int, int]]]]:
    """Every change the next sentence may make: (sentence, the scene after it, centres kept from this picture)."""
    scene, centres = layout.scene, layout.centres
    options = []
    for index, thing in enumerate(scene.things):
        name = referring_name(scene, index)
        kept = dict(enumerate(centres))
        for colour in COLOURS:
            if colour != thing.colour:
                changed = _with_thing(scene, index, replace(thing, colour=colour))
                if changed is not None:
                    options.append((f"The {name} turns {colour}.", changed, kept))
        grown = "big" if thing.size == "small" else "small"
        changed = _with_thing(scene, index, replace(thing, size=grown))
        if changed is not None:
            verb = "grows big" if grown == "big" else "shrinks"
            options.append((f"The {name} {verb}.", changed, kept))
    if len(scene.things) == 1:
        for _ in range(3):
            new = sample_thing(rng)
            if new == scene.things[0]:
                continue
            relation = rng.choice(RELATIONS)
            after = Scene((new, scene.things[0]), relation)
            sentence = f"A {new.name} appears {relation} the {scene.things[0].shape}."
            options.append((sentence, after, {1: centres[0]}))
    else:
        for index in range(2):
            name = referring_name(scene, index)
            options.append((f"The {name} goes away.", Scene((scene.things[1 - index],)), {0: centres[1 - index]}))
    return options


def _with_thing(scene: Scene, index: int, thing: Thing) -> Scene | None:
    things = list(scene.things)
    things[index] = thing
    return Scene(tuple(things), scene.relation) if len(set(things)) == len(things) else None


def sample_story(rng: random.Random, num_pictures: int = 3) -> list[tuple[str, Layout]]:
    """Sentences, each followed by the picture it leads to: an opening that says the first scene, then changes."""
    if num_pictures < 1:
        raise ValueError("A story needs at least one picture.")
    while True:
        layout = sample_scene(rng)
        story = [(rng.choice(STORY_OPENINGS).format(layout.scene.caption()), layout)]
        while len(story) < num_pictures:
            options = _change_sentences(rng, layout)
            rng.shuffle(options)
            for sentence, scene, keep in options:
                placed = _layout_keeping(rng, scene, keep)
                if placed is not None:
                    layout = placed
                    story.append((sentence, layout))
                    break
            else:
                break
        if len(story) == num_pictures:
            return story


def _layout_keeping(rng: random.Random, scene: Scene, keep: dict[int, tuple[int, int]]) -> Layout | None:
    if len(scene.things) == 1:
        return Layout(scene, (keep[0],))
    if len(keep) == 2:  # nothing moved: the changed thing keeps its centre if it still fits and stays clear
        layout = Layout(scene, (keep[0], keep[1]))
        return layout if _fits(layout) and relation_of(layout) == scene.relation else None
    for _ in range(30):
        layout = layout_scene(rng, scene, keep=keep)
        if layout is not None and _fits(layout):
            return layout
    return None


def _fits(layout: Layout) -> bool:
    """Inside the canvas and, for two, clear of each other by the gap along the relation's axis."""
    if not all(_inside(thing, centre) for thing, centre in zip(layout.scene.things, layout.centres)):
        return False
    if len(layout.centres) == 1:
        return True
    (x1, y1), (x2, y2) = layout.centres
    a, b = (SIZES[thing.size] for thing in layout.scene.things)
    along = abs(x1 - x2) if layout.scene.relation in ("left of", "right of") else abs(y1 - y2)
    across = abs(y1 - y2) if layout.scene.relation in ("left of", "right of") else abs(x1 - x2)
    return along >= (a + b) // 2 + GAP and across * 2 <= along


class StoryReader:
    """Follows a story sentence by sentence: the scene each sentence leads to, or None from the first sentence it
    cannot follow (not a sentence of the world, or one that names something the picture does not hold)."""

    _OPENING = re.compile(r"^(?:first there was|once upon a time there was|it all began with) (.+)$")
    _TURNS = re.compile(r"^the (.+) turns (red|green|blue|yellow)$")
    _SIZE = re.compile(r"^the (.+) (grows big|shrinks)$")
    _APPEARS = re.compile(rf"^an? {_THING} appears ({_RELATION}) the (.+)$")
    _GOES = re.compile(r"^the (.+) goes away$")

    def __init__(self):
        self.scene: Scene | None = None
        self.lost = False

    def read(self, sentence: str) -> Scene | None:
        if self.lost:
            return None
        words = " ".join(sentence.strip().rstrip(".").lower().split())
        self.scene = self._next(words)
        self.lost = self.scene is None
        return self.scene

    def _find(self, name: str) -> int | None:
        if self.scene is None:
            return None
        found = [
            index
            for index in range(len(self.scene.things))
            if referring_name(self.scene, index) == name or self.scene.things[index].name == name
        ]
        return found[0] if len(found) == 1 else None

    def _next(self, words: str) -> Scene | None:
        if (match := self._OPENING.match(words)) is not None:
            return parse_caption(match.group(1))
        if self.scene is None:
            return None
        if (match := self._TURNS.match(words)) is not None and (index := self._find(match.group(1))) is not None:
            return _with_thing(self.scene, index, replace(self.scene.things[index], colour=match.group(2)))
        if (match := self._SIZE.match(words)) is not None and (index := self._find(match.group(1))) is not None:
            size = "big" if match.group(2) == "grows big" else "small"
            return _with_thing(self.scene, index, replace(self.scene.things[index], size=size))
        if (match := self._APPEARS.match(words)) is not None and len(self.scene.things) == 1:
            new = Thing(*match.groups()[:3])
            if match.group(5) != self.scene.things[0].shape or new == self.scene.things[0]:
                return None
            return Scene((new, self.scene.things[0]), match.group(4))
        if (match := self._GOES.match(words)) is not None and len(self.scene.things) == 2:
            if (index := self._find(match.group(1))) is not None:
                return Scene((self.scene.things[1 - index],))
        return None


def world_v2_texts() -> list[str]:
    """Words for the tokenizer: every caption's pieces, sentence, question and answer of the world (sorted)."""
    texts = set()
    names = [Thing(size, colour, shape).name for size in SIZES for colour in COLOURS for shape in SHAPES]
    for name in names:
        texts.add(f"a {name}")
        texts.update(f"a {name} {relation} a" for relation in RELATIONS)
        texts.add(f"A {name} appears")
        texts.update(opening.format(f"a {name}") for opening in STORY_OPENINGS)
    for shape in SHAPES:
        for colour in COLOURS:
            for name in (shape, f"{colour} {shape}"):
                texts.update(f"The {name} turns {c}." for c in COLOURS)
                texts.update({f"The {name} grows big.", f"The {name} shrinks.", f"The {name} goes away."})
                texts.update(f"appears {relation} the {shape}." for relation in RELATIONS)
    rng = random.Random(0)
    for _ in range(400):
        texts.update(question for question, _ in scene_questions(sample_scene(rng).scene))
    texts.update(COUNT_WORDS + ("yes", "no"))
    return sorted(texts)
