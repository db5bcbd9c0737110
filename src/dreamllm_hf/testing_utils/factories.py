"""Tiny DreamLLM components for tests and benchmarks: built here, offline, seeded, in a fraction of a second.

Every factory takes keyword overrides; nested configs (`text_config`, `vision_config`) are merged into the tiny
defaults, so `tiny_config(text_config={"hidden_size": 64})` keeps the other tiny sizes. The tokenizer is the shapes
world's LLaMA-style SentencePiece model (`dreamllm_hf.shapes_world.tokenizer`), trained in milliseconds, with the 8
DreamLLM tokens after its pieces in the release's order; `tiny_config()` carries those ids without building it.

The sizes: a 2-layer LLaMA 32 wide (the tiny sizes of `backbones`, with the release's multi-head attention), the
tiny CLIP tower of `backbones` (28 px pictures, patch 14: 4 image tokens), 3 dream queries projected to 8, and the
decoder of `decoders` (16 px pictures, VAE factor 2) with the release's DDPM schedule.
"""

import tempfile
from pathlib import Path

from .. import constants as C
from ..modeling import DreamLLMConfig, DreamLLMForConditionalGeneration, DreamLLMProcessor
from ..modeling.configuration_dreamllm import TOKEN_ID_FIELDS, token_ids_from_tokenizer
from ..shapes_world.tokenizer import DEMO_VOCAB_SIZE, build_demo_tokenizer, release_ordered_added_tokens
from ._seeding import seeded
from .backbones import TINY_LLM_SIZES, TINY_VISION_SIZES, VISION_IMAGE_SIZE, tiny_image_processor
from .decoders import TINY_CROSS_ATTENTION_DIM, tiny_scheduler, tiny_unet, tiny_vae


TINY_TOKENIZER_PIECES = DEMO_VOCAB_SIZE  # SentencePiece pieces; the DreamLLM tokens follow
TINY_VOCAB_SIZE = TINY_TOKENIZER_PIECES + len(C.RELEASE_ADDED_TOKEN_IDS)
TINY_NUM_DREAM_QUERIES = 3
TINY_TEXT_CONFIG = {
    "model_type": "llama",
    "vocab_size": TINY_VOCAB_SIZE,
    **TINY_LLM_SIZES,
    "num_key_value_heads": TINY_LLM_SIZES["num_attention_heads"],  # the release's LLaMA-1 has no grouped queries
    "max_position_embeddings": 256,
}
TINY_VISION_CONFIG = {
    "model_type": "clip_vision_model",
    **TINY_VISION_SIZES,
    "image_size": VISION_IMAGE_SIZE["clip"],
}


def config_token_ids(tokenizer=None) -> dict[str, int]:
    """
    The token-id arguments of a [`DreamLLMConfig`] (`bos_token_id`, ..., `dream_token_id`) for a tokenizer.

    Args:
        tokenizer (`PreTrainedTokenizerBase`, *optional*): a DreamLLM tokenizer (with the 8 added tokens). Defaults to
            the ids of `tiny_tokenizer()`, which is not built for this.
    """
    if tokenizer is not None:
        return token_ids_from_tokenizer(tokenizer)
    vocab = {
        C.BOS_TOKEN: C.RELEASE_BOS_TOKEN_ID,  # the SentencePiece layout of LLaMA: <unk> 0, <s> 1, </s> 2
        C.EOS_TOKEN: C.RELEASE_EOS_TOKEN_ID,
        **release_ordered_added_tokens(TINY_TOKENIZER_PIECES),
    }
    return {field: vocab[token] for token, field in TOKEN_ID_FIELDS.items()}


def tiny_config(**overrides) -> DreamLLMConfig:
    """
    A tiny [`DreamLLMConfig`] whose token ids are those of `tiny_tokenizer()`.

    Args:
        **overrides: any `DreamLLMConfig` argument. `text_config` and `vision_config` dicts are merged into the tiny
            sub-configs (`TINY_TEXT_CONFIG`, `TINY_VISION_CONFIG`); pass `config_token_ids(tokenizer)` to match
            another tokenizer.
    """
    text_config = {**TINY_TEXT_CONFIG, **overrides.pop("text_config", {})}
    vision_config = {**TINY_VISION_CONFIG, **overrides.pop("vision_config", {})}
    kwargs = {
        "num_dream_queries": TINY_NUM_DREAM_QUERIES,
        "cross_attention_dim": TINY_CROSS_ATTENTION_DIM,
        **config_token_ids(),
        **overrides,
    }
    return DreamLLMConfig(text_config=text_config, vision_config=vision_config, **kwargs)


def tiny_model(config: DreamLLMConfig | None = None, seed: int = 0, **config_overrides):
    """
    A randomly initialised [`DreamLLMForConditionalGeneration`] in eval mode.

    Args:
        config (`DreamLLMConfig`, *optional*): defaults to `tiny_config(**config_overrides)`.
        seed (`int`, defaults to 0): seeds the initialisation (the global RNG is left as it was).
        **config_overrides: passed to `tiny_config` when `config` is not given.
    """
    if config is None:
        config = tiny_config(**config_overrides)
    elif config_overrides:
        raise ValueError(f"Give `config` or config overrides, not both; got both and {sorted(config_overrides)}.")
    return seeded(seed, lambda: DreamLLMForConditionalGeneration(config)).eval()


def tiny_tokenizer(**kwargs):
    """
    The tiny DreamLLM tokenizer: the shapes world's SentencePiece BPE (`TINY_TOKENIZER_PIECES` pieces, byte fallback,
    so any text tokenizes) as the project's legacy-exact fast tokenizer, with the 8 DreamLLM tokens after it.

    Args:
        **kwargs: passed to `build_demo_tokenizer` (`model_max_length`).
    """
    with tempfile.TemporaryDirectory() as work_dir:
        return build_demo_tokenizer(work_dir, vocab_size=TINY_TOKENIZER_PIECES, **kwargs)


def tiny_processor(config: DreamLLMConfig | None = None, tokenizer=None, image_processor=None) -> DreamLLMProcessor:
    """
    A [`DreamLLMProcessor`] that expands pictures as `config` reads them.

    Args:
        config (`DreamLLMConfig`, *optional*): gives the image and dream slots; defaults to `tiny_config()`.
        tokenizer (*optional*): defaults to `tiny_tokenizer()`.
        image_processor (*optional*): defaults to `tiny_image_processor` of the vision tower's family and size.
    """
    config = config if config is not None else tiny_config()
    if image_processor is None:
        family = "siglip" if config.vision_config.model_type.startswith("siglip") else "clip"
        image_processor = tiny_image_processor(family, config.vision_config.image_size)
    return DreamLLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else tiny_tokenizer(),
        num_image_tokens=config.num_image_tokens,
        num_dream_queries=config.num_dream_queries,
    )


def tiny_pipeline_components(
    config: DreamLLMConfig | None = None, tokenizer=None, seed: int = 0, **config_overrides
) -> dict:
    """
    The components of a DreamLLM pipeline (`mllm`, `processor`, `unet`, `vae`, `scheduler`), consistent with each
    other: the UNet cross-attends at `config.cross_attention_dim`, the processor expands pictures as the model reads
    them.

    Args:
        config (`DreamLLMConfig`, *optional*): defaults to `tiny_config(**config_overrides)` (with the token ids of
            `tokenizer` when one is given).
        tokenizer (*optional*): defaults to `tiny_tokenizer()`.
        seed (`int`, defaults to 0): seeds every initialisation.
        **config_overrides: passed to `tiny_config` when `config` is not given.
    """
    if config is None:
        ids = config_token_ids(tokenizer) if tokenizer is not None else {}
        config = tiny_config(**{**ids, **config_overrides})
    elif config_overrides:
        raise ValueError(f"Give `config` or config overrides, not both; got both and {sorted(config_overrides)}.")
    return {
        "mllm": tiny_model(config, seed=seed),
        "processor": tiny_processor(config, tokenizer=tokenizer),
        "unet": tiny_unet(cross_attention_dim=config.cross_attention_dim, seed=seed),
        "vae": tiny_vae(seed=seed),
        "scheduler": tiny_scheduler(),
    }


def tiny_pipeline(pipeline_class=None, **kwargs):
    """
    A tiny pipeline in fp32 on the CPU, progress bars off.

    Args:
        pipeline_class (*optional*): `DreamLLMPipeline` (default) or `DreamLLMText2ImagePipeline`.
        **kwargs: passed to `tiny_pipeline_components`.
    """
    if pipeline_class is None:
        from ..pipelines import DreamLLMPipeline as pipeline_class
    pipe = pipeline_class(**tiny_pipeline_components(**kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(folder: str | Path, **kwargs) -> Path:
    """
    Writes a tiny `DreamLLMPipeline` folder (`model_index.json`, `mllm/`, `processor/`, `unet/`, `vae/`,
    `scheduler/`), as `from_pretrained` and the command line read it; returns the folder.

    Args:
        folder (`str` or `Path`): where to write it.
        **kwargs: passed to `tiny_pipeline_components`.
    """
    tiny_pipeline(**kwargs).save_pretrained(folder)
    return Path(folder)


__all__ = [
    "TINY_NUM_DREAM_QUERIES",
    "TINY_TEXT_CONFIG",
    "TINY_TOKENIZER_PIECES",
    "TINY_VISION_CONFIG",
    "TINY_VOCAB_SIZE",
    "config_token_ids",
    "save_tiny_pipeline",
    "tiny_config",
    "tiny_model",
    "tiny_pipeline",
    "tiny_pipeline_components",
    "tiny_processor",
    "tiny_tokenizer",
]
