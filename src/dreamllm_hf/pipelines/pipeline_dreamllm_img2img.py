"""DreamLLM image-to-image, shaped like `StableDiffusionImg2ImgPipeline`: a picture noised to `strength`, then denoised
under the caption's dream conditioning."""

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ..modeling.modeling_dreamllm import DreamLLMForConditionalGeneration
from ..modeling.processing_dreamllm import DreamLLMProcessor
from .dream_diffusion import DiffusionSettings, DreamLLMDiffusionMixin
from .lora_loading import DreamLLMLoraLoaderMixin


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import load_image
        >>> from dreamllm_hf.pipelines import DreamLLMImg2ImgPipeline

        >>> pipe = DreamLLMImg2ImgPipeline.from_pretrained("path/to/dreamllm-7b", dtype=torch.float16).to("cuda")
        >>> init = load_image("sketch.png").resize((512, 512))
        >>> image = pipe("a fantasy landscape, trending on artstation", image=init, strength=0.75).images[0]
        >>> # or from a pipeline of the same folder: DreamLLMImg2ImgPipeline.from_pipe(text2image_pipe)
        ```
"""


class DreamLLMImg2ImgPipeline(
    DreamLLMDiffusionMixin, DiffusionPipeline, StableDiffusionMixin, DreamLLMLoraLoaderMixin
):
    r"""
    Image-to-image with DreamLLM, as `StableDiffusionImg2ImgPipeline`: `image` is encoded by the VAE, noised to the
    timestep `strength` reaches into the schedule, and denoised under the dream conditioning of the caption (as
    [`DreamLLMText2ImagePipeline`] makes it). `strength=1` starts from noise alone: text-to-image; a small strength
    keeps the picture.

    The prompt takes the same forms as text-to-image, pictures for its `<image>` placeholders included: those are
    `prompt_image` here, since `image` is the picture to start from (as in diffusers).

    Loads from the same folder as [`DreamLLMPipeline`] and [`DreamLLMText2ImagePipeline`], or shares their components
    with `from_pipe`; `AutoPipelineForImage2Image` finds it from a DreamLLM folder.

    Args:
        mllm ([`DreamLLMForConditionalGeneration`]): the language model with its vision tower and dream queries.
        processor ([`DreamLLMProcessor`]): tokenizer and CLIP image processor (for `<image>` in a caption).
        unet ([`UNet2DConditionModel`]): the denoiser.
        vae ([`AutoencoderKL`]): encodes the picture to latents and decodes latents to pictures.
        scheduler ([`SchedulerMixin`]): any diffusers scheduler with `add_noise`.
    """

    model_cpu_offload_seq = "mllm->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _prompt_images_argument = "prompt_image"

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

    def check_inputs(
        self,
        prompt,
        image,
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
    ) -> list:
        """Refuses every bad argument of `__call__` before any model work, with an error that names it; returns
        `image` as a list of pictures (one for all prompts, or one per prompt)."""
        needed = "the picture to start from (`strength` says how much of it is redrawn)"
        self._check_start_pictures("image", image, None, needed)  # first: without it nothing else can be checked
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
        return self._check_start_pictures("image", image, count, needed)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: PipelineImageInput = None,
        strength: float = 0.8,
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
        Redraws pictures after captions.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The caption(s), as for [`DreamLLMText2ImagePipeline`]; `<image>` marks where a picture of
                `prompt_image` is read. Give `prompt` or `prompt_embeds`.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The picture to start from: one for every prompt, or one per prompt. Arrays and tensors as diffusers'
                `VaeImageProcessor` reads them (values in [0, 1]).
            strength (`float`, *optional*, defaults to 0.8):
                In [0, 1]: how far `image` is noised, as a share of the schedule; the last
                `int(num_inference_steps * strength)` steps are run. 1 starts from noise alone.
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
                Draws the noise, then the VAE's sample of `image`; a list gives one generator per picture.
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
            [`~diffusers.ImagePipelineOutput`] or `(images,)`, as `StableDiffusionImg2ImgPipeline`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to the picture's
        height, width = self._start_size(image, height, width)

        # 1. Check inputs
        pictures = self.check_inputs(
            prompt,
            image,
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

        # 4. Preprocess the picture: one row per picture drawn
        pixels = self._picture_rows(
            self.image_processor.preprocess(pictures, height=height, width=width), prompt_embeds.shape[0]
        )

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

        # 6. Latents: the noise first (what text-to-image draws), then the picture's, noised to the first timestep
        shape = (pixels.shape[0], self.vae.config.latent_channels, *self._latent_size(height, width))
        noise = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        image_latents = None
        if strength < 1:
            image_latents = self._encode_vae_image(pixels, generator).to(device=device, dtype=prompt_embeds.dtype)
        latents = self._start_latents(noise, image_latents, schedule[0][:1], strength)

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


__all__ = ["DreamLLMImg2ImgPipeline"]
