"""DreamLLM as a diffusers pipeline: documents in which text and pictures interleave, many at once.

The language model ([`DreamLLMForConditionalGeneration`]) writes text and, when it emits `<dream_start>`, gives the
diffusion conditioning of a picture (its dream queries, read after the context so far); the UNet, VAE and scheduler
draw it; the picture is read back through CLIP into the same key/value cache, and the text goes on from there. A text
answer is a document in which pictures are disabled. Text-to-image is [`DreamLLMText2ImagePipeline`].
"""

from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import replace_example_docstring

from .. import checks
from .. import constants as C
from ..checks import InputTypeError
from ..modeling.conversation import render_conversation
from ..modeling.modeling_dreamllm import DreamLLMForConditionalGeneration
from ..modeling.processing_dreamllm import DreamLLMProcessor
from .document_batch import CACHE_IMPLEMENTATIONS
from .document_writer import DocumentRequest, DocumentWriter
from .dream_diffusion import OUTPUT_TYPES, DreamLLMDiffusionMixin, is_conversation
from .lora_loading import DreamLLMLoraLoaderMixin
from .pipeline_output import DocumentEvent, DreamLLMPipelineOutput


# The text-sampling arguments of `__call__` and what each may be (None: the model's `generation_config`).
SAMPLING_RANGES = {
    "temperature": checks.TEMPERATURE,
    "top_p": checks.TOP_P,
    "top_k": checks.TOP_K,
    "repetition_penalty": checks.REPETITION_PENALTY,
}
DOCUMENT_OUTPUT_TYPES = tuple(t for t in OUTPUT_TYPES if t != "latent")

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
        >>> answer = pipe("<image>What is in the picture?", image=[out.images[0][0]], allow_images=False).text[0]
        ```
"""


class DreamLLMPipeline(DreamLLMDiffusionMixin, DiffusionPipeline, DreamLLMLoraLoaderMixin):
    r"""
    DreamLLM (arXiv 2309.11499): a multimodal LLM that reads and draws pictures, with a Stable Diffusion decoder.

    `__call__` writes documents: the prompt (with `<image>` placeholders and `image`) goes through the Vicuna chat
    template; the model writes, and every `<dream_start>` it emits becomes a picture (`allow_images=False`: a text
    answer). All documents of a call are written together, one forward per decode step; `stream` hands out the events
    as they happen. For text-to-image use [`DreamLLMText2ImagePipeline`] (`DreamLLMText2ImagePipeline.from_pipe(pipe)`
    shares the components). A UNet LoRA in diffusers' format (`load_lora_weights`, [`DreamLLMLoraLoaderMixin`]) acts
    on the documents' pictures.

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
                `seed` (see `dreamllm_hf.building.build_components`).
        """
        from ..building import build_components

        return cls(**build_components(llm, vision, diffusion, num_dream_queries=num_dream_queries, **kwargs))

    @property
    def image_block_length(self) -> int:
        """Positions one drawn picture takes: its dream block (Q + 2) and its CLIP block (N + 2)."""
        return len(self.processor.drawn_picture_ids)

    def format_chat_prompt(self, prompt: str | list[dict], image: list | None = None) -> str:
        """
        The chat-template prompt (Vicuna v1.1 for the release) of a user message (a string) or a conversation (a list
        of `{"role", "content"}` dicts, see `__call__`), ending in `"ASSISTANT:"` so that the model answers. Pictures
        are `<image>` (read) in user turns and `<dream>` (drawn) in assistant turns; `chat_prompt_and_images` also
        returns the pictures.
        """
        return self.chat_prompt_and_images(prompt, image, check_pictures=image is not None)[0]

    def chat_prompt_and_images(
        self, prompt: str | list[dict], image: list | None = None, check_pictures: bool = True
    ) -> tuple[str, list]:
        """
        `format_chat_prompt(prompt)` and its pictures in reading order: those inside the messages, and those of
        `image` for placeholders without a picture of their own (`<image>` in a string, `{"type": "image"}`), one
        per placeholder (`check_pictures=False`: the text only, missing pictures left out).
        """
        conversation = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages, pictures = render_conversation(conversation, image, check_pictures=check_pictures)
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text, pictures

    # ----------------------------------------------------------------------------------------------------------------
    # Checks

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

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | list[dict] | None = None,
        image: Any = None,
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
        stream: bool = False,
    ) -> DreamLLMPipelineOutput | tuple | Iterator[DocumentEvent]:
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
                `<image>` marks where a picture of `image` goes.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, or a list of those, *optional*):
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
            stream (`bool`, *optional*, defaults to `False`):
                Return an iterator of [`DocumentEvent`]s as the documents are written instead of the output (what
                `stream()` does); the arguments are checked when the call is made, the models run as it is iterated.

        Examples:

        Returns:
            [`DreamLLMPipelineOutput`] or `tuple` `(images, text, documents, stop_reasons)`; with `stream=True`, an
            iterator of [`DocumentEvent`]s.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        sampling = dict(
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
        )

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
            num_images_per_prompt,
            generator,
            max_new_tokens,
            max_images,
            allow_images,
            output_type,
            cache_implementation,
            callback_on_step_end_tensor_inputs,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            eta=eta,
            sampling=sampling,
            generation_kwargs=generation_kwargs,
            callback_on_step_end=callback_on_step_end,
        )
        prompts = self._as_prompt_list(prompt)
        if streamer is not None and len(prompts) * num_images_per_prompt > 1:
            raise ValueError("A `streamer` follows one document; for several, use `stream()` and its events.")
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._interrupt = False
        self._num_timesteps = 0

        # 2. One request per document, each prompt rendered and tokenized once, one text sampling for the call
        if cache_implementation is None and self.mllm.generation_config.cache_implementation in CACHE_IMPLEMENTATIONS:
            cache_implementation = self.mllm.generation_config.cache_implementation
        writer = DocumentWriter(self, cache_implementation=cache_implementation, streamer=streamer)
        per_prompt_images = self._per_prompt_images(image, len(prompts))
        negatives = (
            list(negative_prompt) if isinstance(negative_prompt, (list, tuple)) else [negative_prompt] * len(prompts)
        )
        requests = []
        for index, item in enumerate(prompts):
            given = per_prompt_images[index] if per_prompt_images is not None else None
            for copy in range(num_images_per_prompt):
                number = index * num_images_per_prompt + copy
                request = DocumentRequest(
                    prompt=item,
                    image=given,
                    use_chat_template=use_chat_template,
                    max_new_tokens=max_new_tokens,
                    max_images=max_images,
                    allow_images=allow_images,
                    generation_kwargs=generation_kwargs,
                    generator=generator[number] if isinstance(generator, (list, tuple)) else generator,
                    negative_prompt=negatives[index],
                    num_inference_steps=num_inference_steps,
                    timesteps=timesteps,
                    sigmas=sigmas,
                    guidance_scale=guidance_scale,
                    guidance_rescale=guidance_rescale,
                    eta=eta,
                    height=height,
                    width=width,
                    output_type=output_type,
                    callback_on_step_end=callback_on_step_end,
                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                    **sampling,
                )
                requests.append((index, request))
        encoded = [
            writer.encode(item, pictures, use_chat_template)
            for item, pictures in zip(prompts, per_prompt_images or [None] * len(prompts))
        ]
        text_sampling = writer.text_sampling(requests[0][1])
        for index, request in requests:
            writer.submit(request, check=False, encoded=encoded[index], sampling=text_sampling)

        # 3. Write them together (the writer draws each step's pictures in one UNet batch per drawing settings)
        events = self._written(writer)
        if stream:
            return events
        output = None
        for event in events:
            if event.type == "end":
                output = event.output
        if not return_dict:
            return output.to_tuple()
        return output

    @torch.no_grad()
    def _written(self, writer: DocumentWriter) -> Iterator[DocumentEvent]:
        try:
            yield from writer.events()
        finally:
            self._num_timesteps = writer.num_timesteps
            # Offload all models (also when a stream is closed before its end)
            self.maybe_free_model_hooks()

    def stream(self, *args, **kwargs) -> Iterator[DocumentEvent]:
        r"""
        Writes the documents as `__call__` does (same arguments), yielding [`DocumentEvent`]s as they are written:
        `"text"` (`.text`), `"picture_start"`, `"picture"` (`.image`, `.index`), `"document_end"` (`.stop_reason`,
        `.usage`) and finally `"end"` (`.output`: what `__call__` returns). Every event but `"end"` carries `.document`.

        ```py
        >>> for event in pipe.stream("Tell me a story.", max_images=2):
        ...     if event.type == "text":
        ...         print(event.text, end="", flush=True)
        ...     elif event.type == "picture":
        ...         event.image.save(f"picture_{event.index}.png")
        ```
        """
        return self(*args, **kwargs, stream=True)


__all__ = ["DreamLLMPipeline"]
