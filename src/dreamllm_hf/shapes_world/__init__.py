"""A synthetic world of coloured shapes: pictures, captions, questions and illustrated stories, plus a judge.

Two versions: `world` (one shape on 32x32, the shipped demo model's world; also the small data the trainer's tests use)
and `scenes` (one or two shapes on 64x64 with sizes and where they stand, questions, stories of changes: where
comprehension is hard), each with its judge (`classifier`, `scene_judge`).
"""

from .classifier import classify_shape_image
from .scene_judge import drawing_shows, read_scene
from .scenes import Layout, Scene, Thing, draw_scene, parse_caption, sample_scene
from .world import COLOURS, IMAGE_SIZE, SHAPES, ShapeSpec, caption, draw_shape, sample_spec, sample_story


__all__ = [
    "COLOURS",
    "IMAGE_SIZE",
    "SHAPES",
    "Layout",
    "Scene",
    "ShapeSpec",
    "Thing",
    "caption",
    "classify_shape_image",
    "draw_scene",
    "draw_shape",
    "drawing_shows",
    "parse_caption",
    "read_scene",
    "sample_scene",
    "sample_spec",
    "sample_story",
]
