from .configuration_dreamllm import DreamLLMConfig
from .modeling_dreamllm import (
    DreamLLMCausalLMOutputWithPast,
    DreamLLMForConditionalGeneration,
    DreamLLMModel,
    DreamLLMModelOutputWithPast,
    DreamLLMPreTrainedModel,
)
from .processing_dreamllm import DreamLLMProcessor


__all__ = [
    "DreamLLMCausalLMOutputWithPast",
    "DreamLLMConfig",
    "DreamLLMForConditionalGeneration",
    "DreamLLMModel",
    "DreamLLMModelOutputWithPast",
    "DreamLLMPreTrainedModel",
    "DreamLLMProcessor",
]
