"""Helpers for tests and benchmarks, as `transformers.testing_utils` and `diffusers.utils.testing_utils` are: tiny
components built offline (`factories`). Importing this package needs diffusers only when a diffusion part is built."""

from .factories import (
    TINY_CROSS_ATTENTION_DIM,
    TINY_IMAGE_SIZE,
    TINY_NUM_DREAM_QUERIES,
    TINY_TEXT_CONFIG,
    TINY_TOKENIZER_PIECES,
    TINY_VISION_CONFIG,
    TINY_VOCAB_SIZE,
    config_token_ids,
    save_tiny_pipeline,
    tiny_config,
    tiny_image_processor,
    tiny_model,
    tiny_pipeline,
    tiny_pipeline_components,
    tiny_processor,
    tiny_scheduler,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
)


__all__ = [
    "TINY_CROSS_ATTENTION_DIM",
    "TINY_IMAGE_SIZE",
    "TINY_NUM_DREAM_QUERIES",
    "TINY_TEXT_CONFIG",
    "TINY_TOKENIZER_PIECES",
    "TINY_VISION_CONFIG",
    "TINY_VOCAB_SIZE",
    "config_token_ids",
    "save_tiny_pipeline",
    "tiny_config",
    "tiny_image_processor",
    "tiny_model",
    "tiny_pipeline",
    "tiny_pipeline_components",
    "tiny_processor",
    "tiny_scheduler",
    "tiny_tokenizer",
    "tiny_unet",
    "tiny_vae",
]
