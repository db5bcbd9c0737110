"""Original DreamLLM release -> Hugging Face layout."""

from .convert_dreamllm_original_to_hf import ConversionSummary, convert_original_checkpoint
from .original_layout import OriginalCheckpointError

__all__ = ["ConversionSummary", "OriginalCheckpointError", "convert_original_checkpoint"]
