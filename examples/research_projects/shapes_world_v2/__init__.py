"""The shapes world, version 2: a research project on the package's demo recipe (`dreamllm_hf.shapes_world`).

One or two shapes on 64x64 with their sizes and where they stand, questions with one-word answers, stories of changes:
a world where comprehension is hard, and where the paper's synergy claim (does learning to draw help a model to see?)
can be measured at toy scale. Modules:

* `scenes`, `scene_judge`: the world and its deterministic judge;
* `scene_data`: its training data, in the layouts `dreamllm-hf train` reads;
* `scene_world`: the world as a `DemoWorld` of the package's recipe, its recipe defaults and the comprehension-only
  control;
* `scene_evaluation`: the figures (captions, questions, drawings, stories);
* `synergy`: the synergy study (the joint recipe against its comprehension-only control, seed by seed).

Run from `examples/research_projects/` (or with it on `PYTHONPATH`): `python -m shapes_world_v2 --help`.
"""
