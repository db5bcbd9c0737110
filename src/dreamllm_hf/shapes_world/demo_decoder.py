"""Stage 0 of the demo recipe: the decoder the original takes pretrained, trained in the recipe's own small loop.

* **0a, the autoencoder.** A small `AutoencoderKL`, the world's pictures -> 4x8x8 latents (L1 + L2 reconstruction, a
  very small KL weight); its `scaling_factor` is set so that the latents have unit variance.
* **0b, the diffusion decoder, pretrained with a stand-in caption encoder.** Stable Diffusion learned to listen to its
  text encoder before DreamLLM ever spoke to it; here a throw-away caption encoder (`StandInCaptionEncoder`) plays
  CLIP-text's part, with caption dropout so that an empty caption means "any picture". The UNet learns with the
  trainer's own `diffusion_loss`; only the optimisation loop is the recipe's (the trainer trains DreamLLMs, and this
  stage has none yet). Two choices make the UNet follow the caption within a few hundred steps (measured: with
  epsilon prediction the pictures followed their noise seed, not the caption): **v-prediction** on a zero-terminal-SNR
  cosine schedule, and the stock UNet's `addition_embed_type="text"` pooled conditioning next to its cross-attention
  (both read only `encoder_hidden_states`, i.e. the dream embeddings later).
"""

import json
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from .demo_checks import reconstruction_accuracy
from .demo_recipe import CROSS_ATTENTION_DIM, DemoRecipe, demo_noise_scheduler, demo_unet, demo_vae
from .demo_worlds import FIRST_WORLD, DemoWorld


class StandInCaptionEncoder(nn.Module):
    """Stage 0b's throw-away text encoder: token + position embeddings of the caption, padded to `length` with the pad
    token (an all-pad input is the unconditional), then `num_layers` small transformer layers, so that each word knows
    which thing it belongs to. Plays the part of SD's CLIP text encoder; it is not shipped."""

    def __init__(self, vocab_size: int, length: int, dim: int, pad_token_id: int, num_layers: int = 0):
        super().__init__()
        self.length, self.pad_token_id = length, pad_token_id
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False) if num_layers else None

    def forward(self, token_ids: torch.LongTensor) -> torch.Tensor:
        states = self.tokens(token_ids) + self.positions
        return self.layers(states) if self.layers is not None else states

    def encode(self, tokenizer, captions: list[str]) -> torch.LongTensor:
        rows = []
        for caption in captions:
            ids = tokenizer(caption, add_special_tokens=False)["input_ids"][: self.length] if caption else []
            rows.append(ids + [self.pad_token_id] * (self.length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


def _schedule(optimizer, steps: int, warmup_fraction: float):
    warmup = max(1, int(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _run_steps(
    name: str,
    parameters: list[nn.Parameter],
    steps: int,
    lr: float,
    loss_fn: Callable[[int], dict],
    warmup_fraction: float,
    log: Callable[[str], None],
    log_every: int = 50,
) -> list[dict]:
    """AdamW + warmup/cosine + gradient clipping; `loss_fn(step)` returns a dict with the `loss` tensor."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    scheduler = _schedule(optimizer, steps, warmup_fraction)
    history, started, sums, count = [], time.perf_counter(), {}, 0
    for step in range(steps):
        values = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        values["loss"].backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        count += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            record = {"stage": name, "step": step + 1, **{k: round(v / count, 5) for k, v in sums.items()}}
            record["elapsed_s"] = round(time.perf_counter() - started, 1)
            history.append(record)
            log(json.dumps(record))
            sums, count = {}, 0
    return history


def train_autoencoder(
    pictures: torch.Tensor, recipe: DemoRecipe, log, world: DemoWorld = FIRST_WORLD
) -> tuple[nn.Module, list[dict]]:
    """Stage 0a. Returns the VAE (eval mode) with `scaling_factor` set to 1 / std of the latent means, and the stage's
    history (its logged steps and its check)."""
    vae = demo_vae(world)
    generator = torch.Generator().manual_seed(recipe.seed)

    def loss_fn(step):
        index = torch.randint(0, len(pictures), (recipe.vae_batch_size,), generator=generator)
        batch = pictures[index]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        l1 = (reconstruction - batch).abs().mean()
        l2 = (reconstruction - batch).pow(2).mean()
        kl = posterior.kl().mean()
        return {"loss": l1 + l2 + recipe.vae_kl_weight * kl, "l1": l1.detach(), "kl": kl.detach()}

    vae.train()
    history = _run_steps(
        "0a-autoencoder", list(vae.parameters()), recipe.vae_steps, recipe.vae_lr, loss_fn, recipe.warmup_fraction, log
    )
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pictures.split(256)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    vae.requires_grad_(False)
    history.append(
        {
            "stage": "0a-autoencoder",
            "check": "reconstruction_accuracy",
            "value": reconstruction_accuracy(vae, world),
        }
    )
    log(json.dumps(history[-1]))
    return vae, history


def train_diffusion_decoder(
    vae,
    pictures: torch.Tensor,
    captions: list[str],
    tokenizer,
    recipe: DemoRecipe,
    log,
    world: DemoWorld = FIRST_WORLD,
) -> tuple[nn.Module, StandInCaptionEncoder, list[dict]]:
    """Stage 0b: the UNet learns to draw a caption from the stand-in encoder (v-prediction, caption dropout). Returns
    the UNet (eval mode, frozen), the stand-in encoder (what `demo_checks.stand_in_drawing_checks` draws from) and the
    stage's logged steps."""
    from ..training.losses import diffusion_loss

    unet, noise_scheduler = demo_unet(world), demo_noise_scheduler()
    encoder = StandInCaptionEncoder(
        len(tokenizer),
        world.stand_in_length,
        CROSS_ATTENTION_DIM,
        tokenizer.pad_token_id,
        recipe.stand_in_layers,
    )
    caption_ids = encoder.encode(tokenizer, captions)
    unconditional_ids = encoder.encode(tokenizer, [""])
    with torch.no_grad():
        posteriors = [vae.encode(chunk).latent_dist for chunk in pictures.split(256)]
    means = torch.cat([p.mean for p in posteriors])
    stds = torch.cat([p.std for p in posteriors])
    scale = vae.config.scaling_factor
    generator = torch.Generator().manual_seed(recipe.seed + 1)

    def loss_fn(step):
        index = torch.randint(0, len(pictures), (recipe.unet_batch_size,), generator=generator)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scale
        ids = caption_ids[index].clone()
        drop = torch.rand(len(index), generator=generator) < recipe.caption_dropout
        ids[drop] = unconditional_ids
        out = diffusion_loss(unet, noise_scheduler, encoder(ids), latents=latents, generator=generator)
        return {"loss": out.loss}

    unet.train()
    parameters = list(unet.parameters()) + list(encoder.parameters())
    history = _run_steps(
        "0b-diffusion", parameters, recipe.unet_steps, recipe.unet_lr, loss_fn, recipe.warmup_fraction, log
    )
    unet.eval().requires_grad_(False)
    return unet, encoder, history


__all__ = ["StandInCaptionEncoder", "train_autoencoder", "train_diffusion_decoder"]
