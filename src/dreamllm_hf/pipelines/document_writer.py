"""Documents written by continuous batching: a [`DocumentBatch`] on the language model, pictures drawn by the UNet.

[`DocumentWriter`] is what `DreamLLMPipeline.__call__` and the server drive. Each request is rendered and tokenized
once when it is submitted, joins the running batch at the next `step()`, and leaves it when it ends or is cancelled.
How pictures are drawn is the writer's `denoising`:

* `"together"` (what `DreamLLMPipeline.__call__` uses): the pictures asked for in a step are drawn at once by
  [`DreamLLMText2ImagePipeline`] from their dream embeddings (one UNet batch per equal drawing settings), and the batch
  goes on when they are read. A document's picture is exactly the text-to-image drawing from the same conditioning and
  generator.
* `"continuous"` (what the server uses): a picture joins a running [`PictureBatch`], and each `step()` runs one
  denoising step of every picture being drawn (one UNet call for all of them, each at its own timestep) and one text
  step of the documents that are not waiting for a picture. A document waits, out of the text steps, until its picture
  is drawn and read; pictures asked for at different steps share the UNet's batches. A text step costs about as much
  for one document as for eight, so while pictures are drawn it is taken only when at least as many documents write
  as wait (or documents were added or cancelled): fewer would write alone, out of step with the waiting ones, whose text would then
  need steps of its own. Each picture goes through the same operations as the text-to-image drawing, so it equals it
  within float rounding.
"""

import copy
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from transformers import LogitsProcessorList

from .document_batch import DocumentBatch, PicturesNeeded, TextSampling
from .dream_diffusion import takes_guidance
from .picture_batch import PictureBatch, PictureRequest
from .pipeline_output import DocumentEvent, DreamLLMPipelineOutput


# Set by the writer itself, or meaningless for documents (one sequence each, no beams, stops by the format).
RESERVED_GENERATE_KWARGS = {
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
# Options that count positions from the start of the prompt; in a batch that documents join and leave, the columns of
# a row are not its positions, so they cannot be applied per document.
POSITIONAL_GENERATE_KWARGS = ("min_length", "min_new_tokens", "begin_suppress_tokens")
SAMPLING_OPTIONS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
MAX_SHARED_SAMPLINGS = 64  # `TextSampling`s kept for reuse, the oldest dropped first
DENOISING_MODES = ("together", "continuous")


@dataclass
class DocumentRequest:
    r"""
    One document to write, with all its settings (documents of one running batch may differ in every one of them).
    The fields mean what the `DreamLLMPipeline.__call__` arguments of the same names mean.

    Args:
        prompt (`str` or `list[dict]`): a user message or a conversation (assistant turns may hold drawn pictures).
        image (`list`, *optional*): pictures for the placeholders without a picture of their own.
        generator (`torch.Generator`, *optional*): seeds the document's text sampling and its pictures; a document
            with a generator of its own is the same whether written alone or with others.
    """

    prompt: str | list[dict]
    image: list | None = None
    use_chat_template: bool = True
    max_new_tokens: int = 256
    max_images: int | None = None
    allow_images: bool = True
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    generation_kwargs: dict | None = None
    generator: torch.Generator | None = None
    negative_prompt: str | None = None
    num_inference_steps: int = 50
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    eta: float = 0.0
    height: int | None = None
    width: int | None = None
    output_type: str = "pil"
    callback_on_step_end: Callable | None = None
    callback_on_step_end_tensor_inputs: list[str] = field(default_factory=lambda: ["latents"])

    def sampling(self) -> dict:
        return {name: getattr(self, name) for name in SAMPLING_OPTIONS}

    def drawing_key(self) -> tuple:
        """Documents whose pictures can be drawn in one UNet batch have equal keys."""
        return (
            self.height,
            self.width,
            self.num_inference_steps,
            tuple(self.timesteps or ()),
            tuple(self.sigmas or ()),
            self.guidance_scale,
            self.guidance_rescale,
            self.eta,
            id(self.callback_on_step_end),
            tuple(self.callback_on_step_end_tensor_inputs),
        )


class DocumentWriter:
    """
    Writes documents with continuous batching on a [`DreamLLMPipeline`]'s components.

    Args:
        pipe ([`DreamLLMPipeline`]): the pipeline whose language model, processor and decoder write the documents.
        cache_implementation (`str`, *optional*): `"dynamic"` (default) or `"static"` (see [`DocumentBatch`]).
        streamer (`BaseStreamer`, *optional*): follows the one document of the writer.
        on_denoising_step (`Callable`, *optional*): called as `on_denoising_step(documents, step, total)` after each
            denoising step of a batch of pictures (`documents`: their ids).
        denoising (`str`, *optional*, defaults to `"together"`): how pictures are drawn, `"together"` or
            `"continuous"` (see the module's documentation).

    `submit` and `cancel` may be called from any thread; `step` (which runs the models) from one thread at a time.
    """

    def __init__(
        self,
        pipe,
        cache_implementation: str | None = None,
        streamer=None,
        on_denoising_step=None,
        denoising="together",
    ):
        if denoising not in DENOISING_MODES:
            raise ValueError(f"Unknown denoising {denoising!r}; choose one of {DENOISING_MODES}.")
        if denoising == "continuous" and cache_implementation == "static":
            # Documents that wait for pictures while others write drift apart in the rows' columns; a fixed-width cache
            # could not hold the drift.
            raise ValueError(
                "denoising='continuous' needs the dynamic cache (cache_implementation=None or 'dynamic'): documents "
                "wait for their pictures while others write, and a static cache's fixed width cannot follow them."
            )
        self.pipe = pipe
        self.batch = DocumentBatch(pipe.mllm, pipe.processor, cache_implementation, streamer)
        self.on_denoising_step = on_denoising_step
        self.denoising = denoising
        self._pictures = PictureBatch(pipe) if denoising == "continuous" else None
        self._num_timesteps = 0
        self._text2image = None
        self._requests: dict[int, DocumentRequest] = {}
        self._outputs: dict[int, DreamLLMPipelineOutput] = {}
        self._unconditional: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._samplings: dict[tuple, TextSampling] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    @property
    def text2image(self):
        """The text-to-image pipeline on the same components, which draws the documents' pictures."""
        if self._text2image is None:
            from .pipeline_dreamllm_text2img import DreamLLMText2ImagePipeline

            self._text2image = DreamLLMText2ImagePipeline.from_pipe(self.pipe)
        return self._text2image

    @property
    def num_timesteps(self) -> int:
        """The denoising steps of the last picture drawn (0 before any)."""
        if self._pictures is not None:
            return self._num_timesteps
        return self._text2image.num_timesteps if self._text2image is not None else 0

    # ----------------------------------------------------------------------------------------------------------------
    # Requests

    def check(self, request: DocumentRequest) -> None:
        """Refuses a bad request before any model work, with the pipeline's own messages (`ValueError`/`TypeError`)."""
        if self._pictures is not None and request.callback_on_step_end is not None:
            raise ValueError(
                "`callback_on_step_end` needs pictures drawn by text-to-image calls: a writer with "
                "denoising='continuous' denoises many documents' pictures in one loop. Use denoising='together'."
            )
        height, width = self._size(request)
        self.pipe.check_inputs(
            request.prompt,
            request.image,
            height,
            width,
            request.num_inference_steps,
            request.timesteps,
            request.sigmas,
            request.negative_prompt,
            1,
            request.generator,
            request.max_new_tokens,
            request.max_images,
            request.allow_images,
            request.output_type,
            None,
            request.callback_on_step_end_tensor_inputs,
            guidance_scale=request.guidance_scale,
            guidance_rescale=request.guidance_rescale,
            eta=request.eta,
            sampling=request.sampling(),
            generation_kwargs=request.generation_kwargs,
            callback_on_step_end=request.callback_on_step_end,
        )

    def _size(self, request: DocumentRequest) -> tuple[int | None, int | None]:
        """The request's picture size, the UNet's own where it gives none."""
        unet = getattr(self.pipe, "unet", None)
        if unet is None:
            return request.height, request.width
        size = unet.config.sample_size * self.pipe.vae_scale_factor
        return (size if request.height is None else request.height), (size if request.width is None else request.width)

    def encode(self, prompt, image=None, use_chat_template: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A prompt's ids `[length]` (BOS, chat template, placeholders expanded) and its pictures' CLIP pixel values."""
        if isinstance(prompt, str) and not use_chat_template:
            text, pictures = prompt, list(image or [])
        else:
            text, pictures = self.pipe.chat_prompt_and_images(prompt, image)
        encoded = self.pipe.processor(text=[text], images=[pictures] if pictures else None, return_tensors="pt")
        return encoded["input_ids"][0], encoded.get("pixel_values")

    def text_sampling(self, request: DocumentRequest) -> TextSampling:
        """The request's `TextSampling`; requests with the same options (and no logits processors of their own) share
        one, so their logits are processed together."""
        kwargs = dict(request.generation_kwargs or {})
        key = None
        if not kwargs:
            key = (request.allow_images, tuple(sorted(request.sampling().items())))
            if key in self._samplings:
                return self._samplings[key]
        sampling = self._build_sampling(request.allow_images, request.sampling(), kwargs)
        if key is not None:
            if len(self._samplings) >= MAX_SHARED_SAMPLINGS:  # a long-running server sees many settings
                self._samplings.pop(next(iter(self._samplings)))
            self._samplings[key] = sampling
        return sampling

    def _build_sampling(self, allow_images: bool, sampling: dict, kwargs: dict) -> TextSampling:
        config = self.pipe.mllm.config
        reserved = sorted(set(kwargs) & RESERVED_GENERATE_KWARGS)
        if reserved:
            raise ValueError(
                f"`generation_kwargs` may not set {reserved}: the pipeline sets them (use the "
                "`max_new_tokens`, `num_images_per_prompt` and `streamer` arguments)."
            )
        positional = sorted(set(kwargs) & set(POSITIONAL_GENERATE_KWARGS))
        if positional:
            raise ValueError(
                f"`generation_kwargs` may not set {positional}: documents join and leave a running batch, so options "
                "that count positions from the prompt cannot be applied per document. Use `max_new_tokens` and a "
                "`logits_processor` that reads the row it is given instead."
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
        generation_config = copy.deepcopy(self.pipe.mllm.generation_config)
        unused = generation_config.update(**kwargs)
        unused = sorted(set(unused) - {"output_attentions", "output_hidden_states"})
        if unused:
            raise ValueError(
                f"`generation_kwargs` has {unused}, which are not `GenerationConfig` options; see "
                "`transformers.GenerationConfig` for what can be set."
            )
        generation_config.validate()
        if (generation_config.num_beams or 1) > 1:
            raise ValueError(
                "Documents sample one sequence each; `num_beams` > 1 is not supported (the cache would not follow "
                "the chosen beam). Use `num_images_per_prompt` for several documents per prompt."
            )
        if logits_processor is not None and not isinstance(logits_processor, LogitsProcessorList):
            logits_processor = LogitsProcessorList(logits_processor)
        return TextSampling.build(self.pipe.mllm, generation_config, logits_processor)

    def submit(
        self,
        request: DocumentRequest,
        check: bool = True,
        encoded: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        sampling: TextSampling | None = None,
    ) -> int:
        """Queues a document; it joins the running batch at the next `step()`. Returns its id (the `document` of its
        events). `check=False`, `encoded` (from `encode`) and `sampling` (from `text_sampling`) let a caller that
        already did that work for many requests share it."""
        if check:
            self.check(request)
        input_ids, pixel_values = (
            encoded if encoded is not None else self.encode(request.prompt, request.image, request.use_chat_template)
        )
        sampling = sampling or self.text_sampling(request)
        request = copy.copy(request)
        request.height, request.width = self._size(request)
        with self._lock:
            document = next(self._ids)
            self._requests[document] = request  # before it can join the batch (and draw) on the model thread
        try:
            self.batch.add(
                document,
                input_ids,
                sampling,
                pixel_values=pixel_values,
                generator=request.generator,
                max_new_tokens=request.max_new_tokens,
                max_images=request.max_images if request.allow_images else 0,
            )
        except BaseException:
            with self._lock:
                del self._requests[document]
            raise
        return document

    def cancel(self, document: int) -> None:
        """The document leaves the batch at the next step (its `"document_end"` says `"cancelled"`)."""
        self.batch.cancel(document)

    @property
    def has_work(self) -> bool:
        return self.batch.has_work

    # ----------------------------------------------------------------------------------------------------------------
    # Writing

    def step(self) -> list[DocumentEvent]:
        """One step of every document: admits the queued ones, samples a token each, draws the pictures asked for."""
        return [event for part in self.step_parts() for event in part]

    def step_parts(self) -> Iterator[list[DocumentEvent]]:
        """`step()` in the order things happen: first the step's text and `"picture_start"` events, then (after the
        pictures are drawn) the `"picture"` events and the ends, so that a reader sees the text before the drawing."""
        drawing = self._pictures is not None and len(self._pictures) > 0
        if drawing and not self._text_step_due():
            yield from self._denoise_and_read()
            return
        result = self.batch.step()
        yield self._done(result.events)
        if result.pictures is not None and self._pictures is None:
            needed = result.pictures
            pictures, shown = self._draw(needed.documents, needed.prompt_embeds, needed.pooled_prompt_embeds)
            yield self._done(self.batch.read_pictures(needed.documents, pictures, shown))
        elif result.pictures is not None:
            self._start_pictures(result.pictures)
        if self._pictures is not None and len(self._pictures):
            yield from self._denoise_and_read()

    def _text_step_due(self) -> bool:
        """Continuous denoising, pictures being drawn: whether this step also writes text (see the module's notes)."""
        waiting = len(self.batch.waiting_documents)
        return self.batch.has_arrivals or len(self.batch.live_documents) - waiting > waiting

    def _denoise_and_read(self) -> Iterator[list[DocumentEvent]]:
        documents, pictures, shown = self._denoise_step()
        if documents:
            yield self._done(self.batch.read_pictures(documents, pictures, shown))

    def _done(self, events: list[DocumentEvent]) -> list[DocumentEvent]:
        for event in events:
            if event.type == "document_end":
                self._outputs[event.document] = event.output
                with self._lock:
                    self._requests.pop(event.document, None)
        return events

    def events(self) -> Iterator[DocumentEvent]:
        """Steps until every submitted document is written, then a last `"end"` event with all of them in order."""
        while self.has_work:
            for part in self.step_parts():
                yield from part
        outputs = [self._outputs.pop(d) for d in sorted(self._outputs)]
        yield DocumentEvent(
            type="end",
            output=DreamLLMPipelineOutput(
                images=[o.images[0] for o in outputs],
                text=[o.text[0] for o in outputs],
                documents=[o.documents[0] for o in outputs],
                stop_reasons=[o.stop_reasons[0] for o in outputs],
            ),
        )

    def _draw(self, documents: list[int], prompt_embeds, pooled_prompt_embeds) -> tuple[list, list]:
        """The pictures of `documents` (PIL, to be read back) and as their documents show them, each batch of equal
        drawing settings in one text-to-image call."""
        requests = [self._requests[d] for d in documents]
        pictures, shown = [None] * len(documents), [None] * len(documents)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.drawing_key(), []).append(i)
        for members in groups.values():
            first = requests[members[0]]
            select = torch.tensor(members, device=prompt_embeds.device)
            negative = negative_pooled = None
            if takes_guidance(self.pipe.unet.config, first.guidance_scale):
                unconditional = [self._unconditional_embeddings(requests[i].negative_prompt or "") for i in members]
                negative = torch.cat([u[0] for u in unconditional])
                if pooled_prompt_embeds is not None:
                    negative_pooled = torch.cat([u[1] for u in unconditional])
            generators = [requests[i].generator for i in members]
            shared = all(g is generators[0] for g in generators)
            drawn = self.text2image(
                prompt_embeds=prompt_embeds[select],
                negative_prompt_embeds=negative,
                pooled_prompt_embeds=pooled_prompt_embeds[select] if pooled_prompt_embeds is not None else None,
                negative_pooled_prompt_embeds=negative_pooled,
                height=first.height,
                width=first.width,
                num_inference_steps=first.num_inference_steps,
                timesteps=first.timesteps,
                sigmas=first.sigmas,
                guidance_scale=first.guidance_scale,
                guidance_rescale=first.guidance_rescale,
                eta=first.eta,
                generator=generators[0] if shared else generators,
                output_type="np",
                callback_on_step_end=self._callback(first, [documents[i] for i in members]),
                callback_on_step_end_tensor_inputs=first.callback_on_step_end_tensor_inputs,
            ).images
            as_pil = VaeImageProcessor.numpy_to_pil(drawn)  # CLIP reads each picture as it is saved (8-bit)
            for row, i in enumerate(members):
                pictures[i] = as_pil[row]
                shown[i] = _as_output_type(drawn[row], as_pil[row], requests[i].output_type)
        return pictures, shown

    def _start_pictures(self, needed: PicturesNeeded) -> None:
        """Continuous denoising: the pictures asked for join the running picture batch (one per document)."""
        pooled = needed.pooled_prompt_embeds
        for row, document in enumerate(needed.documents):
            request = self._requests[document]
            negative = negative_pooled = None
            if takes_guidance(self.pipe.unet.config, request.guidance_scale):
                negative, negative_pooled = self._unconditional_embeddings(request.negative_prompt or "")
            self._pictures.add(
                document,
                PictureRequest(
                    prompt_embeds=needed.prompt_embeds[row : row + 1],
                    negative_prompt_embeds=negative,
                    pooled_prompt_embeds=pooled[row : row + 1] if pooled is not None else None,
                    negative_pooled_prompt_embeds=negative_pooled,
                    height=request.height,
                    width=request.width,
                    num_inference_steps=request.num_inference_steps,
                    timesteps=request.timesteps,
                    sigmas=request.sigmas,
                    guidance_scale=request.guidance_scale,
                    guidance_rescale=request.guidance_rescale,
                    eta=request.eta,
                    generator=request.generator,
                ),
            )

    def _denoise_step(self) -> tuple[list[int], list, list]:
        """Continuous denoising: one step of every picture being drawn. Returns the documents whose pictures are done,
        with the pictures (PIL, to be read back) and as their documents show them."""
        waiting = set(self.batch.waiting_documents)
        for document in self._pictures.keys:  # cancelled: its document no longer waits, or will not at the next step
            if document not in waiting or self.batch.all_cancelled([document]):
                self._pictures.drop(document)
        if not len(self._pictures):
            return [], [], []
        finished = self._pictures.step()
        if self.on_denoising_step is not None:
            for document in self._pictures.keys:
                self.on_denoising_step([document], *self._pictures.progress(document))
            for document, _, total in finished:
                self.on_denoising_step([document], total, total)
        documents, pictures, shown = [], [], []
        for document, array, total in finished:
            picture = VaeImageProcessor.numpy_to_pil(array[None])[0]  # CLIP reads each picture as it is saved (8-bit)
            documents.append(document)
            pictures.append(picture)
            shown.append(_as_output_type(array, picture, self._requests[document].output_type))
            self._num_timesteps = total
        return documents, pictures, shown

    def _unconditional_embeddings(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unconditional of a picture: `text` (`""`: `<s>` alone) through the same path, computed once."""
        if text not in self._unconditional:
            embeds, _, pooled, _ = self.text2image.encode_prompt(text, self.pipe._execution_device, 1, False)
            self._unconditional[text] = (embeds, pooled)
        return self._unconditional[text]

    def _callback(self, request: DocumentRequest, documents: list[int]):
        """The request's own callback, the writer's progress report, and a stop: pictures whose documents were all
        cancelled while they are drawn skip their remaining denoising steps (they are dropped unread)."""
        given, report = request.callback_on_step_end, self.on_denoising_step

        def callback(pipeline, step, timestep, callback_kwargs):
            outputs = {}
            if given is not None:
                # As in diffusers, the callback gets the pipeline that was called, showing the drawing's state; what it
                # sets there (`_guidance_scale`, `_interrupt`) steers the drawing.
                called = self.pipe
                called._num_timesteps = pipeline.num_timesteps
                called._guidance_scale, called._guidance_rescale = pipeline.guidance_scale, pipeline.guidance_rescale
                outputs = given(called, step, timestep, callback_kwargs)
                pipeline._guidance_scale, pipeline._guidance_rescale = called.guidance_scale, called.guidance_rescale
                if getattr(called, "_interrupt", False):
                    pipeline._interrupt = True
            if report is not None:
                report(documents, step + 1, pipeline.num_timesteps)
            if self.batch.all_cancelled(documents):
                pipeline._interrupt = True  # diffusers' way to leave the denoising loop
            return outputs

        return callback


def _as_output_type(array: np.ndarray, picture, output_type: str) -> Any:
    """A drawn picture (`[H, W, 3]` in [0, 1]) as a document holds it: what text-to-image gives for `output_type`."""
    if output_type == "pil":
        return picture
    if output_type == "pt":
        return torch.from_numpy(array).permute(2, 0, 1)
    return array


__all__ = ["DocumentRequest", "DocumentWriter"]
