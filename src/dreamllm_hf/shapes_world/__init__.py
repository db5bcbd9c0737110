"""A synthetic world of coloured shapes, the shipped demo model's: pictures, captions and illustrated stories, a judge,
the data writers, the recipe behind `dreamllm-hf train-demo` and the evaluation behind `dreamllm-hf evaluate-demo`.

`world` is one shape on 32x32 (also the small data the trainer's tests use) and `classifier` its judge. A harder world
(one or two shapes with sizes and where they stand) and the synergy study are a research project:
`examples/research_projects/shapes_world_v2/`.
"""

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
