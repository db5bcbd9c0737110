"""The paper's three training stages as settings of the one trainer: what is trained, frozen or LoRA-wrapped.

A run trains some parts of the DreamLLM and leaves the rest as loaded (the UNet and the VAE are always frozen):

* `language_model`: `"frozen"`, `"lora"` (a PEFT adapter on its linear layers, see `lora.py`) or `"full"` (every
  weight, `lm_head` and the embeddings included);
* `vision_tower`: `"frozen"` or `"full"`;
* `image_projector`, `condition_projector`, `dream_queries`: trained in full or frozen;
* `format_tokens`: the embedding and `lm_head` rows of `<im_start>`, `<im_patch>`, `<im_end>`, `<dream_start>`,
  `<dream_end>` (the tokens DreamLLM adds to its LLM), trained when the rest of the language model is not.

A stage preset sets these defaults; every one can be overridden:

| stage | language model | vision tower | projectors, queries | format-token rows | data, as the paper |
| --- | --- | --- | --- | --- | --- |
| none (fine-tuning, the default) | LoRA | frozen | trained | trained | any |
| `1` / `alignment` | frozen | frozen | trained | trained | caption pairs, both ways |
| `2` / `pretraining` (I-GPT) | full | frozen | trained | (in the LLM) | interleaved documents + pairs |
| `3` / `instruction` | full | frozen | trained | (in the LLM) | conversations |

A frozen language model with trained format-token rows trains those rows only: a gradient hook zeroes the other rows,
and they are kept out of weight decay, so every other weight of the embedding and of `lm_head` stays bit for bit.
"""

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .lora import (
    CONDITION_PROJECTOR_MODULE,
    DREAM_QUERIES_MODULE,
    IMAGE_PROJECTOR_MODULE,
    LANGUAGE_MODEL_MODULES,
    POOLED_PROJECTOR,
    VISION_TOWER_MODULE,
    format_token_ids,
    upcast_trainable_parameters,
)


LANGUAGE_MODEL_MODES = ("frozen", "lora", "full")
VISION_TOWER_MODES = ("frozen", "full")


@dataclass(frozen=True)
class TrainableParts:
    """What a run trains. See the module docstring."""

    language_model: str = "lora"
    vision_tower: str = "frozen"
    image_projector: bool = True
    condition_projector: bool = True
    dream_queries: bool = True
    format_tokens: bool = True

    def __post_init__(self):
        if self.language_model not in LANGUAGE_MODEL_MODES:
            raise ValueError(f"`language_model` must be one of {LANGUAGE_MODEL_MODES}, got {self.language_model!r}.")
        if self.vision_tower not in VISION_TOWER_MODES:
            raise ValueError(f"`vision_tower` must be one of {VISION_TOWER_MODES}, got {self.vision_tower!r}.")

    def fully_trained_modules(self, config=None) -> tuple[str, ...]:
        """Module names trained in full besides the language model: the PEFT `modules_to_save` of a LoRA run. With the
        model's `config`, the pooled projector of an SDXL-style model goes with the condition projector."""
        pooled = getattr(config, "pooled_projection_dim", None) is not None
        chosen = (
            (self.vision_tower == "full", VISION_TOWER_MODULE),
            (self.image_projector, IMAGE_PROJECTOR_MODULE),
            (self.condition_projector, CONDITION_PROJECTOR_MODULE),
            (self.condition_projector and pooled, POOLED_PROJECTOR),
            (self.dream_queries, DREAM_QUERIES_MODULE),
        )
        return tuple(name for wanted, name in chosen if wanted)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Presets by canonical name; `None` is plain fine-tuning (today's LoRA default).
STAGES = {
    None: TrainableParts(),
    "alignment": TrainableParts(language_model="frozen"),
    "pretraining": TrainableParts(language_model="full"),
    "instruction": TrainableParts(language_model="full"),
}
STAGE_ALIASES = {"1": "alignment", "2": "pretraining", "3": "instruction", "igpt": "pretraining"}


def resolve_stage(stage: str | int | None) -> str | None:
    """The canonical stage name of `stage` (`1`, `"2"`, `"alignment"`, ...; None for plain fine-tuning)."""
    if stage is None or stage == "":
        return None
    name = str(stage).strip().lower()
    name = STAGE_ALIASES.get(name, name)
    if name not in STAGES:
        choices = sorted(set(STAGE_ALIASES) | {key for key in STAGES if key})
        raise ValueError(f"`stage` must be one of {choices} (or unset for plain fine-tuning), got {stage!r}.")
    return name


def trainable_parts(stage: str | int | None = None, **overrides) -> TrainableParts:
    """The preset of `stage` with the `overrides` that are not None (`language_model="lora"`, ...)."""
    chosen = {key: value for key, value in overrides.items() if value is not None}
    return dataclasses.replace(STAGES[resolve_stage(stage)], **chosen)


def _mask_rows(weight: nn.Parameter, rows: list[int]) -> None:
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[rows] = 1
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * mask.to(grad))


def apply_trainable_parts(mllm: nn.Module, parts: TrainableParts) -> list[nn.Parameter]:
    """
    Sets `requires_grad` on a bare [`DreamLLMForConditionalGeneration`] as `parts` says (for `"frozen"` and `"full"`
    language models; a LoRA run goes through `apply_lora`) and keeps the trained parameters in fp32. Returns the
    parameters of which only some rows train (the format-token rows), which must stay out of weight decay.
    """
    if parts.language_model == "lora":
        raise ValueError("A LoRA language model is set up by `apply_lora`, not `apply_trainable_parts`.")
    mllm.requires_grad_(False)
    names = list(parts.fully_trained_modules(mllm.config))
    if parts.language_model == "full":
        names += LANGUAGE_MODEL_MODULES
    for name in names:
        mllm.get_submodule(name).requires_grad_(True)
    upcast_trainable_parameters(mllm)
    partial = []
    if parts.format_tokens and parts.language_model == "frozen":
        rows = format_token_ids(mllm.config)
        for module in (mllm.get_input_embeddings(), mllm.get_output_embeddings()):
            if module is None or any(module.weight is param for param in partial):  # tied: one weight, one hook
                continue
            module.weight.data = module.weight.data.float()
            _mask_rows(module.weight, rows)
            partial.append(module.weight)
    if not any(param.requires_grad for param in mllm.parameters()):
        raise ValueError(
            "Nothing to train: the language model and the vision tower are frozen and the projectors, the dream "
            "queries and the format tokens are all switched off."
        )
    return partial


__all__ = [
    "LANGUAGE_MODEL_MODES",
    "STAGES",
    "STAGE_ALIASES",
    "VISION_TOWER_MODES",
    "TrainableParts",
    "apply_trainable_parts",
    "resolve_stage",
    "trainable_parts",
]
