"""Building a DreamLLM from parts: any decoder-only causal LM, a CLIP or SigLIP vision tower and a Stable Diffusion
decoder (`dreamllm-hf init`, `DreamLLMPipeline.from_components`). The result is untrained.

Building depends on `modeling` (and diffusers' own classes for the decoder) only: it returns the pipeline's components
(`build_components`), and the pipeline wraps them (`DreamLLMPipeline.from_components`)."""

from .builder import BuildInfo, build_components, build_components_with_info, build_dreamllm
from .save import build_record, save_built_pipeline


__all__ = [
    "BuildInfo",
    "build_components",
    "build_components_with_info",
    "build_dreamllm",
    "build_record",
    "save_built_pipeline",
]
