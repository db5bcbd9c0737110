from .configuration_dreamllm import DreamLLMConfig
from .modeling_dreamllm import (
    DreamEmbeddingsOutput,
    DreamLLMCausalLMOutputWithPast,
    DreamLLMForConditionalGeneration,
    DreamLLMModel,
    DreamLLMModelOutputWithPast,
    DreamLLMPreTrainedModel,
)
from .processing_dreamllm import DreamLLMProcessor


__all__ = [
    "DreamEmbeddingsOutput",
    "DreamLLMCausalLMOutputWithPast",
    "DreamLLMConfig",
    "DreamLLMForConditionalGeneration",
    "DreamLLMModel",
    "DreamLLMModelOutputWithPast",
    "DreamLLMPreTrainedModel",
    "DreamLLMProcessor",
]
