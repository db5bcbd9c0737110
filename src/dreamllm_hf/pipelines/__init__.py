"""DreamLLM as a diffusers pipeline: text-to-image, comprehension and interleaved documents."""

from .pipeline_dreamllm import DreamLLMPipeline
from .pipeline_output import DreamLLMPipelineOutput, StopReason

__all__ = ["DreamLLMPipeline", "DreamLLMPipelineOutput", "StopReason"]
