"""A deterministic judge of the version-2 world's pictures: which things a picture shows, their sizes, colours and
shapes, and where the first stands with respect to the second."""

from collections import deque

import numpy as np
from PIL import Image

from dreamllm_hf.shapes_world.classifier import SATURATION_THRESHOLD
from dreamllm_hf.shapes_world.world import COLOURS

from .scenes import SIZES, Layout, Scene, Thing, relation_of


MIN_THING_PIXELS = 40  # a small triangle has about 110; specks of a drawn picture's ground fewer
BIG_SIDE = sum(SIZES.values()) / 2  # a box side above the midpoint of the two sizes is big


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of `mask`, each as an array of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            row, col = queue.popleft()
            pixels.append((row, col))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    r, c = row + dr, col + dc
                    if 0 <= r < height and 0 <= c < width and mask[r, c] and not seen[r, c]:
                        seen[r, c] = True
                        queue.append((r, c))
        found.append(np.array(pixels))
    return found


def _read_thing(
    pixels: np.ndarray, saturation: np.ndarray, where: np.ndarray
) -> tuple[Thing, tuple[float, float]] | None:
    median = np.median(pixels[where[:, 0], where[:, 1]], axis=0)
    names = list(COLOURS)
    colour = names[int(np.argmin([np.linalg.norm(median - np.array(COLOURS[name])) for name in names]))]
    # A blurred edge crosses half the colour where the sharp edge was: the thing is where its colour is at least half
    # there; its box spans the rows and columns holding two such pixels or more (not a stray noisy one beside it).
    strength = saturation[where[:, 0], where[:, 1]]
    core = where[strength >= np.median(strength) / 2]
    rows = np.nonzero(np.bincount(core[:, 0]) >= 2)[0]
    cols = np.nonzero(np.bincount(core[:, 1]) >= 2)[0]
    if not len(rows) or not len(cols):
        return None  # a thin smear (a drawn picture's stray stroke), no thing of the world
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    fill = len(core) / (height * width)
    shape = "square" if fill > 0.87 else "circle" if fill > 0.72 else "triangle"  # 1, pi/4, ~0.6 measured
    size = "big" if max(height, width) > BIG_SIDE else "small"
    centre = ((cols.max() + cols.min()) / 2, (rows.max() + rows.min()) / 2)
    return Thing(size, colour, shape), centre


def _read_parts(image: Image.Image | np.ndarray) -> list[tuple[Thing, tuple[float, float]] | None]:
    """Every thing a picture shows, with its centre (x, y), in the order of its first pixel (row by row); None for a
    coloured part that is no thing."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if pixels.max() <= 1.0:
        pixels = pixels * 255.0
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    mask = saturation > SATURATION_THRESHOLD
    parts = [where for where in _components(mask) if len(where) >= MIN_THING_PIXELS]
    return [_read_thing(pixels, saturation, where) for where in parts]


def read_things(image: Image.Image | np.ndarray) -> list[Thing]:
    """Every thing a picture shows, however many (none, one, three...), each read as the judge reads it."""
    return [part[0] for part in _read_parts(image) if part is not None]


def read_scene(image: Image.Image | np.ndarray) -> Scene | None:
    """The scene a picture shows, said the canonical way, or None when it shows no thing or more than two (or two
    that words could not tell apart)."""
    read = _read_parts(image)
    if not 1 <= len(read) <= 2 or None in read:
        return None
    things = tuple(thing for thing, _ in read)
    if len(set(things)) != len(things):
        return None
    layout = Layout(Scene(things, "left of" if len(things) == 2 else None), tuple(centre for _, centre in read))
    return Scene(things, relation_of(layout)).canonical()


def drawing_shows(picture, scene: Scene | None) -> bool:
    """The drawing metric: the judge reads every thing of `scene` and their relation in `picture` (None: a request
    that says no scene, never met)."""
    return scene is not None and read_scene(picture) == scene.canonical()


def things_drawn_right(picture, scene: Scene) -> int:
    """A partial-credit diagnostic: how many of `scene`'s things `picture` shows with the right size, colour and shape,
    wherever they stand. A scene's things differ, so the best matching pairs each with an equal thing read, if any."""
    return len(set(scene.things) & set(read_things(picture)))
