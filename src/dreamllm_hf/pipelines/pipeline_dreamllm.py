"""DreamLLM as a diffusers pipeline: documents in which text and pictures interleave, many at once.

The language model ([`DreamLLMForConditionalGeneration`]) writes text and, when it emits `<dream_start>`, gives the
diffusion conditioning of a picture (its dream queries, read after the context so far); the UNet, VAE and scheduler
draw it; the picture is read back through CLIP into the same key/value cache, and the text goes on from there. A text
answer is a document in which pictures are disabled. Text-to-image is [`DreamLLMText2ImagePipeline`].
"""

import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import replace_example_docstring
from transformers import LogitsProcessorList

from .. import checks
from .. import constants as C
from ..checks import InputTypeError
from ..modeling.conversation import render_conversation
from ..modeling.modeling_dreamllm import DreamLLMForConditionalGeneration
from ..modeling.processing_dreamllm import DreamLLMProcessor
from .document_engine import CACHE_IMPLEMENTATIONS, DocumentEngine, DocumentRequest, EngineSettings
from .dream_diffusion import OUTPUT_TYPES, DiffusionSettings, DreamLLMDiffusionMixin, is_conversation
from .pipeline_output import DocumentEvent, DreamLLMPipelineOutput, StopReason


GENERATION_MODES = ("interleaved", "text", "image")
# The text-sampling arguments of `__call__` and what each may be (None: the model's `generation_config`).
SAMPLING_RANGES = {
    "temperature": checks.TEMPERATURE,
    "top_p": checks.TOP_P,
    "top_k": checks.TOP_K,
    "repetition_penalty": checks.REPETITION_PENALTY,
}
DOCUMENT_OUTPUT_TYPES = tuple(t for t in OUTPUT_TYPES if t != "latent")
# Set by the pipeline itself, or meaningless for documents (one sequence each, no beams, stops by the format).
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
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "assistant_model",
    "generation_config",
}

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from dreamllm_hf.pipelines import DreamLLMPipeline

        >>> pipe = DreamLLMPipeline.from_pretrained("path/to/dreamllm-7b", dtype=torch.float16).to("cuda")
        >>> out = pipe("Write a short illustrated story about a fox.", max_images=2)
        >>> out.save_html("story.html")
        >>> # Many documents at once, each reproducible from its own generator:
        >>> prompts = ["Tell me about tea.", "Describe a lighthouse."]
        >>> out = pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(2)], do_sample=True)
        >>> # Watch them being written:
        >>> for event in pipe.stream(prompts, do_sample=True):
        ...     if event.type == "text":
        ...         print(event.document, event.text)
        >>> # A text answer is a document without pictures:
        >>> answer = pipe("<image>What is in the picture?", images=[out.images[0][0]], allow_images=False).text[0]
        ```
"""


class DreamLLMPipeline(DreamLLMDiffusionMixin, DiffusionPipeline):
    r"""
    DreamLLM (arXiv 2309.11499): a multimodal LLM that reads and draws pictures, with a Stable Diffusion decoder.

    `__call__` writes documents: the prompt (with `<image>` placeholders and `images`) goes through the Vicuna chat
    template; the model writes, and every `<dream_start>` it emits becomes a picture (`allow_images=False`: a text
    answer). All documents of a call are written together, one forward per decode step; `stream` hands out the events
    as they happen. For text-to-image use [`DreamLLMText2ImagePipeline`] (`DreamLLMText2ImagePipeline.from_pipe(pipe)`
    shares the components).

    Args:
        mllm ([`DreamLLMForConditionalGeneration`]): the language model with its vision tower and dream queries.
        processor ([`DreamLLMProcessor`]): tokenizer, CLIP image processor and chat template.
        unet ([`UNet2DConditionModel`], *optional*): the denoiser; `encoder_hidden_states` are the dream embeddings.
            Any Stable Diffusion UNet the model can condition (checked at construction): SD 1.x/2.x with the model's
            `cross_attention_dim`, `addition_embed_type="text"`, or SDXL-style (`"text_time"`, with the model's pooled
            projector).
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
        self._check_decoder()
        self.vae_scale_factor = self._vae_scale_factor()
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_components(
        cls, llm, vision, diffusion, num_dream_queries: int = C.NUM_DREAM_QUERIES, **kwargs
    ) -> "DreamLLMPipeline":
        r"""
        An untrained DreamLLM built from parts (what `dreamllm-hf init` writes): any decoder-only causal LM with its
        tokenizer, a CLIP or SigLIP vision tower with its image processor, and a Stable Diffusion decoder. See
        `dreamllm_hf.building` for what is added to them and how it starts.

        Args:
            llm: a causal LM's `save_pretrained` folder, or the model (then pass `tokenizer=`).
            vision: a CLIP/SigLIP vision model's (or full model's) folder, or the model (then pass `image_processor=`).
            diffusion: a diffusers pipeline folder with `unet/`, `vae/`, `scheduler/`, or a pipeline or mapping of them.
            num_dream_queries (`int`, defaults to 64): learned queries per picture.
            **kwargs: `tokenizer`, `image_processor`, `vision_feature_layer`, `eos_token`, `chat_template`, `dtype`,
                `seed` (see `dreamllm_hf.building.build_pipeline`).
        """
        # Building sits above the pipelines (it assembles one): imported here, not at the top of this module.
        from ..building import build_pipeline

        pipe = build_pipeline(llm, vision, diffusion, num_dream_queries=num_dream_queries, **kwargs)
        if not isinstance(pipe, cls):
            pipe = cls(**pipe.components)
        return pipe

    @property
    def image_block_length(self) -> int:
        """Positions one drawn picture takes: its dream block (Q + 2) and its CLIP block (N + 2)."""
        return len(self.processor.drawn_picture_ids)

    def format_chat_prompt(self, prompt: str | list[dict], images: list | None = None) -> str:
        """
        The chat-template prompt (Vicuna v1.1 for the release) of a user message (a string) or a conversation (a list
        of `{"role", "content"}` dicts, see `__call__`), ending in `"ASSISTANT:"` so that the model answers. Pictures
        are `<image>` (read) in user turns and `<dream>` (drawn) in assistant turns; `chat_prompt_and_images` also
        returns the pictures.
        """
        return self.chat_prompt_and_images(prompt, images, check_pictures=images is not None)[0]

    def chat_prompt_and_images(
        self, prompt: str | list[dict], images: list | None = None, check_pictures: bool = True
    ) -> tuple[str, list]:
        """
        `format_chat_prompt(prompt)` and its pictures in reading order: those inside the messages, and those of
        `images` for placeholders without a picture of their own (`<image>` in a string, `{"type": "image"}`), one
        per placeholder (`check_pictures=False`: the text only, missing pictures left out).
        """
        conversation = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages, pictures = render_conversation(conversation, images, check_pictures=check_pictures)
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text, pictures

    # ----------------------------------------------------------------------------------------------------------------
    # Checks

    def check_inputs(
        self,
        prompt,
        images,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
        negative_prompt,
        num_images_per_prompt,
        generator,
        max_new_tokens,
        max_images,
        allow_images,
        output_type,
        cache_implementation,
        callback_on_step_end_tensor_inputs,
        guidance_scale=None,
        guidance_rescale=None,
        eta=None,
        sampling=None,
        generation_kwargs=None,
        callback_on_step_end=None,
    ):
        """Refuses every bad argument of `__call__` before any model work, with an error that names it, says what was
        given and what is expected (`None` for the trailing arguments: not checked)."""
        if prompt is None:
            raise ValueError("Pass a `prompt` (a message, a conversation, or a list of those).")
        prompts = self._as_prompt_list(prompt)
        for item in prompts:
            if not (isinstance(item, str) or is_conversation(item)):
                raise InputTypeError(
                    "Every prompt must be a string or a conversation (a list of `{'role', 'content'}` dicts); got "
                    f"{type(item).__name__}. Do not mix other types into the list of prompts."
                )
        if output_type not in DOCUMENT_OUTPUT_TYPES:
            raise ValueError(
                f"Unknown output_type {output_type!r} for documents; choose one of "
                f"{', '.join(map(repr, DOCUMENT_OUTPUT_TYPES))} (every picture is decoded to be read back)."
            )
        checks.NUM_IMAGES_PER_PROMPT.check("num_images_per_prompt", num_images_per_prompt)
        checks.MAX_NEW_TOKENS.check("max_new_tokens", max_new_tokens)
        checks.MAX_IMAGES.check("max_images", max_images, optional=True)
        for name, kind in SAMPLING_RANGES.items():
            kind.check(name, (sampling or {}).get(name), optional=True)
        if generation_kwargs is not None and not isinstance(generation_kwargs, dict):
            raise InputTypeError(
                f"`generation_kwargs` must be a dict of `GenerationConfig` options, got {type(generation_kwargs).__name__}."
            )
        if cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"Unknown cache_implementation {cache_implementation!r}; choose 'dynamic' (default) or 'static'."
            )
        self._check_generator(generator, len(prompts) * num_images_per_prompt, "documents")
        self._check_negative_prompt(negative_prompt, len(prompts))
        if allow_images:
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
        else:  # nothing is drawn: only the numbers' own ranges
            self._check_guidance(guidance_scale, guidance_rescale, eta)

    # ----------------------------------------------------------------------------------------------------------------
    # Text generation settings

    def _generation_setup(self, allow_images: bool, sampling: dict, generation_kwargs: dict | None):
        """The `GenerationConfig` (the model's, updated by the given options) and the user's logits processors."""
        config = self.mllm.config
        kwargs = dict(generation_kwargs or {})
        reserved = sorted(set(kwargs) & _RESERVED_GENERATE_KWARGS)
        if reserved:
            raise ValueError(
                f"`generation_kwargs` may not set {reserved}: the pipeline sets them (use the "
                "`max_new_tokens`, `num_images_per_prompt` and `streamer` arguments)."
            )
        logits_processor = kwargs.pop("logits_processor", None)
        kwargs.update({k: v for k, v in sampling.items() if v is not None})
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
        if not allow_images:
            never.append(config.dream_start_token_id)
        kwargs["suppress_tokens"] = sorted(set(list(kwargs.get("suppress_tokens") or []) + never))
        kwargs.setdefault("pad_token_id", config.pad_token_id)
        generation_config, unused = self.mllm._prepare_generation_config(None, **kwargs)
        unused = sorted(set(unused) - {"output_attentions", "output_hidden_states"})
        if unused:
            raise ValueError(
                f"`generation_kwargs` has {unused}, which are not `GenerationConfig` options; see "
                "`transformers.GenerationConfig` for what can be set."
            )
        if (generation_config.num_beams or 1) > 1:
            raise ValueError(
                "Documents sample one sequence each; `num_beams` > 1 is not supported (the cache would not follow "
                "the chosen beam). Use `num_images_per_prompt` for several documents per prompt."
            )
        self.mllm._prepare_special_tokens(generation_config, True, device=self._execution_device)
        if logits_processor is not None and not isinstance(logits_processor, LogitsProcessorList):
            logits_processor = LogitsProcessorList(logits_processor)
        return generation_config, logits_processor

    # ----------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | list[dict] | None = None,
        images: Any = None,
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
        use_chat_template: bool = True,
        max_new_tokens: int = 256,
        max_images: int | None = None,
        allow_images: bool = True,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        generation_kwargs: dict | None = None,
        cache_implementation: str | None = None,
        streamer=None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        generation_mode: str | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> DreamLLMPipelineOutput | tuple:
        r"""
        Writes documents: text, and a picture wherever the model emits `<dream_start>`.

        Args:
            prompt (`str`, a conversation `list[dict]`, or a list of those, *optional*):
                A user message (wrapped in the chat template, Vicuna v1.1 ending in `"ASSISTANT:"`), or a conversation
                of `{"role", "content"}` dicts. A message's content is a string or a list of strings, pictures and
                `{"type": "text" | "image", ...}` parts (`{"type": "image", "image": picture}` inline); an assistant
                turn may be a previous output's document as it is (`output.documents[i]`). Pictures in user turns are
                read; pictures in assistant turns were drawn, and the turn is rebuilt into the token stream the model
                wrote (dream block, the picture read back, `</s>`), so a conversation continued in a new call reads as
                one long call. Pass `use_chat_template=False` to give an already formatted prompt string as it is.
                `<image>` marks where a picture of `images` goes.
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, or a list of those, *optional*):
                The pictures for the `<image>` placeholders and the `{"type": "image"}` parts without a picture: for
                one prompt one picture or a list; for several prompts one list per prompt (empty for a prompt without
                any).
            height (`int`, *optional*, defaults to `self.unet.config.sample_size * self.vae_scale_factor`):
                The height in pixels of every picture, a multiple of `self.vae_scale_factor`.
            width (`int`, *optional*, defaults to `self.unet.config.sample_size * self.vae_scale_factor`):
                The width in pixels of every picture, a multiple of `self.vae_scale_factor`.
            num_inference_steps (`int`, *optional*, defaults to 50):
                The number of denoising steps of each picture; ignored when `timesteps` or `sigmas` are given.
            timesteps (`list[int]`, *optional*):
                Custom timesteps, in descending order, for a scheduler whose `set_timesteps` takes `timesteps`.
            sigmas (`list[float]`, *optional*):
                Custom sigmas, for a scheduler whose `set_timesteps` takes `sigmas`.
            guidance_scale (`float`, *optional*, defaults to 7.5):
                Classifier-free guidance; `<= 1` turns guidance off (no unconditional pass). The unconditional is
                `<s>` alone through the same path (or `negative_prompt`).
            guidance_rescale (`float`, *optional*, defaults to 0.0):
                Rescales the guided noise prediction, as in `StableDiffusionPipeline` (0 turns it off).
            negative_prompt (`str` or `list[str]`, *optional*):
                What the unconditional rows read instead of `""`.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                Independent documents per prompt.
            eta (`float`, *optional*, defaults to 0.0):
                For DDIM-like schedulers; ignored by DDPM (as the original).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                A list gives every document its own generator, which seeds both its text sampling and its pictures, so
                that a document is the same whether it is written alone or in a batch. A single generator (or `None`:
                the global RNG) is shared by the batch.
            use_chat_template (`bool`, *optional*, defaults to `True`):
                Wrap `prompt` in the chat template; `False` takes an already formatted prompt string as it is.
            max_new_tokens (`int`, *optional*, defaults to 256):
                Tokens the model may sample per document (picture blocks do not count, their `<dream_start>` does).
            max_images (`int`, *optional*):
                A document stops when the model asks for one picture more.
            allow_images (`bool`, *optional*, defaults to `True`):
                `False` suppresses `<dream_start>`: a text answer.
            do_sample (`bool`, *optional*):
                Sample the text instead of greedy decoding; defaults to the model's `generation_config`.
            temperature (`float`, *optional*):
                Text sampling temperature, `> 0`; defaults to the model's `generation_config`.
            top_p (`float`, *optional*):
                Nucleus sampling, in `(0, 1]`; defaults to the model's `generation_config`.
            top_k (`int`, *optional*):
                Top-k sampling, `>= 0` (0 turns it off); defaults to the model's `generation_config`.
            repetition_penalty (`float`, *optional*):
                Text repetition penalty, `> 0`; defaults to the model's `generation_config`.
            generation_kwargs (`dict`, *optional*):
                Any other `GenerationConfig` option, and `logits_processor`.
            cache_implementation (`str`, *optional*):
                `"dynamic"` (default; finished documents leave the batch) or `"static"` (a preallocated `StaticCache`;
                on CUDA the decode step is compiled as one graph).
            streamer (`BaseStreamer`, *optional*):
                One document only: receives the prompt, then each sampled token.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"` or `"pt"`: how pictures are returned.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`DreamLLMPipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after each denoising step of a batch of pictures as
                `callback_on_step_end(self, step, timestep, callback_kwargs)`, as in `StableDiffusionPipeline`; the
                tensors it returns replace those of the loop.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["latents"]`):
                The tensors put in `callback_kwargs`, from `self._callback_tensor_inputs` (`latents`,
                `prompt_embeds`, `negative_prompt_embeds`).
            generation_mode (`str`, *optional*):
                Deprecated. `"image"`: use [`DreamLLMText2ImagePipeline`]; `"text"`: use `allow_images=False`;
                `"interleaved"`: leave it out.
            latents (`torch.Tensor`, *optional*):
                Deprecated, with `generation_mode="image"` only: see [`DreamLLMText2ImagePipeline`].
            prompt_embeds (`torch.Tensor`, *optional*):
                Deprecated, with `generation_mode="image"` only: see [`DreamLLMText2ImagePipeline`].
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Deprecated, with `generation_mode="image"` only: see [`DreamLLMText2ImagePipeline`].

        Examples:

        Returns:
            [`DreamLLMPipelineOutput`] or `tuple` `(images, text, documents, stop_reasons)`.
        """
        arguments = {name: value for name, value in locals().items() if name != "self"}
        if generation_mode == "image":
            output = self._deprecated_text_to_image(arguments)
            return output if return_dict else output.to_tuple()
        output = None
        for event in self._events(arguments):
            if event.type == "end":
                output = event.output
        if not return_dict:
            return output.to_tuple()
        return output

    def stream(self, *args, **kwargs) -> Iterator[DocumentEvent]:
        r"""
        Writes the documents as `__call__` does (same arguments), yielding [`DocumentEvent`]s as they are written:
        `"text"` (`.text`), `"picture_start"`, `"picture"` (`.image`, `.index`), `"document_end"` (`.stop_reason`)
        and finally `"end"` (`.output`: what `__call__` returns). Every event but `"end"` carries `.document`.

        ```py
        >>> for event in pipe.stream("Tell me a story.", max_images=2):
        ...     if event.type == "text":
        ...         print(event.text, end="", flush=True)
        ...     elif event.type == "picture":
        ...         event.image.save(f"picture_{event.index}.png")
        ```
        """
        bound = inspect.signature(DreamLLMPipeline.__call__).bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = {name: value for name, value in bound.arguments.items() if name != "self"}
        if arguments["generation_mode"] == "image":
            raise ValueError("`stream` writes documents; for text-to-image use `DreamLLMText2ImagePipeline`.")
        yield from self._events(arguments)

    def _deprecated_text_to_image(self, arguments: dict) -> DreamLLMPipelineOutput:
        """`generation_mode="image"` of earlier releases: [`DreamLLMText2ImagePipeline`] in the old output."""
        self._warn_generation_mode("image")
        from .pipeline_dreamllm_text2img import DreamLLMText2ImagePipeline

        missing = [name for name in ("unet", "vae", "scheduler") if getattr(self, name, None) is None]
        if missing:
            raise ValueError(
                f"generation_mode='image' draws pictures, but this pipeline has no {', '.join(missing)}; load them."
            )
        text2image = DreamLLMText2ImagePipeline.from_pipe(self)
        names = set(inspect.signature(DreamLLMText2ImagePipeline.__call__).parameters) - {"self", "return_dict"}
        # Arguments added to text-to-image since (e.g. the pooled embeddings) keep their defaults.
        images = text2image(**{name: arguments[name] for name in names if name in arguments}).images
        self._num_timesteps = text2image.num_timesteps
        documents = [[images[i]] for i in range(len(images))]
        return DreamLLMPipelineOutput(
            images=images, text=None, documents=documents, stop_reasons=[StopReason.IMAGE] * len(documents)
        )

    @staticmethod
    def _warn_generation_mode(generation_mode: str) -> None:
        if generation_mode not in GENERATION_MODES:
            raise ValueError(
                f"Unknown generation_mode {generation_mode!r}; choose one of {', '.join(map(repr, GENERATION_MODES))} "
                "(deprecated: leave it out for documents, `allow_images=False` for text, "
                "`DreamLLMText2ImagePipeline` for pictures)."
            )
        replacement = {
            "image": "`DreamLLMText2ImagePipeline.from_pipe(pipe)(prompt, ...)` (it returns `.images` as Stable "
            "Diffusion does)",
            "text": "`pipe(prompt, allow_images=False)`",
            "interleaved": "`pipe(prompt)` (documents are what DreamLLMPipeline writes)",
        }[generation_mode]
        warnings.warn(
            f"`generation_mode={generation_mode!r}` is deprecated and will be removed in the next release; use "
            f"{replacement}.",
            FutureWarning,
            stacklevel=4,
        )

    @torch.no_grad()
    def _events(self, arguments: dict) -> Iterator[DocumentEvent]:
        """The documents of one call, as events: `arguments` are `__call__`'s, by name."""
        a = dict(arguments)
        if a["generation_mode"] is not None:
            self._warn_generation_mode(a["generation_mode"])
            if a["generation_mode"] == "text":
                a["allow_images"] = False
        for name in ("latents", "prompt_embeds", "negative_prompt_embeds"):
            if a[name] is not None:
                raise ValueError(
                    f"`{name}` is for text-to-image (`DreamLLMText2ImagePipeline`); a document computes the "
                    "conditioning of its pictures as it is written."
                )
        prompt, images, generator = a["prompt"], a["images"], a["generator"]
        height, width, negative_prompt = a["height"], a["width"], a["negative_prompt"]
        num_images_per_prompt, allow_images, max_images = (
            a["num_images_per_prompt"],
            a["allow_images"],
            a["max_images"],
        )
        max_new_tokens, output_type, streamer = a["max_new_tokens"], a["output_type"], a["streamer"]
        cache_implementation, generation_kwargs = a["cache_implementation"], a["generation_kwargs"]
        num_inference_steps, timesteps, sigmas = a["num_inference_steps"], a["timesteps"], a["sigmas"]
        callback_on_step_end = a["callback_on_step_end"]
        callback_on_step_end_tensor_inputs = a["callback_on_step_end_tensor_inputs"]
        sampling = {name: a[name] for name in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")}

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to the UNet's
        height, width = self._default_size(height, width)

        # 1. Check inputs
        self.check_inputs(
            prompt,
            images,
            height,
            width,
            num_inference_steps,
            timesteps,
            sigmas,
            negative_prompt,
            num_images_per_prompt,
            generator,
            max_new_tokens,
            max_images,
            allow_images,
            output_type,
            cache_implementation,
            callback_on_step_end_tensor_inputs,
            guidance_scale=a["guidance_scale"],
            guidance_rescale=a["guidance_rescale"],
            eta=a["eta"],
            sampling=sampling,
            generation_kwargs=generation_kwargs,
            callback_on_step_end=callback_on_step_end,
        )
        self._guidance_scale = a["guidance_scale"]
        self._guidance_rescale = a["guidance_rescale"]
        self._interrupt = False
        self._num_timesteps = 0

        # 2. Text settings and prompts
        device = self._execution_device
        generation_config, logits_processor = self._generation_setup(allow_images, sampling, generation_kwargs)
        if cache_implementation is None:
            cache_implementation = generation_config.cache_implementation
            if cache_implementation not in CACHE_IMPLEMENTATIONS:
                cache_implementation = None  # other transformers caches: the engine's default
        prompts = self._as_prompt_list(prompt)
        per_prompt_images = self._per_prompt_images(images, len(prompts))
        verbatim = not a["use_chat_template"]
        texts = []
        for index, item in enumerate(prompts):
            given = per_prompt_images[index] if per_prompt_images is not None else None
            if isinstance(item, str) and verbatim:
                texts.append(item)
                continue
            text, pictures = self.chat_prompt_and_images(item, given)
            texts.append(text)
            if pictures:
                per_prompt_images = per_prompt_images or [[] for _ in prompts]
                per_prompt_images[index] = pictures
        # The pictures and the prompts' lengths too are refused before the unconditional pass below.
        if per_prompt_images is not None:
            self.processor.check_images(texts, per_prompt_images)
        token_ids = self.tokenizer(texts, return_attention_mask=False)["input_ids"]
        longest = max(len(self.processor.expand_placeholders(ids)) for ids in token_ids)
        self._check_prompt_length(longest, 1, "the answer")
        per_document_generators = isinstance(generator, (list, tuple))
        if streamer is not None and len(texts) * num_images_per_prompt > 1:
            raise ValueError("A `streamer` follows one document; for several, use `stream()` and its events.")

        # 3. The unconditional of the pictures, once for the whole call (one pass for every negative prompt)
        draws = allow_images and max_images != 0
        negatives = negative_pooled = [None] * len(texts)
        if draws and self.do_classifier_free_guidance:
            if negative_prompt is None:
                rows = [""]  # `<s>` alone, shared by every document
            else:
                rows = [negative_prompt] * len(texts) if isinstance(negative_prompt, str) else list(negative_prompt)
            embeds, pooled = self._dream_embeddings(rows, None, device)
            row_of = [0] * len(texts) if len(rows) == 1 else list(range(len(texts)))
            negatives = [embeds[r : r + 1].to(self.unet.dtype) for r in row_of]
            if pooled is not None:
                negative_pooled = [pooled[r : r + 1].to(self.unet.dtype) for r in row_of]

        # 4. One request per document; the engine writes them together
        requests = []
        for index, text in enumerate(texts):
            for copy in range(num_images_per_prompt):
                number = index * num_images_per_prompt + copy
                requests.append(
                    DocumentRequest(
                        text=text,
                        images=per_prompt_images[index] if per_prompt_images is not None else None,
                        generator=generator[number] if per_document_generators else generator,
                        negative_prompt_embeds=negatives[index],
                        negative_pooled_prompt_embeds=negative_pooled[index],
                    )
                )
        diffusion = None
        if allow_images:
            diffusion = DiffusionSettings(
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                timesteps=timesteps,
                sigmas=sigmas,
                eta=a["eta"],
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            )
        settings = EngineSettings(
            max_new_tokens=max_new_tokens,
            max_images=max_images,
            allow_images=allow_images,
            output_type=output_type,
            diffusion=diffusion,
            cache_implementation=cache_implementation,
            per_document_generators=per_document_generators,
        )
        engine = DocumentEngine(
            self,
            requests,
            settings,
            generation_config,
            logits_processor,
            shared_generator=None if per_document_generators else generator,
            streamer=streamer,
        )
        try:
            yield from engine.run()
        finally:
            # Offload all models (also when a stream is closed before its end)
            self.maybe_free_model_hooks()


__all__ = ["DreamLLMPipeline"]
