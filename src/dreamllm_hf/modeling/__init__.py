from .configuration_dreamllm import DreamLLMConfig
from .modeling_dreamllm import (
    DreamLLMCausalLMOutputWithPast,
    DreamLLMForConditionalGeneration,
    DreamLLMModel,
    DreamLLMModelOutputWithPast,
    DreamLLMPreTrainedModel,
)

__all__ = [
    "DreamLLMCausalLMOutputWithPast",
    "DreamLLMConfig",
    "DreamLLMForConditionalGeneration",
    "DreamLLMModel",
    "DreamLLMModelOutputWithPast",
    "DreamLLMPreTrainedModel",
]
