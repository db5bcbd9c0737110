"""The running batch of documents on the language model (continuous batching).

A [`DocumentBatch`] knows only the language model and the processor's token layout. Documents are `add`ed at any time
and join the batch at the next `step()`: their prompts are read (prefilled) and their rows merged into the batch's
key/value cache. Each `step()` samples one token per document and feeds it back. When documents emit `<dream_start>`
in a step, `step()` hands back their dream embeddings (one language-model pass over their rows) as a
[`PicturesNeeded`]; whoever drives the batch draws those pictures with the UNet and gives them back to
`read_pictures()`, which reads them through CLIP into the same rows. Until then those documents wait, out of the
steps, while the others go on (at once, or many steps later: the driver decides). Finished or cancelled documents leave the batch
and free their rows. The batch never calls a pipeline.

The cache's rows are right-aligned: every document's tokens end at the same column, shorter documents being padded on
the left (masked, positions from the count of real tokens, as with left-padded prompts). A picture adds the same
`Q + 2 + 1 + N` positions to each document that draws it; its row is rewritten `K` columns further left, into its own
padding, and the cache grows on the left only when a row has no padding left. So the cache is never longer than the
longest document, at the price of copying the drawing rows (and, when it grows, the whole cache) once per picture
event. (Documents that wait for pictures while others write take masked columns meanwhile; they are trimmed away
when a document leaves.) Documents that finish leave the batch with a dynamic cache (the cache is trimmed to the longest remaining one);
with a static cache they stay, masked, so that every decode step keeps the shapes the compiled step was built for, and
documents added while a static batch runs wait until it is empty.

Sliding-window layers (Mistral, Gemma 2/3, Qwen with `use_sliding_window`) keep only the last columns of the cache;
every row operation reads and writes a layer through the columns it holds (`_held_columns`, `_hold_columns`), so full
and sliding layers, dynamic and static, move together. Columns are shared by all rows, and each live document's tokens
are contiguous at the right of its row, so a window over columns is the window over that document's tokens.

Reproducibility: a document samples from its own generator (documents that share one generator object draw from it
together, in row order), and its logits processors see its own row, so a document with a generator of its own gives the
same tokens whether it is written alone, in a batch from the start, or added to a running batch.
"""

import copy
import threading
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StaticCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer

from .dream_diffusion import onload
from .pipeline_output import DocumentEvent, DreamLLMPipelineOutput, StopReason


CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")
STATIC_CACHE_BUCKET = 256  # static cache widths are multiples of this (one compiled decode step for many calls)


@dataclass
class TextSampling:
    """How a document's text is sampled: a `GenerationConfig` and the logits processors it implies (with the user's
    own). Documents given the same object have their logits processed in one call."""

    generation_config: GenerationConfig
    processors: LogitsProcessorList

    @classmethod
    def build(cls, mllm, generation_config: GenerationConfig, logits_processor: LogitsProcessorList | None = None):
        """The processors of `generation_config` as `generate` builds them. transformers has no public builder for
        them, so this is the one place where the batch uses `GenerationMixin`'s private helpers."""
        generation_config = copy.deepcopy(generation_config)
        device = mllm.device if mllm.device.type != "meta" else torch.device("cpu")
        mllm._prepare_special_tokens(generation_config, True, device=device)
        processors = mllm._get_logits_processor(
            generation_config=generation_config,
            input_ids_seq_length=1,  # rows start with BOS; position-counting options are refused by the pipeline
            logits_processor=logits_processor or LogitsProcessorList(),
            device=device,
        )
        return cls(generation_config=generation_config, processors=processors)


@dataclass
class PicturesNeeded:
    """Documents that asked for a picture in this step, and the conditioning of each picture (one row each)."""

    documents: list[int]
    prompt_embeds: torch.Tensor  # `[n, Q, cross_attention_dim]`: the UNet's `encoder_hidden_states`
    pooled_prompt_embeds: torch.Tensor | None  # `[n, pooled_projection_dim]` for SDXL-style decoders, else None


@dataclass
class StepResult:
    """What one `step()` did: the events of the step so far and, if some documents wait for pictures, which."""

    events: list[DocumentEvent]
    pictures: PicturesNeeded | None = None


@dataclass
class _Parked:
    """Documents that asked for a picture in the same step: a copy of their rows with the dream block appended (the
    cache their picture is read into), and the rows' attention mask over it."""

    documents: list
    cache: DynamicCache
    mask: torch.Tensor


@dataclass
class _Document:
    """A document being written (the batch's bookkeeping)."""

    id: int
    input_ids: torch.Tensor  # `[length]`, placeholders expanded
    pixel_values: torch.Tensor | None  # the prompt's pictures, `[n, 3, H, W]`
    sampling: TextSampling
    generator: torch.Generator | None
    max_new_tokens: int
    max_images: int | None
    tokens_left: int
    length: int = 0  # tokens in the cache for this document
    stream_length: int = 0  # tokens of its stream: those in the cache and the pending one
    pending: int | None = None  # the token fed at the next decode step
    pictures: int = 0
    segments: list = field(default_factory=list)
    text_tokens: list[int] = field(default_factory=list)  # the text segment being written
    emitted: str = ""
    stop_reason: str | None = None
    waiting: bool = False  # for its picture: out of the steps until `read_pictures` gives it

    @property
    def prompt_length(self) -> int:
        return int(self.input_ids.shape[0])


class DocumentBatch:
    """
    Documents written together on one language model, joining and leaving between steps.

    Args:
        mllm ([`DreamLLMForConditionalGeneration`]): the language model.
        processor ([`DreamLLMProcessor`]): its processor (token layout, tokenizer for the text, CLIP image processor).
        cache_implementation (`str`, *optional*): `"dynamic"` (default) or `"static"` (a preallocated `StaticCache`;
            on CUDA the decode step is compiled as one graph).
        streamer (`BaseStreamer`, *optional*): follows the one document of a batch (the prompt, then each token).

    `add` and `cancel` may be called from any thread; `step` and `read_pictures` from one thread at a time.
    """

    def __init__(self, mllm, processor, cache_implementation: str | None = None, streamer=None):
        if cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"Unknown cache_implementation {cache_implementation!r}; choose 'dynamic' (default) or 'static'."
            )
        self.mllm = mllm
        self.processor = processor
        self.config = config = mllm.config
        # The processor owns the token layout; the model must read pictures with the same one.
        processor.check_model_config(config)
        self.tokenizer = processor.tokenizer
        self.eos = config.eos_token_id
        self.dream_start = config.dream_start_token_id
        self.pad = config.pad_token_id
        self.context = config.text_config.max_position_embeddings
        drawn_picture = processor.drawn_picture_ids
        self.block_length = len(drawn_picture)
        self.dream_block_length = len(processor.dream_block_ids)
        self.image_start, self.image_end = processor.image_block_ids[0], drawn_picture[-1]
        self.picture_ids = drawn_picture[:-1]  # a drawn picture in the stream, but `<im_end>` (the next pending token)
        self.static = cache_implementation == "static"
        self.streamer = streamer
        _check_cache_layers(config, DynamicCache(config=config.text_config))

        self._lock = threading.Lock()
        self._queued: list[_Document] = []
        self._cancelled: set[int] = set()
        self.rows: list[_Document] = []  # the documents in the cache, in row order
        self._asking: list[_Document] = []  # asked for a picture in the current step
        self._parked: dict[int, _Parked] = {}  # the documents waiting for their pictures, by id
        self._needs_decode = False
        self.cache = self.mask = self.ids = None
        self.end = 0
        self._step_call = mllm

    # ----------------------------------------------------------------------------------------------------------------
    # Joining and leaving

    def add(
        self,
        document: int,
        input_ids: torch.Tensor,
        sampling: TextSampling,
        pixel_values: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        max_new_tokens: int = 256,
        max_images: int | None = None,
    ) -> None:
        """Queues a document (its prompt's ids, `[length]`, placeholders expanded, BOS first); it joins the batch at the
        next `step()`."""
        length = int(input_ids.shape[-1])
        if length + 1 > self.context:
            raise ValueError(
                f"The prompt takes {length} positions and the answer needs 1 more, but the model's context is "
                f"{self.context} positions (`text_config.max_position_embeddings`). Shorten the prompt or pass fewer "
                f"images (each `<image>` takes {len(self.processor.image_block_ids)} positions)."
            )
        entry = _Document(
            id=document,
            input_ids=input_ids.reshape(-1),
            pixel_values=pixel_values,
            sampling=sampling,
            generator=generator,
            max_new_tokens=max_new_tokens,
            max_images=max_images,
            tokens_left=max_new_tokens,
        )
        with self._lock:
            if any(d.id == document for d in self._queued + self.rows):
                raise ValueError(f"Document {document} is already in the batch; give each document its own id.")
            self._queued.append(entry)

    def cancel(self, document: int) -> None:
        """The document leaves at the next step boundary (a `"document_end"` event with stop reason `"cancelled"`)."""
        with self._lock:
            self._cancelled.add(document)

    def all_cancelled(self, documents: list[int]) -> bool:
        """Whether every one of `documents` was cancelled since the last step."""
        with self._lock:
            return all(d in self._cancelled for d in documents)

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._queued) or any(d.stop_reason is None for d in self.rows)

    @property
    def has_arrivals(self) -> bool:
        """Whether documents were added or cancelled since the last step (the next step admits or drops them)."""
        with self._lock:
            return bool(self._queued) or bool(self._cancelled)

    @property
    def live_documents(self) -> list[int]:
        """The documents being written (in the cache, not finished), in row order."""
        return [d.id for d in self.rows if d.stop_reason is None]

    @property
    def waiting_documents(self) -> list[int]:
        """The documents waiting for their pictures (asked for in `PicturesNeeded`, not yet given to `read_pictures`)."""
        return list(self._parked)

    @property
    def cache_rows(self) -> int:
        """Rows the cache holds (finished documents leave a dynamic cache; a static one keeps them, masked)."""
        return len(self.rows)

    # ----------------------------------------------------------------------------------------------------------------
    # The step

    @torch.no_grad()
    def step(self) -> StepResult:
        """Feeds the last sampled tokens, admits queued documents, samples one token per document.

        Returns the step's events; when documents asked for pictures, also their conditioning. Those documents wait,
        out of the steps, until `read_pictures` gives them their pictures (in this step or any later one)."""
        events = self._apply_cancellations()
        logits = {}
        if self._needs_decode and any(_writes(d) for d in self.rows):
            logits.update(zip([d.id for d in self.rows], self._decode_step()))
        self._needs_decode = False
        logits.update(self._admit())
        live = [d for d in self.rows if _writes(d) and d.id in logits]
        if not live:
            return StepResult(events + self._end_step([]))
        tokens = self._sample(live, logits)
        for document, token in zip(live, tokens):
            events.extend(self._take_token(document, token))
        pictures = None
        if self._asking:
            pictures = self._dream_embeddings(self._asking)
            self._asking = []
        return StepResult(events + self._end_step(live), pictures)

    @torch.no_grad()
    def read_pictures(self, documents: list[int], pictures: list, shown: list | None = None) -> list[DocumentEvent]:
        """Reads the pictures drawn for `documents` (waiting ones, in any order and any number; PIL pictures) through
        CLIP into their rows; `shown` (default: the pictures) is what their documents hold. The documents go on at the
        next step. Returns their `"picture"` events and the ends of those that end there."""
        documents = list(documents)
        unknown = [d for d in documents if d not in self._parked]
        if unknown or len(pictures) != len(documents) or len(set(documents)) != len(documents):
            raise ValueError(
                f"`read_pictures` takes one picture for each of the documents waiting for one ({self.waiting_documents});"
                f" got {len(pictures)} for {documents}" + (f" ({unknown} are not waiting)." if unknown else ".")
            )
        shown = pictures if shown is None else shown
        onload(self.mllm)
        device = self.mask.device
        pixel_values = self.processor.image_processor(pictures, return_tensors="pt")["pixel_values"].to(device)
        features = self.mllm.get_image_features(pixel_values).pooler_output
        with self._lock:  # a document cancelled while its picture was drawn ends without it
            cancelled = set(documents) & self._cancelled
            self._cancelled -= cancelled
        events, read = [], []
        for parked, _ in _groups([self._parked[d] for d in documents], lambda parked: parked):
            chosen = [i for i, d in enumerate(documents) if self._parked[d] is parked]
            waiting = [next(w for w in parked.documents if w.id == documents[i]) for i in chosen]
            added = self._read_group(parked, waiting, features[chosen])
            for i, document in zip(chosen, waiting):
                del self._parked[document.id]
                document.waiting = False
                if document.id in cancelled:
                    self._finish(document, StopReason.CANCELLED)
                    read.append(document)
                    continue
                document.segments.append(shown[i])
                document.pictures += 1
                document.length += added
                document.stream_length += added + 1
                document.pending = self.image_end
                events.append(
                    DocumentEvent(type="picture", document=document.id, image=shown[i], index=document.pictures - 1)
                )
                self._check_budget(document)
                read.append(document)
        return events + self._end_step(read)

    def _read_group(self, parked: _Parked, waiting: list[_Document], features: torch.Tensor) -> int:
        """`<im_start>` + the pictures' CLIP features after the dream blocks of `waiting` (some documents of `parked`),
        written back into their rows. Returns the positions each document gained (dream block and picture)."""
        index = [parked.documents.index(d) for d in waiting]
        cache, mask = parked.cache, parked.mask
        if len(index) < len(parked.documents):  # some of the group's pictures are still being drawn
            cache = _copy_rows(cache, index, cache.get_seq_length(), self.config)
            mask = mask[torch.tensor(index, device=mask.device)]
        count, device = len(waiting), mask.device
        start = self.mllm.get_input_embeddings()(torch.full((count, 1), self.image_start, device=device))
        inputs_embeds = torch.cat([start, features.to(start.dtype)], dim=1)
        mask = torch.cat([mask, mask.new_ones(count, inputs_embeds.shape[1])], dim=1)
        self.mllm(inputs_embeds=inputs_embeds, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
        added = self.dream_block_length + inputs_embeds.shape[1]
        self._write_rows([self.rows.index(d) for d in waiting], waiting, cache, added)
        return added

    def _unpark(self, document: _Document) -> None:
        """A waiting document that ended (cancelled): its picture will not be read."""
        parked = self._parked.pop(document.id, None)
        document.waiting = False
        if parked is not None:
            keep = [i for i, d in enumerate(parked.documents) if d is not document]
            if keep and len(keep) < len(parked.documents):
                parked.cache = _copy_rows(parked.cache, keep, parked.cache.get_seq_length(), self.config)
                parked.mask = parked.mask[torch.tensor(keep, device=parked.mask.device)]
                parked.documents = [parked.documents[i] for i in keep]

    def _end_step(self, stepped: list[_Document]) -> list[DocumentEvent]:
        """The end events of the documents that finished in this step; they leave a dynamic batch."""
        events = [self._end_event(d) for d in stepped if d.stop_reason is not None]
        self._release_finished()
        self._needs_decode = True
        if self.streamer is not None and not any(d.stop_reason is None for d in self.rows) and not self._queued:
            self.streamer.end()
        return events

    def _apply_cancellations(self) -> list[DocumentEvent]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            dropped = [d for d in self._queued if d.id in cancelled]
            self._queued = [d for d in self._queued if d.id not in cancelled]
        events = []
        for document in dropped + [d for d in self.rows if d.id in cancelled and d.stop_reason is None]:
            self._finish(document, StopReason.CANCELLED)
            self._unpark(document)
            events.append(self._end_event(document))
        self._release_finished()
        return events

    # ----------------------------------------------------------------------------------------------------------------
    # Tokens and text

    def _take_token(self, document: _Document, token: int) -> list[DocumentEvent]:
        """Applies one sampled token to its document (the same rules as `generate` with the same budget)."""
        if self.streamer is not None:
            self.streamer.put(torch.tensor([token]))
        document.tokens_left -= 1
        if token == self.eos:
            self._finish(document, StopReason.EOS)
        elif token == self.dream_start:
            self._close_segment(document)  # `<dream_start>` is fed with its queries, not as the next token
            if document.max_images is not None and document.pictures >= document.max_images:
                self._finish(document, StopReason.MAX_IMAGES)
            elif document.stream_length + self.block_length > self.context:
                self._finish(document, StopReason.CONTEXT_LIMIT)
            else:
                self._asking.append(document)
                return [DocumentEvent(type="picture_start", document=document.id, index=document.pictures)]
        else:
            document.text_tokens.append(token)
            document.pending = token
            document.stream_length += 1
            self._check_budget(document)
        return self._text_event(document)

    def _check_budget(self, document: _Document) -> None:
        if document.tokens_left <= 0:
            self._finish(document, StopReason.MAX_NEW_TOKENS)
        elif document.stream_length >= self.context:
            self._finish(document, StopReason.CONTEXT_LIMIT)

    def _finish(self, document: _Document, reason: str) -> None:
        self._close_segment(document)
        document.stop_reason = reason
        document.pending = None

    def _segment_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _close_segment(self, document: _Document) -> None:
        if document.text_tokens:
            text = self._segment_text(document.text_tokens)
            if text.strip():
                document.segments.append(text)
            document.text_tokens = []

    def _document_text(self, document: _Document) -> str:
        """The document's text so far, as `DreamLLMPipelineOutput.text` will hold it."""
        parts = [s for s in document.segments if isinstance(s, str)]
        if document.text_tokens:
            current = self._segment_text(document.text_tokens)
            if current.strip():
                parts.append(current)
        return "\n".join(parts)

    def _text_event(self, document: _Document) -> list[DocumentEvent]:
        """The text added since the last event. Held back while the tail is an incomplete character."""
        text = self._document_text(document)
        finished = document.stop_reason is not None
        if text.startswith(document.emitted) and len(text) > len(document.emitted):
            if finished or not text.endswith("\ufffd"):
                new = text[len(document.emitted) :]
                document.emitted = text
                return [DocumentEvent(type="text", document=document.id, text=new)]
        return []

    def _end_event(self, document: _Document) -> DocumentEvent:
        segments = list(document.segments)
        output = DreamLLMPipelineOutput(
            images=[[s for s in segments if not isinstance(s, str)]],
            text=["\n".join(s for s in segments if isinstance(s, str))],
            documents=[segments],
            stop_reasons=[document.stop_reason],
        )
        usage = {
            "prompt_tokens": document.prompt_length,
            "completion_tokens": document.max_new_tokens - document.tokens_left,
            "pictures": document.pictures,
        }
        return DocumentEvent(
            type="document_end", document=document.id, stop_reason=document.stop_reason, output=output, usage=usage
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Sampling

    def _sample(self, live: list[_Document], logits: dict[int, torch.Tensor]) -> list[int]:
        """One token per live document: its logits processed with the others of the same `TextSampling` (their rows of
        the batch), then drawn from its generator (documents sharing a generator draw together, in row order)."""
        scores = [None] * len(live)
        row_of = {d.id: row for row, d in enumerate(self.rows)}
        for sampling, members in _groups(live, lambda d: d.sampling):
            rows = torch.tensor([row_of[d.id] for d in members], device=self.ids.device)
            stacked = torch.stack([logits[d.id] for d in members]).float()
            processed = sampling.processors(self.ids[rows, : self.end], stacked)
            for d, row in zip(members, processed):
                scores[live.index(d)] = row
        tokens = [0] * len(live)
        for do_sample in (False, True):
            chosen = [i for i, d in enumerate(live) if bool(d.sampling.generation_config.do_sample) == do_sample]
            if not chosen:
                continue
            if not do_sample:
                for i in chosen:
                    tokens[i] = int(scores[i].argmax(-1))
                continue
            for generator, members in _groups([live[i] for i in chosen], lambda d: d.generator):
                indices = [live.index(d) for d in members]
                probs = torch.softmax(torch.stack([scores[i] for i in indices]), dim=-1)
                for i, token in zip(indices, _multinomial(probs, generator).tolist()):
                    tokens[i] = token
        return tokens

    # ----------------------------------------------------------------------------------------------------------------
    # Admission: prefill and merge

    def _admit(self) -> dict[int, torch.Tensor]:
        """Reads the queued prompts and merges their rows into the cache; returns their first logits by document.

        Prompts of very different lengths are not padded to the longest: they are read in groups of similar length
        (see `PREFILL_PADDING_LIMIT`), each group's rows then copied, right-aligned, into the batch's cache."""
        with self._lock:
            if not self._queued or (self.static and self.rows):
                return {}  # a static batch is fixed-shape: new documents start when it is empty
            admitted, self._queued = self._queued, []
        if self.static:
            self.rows, self.cache = [], None
        device = self.mllm.get_input_embeddings().weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        lengths = [d.prompt_length for d in admitted]
        for document in admitted:
            document.length = document.stream_length = document.prompt_length
        if self.streamer is not None:
            self.streamer.put(admitted[0].input_ids[None].cpu())
        logits, groups = {}, []
        onload(self.mllm)
        for members in _prefill_groups(lengths):
            width = max(lengths[i] for i in members)
            ids = torch.full((len(members), width), self.pad, dtype=torch.long)
            mask = torch.zeros(len(members), width, dtype=torch.long)
            for row, i in enumerate(members):
                ids[row, width - lengths[i] :] = admitted[i].input_ids
                mask[row, width - lengths[i] :] = 1
            ids, mask = ids.to(device), mask.to(device)
            pictures = [admitted[i].pixel_values for i in members if admitted[i].pixel_values is not None]
            cache = DynamicCache(config=self.config.text_config)
            output = self.mllm(
                input_ids=ids,
                pixel_values=torch.cat(pictures).to(device) if pictures else None,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 1),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            groups.append(([admitted[i] for i in members], width, cache, ids, mask))
            for row, i in enumerate(members):
                logits[admitted[i].id] = output.logits[row, -1]
        self._merge(groups, device)
        return logits

    def _merge(self, groups: list, device: torch.device) -> None:
        """Appends the groups' rows to the batch, right-aligned at its end (grown on the left if a prompt is longer)."""
        longest = max(width for _, width, _, _, _ in groups)
        if not self.rows:
            self.end = 0
            self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)
            self.ids = torch.zeros(0, 0, dtype=torch.long, device=device)
            if len(groups) == 1 and not self.static:  # the batch is that group as it is
                documents, width, cache, ids, mask = groups[0]
                self.rows, self.cache, self.ids, self.mask, self.end = list(documents), cache, ids, mask, width
                return
            self._new_cache(sum(len(g[0]) for g in groups), longest, [d for g in groups for d in g[0]], device)
        elif longest > self.end:
            self._grow_left(longest - self.end)
        end, old_rows = self.end, len(self.rows)
        new_rows = sum(len(g[0]) for g in groups)
        for index, layer in enumerate(self.cache.layers):
            parts = []
            if old_rows:
                keys, values, first = _held_columns(layer, end)
                parts.append((list(range(old_rows)), keys, values, first))
            row = old_rows
            for documents, width, cache, _, _ in groups:
                keys, values, first = _held_columns(cache.layers[index], width)
                parts.append((list(range(row, row + len(documents))), keys, values, end - width + first))
                row += len(documents)
            start = min(first for _, _, _, first in parts)
            sample = parts[0][1]
            merged_keys = sample.new_zeros(old_rows + new_rows, sample.shape[1], end - start, sample.shape[3])
            merged_values = torch.zeros_like(merged_keys)
            for rows, keys, values, first in parts:
                select = torch.tensor(rows, device=merged_keys.device)
                merged_keys[select, :, first - start :] = keys
                merged_values[select, :, first - start :] = values
            if not old_rows:  # a new cache: its layers take their dtype, device (and static buffers) from the rows
                layer.lazy_initialization(merged_keys, merged_values)
            _hold_columns(layer, merged_keys, merged_values, start, end)
        masks = [self.mask[:old_rows, :end]] if old_rows else []
        ids = [self.ids[:old_rows, :end]] if old_rows else []
        for documents, width, _, group_ids, group_mask in groups:
            masks.append(torch.cat([group_mask.new_zeros(len(documents), end - width), group_mask], dim=1))
            ids.append(torch.cat([group_ids.new_full((len(documents), end - width), self.pad), group_ids], dim=1))
        mask, ids = torch.cat(masks), torch.cat(ids)
        if self.static:
            self.mask[:, :end], self.ids[:, :end] = mask, ids
        else:
            self.mask, self.ids = mask, ids
        for documents, *_ in groups:
            self.rows.extend(documents)

    def _new_cache(self, rows: int, prompt_length: int, documents: list[_Document], device: torch.device) -> None:
        """An empty cache for a batch that starts: a static one as wide as its documents can grow."""
        if not self.static:
            self.cache = DynamicCache(config=self.config.text_config)
            self.end = prompt_length
            return
        width = self._static_width(prompt_length, documents)
        self.cache = StaticCache(config=self.config.text_config, max_cache_len=width)
        self.mask = torch.zeros(rows, width, dtype=torch.long, device=device)
        self.ids = torch.full((rows, width), self.pad, dtype=torch.long, device=device)
        if device.type == "cuda":
            self._step_call = self.mllm.get_compiled_call(documents[0].sampling.generation_config.compile_config)
        self.end = prompt_length

    def _static_width(self, prompt_length: int, documents: list[_Document]) -> int:
        """Columns a static cache needs: the longest a document can grow, bounded by the context. Rounded up to a
        multiple of `STATIC_CACHE_BUCKET`, so that calls with other prompt lengths reuse the compiled decode step."""
        longest = prompt_length
        for d in documents:
            pictures = d.max_new_tokens if d.max_images is None else d.max_images
            if self.dream_start in d.sampling.generation_config.suppress_tokens:
                pictures = 0
            longest = max(longest, prompt_length + d.max_new_tokens + pictures * (self.block_length - 1))
        return min(self.context, -(-longest // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET)

    # ----------------------------------------------------------------------------------------------------------------
    # The cache

    def _decode_step(self) -> torch.Tensor:
        """Feeds every live document's pending token; returns the next-token logits `[rows, vocab]`."""
        # One host-to-device copy per step: the token, whether the row still writes, and the token's position.
        rows = [(d.pending, 1, d.length) if _writes(d) else (self.pad, 0, d.length) for d in self.rows]
        pending, live, positions = torch.tensor(rows, device=self.mask.device).unbind(-1)
        if self.static:
            self.mask[:, self.end] = live
            self.ids[:, self.end] = pending
        else:
            self.mask = torch.cat([self.mask, live[:, None]], dim=1)
            self.ids = torch.cat([self.ids, pending[:, None]], dim=1)
        onload(self.mllm)
        output = self._step_call(
            input_ids=pending[:, None],
            attention_mask=self.mask,
            position_ids=positions[:, None],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.end += 1
        for document in self.rows:
            if _writes(document):
                document.length += 1
        return output.logits[:, -1]

    def _release_finished(self) -> None:
        """Dynamic cache: finished documents leave the batch and the cache is trimmed to the longest one left."""
        if all(d.stop_reason is None for d in self.rows):
            return
        if self.static:
            if any(d.stop_reason is None for d in self.rows):
                return
            self.rows, self.cache = [], None  # an empty static batch: the next documents start a new one
            return
        keep = [i for i, d in enumerate(self.rows) if d.stop_reason is None]
        if not keep:
            self.rows, self.cache, self.end = [], None, 0
            return
        self.rows = [self.rows[i] for i in keep]
        trim = self.end - max(d.length for d in self.rows)
        index = torch.tensor(keep, device=self.mask.device)
        for layer in self.cache.layers:
            keys, values, first = _held_columns(layer, self.end)
            rows = index.to(keys.device)
            _hold_columns(layer, keys[rows], values[rows], first - trim, self.end - trim)
        self.mask, self.ids = self.mask[index, trim:], self.ids[index, trim:]
        self.end -= trim

    def _grow_left(self, columns: int) -> None:
        """Adds `columns` of padding on the left of every row (all content moves right)."""
        end = self.end
        for layer in self.cache.layers:
            keys, values, first = _held_columns(layer, end)
            _hold_columns(layer, keys, values, first + columns, end + columns)
        if self.static:
            for tensor, fill in ((self.mask, 0), (self.ids, self.pad)):
                tensor[:, columns : end + columns] = tensor[:, :end].clone()
                tensor[:, :columns] = fill
        else:
            self.mask = torch.cat([self.mask.new_zeros(len(self.rows), columns), self.mask], dim=1)
            self.ids = torch.cat([self.ids.new_full((len(self.rows), columns), self.pad), self.ids], dim=1)
        self.end += columns

    # ----------------------------------------------------------------------------------------------------------------
    # Pictures

    def _dream_embeddings(self, waiting: list[_Document]) -> PicturesNeeded:
        """The dream block after each waiting document's context, in a copy of its rows: its picture's conditioning.
        The copy, holding the block, is kept for `read_pictures`, and the documents wait (out of the steps)."""
        rows = [self.rows.index(d) for d in waiting]
        row_index = torch.tensor(rows, device=self.mask.device)
        cache = _copy_rows(self.cache, rows, self.end, self.config)
        mask = self.mask[row_index, : self.end]
        onload(self.mllm)
        empty = self.ids.new_zeros(len(rows), 0)
        dream = self.mllm.get_dream_embeddings(empty, attention_mask=mask, cache=cache)
        parked = _Parked(list(waiting), cache, torch.cat([mask, mask.new_ones(len(rows), self.dream_block_length)], 1))
        for document in waiting:
            document.waiting = True
            self._parked[document.id] = parked
        return PicturesNeeded(
            documents=[d.id for d in waiting],
            prompt_embeds=dream.dream_embeddings,
            pooled_prompt_embeds=dream.dream_pooled_embeddings,
        )

    def _write_rows(self, rows: list[int], documents: list[_Document], cache: DynamicCache, added: int) -> None:
        """Writes the extended rows back, right-aligned, growing the cache on the left if a row has no room."""
        lengths = [d.length + added for d in documents]
        if max(lengths) > self.end:
            self._grow_left(max(lengths) - self.end)
        end, sub_end = self.end, cache.get_seq_length()
        held = [
            (_held_columns(main, end), _held_columns(sub, sub_end))
            for main, sub in zip(self.cache.layers, cache.layers)
        ]
        picture_ids = torch.tensor(self.picture_ids, device=self.ids.device)
        for i, (row, new_length) in enumerate(zip(rows, lengths)):
            old_length = documents[i].length
            for (main_keys, main_values, main_first), (sub_keys, sub_values, sub_first) in held:
                # The row's columns [end - new_length, end) that the layer holds, from the same columns of the copy.
                start = max(end - new_length, main_first)
                given = max(start, end - (sub_end - sub_first))  # a sliding copy may hold fewer (out of the window)
                for main_tensor, sub_tensor in ((main_keys, sub_keys), (main_values, sub_values)):
                    main_tensor[row, :, start - main_first : given - main_first] = 0
                    main_tensor[row, :, given - main_first :] = sub_tensor[i, :, given - end + sub_end - sub_first :]
            context_ids = self.ids[row, end - old_length : end].clone()
            self.ids[row, end - new_length : end] = torch.cat([context_ids, picture_ids])
            self.ids[row, : end - new_length] = self.pad
            self.mask[row, : end - new_length] = 0
            self.mask[row, end - new_length : end] = 1


def _writes(document: _Document) -> bool:
    """Whether the document takes part in the steps (it is being written and not waiting for a picture)."""
    return document.stop_reason is None and not document.waiting


def _copy_rows(source, rows: list[int], end: int, config) -> DynamicCache:
    """A copy of some rows of a cache (their columns up to `end`), as a dynamic cache of their own."""
    cache = DynamicCache(config=config.text_config)
    for layer, copy_layer in zip(source.layers, cache.layers):
        keys, values, first = _held_columns(layer, end)
        select = torch.tensor(rows, device=keys.device)
        keys, values = keys[select], values[select]
        copy_layer.lazy_initialization(keys, values)
        _hold_columns(copy_layer, keys, values, first, end)
    return cache


_SUPPORTED_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer)
# Chunked attention also uses sliding-window cache layers, but its chunks are aligned to positions, not to columns.
_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def _check_cache_layers(config, cache) -> None:
    layer_types = getattr(config.get_text_config(), "layer_types", None) or []
    unsupported = sorted({t for t in layer_types if t not in _SUPPORTED_LAYER_TYPES})
    unsupported += sorted({type(layer).__name__ for layer in cache.layers if type(layer) not in _SUPPORTED_LAYERS})
    if unsupported:
        raise NotImplementedError(
            f"The document batch moves rows of full-attention and sliding-window caches; this language model has "
            f"{', '.join(unsupported)} layers, which it cannot move. Use an LLM whose layers are full or "
            "sliding-window attention."
        )


def _held_columns(layer, end: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The keys and values a cache layer holds (views, `[batch, heads, columns, dim]`) and the first column they hold:
    they are the columns `first` to `end` of the rows. Full layers hold every column, sliding ones the last few."""
    if isinstance(layer, StaticSlidingWindowLayer):
        if end >= layer.max_cache_len:  # full: the buffer holds the last `max_cache_len` columns, oldest first
            return layer.keys, layer.values, end - layer.max_cache_len
        return layer.keys[:, :, :end], layer.values[:, :, :end], 0
    if isinstance(layer, StaticLayer):
        return layer.keys[:, :, :end], layer.values[:, :, :end], 0
    return layer.keys, layer.values, end - layer.keys.shape[2]


def _hold_columns(layer, keys: torch.Tensor, values: torch.Tensor, first: int, end: int) -> None:
    """Makes a cache layer hold the rows given as their columns `first` to `end` (`[batch, heads, end - first, dim]`;
    the columns before `first` are padding): all of them for a full layer, the last ones for a sliding one, in the
    layout its `update` and `get_mask_sizes` expect."""
    if isinstance(layer, StaticSlidingWindowLayer):
        start = end - layer.max_cache_len if end >= layer.max_cache_len else 0
    elif isinstance(layer, DynamicSlidingWindowLayer):
        start = max(end - layer.sliding_window + 1, 0)
    else:
        start = 0
    keys, values = (_columns_from(tensor, first, start) for tensor in (keys, values))
    if isinstance(layer, StaticLayer):
        for buffer, tensor in ((layer.keys, keys), (layer.values, values)):
            tensor = tensor.clone()  # it may be a view of the buffer it is written into
            buffer.zero_()
            buffer[:, :, : tensor.shape[2]] = tensor
        layer.cumulative_length.fill_(end)
        if isinstance(layer, StaticSlidingWindowLayer):
            layer.cumulative_length_int = end
    else:
        layer.keys, layer.values = keys, values
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = end


def _columns_from(tensor: torch.Tensor, first: int, start: int) -> torch.Tensor:
    """`tensor` holds columns `first`..; returns columns `start`.. (zeros for the columns before `first`)."""
    if start >= first:
        return tensor[:, :, start - first :]
    pad = tensor.new_zeros(*tensor.shape[:2], first - start, tensor.shape[3])
    return torch.cat([pad, tensor], dim=2)


# A group of prompts is read in one padded forward while its padded size stays within this factor of its real tokens;
# beyond, the padding would cost more than a separate forward (prefill compute grows with the padded length).
PREFILL_PADDING_LIMIT = 1.25


def _prefill_groups(lengths: list[int]) -> list[list[int]]:
    """Rows grouped for reading the prompts: longest first, each group as large as the padding limit allows."""
    order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
    groups, group = [], []
    for row in order:
        if group and (len(group) + 1) * lengths[group[0]] > PREFILL_PADDING_LIMIT * (
            sum(lengths[r] for r in group) + lengths[row]
        ):
            groups.append(group)
            group = []
        group.append(row)
    groups.append(group)
    return [sorted(group) for group in groups]  # rows in batch order: one group is the batch as it is


def _groups(documents: list, key) -> list[tuple]:
    """`(value, members)` for the values of `key` (compared by identity: generators are not hashable by value), in
    order of first appearance."""
    groups = {}
    for document in documents:
        value = key(document)
        groups.setdefault(id(value), (value, []))[1].append(document)
    return list(groups.values())


def _multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of `probs`, from `generator` on its own device (a CPU generator samples CUDA rows on CPU)."""
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


__all__ = ["CACHE_IMPLEMENTATIONS", "DocumentBatch", "PicturesNeeded", "StepResult", "TextSampling"]
