"""DreamLLM configuration: a LLaMA text model, a CLIP vision tower, and the dream-query / diffusion-conditioning glue."""

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


class DreamLLMConfig(PreTrainedConfig):
    r"""
    Configuration of a [`DreamLLMForConditionalGeneration`]. The defaults describe the released DreamLLM-7B
    (`RunpeiDong/dreamllm-7b-chat-v1.0`) exactly.

    Args:
        text_config (`dict` or `LlamaConfig`): the language model (Vicuna-7B v1.1, vocabulary 32008).
        vision_config (`dict` or `CLIPVisionConfig`): the vision tower (CLIP ViT-L/14, 224 px, so 256 image tokens).
        vision_feature_layer (`int`, defaults to -2): which CLIP hidden state feeds the projector (CLS dropped).
        num_dream_queries (`int`, defaults to 64): learned queries placed after every `<dream_start>`.
        cross_attention_dim (`int`, defaults to 1024): size of the diffusion conditioning, i.e. the UNet's
            `cross_attention_dim` (SD 2.1-base), or its `encoder_hid_dim` when the UNet projects its conditioning.
        pooled_projection_dim (`int`, *optional*): size of the pooled conditioning an SDXL-style decoder
            (`addition_embed_type="text_time"`) reads as `text_embeds`, given by a learned `pooled_projector` (mean of the
            query states, then a linear map). `None` (the release, SD 1.x/2.x and `addition_embed_type="text"`): no
            pooled projector, no extra weights.
        image_start_token_id, image_patch_token_id, image_end_token_id, dream_start_token_id, dream_end_token_id,
        image_token_id, dream_token_id (`int`): ids of `<im_start>`, `<im_patch>`, `<im_end>`, `<dream_start>`,
            `<dream_end>` and the text placeholders `<image>`, `<dream>`.
        bos_token_id, eos_token_id, pad_token_id (`int`): 1, 2 and 32000 (the release's `config.json` says 0, 1, -1,
            which is wrong; the converter corrects it).
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

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per picture: one per CLIP patch (CLS dropped), e.g. (224 // 14) ** 2 = 256."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

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


__all__ = ["DreamLLMConfig"]
