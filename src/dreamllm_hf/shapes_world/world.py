"""Pictures of one coloured shape on a white ground, and the words that go with them."""

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 32
BACKGROUND = (255, 255, 255)

STORY_OPENINGS = ("First there was a {}.", "Once upon a time there was a {}.", "It all began with a {}.")
STORY_CONTINUATIONS = ("Then a {} appeared.", "Next came a {}.", "After that a {} showed up.")
STORY_ENDINGS = ("Finally a {} arrived.", "At last there was a {}.")


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    size: int  # side of the bounding box, in pixels
    centre_x: int
    centre_y: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def sample_spec(
    rng: random.Random, colour: str | None = None, shape: str | None = None, image_size: int = IMAGE_SIZE
) -> ShapeSpec:
    size = rng.randint(image_size * 7 // 16, image_size * 3 // 4)
    margin = size // 2 + 1
    return ShapeSpec(
        colour=colour or rng.choice(list(COLOURS)),
        shape=shape or rng.choice(SHAPES),
        size=size,
        centre_x=rng.randint(margin, image_size - margin),
        centre_y=rng.randint(margin, image_size - margin),
    )


def draw_shape(spec: ShapeSpec, image_size: int = IMAGE_SIZE) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    half = spec.size / 2
    left, top = spec.centre_x - half, spec.centre_y - half
    right, bottom = spec.centre_x + half - 1, spec.centre_y + half - 1
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        pen.ellipse((left, top, right, bottom), fill=fill)
    elif spec.shape == "square":
        pen.rectangle((left, top, right, bottom), fill=fill)
    elif spec.shape == "triangle":
        height = spec.size * math.sqrt(3) / 2
        base = spec.centre_y + height / 2
        pen.polygon([(spec.centre_x, base - height), (left, base), (right, base)], fill=fill)
    else:
        raise ValueError(f"Unknown shape {spec.shape!r}; choose one of {SHAPES}.")
    return image


def caption(spec: ShapeSpec) -> str:
    return f"a {spec.name}"


def sample_story(rng: random.Random, num_pictures: int = 2) -> list[tuple[str, ShapeSpec]]:
    """Sentences, each followed by the picture it describes."""
    if num_pictures < 1:
        raise ValueError("A story needs at least one picture.")
    templates = [rng.choice(STORY_OPENINGS)]
    templates += [rng.choice(STORY_CONTINUATIONS) for _ in range(num_pictures - 2)]
    if num_pictures > 1:
        templates.append(rng.choice(STORY_ENDINGS))
    story = []
    for template in templates:
        spec = sample_spec(rng)
        story.append((template.format(spec.name), spec))
    return story
