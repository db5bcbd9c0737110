"""DreamLLM configuration: a text model, a vision tower, and the dream-query / diffusion-conditioning glue.

The defaults are the release (LLaMA, CLIP ViT-L/14); `text_config` may be any decoder-only LLM that `AutoModel` builds
(Llama, Qwen2/3, Mistral, Gemma 2/3, ...) and `vision_config` a CLIP or SigLIP vision tower.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .. import constants as C


# The released 7B model: Vicuna-7B v1.1 (LLaMA-1 shapes) with 8 added tokens, and CLIP ViT-L/14 at 224 px.
VICUNA_7B_TEXT_CONFIG = {
    "vocab_size": C.RELEASE_VOCAB_SIZE,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": C.RELEASE_BOS_TOKEN_ID,
    "eos_token_id": C.RELEASE_EOS_TOKEN_ID,
    "pad_token_id": C.RELEASE_ADDED_TOKEN_IDS[C.PAD_TOKEN],
}
CLIP_VIT_L_14_VISION_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
SD21_BASE_CROSS_ATTENTION_DIM = 1024
# The config field that holds each token's id: the sequence tokens, then the format's.
TOKEN_ID_FIELDS = {
    C.BOS_TOKEN: "bos_token_id",
    C.EOS_TOKEN: "eos_token_id",
    C.PAD_TOKEN: "pad_token_id",
    C.IMAGE_START_TOKEN: "image_start_token_id",
    C.IMAGE_PATCH_TOKEN: "image_patch_token_id",
    C.IMAGE_END_TOKEN: "image_end_token_id",
    C.DREAM_START_TOKEN: "dream_start_token_id",
    C.DREAM_END_TOKEN: "dream_end_token_id",
    C.IMAGE_PLACEHOLDER: "image_token_id",
    C.DREAM_PLACEHOLDER: "dream_token_id",
}
SEQUENCE_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # the tokenizer's attributes of these names


def token_ids_from_tokenizer(tokenizer) -> dict[str, int | None]:
    """
    The token-id arguments of a [`DreamLLMConfig`] as `tokenizer` has them: the format's tokens wherever they landed in
    its vocabulary, and its own beginning (`None` for an LLM without one), end of sequence and padding.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): a tokenizer holding the DreamLLM format's tokens.
    """
    vocab = tokenizer.get_vocab()
    format_fields = {token: field for token, field in TOKEN_ID_FIELDS.items() if field not in SEQUENCE_TOKEN_FIELDS}
    missing = [token for token in format_fields if token not in vocab]
    if missing:
        raise ValueError(
            f"The tokenizer lacks the DreamLLM tokens {missing}; add them first (`dreamllm-hf init` does)."
        )
    ids = {field: vocab[token] for token, field in format_fields.items()}
    ids.update({field: getattr(tokenizer, field) for field in SEQUENCE_TOKEN_FIELDS})
    return ids


class DreamLLMConfig(PreTrainedConfig):
    r"""
    Configuration of a [`DreamLLMForConditionalGeneration`]. The defaults describe the released DreamLLM-7B
    (`RunpeiDong/dreamllm-7b-chat-v1.0`) exactly.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The language model, any decoder-only LLM (by default Vicuna-7B v1.1: LLaMA, vocabulary 32008).
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            The vision tower, CLIP or SigLIP (by default CLIP ViT-L/14 at 224 px, so 256 image tokens).
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Which of the tower's hidden states (numbered as `output_hidden_states` numbers them: 0 is the patch
            embedding, -1 the last layer) feeds the image projector, its patch tokens only (CLIP's CLS token is
            dropped). The tower runs its own forward, keeping only this hidden state.
        num_dream_queries (`int`, *optional*, defaults to 64):
            Learned queries placed after every `<dream_start>`.
        cross_attention_dim (`int`, *optional*, defaults to 1024):
            Size of the diffusion conditioning: the UNet's `cross_attention_dim` (SD 2.1-base), or its
            `encoder_hid_dim` when the UNet projects its conditioning.
        pooled_projection_dim (`int`, *optional*, defaults to `None`):
            Size of the pooled conditioning an SDXL-style decoder (`addition_embed_type="text_time"`) reads as
            `text_embeds`, given by a learned `pooled_projector` (mean of the query states, then a linear map). `None`
            (the release, SD 1.x/2.x and `addition_embed_type="text"`): no pooled projector, no extra weights.
        image_start_token_id (`int`, *optional*, defaults to 32001):
            Id of `<im_start>`, which opens an image block.
        image_patch_token_id (`int`, *optional*, defaults to 32004):
            Id of `<im_patch>`, the slot token of image blocks and dream blocks alike.
        image_end_token_id (`int`, *optional*, defaults to 32005):
            Id of `<im_end>`, which closes an image block.
        dream_start_token_id (`int`, *optional*, defaults to 32003):
            Id of `<dream_start>`, which opens a dream block; the model emits it to ask for a picture.
        dream_end_token_id (`int`, *optional*, defaults to 32002):
            Id of `<dream_end>`, which closes a dream block.
        image_token_id (`int`, *optional*, defaults to 32006):
            Id of the text placeholder `<image>`, which the processor expands into an image block.
        dream_token_id (`int`, *optional*, defaults to 32007):
            Id of the text placeholder `<dream>`, which the processor expands into a dream block and an image block.
        bos_token_id (`int`, *optional*, defaults to 1):
            Id of `<s>` (the release's `config.json` says 0, which is wrong; the converter corrects it). `None` for an
            LLM without one (Qwen).
        eos_token_id (`int`, *optional*, defaults to 2):
            Id of `</s>` (the release's `config.json` says 1).
        pad_token_id (`int`, *optional*, defaults to 32000):
            Id of `[PAD]` (the release's `config.json` says -1).
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether `lm_head` shares the input embeddings' weight (it does not in LLaMA-1 / Vicuna). Follows
            `text_config`: an LLM that ties them (Gemma, Qwen2.5-0.5B) keeps them tied.
    """

    model_type = "dreamllm"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs=VICUNA_7B_TEXT_CONFIG),
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_VIT_L_14_VISION_CONFIG
        ),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    vision_feature_layer: int = -2
    num_dream_queries: int = C.NUM_DREAM_QUERIES
    cross_attention_dim: int = SD21_BASE_CROSS_ATTENTION_DIM
    pooled_projection_dim: int | None = None
    image_start_token_id: int = C.RELEASE_ADDED_TOKEN_IDS[C.IMAGE_START_TOKEN]
    image_patch_token_id: int = C.RELEASE_ADDED_TOKEN_IDS[C.IMAGE_PATCH_TOKEN]
    image_end_token_id: int = C.RELEASE_ADDED_TOKEN_IDS[C.IMAGE_END_TOKEN]
    dream_start_token_id: int = C.RELEASE_ADDED_TOKEN_IDS[C.DREAM_START_TOKEN]
    dream_end_token_id: int = C.RELEASE_ADDED_TOKEN_IDS[C.DREAM_END_TOKEN]
    image_token_id: int = C.RELEASE_ADDED_TOKEN_IDS[C.IMAGE_PLACEHOLDER]
    dream_token_id: int = C.RELEASE_ADDED_TOKEN_IDS[C.DREAM_PLACEHOLDER]
    bos_token_id: int | None = C.RELEASE_BOS_TOKEN_ID
    eos_token_id: int | None = C.RELEASE_EOS_TOKEN_ID
    pad_token_id: int | None = C.RELEASE_ADDED_TOKEN_IDS[C.PAD_TOKEN]
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # As Llava: an LLM that ties its output embeddings to its input embeddings says so in its own config.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        num_layers = getattr(self.vision_config, "num_hidden_layers", None)
        if num_layers is not None and not -(num_layers + 1) <= self.vision_feature_layer <= num_layers:
            raise ValueError(
                f"`vision_feature_layer` is {self.vision_feature_layer}, but the vision tower has {num_layers} layers: "
                f"give a hidden-state index from {-(num_layers + 1)} to {num_layers} (0 is the patch embedding, -1 "
                "the last layer)."
            )

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per picture: one per patch of the vision tower, e.g. (224 // 14) ** 2 = 256 for CLIP ViT-L/14
        (its CLS token is not one) or (384 // 14) ** 2 = 729 for SigLIP at 384 px."""
        vision = self.vision_config
        if getattr(vision, "image_size", None) is None or getattr(vision, "patch_size", None) is None:
            raise ValueError(
                f"The vision config ({vision.model_type}) has no `image_size` and `patch_size` to count its patches; "
                "DreamLLM takes ViT towers with a fixed input size (CLIP, SigLIP)."
            )
        return (vision.image_size // vision.patch_size) ** 2

    @property
    def special_token_ids(self) -> dict[str, int]:
        """Every special token string of the DreamLLM format mapped to its id in this model."""
        return {
            C.BOS_TOKEN: self.bos_token_id,
            C.EOS_TOKEN: self.eos_token_id,
            C.PAD_TOKEN: self.pad_token_id,
            C.IMAGE_START_TOKEN: self.image_start_token_id,
            C.IMAGE_PATCH_TOKEN: self.image_patch_token_id,
            C.IMAGE_END_TOKEN: self.image_end_token_id,
            C.DREAM_START_TOKEN: self.dream_start_token_id,
            C.DREAM_END_TOKEN: self.dream_end_token_id,
            C.IMAGE_PLACEHOLDER: self.image_token_id,
            C.DREAM_PLACEHOLDER: self.dream_token_id,
        }


__all__ = ["TOKEN_ID_FIELDS", "DreamLLMConfig", "token_ids_from_tokenizer"]
