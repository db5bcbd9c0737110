"""Building a DreamLLM from parts: any decoder-only causal LM, a CLIP or SigLIP vision tower and a Stable Diffusion
decoder (`dreamllm-hf init`, `DreamLLMPipeline.from_components`). The result is untrained."""

from .builder import BuildInfo, build_dreamllm, build_pipeline
from .save import build_and_save, save_built_pipeline


__all__ = ["BuildInfo", "build_and_save", "build_dreamllm", "build_pipeline", "save_built_pipeline"]
