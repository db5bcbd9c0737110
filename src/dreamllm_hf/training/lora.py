"""PEFT LoRA (and QLoRA) for DreamLLM: what is adapted, what is trained in full, what stays frozen.

* LoRA on the language model's linear layers only: `model.language_model.layers.N.self_attn.{q,k,v,o}_proj` and
  `mlp.{gate,up,down}_proj` (a regex, so CLIP's identically named `q_proj`/`k_proj`/`v_proj` stay untouched).
* Trained in full (`modules_to_save`): the dream queries, the image projector and the condition projector - small,
  and they are what the original trains in every stage.
* `trainable_token_indices` for the DreamLLM format tokens (`<im_start>`, `<im_patch>`, `<im_end>`, `<dream_start>`,
  `<dream_end>`, ids from the model config) on both `embed_tokens` and `lm_head` (the weights are not tied):
  `<dream_start>` is the token the model must learn to emit, so its output row has to move; a LoRA on the whole
  `lm_head` would instead perturb all 32k logits through a low-rank update. `lora_lm_head=True` adds `lm_head` to the
  LoRA targets anyway.
* The vision tower (CLIP) and the rest of the LLM stay frozen; so do the UNet and the VAE (outside the adapter).

QLoRA: the language model's decoder layers are loaded in 4-bit NF4 (bitsandbytes); the vision tower, both projectors,
the dream queries and `lm_head` stay in full precision (`QLORA_SKIP_MODULES`).
"""

import contextlib
import os
import warnings
from pathlib import Path

import torch

from .. import constants as C


LLM_LINEAR_LAYERS_REGEX = (
    r"model\.language_model\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
)
LM_HEAD_REGEX = r"lm_head"
# The parts of a DreamLLMForConditionalGeneration, by module name (what training freezes, wraps or trains).
LANGUAGE_MODEL_MODULES = ("model.language_model", "lm_head")
VISION_TOWER_MODULE = "model.vision_tower"
IMAGE_PROJECTOR_MODULE = "model.multi_modal_projector"
CONDITION_PROJECTOR_MODULE = "model.condition_projector"
DREAM_QUERIES_MODULE = "model.dream_queries"
FULLY_TRAINED_MODULES = (DREAM_QUERIES_MODULE, IMAGE_PROJECTOR_MODULE, CONDITION_PROJECTOR_MODULE)
POOLED_PROJECTOR = "model.pooled_projector"  # trained with the condition projector, when the model has one (SDXL)
FORMAT_TOKENS = (C.IMAGE_START_TOKEN, C.IMAGE_PATCH_TOKEN, C.IMAGE_END_TOKEN, C.DREAM_START_TOKEN, C.DREAM_END_TOKEN)
QLORA_SKIP_MODULES = (
    "lm_head",
    VISION_TOWER_MODULE,
    IMAGE_PROJECTOR_MODULE,
    CONDITION_PROJECTOR_MODULE,
    POOLED_PROJECTOR,
)


@contextlib.contextmanager
def _quiet_peft_deprecations():
    """peft 0.21 reads `model.is_gradient_checkpointing`, which transformers 5 deprecates (for
    `is_activation_checkpointing`) with a FutureWarning on every adapter load; nothing for a user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def format_token_ids(config) -> list[int]:
    """Ids of the DreamLLM format tokens in a [`DreamLLMConfig`], in `FORMAT_TOKENS` order."""
    ids = config.special_token_ids
    return [ids[token] for token in FORMAT_TOKENS]


def dreamllm_lora_config(
    config,
    rank: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    lora_lm_head: bool = False,
    train_format_tokens: bool = True,
    train_modules: tuple[str, ...] = FULLY_TRAINED_MODULES,
    **kwargs,
):
    """
    The `peft.LoraConfig` for DreamLLM described in this module's docstring.

    Args:
        config ([`DreamLLMConfig`]): gives the format-token ids.
        rank, alpha, dropout: LoRA `r`, `lora_alpha`, `lora_dropout`.
        lora_lm_head (`bool`): also put a LoRA on `lm_head` (then its format-token rows are not trained separately).
        train_format_tokens (`bool`): train the rows of the format tokens in `embed_tokens` (and `lm_head`).
        train_modules: modules trained in full and saved with the adapter (the default adds the pooled projector of
            a model that has one).
        **kwargs: any other `LoraConfig` field.
    """
    from peft import LoraConfig

    target = LLM_LINEAR_LAYERS_REGEX if not lora_lm_head else f"(?:{LLM_LINEAR_LAYERS_REGEX}|{LM_HEAD_REGEX})"
    if getattr(config, "pooled_projection_dim", None) is not None and tuple(train_modules) == FULLY_TRAINED_MODULES:
        train_modules = (*train_modules, POOLED_PROJECTOR)
    token_indices = None
    if train_format_tokens:
        ids = format_token_ids(config)
        token_indices = {"embed_tokens": ids} if lora_lm_head else {"embed_tokens": ids, "lm_head": ids}
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target,
        modules_to_save=list(train_modules) or None,
        trainable_token_indices=token_indices,
        **kwargs,
    )


def upcast_trainable_parameters(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Keeps the trained parameters in fp32 when the frozen base is in half precision (mixed-precision training
    updates fp32 master weights; fp16 gradient scaling refuses fp16 parameters)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def apply_lora(mllm, lora_config=None, activation_checkpointing: bool = False, **config_kwargs):
    """
    Wraps a [`DreamLLMForConditionalGeneration`] in a PEFT LoRA adapter (default config: `dreamllm_lora_config`).

    Quantized (4-bit/8-bit) models go through `peft.prepare_model_for_kbit_training` first. With
    `activation_checkpointing`, every LLM decoder layer and CLIP encoder layer recomputes its activations in the
    backward pass (`activation_checkpointing_enable`, the transformers 5 name; non-reentrant checkpoints).
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if lora_config is None:
        lora_config = dreamllm_lora_config(mllm.config, **config_kwargs)
    quantized = getattr(mllm, "is_loaded_in_4bit", False) or getattr(mllm, "is_loaded_in_8bit", False)
    if quantized:
        mllm = prepare_model_for_kbit_training(mllm, use_gradient_checkpointing=False)
    if activation_checkpointing:
        mllm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with _quiet_peft_deprecations():
        peft_model = get_peft_model(mllm, lora_config)
    upcast_trainable_parameters(peft_model)
    return peft_model


def load_mllm(
    model_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    load_in_4bit: bool = False,
    device_map=None,
    compute_dtype: torch.dtype | None = None,
):
    """
    The language model of a converted DreamLLM folder (`model_dir/mllm`, or `model_dir` itself when it is the model
    folder), optionally in 4-bit NF4 with double quantization for QLoRA (`compute_dtype` defaults to `dtype`).
    """
    from ..modeling import DreamLLMForConditionalGeneration

    path = Path(model_dir)
    if (path / "mllm").is_dir():
        path = path / "mllm"
    kwargs = {"dtype": dtype}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype or dtype,
            llm_int8_skip_modules=list(QLORA_SKIP_MODULES),
        )
        kwargs["device_map"] = device_map if device_map is not None else {"": "cpu"}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    return DreamLLMForConditionalGeneration.from_pretrained(path, **kwargs)


def load_adapter(mllm, adapter_dir: str | os.PathLike, merge: bool = False, is_trainable: bool = False):
    """
    Puts a trained adapter on a [`DreamLLMForConditionalGeneration`]: `PeftModel.from_pretrained(mllm, adapter_dir)`,
    and with `merge=True` folds it in (`merge_and_unload`), giving back a plain model with the LoRA deltas, the trained
    dream queries / projectors and the trained token rows in its weights (what a pipeline's `mllm` should be).
    """
    from peft import PeftModel

    with _quiet_peft_deprecations():
        model = PeftModel.from_pretrained(mllm, str(adapter_dir), is_trainable=is_trainable)
    return model.merge_and_unload() if merge else model


__all__ = [
    "CONDITION_PROJECTOR_MODULE",
    "DREAM_QUERIES_MODULE",
    "FORMAT_TOKENS",
    "FULLY_TRAINED_MODULES",
    "IMAGE_PROJECTOR_MODULE",
    "LANGUAGE_MODEL_MODULES",
    "LLM_LINEAR_LAYERS_REGEX",
    "POOLED_PROJECTOR",
    "QLORA_SKIP_MODULES",
    "VISION_TOWER_MODULE",
    "apply_lora",
    "dreamllm_lora_config",
    "format_token_ids",
    "load_adapter",
    "load_mllm",
    "upcast_trainable_parameters",
]
