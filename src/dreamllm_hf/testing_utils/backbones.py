"""Tiny random backbones of every family DreamLLM can be built from, made locally (no download), seeded.

* LLMs: Llama (3-style tokens and chat), Qwen2 (no BOS, ChatML, tied embeddings, a vocabulary larger than its
  tokenizer), Mistral (sliding window, `[INST]` chat), Gemma 2 and Gemma 3 (sliding and full layers, scaled
  embeddings, tied embeddings; Gemma 2's logit soft-capping), each with a byte-level BPE tokenizer trained here on a
  few sentences and a chat template in its family's format. Hidden size 32, 2 layers, grouped-query attention.
* Vision towers: CLIP (28 px, patch 14: 4 patches and a CLS token) and SigLIP (42 px, patch 14: 9 patches, no CLS),
  with their image processors, as vision models or as the vision part of a full CLIP/SigLIP model.
* A Stable Diffusion-like decoder: a 2-level cross-attention UNet on 8x8 latents, a 2-level VAE (16 px pictures) and
  DDPM.

`save_*` write each as the `save_pretrained` folder `dreamllm-hf init` reads.
"""

from functools import cache
from pathlib import Path

import torch


LLM_FAMILIES = ("llama", "qwen2", "mistral", "gemma2", "gemma3")
VISION_FAMILIES = ("clip", "siglip")
SLIDING_FAMILIES = ("mistral", "gemma2", "gemma3")
SLIDING_WINDOW = 12  # smaller than any document the tests write, so that the window is always exceeded
TINY_LLM = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
VISION_IMAGE_SIZE = {"clip": 28, "siglip": 42}
CROSS_ATTENTION_DIM = 24
LATENT_SIZE = 8

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
        raise ValueError(f"Unknown family {family!r}; choose one of {', '.join(families)}.")


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


def tiny_tokenizer(family: str):
    """The family's tokenizer: the corpus BPE with the family's special tokens and chat template."""
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
    """The family's config at the tiny size, its special ids from `tokenizer`."""
    from transformers import AutoConfig

    _check_family(family, LLM_FAMILIES)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    ids["pad_token_id"] = tokenizer.pad_token_id
    vocab_size = len(tokenizer)
    if family == "llama":
        return AutoConfig.for_model("llama", vocab_size=vocab_size, tie_word_embeddings=False, **ids, **TINY_LLM)
    if family == "qwen2":
        return AutoConfig.for_model(
            "qwen2", vocab_size=vocab_size + _QWEN_SPARE_ROWS, tie_word_embeddings=True, **ids, **TINY_LLM
        )
    sliding = dict(head_dim=8, sliding_window=sliding_window)
    if family == "mistral":
        return AutoConfig.for_model("mistral", vocab_size=vocab_size, **sliding, **ids, **TINY_LLM)
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
            **TINY_LLM,
        )
    return AutoConfig.for_model(
        "gemma3_text",
        vocab_size=vocab_size,
        layer_types=layer_types,
        query_pre_attn_scalar=8,
        **sliding,
        **ids,
        **TINY_LLM,
    )


def tiny_llm(family: str, seed: int = 0, sliding_window: int = SLIDING_WINDOW):
    """`(causal LM, tokenizer)` of the family, random weights from `seed`, in eval mode."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer(family)
    config = tiny_llm_config(family, tokenizer, sliding_window)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tiny_vision(family: str, seed: int = 0, full: bool = False):
    """`(model, image processor)`: a CLIP or SigLIP vision model, or with `full=True` the whole CLIP/SigLIP model
    (a tiny text tower beside it) whose vision part DreamLLM takes."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    _check_family(family, VISION_FAMILIES)
    size = VISION_IMAGE_SIZE[family]
    vision = dict(image_size=size, **TINY_VISION)
    if family == "clip":
        processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    else:
        processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    if full:
        text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        text.update(bos_token_id=0, eos_token_id=1, pad_token_id=2)
        config = AutoConfig.for_model(family, text_config=text, vision_config=vision, projection_dim=8)
    else:
        config = AutoConfig.for_model(f"{family}_vision_model", **vision)
    torch.manual_seed(seed)
    return AutoModel.from_config(config).eval(), processor


def tiny_sd_unet(cross_attention_dim: int = CROSS_ATTENTION_DIM):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def tiny_diffusion(seed: int = 0, cross_attention_dim: int = CROSS_ATTENTION_DIM) -> dict:
    """`{"unet", "vae", "scheduler"}` of a Stable Diffusion-like decoder: 16 px pictures, 8x8x4 latents."""
    from diffusers import AutoencoderKL, DDPMScheduler

    torch.manual_seed(seed)
    unet = tiny_sd_unet(cross_attention_dim)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=2 * LATENT_SIZE,
    )
    return {"unet": unet.eval(), "vae": vae.eval(), "scheduler": DDPMScheduler(num_train_timesteps=1000)}


def save_tiny_llm(family: str, folder: str | Path, seed: int = 0, sliding_window: int = SLIDING_WINDOW) -> Path:
    model, tokenizer = tiny_llm(family, seed, sliding_window)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def save_tiny_vision(family: str, folder: str | Path, seed: int = 0, full: bool = False) -> Path:
    model, processor = tiny_vision(family, seed, full)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def save_tiny_diffusion(folder: str | Path, seed: int = 0, cross_attention_dim: int = CROSS_ATTENTION_DIM) -> Path:
    """The decoder as a diffusers pipeline folder would hold it (`unet/`, `vae/`, `scheduler/`)."""
    folder = Path(folder)
    for name, part in tiny_diffusion(seed, cross_attention_dim).items():
        part.save_pretrained(folder / name) if name != "scheduler" else part.save_config(folder / name)
    return folder


__all__ = [
    "CROSS_ATTENTION_DIM",
    "LLM_FAMILIES",
    "SLIDING_FAMILIES",
    "SLIDING_WINDOW",
    "VISION_FAMILIES",
    "save_tiny_diffusion",
    "save_tiny_llm",
    "save_tiny_vision",
    "tiny_diffusion",
    "tiny_llm",
    "tiny_llm_config",
    "tiny_sd_unet",
    "tiny_tokenizer",
    "tiny_vision",
]
