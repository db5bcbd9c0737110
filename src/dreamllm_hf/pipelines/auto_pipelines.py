"""DreamLLM in diffusers' `AutoPipelineForText2Image`, `AutoPipelineForImage2Image` and `AutoPipelineForInpainting`.

diffusers finds a pipeline for a task by its model family: `_get_model` looks the class name of `model_index.json`
(or of the pipeline given to `from_pipe`) up in the task mappings of `diffusers.pipelines.auto_pipeline`
(`SUPPORTED_TASKS_MAPPINGS`) to get a family name, then takes that family's entry in the task's mapping
(`AUTO_TEXT2IMAGE_PIPELINES_MAPPING`, ...). There is no registration function, so the family `"dreamllm"` is added to
those module-level mappings, as diffusers adds its own optional families (Kolors) to them. The document pipeline, which
a DreamLLM folder names, is no diffusers task: it goes in a mapping of its own, appended to `SUPPORTED_TASKS_MAPPINGS`,
so that its name leads to the family too.
"""

from collections import OrderedDict

from diffusers.pipelines import auto_pipeline

from .pipeline_dreamllm import DreamLLMPipeline
from .pipeline_dreamllm_img2img import DreamLLMImg2ImgPipeline
from .pipeline_dreamllm_inpaint import DreamLLMInpaintPipeline
from .pipeline_dreamllm_text2img import DreamLLMText2ImagePipeline


AUTO_PIPELINE_FAMILY = "dreamllm"
# The pipelines of the family that belong to no diffusers task.
AUTO_DOCUMENT_PIPELINES_MAPPING = OrderedDict([(AUTO_PIPELINE_FAMILY, DreamLLMPipeline)])


def register_auto_pipelines() -> None:
    """Adds the DreamLLM pipelines to diffusers' Auto pipeline mappings (again: no change)."""
    for mapping, pipeline_class in (
        (auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING, DreamLLMText2ImagePipeline),
        (auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, DreamLLMImg2ImgPipeline),
        (auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING, DreamLLMInpaintPipeline),
    ):
        mapping[AUTO_PIPELINE_FAMILY] = pipeline_class
    if not any(mapping is AUTO_DOCUMENT_PIPELINES_MAPPING for mapping in auto_pipeline.SUPPORTED_TASKS_MAPPINGS):
        auto_pipeline.SUPPORTED_TASKS_MAPPINGS.append(AUTO_DOCUMENT_PIPELINES_MAPPING)


__all__ = ["AUTO_DOCUMENT_PIPELINES_MAPPING", "AUTO_PIPELINE_FAMILY", "register_auto_pipelines"]
