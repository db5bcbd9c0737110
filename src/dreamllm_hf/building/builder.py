"""A DreamLLM built from parts: any decoder-only causal LM, a CLIP or SigLIP vision tower, a Stable Diffusion decoder.

What is taken as it is: the LLM (its decoder and LM head, tied or not, its tokenizer and chat template), the vision
tower (from a vision model, or the vision part of a full CLIP/SigLIP model) and its image processor, the UNet, VAE and
scheduler. Of a multimodal LLM checkpoint (Gemma 3 from 4B up) only the language model is taken: its own image tokens,
`token_type_ids` and bidirectional attention over its images belong to its own vision path, which DreamLLM replaces
(its pictures are read causally, as the release reads them). What is added, and how it starts:

* The DreamLLM format's tokens (`constants.py`) are added to the tokenizer as special tokens, in the release's order,
  wherever they land (after the vocabulary, or in the unused rows an LLM like Qwen keeps at the end of its embedding
  matrix); `[PAD]` only when the tokenizer has no pad token distinct from its end of sequence (the engine never
  samples the pad token, so it must not be the one that ends a document). Their ids go into the config.
* Their embedding rows (input, and output when it is not tied) start as the mean of the rows of the tokens the LLM
  knows, as the original (LLaVA's `smart_tokenizer_and_embedding_resize`) does: a new token then starts as an average
  token, so the model's distribution over the old tokens barely moves and no row starts with an outlying norm.
* The dream queries start as N(0, sigma^2), sigma the standard deviation of the LLM's input embeddings as its layers
  read them (after Gemma's sqrt(hidden) scaling): they live where token embeddings live. The projectors start as
  `from_config` initialises them. Everything added is seeded (`seed`), and untrained.
"""

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from .. import constants as C
from ..decoder_conditioning import conditioning_width, pooled_width
from ..modeling import DreamLLMConfig, DreamLLMForConditionalGeneration, DreamLLMProcessor
from ..modeling.configuration_dreamllm import token_ids_from_tokenizer
from ..modeling.modeling_dreamllm import VIT_TOWER_TYPES


# The vision towers DreamLLM reads (see `DreamLLMModel.get_image_features`), and the full models whose vision part is
# one of them.
VISION_TOWER_TYPES = VIT_TOWER_TYPES
FULL_VISION_MODEL_TYPES = ("clip", "siglip")
DIFFUSION_COMPONENTS = ("unet", "vae", "scheduler")
# The format's tokens in the release's id order ([PAD] first: it is added only when needed).
ADDED_TOKENS = tuple(sorted(C.RELEASE_ADDED_TOKEN_IDS, key=C.RELEASE_ADDED_TOKEN_IDS.get))  # in the release order
_MEAN_CHUNK = 8192  # embedding rows summed at a time (a 150k x 4k bf16 matrix is not copied to fp32 at once)
_STD_SAMPLE = 4096  # token embeddings the dream queries' scale is measured on


@dataclass
class BuildInfo:
    """What a built DreamLLM was made of and how its new parts started (the model card is written from it)."""

    llm: str
    vision: str
    diffusion: str | None
    llm_type: str
    vision_type: str
    tokens_added: dict[str, int] = field(default_factory=dict)
    format_token_ids: dict[str, int] = field(default_factory=dict)  # every format token (added or not) and its id
    sequence_tokens: dict[str, list] = field(default_factory=dict)  # "bos", "eos", "pad": [token or None, id or None]
    vocab_size: tuple[int, int] = (0, 0)  # before, after
    tied_embeddings: bool = False
    query_std: float = 0.0
    num_image_tokens: int = 0
    num_dream_queries: int = 0
    vision_feature_layer: int = -2
    cross_attention_dim: int = 0
    pooled_projection_dim: int | None = None
    chat_template: str = ""  # "llm" (the LLM's own) or "vicuna" (the release's, for an LLM without one) or "given"
    seed: int = 0


# --------------------------------------------------------------------------------------------------------------------
# Loading the parts


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _folder(value, argument: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(
            f"`{argument}` is {str(value)!r}, which is not a folder; give a `save_pretrained` folder."
        )
    return path


def _source_name(value, model) -> str:
    if _is_path(value):
        return str(value)
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def load_llm(llm, tokenizer=None, dtype=None):
    """`(causal LM, tokenizer, name)` from a folder or a loaded model (whose tokenizer must then be given)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if _is_path(llm):
        path = _folder(llm, "llm")
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"`llm` ({path}) is an encoder-decoder model ({config.model_type}); DreamLLM needs a decoder-only "
                "causal LM (Llama, Qwen2, Mistral, Gemma, ...)."
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto")
        except ValueError as error:
            raise ValueError(
                f"`llm` ({path}) holds a {config.model_type} model, which `AutoModelForCausalLM` cannot load; give a "
                f"decoder-only causal LM (Llama, Qwen2, Mistral, Gemma, ...). ({error})"
            ) from error
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
    else:
        model = llm
        if tokenizer is None:
            raise ValueError("`llm` is a loaded model: give its `tokenizer` too (or give the model's folder).")
        if dtype is not None:
            model = model.to(dtype)
    if model.get_output_embeddings() is None:
        raise ValueError(f"`llm` ({type(model).__name__}) has no LM head; give a causal LM (`...ForCausalLM`).")
    return model, tokenizer, _source_name(llm, model)


def load_vision(vision, image_processor=None, dtype=None):
    """`(vision tower, image processor, name)` from a folder or a loaded model: a CLIP or SigLIP vision model, or the
    vision part of a full CLIP or SigLIP model."""
    from transformers import AutoImageProcessor, AutoModel

    if _is_path(vision):
        path = _folder(vision, "vision")
        model = AutoModel.from_pretrained(path, dtype=dtype if dtype is not None else "auto")
    else:
        model = vision
        if image_processor is None:
            raise ValueError(
                "`vision` is a loaded model: give its `image_processor` too (or give the model's folder)."
            )
        if dtype is not None:
            model = model.to(dtype)
    tower = model.vision_model if model.config.model_type in FULL_VISION_MODEL_TYPES else model
    if tower.config.model_type not in VISION_TOWER_TYPES:
        raise ValueError(
            f"`vision` holds a {model.config.model_type} model; DreamLLM takes a CLIP or SigLIP vision tower "
            f"({', '.join(VISION_TOWER_TYPES)}, or the vision part of {', '.join(FULL_VISION_MODEL_TYPES)})."
        )
    if image_processor is None:
        image_processor = AutoImageProcessor.from_pretrained(path)
    return tower, image_processor, _source_name(vision, model)


def load_diffusion(diffusion, dtype=None) -> tuple[dict, str]:
    """`({"unet", "vae", "scheduler"}, name)` from a diffusers pipeline folder (only those three subfolders are read),
    a mapping, or an object (a pipeline) holding them."""
    import diffusers

    if _is_path(diffusion):
        path = _folder(diffusion, "diffusion")
        missing = [name for name in DIFFUSION_COMPONENTS if not (path / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"`diffusion` ({path}) has no {', '.join(f'{name}/' for name in missing)}: give a diffusers pipeline "
                "folder with unet/, vae/ and scheduler/ (a Stable Diffusion checkpoint saved with `save_pretrained`)."
            )
        parts = {}
        for name in DIFFUSION_COMPONENTS:
            config_name = "scheduler_config.json" if name == "scheduler" else "config.json"
            class_name = json.loads((path / name / config_name).read_text()).get("_class_name")
            cls = getattr(diffusers, class_name or "", None)
            if cls is None:
                raise ValueError(f"`diffusion`: {path / name} names the class {class_name!r}, which diffusers lacks.")
            kwargs = {} if name == "scheduler" or dtype is None else {"torch_dtype": dtype}
            parts[name] = cls.from_pretrained(path, subfolder=name, **kwargs)
        return parts, str(diffusion)
    if isinstance(diffusion, Mapping):
        parts = {name: diffusion.get(name) for name in DIFFUSION_COMPONENTS}
    else:
        parts = {name: getattr(diffusion, name, None) for name in DIFFUSION_COMPONENTS}
    missing = [name for name, part in parts.items() if part is None]
    if missing:
        raise ValueError(
            f"`diffusion` lacks {', '.join(missing)}: give a pipeline folder, a pipeline, or a mapping with "
            f"{', '.join(DIFFUSION_COMPONENTS)}."
        )
    return parts, type(diffusion).__name__


# --------------------------------------------------------------------------------------------------------------------
# Tokens and embeddings


def _add_format_tokens(tokenizer, eos_token: str | None) -> dict[str, int]:
    """Adds the format's tokens (and `[PAD]` if needed) to the tokenizer; returns the tokens added with their ids."""
    if eos_token is not None:
        if eos_token not in tokenizer.get_vocab():
            raise ValueError(f"`eos_token` is {eos_token!r}, which the LLM's tokenizer does not have.")
        tokenizer.eos_token = eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError("The LLM's tokenizer has no end-of-sequence token; name one with `eos_token`.")
    vocab = tokenizer.get_vocab()
    needs_pad = tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id
    new = [t for t in ADDED_TOKENS if t not in vocab and (needs_pad or t != C.PAD_TOKEN)]
    if needs_pad:
        tokenizer.add_special_tokens({"pad_token": C.PAD_TOKEN})
    others = [t for t in new if t != C.PAD_TOKEN]
    tokenizer.add_special_tokens({"extra_special_tokens": others}, replace_extra_special_tokens=False)
    vocab = tokenizer.get_vocab()
    return {token: vocab[token] for token in new}


def _mean_row(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    for chunk in ids.split(_MEAN_CHUNK):
        total += weight[chunk.to(weight.device)].sum(0, dtype=torch.float64)
    return (total / len(ids)).to(weight.dtype)


@torch.no_grad()
def _resize_and_init_rows(llm, known_ids: list[int], new_ids: list[int], vocab_size: int) -> None:
    """Makes room for the new tokens and sets their rows (input and, if untied, output) to the mean known row."""
    if vocab_size > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(vocab_size, mean_resizing=False)
    if not new_ids:
        return
    known = torch.tensor(known_ids)
    new = torch.tensor(new_ids)
    matrices = [llm.get_input_embeddings().weight, llm.get_output_embeddings().weight]
    if matrices[1] is matrices[0]:  # tied: one matrix
        matrices = matrices[:1]
    for weight in matrices:
        weight[new.to(weight.device)] = _mean_row(weight, known)


@torch.no_grad()
def _embedding_std(embeddings: torch.nn.Module, known_ids: list[int]) -> float:
    """Standard deviation of what the LLM's layers read for known tokens (the embedding module's output)."""
    step = max(1, len(known_ids) // _STD_SAMPLE)
    sample = torch.tensor(known_ids[::step], device=embeddings.weight.device)
    return embeddings(sample).float().std().item()


# --------------------------------------------------------------------------------------------------------------------
# Checks


def _image_processor_size(image_processor) -> tuple[int, int]:
    """The height and width of what the image processor gives (run once on a picture of an odd size)."""
    pixels = image_processor(PIL.Image.new("RGB", (37, 53)), return_tensors="pt")["pixel_values"]
    return tuple(pixels.shape[-2:])


def _check_image_size(image_processor, vision_config) -> None:
    size = _image_processor_size(image_processor)
    expected = (vision_config.image_size, vision_config.image_size)
    if size != expected:
        raise ValueError(
            f"The image processor gives {size[0]}x{size[1]} pictures but the vision tower takes "
            f"{expected[0]}x{expected[1]} (`image_size` {vision_config.image_size}): give the tower's own image "
            "processor, or one set to its size."
        )


# --------------------------------------------------------------------------------------------------------------------
# Building


def _assemble(config: DreamLLMConfig, language_model, lm_head, vision_tower, query_std: float, seed: int):
    """The DreamLLM model around the given modules; only its own parts (projectors, queries, ...) are created."""
    with torch.device("meta"):  # the backbones are not built twice
        mllm = DreamLLMForConditionalGeneration(config)
    for name, given, built in (
        ("llm", language_model, mllm.model.language_model),
        ("vision", vision_tower, mllm.model.vision_tower),
    ):
        if type(given) is not type(built):
            raise ValueError(
                f"`{name}` gives a {type(given).__name__}, but its config builds a {type(built).__name__}; the saved "
                "DreamLLM would not load back. Give a model that `AutoModel.from_config` builds from its own config."
            )
    mllm.model.language_model = language_model
    mllm.model.vision_tower = vision_tower
    mllm.lm_head = lm_head
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in mllm.modules():
            own = chain(module.parameters(recurse=False), module.buffers(recurse=False))
            if any(tensor.is_meta for tensor in own):
                module.to_empty(device=lm_head.weight.device, recurse=False)
                mllm._init_weights(module)
        torch.nn.init.normal_(mllm.model.dream_queries.weight, mean=0.0, std=query_std)
    if config.tie_word_embeddings:
        mllm.tie_weights()
    left = [name for name, tensor in chain(mllm.named_parameters(), mllm.named_buffers()) if tensor.is_meta]
    if left:
        raise RuntimeError(f"Parts of the built model were not created: {left[:5]}.")
    return mllm


def _generation_config(llm, config: DreamLLMConfig):
    from transformers import GenerationConfig

    generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    source = getattr(llm, "generation_config", None)
    for name in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty"):  # the LLM's sampling advice
        if source is not None and getattr(source, name, None) is not None:
            setattr(generation_config, name, getattr(source, name))
    return generation_config


def build_dreamllm(
    llm,
    vision,
    *,
    cross_attention_dim: int,
    pooled_projection_dim: int | None = None,
    tokenizer=None,
    image_processor=None,
    num_dream_queries: int = C.NUM_DREAM_QUERIES,
    vision_feature_layer: int = -2,
    eos_token: str | None = None,
    chat_template: str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[DreamLLMForConditionalGeneration, DreamLLMProcessor, BuildInfo]:
    """
    A DreamLLM language model and processor from an LLM and a vision tower (see the module docstring).

    Args:
        llm: a causal LM's `save_pretrained` folder (with its tokenizer), or a loaded causal LM (then give `tokenizer`).
        vision: a CLIP/SigLIP vision model or full model's folder (with its image processor), or a loaded one (then give
            `image_processor`).
        cross_attention_dim (`int`): the size of the diffusion conditioning (the UNet's `cross_attention_dim`).
        pooled_projection_dim (`int`, *optional*): the size of the pooled conditioning an SDXL-style UNet reads
            (`text_embeds`); `None` for UNets that read none.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the LLM's tokenizer, needed when `llm` is a loaded model;
            changed in place (the format's tokens are added).
        image_processor (`BaseImageProcessor`, *optional*): the tower's image processor, needed when `vision` is a
            loaded model.
        num_dream_queries (`int`, defaults to 64): learned queries per picture.
        vision_feature_layer (`int`, defaults to -2): the tower's hidden state the projector reads.
        eos_token (`str`, *optional*): the token that ends a document, if not the tokenizer's (e.g. `<end_of_turn>`
            for a Gemma chat model).
        chat_template (`str`, *optional*): the processor's chat template; defaults to the LLM's own, or the release's
            Vicuna template ended by the LLM's end-of-sequence token when the LLM has none.
        dtype (`torch.dtype`, *optional*): cast the LLM and the tower (default: as stored). DreamLLM's own parts are
            float32 (`_keep_in_fp32_modules`).
        seed (`int`, defaults to 0): seeds the initialisation of the new parts.

    Returns:
        `(mllm, processor, info)`.
    """
    if not isinstance(num_dream_queries, int) or num_dream_queries < 1:
        raise ValueError(f"`num_dream_queries` must be a positive integer, got {num_dream_queries!r}.")
    if not isinstance(cross_attention_dim, int) or cross_attention_dim < 1:
        raise ValueError(
            f"`cross_attention_dim` must be a positive integer (the UNet's), got {cross_attention_dim!r}."
        )
    causal_lm, tokenizer, llm_name = load_llm(llm, tokenizer, dtype)
    tower, image_processor, vision_name = load_vision(vision, image_processor, dtype)
    _check_image_size(image_processor, tower.config)

    text_config = causal_lm.config.get_text_config(decoder=True)
    known_ids = sorted(set(tokenizer.get_vocab().values()))
    vocab_before = causal_lm.get_input_embeddings().weight.shape[0]
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    template_source = "given" if chat_template is not None else ("llm" if template else "vicuna")
    added = _add_format_tokens(tokenizer, eos_token)
    if template is None:
        template = C.vicuna_chat_template(tokenizer.eos_token)
    _resize_and_init_rows(causal_lm, known_ids, list(added.values()), max(vocab_before, len(tokenizer)))
    text_config.vocab_size = causal_lm.get_input_embeddings().weight.shape[0]

    config = DreamLLMConfig(
        text_config=text_config,
        vision_config=tower.config,
        vision_feature_layer=vision_feature_layer,
        num_dream_queries=num_dream_queries,
        cross_attention_dim=cross_attention_dim,
        pooled_projection_dim=pooled_projection_dim,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        **token_ids_from_tokenizer(tokenizer),
    )
    ids = {token: config.special_token_ids[token] for token in ADDED_TOKENS if token != C.PAD_TOKEN}
    query_std = _embedding_std(causal_lm.get_input_embeddings(), known_ids)
    mllm = _assemble(
        config,
        causal_lm.get_decoder(),
        causal_lm.get_output_embeddings(),
        tower,
        query_std,
        seed,
    )
    mllm.generation_config = _generation_config(causal_lm, config)
    mllm.eval()
    processor = DreamLLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        num_dream_queries=num_dream_queries,
        chat_template=template,
    )
    info = BuildInfo(
        llm=llm_name,
        vision=vision_name,
        diffusion=None,
        llm_type=text_config.model_type,
        vision_type=tower.config.model_type,
        tokens_added=added,
        format_token_ids=ids,
        sequence_tokens={
            role: [getattr(tokenizer, f"{role}_token"), getattr(tokenizer, f"{role}_token_id")]
            for role in ("bos", "eos", "pad")
        },
        vocab_size=(vocab_before, text_config.vocab_size),
        tied_embeddings=config.tie_word_embeddings,
        query_std=query_std,
        num_image_tokens=config.num_image_tokens,
        num_dream_queries=num_dream_queries,
        vision_feature_layer=vision_feature_layer,
        cross_attention_dim=cross_attention_dim,
        pooled_projection_dim=pooled_projection_dim,
        chat_template=template_source,
        seed=seed,
    )
    return mllm, processor, info


def build_pipeline(
    llm,
    vision,
    diffusion,
    *,
    num_dream_queries: int = C.NUM_DREAM_QUERIES,
    return_info: bool = False,
    dtype: torch.dtype | None = None,
    **kwargs,
):
    """
    A [`DreamLLMPipeline`] from an LLM, a vision tower and a diffusion decoder (`DreamLLMPipeline.from_components`).

    Args:
        llm (`str`, `os.PathLike` or `PreTrainedModel`): see [`build_dreamllm`].
        vision (`str`, `os.PathLike` or `PreTrainedModel`): see [`build_dreamllm`].
        diffusion: a diffusers pipeline folder with `unet/`, `vae/` and `scheduler/` (other subfolders, e.g. the text
            encoder DreamLLM replaces, are not read), or a pipeline or mapping holding those three.
        num_dream_queries (`int`, defaults to 64): learned queries per picture.
        return_info (`bool`): also return the [`BuildInfo`] (what the model card is written from).
        dtype (`torch.dtype`, *optional*): cast every component (default: as stored).
        **kwargs: the other arguments of [`build_dreamllm`] (`tokenizer`, `image_processor`, `vision_feature_layer`,
            `eos_token`, `chat_template`, `seed`); `cross_attention_dim` (and an SDXL-style UNet's
            `pooled_projection_dim`) come from the UNet.
    """
    from ..pipelines import DreamLLMPipeline

    parts, diffusion_name = load_diffusion(diffusion, dtype)
    cross_attention_dim, _ = conditioning_width(parts["unet"].config)
    if cross_attention_dim is None:
        raise ValueError(
            f"The UNet's `cross_attention_dim` is {parts['unet'].config.cross_attention_dim!r}, one per block; DreamLLM "
            "conditions every block with the same dream embeddings, so it needs a single size."
        )
    mllm, processor, info = build_dreamllm(
        llm,
        vision,
        cross_attention_dim=cross_attention_dim,
        pooled_projection_dim=pooled_width(parts["unet"].config),
        num_dream_queries=num_dream_queries,
        dtype=dtype,
        **kwargs,
    )
    info.diffusion = diffusion_name
    pipe = DreamLLMPipeline(mllm=mllm, processor=processor, **parts)
    return (pipe, info) if return_info else pipe


__all__ = [
    "BuildInfo",
    "ADDED_TOKENS",
    "build_dreamllm",
    "build_pipeline",
    "load_diffusion",
    "load_llm",
    "load_vision",
]
