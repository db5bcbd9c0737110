"""What a Stable Diffusion decoder asks for besides `encoder_hidden_states`, and whether DreamLLM can give it.

DreamLLM conditions a diffusers `UNet2DConditionModel` with the states of its dream queries. That covers:

* SD 1.x/2.x UNets (any `cross_attention_dim`; or a UNet that projects its conditioning from `encoder_hid_dim`
  with `encoder_hid_dim_type="text_proj"`);
* `addition_embed_type="text"`: the UNet pools `encoder_hidden_states` itself (the demo model's decoder);
* SDXL-style UNets (`addition_embed_type="text_time"`): a pooled `text_embeds` from the model's pooled projector and
  the `time_ids` of the picture size (original size, crop top-left (0, 0), target size), as SDXL samples by default.

Anything else (class labels, image embeddings, guidance embeddings, extra input channels: an inpainting UNet's only
for the inpainting pipeline) is refused with an error that names what is missing. The pipelines and the training loss
read the same functions, so a decoder is conditioned the same way when drawing and when learning. Configs are read as mappings or attributes; no diffusers import.
"""

from typing import Any

import torch


# SDXL's micro-conditioning: original (height, width), crop top-left (top, left), target (height, width).
NUM_TIME_IDS = 6
POOLED_ADDITION_EMBED_TYPE = "text_time"
_IMAGE_ADDITIONS = {
    "text_image": "`image_embeds`",
    "image": "`image_embeds`",
    "image_hint": "`image_embeds` and `hint`",
}
_IMAGE_PROJECTIONS = ("text_image_proj", "image_proj", "ip_image_proj")


def _get(config, name: str, default=None):
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent along a side: 2 per downsampling block of the VAE (8 for SD and SDXL)."""
    return 2 ** (len(_get(vae_config, "block_out_channels")) - 1)


def takes_pooled(unet_config) -> bool:
    """Whether the UNet reads a pooled `text_embeds` and `time_ids` (SDXL-style)."""
    return _get(unet_config, "addition_embed_type") == POOLED_ADDITION_EMBED_TYPE


def conditioning_width(unet_config) -> tuple[int | None, str]:
    """The width of `encoder_hidden_states` the UNet reads, and which config field says so (`None` when its blocks
    attend to different widths and nothing projects one width to all of them)."""
    encoder_hid_dim = _get(unet_config, "encoder_hid_dim")
    if encoder_hid_dim is not None and _get(unet_config, "encoder_hid_dim_type") in (None, "text_proj"):
        return encoder_hid_dim, "encoder_hid_dim, projected by its `text_proj`"
    width = _get(unet_config, "cross_attention_dim")
    if isinstance(width, (list, tuple)):
        return (width[0] if len(set(width)) == 1 else None), "cross_attention_dim"
    return width, "cross_attention_dim"


def pooled_width(unet_config) -> int | None:
    """The size of the pooled `text_embeds` an SDXL-style UNet reads: `projection_class_embeddings_input_dim` less
    the six time ids of `addition_time_embed_dim` each (SDXL base: 2816 - 6 x 256 = 1280). `None` for other UNets."""
    if not takes_pooled(unet_config):
        return None
    total = _get(unet_config, "projection_class_embeddings_input_dim")
    time_dim = _get(unet_config, "addition_time_embed_dim")
    if total is None or time_dim is None:
        return None
    return total - NUM_TIME_IDS * time_dim


def inpainting_channels(vae_config) -> int:
    """The input channels of an inpainting UNet on this VAE's latents: the noisy latents, the mask and the masked
    picture's latents (9 for Stable Diffusion)."""
    return 2 * _get(vae_config, "latent_channels") + 1


def decoder_problems(unet_config, mllm_config, vae_config=None, inpainting: bool = False) -> list[str]:
    """Every reason why DreamLLM (`mllm_config`, a `DreamLLMConfig`) cannot condition this UNet; empty when it can.
    `inpainting=True` (the inpainting pipeline) also accepts an inpainting UNet (`inpainting_channels` inputs)."""
    problems = []
    class_embed_type, num_class_embeds = _get(unet_config, "class_embed_type"), _get(unet_config, "num_class_embeds")
    if class_embed_type is not None or num_class_embeds is not None:
        problems.append(
            f"it needs `class_labels` (class_embed_type={class_embed_type!r}, num_class_embeds={num_class_embeds!r})"
        )
    addition = _get(unet_config, "addition_embed_type")
    if addition in _IMAGE_ADDITIONS:
        problems.append(f"addition_embed_type={addition!r} needs {_IMAGE_ADDITIONS[addition]} in `added_cond_kwargs`")
    hid_type = _get(unet_config, "encoder_hid_dim_type")
    if hid_type in _IMAGE_PROJECTIONS:
        problems.append(f"encoder_hid_dim_type={hid_type!r} needs `image_embeds` in `added_cond_kwargs`")
    time_cond_proj_dim = _get(unet_config, "time_cond_proj_dim")
    if time_cond_proj_dim is not None:
        problems.append(
            f"time_cond_proj_dim={time_cond_proj_dim} needs a guidance embedding (`timestep_cond`, a guidance-distilled "
            "decoder such as LCM), while DreamLLM samples and trains with classifier-free guidance"
        )
    in_channels = _get(unet_config, "in_channels")
    if vae_config is not None and in_channels != _get(vae_config, "latent_channels"):
        if not (inpainting and in_channels == inpainting_channels(vae_config)):
            problems.append(
                f"it takes {in_channels} input channels but the VAE gives {_get(vae_config, 'latent_channels')}-"
                "channel latents (an image-conditioned UNet needs inputs DreamLLM does not give; an inpainting UNet, "
                f"{inpainting_channels(vae_config)} channels, draws with `DreamLLMInpaintPipeline`)"
            )

    width, source = conditioning_width(unet_config)
    given = mllm_config.cross_attention_dim
    if width is None:
        problems.append(
            f"its blocks attend to conditionings of different widths (cross_attention_dim="
            f"{list(_get(unet_config, 'cross_attention_dim'))}) and DreamLLM gives one; set `encoder_hid_dim` "
            "(a `text_proj` projection) or use one width"
        )
    elif hid_type not in _IMAGE_PROJECTIONS and width != given:
        problems.append(
            f"it takes {width}-dim conditioning ({source}) but the DreamLLM model gives {given}-dim dream embeddings "
            f"(`cross_attention_dim` of its config, the condition projector's output); build the DreamLLM with "
            f"cross_attention_dim={width}, or use a decoder for {given}"
        )

    pooled_given = getattr(mllm_config, "pooled_projection_dim", None)
    if takes_pooled(unet_config):
        pooled = pooled_width(unet_config)
        total = _get(unet_config, "projection_class_embeddings_input_dim")
        time_dim = _get(unet_config, "addition_time_embed_dim")
        how = (
            f"projection_class_embeddings_input_dim {total} less {NUM_TIME_IDS} time ids x addition_time_embed_dim "
            f"{time_dim}"
        )
        if pooled is None or pooled <= 0:
            problems.append(
                f"addition_embed_type='text_time' needs `projection_class_embeddings_input_dim` and "
                f"`addition_time_embed_dim` that leave room for a pooled `text_embeds` and {NUM_TIME_IDS} time ids "
                f"(original size, crop top-left, target size), got {total} and {time_dim}"
            )
        elif pooled_given is None:
            problems.append(
                f"addition_embed_type='text_time' (SDXL) reads a pooled `text_embeds` of size {pooled} ({how}), but "
                f"the DreamLLM config has no `pooled_projection_dim`; set pooled_projection_dim={pooled} (a learned "
                "pooled projector of the dream queries)"
            )
        elif pooled != pooled_given:
            problems.append(
                f"addition_embed_type='text_time' (SDXL) reads a pooled `text_embeds` of size {pooled} ({how}), but "
                f"the DreamLLM's pooled projector gives {pooled_given} (`pooled_projection_dim`)"
            )
    elif pooled_given is not None:
        problems.append(
            f"the DreamLLM has a pooled projector (pooled_projection_dim={pooled_given}) but the UNet reads no pooled "
            f"`text_embeds` (addition_embed_type={addition!r}); use an SDXL-style UNet (addition_embed_type="
            "'text_time') or a DreamLLM config without `pooled_projection_dim`"
        )
    return problems


def check_decoder(unet_config, mllm_config, vae_config=None, inpainting: bool = False) -> None:
    """Raises a `ValueError` listing every reason why DreamLLM cannot condition this UNet (see `decoder_problems`)."""
    problems = decoder_problems(unet_config, mllm_config, vae_config, inpainting=inpainting)
    if problems:
        raise ValueError(
            "This diffusion decoder cannot be conditioned by this DreamLLM model: "
            + "; ".join(problems)
            + ". DreamLLM gives `encoder_hidden_states` (its dream queries) and, for SDXL-style UNets "
            "(addition_embed_type='text_time'), a pooled `text_embeds` and the `time_ids` of the picture size."
        )


def time_ids(height: int, width: int, rows: int, device=None, dtype=None) -> torch.Tensor:
    """SDXL's `time_ids` of a picture drawn or learned at `height` x `width`, uncropped: `(rows, 6)`."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
    return ids.repeat(rows, 1)


def added_cond_kwargs(
    unet_config, pooled_embeddings: torch.Tensor | None, height: int, width: int
) -> dict[str, Any] | None:
    """
    The UNet's `added_cond_kwargs` for pictures of `height` x `width` pixels: `{"text_embeds", "time_ids"}` for an
    SDXL-style UNet (`pooled_embeddings` `(rows, pooled_projection_dim)`, one row per UNet input row), `None` for the
    others (they read `encoder_hidden_states` only).
    """
    if not takes_pooled(unet_config):
        return None
    if pooled_embeddings is None:
        raise ValueError(
            "The UNet (addition_embed_type='text_time', SDXL) reads a pooled `text_embeds`, but none was given: the "
            "DreamLLM model needs a pooled projector (`pooled_projection_dim` in its config)."
        )
    rows = pooled_embeddings.shape[0]
    return {
        "text_embeds": pooled_embeddings,
        "time_ids": time_ids(height, width, rows, pooled_embeddings.device, pooled_embeddings.dtype),
    }


__all__ = [
    "NUM_TIME_IDS",
    "added_cond_kwargs",
    "check_decoder",
    "conditioning_width",
    "decoder_problems",
    "inpainting_channels",
    "pooled_width",
    "takes_pooled",
    "time_ids",
    "vae_scale_factor",
]
