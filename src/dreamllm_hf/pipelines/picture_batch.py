"""The running batch of pictures being denoised (continuous batching for the UNet).

A [`PictureBatch`] holds every picture being drawn, each at its own denoising step. `step()` runs ONE UNet call over
all of them (per picture size): each picture's rows (`[unconditional, conditional]` with guidance) at its own
timestep, then each picture's guidance and scheduler step on its own. A picture added between two steps joins the
next UNet call; a finished one is decoded by the VAE and handed back. So pictures that documents ask for at different
steps still share UNet batches, which is what makes drawing batch on a server (the demo model's UNet takes 19 ms for
16 rows on two CPU cores, 9 ms for 2).

Each picture has its own scheduler (a fresh one from the pipeline's config, with its own timesteps), latents and
generator, and goes through the same operations as [`DreamLLMText2ImagePipeline`] drawing it alone: the initial noise
is the first draw from its generator (`prepare_latents`), then `scale_model_input`, the UNet, the guidance (uncond
first, as the original), `rescale_noise_cfg`, `scheduler.step` with its `eta` and generator, the VAE. Only the other
rows of the UNet batch differ, which changes a picture within float rounding.
"""

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from ..decoder_conditioning import added_cond_kwargs
from .dream_diffusion import guided_noise, onload, takes_guidance


@dataclass
class PictureRequest:
    """One picture to draw: its conditioning rows (`[1, Q, cross_attention_dim]`, with the pooled `[1, P]` rows of an
    SDXL-style decoder) and the `DreamLLMText2ImagePipeline.__call__` settings of the same names."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    height: int = 512
    width: int = 512
    num_inference_steps: int = 50
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    eta: float = 0.0
    generator: torch.Generator | None = None


@dataclass
class _Picture:
    key: object
    request: PictureRequest
    scheduler: object
    timesteps: torch.Tensor
    latents: torch.Tensor
    step_kwargs: dict
    guided: bool  # with classifier-free guidance: two UNet rows, `[uncond, cond]`
    done: int = 0  # denoising steps taken

    @property
    def finished(self) -> bool:
        return self.done >= len(self.timesteps)


class PictureBatch:
    """
    Pictures denoised together, joining and leaving between steps.

    Args:
        pipe ([`DreamLLMPipeline`] or [`DreamLLMText2ImagePipeline`]): gives the UNet, VAE and scheduler.

    `add`, `drop` and `step` are called from one thread (the writer's).
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self._pictures: list[_Picture] = []

    def __len__(self) -> int:
        return len(self._pictures)

    @property
    def keys(self) -> list:
        return [p.key for p in self._pictures]

    def progress(self, key) -> tuple[int, int]:
        """`(steps done, steps in all)` of the picture `key`."""
        picture = next(p for p in self._pictures if p.key == key)
        return picture.done, len(picture.timesteps)

    def add(self, key, request: PictureRequest) -> None:
        """Starts drawing a picture (its initial noise drawn now, from its generator); it joins the next `step()`."""
        pipe, embeds = self.pipe, request.prompt_embeds
        guided = takes_guidance(pipe.unet.config, request.guidance_scale)
        if guided and request.negative_prompt_embeds is None:  # before the generator is drawn from
            raise ValueError("A guided picture needs `negative_prompt_embeds` (the unconditional rows).")
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        timesteps, _ = retrieve_timesteps(
            scheduler, request.num_inference_steps, embeds.device, request.timesteps, request.sigmas
        )
        channels = pipe.unet.config.in_channels
        latents = pipe.prepare_latents(
            1, channels, request.height, request.width, embeds.dtype, embeds.device, request.generator
        )
        step_kwargs = pipe.prepare_extra_step_kwargs(request.generator, request.eta)  # same scheduler class
        self._pictures.append(_Picture(key, request, scheduler, timesteps, latents, step_kwargs, guided))

    def drop(self, key) -> None:
        """Stops drawing the picture `key` (its document no longer wants it)."""
        self._pictures = [p for p in self._pictures if p.key != key]

    @torch.no_grad()
    def step(self) -> list[tuple[object, np.ndarray, int]]:
        """One denoising step of every picture (one UNet call per picture size). Returns the pictures that finished,
        decoded, as `(key, [H, W, 3] array in [0, 1], denoising steps)` (the array is what text-to-image gives with
        `output_type="np"`)."""
        groups: dict[tuple, list[_Picture]] = {}
        for picture in self._pictures:
            groups.setdefault((picture.request.height, picture.request.width), []).append(picture)
        onload(self.pipe.unet)
        for (height, width), pictures in groups.items():
            self._denoise_step(pictures, height, width)
        finished = [p for p in self._pictures if p.finished]
        self._pictures = [p for p in self._pictures if not p.finished]
        return self._decode(finished)

    def _denoise_step(self, pictures: list[_Picture], height: int, width: int) -> None:
        inputs, timesteps, conditions, pooled = [], [], [], []
        for picture in pictures:
            t = picture.timesteps[picture.done]
            request = picture.request
            scaled = picture.scheduler.scale_model_input(picture.latents, t)
            rows = (
                [request.negative_prompt_embeds, request.prompt_embeds] if picture.guided else [request.prompt_embeds]
            )
            pooled_rows = (
                [request.negative_pooled_prompt_embeds, request.pooled_prompt_embeds]
                if picture.guided
                else [request.pooled_prompt_embeds]
            )
            inputs.extend([scaled] * len(rows))
            timesteps.extend([t] * len(rows))
            conditions.extend(rows)
            pooled.extend(pooled_rows)
        unet = self.pipe.unet
        pooled_embeds = torch.cat(pooled) if pooled[0] is not None else None
        noise_pred = unet(
            torch.cat(inputs),
            torch.stack([torch.as_tensor(t) for t in timesteps]).to(inputs[0].device),
            encoder_hidden_states=torch.cat(conditions),
            added_cond_kwargs=added_cond_kwargs(unet.config, pooled_embeds, height, width),
            return_dict=False,
        )[0]
        row = 0
        for picture in pictures:
            request, t = picture.request, picture.timesteps[picture.done]
            if picture.guided:
                uncond, text = noise_pred[row : row + 1], noise_pred[row + 1 : row + 2]
                row += 2
                prediction = guided_noise(uncond, text, request.guidance_scale, request.guidance_rescale)
            else:
                prediction = noise_pred[row : row + 1]
                row += 1
            picture.latents = picture.scheduler.step(
                prediction, t, picture.latents, **picture.step_kwargs, return_dict=False
            )[0]
            picture.done += 1

    def _decode(self, finished: list[_Picture]) -> list[tuple[object, np.ndarray, int]]:
        if not finished:
            return []
        pipe = self.pipe
        onload(pipe.vae)
        decoded = []
        for picture in finished:  # one at a time: each with its own generator, as a text-to-image call of one
            image = pipe._decode(picture.latents, picture.request.generator)
            decoded.append((picture.key, pipe._postprocess(image, "np")[0], len(picture.timesteps)))
        return decoded


__all__ = ["PictureBatch", "PictureRequest"]
