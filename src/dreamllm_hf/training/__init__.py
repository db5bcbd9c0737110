"""Fine-tuning DreamLLM: the two-loss objective, `datasets`-based data, PEFT LoRA/QLoRA, an `accelerate` loop.

Layering: this package composes `dreamllm_hf.modeling` with diffusers' UNet, VAE and DDPM scheduler; `modeling` never
imports it. `peft`, `datasets` and `bitsandbytes` (the `train`/`quant` extras) are imported only when used.
"""

from .data import (
    DOCUMENTS,
    IGNORE_INDEX,
    PAIRS,
    DataSource,
    DiffusionImageTransform,
    DreamLLMDataCollator,
    DreamLLMDataset,
    DreamLLMSampleBuilder,
    build_training_dataset,
    load_data_source,
    load_image,
    merge_text_list,
    source_from_dataset,
    write_parquet_shards,
)
from .lora import (
    FORMAT_TOKENS,
    FULLY_TRAINED_MODULES,
    LLM_LINEAR_LAYERS_REGEX,
    QLORA_SKIP_MODULES,
    apply_lora,
    dreamllm_lora_config,
    format_token_ids,
    load_adapter,
    load_mllm,
    upcast_trainable_parameters,
)
from .losses import (
    DEFAULT_LOSS_WEIGHT_LM,
    DEFAULT_LOSS_WEIGHT_VM,
    DiffusionLossOutput,
    DreamLLMLossOutput,
    DreamLLMTrainingModel,
    diffusion_loss,
    dreamllm_loss,
    encode_latents,
)
from .trainer import (
    DreamLLMTrainingArguments,
    TrainOutput,
    find_latest_checkpoint,
    load_training_components,
    read_config_file,
    train,
)


__all__ = [
    "DEFAULT_LOSS_WEIGHT_LM",
    "DEFAULT_LOSS_WEIGHT_VM",
    "DOCUMENTS",
    "FORMAT_TOKENS",
    "FULLY_TRAINED_MODULES",
    "IGNORE_INDEX",
    "LLM_LINEAR_LAYERS_REGEX",
    "PAIRS",
    "QLORA_SKIP_MODULES",
    "DataSource",
    "DiffusionImageTransform",
    "DiffusionLossOutput",
    "DreamLLMDataCollator",
    "DreamLLMDataset",
    "DreamLLMLossOutput",
    "DreamLLMSampleBuilder",
    "DreamLLMTrainingArguments",
    "DreamLLMTrainingModel",
    "TrainOutput",
    "apply_lora",
    "build_training_dataset",
    "diffusion_loss",
    "dreamllm_lora_config",
    "dreamllm_loss",
    "encode_latents",
    "find_latest_checkpoint",
    "format_token_ids",
    "load_adapter",
    "load_data_source",
    "load_image",
    "load_mllm",
    "load_training_components",
    "merge_text_list",
    "read_config_file",
    "source_from_dataset",
    "train",
    "upcast_trainable_parameters",
    "write_parquet_shards",
]
