"""The recipe that trains the demo models: a tiny DreamLLM on a shapes world, on a CPU, from scratch.

`DemoRecipe()` is the shipped model's, on the first world (one shape on 32x32: a 3-layer vision tower, a UNet and a VAE
of about a million parameters each, minutes on two cores); `DemoRecipe.for_world("scenes")` trains in the version-2
world (one or two shapes on 64x64, their sizes and where they stand: a 6-layer tower, about 47 minutes on two cores).
The LLM has 4 layers in both, and `demo_worlds.py` holds each world's sizes. The stages follow the paper (arXiv
2309.11499, section 7 of docs/dreamllm-original.md), plus a stage 0 for the parts the original takes pretrained:

* **Stage 0a, the autoencoder.** A small `AutoencoderKL`, the world's pictures -> 4x8x8 latents (L1 + L2
  reconstruction, a very small KL weight); its `scaling_factor` is set so that the latents have unit variance.
* **Stage 0b, the diffusion decoder, pretrained with a stand-in caption encoder.** Stable Diffusion learned to listen
  to its text encoder before DreamLLM ever spoke to it; here a throw-away caption encoder (token + position
  embeddings of the caption; in version 2 then two small transformer layers, so that each word knows which thing it
  belongs to) plays CLIP-text's part, with caption dropout so that an empty caption means "any picture". Two choices
  make the UNet follow the caption within a few hundred steps
  (measured: with epsilon prediction the pictures followed their noise seed, not the caption): **v-prediction** on a
  zero-terminal-SNR cosine schedule, and the stock UNet's `addition_embed_type="text"` pooled conditioning next to
  its cross-attention (both read only `encoder_hidden_states`, i.e. the dream embeddings later).
* **Stages I to III are configurations of the one trainer** (`dreamllm_hf.training.train`, what `dreamllm-hf train`
  runs; `demo_stage_configs` lists them), on data the shapes world writes in the layouts it reads (a Parquet shard of
  pairs, MMC4 JSON Lines of stories, JSON Lines of conversations). Each stage's output folder is the next one's model.
  **Stage I, alignment, UNet and VAE frozen,** in the paper's two halves: *comprehension* (image -> caption pairs, LM
  loss; the vision tower, the image projector and the LLM train, because nothing here is pretrained), then *creation*
  (caption -> image pairs, diffusion loss through the frozen UNet into the condition projector, the dream queries and
  the LLM), a share of the captions dropped (`caption_dropout`: `<s>` + dream block is what classifier-free guidance
  reads as its unconditional, so it must mean "any picture"). **Stage II, I-GPT:** illustrated stories (each the
  answer to a story instruction, whose chat prompt is not learned) and pairs both ways, three batches of stories to
  one of pairs, `lm + 10 x diffusion`, the vision tower frozen as in the paper. **Stage III, instruction tuning:**
  conversations whose turns hold pictures in (a question about a picture, answered in a word, or a caption asked
  for) and out (a story the assistant illustrates), tokenized exactly as the pipeline reads a conversation, mixed
  with pairs.

`--backbone` chooses the LLM and the vision tower (`DEMO_BACKBONES`): a LLaMA with a CLIP tower (the shipped model) or
a Qwen2 with a SigLIP tower, the same sizes otherwise.
"""

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import write_conversations_folder, write_stories_folder
from .demo_worlds import CHECK_SEED, DEMO_WORLDS, DemoWorld
from .model_card import write_demo_model_card
from .tokenizer import STORY_INSTRUCTIONS, build_demo_tokenizer


NUM_DREAM_QUERIES = 8
CROSS_ATTENTION_DIM = 64
TEXT_SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
# The first world's sizes (the shipped model's); each world's are in `DEMO_WORLDS`.
IMAGE_SIZE = DEMO_WORLDS["shapes"].image_size
PATCH_SIZE = DEMO_WORLDS["shapes"].patch_size
VISION_SIZES = DEMO_WORLDS["shapes"].vision_sizes


# --------------------------------------------------------------------------------------------------------------------
# The recipe's knobs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DemoRecipe:
    """Every setting of the demo training; the defaults are the shipped model's recipe (the first world's).
    `DemoRecipe.for_world("scenes")` is the recipe of the version-2 world."""

    seed: int = 0
    num_threads: int | None = None  # None: torch's default (all cores)
    world: str = "shapes"  # a key of DEMO_WORLDS
    # False: the control of benchmarks/demo_synergy.py. Every stage keeps its LLM updates, batch sizes and learning
    # rates but spends them on picture -> text only (captions; questions and captions in stage III), no diffusion loss.
    creation: bool = True
    backbone: str = "llama-clip"  # a key of DEMO_BACKBONES
    num_pictures: int = 4096  # stage 0 pictures and stage I/II/III pairs
    num_stories: int = 1024
    num_conversations: int = 4096
    story_pictures: tuple[int, int] = (1, 3)
    # stage 0a: autoencoder
    vae_steps: int = 800
    vae_batch_size: int = 32
    vae_lr: float = 3e-3
    vae_kl_weight: float = 1e-8
    # stage 0b: diffusion decoder with the stand-in caption encoder
    unet_steps: int = 1000
    unet_batch_size: int = 64
    unet_lr: float = 2e-3
    caption_dropout: float = 0.15
    stand_in_layers: int = 0  # transformer layers of the stand-in caption encoder after its embeddings
    # stage I: comprehension (i2t) then creation (t2i)
    comprehension_steps: int = 700
    comprehension_batch_size: int = 32
    comprehension_lr: float = 2e-3
    creation_steps: int = 300
    creation_batch_size: int = 32
    creation_lr: float = 2e-3
    creation_train_llm: bool = True  # the paper freezes its pretrained LLM in stage I; ours starts from scratch
    creation_i2t_probability: float = 0.0  # share of creation pairs kept image-to-text (LM loss), to keep captioning
    unconditional_probability: float = 0.1  # caption-less t2i samples: the guidance unconditional
    # stage II: I-GPT joint training
    joint_steps: int = 800
    joint_batch_size: int = 16
    joint_lr: float = 1e-3
    joint_story_fraction: float = 0.75
    loss_weight_vm: float = 10.0
    # stage III: instruction tuning on conversations (a picture in and its caption, a story out, or both in a row),
    # with pairs kept in the mix so that the plain caption and drawing prompts stay as they were
    instruction_steps: int = 600
    instruction_batch_size: int = 16
    instruction_lr: float = 5e-4
    instruction_conversation_fraction: float = 0.75
    # torch threads for stage III (None: as the other stages). Fixed, since float sums depend on it; one thread was
    # several times faster than two on a loaded machine (no spin-waiting) when the shipped model was trained.
    instruction_threads: int | None = 1
    warmup_fraction: float = 0.05
    logging_steps: int = 50
    # the checks after each stage: held-out pictures captioned, drawings per caption and their DDIM steps
    check_pictures: int = 96
    check_per_caption: int = 8
    check_steps: int = 25

    @classmethod
    def for_world(cls, world: str, **fields) -> "DemoRecipe":
        """The recipe of `world` (a key of `DEMO_WORLDS`): its own defaults, then `fields`."""
        if world not in DEMO_WORLDS:
            raise ValueError(f"`world` must be one of {sorted(DEMO_WORLDS)}, got {world!r}.")
        return cls(**{**DEMO_WORLDS[world].recipe_defaults, **fields, "world": world})

    @property
    def demo_world(self) -> DemoWorld:
        return DEMO_WORLDS[self.world]

    def __post_init__(self):
        if self.world not in DEMO_WORLDS:
            raise ValueError(f"`world` must be one of {sorted(DEMO_WORLDS)}, got {self.world!r}.")
        if not self.creation:
            self.demo_world.conversation_sampler(creation=False)  # the worlds that have no such control say so
        if self.backbone not in DEMO_BACKBONES:
            raise ValueError(f"`backbone` must be one of {sorted(DEMO_BACKBONES)}, got {self.backbone!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------------------------


def _special_token_ids(tokenizer) -> dict:
    return dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )


def _llama_clip(tokenizer, world: DemoWorld):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig

    text = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=TEXT_SIZES["num_attention_heads"],
        max_position_embeddings=world.max_length,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        **TEXT_SIZES,
        **_special_token_ids(tokenizer),
    )
    size = world.image_size
    vision = CLIPVisionConfig(image_size=size, patch_size=world.patch_size, projection_dim=64, **world.vision_sizes)
    # CLIP preprocessing at the world's size (OpenAI mean/std)
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return text, vision, image_processor


def _qwen2_siglip(tokenizer, world: DemoWorld):
    from transformers import Qwen2Config, SiglipImageProcessor, SiglipVisionConfig

    text = Qwen2Config(
        vocab_size=len(tokenizer),
        num_key_value_heads=TEXT_SIZES["num_attention_heads"] // 2,  # grouped-query attention, as Qwen2's own sizes
        max_position_embeddings=world.max_length,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        **TEXT_SIZES,
        **_special_token_ids(tokenizer),
    )
    size = world.image_size
    vision = SiglipVisionConfig(image_size=size, patch_size=world.patch_size, **world.vision_sizes)  # no CLS token
    image_processor = SiglipImageProcessor(size={"height": size, "width": size})  # mean/std 0.5
    return text, vision, image_processor


# name -> (tokenizer, world) -> (text config, vision config, image processor): tiny configs of transformers' own
# classes.
DEMO_BACKBONES: dict[str, Callable] = {"llama-clip": _llama_clip, "qwen2-siglip": _qwen2_siglip}


def demo_mllm_config(tokenizer, backbone: str = "llama-clip", world: str = "shapes"):
    """The demo's [`DreamLLMConfig`]: an LLM of 4 x 128 and a vision tower of the world's size (first world: 3 x 64 on
    32 px, patch 4) from `DEMO_BACKBONES[backbone]`, 8 dream queries -> 64-d."""
    from ..modeling import DreamLLMConfig
    from ..modeling.configuration_dreamllm import token_ids_from_tokenizer

    text, vision, _ = DEMO_BACKBONES[backbone](tokenizer, DEMO_WORLDS[world])
    return DreamLLMConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        vision_feature_layer=-2,  # the projector reads layer -2: the tower's last layer only exists for the format
        num_dream_queries=NUM_DREAM_QUERIES,
        cross_attention_dim=CROSS_ATTENTION_DIM,
        tie_word_embeddings=False,
        **token_ids_from_tokenizer(tokenizer),
    )


def demo_processor(
    tokenizer, backbone: str = "llama-clip", num_image_tokens: int | None = None, world: str = "shapes"
):
    """The backbone's image processor at the world's picture size + the tokenizer, 8 dream slots, and one image slot
    per patch (`num_image_tokens`: default the world's patch count, the model config's)."""
    from ..modeling import DreamLLMProcessor

    _, _, image_processor = DEMO_BACKBONES[backbone](tokenizer, DEMO_WORLDS[world])
    return DreamLLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=num_image_tokens or DEMO_WORLDS[world].num_image_tokens,
        num_dream_queries=NUM_DREAM_QUERIES,
    )


def demo_vae(world: str = "shapes"):
    """The world's pictures <-> 4x8x8 latents (first world: 32x32x3, three blocks, two downsamplings; version 2:
    64x64x3, four blocks, three)."""
    from diffusers import AutoencoderKL

    blocks = DEMO_WORLDS[world].vae_blocks
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=blocks,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=DEMO_WORLDS[world].image_size,
    )


def demo_unet(world: str = "shapes"):
    """A two-level UNet on 8x8 latents (the world's widths); cross-attention on the 8 x 64 conditioning everywhere,
    plus the stock pooled `addition_embed_type="text"` path (attention-pooled conditioning added to the timestep
    embedding)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=DEMO_WORLDS[world].latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=DEMO_WORLDS[world].unet_blocks,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def demo_noise_scheduler():
    """DDPM, 1000 steps, cosine schedule (zero terminal SNR), v-prediction, no sample clipping (latents are not in
    [-1, 1])."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False
    )


def demo_sampling_scheduler(noise_scheduler):
    """What the shipped pipeline samples with: DDIM on the training schedule, trailing timesteps (so sampling starts
    at t = 999, pure noise, where the cosine schedule ends)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(noise_scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)


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


# --------------------------------------------------------------------------------------------------------------------
# Stage 0: the demo-only loop (the decoder the original takes pretrained)
# --------------------------------------------------------------------------------------------------------------------


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


def _pictures_tensor(dataset) -> torch.Tensor:
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) for image in dataset["image"]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------------------------
# Checks along the way (held-out pictures, the deterministic judge)
# --------------------------------------------------------------------------------------------------------------------

NUM_CHECK_CAPTIONS = 24  # drawn by the checks of the version-2 world (the first world's has 12 captions in all)


def _judge_all(decoded: torch.Tensor, captions: list[str], world: str = "shapes") -> float:
    """Share of decoded pictures (`[N, 3, H, W]` in [-1, 1]) that show their caption (the drawing metric of the
    world's evaluation)."""
    arrays = ((decoded.permute(0, 2, 3, 1).float().numpy() + 1.0) * 127.5).clip(0, 255).round().astype(np.uint8)
    judge = DEMO_WORLDS[world].drawing_right
    return sum(judge(array, caption) for array, caption in zip(arrays, captions)) / len(captions)


@torch.no_grad()
def reconstruction_accuracy(vae, num_pictures: int = 192, world: str = "shapes") -> float:
    """Share of held-out pictures that the judge still reads right after encode (posterior sample) + decode."""
    pictures = DEMO_WORLDS[world].pairs(num_pictures, CHECK_SEED)
    decoded = vae.decode(vae.encode(_pictures_tensor(pictures)).latent_dist.sample()).sample
    return _judge_all(decoded, pictures["text"], world)


@torch.no_grad()
def conditioned_drawing_accuracy(
    unet,
    vae,
    noise_scheduler,
    conditioning: torch.Tensor,
    unconditional: torch.Tensor,
    captions: list[str],
    guidance_scale: float,
    num_inference_steps: int = 25,
    seed: int = CHECK_SEED,
    world: str = "shapes",
) -> float:
    """Share of pictures drawn from `conditioning` (`[N, Q, D]`, guided against `unconditional` `[1, Q, D]`) that the
    judge reads as their `captions`: the sampling of the shipped pipeline (DDIM, trailing steps), without the
    pipeline."""
    scheduler = demo_sampling_scheduler(noise_scheduler)
    scheduler.set_timesteps(num_inference_steps)
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn((len(conditioning), unet.config.in_channels, size, size), generator=generator)
    context = torch.cat([unconditional.expand_as(conditioning), conditioning])
    for t in scheduler.timesteps:
        uncond, cond = unet(torch.cat([latents, latents]), t, context).sample.chunk(2)
        latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
    decoded = vae.decode(latents / vae.config.scaling_factor).sample
    return _judge_all(decoded, captions, world)


@torch.no_grad()
def dream_drawing_accuracy(
    mllm,
    processor,
    unet,
    vae,
    noise_scheduler,
    guidance_scale: float,
    per_caption: int = 8,
    num_inference_steps: int = 25,
    world: str = "shapes",
):
    """`conditioned_drawing_accuracy` with the conditioning of the dream path (`<s> caption` + dream block; the
    unconditional is `<s>` alone), as the pipeline's image mode computes it."""
    was_training = mllm.training
    mllm.eval()
    captions = DEMO_WORLDS[world].check_captions(NUM_CHECK_CAPTIONS) * per_caption
    inputs = processor(text=["", *captions], return_tensors="pt")
    embeddings = mllm.get_dream_embeddings(
        inputs["input_ids"], attention_mask=inputs["attention_mask"]
    ).dream_embeddings
    accuracy = conditioned_drawing_accuracy(
        unet,
        vae,
        noise_scheduler,
        embeddings[1:],
        embeddings[:1],
        captions,
        guidance_scale,
        num_inference_steps,
        world=world,
    )
    mllm.train(was_training)
    return accuracy


@torch.no_grad()
def captioning_accuracy(mllm, processor, num_pictures: int = 96, world: str = "shapes") -> float:
    """Greedy captions (`<s> <image>` prompt) of held-out pictures, scored by the captioning metric of the world's
    evaluation (first world: colour and shape named; version 2: everything the caption says right)."""
    was_training = mllm.training
    mllm.eval()
    demo_world = DEMO_WORLDS[world]
    pictures = demo_world.pairs(num_pictures, CHECK_SEED + 1)
    inputs = processor(text=["<image>"] * num_pictures, images=list(pictures["image"]), return_tensors="pt")
    output = mllm.generate(
        **inputs,
        max_new_tokens=demo_world.max_caption_tokens,
        do_sample=False,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    answers = processor.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    right = sum(demo_world.caption_right(answer, text) for answer, text in zip(answers, pictures["text"]))
    mllm.train(was_training)
    return right / num_pictures


# --------------------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------------------


def train_autoencoder(pictures: torch.Tensor, recipe: DemoRecipe, log) -> tuple[nn.Module, list[dict]]:
    """Stage 0a. Returns the VAE (eval mode) with `scaling_factor` set to 1 / std of the latent means."""
    vae = demo_vae(recipe.world)
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
            "value": reconstruction_accuracy(vae, world=recipe.world),
        }
    )
    log(json.dumps(history[-1]))
    return vae, history


def train_diffusion_decoder(
    vae, pictures: torch.Tensor, captions: list[str], tokenizer, recipe: DemoRecipe, log
) -> tuple[nn.Module, list[dict]]:
    """Stage 0b: the UNet learns to draw a caption from the stand-in encoder (v-prediction, caption dropout)."""
    from ..training.losses import diffusion_loss

    unet, noise_scheduler = demo_unet(recipe.world), demo_noise_scheduler()
    encoder = StandInCaptionEncoder(
        len(tokenizer),
        recipe.demo_world.stand_in_length,
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
    with torch.no_grad():
        captions = recipe.demo_world.check_captions(NUM_CHECK_CAPTIONS) * recipe.check_per_caption
        conditioning = encoder(encoder.encode(tokenizer, captions))
        unconditional = encoder(unconditional_ids)
    for scale in (2.0, 4.0):
        accuracy = conditioned_drawing_accuracy(
            unet,
            vae,
            noise_scheduler,
            conditioning,
            unconditional,
            captions,
            scale,
            recipe.check_steps,
            world=recipe.world,
        )
        history.append({"stage": "0b-diffusion", "check": f"stand_in_t2i_accuracy@{scale:g}", "value": accuracy})
        log(json.dumps(history[-1]))
    return unet, history


# --------------------------------------------------------------------------------------------------------------------
# Stages I to III: configurations of the one trainer
# --------------------------------------------------------------------------------------------------------------------

DEMO_DATA = ("pairs", "stories", "conversations")  # the folders `write_demo_data` writes


def write_demo_data(
    data_dir: str | Path, recipe: DemoRecipe, kinds: tuple[str, ...] = DEMO_DATA, pairs=None
) -> dict[str, str]:
    """The shapes world in layouts `dreamllm-hf train` reads: `pairs/` (a Parquet shard, the pictures embedded: the
    same pairs as stage 0's, `pairs` when given), `stories/stories.jsonl` (MMC4, each story the answer to a story
    instruction) and `conversations/conversations.jsonl`. Returns the data path of each kind."""
    from ..training.data import source_from_dataset, write_parquet_shards

    data_dir = Path(data_dir)
    paths = {}
    if "pairs" in kinds:
        # Parquet rather than an image folder: `datasets` resolves an image folder's files pattern by pattern, which
        # took ~10 s a stage for these 4096 pictures on a loaded 2-core machine; a shard loads at once.
        pairs = pairs if pairs is not None else recipe.demo_world.pairs(recipe.num_pictures, recipe.seed)
        write_parquet_shards(source_from_dataset(pairs), data_dir / "pairs")
        paths["pairs"] = str(data_dir / "pairs")
    if "stories" in kinds:
        folder = write_stories_folder(
            data_dir / "stories",
            recipe.num_stories,
            seed=recipe.seed + 1,
            image_size=recipe.demo_world.image_size,
            pictures=recipe.story_pictures,
            instructions=STORY_INSTRUCTIONS,
            sampler=recipe.demo_world.story_sampler(),
        )
        paths["stories"] = str(folder / "stories.jsonl")
    if "conversations" in kinds:
        folder = write_conversations_folder(
            data_dir / "conversations",
            recipe.num_conversations,
            seed=recipe.seed + 8,
            image_size=recipe.demo_world.image_size,
            pictures=recipe.story_pictures,
            sampler=recipe.demo_world.conversation_sampler(recipe.creation),
        )
        paths["conversations"] = str(folder / "conversations.jsonl")
    return paths


@dataclass
class DemoStage:
    """One trainer run of the recipe: its name in the history, its key in the timings, the `DreamLLMTrainingArguments`
    fields (all but `model` and `output_dir`) and the torch threads it runs on (None: as set)."""

    name: str
    timing: str
    arguments: dict
    threads: int | None = None


def demo_stage_configs(recipe: DemoRecipe, data: dict[str, str], cache_dir: str | None = None) -> list[DemoStage]:
    """Stages I to III of the recipe as configurations of `dreamllm_hf.training.train` (stages with 0 steps left out);
    `data` maps "pairs", "stories" and "conversations" to their paths (`write_demo_data`)."""

    def common(steps, batch_size, lr, seed):
        return dict(
            max_steps=steps,
            per_device_batch_size=batch_size,
            learning_rate=lr,
            lr_scheduler="cosine",
            warmup_steps=max(1, int(steps * recipe.warmup_fraction)),
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=seed,
            dtype="float32",
            mixed_precision="no",
            checkpointing_steps=0,
            logging_steps=recipe.logging_steps,
            cache_dir=cache_dir,
        )

    mixed_pairs = dict(i2t_probability=0.5, caption_dropout=recipe.unconditional_probability)
    if not recipe.creation:
        return _comprehension_only_stages(recipe, data, common)
    stages = [
        DemoStage(
            "I-comprehension",
            "stage I comprehension",
            dict(
                stage="alignment",
                language_model="full",  # nothing is pretrained here: the LLM and the tower learn to read
                vision_tower="full",
                train_condition_projector=False,
                train_dream_queries=False,
                data=[data["pairs"]],
                i2t_probability=1.0,
                loss_weight_lm=1.0,
                loss_weight_vm=0.0,
                **common(
                    recipe.comprehension_steps,
                    recipe.comprehension_batch_size,
                    recipe.comprehension_lr,
                    recipe.seed + 3,
                ),
            ),
        ),
        DemoStage(
            "I-creation",
            "stage I creation",
            dict(
                stage="alignment",
                language_model="full" if recipe.creation_train_llm else "frozen",
                train_image_projector=False,
                data=[data["pairs"]],
                i2t_probability=recipe.creation_i2t_probability,
                caption_dropout=recipe.unconditional_probability,
                loss_weight_lm=1.0 if recipe.creation_i2t_probability else 0.0,
                loss_weight_vm=1.0,
                **common(recipe.creation_steps, recipe.creation_batch_size, recipe.creation_lr, recipe.seed + 4),
            ),
        ),
        DemoStage(
            "II-joint",
            "stage II joint",
            dict(
                stage="pretraining",
                data=[data["stories"], data["pairs"]],
                data_weights=[recipe.joint_story_fraction, 1.0 - recipe.joint_story_fraction],
                loss_weight_lm=1.0,
                loss_weight_vm=recipe.loss_weight_vm,
                **mixed_pairs,
                **common(recipe.joint_steps, recipe.joint_batch_size, recipe.joint_lr, recipe.seed + 5),
            ),
        ),
        DemoStage(
            "III-instruction",
            "stage III instruction",
            dict(
                stage="instruction",
                data=[data["conversations"], data["pairs"]],
                data_weights=[
                    recipe.instruction_conversation_fraction,
                    1.0 - recipe.instruction_conversation_fraction,
                ],
                loss_weight_lm=1.0,
                loss_weight_vm=recipe.loss_weight_vm,
                **mixed_pairs,
                **common(
                    recipe.instruction_steps, recipe.instruction_batch_size, recipe.instruction_lr, recipe.seed + 8
                ),
            ),
            threads=recipe.instruction_threads,
        ),
    ]
    return [stage for stage in stages if stage.arguments["max_steps"] > 0]


def _comprehension_only_stages(recipe: DemoRecipe, data: dict[str, str], common) -> list[DemoStage]:
    """The recipe's stages with their creation removed: the same steps, batch sizes, learning rates and seeds, all on
    picture -> text (pairs as captions; stage III's conversations hold no stories, `write_demo_data` writes them so)."""
    reading = dict(
        language_model="full",
        vision_tower="full",
        train_condition_projector=False,
        train_dream_queries=False,
        i2t_probability=1.0,
        loss_weight_lm=1.0,
        loss_weight_vm=0.0,
    )
    plan = (
        ("I-comprehension", "stage I comprehension", "alignment", [data["pairs"]], None, "comprehension", 3),
        ("I-creation", "stage I creation", "alignment", [data["pairs"]], None, "creation", 4),
        ("II-joint", "stage II joint", "pretraining", [data["pairs"]], None, "joint", 5),
        (
            "III-instruction",
            "stage III instruction",
            "instruction",
            [data["conversations"], data["pairs"]],
            [recipe.instruction_conversation_fraction, 1.0 - recipe.instruction_conversation_fraction],
            "instruction",
            8,
        ),
    )
    stages = []
    for name, timing, stage, sources, weights, prefix, seed_offset in plan:
        arguments = dict(stage=stage, data=sources, **reading)
        if weights:
            arguments["data_weights"] = weights
        steps, batch_size, lr = (getattr(recipe, f"{prefix}_{field}") for field in ("steps", "batch_size", "lr"))
        arguments.update(common(steps, batch_size, lr, recipe.seed + seed_offset))
        threads = recipe.instruction_threads if prefix == "instruction" else None
        stages.append(DemoStage(name, timing, arguments, threads=threads))
    return [stage for stage in stages if stage.arguments["max_steps"] > 0]


def stage_checks(model_dir: str | Path, stage: str, recipe: DemoRecipe, with_drawing: bool = True) -> list[dict]:
    """The checks after a stage, on its output folder: held-out captions, and drawings through the dream path."""
    from ..pipelines import DreamLLMPipeline

    pipe = DreamLLMPipeline.from_pretrained(model_dir, dtype=torch.float32)
    checks = {
        "caption_accuracy": lambda: captioning_accuracy(pipe.mllm, pipe.processor, recipe.check_pictures, recipe.world)
    }
    if with_drawing:
        noise_scheduler = demo_noise_scheduler()
        checks["dream_t2i_accuracy@2"] = lambda: dream_drawing_accuracy(
            pipe.mllm,
            pipe.processor,
            pipe.unet,
            pipe.vae,
            noise_scheduler,
            2.0,
            per_caption=recipe.check_per_caption,
            num_inference_steps=recipe.check_steps,
            world=recipe.world,
        )
    return [{"stage": stage, "check": check, "value": fn()} for check, fn in checks.items()]


def run_demo_stage(
    stage: DemoStage, model_dir: str | Path, output_dir: str | Path, recipe: DemoRecipe, log
) -> list[dict]:
    """Trains one stage with `dreamllm_hf.training.train` (a complete pipeline folder in `output_dir`), then runs its
    checks. Returns the stage's history: its logged steps and its checks."""
    from ..training import DreamLLMTrainingArguments, train

    threads = torch.get_num_threads()
    if stage.threads:
        torch.set_num_threads(stage.threads)
    try:
        args = DreamLLMTrainingArguments(model=str(model_dir), output_dir=str(output_dir), **stage.arguments)
        result = train(args)
    finally:
        torch.set_num_threads(threads)
    history = []
    for line in result.log_path.read_text().splitlines():
        record = json.loads(line)
        history.append(
            {
                "stage": stage.name,
                "step": record["step"],
                **{key: record[key] for key in ("loss", "lm_loss", "vm_loss", "lr", "elapsed_s")},
            }
        )
        log(json.dumps(history[-1]))
    for record in stage_checks(output_dir, stage.name, recipe, with_drawing=stage.arguments["loss_weight_vm"] != 0):
        history.append(record)
        log(json.dumps(record))
    return history


PIPELINE_FILES = ("model_index.json", "mllm", "processor", "scheduler", "unet", "vae")


def _publish(stage_dir: Path, output_dir: Path) -> None:
    """Copies the pipeline of a stage folder (not its log, arguments or checkpoints) into `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        source, target = stage_dir / name, output_dir / name
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)
    _drop_load_records(output_dir)


def _drop_load_records(model_dir: Path) -> None:
    """Removes what loading wrote into the configs (the source folder's path, how it was loaded, the sub-configs'
    dtype), so that a continued model's files are those a fresh run writes."""
    for path in model_dir.rglob("*.json"):
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            continue
        found = [config.pop(key) for key in ("_name_or_path", "is_local", "local_files_only") if key in config]
        for sub_config in ("text_config", "vision_config"):
            if isinstance(config.get(sub_config), dict) and "dtype" in config[sub_config]:
                found.append(config[sub_config].pop("dtype"))
        if found:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def train_demo(
    output_dir: str | Path, recipe: DemoRecipe | None = None, log=print, reuse_decoder: str | Path | None = None
) -> dict:
    """Runs every stage and saves the pipeline to `output_dir` (`DreamLLMPipeline.save_pretrained` layout, plus
    `training_report.json`). Returns the report: the recipe, the wall time of every stage and the loss history.

    `reuse_decoder` (for experiments on stages I to III): a pipeline folder whose `vae/` and `unet/` replace stage 0.
    """
    from ..modeling import DreamLLMForConditionalGeneration
    from ..pipelines import DreamLLMPipeline

    recipe = recipe or DemoRecipe()
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    timings, history = {}, []
    load_at_start = [round(value, 2) for value in os.getloadavg()]
    clock = time.perf_counter()
    started = clock

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 1)
        log(f"[{name}] {timings[name]:.1f} s")
        clock = now

    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)

    # Data and tokenizer ------------------------------------------------------------------------------------------
    work_dir = output_dir / ".work"
    shutil.rmtree(work_dir, ignore_errors=True)
    world = recipe.demo_world
    tokenizer = build_demo_tokenizer(work_dir, texts=world.tokenizer_texts(), model_max_length=world.max_length)
    config = demo_mllm_config(tokenizer, recipe.backbone, recipe.world)
    processor = demo_processor(tokenizer, recipe.backbone, config.num_image_tokens, recipe.world)
    pairs = world.pairs(recipe.num_pictures, recipe.seed)
    pictures = _pictures_tensor(pairs)
    data = write_demo_data(work_dir / "data", recipe, pairs=pairs)
    lap("data")

    # Stage 0: the decoder --------------------------------------------------------------------------------------
    if reuse_decoder is None:
        vae, records = train_autoencoder(pictures, recipe, log)
        history += records
        lap("stage 0a autoencoder")
        unet, records = train_diffusion_decoder(vae, pictures, pairs["text"], tokenizer, recipe, log)
        history += records
        lap("stage 0b diffusion decoder")
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        vae = AutoencoderKL.from_pretrained(Path(reuse_decoder) / "vae").eval().requires_grad_(False)
        unet = UNet2DConditionModel.from_pretrained(Path(reuse_decoder) / "unet").eval().requires_grad_(False)
        history.append({"stage": "0", "reused_decoder": str(reuse_decoder)})

    # The untrained DreamLLM, saved as the pipeline stage I starts from -------------------------------------------
    torch.manual_seed(recipe.seed + 2)
    mllm = DreamLLMForConditionalGeneration(config)
    mllm.generation_config.pad_token_id = tokenizer.pad_token_id
    scheduler = demo_sampling_scheduler(demo_noise_scheduler())  # the trainer trains with DDPM on its schedule
    model_dir = work_dir / "stage-0"
    DreamLLMPipeline(mllm=mllm, processor=processor, unet=unet, vae=vae, scheduler=scheduler).save_pretrained(
        model_dir
    )
    parameters = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in (("mllm", mllm), ("unet", unet), ("vae", vae))
    }
    del mllm

    # Stages I to III: the one trainer ----------------------------------------------------------------------------
    stages = demo_stage_configs(recipe, data, cache_dir=str(work_dir / "hf-cache"))
    for stage in stages:
        stage_dir = work_dir / stage.name
        history += run_demo_stage(stage, model_dir, stage_dir, recipe, log)
        model_dir = stage_dir
        lap(stage.timing)

    # Save ------------------------------------------------------------------------------------------------------
    _publish(model_dir, output_dir)
    lap("save")
    report = {
        "world": recipe.world,
        "recipe": recipe.to_dict(),
        "stages": [asdict(stage) | {"arguments": _portable(stage.arguments)} for stage in stages],
        "timings_s": timings,
        "total_s": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": [round(value, 2) for value in os.getloadavg()],
        "parameters": parameters,
        "history": history,
    }
    (output_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_demo_model_card(output_dir, report)
    shutil.rmtree(work_dir)
    return report


def _portable(arguments: dict) -> dict:
    """A stage's arguments as the report keeps them: data paths by their folder name (the work folder is removed)."""
    named = dict(arguments)
    named["data"] = [Path(path).parent.name if path.endswith(".jsonl") else Path(path).name for path in named["data"]]
    named.pop("cache_dir", None)
    return named


def continue_demo_training(
    model_dir: str | Path, output_dir: str | Path, recipe: DemoRecipe | None = None, log=print
) -> dict:
    """Stage III alone, on a demo pipeline trained through stage II (`model_dir`, with its `training_report.json`);
    writes the result to `output_dir` with the report extended. The same as a full `train_demo` run with the same
    recipe: stage III seeds its own data and noise."""
    recipe = recipe or DemoRecipe()
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    report = json.loads((model_dir / "training_report.json").read_text())
    if any(record.get("stage") == "III-instruction" for record in report["history"]):
        raise ValueError(f"{model_dir} already went through stage III; start from a model trained through stage II.")
    started = time.perf_counter()
    work_dir = output_dir / ".work"
    shutil.rmtree(work_dir, ignore_errors=True)
    data = write_demo_data(work_dir / "data", recipe, kinds=("pairs", "conversations"))
    data["stories"] = ""  # not used by stage III
    stage = next(
        stage
        for stage in demo_stage_configs(recipe, data, cache_dir=str(work_dir / "hf-cache"))
        if stage.name == "III-instruction"
    )
    history = run_demo_stage(stage, model_dir, work_dir / stage.name, recipe, log)
    _publish(work_dir / stage.name, output_dir)
    shutil.rmtree(work_dir)
    elapsed = round(time.perf_counter() - started, 1)
    report["recipe"] = recipe.to_dict()
    report["history"] += history
    report.setdefault("stages", []).append(asdict(stage) | {"arguments": _portable(stage.arguments)})
    report["timings_s"][stage.timing] = elapsed
    report["total_s"] = round(report["total_s"] + elapsed, 1)
    (output_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_demo_model_card(output_dir, report)
    return report


def __getattr__(name: str):
    # Renamed names keep working for a release.
    if name == "CLIP_PATCH_SIZE":
        import warnings

        warnings.warn(
            "`CLIP_PATCH_SIZE` is deprecated: the tower may be SigLIP too; use `PATCH_SIZE`.",
            FutureWarning,
            stacklevel=2,
        )
        return PATCH_SIZE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEMO_BACKBONES",
    "DemoRecipe",
    "DemoStage",
    "StandInCaptionEncoder",
    "captioning_accuracy",
    "conditioned_drawing_accuracy",
    "continue_demo_training",
    "demo_mllm_config",
    "demo_noise_scheduler",
    "demo_processor",
    "demo_sampling_scheduler",
    "demo_stage_configs",
    "demo_unet",
    "demo_vae",
    "dream_drawing_accuracy",
    "reconstruction_accuracy",
    "run_demo_stage",
    "stage_checks",
    "train_autoencoder",
    "train_demo",
    "train_diffusion_decoder",
    "write_demo_data",
]
