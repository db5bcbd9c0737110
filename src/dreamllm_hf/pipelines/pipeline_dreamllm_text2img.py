"""DreamLLM text-to-image, shaped like `StableDiffusionPipeline`: the caption's dream queries condition the UNet."""

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import replace_example_docstring

from ..checks import InputTypeError
from ..constants import IMAGE_PLACEHOLDER
from ..modeling.modeling_dreamllm import DreamLLMForConditionalGeneration
from ..modeling.processing_dreamllm import DreamLLMProcessor
from .dream_diffusion import DiffusionSettings, DreamLLMDiffusionMixin
from .lora_loading import DreamLLMLoraLoaderMixin


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import PIL.Image
        >>> import torch
        >>> from dreamllm_hf.pipelines import DreamLLMText2ImagePipeline, edit_prompt

        >>> pipe = DreamLLMText2ImagePipeline.from_pretrained("path/to/dreamllm-7b", dtype=torch.float16).to("cuda")
        >>> image = pipe("a photo of a red bird sitting on a tree branch", guidance_scale=3.5).images[0]
        >>> # or from a document pipeline, sharing its components: DreamLLMText2ImagePipeline.from_pipe(document_pipe)
        >>> # an edit: the picture is read where `<image>` is (see `edit_prompt`), and the drawing comes after it
        >>> edited = pipe(edit_prompt("Make it blue."), image=[PIL.Image.open("red_bird.png")]).images[0]
        ```
"""


def edit_prompt(instruction: str, num_pictures: int = 1) -> str:
    """The text-to-image prompt of an edit (`dreamllm-hf generate --mode image --image`, `POST /v1/images/edits`):
    one `<image>` per picture, then the instruction with nothing between them, as the chat template joins a user
    turn's pictures and text. The pipeline reads it as every caption, BOS + prompt without the chat template, so
    `pipe(edit_prompt("Make it blue."), image=[picture])` reads `<s><image>Make it blue.` and draws after it. An
    instruction that places its own `<image>`s is kept as it is, when it has one per picture."""
    if not isinstance(instruction, str):
        raise InputTypeError(f"`prompt` must be a string (the edit's instruction), got {type(instruction).__name__}.")
    placed = instruction.count(IMAGE_PLACEHOLDER)
    if placed == 0:
        return IMAGE_PLACEHOLDER * num_pictures + instruction
    if placed != num_pictures:
        raise ValueError(
            f"`prompt` has {placed} {IMAGE_PLACEHOLDER} for {num_pictures} picture(s); give one {IMAGE_PLACEHOLDER} "
            "per picture, or none to put the pictures before the instruction."
        )
    return instruction


class DreamLLMText2ImagePipeline(
    DreamLLMDiffusionMixin, DiffusionPipeline, StableDiffusionMixin, DreamLLMLoraLoaderMixin
):
    r"""
    Text-to-image with DreamLLM, as the original's `stable_diffusion_pipeline`: BOS + caption (no chat template), then
    the dream block; the query states through the condition projector are the UNet's `encoder_hidden_states`.
    Classifier-free guidance runs against `<s>` alone (or the negative prompt) through the same path.

    Loads from the same folder as [`DreamLLMPipeline`], or shares its components with `from_pipe`.

    The decoder may be any Stable Diffusion UNet the model can condition (checked at construction): SD 1.x/2.x with the
    model's `cross_attention_dim`, `addition_embed_type="text"`, or SDXL-style (`"text_time"`: the model's pooled
    projector gives `text_embeds`, the picture size the `time_ids`). Being a Stable Diffusion UNet, it takes what
    `StableDiffusionMixin` offers (`enable_freeu`, `fuse_qkv_projections`, `enable_vae_slicing`, ...), and UNet LoRAs in
    diffusers' format (`load_lora_weights`, `set_adapters`, `fuse_lora`, `unload_lora_weights`; see
    [`DreamLLMLoraLoaderMixin`]).

    As diffusers' pipelines do without their text encoders, this one draws from precomputed `prompt_embeds` with `mllm`
    and `processor` set to `None`: their width is checked against the UNet's, their queries against each other.

    Args:
        mllm ([`DreamLLMForConditionalGeneration`]): the language model with its vision tower and dream queries.
        processor ([`DreamLLMProcessor`]): tokenizer and CLIP image processor (for `<image>` in a caption).
        unet ([`UNet2DConditionModel`]): the denoiser.
        vae ([`AutoencoderKL`]): decodes latents to pictures.
        scheduler ([`SchedulerMixin`]): the original samples with `DDPMScheduler`; any diffusers scheduler works.
    """

    model_cpu_offload_seq = "mllm->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

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
        latents=None,
        callback_on_step_end=None,
    ):
        """Refuses every bad argument of `__call__` before any model work, with an error that names it, says what was
        given and what is expected; tensors are checked against the UNet they will meet (`None` for
        the trailing arguments: not checked)."""
        self._check_caption_inputs(
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
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            eta=eta,
            generator=generator,
            callback_on_step_end=callback_on_step_end,
        )
        if latents is not None:
            count = len(self._as_prompt_list(prompt)) if prompt is not None else prompt_embeds.shape[0]
            self._check_latents(latents, count * num_images_per_prompt, height, width)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
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
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Draws pictures of captions.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The caption(s), tokenized as BOS + caption with no chat template (as the original). `<image>` marks
                where a picture of `image` goes. Give `prompt` or `prompt_embeds`.
            image (`PIL.Image.Image`, `list` or `list[list]`, *optional*):
                Pictures for the `<image>` placeholders: for one prompt one picture or a list; for several prompts one
                list per prompt.
            height (`int`, *optional*, defaults to `self.unet.config.sample_size * self.vae_scale_factor`):
                The height in pixels of the pictures, a multiple of `self.vae_scale_factor`.
            width (`int`, *optional*, defaults to `self.unet.config.sample_size * self.vae_scale_factor`):
                The width in pixels of the pictures, a multiple of `self.vae_scale_factor`.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The number of denoising steps; ignored when `timesteps` or `sigmas` are given.
            timesteps (`list[int]`, *optional*):
                Custom timesteps, in descending order, for a scheduler whose `set_timesteps` takes `timesteps`.
            sigmas (`list[float]`, *optional*):
                Custom sigmas, for a scheduler whose `set_timesteps` takes `sigmas`.
            guidance_scale (`float`, *optional*, defaults to 7.5):
                Classifier-free guidance; `<= 1` turns it off. The original's scripts use 2.0 to 7.5 (3.5 for the
                aesthetic model).
            guidance_rescale (`float`, *optional*, defaults to 0.0):
                Rescales the guided noise prediction, as in `StableDiffusionPipeline` (0 turns it off).
            negative_prompt (`str` or `list[str]`, *optional*):
                What the unconditional rows read instead of `""`.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                Pictures per prompt.
            eta (`float`, *optional*, defaults to 0.0):
                For DDIM-like schedulers; ignored by DDPM (as the original).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Seeds the noise; a list gives one generator per picture.
            latents (`torch.Tensor`, *optional*):
                Initial latents `[batch * num_images_per_prompt, C, h, w]` instead of drawing them.
            prompt_embeds (`torch.Tensor`, *optional*):
                The UNet's `encoder_hidden_states` `[batch, Q, cross_attention_dim]` (after the condition projector),
                instead of `prompt`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                The unconditional rows' `encoder_hidden_states`, shaped as `prompt_embeds`, instead of
                `negative_prompt`.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after each denoising step as `callback_on_step_end(self, step, timestep, callback_kwargs)`, as
                in `StableDiffusionPipeline`; the tensors it returns replace those of the loop.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["latents"]`):
                The tensors put in `callback_kwargs`, from `self._callback_tensor_inputs` (`latents`,
                `prompt_embeds`, `negative_prompt_embeds`).
            pooled_prompt_embeds (`torch.Tensor`, *optional*):
                With an SDXL-style decoder, the pooled conditioning `[batch, pooled_projection_dim]` (the UNet's
                `text_embeds`) that goes with `prompt_embeds`, as in `StableDiffusionXLPipeline`.
            negative_pooled_prompt_embeds (`torch.Tensor`, *optional*):
                The pooled conditioning that goes with `negative_prompt_embeds`.

        Examples:

        Returns:
            [`~diffusers.ImagePipelineOutput`] or `(images,)`: what `StableDiffusionPipeline` returns for the same
            `output_type` (a list of PIL images, an `np.ndarray` `[B, H, W, 3]`, a `torch.Tensor` `[B, 3, H, W]`, or
            the latents).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to the UNet's
        height, width = self._default_size(height, width)

        # 1. Check inputs
        self.check_inputs(
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
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            eta=eta,
            generator=generator,
            latents=latents,
            callback_on_step_end=callback_on_step_end,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._interrupt = False
        self._num_timesteps = 0

        # 2. Define call parameters
        device = self._execution_device

        # 3. Encode the prompt (one batched language-model pass for the conditional and unconditional rows)
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
            self.encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                self.do_classifier_free_guidance,
                negative_prompt,
                image,
                prompt_embeds,
                negative_prompt_embeds,
                pooled_prompt_embeds,
                negative_pooled_prompt_embeds,
            )
        )

        # 4-6. Timesteps, latents, step kwargs and the denoising loop (the same as a document's pictures)
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
        latents = self._draw_latents(
            prompt_embeds,
            negative_prompt_embeds,
            generator,
            diffusion,
            latents,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )

        # 7. Decode and postprocess
        if output_type == "latent":
            pictures = latents
        else:
            pictures = self._postprocess(self._decode(latents, generator), output_type)

        # Offload all models
        self.maybe_free_model_hooks()
        if not return_dict:
            return (pictures,)
        return ImagePipelineOutput(images=pictures)


__all__ = ["DreamLLMText2ImagePipeline", "edit_prompt"]
