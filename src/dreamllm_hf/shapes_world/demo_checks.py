"""The demo recipe's checks along the way: held-out pictures, captioned and drawn, judged by the world's metrics.

Every drawing goes through the pipeline's own code (`DreamLLMText2ImagePipeline`): from the dream path's conditioning
after stages I to III, and from the stand-in caption encoder's (`prompt_embeds`) after stage 0b. Those checks draw from
their own generators and change nothing that is trained: a run trains the same weights without them
(`DemoRecipe.run_checks`). The autoencoder's (`reconstruction_accuracy`) samples its posterior from torch's global
generator, as the recipe always has, so it is part of the recipe.
"""

import numpy as np
import torch

from .demo_recipe import demo_noise_scheduler, demo_sampling_scheduler
from .demo_worlds import CHECK_SEED, FIRST_WORLD, DemoWorld


NUM_CHECK_CAPTIONS = 24  # captions a world with more than that draws (the first world draws its 12 in all)


def pictures_tensor(dataset) -> torch.Tensor:
    """The pictures of a dataset's `image` column as one `[N, 3, H, W]` tensor in [-1, 1]."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) for image in dataset["image"]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def share_shown(pictures, captions: list[str], world: DemoWorld = FIRST_WORLD) -> float:
    """Share of `pictures` (PIL images, `[H, W, 3]` uint8 arrays, or a `[N, 3, H, W]` tensor in [-1, 1]) that show
    their caption, by the drawing metric of the world's evaluation."""
    if isinstance(pictures, torch.Tensor):
        pictures = ((pictures.permute(0, 2, 3, 1).float().numpy() + 1.0) * 127.5).clip(0, 255).round().astype(np.uint8)
    return sum(world.drawing_right(picture, caption) for picture, caption in zip(pictures, captions)) / len(captions)


@torch.no_grad()
def reconstruction_accuracy(vae, world: DemoWorld = FIRST_WORLD, num_pictures: int = 192) -> float:
    """Share of held-out pictures that the judge still reads right after encode (posterior sample) + decode."""
    pictures = world.pairs(num_pictures, CHECK_SEED)
    decoded = vae.decode(vae.encode(pictures_tensor(pictures)).latent_dist.sample()).sample
    return share_shown(decoded, pictures["text"], world)


def _draw(pipe, guidance_scale: float, num_inference_steps: int, **inputs) -> list:
    """Pictures drawn by the text-to-image pipeline on `pipe`'s components, every check's noise from `CHECK_SEED`."""
    from ..pipelines import DreamLLMText2ImagePipeline

    text2image = DreamLLMText2ImagePipeline.from_pipe(pipe)
    text2image.set_progress_bar_config(disable=True)
    return text2image(
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        generator=torch.Generator().manual_seed(CHECK_SEED),
        output_type="pil",
        **inputs,
    ).images


@torch.no_grad()
def stand_in_drawing_checks(unet, vae, encoder, tokenizer, recipe, world: DemoWorld = FIRST_WORLD) -> list[dict]:
    """After stage 0b: the UNet draws the check captions from the stand-in encoder's conditioning (`prompt_embeds`,
    guided against the empty caption's), at guidance 2 and 4, through a text-to-image pipeline without a language
    model (as diffusers pipelines draw from precomputed embeddings with their text encoder set to `None`)."""
    from ..pipelines import DreamLLMText2ImagePipeline

    pipe = DreamLLMText2ImagePipeline(
        mllm=None, processor=None, unet=unet, vae=vae, scheduler=demo_sampling_scheduler(demo_noise_scheduler())
    )
    captions = world.check_captions(NUM_CHECK_CAPTIONS) * recipe.check_per_caption
    conditioning = encoder(encoder.encode(tokenizer, captions))
    unconditional = encoder(encoder.encode(tokenizer, [""]))
    records = []
    for scale in (2.0, 4.0):
        pictures = _draw(
            pipe, scale, recipe.check_steps, prompt_embeds=conditioning, negative_prompt_embeds=unconditional
        )
        value = share_shown(pictures, captions, world)
        records.append({"stage": "0b-diffusion", "check": f"stand_in_t2i_accuracy@{scale:g}", "value": value})
    return records


def dream_drawing_accuracy(
    pipe,
    world: DemoWorld = FIRST_WORLD,
    guidance_scale: float = 2.0,
    per_caption: int = 8,
    num_inference_steps: int = 25,
) -> float:
    """Share of the check captions (`per_caption` pictures each) that the pipeline draws so that the judge reads them:
    text-to-image through the dream path (`<s> caption` + dream block, guided against `<s>` alone)."""
    captions = world.check_captions(NUM_CHECK_CAPTIONS) * per_caption
    return share_shown(_draw(pipe, guidance_scale, num_inference_steps, prompt=captions), captions, world)


@torch.no_grad()
def captioning_accuracy(mllm, processor, world: DemoWorld = FIRST_WORLD, num_pictures: int = 96) -> float:
    """Greedy captions (`<s> <image>` prompt) of held-out pictures, scored by the captioning metric of the world's
    evaluation (first world: colour and shape named)."""
    was_training = mllm.training
    mllm.eval()
    pictures = world.pairs(num_pictures, CHECK_SEED + 1)
    inputs = processor(text=["<image>"] * num_pictures, images=list(pictures["image"]), return_tensors="pt")
    output = mllm.generate(
        **inputs,
        max_new_tokens=world.max_caption_tokens,
        do_sample=False,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    answers = processor.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    right = sum(world.caption_right(answer, text) for answer, text in zip(answers, pictures["text"]))
    mllm.train(was_training)
    return right / num_pictures


def stage_checks(
    model_dir, stage: str, recipe, world: DemoWorld = FIRST_WORLD, with_drawing: bool = True
) -> list[dict]:
    """The checks after a stage of the one trainer, on its output folder: held-out captions, and drawings through the
    dream path."""
    from ..pipelines import DreamLLMPipeline

    pipe = DreamLLMPipeline.from_pretrained(model_dir, dtype=torch.float32)
    checks = {"caption_accuracy": lambda: captioning_accuracy(pipe.mllm, pipe.processor, world, recipe.check_pictures)}
    if with_drawing:
        checks["dream_t2i_accuracy@2"] = lambda: dream_drawing_accuracy(
            pipe, world, 2.0, per_caption=recipe.check_per_caption, num_inference_steps=recipe.check_steps
        )
    return [{"stage": stage, "check": check, "value": fn()} for check, fn in checks.items()]


__all__ = [
    "NUM_CHECK_CAPTIONS",
    "captioning_accuracy",
    "dream_drawing_accuracy",
    "pictures_tensor",
    "reconstruction_accuracy",
    "share_shown",
    "stage_checks",
    "stand_in_drawing_checks",
]
