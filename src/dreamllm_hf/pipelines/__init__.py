"""DreamLLM as diffusers pipelines: documents of text and pictures (many at once, streamed), and text-to-image."""

from .document_batch import DocumentBatch
from .document_writer import DocumentRequest, DocumentWriter
from .pipeline_dreamllm import DreamLLMPipeline
from .pipeline_dreamllm_text2img import DreamLLMText2ImagePipeline
from .pipeline_output import DocumentEvent, DreamLLMPipelineOutput, StopReason


__all__ = [
    "DocumentBatch",
    "DocumentEvent",
    "DocumentRequest",
    "DocumentWriter",
    "DreamLLMPipeline",
    "DreamLLMPipelineOutput",
    "DreamLLMText2ImagePipeline",
    "StopReason",
]
