"""Tiny random backbones of every family DreamLLM can be built from, made locally (no download), seeded.

* LLMs: Llama (3-style tokens and chat), Qwen2 (no BOS, ChatML, tied embeddings, a vocabulary larger than its
  tokenizer), Mistral (sliding window, `[INST]` chat), Gemma 2 and Gemma 3 (sliding and full layers, scaled
  embeddings, tied embeddings; Gemma 2's logit soft-capping), each with a byte-level BPE tokenizer trained here on a
  few sentences and a chat template in its family's format. Hidden size 32, 2 layers, grouped-query attention.
* Vision towers: CLIP (28 px, patch 14: 4 patches and a CLS token) and SigLIP (42 px, patch 14: 9 patches, no CLS),
  with their image processors, as vision models or as the vision part of a full CLIP/SigLIP model.

`save_*` write each as the `save_pretrained` folder `dreamllm-hf init` reads; the decoder's folder is
`decoders.save_tiny_diffusion`. The family tokenizer is `tiny_llm_tokenizer(family)` (the DreamLLM tokenizer of the
release's layout is `factories.tiny_tokenizer()`).
"""

from functools import cache
from pathlib import Path

from ._seeding import seeded


LLM_FAMILIES = ("llama", "qwen2", "mistral", "gemma2", "gemma3")
VISION_FAMILIES = ("clip", "siglip")
SLIDING_FAMILIES = ("mistral", "gemma2", "gemma3")
SLIDING_WINDOW = 12  # smaller than any document the tests write, so that the window is always exceeded
TINY_LLM_SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
TINY_VISION_SIZES = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14
)
VISION_IMAGE_SIZE = {"clip": 28, "siglip": 42}

_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant.",
    "Tell me a story about a red circle and a blue square.",
    "What is in the picture? A green triangle on a white background.",
    "Once upon a time there was a small yellow fox who liked to paint.",
    "The quick brown fox jumps over the lazy dog, 0123456789 times!",
    "user assistant system model picture image draw write answer question",
)

# Chat templates in each family's format, written here (pictures are already `<image>`/`<dream>` in the text).
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] }}[/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# family: (bos, eos, pad, other special tokens, chat template)
_TOKENS = {
    "llama": ("<|begin_of_text|>", "<|eot_id|>", None, ("<|start_header_id|>", "<|end_header_id|>"), _LLAMA3_TEMPLATE),
    "qwen2": (None, "<|im_end|>", "<|endoftext|>", ("<|im_start|>",), _CHATML_TEMPLATE),
    "mistral": ("<s>", "</s>", None, ("[INST]", "[/INST]"), _MISTRAL_TEMPLATE),
    "gemma2": ("<bos>", "<eos>", "<pad>", ("<start_of_turn>", "<end_of_turn>"), _GEMMA_TEMPLATE),
    "gemma3": ("<bos>", "<eos>", "<pad>", ("<start_of_turn>", "<end_of_turn>"), _GEMMA_TEMPLATE),
}
_QWEN_SPARE_ROWS = 16  # Qwen's embedding matrix has rows no token uses; added tokens land there


def _check_family(family: str, families: tuple[str, ...]) -> None:
    if family not in families:
        raise ValueError(f"Unknown `family` {family!r}; choose one of {', '.join(families)}.")


@cache
def _trained_bpe():
    """A byte-level BPE on the corpus (vocabulary 320), as JSON (trained once per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer.to_str()


def tiny_llm_tokenizer(family: str):
    """
    The family's tokenizer: a byte-level BPE trained here on a few sentences, with the family's special tokens and a
    chat template in its format.

    Args:
        family (`str`): one of `LLM_FAMILIES`.
    """
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    _check_family(family, LLM_FAMILIES)
    bos, eos, pad, others, template = _TOKENS[family]
    tokenizer = Tokenizer.from_str(_trained_bpe())
    specials = [t for t in (bos, eos, pad, *others) if t is not None]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=list(others),
        chat_template=template,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


def tiny_llm_config(family: str, tokenizer, sliding_window: int = SLIDING_WINDOW):
    """
    The family's config at the tiny size (`TINY_LLM_SIZES`).

    Args:
        family (`str`): one of `LLM_FAMILIES`.
        tokenizer (`PreTrainedTokenizerBase`): gives the vocabulary size and the special ids.
        sliding_window (`int`, defaults to `SLIDING_WINDOW`): the window of the sliding families.
    """
    from transformers import AutoConfig

    _check_family(family, LLM_FAMILIES)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    ids["pad_token_id"] = tokenizer.pad_token_id
    vocab_size = len(tokenizer)
    if family == "llama":
        return AutoConfig.for_model("llama", vocab_size=vocab_size, tie_word_embeddings=False, **ids, **TINY_LLM_SIZES)
    if family == "qwen2":
        return AutoConfig.for_model(
            "qwen2", vocab_size=vocab_size + _QWEN_SPARE_ROWS, tie_word_embeddings=True, **ids, **TINY_LLM_SIZES
        )
    sliding = dict(head_dim=8, sliding_window=sliding_window)
    if family == "mistral":
        return AutoConfig.for_model("mistral", vocab_size=vocab_size, **sliding, **ids, **TINY_LLM_SIZES)
    layer_types = ["sliding_attention", "full_attention"]
    if family == "gemma2":
        return AutoConfig.for_model(
            "gemma2",
            vocab_size=vocab_size,
            layer_types=layer_types,
            query_pre_attn_scalar=8,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            **sliding,
            **ids,
            **TINY_LLM_SIZES,
        )
    return AutoConfig.for_model(
        "gemma3_text",
        vocab_size=vocab_size,
        layer_types=layer_types,
        query_pre_attn_scalar=8,
        **sliding,
        **ids,
        **TINY_LLM_SIZES,
    )


def tiny_llm(family: str, seed: int = 0, sliding_window: int = SLIDING_WINDOW):
    """
    `(causal LM, tokenizer)` of the family, random weights, in eval mode.

    Args:
        family (`str`): one of `LLM_FAMILIES`.
        seed (`int`, defaults to 0): seeds the initialisation (the global RNG is left as it was).
        sliding_window (`int`, defaults to `SLIDING_WINDOW`): the window of the sliding families.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_llm_tokenizer(family)
    config = tiny_llm_config(family, tokenizer, sliding_window)
    model = seeded(seed, lambda: AutoModelForCausalLM.from_config(config)).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tiny_image_processor(family: str = "clip", image_size: int | None = None, **overrides):
    """
    The tower's preprocessing: CLIP's (resize the short side, centre crop, OpenAI mean and std) or SigLIP's (resize
    to a square).

    Args:
        family (`str`, defaults to `"clip"`): one of `VISION_FAMILIES`.
        image_size (`int`, *optional*): the tower's input size; defaults to the family's `VISION_IMAGE_SIZE`.
        **overrides: any argument of the family's image processor.
    """
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    _check_family(family, VISION_FAMILIES)
    size = image_size if image_size is not None else VISION_IMAGE_SIZE[family]
    if family == "clip":
        kwargs = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
        return CLIPImageProcessorPil(**{**kwargs, **overrides})
    return SiglipImageProcessorPil(**{"size": {"height": size, "width": size}, **overrides})


def tiny_vision(family: str, seed: int = 0, full: bool = False):
    """
    `(model, image processor)`: a CLIP or SigLIP vision model at the tiny size (`TINY_VISION_SIZES`), random weights,
    in eval mode.

    Args:
        family (`str`): one of `VISION_FAMILIES`.
        seed (`int`, defaults to 0): seeds the initialisation (the global RNG is left as it was).
        full (`bool`, defaults to `False`): build the whole CLIP/SigLIP model (a tiny text tower beside it), whose
            vision part DreamLLM takes.
    """
    from transformers import AutoConfig, AutoModel

    _check_family(family, VISION_FAMILIES)
    vision = dict(image_size=VISION_IMAGE_SIZE[family], **TINY_VISION_SIZES)
    if full:
        text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        text.update(bos_token_id=0, eos_token_id=1, pad_token_id=2)
        config = AutoConfig.for_model(family, text_config=text, vision_config=vision, projection_dim=8)
    else:
        config = AutoConfig.for_model(f"{family}_vision_model", **vision)
    return seeded(seed, lambda: AutoModel.from_config(config)).eval(), tiny_image_processor(family)


def save_tiny_llm(family: str, folder: str | Path, seed: int = 0, sliding_window: int = SLIDING_WINDOW) -> Path:
    """
    Writes `tiny_llm(family, ...)` and its tokenizer to `folder` (a causal LM's `save_pretrained` folder); returns it.

    Args:
        family (`str`): one of `LLM_FAMILIES`.
        folder (`str` or `Path`): where to write it.
        seed (`int`, defaults to 0): seeds the initialisation.
        sliding_window (`int`, defaults to `SLIDING_WINDOW`): the window of the sliding families.
    """
    model, tokenizer = tiny_llm(family, seed, sliding_window)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def save_tiny_vision(family: str, folder: str | Path, seed: int = 0, full: bool = False) -> Path:
    """
    Writes `tiny_vision(family, ...)` and its image processor to `folder`; returns it.

    Args:
        family (`str`): one of `VISION_FAMILIES`.
        folder (`str` or `Path`): where to write it.
        seed (`int`, defaults to 0): seeds the initialisation.
        full (`bool`, defaults to `False`): write the whole CLIP/SigLIP model.
    """
    model, processor = tiny_vision(family, seed, full)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


__all__ = [
    "LLM_FAMILIES",
    "SLIDING_FAMILIES",
    "SLIDING_WINDOW",
    "TINY_LLM_SIZES",
    "TINY_VISION_SIZES",
    "VISION_FAMILIES",
    "VISION_IMAGE_SIZE",
    "save_tiny_llm",
    "save_tiny_vision",
    "tiny_image_processor",
    "tiny_llm",
    "tiny_llm_config",
    "tiny_llm_tokenizer",
    "tiny_vision",
]
