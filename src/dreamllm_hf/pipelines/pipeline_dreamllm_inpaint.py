"""DreamLLM inpainting, shaped like `StableDiffusionInpaintPipeline`: the masked region of a picture is redrawn under
the caption's dream conditioning, the rest is kept."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ..decoder_conditioning import inpainting_channels
from ..modeling.modeling_dreamllm import DreamLLMForConditionalGeneration
from ..modeling.processing_dreamllm import DreamLLMProcessor
from .dream_diffusion import DiffusionSettings, DreamLLMDiffusionMixin
from .lora_loading import DreamLLMLoraLoaderMixin


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import load_image
        >>> from dreamllm_hf.pipelines import DreamLLMInpaintPipeline

        >>> pipe = DreamLLMInpaintPipeline.from_pretrained("path/to/dreamllm-7b", dtype=torch.float16).to("cuda")
        >>> photo, mask = load_image("dog.png").resize((512, 512)), load_image("dog_mask.png").resize((512, 512))
        >>> image = pipe("a cat sitting on a bench", image=photo, mask_image=mask).images[0]
        >>> # or from a pipeline of the same folder: DreamLLMInpaintPipeline.from_pipe(text2image_pipe)
        ```
"""


class DreamLLMInpaintPipeline(
    DreamLLMDiffusionMixin, DiffusionPipeline, StableDiffusionMixin, DreamLLMLoraLoaderMixin
):
    r"""
    Inpainting with DreamLLM, as `StableDiffusionInpaintPipeline`: where `mask_image` is white the picture is redrawn
    under the dream conditioning of the caption, where it is black the picture is kept.

    Any Stable Diffusion UNet the model conditions works, as diffusers' inpainting pipeline takes a text-to-image UNet:
    at every step the kept region's latents, noised to the step's timestep, are put back, and at the end the kept
    region is the picture's own latents. An inpainting UNet (`unet.config.in_channels` = 2 x latent channels + 1, 9
    for Stable Diffusion) reads the mask and the masked picture's latents beside the latents instead.

    `strength` (default 1: from noise) starts the masked region from the picture noised part of the way, as in
    img2img. The prompt takes the same forms as text-to-image; pictures for its `<image>` placeholders are
    `prompt_image`, since `image` is the picture to repaint (as in diffusers).

    Loads from the same folder as [`DreamLLMPipeline`] and [`DreamLLMText2ImagePipeline`], or shares their components
    with `from_pipe`; `AutoPipelineForInpainting` finds it from a DreamLLM folder.

    Args:
        mllm ([`DreamLLMForConditionalGeneration`]): the language model with its vision tower and dream queries.
        processor ([`DreamLLMProcessor`]): tokenizer and CLIP image processor (for `<image>` in a caption).
        unet ([`UNet2DConditionModel`]): the denoiser, a text-to-image or an inpainting UNet.
        vae ([`AutoencoderKL`]): encodes the picture to latents and decodes latents to pictures.
        scheduler ([`SchedulerMixin`]): any diffusers scheduler with `add_noise`.
    """

    model_cpu_offload_seq = "mllm->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _prompt_images_argument = "prompt_image"
    _takes_inpainting_unet = True

    def __init__(
        self,
        mllm: DreamLLMForConditionalGeneration,
        processor: DreamLLMProcessor,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: SchedulerMixin,
    ):
        super().__init__()
        self.register_modules(mllm=mllm, processor=processor, unet=unet, vae=vae, scheduler=scheduler)
        self._check_decoder()
        self.vae_scale_factor = self._vae_scale_factor()
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # Masks as diffusers reads them: one channel, in [0, 1] and binarized (1: repaint).
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    @property
    def _inpainting_unet(self) -> bool:
        """Whether the UNet reads the mask and the masked picture's latents (an inpainting UNet)."""
        return self.unet.config.in_channels == inpainting_channels(self.vae.config)

    def check_inputs(
        self,
        prompt,
        image,
        mask_image,
        strength,
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
        prompt_image=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        guidance_scale=None,
        guidance_rescale=None,
        eta=None,
        generator=None,
        callback_on_step_end=None,
    ) -> tuple[list, list]:
        """Refuses every bad argument of `__call__` before any model work, with an error that names it; returns
        `image` and `mask_image` as lists of pictures (one for all prompts, or one per prompt)."""
        needed = "the picture to repaint (where `mask_image` is white)"
        needed_mask = "white where `image` is redrawn, black where it is kept, of the picture's size"
        # First: without them nothing else can be checked.
        self._check_start_pictures("image", image, None, needed)
        self._check_start_pictures("mask_image", mask_image, None, needed_mask)
        self._check_strength(strength, num_inference_steps, timesteps, sigmas)
        self._check_caption_inputs(
            prompt,
            prompt_image,
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
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            eta=eta,
            generator=generator,
            callback_on_step_end=callback_on_step_end,
        )
        count = len(self._as_prompt_list(prompt)) if prompt is not None else prompt_embeds.shape[0]
        pictures = self._check_start_pictures("image", image, count, needed)
        masks = self._check_start_pictures("mask_image", mask_image, count, needed_mask)
        for index in range(max(len(pictures), len(masks))):
            picture_size = self._picture_size(pictures[index % len(pictures)])
            mask_size = self._picture_size(masks[index % len(masks)])
            if picture_size != mask_size:
                which = f" {index}" if max(len(pictures), len(masks)) > 1 else ""
                raise ValueError(
                    f"`mask_image`{which} is {mask_size[0]}x{mask_size[1]} but `image`{which} is "
                    f"{picture_size[0]}x{picture_size[1]} (height x width): give a mask of the picture's size "
                    "(white: redrawn, black: kept)."
                )
        return pictures, masks

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput = None,
        strength: float = 1.0,
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
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        prompt_image=None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Repaints the masked region of pictures after captions.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The caption(s), as for [`DreamLLMText2ImagePipeline`]; `<image>` marks where a picture of
                `prompt_image` is read. Give `prompt` or `prompt_embeds`.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The picture to repaint: one for every prompt, or one per prompt. Arrays and tensors as diffusers'
                `VaeImageProcessor` reads them (values in [0, 1]).
            mask_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                Of the size of `image`: white (1) where it is redrawn, black (0) where it is kept (binarized at 0.5);
                one for every prompt, or one per prompt.
            strength (`float`, *optional*, defaults to 1.0):
                In [0, 1]: how far the picture is noised before the masked region is redrawn, as a share of the
                schedule (the last `int(num_inference_steps * strength)` steps are run). 1 starts from noise alone.
            height (`int`, *optional*, defaults to the picture's height, rounded down to `self.vae_scale_factor`):
                The height in pixels of the pictures (`image` is resized to it).
            width (`int`, *optional*, defaults to the picture's width, rounded down to `self.vae_scale_factor`):
                The width in pixels of the pictures.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The steps of the whole schedule, of which `strength` runs the last ones.
            timesteps (`list[int]`, *optional*), sigmas (`list[float]`, *optional*):
                A custom schedule, cut by `strength` in the same way.
            guidance_scale (`float`, *optional*, defaults to 7.5), guidance_rescale (`float`, *optional*),
            negative_prompt (`str` or `list[str]`, *optional*), num_images_per_prompt (`int`, *optional*),
            eta (`float`, *optional*):
                As for [`DreamLLMText2ImagePipeline`].
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Draws the noise, then the VAE's samples of `image` (and of the masked picture, for an inpainting UNet);
                a list gives one generator per picture.
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds:
                Precomputed conditioning instead of `prompt` / `negative_prompt`, as for text-to-image.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end, callback_on_step_end_tensor_inputs:
                As for text-to-image (`latents`, `prompt_embeds`, `negative_prompt_embeds`).
            prompt_image (`PIL.Image.Image`, `list` or `list[list]`, *optional*):
                Pictures for the prompt's `<image>` placeholders, read by the vision tower (what text-to-image calls
                `image`): for one prompt one picture or a list; for several prompts one list per prompt.

        Examples:

        Returns:
            [`~diffusers.ImagePipelineOutput`] or `(images,)`, as `StableDiffusionInpaintPipeline`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to the picture's
        height, width = self._start_size(image, height, width)

        # 1. Check inputs
        pictures, masks = self.check_inputs(
            prompt,
            image,
            mask_image,
            strength,
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
            prompt_image=prompt_image,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            eta=eta,
            generator=generator,
            callback_on_step_end=callback_on_step_end,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._interrupt = False
        self._num_timesteps = 0

        # 2. Define call parameters
        device = self._execution_device

        # 3. Encode the prompt
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
            self.encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                self.do_classifier_free_guidance,
                negative_prompt,
                prompt_image,
                prompt_embeds,
                negative_prompt_embeds,
                pooled_prompt_embeds,
                negative_pooled_prompt_embeds,
            )
        )

        # 4. Preprocess the picture and the mask: one row per picture drawn
        rows = prompt_embeds.shape[0]
        pixels = self._picture_rows(self.image_processor.preprocess(pictures, height=height, width=width), rows)
        mask = self._picture_rows(self.mask_processor.preprocess(masks, height=height, width=width), rows)
        mask = mask.to(device=pixels.device, dtype=pixels.dtype)

        # 5. Timesteps: the last ones of the schedule, as many as `strength` asks
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
        schedule = self._picture_schedule(diffusion, strength, device)
        timesteps = schedule[0]

        # 6. Latents: the noise first (what text-to-image draws), then the picture's, then the masked picture's
        dtype = prompt_embeds.dtype
        latent_size = self._latent_size(height, width)
        shape = (rows, self.vae.config.latent_channels, *latent_size)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        inpainting_unet = self._inpainting_unet
        image_latents = None
        if strength < 1 or not inpainting_unet:  # the kept region is put back from them
            image_latents = self._encode_vae_image(pixels, generator).to(device=device, dtype=dtype)
        latents = self._start_latents(noise, image_latents, timesteps[:1], strength)
        # The mask at the latents' size (1: redrawn).
        latent_mask = F.interpolate(mask, size=latent_size).to(device=device, dtype=dtype)

        extra_channels = after_step = None
        if inpainting_unet:
            masked_pixels = pixels * (mask < 0.5)
            masked_latents = self._encode_vae_image(masked_pixels, generator).to(device=device, dtype=dtype)
            extra_channels = torch.cat([latent_mask, masked_latents], dim=1)
        else:

            def after_step(i: int, latents: torch.Tensor) -> torch.Tensor:
                # The kept region as the picture is at the next step's noise level (itself after the last step).
                kept = image_latents
                if i < len(timesteps) - 1:
                    kept = self.scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2].repeat(rows))
                return (1 - latent_mask) * kept + latent_mask * latents

        # 7. Denoising loop
        latents = self._denoise(
            prompt_embeds,
            negative_prompt_embeds,
            latents,
            diffusion,
            self.prepare_extra_step_kwargs(generator, eta),
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            schedule=schedule,
            extra_channels=extra_channels,
            after_step=after_step,
        )

        # 8. Decode and postprocess
        if output_type == "latent":
            pictures = latents
        else:
            pictures = self._postprocess(self._decode(latents, generator), output_type)

        # Offload all models
        self.maybe_free_model_hooks()
        if not return_dict:
            return (pictures,)
        return ImagePipelineOutput(images=pictures)


__all__ = ["DreamLLMInpaintPipeline"]
