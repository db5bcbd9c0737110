"""DreamLLM as a diffusers pipeline: text-to-image, image-to-text, and interleaved documents of text and pictures.

The language model ([`DreamLLMForConditionalGeneration`]) writes text and, when it emits `<dream_start>`, gives the
diffusion conditioning of a picture (its dream queries, read after the context so far); the UNet, VAE and scheduler
draw it; the picture is read back through CLIP into the same key/value cache, and the text goes on from there.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from accelerate.hooks import CpuOffload
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import DynamicCache

from ..modeling.modeling_dreamllm import DreamLLMForConditionalGeneration
from ..modeling.processing_dreamllm import DreamLLMProcessor
from .pipeline_output import DreamLLMPipelineOutput, StopReason

GENERATION_MODES = ("interleaved", "text", "image")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_RESERVED_GENERATE_KWARGS = {
    "eos_token_id",
    "max_new_tokens",
    "max_length",
    "streamer",
    "cache",
    "past_key_values",
    "num_return_sequences",
    "input_ids",
    "attention_mask",
    "pixel_values",
}

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from dreamllm_hf.pipelines import DreamLLMPipeline

        >>> pipe = DreamLLMPipeline.from_pretrained("path/to/dreamllm-7b", dtype=torch.float16).to("cuda")
        >>> image = pipe("a photo of a red bird sitting on a tree branch", generation_mode="image").images[0]
        >>> answer = pipe("<image>What is in the picture?", images=[image], generation_mode="text").text[0]
        >>> out = pipe("Write a short illustrated story about a fox.", max_images=2)
        >>> out.save_html("story.html")
        ```
"""


@dataclass(frozen=True)
class DiffusionSettings:
    """How a picture is drawn, in both modes that draw (the `__call__` arguments of the same names)."""

    height: int
    width: int
    num_inference_steps: int
    timesteps: list[int] | None
    sigmas: list[float] | None
    eta: float
    callback_on_step_end: Callable | None
    callback_on_step_end_tensor_inputs: list[str]


def _onload(module: torch.nn.Module) -> None:
    """Moves a CPU-offloaded model to the execution device before calling a method that is not `forward`.

    `enable_model_cpu_offload` hooks `forward` only; diffusers' `apply_forward_hook` does the same for `vae.decode`.
    Only that offload hook is triggered: `device_map` hooks place their own inputs and need no help.
    """
    hook = getattr(module, "_hf_hook", None)
    if isinstance(hook, CpuOffload):
        hook.pre_forward(module)


def _is_conversation(item: Any) -> bool:
    return isinstance(item, (list, tuple)) and len(item) > 0 and all(isinstance(m, dict) for m in item)


class DreamLLMPipeline(DiffusionPipeline):
    r"""
    DreamLLM (arXiv 2309.11499): a multimodal LLM that reads and draws pictures, with a Stable Diffusion decoder.

    Three generation modes share one `__call__`:

    * `"image"`: text-to-image as the original's `stable_diffusion_pipeline` (BOS + caption, no chat template;
      classifier-free guidance against `<s>` alone or the negative prompt through the same path).
    * `"text"`: comprehension; the prompt (with `<image>` placeholders and `images`) goes through the Vicuna chat
      template and `mllm.generate`.
    * `"interleaved"` (default): the model writes a document; every `<dream_start>` it emits becomes a picture.

    Args:
        mllm ([`DreamLLMForConditionalGeneration`]): the language model with its vision tower and dream queries.
        processor ([`DreamLLMProcessor`]): tokenizer, CLIP image processor and chat template.
        unet ([`UNet2DConditionModel`], *optional*): the denoiser; `encoder_hidden_states` are the dream embeddings.
        vae ([`AutoencoderKL`], *optional*): decodes latents to pictures.
        scheduler ([`SchedulerMixin`], *optional*): the original samples with `DDPMScheduler`; any diffusers
            scheduler works. `unet`, `vae` and `scheduler` may be left out for a text-only pipeline.
    """

    model_cpu_offload_seq = "mllm->unet->vae"
    _optional_components = ["unet", "vae", "scheduler"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        mllm: DreamLLMForConditionalGeneration,
        processor: DreamLLMProcessor,
        unet: UNet2DConditionModel | None = None,
        vae: AutoencoderKL | None = None,
        scheduler: SchedulerMixin | None = None,
    ):
        super().__init__()
        self.register_modules(mllm=mllm, processor=processor, unet=unet, vae=vae, scheduler=scheduler)
        vae = getattr(self, "vae", None)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

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
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

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

    @property
    def image_block_length(self) -> int:
        """Positions one drawn picture takes: its dream block (Q + 2) and its CLIP block (N + 2)."""
        config = self.mllm.config
        return config.num_dream_queries + 2 + config.num_image_tokens + 2

    # ----------------------------------------------------------------------------------------------------------------
    # Prompt handling

    def _as_prompt_list(self, prompt) -> list:
        if isinstance(prompt, str) or _is_conversation(prompt):
            return [prompt]
        if isinstance(prompt, (list, tuple)) and len(prompt) > 0:
            return list(prompt)
        raise ValueError(
            f"`prompt` must be a string, a conversation (list of message dicts) or a non-empty list of those; "
            f"got {type(prompt).__name__}."
        )

    def _per_prompt_images(self, images, batch_size: int) -> list[list] | None:
        """`images` as one list per prompt: one prompt takes a picture or a flat list; a batch, one list per prompt."""
        if images is None:
            return None
        if batch_size == 1 and not (
            isinstance(images, (list, tuple)) and len(images) == 1 and isinstance(images[0], (list, tuple))
        ):
            return [list(images) if isinstance(images, (list, tuple)) else [images]]
        if not isinstance(images, (list, tuple)) or len(images) != batch_size:
            raise ValueError(
                f"With {batch_size} prompts, give `images` as {batch_size} lists (one per prompt, empty for a prompt "
                "without `<image>`)."
            )
        return [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]

    def format_chat_prompt(self, prompt: str | list[dict]) -> str:
        """
        The Vicuna v1.1 prompt of a user message (a string) or a conversation (a list of `{"role", "content"}` dicts),
        ending in `"ASSISTANT:"` so that the model answers.
        """
        conversation = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def _tokenize(self, texts: list[str], images: list[list] | None, device: torch.device):
        """Left-padded ids (BOS + text, placeholders expanded), attention mask and CLIP pixel values (or None)."""
        encoded = self.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        pixel_values = encoded.get("pixel_values")
        if pixel_values is not None:
            pixel_values = pixel_values.to(device)
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device), pixel_values

    def _check_prompt_length(self, attention_mask: torch.Tensor, reserve: int, what: str) -> None:
        longest = int(attention_mask.sum(-1).max())
        if longest + reserve > self.max_context_length:
            raise ValueError(
                f"The prompt takes {longest} positions and {what} needs {reserve} more, but the model's context is "
                f"{self.max_context_length} positions (`text_config.max_position_embeddings`). Shorten the prompt or "
                "pass fewer images (each `<image>` takes "
                f"{self.mllm.config.num_image_tokens + 2} positions)."
            )

    def _dream_embeddings(self, texts: list[str], images: list[list] | None, device) -> torch.Tensor:
        """Dream embeddings after BOS + each text, all rows in one left-padded language-model pass (no logits)."""
        input_ids, attention_mask, pixel_values = self._tokenize(texts, images, device)
        self._check_prompt_length(attention_mask, self.mllm.config.num_dream_queries + 2, "the dream block")
        _onload(self.mllm)
        return self.mllm.get_dream_embeddings(input_ids, attention_mask=attention_mask, pixel_values=pixel_values)

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        images: Any = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""
        The UNet conditioning of the prompts, as the original's text-to-image path: BOS + caption (no chat template),
        then the dream block; the normed hidden states at the query slots through the condition projector.

        The unconditional rows are the negative prompts (or `""`, i.e. `<s>` alone) through the same path. Conditional
        and unconditional rows go through the language model in one left-padded batch.

        Returns:
            `(prompt_embeds, negative_prompt_embeds)`, each `[batch * num_images_per_prompt, Q, cross_attention_dim]`;
            `negative_prompt_embeds` is `None` without guidance.
        """
        cond_texts = self._as_prompt_list(prompt) if prompt_embeds is None else []
        batch_size = len(cond_texts) if prompt_embeds is None else prompt_embeds.shape[0]
        cond_images = self._per_prompt_images(images, len(cond_texts)) if cond_texts else None

        uncond_texts = []
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                uncond_texts = [""]  # one `<s>` row, shared by the whole batch
            elif isinstance(negative_prompt, str):
                uncond_texts = [negative_prompt]
            else:
                uncond_texts = list(negative_prompt)

        if cond_texts or uncond_texts:
            per_row_images = None if cond_images is None else [[] for _ in uncond_texts] + cond_images
            embeds = self._dream_embeddings(uncond_texts + cond_texts, per_row_images, device)
            if prompt_embeds is None:
                prompt_embeds = embeds[len(uncond_texts) :]
            if uncond_texts:
                negative_prompt_embeds = embeds[: len(uncond_texts)]

        dtype = self.unet.dtype if self.unet is not None else prompt_embeds.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
            if negative_prompt_embeds.shape[0] == 1 and batch_size > 1:
                negative_prompt_embeds = negative_prompt_embeds.expand(batch_size, -1, -1)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        else:
            negative_prompt_embeds = None
        return prompt_embeds, negative_prompt_embeds

    # ----------------------------------------------------------------------------------------------------------------
    # Checks

    def check_inputs(
        self,
        generation_mode,
        prompt,
        images,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        latents,
        num_images_per_prompt,
        max_new_tokens,
        max_images,
        output_type,
        callback_on_step_end_tensor_inputs,
    ):
        if generation_mode not in GENERATION_MODES:
            raise ValueError(
                f"Unknown generation_mode {generation_mode!r}; choose one of {', '.join(map(repr, GENERATION_MODES))}."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"Unknown output_type {output_type!r}; choose one of {', '.join(map(repr, OUTPUT_TYPES))}."
            )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")

        if generation_mode != "image":
            for name, value in (
                ("prompt_embeds", prompt_embeds),
                ("negative_prompt_embeds", negative_prompt_embeds),
                ("latents", latents),
            ):
                if value is not None:
                    raise ValueError(
                        f"`{name}` applies to generation_mode='image' only; the {generation_mode} mode "
                        "computes the conditioning from the document as it is written."
                    )
            if prompt is None:
                raise ValueError(f"generation_mode={generation_mode!r} needs a `prompt`.")
            if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise ValueError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}.")
        else:
            if prompt is None and prompt_embeds is None:
                raise ValueError("Pass `prompt` or `prompt_embeds`.")
            if prompt is None and images is not None:
                raise ValueError(
                    "`images` go with the `<image>` placeholders of a `prompt`; with `prompt_embeds` the "
                    "pictures are already in the conditioning."
                )
            if prompt is not None and prompt_embeds is not None:
                raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
            if negative_prompt is not None and negative_prompt_embeds is not None:
                raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
            if prompt is not None and not (
                isinstance(prompt, str)
                or (isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt))
            ):
                raise ValueError(
                    "In generation_mode='image', `prompt` must be a string or a list of strings (a "
                    "caption: the original's text-to-image path uses no chat template)."
                )
            if (
                prompt_embeds is not None
                and negative_prompt_embeds is not None
                and prompt_embeds.shape != negative_prompt_embeds.shape
            ):
                raise ValueError(
                    f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                    f"{tuple(negative_prompt_embeds.shape)} must have the same shape."
                )
        if generation_mode == "interleaved" and output_type == "latent":
            raise ValueError(
                "generation_mode='interleaved' decodes every picture to read it back; choose "
                "output_type 'pil', 'np' or 'pt'."
            )
        if max_images is not None and (not isinstance(max_images, int) or max_images < 0):
            raise ValueError(f"`max_images` must be a non-negative integer or None, got {max_images!r}.")

        if negative_prompt is not None and not isinstance(negative_prompt, str):
            count = len(self._as_prompt_list(prompt)) if prompt is not None else prompt_embeds.shape[0]
            if len(negative_prompt) != count:
                raise ValueError(
                    f"`negative_prompt` has {len(negative_prompt)} entries for {count} prompts; give one "
                    "per prompt, or a single string."
                )
        if negative_prompt is not None:
            for text in [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt:
                if "<image>" in text or "<dream>" in text:
                    raise ValueError("`negative_prompt` cannot hold `<image>` or `<dream>`: it takes no pictures.")

        if generation_mode in ("image", "interleaved"):
            missing = [name for name in ("unet", "vae", "scheduler") if getattr(self, name, None) is None]
            if missing:
                raise ValueError(
                    f"generation_mode={generation_mode!r} draws pictures, but this pipeline has no "
                    f"{', '.join(missing)}; load them, or use generation_mode='text'."
                )
            if height % self.vae_scale_factor != 0 or width % self.vae_scale_factor != 0:
                raise ValueError(
                    f"`height` and `width` must be divisible by the VAE factor {self.vae_scale_factor}, "
                    f"got {height}x{width}; round them to a multiple of {self.vae_scale_factor}."
                )
            if (
                timesteps is None
                and sigmas is None
                and (not isinstance(num_inference_steps, int) or num_inference_steps < 1)
            ):
                raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {unknown}; allowed: {self._callback_tensor_inputs}."
            )

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
            latents = latents.to(device)
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
    ) -> torch.Tensor:
        """The Stable Diffusion denoising loop with `[uncond, cond]` guidance (uncond first, as the original)."""
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, diffusion.num_inference_steps, latents.device, diffusion.timesteps, diffusion.sigmas
        )
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                noise_pred = self.unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
                if self.do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
                    if self.guidance_rescale > 0.0:
                        noise_pred = rescale_noise_cfg(
                            noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale
                        )
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

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

    def _decode(self, latents: torch.Tensor, generator) -> torch.Tensor:
        """Latents -> pictures in [-1, 1] (before `VaeImageProcessor.postprocess`)."""
        latents = latents.to(self.vae.dtype)
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]

    def _postprocess(self, image: torch.Tensor, output_type: str):
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * image.shape[0])

    # ----------------------------------------------------------------------------------------------------------------
    # Text

    def _generation_kwargs(self, generation_mode: str, sampling: dict, generation_kwargs: dict | None) -> dict:
        """Arguments for `mllm.generate`: the given sampling options, and the format tokens the model must not emit."""
        config = self.mllm.config
        reserved = sorted(set(generation_kwargs or {}) & _RESERVED_GENERATE_KWARGS)
        if reserved:
            raise ValueError(
                f"`generation_kwargs` may not set {reserved}: the pipeline sets them (use the "
                "`max_new_tokens`, `num_images_per_prompt` and `streamer` arguments)."
            )
        kwargs = {k: v for k, v in sampling.items() if v is not None}
        kwargs.update(generation_kwargs or {})
        # Block tokens are never training targets (only `<dream_start>` is, and only where pictures are drawn); a
        # sampled one would break the token-stream format, so they are suppressed.
        never = [
            config.image_start_token_id,
            config.image_patch_token_id,
            config.image_end_token_id,
            config.dream_end_token_id,
            config.image_token_id,
            config.dream_token_id,
            config.pad_token_id,
        ]
        if generation_mode == "text":
            never.append(config.dream_start_token_id)
        kwargs["suppress_tokens"] = sorted(set(list(kwargs.get("suppress_tokens") or []) + never))
        kwargs.setdefault("pad_token_id", config.pad_token_id)
        return kwargs

    def _decode_text(self, token_ids: torch.Tensor) -> str:
        return self.tokenizer.decode(token_ids.tolist(), skip_special_tokens=True)

    def _text_stop_reason(self, new_tokens: torch.Tensor, budget: int, max_new_tokens: int) -> tuple[torch.Tensor, str]:
        """The text tokens of one generated row (up to `</s>`) and why it ended."""
        eos = self.mllm.config.eos_token_id
        hits = (new_tokens == eos).nonzero()
        if hits.numel():
            return new_tokens[: int(hits[0])], StopReason.EOS
        reason = StopReason.MAX_NEW_TOKENS if budget >= max_new_tokens else StopReason.CONTEXT_LIMIT
        return new_tokens, reason

    def _generate_text(self, texts, images, device, num_outputs, max_new_tokens, generate_kwargs, streamer):
        if num_outputs > 1:  # repeat rows (greedy `generate` refuses num_return_sequences > 1)
            texts = [text for text in texts for _ in range(num_outputs)]
            if images is not None:
                images = [list(per_prompt) for per_prompt in images for _ in range(num_outputs)]
        input_ids, attention_mask, pixel_values = self._tokenize(texts, images, device)
        self._check_prompt_length(attention_mask, 1, "the answer")
        budget = min(max_new_tokens, self.max_context_length - input_ids.shape[1])
        output = self.mllm.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            max_new_tokens=budget,
            streamer=streamer,
            **generate_kwargs,
        )
        texts_out, reasons = [], []
        for row in output[:, input_ids.shape[1] :]:
            tokens, reason = self._text_stop_reason(row, budget, max_new_tokens)
            texts_out.append(self._decode_text(tokens))
            reasons.append(reason)
        return texts_out, reasons

    # ----------------------------------------------------------------------------------------------------------------
    # Interleaved documents

    def _read_back_picture(self, picture: PIL.Image.Image, cache: DynamicCache, past_length: int) -> None:
        """Feeds `<im_start>` + the picture's CLIP features into `cache` (`<im_end>` is left for the next step)."""
        mllm = self.mllm
        device = mllm.device
        pixel_values = self.processor.image_processor([picture], return_tensors="pt")["pixel_values"].to(device)
        features = mllm.get_image_features(pixel_values)
        start = mllm.get_input_embeddings()(torch.tensor([[mllm.config.image_start_token_id]], device=device))
        inputs_embeds = torch.cat([start, features.to(start.dtype)], dim=1)
        attention_mask = torch.ones(1, past_length + inputs_embeds.shape[1], dtype=torch.long, device=device)
        mllm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=1)

    def _write_document(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        generator,
        max_new_tokens: int,
        max_images: int | None,
        output_type: str,
        generate_kwargs: dict,
        streamer,
        diffusion: DiffusionSettings,
    ) -> tuple[list, str]:
        """
        One document: decode with a KV cache until `<dream_start>`, draw, read the picture back into the same cache,
        go on. Nothing already in the cache is recomputed. Returns its segments and why it stopped.
        """
        config = self.mllm.config
        device = input_ids.device
        eos, dream_start = config.eos_token_id, config.dream_start_token_id
        # A drawn picture in the stream: its dream block and its CLIP block. The stream then ends in `<im_end>`, which
        # the next `generate` call feeds (it needs one uncached token to sample from).
        picture_ids = torch.tensor(
            [
                [dream_start]
                + [config.image_patch_token_id] * config.num_dream_queries
                + [config.dream_end_token_id, config.image_start_token_id]
                + [config.image_patch_token_id] * config.num_image_tokens
                + [config.image_end_token_id]
            ],
            device=device,
        )
        cache = DynamicCache(config=config.text_config)
        stream = input_ids  # the document's token stream in the training format; the cache holds all but its tail
        segments, tokens_left, pictures = [], max_new_tokens, 0

        while True:
            budget = min(tokens_left, self.max_context_length - stream.shape[1])
            if budget <= 0:
                return segments, StopReason.MAX_NEW_TOKENS if tokens_left <= 0 else StopReason.CONTEXT_LIMIT
            _onload(self.mllm)
            output = self.mllm.generate(
                input_ids=stream,
                attention_mask=torch.ones_like(stream),
                pixel_values=pixel_values,
                cache=cache,
                max_new_tokens=budget,
                eos_token_id=[eos, dream_start],
                streamer=streamer,
                **generate_kwargs,
            )
            pixel_values = None  # the prompt's pictures are in the cache now
            new_tokens = output[0, stream.shape[1] :]
            tokens_left -= new_tokens.numel()
            last = int(new_tokens[-1])
            text = self._decode_text(new_tokens[:-1] if last in (eos, dream_start) else new_tokens)
            if text.strip():
                segments.append(text)
            if last == eos:
                return segments, StopReason.EOS
            if last != dream_start:
                return segments, StopReason.MAX_NEW_TOKENS if tokens_left <= 0 else StopReason.CONTEXT_LIMIT
            if max_images is not None and pictures >= max_images:
                return segments, StopReason.MAX_IMAGES
            stream = output[:, :-1]  # `<dream_start>` is fed by get_dream_embeddings, with the queries
            if stream.shape[1] + self.image_block_length > self.max_context_length:
                return segments, StopReason.CONTEXT_LIMIT

            _onload(self.mllm)
            past = torch.ones(1, stream.shape[1], dtype=torch.long, device=device)
            prompt_embeds = self.mllm.get_dream_embeddings(stream[:, :0], attention_mask=past, cache=cache)
            prompt_embeds = prompt_embeds.to(self.unet.dtype)
            latents = self._draw_latents(prompt_embeds, negative_prompt_embeds, generator, diffusion)
            picture = self._decode(latents, generator)
            as_pil = self._postprocess(picture, "pil")[0]  # CLIP reads the picture as it is saved (8-bit)
            segments.append(as_pil if output_type == "pil" else self._postprocess(picture, output_type)[0])
            _onload(self.mllm)
            self._read_back_picture(as_pil, cache, cache.get_seq_length())
            stream = torch.cat([stream, picture_ids], dim=1)
            pictures += 1

    def _draw_latents(
        self, prompt_embeds, negative_prompt_embeds, generator, diffusion: DiffusionSettings, latents=None
    ) -> torch.Tensor:
        """Denoised latents for every row of `prompt_embeds`; the initial noise is the first draw from `generator`,
        as in the original."""
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
        return self._denoise(prompt_embeds, negative_prompt_embeds, latents, diffusion, extra_step_kwargs)

    # ----------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | list[dict] | None = None,
        images: Any = None,
        generation_mode: str = "interleaved",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        use_chat_template: bool = True,
        max_new_tokens: int = 256,
        max_images: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        generation_kwargs: dict | None = None,
        streamer=None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ) -> DreamLLMPipelineOutput | tuple:
        r"""
        Writes text, draws pictures, or both.

        Args:
            prompt (`str`, `list[str]`, or a conversation `list[dict]`, or a list of conversations):
                "image" mode: the caption(s), tokenized as BOS + caption with no chat template (as the original).
                "text"/"interleaved": a user message (wrapped in the Vicuna v1.1 chat template ending in
                `"ASSISTANT:"`), or a conversation of `{"role", "content"}` dicts given to the chat template. Pass
                `use_chat_template=False` to give an already formatted prompt string as it is. `<image>` marks where a
                picture of `images` goes.
            images: the pictures for the `<image>` placeholders (PIL images, arrays or tensors): for one prompt one
                picture or a list; for several prompts one list per prompt (empty for a prompt without any).
            generation_mode (`str`, defaults to `"interleaved"`): `"interleaved"`, `"text"` or `"image"`.
            height, width (`int`, *optional*): picture size; defaults to `unet.config.sample_size * vae_scale_factor`.
                Must be divisible by the VAE factor.
            num_inference_steps (`int`, defaults to 50), timesteps, sigmas: the denoising schedule.
            guidance_scale (`float`, defaults to 7.5): classifier-free guidance; `<= 1` turns guidance off (no
                unconditional pass). The original's scripts use 2.0 to 7.5 (3.5 for the aesthetic model).
            guidance_rescale (`float`, defaults to 0.0): as in `StableDiffusionPipeline`.
            negative_prompt (`str` or `list[str]`, *optional*): what the unconditional rows read instead of `""`.
            num_images_per_prompt (`int`, defaults to 1): outputs per prompt: pictures in "image" mode, independent
                documents or answers in the other modes.
            eta (`float`): for DDIM-like schedulers; ignored by DDPM (as the original).
            generator (`torch.Generator` or a list): seeds the diffusion noise (one per picture in "image" mode, one
                per document in "interleaved" mode). Text sampling uses the global RNG (`torch.manual_seed`).
            latents (`torch.Tensor`, *optional*): "image" mode: initial latents instead of drawing them.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): "image" mode: UNet
                `encoder_hidden_states` `[batch, Q, cross_attention_dim]` (after the condition projector).
            use_chat_template (`bool`, defaults to `True`): see `prompt`.
            max_new_tokens (`int`, defaults to 256): tokens the model may sample per document ("text" and
                "interleaved"; picture blocks do not count).
            max_images (`int`, *optional*): "interleaved": stop when the model asks for one picture more.
            do_sample, temperature, top_p, top_k, repetition_penalty: text sampling, passed to `generate` (unset
                ones come from the model's `generation_config`).
            generation_kwargs (`dict`, *optional*): any other `generate` argument (for example `logits_processor`).
            streamer (`BaseStreamer`, *optional*): receives the text tokens as they are sampled.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"` ("image" mode only).
            return_dict (`bool`, defaults to `True`): return a [`DreamLLMPipelineOutput`] instead of a tuple.
            callback_on_step_end, callback_on_step_end_tensor_inputs: called after each denoising step, as in
                `StableDiffusionPipeline` (with `latents`, `prompt_embeds`, `negative_prompt_embeds`).

        Examples:

        Returns:
            [`DreamLLMPipelineOutput`] or `tuple` `(images, text, documents, stop_reasons)` with the `None` fields
            left out (`text` is `None` in "image" mode).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to the UNet's
        if getattr(self, "unet", None) is not None:
            height = height or self.unet.config.sample_size * self.vae_scale_factor
            width = width or self.unet.config.sample_size * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(
            generation_mode,
            prompt,
            images,
            height,
            width,
            num_inference_steps,
            timesteps,
            sigmas,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            latents,
            num_images_per_prompt,
            max_new_tokens,
            max_images,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._interrupt = False
        self._num_timesteps = 0

        # 2. Define call parameters
        device = self._execution_device
        prompts = self._as_prompt_list(prompt) if prompt is not None else None
        per_prompt_images = self._per_prompt_images(images, len(prompts)) if prompts is not None else None
        sampling = dict(
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
        )

        diffusion = DiffusionSettings(
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            eta=eta,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

        if generation_mode == "image":
            output = self._text_to_image(
                prompts,
                per_prompt_images,
                negative_prompt,
                num_images_per_prompt,
                generator,
                latents,
                prompt_embeds,
                negative_prompt_embeds,
                output_type,
                diffusion,
                device,
            )
        else:
            texts = [
                p if (isinstance(p, str) and not use_chat_template) else self.format_chat_prompt(p) for p in prompts
            ]
            generate_kwargs = self._generation_kwargs(generation_mode, sampling, generation_kwargs)
            if generation_mode == "text":
                answers, reasons = self._generate_text(
                    texts, per_prompt_images, device, num_images_per_prompt, max_new_tokens, generate_kwargs, streamer
                )
                output = DreamLLMPipelineOutput(
                    images=[[] for _ in answers],
                    text=answers,
                    documents=[[a] if a else [] for a in answers],
                    stop_reasons=reasons,
                )
            else:
                output = self._interleaved(
                    texts,
                    per_prompt_images,
                    negative_prompt,
                    num_images_per_prompt,
                    generator,
                    max_new_tokens,
                    max_images,
                    output_type,
                    generate_kwargs,
                    streamer,
                    diffusion,
                    device,
                )

        # Offload all models
        self.maybe_free_model_hooks()
        if not return_dict:
            return output.to_tuple()
        return output

    def _text_to_image(
        self,
        prompts,
        per_prompt_images,
        negative_prompt,
        num_images_per_prompt,
        generator,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        output_type,
        diffusion: DiffusionSettings,
        device,
    ) -> DreamLLMPipelineOutput:
        # 3. Encode the prompt (one batched language-model pass for the conditional and unconditional rows)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompts,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            per_prompt_images,
            prompt_embeds,
            negative_prompt_embeds,
        )
        # 4-6. Latents, step kwargs and the denoising loop (shared with the interleaved mode's pictures)
        latents = self._draw_latents(prompt_embeds, negative_prompt_embeds, generator, diffusion, latents)
        # 7. Decode and postprocess
        if output_type == "latent":
            images = latents
        else:
            images = self._postprocess(self._decode(latents, generator), output_type)
        documents = [[images[i]] for i in range(len(images))]
        return DreamLLMPipelineOutput(
            images=images, text=None, documents=documents, stop_reasons=[StopReason.IMAGE] * len(documents)
        )

    def _interleaved(
        self,
        texts,
        per_prompt_images,
        negative_prompt,
        num_documents_per_prompt,
        generator,
        max_new_tokens,
        max_images,
        output_type,
        generate_kwargs,
        streamer,
        diffusion,
        device,
    ):
        """One document at a time (each has its own cache and pictures); batched prompts are looped over."""
        if generate_kwargs.get("num_beams", 1) > 1:
            raise ValueError(
                "generation_mode='interleaved' samples one sequence per document; `num_beams` > 1 is not "
                "supported (its cache would not follow the chosen beam)."
            )
        total = len(texts) * num_documents_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(
                f"Got {len(generator)} generators for {total} documents; give one per document "
                "(prompts x num_images_per_prompt), or a single generator."
            )
        documents, reasons, shared_uncond = [], [], None
        for index, text in enumerate(texts):
            images = [per_prompt_images[index]] if per_prompt_images is not None else None
            input_ids, attention_mask, pixel_values = self._tokenize([text], images, device)
            self._check_prompt_length(attention_mask, 1, "the answer")
            negative = None
            if self.do_classifier_free_guidance:  # the unconditional is computed once per prompt and reused
                if negative_prompt is None:
                    if shared_uncond is None:
                        shared_uncond = self._dream_embeddings([""], None, device).to(self.unet.dtype)
                    negative = shared_uncond
                else:
                    row = negative_prompt if isinstance(negative_prompt, str) else negative_prompt[index]
                    negative = self._dream_embeddings([row], None, device).to(self.unet.dtype)
            for copy in range(num_documents_per_prompt):
                document_index = index * num_documents_per_prompt + copy
                doc_generator = generator[document_index] if isinstance(generator, list) else generator
                segments, reason = self._write_document(
                    input_ids,
                    pixel_values,
                    negative,
                    doc_generator,
                    max_new_tokens,
                    max_images,
                    output_type,
                    generate_kwargs,
                    streamer,
                    diffusion,
                )
                documents.append(segments)
                reasons.append(reason)
        return DreamLLMPipelineOutput(
            images=[[s for s in doc if not isinstance(s, str)] for doc in documents],
            text=["\n".join(s for s in doc if isinstance(s, str)) for doc in documents],
            documents=documents,
            stop_reasons=reasons,
        )


__all__ = ["DreamLLMPipeline"]
