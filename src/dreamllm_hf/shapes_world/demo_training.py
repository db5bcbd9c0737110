"""The recipe that trains the shipped demo model: a tiny DreamLLM on the shapes world, on a CPU, from scratch.

Everything is small (a 4-layer LLaMA, a 3-layer CLIP vision tower, a UNet and a VAE of about a million parameters
each), so the whole recipe runs in minutes on two CPU cores. The stages follow the paper (arXiv 2309.11499, section
7 of docs/dreamllm-original.md), plus a stage 0 for the parts the original takes pretrained:

* **Stage 0a, the autoencoder.** A small `AutoencoderKL`, 32x32x3 pictures -> 4x8x8 latents (L1 + L2 reconstruction,
  a very small KL weight); its `scaling_factor` is set so that the latents have unit variance.
* **Stage 0b, the diffusion decoder, pretrained with a stand-in caption encoder.** Stable Diffusion learned to listen
  to its text encoder before DreamLLM ever spoke to it; here a throw-away caption encoder (token + position
  embeddings of the caption, padded to the number of dream queries) plays CLIP-text's part, with caption dropout so
  that an empty caption means "any picture". Two choices make the UNet follow the caption within a few hundred steps
  (measured: with epsilon prediction the pictures followed their noise seed, not the caption): **v-prediction** on a
  zero-terminal-SNR cosine schedule, and the stock UNet's `addition_embed_type="text"` pooled conditioning next to
  its cross-attention (both read only `encoder_hidden_states`, i.e. the dream embeddings later).
* **Stage I, alignment, UNet and VAE frozen** (the two halves of the paper's stage I, run one after the other):
  *comprehension* (image -> caption pairs, LM loss; the CLIP tower, the image projector and the LLM train, because
  nothing here is pretrained), then *creation* (caption -> image pairs, diffusion loss through the frozen UNet into
  the condition projector, the dream queries and the LLM). A fraction of the creation samples has no caption
  (`<s>` + dream block): that is what classifier-free guidance reads as its unconditional, so it must mean "any
  picture".
* **Stage II, I-GPT joint training:** illustrated stories (MMC4 layout, behind the Vicuna chat prompt of a story
  instruction, which is masked from the loss) + pairs both ways, `loss = lm + 10 x diffusion` with
  [`DreamLLMTrainingModel`]; the CLIP tower is frozen as in the paper.

The samples are built by the project's `DreamLLMSampleBuilder` / `DreamLLMDataset` / `DreamLLMDataCollator` and the
losses computed by `diffusion_loss` and `DreamLLMTrainingModel`; the loop itself is a plain AdamW loop, because
`dreamllm_hf.training.train` fine-tunes a converted checkpoint with a LoRA adapter, while this trains every part in
full from random initialisation, with different trainable parts per stage.
"""

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import constants as C
from .data import pairs_dataset, sample_conversation, stories_dataset
from .model_card import write_demo_model_card
from .tokenizer import STORY_INSTRUCTIONS, build_demo_tokenizer
from .world import COLOURS, IMAGE_SIZE, SHAPES


NUM_DREAM_QUERIES = 8
CROSS_ATTENTION_DIM = 64
CLIP_PATCH_SIZE = 4  # 32 px / 4 = 8x8 = 64 image tokens (patch 8 captioned only ~70 % in the same budget)


# --------------------------------------------------------------------------------------------------------------------
# The recipe's knobs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DemoRecipe:
    """Every setting of the demo training; the defaults are the shipped model's recipe."""

    seed: int = 0
    num_threads: int | None = None  # None: torch's default (all cores)
    num_pictures: int = 4096  # stage 0 pictures and stage I/II pairs
    num_stories: int = 1024
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

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------------------------


def demo_mllm_config(tokenizer):
    """The demo's [`DreamLLMConfig`]: LLaMA 4 x 128, CLIP ViT 3 x 64 on 32 px (patch 4), 8 dream queries -> 64-d."""
    from ..modeling import DreamLLMConfig

    vocab = tokenizer.get_vocab()
    ids = {token: vocab[token] for token in C.RELEASE_ADDED_TOKEN_IDS}
    return DreamLLMConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,  # the projector reads layer -2, so the last layer only exists for the format
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=CLIP_PATCH_SIZE,
            projection_dim=64,
        ),
        vision_feature_layer=-2,
        num_dream_queries=NUM_DREAM_QUERIES,
        cross_attention_dim=CROSS_ATTENTION_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        image_start_token_id=ids[C.IMAGE_START_TOKEN],
        image_patch_token_id=ids[C.IMAGE_PATCH_TOKEN],
        image_end_token_id=ids[C.IMAGE_END_TOKEN],
        dream_start_token_id=ids[C.DREAM_START_TOKEN],
        dream_end_token_id=ids[C.DREAM_END_TOKEN],
        image_token_id=ids[C.IMAGE_PLACEHOLDER],
        dream_token_id=ids[C.DREAM_PLACEHOLDER],
        tie_word_embeddings=False,
    )


def demo_processor(tokenizer):
    """CLIP preprocessing at the world's 32 px (OpenAI mean/std) + the tokenizer, 64 image slots, 8 dream slots."""
    from transformers import CLIPImageProcessor

    from ..modeling import DreamLLMProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return DreamLLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(IMAGE_SIZE // CLIP_PATCH_SIZE) ** 2,
        num_dream_queries=NUM_DREAM_QUERIES,
    )


def demo_vae():
    """32x32x3 <-> 4x8x8 (three blocks, two downsamplings)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def demo_unet():
    """A two-level UNet on 8x8 latents; cross-attention on the 8 x 64 conditioning everywhere, plus the stock pooled
    `addition_embed_type="text"` path (attention-pooled conditioning added to the timestep embedding)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
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
    token (an all-pad input is the unconditional). Plays the part of SD's CLIP text encoder; it is not shipped."""

    def __init__(self, vocab_size: int, length: int, dim: int, pad_token_id: int):
        super().__init__()
        self.length, self.pad_token_id = length, pad_token_id
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.randn(length, dim) * 0.02)

    def forward(self, token_ids: torch.LongTensor) -> torch.Tensor:
        return self.tokens(token_ids) + self.positions

    def encode(self, tokenizer, captions: list[str]) -> torch.LongTensor:
        rows = []
        for caption in captions:
            ids = tokenizer(caption, add_special_tokens=False)["input_ids"][: self.length] if caption else []
            rows.append(ids + [self.pad_token_id] * (self.length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


# --------------------------------------------------------------------------------------------------------------------
# Samples (the project's builder, plus the two things the shapes world adds)
# --------------------------------------------------------------------------------------------------------------------


def story_prompt(processor, instruction: str) -> str:
    """The Vicuna v1.1 prompt that asks for a story, exactly as the pipeline formats it ("... ASSISTANT:")."""
    conversation = [{"role": "user", "content": instruction}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def _shapes_builder_class():
    from ..training.data import IGNORE_INDEX, DreamLLMSampleBuilder

    class ShapesSampleBuilder(DreamLLMSampleBuilder):
        """[`DreamLLMSampleBuilder`] with an unconditional share of text-to-image pairs and instruction-led stories.

        * A pair that becomes text-to-image loses its caption with probability `unconditional_probability`
          (`<s> DREAM </s>`): classifier-free guidance reads `<s>` alone through the dream path as "any picture".
        * A story is preceded by the chat prompt of a story instruction (drawn per sample), whose tokens are masked
          from the LM loss, as the original's instruction-interleaved data (`mmc4_instruct`).
        """

        def __init__(self, *args, unconditional_probability: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.unconditional_probability = unconditional_probability
            self.story_prompts = [story_prompt(self.processor, text) for text in STORY_INSTRUCTIONS]

        def pair(self, image, text, rng, base_dir=None):
            from ..training.data import load_image

            image = load_image(image, base_dir)
            if rng.random() < self.i2t_probability:
                return self.image_to_text(image, text)
            if rng.random() < self.unconditional_probability:
                text = ""
            return self.text_to_image(image, text, rng)

        def document(self, text_list, images, matched_text_index, rng, base_dir=None):
            prompt = self.story_prompts[int(rng.integers(len(self.story_prompts)))]
            text_list = list(text_list)
            text_list[0] = f"{prompt} {text_list[0].strip()}"
            sample = super().document(text_list, images, matched_text_index, rng, base_dir)
            prompt_ids = [self.bos_token_id, *self.tokenize(prompt)]
            if sample["input_ids"][: len(prompt_ids)] != prompt_ids:
                raise ValueError("The story prompt does not tokenize to a prefix of the story.")
            sample["labels"][: len(prompt_ids)] = [IGNORE_INDEX] * len(prompt_ids)
            return sample

    return ShapesSampleBuilder


class ConversationSamples(torch.utils.data.Dataset):
    """Shapes-world conversations (`sample_conversation`) as training samples, drawn from (seed, epoch, index)."""

    def __init__(self, builder, num_samples: int, seed: int):
        self.builder, self.num_samples, self.seed, self.epoch = builder, num_samples, seed, 0

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        messages = sample_conversation(random.Random(f"{self.seed}/{self.epoch}/{index}"))
        return self.builder.conversation(messages, self.builder.rng(index, self.epoch))


def _batches(dataset, batch_size: int, collator, seed: int) -> Iterator[dict]:
    """Endless shuffled batches; the per-sample randomness changes with the epoch (as the trainer does)."""
    generator = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        order = torch.randperm(len(dataset), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collator([dataset[index] for index in order[start : start + batch_size]])
        epoch += 1


class _MixedBatches:
    """Batches drawn from two endless streams, the first with probability `fraction` (seeded)."""

    def __init__(self, first: Iterator[dict], second: Iterator[dict], fraction: float, seed: int):
        self.first, self.second, self.fraction = first, second, fraction
        self.rng = random.Random(seed)

    def __iter__(self):
        while True:
            yield next(self.first) if self.rng.random() < self.fraction else next(self.second)


# --------------------------------------------------------------------------------------------------------------------
# The loop
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


def _freeze_all_but(model: nn.Module, trainable: list[nn.Module]) -> list[nn.Parameter]:
    model.requires_grad_(False)
    for module in trainable:
        module.requires_grad_(True)
    return [param for param in model.parameters() if param.requires_grad]


def _pictures_tensor(dataset) -> torch.Tensor:
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) for image in dataset["image"]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------------------------
# Checks along the way (held-out pictures, the deterministic judge)
# --------------------------------------------------------------------------------------------------------------------

DIAGNOSTIC_SEED = 2_000_003  # held out: no training set uses it


def _judge_all(decoded: torch.Tensor, wanted: list[tuple[str, str]]) -> float:
    """Share of decoded pictures (`[N, 3, H, W]` in [-1, 1]) that meet the drawing metric of the demo's evaluation."""
    from .evaluation import drawing_is_right

    arrays = ((decoded.permute(0, 2, 3, 1).float().numpy() + 1.0) * 127.5).clip(0, 255).round().astype(np.uint8)
    return sum(drawing_is_right(array, *want) for array, want in zip(arrays, wanted)) / len(wanted)


@torch.no_grad()
def reconstruction_accuracy(vae, num_pictures: int = 192) -> float:
    """Share of held-out pictures that the judge still reads right after encode (posterior sample) + decode."""
    pictures = pairs_dataset(num_pictures, seed=DIAGNOSTIC_SEED)
    decoded = vae.decode(vae.encode(_pictures_tensor(pictures)).latent_dist.sample()).sample
    return _judge_all(decoded, list(zip(pictures["colour"], pictures["shape"])))


@torch.no_grad()
def conditioned_drawing_accuracy(
    unet,
    vae,
    noise_scheduler,
    conditioning: torch.Tensor,
    unconditional: torch.Tensor,
    wanted,
    guidance_scale: float,
    num_inference_steps: int = 25,
    seed: int = DIAGNOSTIC_SEED,
) -> float:
    """Share of pictures drawn from `conditioning` (`[N, Q, D]`, guided against `unconditional` `[1, Q, D]`) that the
    judge reads as `wanted`: the sampling of the shipped pipeline (DDIM, trailing steps), without the pipeline."""
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
    return _judge_all(decoded, wanted)


@torch.no_grad()
def dream_drawing_accuracy(mllm, processor, unet, vae, noise_scheduler, guidance_scale: float, per_caption: int = 8):
    """`conditioned_drawing_accuracy` with the conditioning of the dream path (`<s> caption` + dream block; the
    unconditional is `<s>` alone), as the pipeline's image mode computes it."""
    was_training = mllm.training
    mllm.eval()
    captions = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES] * per_caption
    inputs = processor(text=["", *captions], return_tensors="pt")
    embeddings = mllm.get_dream_embeddings(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    wanted = [tuple(caption.split()[1:]) for caption in captions]
    accuracy = conditioned_drawing_accuracy(
        unet, vae, noise_scheduler, embeddings[1:], embeddings[:1], wanted, guidance_scale
    )
    mllm.train(was_training)
    return accuracy


@torch.no_grad()
def captioning_accuracy(mllm, processor, num_pictures: int = 96) -> float:
    """Greedy captions (`<s> <image>` prompt) of held-out pictures, scored by the captioning metric of the demo's
    evaluation (right when colour and shape are both named)."""
    from .evaluation import caption_is_right

    was_training = mllm.training
    mllm.eval()
    pictures = pairs_dataset(num_pictures, seed=DIAGNOSTIC_SEED + 1)
    inputs = processor(text=["<image>"] * num_pictures, images=list(pictures["image"]), return_tensors="pt")
    output = mllm.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    answers = processor.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    right = sum(
        caption_is_right(answer, colour, shape)
        for answer, colour, shape in zip(answers, pictures["colour"], pictures["shape"])
    )
    mllm.train(was_training)
    return right / num_pictures


# --------------------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------------------


def train_autoencoder(pictures: torch.Tensor, recipe: DemoRecipe, log) -> tuple[nn.Module, list[dict]]:
    """Stage 0a. Returns the VAE (eval mode) with `scaling_factor` set to 1 / std of the latent means."""
    vae = demo_vae()
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
        {"stage": "0a-autoencoder", "check": "reconstruction_accuracy", "value": reconstruction_accuracy(vae)}
    )
    log(json.dumps(history[-1]))
    return vae, history


def train_diffusion_decoder(
    vae, pictures: torch.Tensor, captions: list[str], tokenizer, recipe: DemoRecipe, log
) -> tuple[nn.Module, list[dict]]:
    """Stage 0b: the UNet learns to draw a caption from the stand-in encoder (v-prediction, caption dropout)."""
    from ..training.losses import diffusion_loss

    unet, noise_scheduler = demo_unet(), demo_noise_scheduler()
    encoder = StandInCaptionEncoder(len(tokenizer), NUM_DREAM_QUERIES, CROSS_ATTENTION_DIM, tokenizer.pad_token_id)
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
        captions = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES] * 8
        conditioning = encoder(encoder.encode(tokenizer, captions))
        unconditional = encoder(unconditional_ids)
    wanted = [tuple(caption.split()[1:]) for caption in captions]
    for scale in (2.0, 4.0):
        accuracy = conditioned_drawing_accuracy(unet, vae, noise_scheduler, conditioning, unconditional, wanted, scale)
        history.append({"stage": "0b-diffusion", "check": f"stand_in_t2i_accuracy@{scale:g}", "value": accuracy})
        log(json.dumps(history[-1]))
    return unet, history


def _stage_dataset(sources, processor, builder_kwargs: dict, seed: int):
    from ..training.data import DreamLLMDataset

    builder = _shapes_builder_class()(processor, diffusion_resolution=IMAGE_SIZE, seed=seed, **builder_kwargs)
    return DreamLLMDataset(sources, builder)


def _dreamllm_loss_fn(training_model, batches: Iterator[dict], seed: int):
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(step):
        out = training_model(**next(batches), generator=generator)
        return {"loss": out.loss, "lm": out.lm_loss.detach(), "vm": out.vm_loss.detach()}

    return loss_fn


def instruction_stage(mllm, unet, vae, noise_scheduler, processor, pair_source, recipe: DemoRecipe, log) -> list[dict]:
    """Stage III, the paper's instruction tuning: conversations whose turns hold pictures in and out
    (`sample_conversation`), mixed with pairs; the LLM, projectors and queries learn `lm + 10 x diffusion`."""
    from ..training.data import DreamLLMDataCollator
    from ..training.losses import DreamLLMTrainingModel

    seed = recipe.seed + 8
    threads = torch.get_num_threads()
    if recipe.instruction_threads:
        torch.set_num_threads(recipe.instruction_threads)
    builder = _shapes_builder_class()(processor, diffusion_resolution=IMAGE_SIZE, seed=seed)
    conversations = ConversationSamples(builder, recipe.num_stories, seed)
    pairs = _stage_dataset(
        [pair_source],
        processor,
        {"i2t_probability": 0.5, "unconditional_probability": recipe.unconditional_probability},
        seed + 1,
    )
    collator = DreamLLMDataCollator(pad_token_id=processor.tokenizer.pad_token_id)
    streams = _MixedBatches(
        _batches(conversations, recipe.instruction_batch_size, collator, seed),
        _batches(pairs, recipe.instruction_batch_size, collator, seed + 1),
        recipe.instruction_conversation_fraction,
        seed + 2,
    )
    core = mllm.model
    mllm.train()
    training_model = DreamLLMTrainingModel(mllm, unet, vae, noise_scheduler, 1.0, recipe.loss_weight_vm)
    training_model.train()
    trainable = [core.multi_modal_projector, core.language_model, mllm.lm_head, core.dream_queries]
    parameters = _freeze_all_but(mllm, [*trainable, core.condition_projector])
    loss_fn = _dreamllm_loss_fn(training_model, iter(streams), seed + 2)
    records = _run_steps(
        "III-instruction",
        parameters,
        recipe.instruction_steps,
        recipe.instruction_lr,
        loss_fn,
        recipe.warmup_fraction,
        log,
    )
    checks = {
        "caption_accuracy": lambda: captioning_accuracy(mllm, processor),
        "dream_t2i_accuracy@2": lambda: dream_drawing_accuracy(mllm, processor, unet, vae, noise_scheduler, 2.0),
    }
    for check, fn in checks.items():
        records.append({"stage": "III-instruction", "check": check, "value": fn()})
        log(json.dumps(records[-1]))
    torch.set_num_threads(threads)
    return records


def continue_demo_training(
    model_dir: str | Path, output_dir: str | Path, recipe: DemoRecipe | None = None, log=print
) -> dict:
    """Stage III alone, on a demo pipeline trained through stage II (`model_dir`, with its `training_report.json`);
    writes the result to `output_dir` with the report extended. The same as a full `train_demo` run with the same
    recipe: stage III seeds its own data and noise."""
    from ..pipelines import DreamLLMPipeline
    from ..training.data import source_from_dataset

    recipe = recipe or DemoRecipe()
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    report = json.loads((model_dir / "training_report.json").read_text())
    if any(record.get("stage") == "III-instruction" for record in report["history"]):
        raise ValueError(f"{model_dir} already went through stage III; start from a model trained through stage II.")
    started = time.perf_counter()
    pipe = DreamLLMPipeline.from_pretrained(model_dir, dtype=torch.float32)
    noise_scheduler = demo_noise_scheduler()
    pair_source = source_from_dataset(pairs_dataset(recipe.num_pictures, seed=recipe.seed))
    history = instruction_stage(
        pipe.mllm,
        pipe.unet.requires_grad_(False),
        pipe.vae.requires_grad_(False),
        noise_scheduler,
        pipe.processor,
        pair_source,
        recipe,
        log,
    )
    pipe.mllm.requires_grad_(False).eval()
    pipe.save_pretrained(output_dir)
    _drop_load_records(output_dir)
    elapsed = round(time.perf_counter() - started, 1)
    report["recipe"] = recipe.to_dict()
    report["history"] += history
    report["timings_s"]["stage III instruction"] = elapsed
    report["total_s"] = round(report["total_s"] + elapsed, 1)
    (output_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_demo_model_card(output_dir, report)
    return report


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

    `reuse_decoder` (for experiments on stages I and II): a pipeline folder whose `vae/` and `unet/` replace stage 0.
    """
    from ..modeling import DreamLLMForConditionalGeneration
    from ..pipelines import DreamLLMPipeline
    from ..training.data import DreamLLMDataCollator, source_from_dataset
    from ..training.losses import DreamLLMTrainingModel

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
    tokenizer = build_demo_tokenizer(work_dir)
    processor = demo_processor(tokenizer)
    pairs = pairs_dataset(recipe.num_pictures, seed=recipe.seed)
    stories = stories_dataset(recipe.num_stories, seed=recipe.seed + 1, pictures=recipe.story_pictures)
    pictures = _pictures_tensor(pairs)
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
    noise_scheduler = demo_noise_scheduler()

    # Stages I and II: the multimodal LLM -------------------------------------------------------------------------
    torch.manual_seed(recipe.seed + 2)
    mllm = DreamLLMForConditionalGeneration(demo_mllm_config(tokenizer))
    mllm.generation_config.pad_token_id = tokenizer.pad_token_id
    mllm.train()
    core = mllm.model
    collator = DreamLLMDataCollator(pad_token_id=tokenizer.pad_token_id)
    pair_source, story_source = source_from_dataset(pairs), source_from_dataset(stories)

    def dreamllm_stage(name, trainable, streams, steps, lr, loss_weight_lm, loss_weight_vm, seed):
        training_model = DreamLLMTrainingModel(mllm, unet, vae, noise_scheduler, loss_weight_lm, loss_weight_vm)
        training_model.train()
        parameters = _freeze_all_but(mllm, trainable)
        loss_fn = _dreamllm_loss_fn(training_model, iter(streams), seed)
        records = _run_steps(name, parameters, steps, lr, loss_fn, recipe.warmup_fraction, log)
        checks = {"caption_accuracy": lambda: captioning_accuracy(mllm, processor)}
        if loss_weight_vm:
            checks["dream_t2i_accuracy@2"] = lambda: dream_drawing_accuracy(
                mllm, processor, unet, vae, noise_scheduler, 2.0
            )
        for check, fn in checks.items():
            records.append({"stage": name, "check": check, "value": fn()})
            log(json.dumps(records[-1]))
        return records

    comprehension = _stage_dataset([pair_source], processor, {"i2t_probability": 1.0}, recipe.seed + 3)
    history += dreamllm_stage(
        "I-comprehension",
        [core.vision_tower, core.multi_modal_projector, core.language_model, mllm.lm_head],
        _batches(comprehension, recipe.comprehension_batch_size, collator, recipe.seed + 3),
        recipe.comprehension_steps,
        recipe.comprehension_lr,
        1.0,
        0.0,
        recipe.seed + 3,
    )
    lap("stage I comprehension")

    creation = _stage_dataset(
        [pair_source],
        processor,
        {
            "i2t_probability": recipe.creation_i2t_probability,
            "unconditional_probability": recipe.unconditional_probability,
        },
        recipe.seed + 4,
    )
    history += dreamllm_stage(
        "I-creation",
        [core.dream_queries, core.condition_projector]
        + ([core.language_model, mllm.lm_head] if recipe.creation_train_llm else []),
        _batches(creation, recipe.creation_batch_size, collator, recipe.seed + 4),
        recipe.creation_steps,
        recipe.creation_lr,
        1.0 if recipe.creation_i2t_probability else 0.0,
        1.0,
        recipe.seed + 4,
    )
    lap("stage I creation")

    joint_pairs = _stage_dataset(
        [pair_source],
        processor,
        {"i2t_probability": 0.5, "unconditional_probability": recipe.unconditional_probability},
        recipe.seed + 5,
    )
    joint_stories = _stage_dataset([story_source], processor, {}, recipe.seed + 6)
    streams = _MixedBatches(
        _batches(joint_stories, recipe.joint_batch_size, collator, recipe.seed + 6),
        _batches(joint_pairs, recipe.joint_batch_size, collator, recipe.seed + 5),
        recipe.joint_story_fraction,
        recipe.seed + 7,
    )
    history += dreamllm_stage(
        "II-joint",
        [core.multi_modal_projector, core.language_model, mllm.lm_head, core.dream_queries, core.condition_projector],
        streams,
        recipe.joint_steps,
        recipe.joint_lr,
        1.0,
        recipe.loss_weight_vm,
        recipe.seed + 7,
    )
    lap("stage II joint")

    history += instruction_stage(mllm, unet, vae, noise_scheduler, processor, pair_source, recipe, log)
    lap("stage III instruction")

    # Save ------------------------------------------------------------------------------------------------------
    mllm.requires_grad_(False).eval()
    pipe = DreamLLMPipeline(
        mllm=mllm, processor=processor, unet=unet, vae=vae, scheduler=demo_sampling_scheduler(noise_scheduler)
    )
    pipe.save_pretrained(output_dir)
    lap("save")
    report = {
        "recipe": recipe.to_dict(),
        "timings_s": timings,
        "total_s": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": [round(value, 2) for value in os.getloadavg()],
        "parameters": {
            name: sum(p.numel() for p in module.parameters())
            for name, module in (("mllm", mllm), ("unet", unet), ("vae", vae))
        },
        "history": history,
    }
    (output_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_demo_model_card(output_dir, report)
    for leftover in sorted(work_dir.glob("*")):
        leftover.unlink()
    work_dir.rmdir()
    return report


__all__ = [
    "DemoRecipe",
    "StandInCaptionEncoder",
    "demo_mllm_config",
    "demo_noise_scheduler",
    "demo_processor",
    "demo_sampling_scheduler",
    "demo_unet",
    "demo_vae",
    "story_prompt",
    "conditioned_drawing_accuracy",
    "continue_demo_training",
    "instruction_stage",
    "reconstruction_accuracy",
    "train_autoencoder",
    "train_demo",
    "train_diffusion_decoder",
]
