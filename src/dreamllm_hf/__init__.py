"""DreamLLM (arXiv 2309.11499) for transformers and diffusers."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .modeling import (
    DreamLLMConfig,
    DreamLLMForConditionalGeneration,
    DreamLLMModel,
    DreamLLMPreTrainedModel,
    DreamLLMProcessor,
)


__version__ = "0.1.0"

AutoConfig.register(DreamLLMConfig.model_type, DreamLLMConfig, exist_ok=True)
AutoModel.register(DreamLLMConfig, DreamLLMModel, exist_ok=True)
AutoModelForCausalLM.register(DreamLLMConfig, DreamLLMForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(DreamLLMConfig, DreamLLMForConditionalGeneration, exist_ok=True)
AutoProcessor.register(DreamLLMConfig, DreamLLMProcessor, exist_ok=True)

__all__ = [
    "DreamLLMConfig",
    "DreamLLMForConditionalGeneration",
    "DreamLLMModel",
    "DreamLLMPreTrainedModel",
    "DreamLLMProcessor",
]

_PIPELINE_EXPORTS = ("DocumentEvent", "DreamLLMPipeline", "DreamLLMPipelineOutput", "DreamLLMText2ImagePipeline")
__all__ += list(_PIPELINE_EXPORTS)


def __getattr__(name: str):
    # The pipeline needs diffusers; import it only when asked, so transformers-only use stays light.
    if name in _PIPELINE_EXPORTS:
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
