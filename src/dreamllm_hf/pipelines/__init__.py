"""DreamLLM as diffusers pipelines: documents of text and pictures (many at once, streamed), text-to-image, img2img
and inpainting."""

from .document_batch import DocumentBatch
from .document_writer import DocumentRequest, DocumentWriter
from .pipeline_dreamllm import DreamLLMPipeline
from .pipeline_dreamllm_img2img import DreamLLMImg2ImgPipeline
from .pipeline_dreamllm_inpaint import DreamLLMInpaintPipeline
from .pipeline_dreamllm_text2img import DreamLLMText2ImagePipeline, edit_prompt
from .pipeline_output import DocumentEvent, DreamLLMPipelineOutput, StopReason


__all__ = [
    "DocumentBatch",
    "DocumentEvent",
    "DocumentRequest",
    "DocumentWriter",
    "DreamLLMImg2ImgPipeline",
    "DreamLLMInpaintPipeline",
    "DreamLLMPipeline",
    "DreamLLMPipelineOutput",
    "DreamLLMText2ImagePipeline",
    "StopReason",
    "edit_prompt",
]
