"""The model card (README.md) of a built DreamLLM: what it was built from, what was added, and that it is untrained."""

import re
from pathlib import Path

from huggingface_hub import ModelCard

from .. import constants as C
from ..conversion.model_card import render_model_card
from .builder import BuildInfo


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _hub_ids(*names: str | None) -> list[str]:
    """The names that are Hub repository ids (a local folder is not a `base_model`)."""
    return [name for name in names if name and _HUB_ID.match(name) and not Path(name).exists()]


def build_model_card(info: BuildInfo, version: str) -> ModelCard:
    """The card of a DreamLLM built by `dreamllm_hf` `version` (`dreamllm-hf init`) as `info` records it."""
    metadata = dict(
        library_name="diffusers",
        pipeline_tag="any-to-any",
        tags=["dreamllm", "untrained", "multimodal", info.llm_type, info.vision_type],
        base_model=_hub_ids(info.llm, info.vision, info.diffusion) or None,
    )
    tie = "tied to the input embeddings" if info.tied_embeddings else "its own LM head"
    template = {
        "llm": "the LLM's own chat template",
        "vicuna": "the release's Vicuna v1.1 template (the LLM has none), turns ended by its end-of-sequence token",
        "given": "the chat template given when it was built",
    }[info.chat_template]
    added = "\n".join(f"| `{token}` | {token_id} |" for token, token_id in info.tokens_added.items())
    ids = ", ".join(f"`{token}` {token_id}" for token, token_id in info.format_token_ids.items())
    roles = {"bos": "beginning of sequence", "eos": "end of a document", "pad": "padding"}
    sequence = "\n".join(
        f"| {roles[role]} | {f'`{token}`' if token else 'none'} | {'' if token_id is None else token_id} |"
        for role, (token, token_id) in info.sequence_tokens.items()
    )
    pooled, pooled_size = "", ""
    if info.pooled_projection_dim is not None:  # an SDXL-style UNet also reads a pooled conditioning
        pooled = ", the pooled projector (SDXL's `text_embeds`)"
        pooled_size = f", pooled `text_embeds` {info.pooled_projection_dim}"
    body = f"""
# An untrained DreamLLM built from {info.llm}, {info.vision} and {info.diffusion}

This is a [DreamLLM](https://arxiv.org/abs/2309.11499) assembled by `dreamllm-hf init` (`dreamllm_hf` {version}). **It
has not been trained.** Its language model, vision tower and diffusion decoder are the given ones, unchanged; the parts
DreamLLM adds - the image projector, the dream queries, the condition projector{pooled} and the embedding rows of the
new tokens - start untrained, so it reads and draws pictures only once it has been trained (`dreamllm-hf train`, the
paper's stages I to III).

## Parts

| part | from | what |
|---|---|---|
| language model | `{info.llm}` | {info.llm_type}; vocabulary {info.vocab_size[0]} -> {info.vocab_size[1]} rows, {tie} |
| vision tower | `{info.vision}` | {info.vision_type}; hidden state {info.vision_feature_layer}, {info.num_image_tokens} tokens per picture |
| diffusion decoder | `{info.diffusion}` | UNet (`cross_attention_dim` {info.cross_attention_dim}{pooled_size}), VAE, scheduler |

## What was added

The DreamLLM format's tokens, as special tokens of the LLM's tokenizer (those it did not have):

| token | id |
|---|---|
{added}

Every format token's id, as the config records it: {ids}. The sequence tokens are the LLM's (`[PAD]` only if it had no
pad token distinct from its end of sequence):

| role | token | id |
|---|---|---|
{sequence}

- The new tokens' embedding rows (and output rows, if not tied) start as the mean of the rows of the tokens the LLM
  knows, as the original DreamLLM (LLaVA's `smart_tokenizer_and_embedding_resize`) does.
- The {info.num_dream_queries} dream queries start as N(0, {info.query_std:.4g}^2), the spread of the LLM's input
  embeddings as its layers read them.
- The projectors start as `DreamLLMForConditionalGeneration` initialises them; all of this seeded with {info.seed}.
- Chat template: {template}. Pictures are `{C.IMAGE_PLACEHOLDER}` in user turns and `{C.DREAM_PLACEHOLDER}` in
  assistant turns.

## Usage

```python
import torch
from dreamllm_hf.pipelines import DreamLLMPipeline

pipe = DreamLLMPipeline.from_pretrained("path/to/this/folder", dtype=torch.bfloat16)
```

Train it first: until then its text is the LLM's and its pictures are noise.
"""
    # The project's one card generator; the body is written above, so the template only places it.
    return render_model_card(metadata, "---\n{{ card_data }}\n---\n{{ body }}", {"body": body})


__all__ = ["build_model_card"]
