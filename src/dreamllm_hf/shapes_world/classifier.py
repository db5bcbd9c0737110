"""A deterministic judge of what a picture shows: the colour and the shape of its one coloured object."""

import numpy as np
from PIL import Image

from .world import COLOURS


MIN_OBJECT_PIXELS = 12
SATURATION_THRESHOLD = 60  # max-min over RGB: the white/grey ground is well below, every palette colour well above


def classify_shape_image(image: Image.Image | np.ndarray) -> tuple[str | None, str | None]:
    """(colour, shape) of the picture's coloured object, or (None, None) when there is none.

    Colour: the palette colour nearest the object's median pixel. Shape: how much of its bounding box the object fills
    (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2).
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if pixels.max() <= 1.0:
        pixels = pixels * 255.0
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    mask = saturation > SATURATION_THRESHOLD
    if mask.sum() < MIN_OBJECT_PIXELS:
        return None, None
    median = np.median(pixels[mask], axis=0)
    names = list(COLOURS)
    distances = [np.linalg.norm(median - np.array(COLOURS[name])) for name in names]
    colour = names[int(np.argmin(distances))]

    rows, cols = np.nonzero(mask)
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box_area
    if fill > 0.88:
        shape = "square"
    elif fill > 0.62:
        shape = "circle"
    else:
        shape = "triangle"
    return colour, shape
