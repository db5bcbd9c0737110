"""Where the language model and its processor sit in a DreamLLM pipeline folder.

A pipeline folder is diffusers' layout (`model_index.json`, one folder per component); the language model's folder
`mllm/` carries the processor's files too, so that it is a complete transformers repository on its own
(`AutoProcessor.from_pretrained(DIR/mllm)` and `AutoModelForImageTextToText.from_pretrained(DIR/mllm)` work, as for
every llava repository), while `processor/` stays the pipeline's. Everything that writes such a folder (the pipelines'
`save_pretrained`, the converter, the trainer) goes through these names.
"""

import os
from pathlib import Path


MLLM_FOLDER = "mllm"
PROCESSOR_FOLDER = "processor"


def save_processor_with_model(processor, pipeline_dir: str | os.PathLike) -> None:
    """Writes the processor's files into the language model's folder of a pipeline folder (see `MLLM_FOLDER`).

    Args:
        processor ([`DreamLLMProcessor`]): the pipeline's processor.
        pipeline_dir (`str` or `os.PathLike`): the pipeline folder (the one holding `model_index.json`).
    """
    processor.save_pretrained(Path(pipeline_dir) / MLLM_FOLDER)


__all__ = ["MLLM_FOLDER", "PROCESSOR_FOLDER", "save_processor_with_model"]
