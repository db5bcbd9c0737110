"""The document engine: many DreamLLM documents written at once, emitting events as they are written.

All documents of a call share one key/value cache and advance together: one language-model forward per decode step
for every document still writing. A document that emits `<dream_start>` waits for the end of the step; then the
pictures of all waiting documents are conditioned in one language-model pass (each on its own rows of the cache), drawn
in one UNet batch with their unconditional rows, decoded in one VAE batch and read back through CLIP in one pass.

The cache's rows are right-aligned: every document's tokens end at the same column, shorter documents being padded on
the left (masked, positions from the count of real tokens, as with left-padded prompts). A picture adds the same
`Q + 2 + 1 + N` positions to each document that draws it; its row is rewritten `K` columns further left, into its own
padding, and the cache grows on the left only when a row has no padding left. So the cache is never longer than the
longest document (no padding blocks are left behind in the other rows), at the price of copying the drawing rows
(and, when it grows, the whole cache) once per picture event. Documents that finish leave the batch with a dynamic
cache (the cache is trimmed to the longest remaining one); with a static cache they stay, masked, so that every decode
step keeps the shapes the compiled step was built for.

Sliding-window layers (Mistral, Gemma 2/3, Qwen with `use_sliding_window`) keep only the last columns of the cache;
every row operation reads and writes a layer through the columns it holds (`_held_columns`, `_hold_columns`), so full
and sliding layers, dynamic and static, move together. Columns are shared by all rows, and each live document's tokens
are contiguous at the right of its row, so a window over columns is the window over that document's tokens.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LogitsProcessorList, StaticCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer

from .dream_diffusion import DiffusionSettings, onload
from .pipeline_output import DocumentEvent, DreamLLMPipelineOutput, StopReason


CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")
STATIC_CACHE_BUCKET = 256  # static cache widths are multiples of this (one compiled decode step for many calls)


@dataclass
class DocumentRequest:
    """One document to write: its prompt (tokenized by the engine as one batch) and what seeds it."""

    text: str
    images: list | None
    generator: torch.Generator | None
    negative_prompt_embeds: torch.Tensor | None  # `[1, Q, C]`, the unconditional of its pictures (None: no guidance)
    negative_pooled_prompt_embeds: torch.Tensor | None = None  # `[1, P]`, its pooled part (SDXL-style decoders)


@dataclass
class _Document:
    """A document being written (the engine's bookkeeping, one per request)."""

    index: int
    generator: torch.Generator | None
    negative_prompt_embeds: torch.Tensor | None
    negative_pooled_prompt_embeds: torch.Tensor | None
    tokens_left: int
    length: int  # tokens in the cache for this document
    stream_length: int  # tokens of its stream: those in the cache and the pending one
    pending: int | None = None  # the token fed at the next decode step
    pictures: int = 0
    segments: list = field(default_factory=list)
    text_tokens: list[int] = field(default_factory=list)  # the text segment being written
    emitted: str = ""
    stop_reason: str | None = None


@dataclass
class EngineSettings:
    max_new_tokens: int
    max_images: int | None
    allow_images: bool
    output_type: str
    diffusion: DiffusionSettings | None
    cache_implementation: str | None
    per_document_generators: bool  # a list of generators was given: every document samples from its own


class DocumentEngine:
    """Writes the documents of one pipeline call; `run()` yields [`DocumentEvent`]s."""

    def __init__(
        self,
        pipe,
        requests: list[DocumentRequest],
        settings: EngineSettings,
        generation_config,
        logits_processor: LogitsProcessorList | None,
        shared_generator: torch.Generator | None,
        streamer=None,
    ):
        self.pipe = pipe
        self.mllm = pipe.mllm
        self.config = pipe.mllm.config
        self.requests = requests
        self.settings = settings
        self.generation_config = generation_config
        self.logits_processor = logits_processor
        self.shared_generator = shared_generator
        self.streamer = streamer
        self.device = pipe._execution_device
        config = self.config
        self.eos = config.eos_token_id
        self.dream_start = config.dream_start_token_id
        self.pad = config.pad_token_id
        self.context = pipe.max_context_length
        # The processor owns the token layout; the model must read pictures with the same one.
        pipe.processor.check_model_config(config)
        drawn_picture = pipe.processor.drawn_picture_ids
        self.block_length = pipe.image_block_length
        self.dream_block_length = len(pipe.processor.dream_block_ids)
        self.image_start, self.image_end = pipe.processor.image_block_ids[0], drawn_picture[-1]
        # A drawn picture's tokens in the stream, but its final `<im_end>`, which is fed by the next decode step.
        self.picture_ids = torch.tensor(drawn_picture[:-1], device=self.device)
        self.static = settings.cache_implementation == "static"
        self.step_call = self.mllm
        self._check_cache_layers(DynamicCache(config=config.text_config))

    # ----------------------------------------------------------------------------------------------------------------
    # The loop

    @torch.no_grad()
    def run(self) -> Iterator[DocumentEvent]:
        documents, logits = self._prefill()
        if self.streamer is not None:
            self.streamer.put(self.ids[:, : self.end].cpu())
        while True:
            live = [d for d in self.rows if d.stop_reason is None]
            tokens = self._sample(logits, live)
            waiting = []
            for document, token in zip(live, tokens):
                yield from self._take_token(document, token, waiting)
            if waiting:
                yield from self._draw_pictures(waiting)
            for document in live:
                if document.stop_reason is not None:
                    yield self._end_event(document)
            if all(d.stop_reason is not None for d in self.rows):
                break
            self._release_finished()
            logits = self._decode_step()
        if self.streamer is not None:
            self.streamer.end()
        yield DocumentEvent(type="end", output=self._output(documents))

    def _take_token(self, document: _Document, token: int, waiting: list) -> Iterator[DocumentEvent]:
        """Applies one sampled token to its document (the same rules as `generate` with the same budget)."""
        if self.streamer is not None:
            self.streamer.put(torch.tensor([token]))
        document.tokens_left -= 1
        if token == self.eos:
            self._finish(document, StopReason.EOS)
        elif token == self.dream_start:
            self._close_segment(document)  # `<dream_start>` is fed with its queries, not as the next token
            max_images = self.settings.max_images
            if max_images is not None and document.pictures >= max_images:
                self._finish(document, StopReason.MAX_IMAGES)
            elif document.stream_length + self.block_length > self.context:
                self._finish(document, StopReason.CONTEXT_LIMIT)
            else:
                waiting.append(document)
                yield DocumentEvent(type="picture_start", document=document.index, index=document.pictures)
                return
        else:
            document.text_tokens.append(token)
            document.pending = token
            document.stream_length += 1
            self._check_budget(document)
        yield from self._text_event(document)

    def _check_budget(self, document: _Document) -> None:
        if document.tokens_left <= 0:
            self._finish(document, StopReason.MAX_NEW_TOKENS)
        elif document.stream_length >= self.context:
            self._finish(document, StopReason.CONTEXT_LIMIT)

    def _finish(self, document: _Document, reason: str) -> None:
        self._close_segment(document)
        document.stop_reason = reason
        document.pending = None

    # ----------------------------------------------------------------------------------------------------------------
    # Text

    def _segment_text(self, tokens: list[int]) -> str:
        return self.pipe.tokenizer.decode(tokens, skip_special_tokens=True)

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

    def _text_event(self, document: _Document) -> Iterator[DocumentEvent]:
        """The text added since the last event. Held back while the tail is an incomplete character."""
        text = self._document_text(document)
        finished = document.stop_reason is not None
        if text.startswith(document.emitted) and len(text) > len(document.emitted):
            if finished or not text.endswith("\ufffd"):
                new = text[len(document.emitted) :]
                document.emitted = text
                yield DocumentEvent(type="text", document=document.index, text=new)

    def _end_event(self, document: _Document) -> DocumentEvent:
        return DocumentEvent(
            type="document_end",
            document=document.index,
            stop_reason=document.stop_reason,
            output=self._output([document]),
        )

    def _output(self, documents: list[_Document]) -> DreamLLMPipelineOutput:
        return DreamLLMPipelineOutput(
            images=[[s for s in d.segments if not isinstance(s, str)] for d in documents],
            text=["\n".join(s for s in d.segments if isinstance(s, str)) for d in documents],
            documents=[list(d.segments) for d in documents],
            stop_reasons=[d.stop_reason for d in documents],
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Sampling

    def _sample(self, logits: torch.Tensor, live: list[_Document]) -> list[int]:
        """One token for each live row, drawn from that document's own generator when each has one."""
        rows = [self.rows.index(d) for d in live] if len(live) != len(self.rows) else list(range(len(self.rows)))
        scores = self.processors(self.ids[:, : self.end], logits.float())
        scores = scores[rows]
        if not self.generation_config.do_sample:
            return scores.argmax(-1).tolist()
        probs = torch.softmax(scores, dim=-1)
        if not self.settings.per_document_generators:
            return _multinomial(probs, self.shared_generator).tolist()
        return [int(_multinomial(probs[i : i + 1], d.generator)) for i, d in enumerate(live)]

    # ----------------------------------------------------------------------------------------------------------------
    # The cache

    def _prefill(self) -> tuple[list[_Document], torch.Tensor]:
        """Reads every prompt into one right-aligned cache; returns the documents and their first logits.

        Prompts of very different lengths are not padded to the longest: they are read in groups of similar length
        (see `PREFILL_PADDING_LIMIT`), each group's rows then copied, right-aligned, into the batch's cache."""
        pipe = self.pipe
        texts = [r.text for r in self.requests]
        images = None
        if any(r.images for r in self.requests):
            images = [list(r.images or []) for r in self.requests]
        input_ids, attention_mask, pixel_values = pipe._tokenize(texts, images, self.device)
        pipe._check_prompt_length(attention_mask, 1, "the answer")
        batch, length = input_ids.shape
        lengths = attention_mask.sum(-1).tolist()
        documents = [
            _Document(
                index=i,
                generator=r.generator,
                negative_prompt_embeds=r.negative_prompt_embeds,
                negative_pooled_prompt_embeds=r.negative_pooled_prompt_embeds,
                tokens_left=self.settings.max_new_tokens,
                length=lengths[i],
                stream_length=lengths[i],
            )
            for i, r in enumerate(self.requests)
        ]
        self.rows = list(documents)
        self.processors = self.mllm._get_logits_processor(
            generation_config=self.generation_config,
            input_ids_seq_length=length,
            logits_processor=self.logits_processor or LogitsProcessorList(),
            device=self.device,
        )
        image_counts = [len(r.images or []) for r in self.requests]
        image_starts = [sum(image_counts[:i]) for i in range(batch)]
        caches, logits = [], [None] * batch
        onload(self.mllm)
        for rows in _prefill_groups(lengths):
            width = max(lengths[row] for row in rows)
            mask = attention_mask[rows, length - width :]
            group_pixels = None
            if pixel_values is not None and any(image_counts[row] for row in rows):
                picks = [image_starts[row] + k for row in rows for k in range(image_counts[row])]
                group_pixels = pixel_values[picks]
            cache = DynamicCache(config=self.config.text_config)
            output = self.mllm(
                input_ids=input_ids[rows, length - width :],
                pixel_values=group_pixels,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 1),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            caches.append((rows, width, cache))
            for i, row in enumerate(rows):
                logits[row] = output.logits[i, -1]

        if self.static:
            cache_width = self._static_width(length)
            self.cache = StaticCache(config=self.config.text_config, max_cache_len=cache_width)
            self.mask = attention_mask.new_zeros(batch, cache_width)
            self.mask[:, :length] = attention_mask
            self.ids = input_ids.new_full((batch, cache_width), self.pad)
            self.ids[:, :length] = input_ids
            if self.device.type == "cuda":
                self.step_call = self.mllm.get_compiled_call(self.generation_config.compile_config)
        else:
            self.cache = DynamicCache(config=self.config.text_config)
            self.mask, self.ids = attention_mask, input_ids
        if len(caches) == 1 and not self.static:
            self.cache = caches[0][2]
        else:
            for index, layer in enumerate(self.cache.layers):
                held = [(rows, width, _held_columns(c.layers[index], width)) for rows, width, c in caches]
                keys = self._merged_rows([(rows, width, k, first) for rows, width, (k, _, first) in held], length)
                values = self._merged_rows([(rows, width, v, first) for rows, width, (_, v, first) in held], length)
                layer.lazy_initialization(keys, values)
                _hold_columns(layer, keys, values, 0, length)
        self.end = length
        return documents, torch.stack(logits)

    def _merged_rows(self, parts: list[tuple[list[int], int, torch.Tensor, int]], length: int) -> torch.Tensor:
        """The rows of every group's `[rows, heads, columns, dim]` tensor (holding the group's columns `first` to
        `width`) in one `[batch, heads, length, dim]` tensor, right-aligned (zeros on the left)."""
        sample = parts[0][2]
        merged = sample.new_zeros(len(self.rows), sample.shape[1], length, sample.shape[3])
        for rows, width, tensor, first in parts:
            merged[torch.tensor(rows, device=merged.device), :, length - width + first :] = tensor
        return merged

    def _static_width(self, prompt_length: int) -> int:
        """Columns a static cache needs: the longest a document can grow, bounded by the context. Rounded up to a
        multiple of `STATIC_CACHE_BUCKET`, so that calls with other prompt lengths reuse the compiled decode step."""
        settings = self.settings
        pictures = 0
        if settings.allow_images:
            pictures = settings.max_new_tokens if settings.max_images is None else settings.max_images
        longest = prompt_length + settings.max_new_tokens + pictures * (self.block_length - 1)
        return min(self.context, -(-longest // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET)

    def _check_cache_layers(self, cache) -> None:
        layer_types = getattr(self.config.get_text_config(), "layer_types", None) or []
        unsupported = sorted({t for t in layer_types if t not in _SUPPORTED_LAYER_TYPES})
        unsupported += sorted({type(layer).__name__ for layer in cache.layers if type(layer) not in _SUPPORTED_LAYERS})
        if unsupported:
            raise NotImplementedError(
                f"The document engine moves rows of full-attention and sliding-window caches; this language model has "
                f"{', '.join(unsupported)} layers, which it cannot move. Use an LLM whose layers are full or "
                "sliding-window attention."
            )

    def _decode_step(self) -> torch.Tensor:
        """Feeds every live document's pending token; returns the next-token logits `[rows, vocab]`."""
        # One host-to-device copy per step: the token, whether the row still writes, and the token's position.
        rows = [(self.pad, 0, d.length) if d.stop_reason is not None else (d.pending, 1, d.length) for d in self.rows]
        pending, live, positions = torch.tensor(rows, device=self.device).unbind(-1)
        positions = positions[:, None]
        if self.static:
            self.mask[:, self.end] = live
            self.ids[:, self.end] = pending
        else:
            self.mask = torch.cat([self.mask, live[:, None]], dim=1)
            self.ids = torch.cat([self.ids, pending[:, None]], dim=1)
        mask = self.mask
        onload(self.mllm)
        output = self.step_call(
            input_ids=pending[:, None],
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.end += 1
        for document in self.rows:
            if document.stop_reason is None:
                document.length += 1
        return output.logits[:, -1]

    def _release_finished(self) -> None:
        """Dynamic cache: finished documents leave the batch and the cache is trimmed to the longest one left."""
        if self.static or all(d.stop_reason is None for d in self.rows):
            return
        keep = [i for i, d in enumerate(self.rows) if d.stop_reason is None]
        self.rows = [self.rows[i] for i in keep]
        trim = self.end - max(d.length for d in self.rows)
        index = torch.tensor(keep, device=self.device)
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

    def _rows_cache(self, rows: list[int]) -> DynamicCache:
        """A copy of some rows of the cache (their columns up to `end`), as a cache of their own."""
        cache = DynamicCache(config=self.config.text_config)
        for layer, copy in zip(self.cache.layers, cache.layers):
            keys, values, first = _held_columns(layer, self.end)
            select = torch.tensor(rows, device=keys.device)
            keys, values = keys[select], values[select]
            copy.lazy_initialization(keys, values)
            _hold_columns(copy, keys, values, first, self.end)
        return cache

    # ----------------------------------------------------------------------------------------------------------------
    # Pictures

    def _draw_pictures(self, waiting: list[_Document]) -> Iterator[DocumentEvent]:
        """Conditions, draws, decodes and reads back the pictures of every waiting document, each step batched."""
        pipe, mllm = self.pipe, self.mllm
        rows = [self.rows.index(d) for d in waiting]
        count = len(rows)
        row_index = torch.tensor(rows, device=self.device)
        cache = self._rows_cache(rows)
        mask = self.mask[row_index, : self.end]

        # The dream block after each document's context, in its own rows: the conditioning of its picture.
        onload(mllm)
        empty = self.ids.new_zeros(count, 0)
        dream = mllm.get_dream_embeddings(empty, attention_mask=mask, cache=cache)
        prompt_embeds, pooled = dream.dream_embeddings, dream.dream_pooled_embeddings
        prompt_embeds = prompt_embeds.to(pipe.unet.dtype)
        pooled = pooled.to(pipe.unet.dtype) if pooled is not None else None
        negative = negative_pooled = None
        if pipe.do_classifier_free_guidance:
            negative = torch.cat([d.negative_prompt_embeds for d in waiting]).to(prompt_embeds.device, pipe.unet.dtype)
            if pooled is not None:
                negative_pooled = torch.cat([d.negative_pooled_prompt_embeds for d in waiting]).to(pooled.device)
        generator = [d.generator for d in waiting] if self.settings.per_document_generators else self.shared_generator
        latents = pipe._draw_latents(
            prompt_embeds,
            negative,
            generator,
            self.settings.diffusion,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=negative_pooled,
        )
        decoded = pipe._decode(latents, generator)
        as_pil = pipe._postprocess(decoded, "pil")  # CLIP reads each picture as it is saved (8-bit)
        shown = as_pil if self.settings.output_type == "pil" else pipe._postprocess(decoded, self.settings.output_type)

        # `<im_start>` + the CLIP features of each picture, into the same rows (`<im_end>` is the next pending token).
        onload(mllm)
        pixel_values = pipe.processor.image_processor(as_pil, return_tensors="pt")["pixel_values"].to(self.device)
        features = mllm.get_image_features(pixel_values).pooler_output
        start_ids = torch.full((count, 1), self.image_start, device=self.device)
        start = mllm.get_input_embeddings()(start_ids)
        inputs_embeds = torch.cat([start, features.to(start.dtype)], dim=1)
        added = self.dream_block_length + inputs_embeds.shape[1]
        mask = torch.cat([mask, mask.new_ones(count, added)], dim=1)
        mllm(inputs_embeds=inputs_embeds, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)

        self._write_rows(rows, waiting, cache, added)
        for i, document in enumerate(waiting):
            document.segments.append(shown[i])
            document.pictures += 1
            document.length += added
            document.stream_length += added + 1
            document.pending = self.image_end
            yield DocumentEvent(type="picture", document=document.index, image=shown[i], index=document.pictures - 1)
            self._check_budget(document)

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
            self.ids[row, end - new_length : end] = torch.cat([context_ids, self.picture_ids])
            self.ids[row, : end - new_length] = self.pad
            self.mask[row, : end - new_length] = 0
            self.mask[row, end - new_length : end] = 1


_SUPPORTED_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer)
# Chunked attention also uses sliding-window cache layers, but its chunks are aligned to positions, not to columns.
_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


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


def _multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of `probs`, from `generator` on its own device (a CPU generator samples CUDA rows on CPU)."""
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


__all__ = ["CACHE_IMPLEMENTATIONS", "DocumentEngine", "DocumentRequest", "EngineSettings"]
