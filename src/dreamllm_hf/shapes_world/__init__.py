"""A synthetic world of coloured shapes: pictures, captions, questions and illustrated stories, plus a judge."""

from .classifier import classify_shape_image
from .world import COLOURS, IMAGE_SIZE, SHAPES, ShapeSpec, caption, draw_shape, sample_spec, sample_story


__all__ = [
    "COLOURS",
    "IMAGE_SIZE",
    "SHAPES",
    "ShapeSpec",
    "caption",
    "classify_shape_image",
    "draw_shape",
    "sample_spec",
    "sample_story",
]
