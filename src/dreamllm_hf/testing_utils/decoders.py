"""Tiny random Stable Diffusion decoders, built locally (no download), seeded, in a fraction of a second: one UNet
builder for the three kinds DreamLLM conditions (`tiny_unet(kind)`: SD 1.x/2.x-like cross-attention only, SDXL-like
`addition_embed_type="text_time"`, and the demo model's `addition_embed_type="text"`), one VAE builder (any number of
blocks) and the release's scheduler; `tiny_diffusion` / `save_tiny_diffusion` put the three together as a diffusers
pipeline folder holds them (what `dreamllm-hf init --diffusion` reads).

The default sizes: a two-level UNet on 4 x 8 x 8 latents, a two-block VAE (16 px pictures, factor 2).
"""

from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from ..conversion.original_layout import KNOWN_DIFFUSION_IDS
from ..decoder_conditioning import NUM_TIME_IDS
from ._seeding import seeded


DECODER_KINDS = ("sd", "sdxl", "text")
TINY_CROSS_ATTENTION_DIM = 8  # the width of the dream embeddings the UNet reads (`DreamLLMConfig.cross_attention_dim`)
TINY_POOLED_PROJECTION_DIM = 16  # an SDXL-like UNet's pooled `text_embeds`
ADDITION_TIME_EMBED_DIM = 8  # per SDXL time id
TINY_LATENT_CHANNELS = 4
TINY_LATENT_SIZE = 8  # the UNet's sample size; pictures are this times the VAE factor

# The UNet's arguments of each kind beyond the SD-like base.
_KIND_ARGUMENTS = {
    "sd": {},
    "sdxl": {
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
    },
    "text": {"addition_embed_type": "text", "addition_embed_type_num_heads": 4},
}


def tiny_unet(
    kind: str = "sd",
    *,
    cross_attention_dim: int = TINY_CROSS_ATTENTION_DIM,
    pooled_projection_dim: int | None = None,
    seed: int = 0,
    **overrides,
):
    """
    A two-level `UNet2DConditionModel` on `TINY_LATENT_SIZE` latents, cross-attending to the dream embeddings, in
    eval mode.

    Args:
        kind (`str`, defaults to `"sd"`): one of `DECODER_KINDS`: `"sd"` (Stable Diffusion 1.x/2.x-like:
            cross-attention only), `"sdxl"` (SDXL-like: `addition_embed_type="text_time"`, reading a pooled
            `text_embeds` and six time ids; two transformer layers in its inner blocks) or `"text"`
            (`addition_embed_type="text"`: it pools `encoder_hidden_states` itself, as the demo model's UNet).
        cross_attention_dim (`int`, defaults to `TINY_CROSS_ATTENTION_DIM`): the width of the conditioning.
        pooled_projection_dim (`int`, *optional*): the width of the pooled `text_embeds` an `"sdxl"` UNet reads;
            defaults to `TINY_POOLED_PROJECTION_DIM` there. Only `"sdxl"` takes it.
        seed (`int`, defaults to 0): seeds the initialisation (the global RNG is left as it was).
        **overrides: any `UNet2DConditionModel` argument.
    """
    if kind not in DECODER_KINDS:
        raise ValueError(f"Unknown `kind` {kind!r}; choose one of {', '.join(map(repr, DECODER_KINDS))}.")
    kwargs = {
        "sample_size": TINY_LATENT_SIZE,
        "in_channels": TINY_LATENT_CHANNELS,
        "out_channels": TINY_LATENT_CHANNELS,
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": (2, 4),
        "norm_num_groups": 8,
        "use_linear_projection": True,
        "cross_attention_dim": cross_attention_dim,
        **_KIND_ARGUMENTS[kind],
    }
    if kind == "sdxl":
        pooled = pooled_projection_dim if pooled_projection_dim is not None else TINY_POOLED_PROJECTION_DIM
        kwargs["projection_class_embeddings_input_dim"] = pooled + NUM_TIME_IDS * ADDITION_TIME_EMBED_DIM
    elif pooled_projection_dim is not None:
        raise ValueError(
            f"`pooled_projection_dim` is {pooled_projection_dim}, but a {kind!r} UNet reads no pooled embeddings; "
            "give it only with kind='sdxl'."
        )
    kwargs.update(overrides)
    return seeded(seed, lambda: UNet2DConditionModel(**kwargs)).eval()


def tiny_vae(num_blocks: int = 2, seed: int = 0, **overrides):
    """
    An `AutoencoderKL` with `num_blocks` blocks between pictures and `TINY_LATENT_CHANNELS`-channel latents: the VAE
    factor is `2 ** (num_blocks - 1)`, and its sample size makes `TINY_LATENT_SIZE` latents. In eval mode.

    Args:
        num_blocks (`int`, defaults to 2): encoder (and decoder) blocks; 2 draws 16 px pictures, 3 draws 32 px.
        seed (`int`, defaults to 0): seeds the initialisation (the global RNG is left as it was).
        **overrides: any `AutoencoderKL` argument.
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"`num_blocks` must be a positive int; got {num_blocks!r}.")
    kwargs = {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (16,) * (num_blocks - 1) + (32,),
        "down_block_types": ("DownEncoderBlock2D",) * num_blocks,
        "up_block_types": ("UpDecoderBlock2D",) * num_blocks,
        "layers_per_block": 1,
        "latent_channels": TINY_LATENT_CHANNELS,
        "norm_num_groups": 8,
        "sample_size": TINY_LATENT_SIZE * 2 ** (num_blocks - 1),
        **overrides,
    }
    return seeded(seed, lambda: AutoencoderKL(**kwargs)).eval()


def tiny_scheduler(**overrides):
    """
    The release's sampler: `DDPMScheduler` on Stable Diffusion 2.1-base's schedule (the converter's scheduler).

    Args:
        **overrides: any `DDPMScheduler` config entry.
    """
    folder = KNOWN_DIFFUSION_IDS["stabilityai/stable-diffusion-2-1-base"] / "scheduler"
    return DDPMScheduler.from_config(DDPMScheduler.load_config(folder), **overrides)


def tiny_diffusion(
    kind: str = "sd",
    *,
    cross_attention_dim: int = TINY_CROSS_ATTENTION_DIM,
    pooled_projection_dim: int | None = None,
    num_vae_blocks: int = 2,
    seed: int = 0,
) -> dict:
    """
    `{"unet", "vae", "scheduler"}` of a Stable Diffusion-like decoder, from `tiny_unet`, `tiny_vae` and
    `tiny_scheduler`.

    Args:
        kind (`str`, defaults to `"sd"`): the UNet's kind, one of `DECODER_KINDS`.
        cross_attention_dim (`int`, defaults to `TINY_CROSS_ATTENTION_DIM`): the UNet's conditioning width.
        pooled_projection_dim (`int`, *optional*): the pooled width of an `"sdxl"` UNet.
        num_vae_blocks (`int`, defaults to 2): the VAE's blocks.
        seed (`int`, defaults to 0): seeds the UNet and the VAE.
    """
    unet = tiny_unet(
        kind, cross_attention_dim=cross_attention_dim, pooled_projection_dim=pooled_projection_dim, seed=seed
    )
    return {"unet": unet, "vae": tiny_vae(num_vae_blocks, seed=seed), "scheduler": tiny_scheduler()}


def save_tiny_diffusion(folder: str | Path, **kwargs) -> Path:
    """
    Writes `tiny_diffusion(**kwargs)` as a diffusers pipeline folder holds it (`unet/`, `vae/`, `scheduler/`);
    returns the folder.

    Args:
        folder (`str` or `Path`): where to write it.
        **kwargs: passed to `tiny_diffusion`.
    """
    folder = Path(folder)
    for name, part in tiny_diffusion(**kwargs).items():
        part.save_pretrained(folder / name)
    return folder


__all__ = [
    "ADDITION_TIME_EMBED_DIM",
    "DECODER_KINDS",
    "TINY_CROSS_ATTENTION_DIM",
    "TINY_LATENT_CHANNELS",
    "TINY_LATENT_SIZE",
    "TINY_POOLED_PROJECTION_DIM",
    "save_tiny_diffusion",
    "tiny_diffusion",
    "tiny_scheduler",
    "tiny_unet",
    "tiny_vae",
]
