"""Tiny random Stable Diffusion decoders for tests: SD 1.x/2.x-like, SDXL-like and `addition_embed_type="text"`
UNets, a small VAE and a scheduler. Built locally in a fraction of a second, seeded, no download."""

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel


DECODER_KINDS = ("sd", "sdxl", "text")
LATENT_CHANNELS = 4
UNET_SAMPLE_SIZE = 8  # latents 8 x 8: 16 px pictures with the two-block VAE
ADDITION_TIME_EMBED_DIM = 8  # per SDXL time id


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _unet(cross_attention_dim: int, seed: int, **config) -> UNet2DConditionModel:
    kwargs = dict(
        sample_size=UNET_SAMPLE_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=16,
        cross_attention_dim=cross_attention_dim,
    )
    kwargs.update(config)
    return _seeded(lambda: UNet2DConditionModel(**kwargs), seed)


def tiny_sd_unet(cross_attention_dim: int = 32, seed: int = 0, **config) -> UNet2DConditionModel:
    """A Stable Diffusion 1.x/2.x-like UNet (cross-attention only); `config` overrides any UNet argument."""
    return _unet(cross_attention_dim, seed, **config)


def tiny_sdxl_unet(
    cross_attention_dim: int = 32, pooled_projection_dim: int = 16, seed: int = 0, **config
) -> UNet2DConditionModel:
    """An SDXL-like UNet: `addition_embed_type="text_time"`, reading a pooled `text_embeds` of
    `pooled_projection_dim` and six time ids, with linear projections and two transformer layers in its inner block."""
    config = {
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": pooled_projection_dim + 6 * ADDITION_TIME_EMBED_DIM,
        **config,
    }
    return _unet(cross_attention_dim, seed, **config)


def tiny_text_unet(cross_attention_dim: int = 32, seed: int = 0, **config) -> UNet2DConditionModel:
    """A UNet with `addition_embed_type="text"` (it pools `encoder_hidden_states` itself), as the demo model's."""
    config = {"addition_embed_type": "text", "addition_embed_type_num_heads": 4, **config}
    return _unet(cross_attention_dim, seed, **config)


def tiny_unet(kind: str, cross_attention_dim: int = 32, pooled_projection_dim: int = 16, seed: int = 0, **config):
    """`tiny_sd_unet`, `tiny_sdxl_unet` or `tiny_text_unet` by `kind` (one of `DECODER_KINDS`)."""
    if kind == "sd":
        return tiny_sd_unet(cross_attention_dim, seed, **config)
    if kind == "sdxl":
        return tiny_sdxl_unet(cross_attention_dim, pooled_projection_dim, seed, **config)
    if kind == "text":
        return tiny_text_unet(cross_attention_dim, seed, **config)
    raise ValueError(f"Unknown decoder kind {kind!r}; choose one of {', '.join(map(repr, DECODER_KINDS))}.")


def tiny_vae(num_blocks: int = 2, seed: int = 0, **config) -> AutoencoderKL:
    """A VAE with `num_blocks` blocks: `2 ** (num_blocks - 1)` pixels per latent along a side."""
    kwargs = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * num_blocks,
        up_block_types=("UpDecoderBlock2D",) * num_blocks,
        block_out_channels=(16,) * (num_blocks - 1) + (32,),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=UNET_SAMPLE_SIZE * 2 ** (num_blocks - 1),
    )
    kwargs.update(config)
    return _seeded(lambda: AutoencoderKL(**kwargs), seed)


def tiny_scheduler() -> DDPMScheduler:
    """DDPM on SD's schedule (what the original samples and trains with)."""
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


__all__ = [
    "ADDITION_TIME_EMBED_DIM",
    "DECODER_KINDS",
    "tiny_scheduler",
    "tiny_sd_unet",
    "tiny_sdxl_unet",
    "tiny_text_unet",
    "tiny_unet",
    "tiny_vae",
]
