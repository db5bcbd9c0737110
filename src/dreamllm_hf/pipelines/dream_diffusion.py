"""What both DreamLLM pipelines share: the dream-query conditioning of a prompt and the Stable Diffusion sampling loop.

[`DreamLLMPipeline`] (documents) and [`DreamLLMText2ImagePipeline`] (text-to-image) draw their pictures with the same
code, so a picture of a document equals the text-to-image drawing from the same conditioning and seed.
"""

import inspect
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from accelerate.hooks import CpuOffload
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from .. import checks
from ..checks import InputTypeError
from ..decoder_conditioning import (
    added_cond_kwargs,
    check_decoder,
    conditioning_width,
    pooled_width,
    takes_pooled,
    vae_scale_factor,
)
from ..modeling.folder_layout import save_processor_with_model


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass(frozen=True)
class DiffusionSettings:
    """How a picture is drawn (the `__call__` arguments of the same names)."""

    height: int
    width: int
    num_inference_steps: int
    timesteps: list[int] | None
    sigmas: list[float] | None
    eta: float
    callback_on_step_end: Callable | None
    callback_on_step_end_tensor_inputs: list[str]


def onload(module: torch.nn.Module) -> None:
    """Moves a CPU-offloaded model to the execution device before calling a method that is not `forward`.

    `enable_model_cpu_offload` hooks `forward` only; diffusers' `apply_forward_hook` does the same for `vae.decode`.
    Only that offload hook is triggered: `device_map` hooks place their own inputs and need no help.
    """
    hook = getattr(module, "_hf_hook", None)
    if isinstance(hook, CpuOffload):
        hook.pre_forward(module)


def takes_guidance(unet_config, guidance_scale: float) -> bool:
    """Whether a picture is drawn with classifier-free guidance: a scale above 1, and a UNet that does not embed the
    guidance itself (LCM-style `time_cond_proj_dim`), as `StableDiffusionPipeline` decides."""
    return guidance_scale > 1 and unet_config.time_cond_proj_dim is None


def guided_noise(noise_pred_uncond, noise_pred_text, guidance_scale: float, guidance_rescale: float) -> torch.Tensor:
    """The guided noise prediction (uncond + scale x (cond - uncond), as the original), rescaled as
    `StableDiffusionPipeline` does when `guidance_rescale` > 0."""
    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    if guidance_rescale > 0.0:
        noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=guidance_rescale)
    return noise_pred


def is_conversation(item: Any) -> bool:
    return isinstance(item, (list, tuple)) and len(item) > 0 and all(isinstance(m, dict) for m in item)


class DreamLLMDiffusionMixin:
    """Conditioning and sampling for pipelines holding `mllm`, `processor`, `unet`, `vae` and `scheduler`."""

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        r"""
        This pipeline on the components of another DreamLLM pipeline (shared, not copied); a component given as a
        keyword replaces the other pipeline's.

        Unlike diffusers' default, which casts every component to float32 (in place, so the other pipeline's too), the
        components keep their dtypes: a half-precision or quantized language model stays as it is, and its
        `_keep_in_fp32_modules` stay in float32. Pass `dtype=` to cast explicitly.
        """
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        names = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(
                f"{cls.__name__}.from_pipe() got unexpected keyword arguments {unknown}; its components are {names}."
            )
        components = {name: kwargs[name] if name in kwargs else getattr(pipeline, name, None) for name in names}
        new = cls(**components)
        if dtype is not None:
            new.to(dtype=dtype)
        if hasattr(pipeline, "_progress_bar_config"):
            new.set_progress_bar_config(**pipeline._progress_bar_config)
        return new

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        r"""
        Saves the pipeline as diffusers does (one folder per component, `model_index.json`), and the processor in
        `mllm/` too, so that the language model's folder loads on its own with `AutoProcessor` and
        `AutoModelForImageTextToText`.

        Args:
            save_directory (`str` or `os.PathLike`):
                The folder to write (created if needed).
            *args, **kwargs:
                Passed to `DiffusionPipeline.save_pretrained` (`safe_serialization`, `variant`, `max_shard_size`,
                `push_to_hub`, ...).
        """
        if getattr(self, "processor", None) is not None and getattr(self, "mllm", None) is not None:
            # Before the components: with `push_to_hub=True` the folder is uploaded at the end of the base method.
            save_processor_with_model(self.processor, save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------------------------
    # Properties (as in StableDiffusionPipeline)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return takes_guidance(self.unet.config, self._guidance_scale)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def max_context_length(self) -> int:
        """Positions the language model can attend over (`text_config.max_position_embeddings`)."""
        return self.mllm.config.text_config.max_position_embeddings

    def _vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        return vae_scale_factor(vae.config) if vae is not None else 8

    # An inpainting UNet (the mask and the masked picture's latents as extra inputs): only the inpainting pipeline's.
    _takes_inpainting_unet = False

    def _check_decoder(self) -> None:
        """At construction (and so at loading): a UNet the model cannot condition is refused, naming what it lacks."""
        unet, mllm, vae = (getattr(self, name, None) for name in ("unet", "mllm", "vae"))
        if unet is not None and mllm is not None:
            check_decoder(
                unet.config,
                mllm.config,
                vae.config if vae is not None else None,
                inpainting=self._takes_inpainting_unet,
            )

    @property
    def _takes_pooled(self) -> bool:
        """Whether the pictures' conditioning has a pooled part (an SDXL-style decoder's `text_embeds`): the UNet says
        so (the mllm's pooled projector matches it, checked at construction); without a UNet, the mllm."""
        return self._pooled_width is not None

    @property
    def _condition_width(self) -> tuple[int | None, str]:
        """The width of the UNet's `encoder_hidden_states` and the config field that says so (without a UNet, the
        mllm's `cross_attention_dim`, which `check_decoder` matched to it); `None` when neither is loaded."""
        unet, mllm = getattr(self, "unet", None), getattr(self, "mllm", None)
        if unet is not None:
            width, source = conditioning_width(unet.config)
            return width, f"the UNet's {source}"
        return (mllm.config.cross_attention_dim if mllm is not None else None), "the mllm's cross_attention_dim"

    @property
    def _num_dream_queries(self) -> int | None:
        """The rows of a conditioning the mllm makes (`None` without an mllm: embeddings made elsewhere)."""
        mllm = getattr(self, "mllm", None)
        return mllm.config.num_dream_queries if mllm is not None else None

    @property
    def _pooled_width(self) -> int | None:
        """The size of the pooled `text_embeds` the UNet reads (without a UNet, the mllm's `pooled_projection_dim`);
        `None` for decoders that read none."""
        unet, mllm = getattr(self, "unet", None), getattr(self, "mllm", None)
        if unet is not None:
            return pooled_width(unet.config)
        return getattr(mllm.config, "pooled_projection_dim", None) if mllm is not None else None

    def _default_size(self, height: int | None, width: int | None) -> tuple[int | None, int | None]:
        if getattr(self, "unet", None) is None:
            return height, width
        size = self.unet.config.sample_size * self.vae_scale_factor
        return size if height is None else height, size if width is None else width

    # ----------------------------------------------------------------------------------------------------------------
    # Prompts

    def _as_prompt_list(self, prompt) -> list:
        if isinstance(prompt, str) or is_conversation(prompt):
            return [prompt]
        if isinstance(prompt, (list, tuple)) and len(prompt) > 0:
            return list(prompt)
        raise (ValueError if isinstance(prompt, (list, tuple)) else InputTypeError)(
            f"`prompt` must be a string, a conversation (list of message dicts) or a non-empty list of those; "
            f"got {type(prompt).__name__}."
        )

    # The `__call__` argument of the pictures for the prompt's `<image>` placeholders (img2img and inpainting call
    # theirs `prompt_image`: `image` is the picture they start from, as in diffusers).
    _prompt_images_argument = "image"

    def _per_prompt_images(self, image, batch_size: int) -> list[list] | None:
        """`image` as one list per prompt: one prompt takes a picture or a flat list; a batch, one list per prompt."""
        if image is None:
            return None
        if batch_size == 1 and not (
            isinstance(image, (list, tuple)) and len(image) == 1 and isinstance(image[0], (list, tuple))
        ):
            return [list(image) if isinstance(image, (list, tuple)) else [image]]
        if not isinstance(image, (list, tuple)) or len(image) != batch_size:
            raise ValueError(
                f"With {batch_size} prompts, give `{self._prompt_images_argument}` as {batch_size} lists (one per "
                "prompt, empty for a prompt without `<image>`)."
            )
        return [list(item) if isinstance(item, (list, tuple)) else [item] for item in image]

    def _tokenize(self, texts: list[str], images: list[list] | None, device: torch.device):
        """Left-padded ids (BOS + text, placeholders expanded), attention mask and CLIP pixel values (or None)."""
        encoded = self.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        pixel_values = encoded.get("pixel_values")
        if pixel_values is not None:
            pixel_values = pixel_values.to(device)
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device), pixel_values

    def _check_prompt_length(self, attention_mask: torch.Tensor | int, reserve: int, what: str) -> None:
        """The longest prompt (an attention mask, or its length in positions) and `reserve` positions more must fit
        in the model's context."""
        longest = attention_mask if isinstance(attention_mask, int) else int(attention_mask.sum(-1).max())
        if longest + reserve > self.max_context_length:
            raise ValueError(
                f"The prompt takes {longest} positions and {what} needs {reserve} more, but the model's context is "
                f"{self.max_context_length} positions (`text_config.max_position_embeddings`). Shorten the prompt or "
                "pass fewer images (each `<image>` takes "
                f"{len(self.processor.image_block_ids)} positions)."
            )

    def _dream_embeddings(
        self, texts: list[str], images: list[list] | None, device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dream embeddings after BOS + each text, and their pooled conditioning (`None` without a pooled projector),
        all rows in one left-padded language-model pass (no logits)."""
        input_ids, attention_mask, pixel_values = self._tokenize(texts, images, device)
        self._check_prompt_length(attention_mask, len(self.processor.dream_block_ids), "the dream block")
        onload(self.mllm)
        dream = self.mllm.get_dream_embeddings(input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        return dream.dream_embeddings, dream.dream_pooled_embeddings

    def _check_negative_prompt(self, negative_prompt, count: int) -> None:
        if negative_prompt is None:
            return
        if not isinstance(negative_prompt, str):
            if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(n, str) for n in negative_prompt):
                raise InputTypeError(
                    f"`negative_prompt` must be a string or a list of strings, got {type(negative_prompt).__name__}."
                )
            if len(negative_prompt) != count:
                raise ValueError(
                    f"`negative_prompt` has {len(negative_prompt)} entries for {count} prompts; give one "
                    "per prompt, or a single string."
                )
        for text in [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt:
            if "<image>" in text or "<dream>" in text:
                raise ValueError("`negative_prompt` cannot hold `<image>` or `<dream>`: it takes no pictures.")

    def _check_diffusion_inputs(
        self,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
        tensor_inputs,
        guidance_scale=None,
        guidance_rescale=None,
        eta=None,
        callback_on_step_end=None,
    ) -> None:
        """The arguments of the pictures' denoising, against the UNet, VAE and scheduler that will draw them."""
        missing = [name for name in ("unet", "vae", "scheduler") if getattr(self, name, None) is None]
        if missing:
            raise ValueError(
                f"Drawing pictures needs a unet, a vae and a scheduler, but this pipeline has no {', '.join(missing)}; "
                "load them, or ask for text only (`allow_images=False`)."
            )
        checks.PICTURE_SIDE.check("height", height)
        checks.PICTURE_SIDE.check("width", width)
        multiple = self.vae_scale_factor
        if height % multiple or width % multiple:
            suggestion = f"{max(multiple, round(height / multiple) * multiple)}x"
            suggestion += f"{max(multiple, round(width / multiple) * multiple)}"
            raise ValueError(
                f"`height` and `width` must be divisible by the VAE factor {multiple}; got {height}x{width}. Round "
                f"them to a multiple of {multiple} (for example {suggestion})."
            )
        self._check_guidance(guidance_scale, guidance_rescale, eta)
        self._check_schedule(num_inference_steps, timesteps, sigmas)
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise InputTypeError(
                f"`callback_on_step_end` must be a callable `(pipe, step, timestep, tensors) -> dict` or a "
                f"`PipelineCallback`, got {type(callback_on_step_end).__name__}."
            )
        if tensor_inputs is not None and not all(k in self._callback_tensor_inputs for k in tensor_inputs):
            unknown = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {unknown}; allowed: {self._callback_tensor_inputs}."
            )

    @staticmethod
    def _check_guidance(guidance_scale, guidance_rescale, eta) -> None:
        """The guidance numbers (`None`: not given to `check_inputs`, nothing to check)."""
        for name, value, kind in (
            ("guidance_scale", guidance_scale, checks.GUIDANCE_SCALE),
            ("guidance_rescale", guidance_rescale, checks.GUIDANCE_RESCALE),
            ("eta", eta, checks.ETA),
        ):
            if value is not None:
                kind.check(name, value)

    def _check_schedule(self, num_inference_steps, timesteps, sigmas) -> None:
        """`num_inference_steps` (or custom `timesteps` / `sigmas`), checked by the scheduler itself now rather than
        when the first picture is drawn."""
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass custom `timesteps` or `sigmas`, not both.")
        custom = {}
        for name, values, kind in (("timesteps", timesteps, numbers.Integral), ("sigmas", sigmas, numbers.Real)):
            if values is None:
                continue
            if isinstance(values, (torch.Tensor, np.ndarray)):
                values = values.tolist()
            if not isinstance(values, (list, tuple)) or not values:
                raise InputTypeError(f"`{name}` must be a non-empty list of numbers, got {values!r:.80}.")
            bad = [
                v for v in values if isinstance(v, bool) or not isinstance(v, kind) or not math.isfinite(v) or v < 0
            ]
            if bad:
                expected = "non-negative integers" if kind is numbers.Integral else "finite non-negative numbers"
                raise ValueError(f"`{name}` must be a list of {expected}, got {bad[0]!r} in it.")
            custom[name] = list(values)
        if not custom:
            checks.STEPS.check("num_inference_steps", num_inference_steps)
        try:  # the scheduler's own rules (a custom schedule it takes, steps within its training steps)
            retrieve_timesteps(self.scheduler, None if custom else num_inference_steps, None, **custom)
        except ValueError as error:
            raise ValueError(f"{type(self.scheduler).__name__} cannot take this schedule: {error}") from error

    def _check_generator(self, generator, count: int, what: str) -> None:
        """`generator`: one `torch.Generator` (or None), or a list of exactly `count`, one per `what`."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != count:
                raise ValueError(
                    f"Got {len(generator)} generators for {count} {what}; give one per {what[:-1]} "
                    "(prompts x num_images_per_prompt), or a single generator."
                )
            if not all(isinstance(g, torch.Generator) for g in generator):
                kinds = sorted({type(g).__name__ for g in generator if not isinstance(g, torch.Generator)})
                raise InputTypeError(
                    f"`generator` must be a `torch.Generator` or a list of them (one per {what[:-1]}); the list holds "
                    f"{', '.join(kinds)}."
                )
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise InputTypeError(
                f"`generator` must be a `torch.Generator` or a list of them, got {type(generator).__name__}; seed one "
                "with `torch.Generator().manual_seed(seed)`."
            )

    def _check_tensor(self, name: str, value, rank: int, what: str) -> None:
        """A floating-point tensor of `rank` dimensions with finite values (NaN in would be NaN pictures out)."""
        if not isinstance(value, torch.Tensor):
            raise InputTypeError(f"`{name}` must be a torch.Tensor {what}, got {type(value).__name__}.")
        if value.ndim != rank:
            raise ValueError(f"`{name}` must be {what} ({rank} dimensions), got shape {tuple(value.shape)}.")
        if not value.is_floating_point():
            raise InputTypeError(f"`{name}` must be a floating-point tensor {what}, got dtype {value.dtype}.")
        if value.device.type != "meta" and not bool(torch.isfinite(value).all()):
            raise ValueError(f"`{name}` holds NaN or infinite values; it would give NaN pictures.")

    def _check_latents(self, latents, batch_size: int, height: int, width: int) -> None:
        expected = (
            batch_size,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        self._check_tensor("latents", latents, 4, "[batch, channels, height / f, width / f]")
        if tuple(latents.shape) != expected:
            raise ValueError(
                f"`latents` have shape {tuple(latents.shape)}, expected {expected}: (prompts x num_images_per_prompt, "
                f"unet.config.in_channels, height / {self.vae_scale_factor}, width / {self.vae_scale_factor})."
            )

    def _check_condition(
        self, name: str, embeds, batch_sizes: tuple[int, ...] | None = None, queries: int | None = None
    ) -> None:
        """`prompt_embeds` / `negative_prompt_embeds`: `[batch, queries, width]`, `batch` one of `batch_sizes` (None:
        any but 0), `queries` the rows it goes with have (the mllm's dream queries, or those of `prompt_embeds`;
        None: any but 0) and `width` what the UNet reads. A pipeline without an mllm draws from embeddings made
        elsewhere: nothing here needs one."""
        width, source = self._condition_width
        expected = f"[batch, {queries or 'num_dream_queries'}, {width or 'cross_attention_dim'}]"
        self._check_tensor(name, embeds, 3, expected)
        batch, length, channels = embeds.shape
        if width is not None and channels != width:
            raise ValueError(
                f"`{name}` has shape {tuple(embeds.shape)}, expected {expected}: the dream queries' states through the "
                f"condition projector (as `encode_prompt` gives them), as wide as {source} {width}."
            )
        if length == 0 or (queries is not None and length != queries):
            raise ValueError(
                f"`{name}` has shape {tuple(embeds.shape)}, expected {expected}: one state for each of the "
                f"{queries or 'dream'} dream queries, as the rows it goes with."
            )
        if batch == 0:
            raise ValueError(f"`{name}` has no rows (shape {tuple(embeds.shape)}); give one per prompt.")
        if batch_sizes is not None and batch not in batch_sizes:
            raise ValueError(
                f"`{name}` has {batch} rows, expected {' or '.join(map(str, batch_sizes))} (one per prompt)."
            )

    def _check_caption_inputs(
        self,
        prompt,
        image,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        num_images_per_prompt,
        output_type,
        callback_on_step_end_tensor_inputs,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        guidance_scale=None,
        guidance_rescale=None,
        eta=None,
        generator=None,
        callback_on_step_end=None,
    ) -> None:
        """The checks of a caption pipeline's `__call__` (text-to-image, img2img, inpainting): the prompt or its
        embeddings, the pictures of its `<image>` placeholders, the drawing's numbers."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"Unknown output_type {output_type!r}; choose one of {', '.join(map(repr, OUTPUT_TYPES))}."
            )
        checks.NUM_IMAGES_PER_PROMPT.check("num_images_per_prompt", num_images_per_prompt)
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass `prompt` or `prompt_embeds`.")
        if prompt is None and image is not None:
            raise ValueError(
                f"`{self._prompt_images_argument}` goes with the `<image>` placeholders of a `prompt`; with "
                "`prompt_embeds` the pictures are already in the conditioning."
            )
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is not None and (getattr(self, "mllm", None) is None or getattr(self, "processor", None) is None):
            raise ValueError(
                "This pipeline has no mllm and processor to encode a `prompt` with: pass `prompt_embeds` (from "
                "`encode_prompt` of a pipeline that has them), or load the pipeline with its mllm and processor."
            )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if prompt is not None and not (
            isinstance(prompt, str)
            or (isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt))
        ):
            raise InputTypeError(
                "`prompt` must be a string or a list of strings (a caption: the original's text-to-image path "
                f"uses no chat template); got {type(prompt).__name__}."
            )
        self._check_diffusion_inputs(
            height,
            width,
            num_inference_steps,
            timesteps,
            sigmas,
            callback_on_step_end_tensor_inputs,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            eta=eta,
            callback_on_step_end=callback_on_step_end,
        )
        queries = self._num_dream_queries  # the rows an unconditional prompt gets, if the mllm encodes one
        if prompt_embeds is not None:
            self._check_condition("prompt_embeds", prompt_embeds, queries=queries)
            queries = prompt_embeds.shape[1]
        count = len(self._as_prompt_list(prompt)) if prompt is not None else prompt_embeds.shape[0]
        if negative_prompt_embeds is not None:
            # One row per prompt, or one row shared by all (`encode_prompt` expands it).
            self._check_condition(
                "negative_prompt_embeds", negative_prompt_embeds, tuple(sorted({count, 1})), queries=queries
            )
        self._check_pooled_embeds(
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds
        )
        self._check_negative_prompt(negative_prompt, count)
        self._check_generator(generator, count * num_images_per_prompt, "pictures")

    def _check_pooled_embeds(self, prompt_embeds, negative_prompt_embeds, pooled, negative_pooled) -> None:
        """The pooled conditioning goes with the sequence it was pooled from, and only to a decoder that reads it."""
        pairs = (
            ("prompt_embeds", prompt_embeds, "pooled_prompt_embeds", pooled),
            ("negative_prompt_embeds", negative_prompt_embeds, "negative_pooled_prompt_embeds", negative_pooled),
        )
        for name, embeds, pooled_name, pooled_embeds in pairs:
            if not self._takes_pooled:
                if pooled_embeds is not None:
                    raise ValueError(
                        f"`{pooled_name}` was given, but this model has no pooled conditioning (its config has no "
                        "`pooled_projection_dim`; its decoder reads `encoder_hidden_states` only). Leave it out."
                    )
                continue
            if pooled_embeds is not None and embeds is None:
                raise ValueError(f"`{pooled_name}` goes with `{name}`; pass both, or neither.")
            if embeds is None:
                continue
            if pooled_embeds is None:
                raise ValueError(
                    f"With `{name}`, pass `{pooled_name}` too: this model's decoder reads a pooled conditioning "
                    "(SDXL's `text_embeds`); `encode_prompt` gives both."
                )
            expected = (embeds.shape[0], self._pooled_width)
            if tuple(pooled_embeds.shape) != expected:
                raise ValueError(
                    f"`{pooled_name}` has shape {tuple(pooled_embeds.shape)}; expected {expected} (one row per row of "
                    f"`{name}`, `pooled_projection_dim` wide)."
                )

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        image: Any = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        r"""
        The UNet conditioning of the prompts, as the original's text-to-image path: BOS + caption (no chat template),
        then the dream block; the normed hidden states at the query slots through the condition projector.

        The unconditional rows are the negative prompts (or `""`, i.e. `<s>` alone) through the same path. Conditional
        and unconditional rows go through the language model in one left-padded batch.

        With a pooled projector (`pooled_projection_dim`, for SDXL-style decoders) the same pass also gives the pooled
        conditioning (`text_embeds`); given `prompt_embeds` (`negative_prompt_embeds`) then need
        `pooled_prompt_embeds` (`negative_pooled_prompt_embeds`).

        Returns:
            As SDXL's `encode_prompt`: `(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
            negative_pooled_prompt_embeds)`, the first two `[batch * num_images_per_prompt, Q, cross_attention_dim]`,
            the pooled ones `[batch * num_images_per_prompt, pooled_projection_dim]` (`None` for a decoder that reads
            no pooled conditioning); the negative ones are `None` without guidance.
        """
        pooled = self._takes_pooled
        if pooled and prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError(
                "With `prompt_embeds`, pass `pooled_prompt_embeds` too: this model's decoder reads a pooled "
                "conditioning (`pooled_projection_dim`); `encode_prompt` gives both."
            )
        if pooled and do_classifier_free_guidance and negative_prompt_embeds is not None:
            if negative_pooled_prompt_embeds is None:
                raise ValueError(
                    "With `negative_prompt_embeds`, pass `negative_pooled_prompt_embeds` too: this model's decoder "
                    "reads a pooled conditioning; `encode_prompt` gives both."
                )
        cond_texts = self._as_prompt_list(prompt) if prompt_embeds is None else []
        batch_size = len(cond_texts) if prompt_embeds is None else prompt_embeds.shape[0]
        cond_images = self._per_prompt_images(image, len(cond_texts)) if cond_texts else None

        uncond_texts = []
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                uncond_texts = [""]  # one `<s>` row, shared by the whole batch
            elif isinstance(negative_prompt, str):
                uncond_texts = [negative_prompt]
            else:
                uncond_texts = list(negative_prompt)

        if (cond_texts or uncond_texts) and (
            getattr(self, "mllm", None) is None or getattr(self, "processor", None) is None
        ):
            needed = "`prompt_embeds`" + (" and `negative_prompt_embeds`" if uncond_texts else "")
            raise ValueError(
                f"This pipeline has no mllm and processor to encode prompts with: pass {needed} (from `encode_prompt` "
                "of a pipeline that has them), or load the pipeline with its mllm and processor."
            )
        if cond_texts or uncond_texts:
            per_row_images = None if cond_images is None else [[] for _ in uncond_texts] + cond_images
            embeds, pooled_embeds = self._dream_embeddings(uncond_texts + cond_texts, per_row_images, device)
            if prompt_embeds is None:
                prompt_embeds = embeds[len(uncond_texts) :]
                if pooled_embeds is not None:
                    pooled_prompt_embeds = pooled_embeds[len(uncond_texts) :]
            if uncond_texts:
                negative_prompt_embeds = embeds[: len(uncond_texts)]
                if pooled_embeds is not None:
                    negative_pooled_prompt_embeds = pooled_embeds[: len(uncond_texts)]
        if not pooled:
            pooled_prompt_embeds = negative_pooled_prompt_embeds = None

        dtype = self.unet.dtype if self.unet is not None else prompt_embeds.dtype

        def per_picture(embeds: torch.Tensor | None, unconditional: bool) -> torch.Tensor | None:
            if embeds is None:
                return None
            embeds = embeds.to(device=device, dtype=dtype)
            if unconditional and embeds.shape[0] == 1 and batch_size > 1:
                embeds = embeds.expand(batch_size, *embeds.shape[1:])
            return embeds.repeat_interleave(num_images_per_prompt, dim=0)

        prompt_embeds = per_picture(prompt_embeds, False)
        pooled_prompt_embeds = per_picture(pooled_prompt_embeds, False)
        if do_classifier_free_guidance:
            negative_prompt_embeds = per_picture(negative_prompt_embeds, True)
            negative_pooled_prompt_embeds = per_picture(negative_pooled_prompt_embeds, True)
        else:
            negative_prompt_embeds = negative_pooled_prompt_embeds = None
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    # ----------------------------------------------------------------------------------------------------------------
    # Diffusion

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        shape = (
            batch_size,
            num_channels_latents,
            int(height) // self.vae_scale_factor,
            int(width) // self.vae_scale_factor,
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got a list of {len(generator)} generators for {batch_size} pictures; give one per "
                "picture (batch size x num_images_per_prompt), or a single generator."
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` have shape {tuple(latents.shape)}, expected {shape}.")
            latents = latents.to(device=device, dtype=dtype)  # float64 latents would not meet a float32 UNet
        return latents * self.scheduler.init_noise_sigma

    def prepare_extra_step_kwargs(self, generator, eta):
        parameters = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in parameters:
            kwargs["eta"] = eta
        if "generator" in parameters:
            kwargs["generator"] = generator
        return kwargs

    def _denoise(
        self,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        latents: torch.Tensor,
        diffusion: DiffusionSettings,
        extra_step_kwargs: dict,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        schedule: tuple[torch.Tensor, int] | None = None,
        extra_channels: torch.Tensor | None = None,
        after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The Stable Diffusion denoising loop with `[uncond, cond]` guidance (uncond first, as the original); the
        UNet also gets what its config asks for (`added_cond_kwargs`: SDXL's pooled `text_embeds` and `time_ids`).

        Starting from a picture: `schedule` is `(timesteps, num_inference_steps)` of `get_timesteps` (the default is
        the whole schedule), `extra_channels` are put after the latents in every UNet input (an inpainting UNet's
        mask and masked-picture latents, one row per picture), and `after_step(i, latents)` returns the latents the
        loop goes on with after step `i` (before `callback_on_step_end`: the inpainting pipeline puts the kept
        region back there)."""
        if schedule is None:
            schedule = retrieve_timesteps(
                self.scheduler, diffusion.num_inference_steps, latents.device, diffusion.timesteps, diffusion.sigmas
            )
        timesteps, num_inference_steps = schedule
        if extra_channels is not None and self.do_classifier_free_guidance:
            extra_channels = torch.cat([extra_channels] * 2)
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            if pooled_prompt_embeds is not None:
                pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds])
        added = added_cond_kwargs(self.unet.config, pooled_prompt_embeds, diffusion.height, diffusion.width)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                if extra_channels is not None:
                    latent_model_input = torch.cat([latent_model_input, extra_channels], dim=1)
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    added_cond_kwargs=added,
                    return_dict=False,
                )[0]
                if self.do_classifier_free_guidance:
                    noise_pred = guided_noise(*noise_pred.chunk(2), self.guidance_scale, self.guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if after_step is not None:
                    latents = after_step(i, latents)

                if diffusion.callback_on_step_end is not None:
                    tensors = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {k: tensors[k] for k in diffusion.callback_on_step_end_tensor_inputs}
                    callback_outputs = diffusion.callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        return latents

    def _draw_latents(
        self,
        prompt_embeds,
        negative_prompt_embeds,
        generator,
        diffusion: DiffusionSettings,
        latents=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
    ) -> torch.Tensor:
        """Denoised latents for every row of `prompt_embeds` (with its pooled row for SDXL-style decoders); the
        initial noise is the first draw from `generator`, as in the original."""
        latents = self.prepare_latents(
            prompt_embeds.shape[0],
            self.unet.config.in_channels,
            diffusion.height,
            diffusion.width,
            prompt_embeds.dtype,
            prompt_embeds.device,
            generator,
            latents,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, diffusion.eta)
        return self._denoise(
            prompt_embeds,
            negative_prompt_embeds,
            latents,
            diffusion,
            extra_step_kwargs,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Starting from a picture (img2img and inpainting)

    def get_timesteps(self, num_inference_steps: int, strength: float, device) -> tuple[torch.Tensor, int]:
        """The end of the scheduler's timesteps (already set) that `strength` keeps, as diffusers' img2img: the last
        `int(num_inference_steps * strength)` steps; and how many steps that is."""
        kept = min(int(num_inference_steps * strength), num_inference_steps)
        start = max(num_inference_steps - kept, 0)
        timesteps = self.scheduler.timesteps[start * self.scheduler.order :]
        if hasattr(self.scheduler, "set_begin_index"):  # schedulers that index sigmas by step (Euler, ...)
            self.scheduler.set_begin_index(start * self.scheduler.order)
        return timesteps, num_inference_steps - start

    def _picture_schedule(self, diffusion: DiffusionSettings, strength: float, device) -> tuple[torch.Tensor, int]:
        _, num_inference_steps = retrieve_timesteps(
            self.scheduler, diffusion.num_inference_steps, device, diffusion.timesteps, diffusion.sigmas
        )
        return self.get_timesteps(num_inference_steps, strength, device)

    def _check_strength(self, strength, num_inference_steps, timesteps, sigmas) -> None:
        """`strength` in [0, 1], and large enough to leave at least one denoising step of the schedule."""
        checks.STRENGTH.check("strength", strength)
        steps = len(timesteps) if timesteps is not None else len(sigmas) if sigmas is not None else num_inference_steps
        if int(steps * strength) < 1:
            raise ValueError(
                f"`strength` {strength} leaves no denoising step of {steps} (int(steps x strength) = 0): nothing "
                f"would be drawn. Pass a strength of at least {1 / steps:g}, or more `num_inference_steps`."
            )

    def _check_start_pictures(self, name: str, pictures, count: int | None, needed_for: str) -> list:
        """`image` (or `mask_image`) as a list of pictures: one for every prompt, or one per prompt (of `count`;
        `None`: not checked)."""
        if pictures is None:
            raise ValueError(f"Pass `{name}`: {needed_for}.")
        if isinstance(pictures, torch.Tensor) and pictures.ndim == 4:
            pictures = list(pictures)
        elif isinstance(pictures, np.ndarray) and pictures.ndim == 4:
            pictures = list(pictures)
        elif not isinstance(pictures, (list, tuple)):
            pictures = [pictures]
        if not pictures:
            raise ValueError(f"`{name}` is empty: {needed_for}.")
        kinds = sorted(
            {type(p).__name__ for p in pictures if not isinstance(p, (PIL.Image.Image, np.ndarray, torch.Tensor))}
        )
        if kinds:
            raise InputTypeError(
                f"`{name}` must be a PIL image, a numpy array or a torch tensor (or a list of them); got "
                f"{', '.join(kinds)}."
            )
        if count is not None and len(pictures) not in (1, count):
            raise ValueError(
                f"`{name}` has {len(pictures)} pictures for {count} prompts; give one for all, or one per prompt."
            )
        return list(pictures)

    def _picture_size(self, picture) -> tuple[int, int]:
        """(height, width) of a PIL image, an array `[H, W(, C)]` or a tensor `[C, H, W]` / `[H, W]`."""
        if isinstance(picture, PIL.Image.Image):
            return picture.height, picture.width
        if isinstance(picture, torch.Tensor):
            return tuple(picture.shape[-2:])
        return tuple(picture.shape[:2])

    def _start_size(self, image, height: int | None, width: int | None) -> tuple[int | None, int | None]:
        """`height` and `width`, by default the (first) picture's, rounded down to the VAE factor as diffusers'
        `VaeImageProcessor` does (left as they are when there is no picture to read them from)."""
        first = image[0] if isinstance(image, (list, tuple)) and image else image
        if isinstance(first, (torch.Tensor, np.ndarray)) and first.ndim == 4:
            first = first[0]
        readable = isinstance(first, PIL.Image.Image) or (
            isinstance(first, (torch.Tensor, np.ndarray)) and first.ndim >= 2
        )
        if not readable:
            return height, width
        picture_height, picture_width = self._picture_size(first)
        factor = self.vae_scale_factor
        height = height if height is not None else max(factor, picture_height // factor * factor)
        width = width if width is not None else max(factor, picture_width // factor * factor)
        return height, width

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    @staticmethod
    def _picture_rows(pictures: torch.Tensor, rows: int) -> torch.Tensor:
        """Pictures (one for all prompts, or one per prompt) repeated to one row per picture drawn (prompts x
        `num_images_per_prompt`, in the order of `encode_prompt`'s rows)."""
        return pictures.repeat_interleave(rows // pictures.shape[0], dim=0)

    def _encode_vae_image(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """Pictures in [-1, 1] `[B, 3, H, W]` -> scaled latents, a sample of the VAE's posterior drawn from
        `generator` (a list: one per row, so that a picture's latents do not depend on its batch)."""
        pixels = pixels.to(device=self.vae.device, dtype=self.vae.dtype)

        def encode(rows, rows_generator):
            encoded = self.vae.encode(rows)
            distribution = getattr(encoded, "latent_dist", None)
            return distribution.sample(rows_generator) if distribution is not None else encoded.latents

        if isinstance(generator, list):
            latents = torch.cat([encode(pixels[i : i + 1], g) for i, g in enumerate(generator)])
        else:
            latents = encode(pixels, generator)
        return latents * self.vae.config.scaling_factor

    def _start_latents(self, noise: torch.Tensor, image_latents: torch.Tensor | None, timestep, strength: float):
        """The first latents of the loop: the picture's latents noised to `timestep`; at strength 1 the noise alone
        (as text-to-image, and as diffusers' inpainting pipelines: with a schedule that does not reach pure noise,
        `add_noise` would keep some of the picture)."""
        if strength == 1 or image_latents is None:
            return noise * self.scheduler.init_noise_sigma
        timestep = timestep.reshape(1).repeat(noise.shape[0])
        return self.scheduler.add_noise(image_latents, noise, timestep)

    def _decode(self, latents: torch.Tensor, generator) -> torch.Tensor:
        """Latents -> pictures in [-1, 1] (before `VaeImageProcessor.postprocess`).

        With an SDXL-style decoder, a float16 VAE whose config says `force_upcast` decodes in float32, as
        `StableDiffusionXLPipeline` does (SDXL's VAE overflows in float16). Stable Diffusion 1/2 pipelines ignore the
        flag, and so does this one for their decoders (the release's float16 path stays as it was)."""
        upcast = (
            self.vae.dtype == torch.float16
            and getattr(self.vae.config, "force_upcast", False)
            and takes_pooled(self.unet.config)
        )
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            latents = latents.to(self.vae.dtype)
            return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)

    def _postprocess(self, image: torch.Tensor, output_type: str):
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * image.shape[0])


__all__ = [
    "DiffusionSettings",
    "DreamLLMDiffusionMixin",
    "OUTPUT_TYPES",
    "is_conversation",
    "onload",
    "vae_scale_factor",
]
