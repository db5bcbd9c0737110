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

from .import_notices import dropped_import_notices  # noqa: E402


with dropped_import_notices():  # what importing diffusers logs on every start, for nothing asked (see the module)
    import diffusers

    from .pipelines import (
        DocumentEvent,
        DreamLLMImg2ImgPipeline,
        DreamLLMInpaintPipeline,
        DreamLLMPipeline,
        DreamLLMPipelineOutput,
        DreamLLMText2ImagePipeline,
    )
    from .pipelines.auto_pipelines import register_auto_pipelines


# `DiffusionPipeline.from_pretrained(DIR)` finds the class named by `model_index.json`'s `_class_name` as an attribute
# of the `diffusers` module (diffusers has no registry for pipelines defined elsewhere, and a `[module, class]` pair
# there means a `.py` file inside the folder, which needs `trust_remote_code=True`). So our pipelines are put where it
# looks, as the Auto classes above are told about the model. This is why the pipelines are imported here, not lazily.
diffusers.DreamLLMPipeline = DreamLLMPipeline
diffusers.DreamLLMText2ImagePipeline = DreamLLMText2ImagePipeline
diffusers.DreamLLMImg2ImgPipeline = DreamLLMImg2ImgPipeline
diffusers.DreamLLMInpaintPipeline = DreamLLMInpaintPipeline
# And the `AutoPipelineFor*` classes find them from a DreamLLM folder or pipeline (see the module).
register_auto_pipelines()

__all__ += [
    "DocumentEvent",
    "DreamLLMImg2ImgPipeline",
    "DreamLLMInpaintPipeline",
    "DreamLLMPipeline",
    "DreamLLMPipelineOutput",
    "DreamLLMText2ImagePipeline",
]
