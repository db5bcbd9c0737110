"""DreamLLM as a transformers model: an LLM + a vision tower (comprehension) + learned dream queries (creation).

The language model (LLaMA in the release; any decoder-only LLM) and the vision tower (CLIP or SigLIP) are stock
transformers models built with `AutoModel.from_config`; this file only writes image features and dream queries into
the token embeddings, by position, and reads the conditioning back.

Image features and dream queries live where token embeddings do: in the output space of the LLM's input-embedding
module, which is what its layers read. Gemma scales its embeddings by sqrt(hidden_size) inside that module, so there the
features are written after the scaling and are not scaled again.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import slice_logits_to_keep

from .configuration_dreamllm import DreamLLMConfig


@dataclass
class DreamLLMModelOutputWithPast(ModelOutput):
    """
    Output of [`DreamLLMModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Hidden states after the language model's final RMSNorm.
        cache (`Cache`, *optional*): the key/value cache, when `use_cache=True`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): per-layer hidden states, when asked for.
        attentions (`tuple(torch.FloatTensor)`, *optional*): per-layer attention weights, when asked for.
        dream_hidden_states (`torch.FloatTensor` of shape `(num_dream_blocks, num_dream_queries, hidden_size)`, *optional*):
            Final-norm hidden states at the query slots of every complete dream block in the input, in reading order
            (row by row, left to right). `None` when the input holds no dream block.
        dream_embeddings (`torch.FloatTensor` of shape `(num_dream_blocks, num_dream_queries, cross_attention_dim)`, *optional*):
            `dream_hidden_states` through the condition projector: the diffusion UNet's `encoder_hidden_states`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    dream_hidden_states: torch.FloatTensor | None = None
    dream_embeddings: torch.FloatTensor | None = None


@dataclass
class DreamLLMCausalLMOutputWithPast(ModelOutput):
    """
    Output of [`DreamLLMForConditionalGeneration`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): next-token loss, when `labels` are given. Averaged over the
            labels that are not -100; 0 (not NaN) when every label is -100, as the original.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): language-model logits.
        cache, hidden_states, attentions, dream_hidden_states, dream_embeddings: as in [`DreamLLMModelOutputWithPast`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    dream_hidden_states: torch.FloatTensor | None = None
    dream_embeddings: torch.FloatTensor | None = None


class DreamQueries(nn.Module):
    """The learned dream queries, one set shared by every picture. A module, so PEFT and `device_map` can handle it."""

    def __init__(self, num_queries: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_queries, hidden_size))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


class DreamLLMPreTrainedModel(PreTrainedModel):
    config: DreamLLMConfig
    config_class = DreamLLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    output_modalities = ("text",)
    supports_gradient_checkpointing = True
    # The decoder and encoder layers of whatever LLM and tower are inside are gathered from them by `post_init`.
    _no_split_modules = []
    # The small parts DreamLLM learned on top of its backbones stay precise: upcast when loading in fp16, and never
    # quantized by bitsandbytes (the lm_head is left out of quantization by transformers' default rule).
    _keep_in_fp32_modules = ["multi_modal_projector", "condition_projector", "dream_queries"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        if isinstance(module, DreamQueries):
            std = getattr(self.config.get_text_config(), "initializer_range", None) or 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
        else:
            super()._init_weights(module)


# Vision towers whose forward is `embeddings -> [pre_layrnorm] -> encoder.layers -> ...`, so that they can stop at the
# layer that is read; any other tower runs whole and the hidden state is picked from its outputs.
_VIT_TOWERS = ("clip_vision_model", "siglip_vision_model")


def _block_starts(input_ids: torch.Tensor, token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every `token_id`, in reading order (row-major)."""
    rows, cols = (input_ids == token_id).nonzero(as_tuple=True)
    return rows, cols


def _slot_index(cols: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Positions p+1 .. p+num_slots for every block start p: shape (num_blocks, num_slots)."""
    return cols[:, None] + 1 + torch.arange(num_slots, device=cols.device)


def _has_cached_tokens(cache) -> bool:
    if cache is None:
        return False
    if torch.compiler.is_compiling():
        # `generate` compiles only the decode step, never the prefill. A static cache keeps its length in a device
        # tensor: reading it here would break the graph.
        return True
    return bool(cache.get_seq_length() > 0)


class DreamLLMModel(DreamLLMPreTrainedModel):
    """The DreamLLM backbone: vision tower, image projector, language model, dream queries and condition projector."""

    def __init__(self, config: DreamLLMConfig):
        super().__init__(config)
        text_hidden = config.text_config.hidden_size
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = nn.Linear(config.vision_config.hidden_size, text_hidden, bias=True)
        self.language_model = AutoModel.from_config(config.text_config)
        self.dream_queries = DreamQueries(config.num_dream_queries, text_hidden)
        self.condition_projector = nn.Linear(text_hidden, config.cross_attention_dim, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Projected vision features, `(batch, num_image_tokens, text_hidden_size)`: the vectors written after
        `<im_start>`. The tower runs up to `vision_feature_layer` only; its patch tokens are kept (CLIP's CLS dropped)."""
        hidden = self._vision_feature_states(pixel_values.to(self.vision_tower.dtype))
        num_tokens = self.config.num_image_tokens
        if hidden.shape[1] < num_tokens:
            raise ValueError(
                f"The vision tower gave {hidden.shape[1]} tokens per picture but the config counts {num_tokens} "
                "patches; check `vision_config.image_size`/`patch_size` and the image processor's output size."
            )
        patches = hidden[:, hidden.shape[1] - num_tokens :]  # CLIP puts its CLS token first; SigLIP has none
        return self.multi_modal_projector(patches.to(self.multi_modal_projector.weight.dtype))

    def _vision_feature_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's hidden state number `vision_feature_layer`, running no layer after it."""
        tower = self.vision_tower
        if tower.config.model_type not in _VIT_TOWERS:
            return tower(pixel_values, output_hidden_states=True).hidden_states[self.config.vision_feature_layer]
        # What the tower's forward does up to that hidden state, with the same modules (so the same weights, hooks,
        # device placement and activation checkpointing): embeddings, CLIP's pre-norm, the first layers.
        hidden = tower.embeddings(pixel_values)
        if hasattr(tower, "pre_layrnorm"):
            hidden = tower.pre_layrnorm(hidden)
        for layer in tower.encoder.layers[: self.config.vision_feature_layer_index]:
            hidden = layer(hidden, None)
        return hidden

    def _position_ids(self, attention_mask, cache, batch_size, seq_len, device):
        """Positions that skip padding, so a left-padded row gets the same positions as the row alone."""
        if attention_mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            return torch.arange(past, past + seq_len, device=device).unsqueeze(0).expand(batch_size, -1)
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids = position_ids.masked_fill(attention_mask == 0, 1)
        return position_ids[:, -seq_len:]

    def _merge_image_features(self, input_ids, inputs_embeds, pixel_values, continuing: bool):
        if continuing and pixel_values is None:
            # A decode step may emit `<im_start>`; its image is fed later by the caller. No scan: this is the hot path.
            return inputs_embeds
        num_tokens = self.config.num_image_tokens
        rows, cols = _block_starts(input_ids, self.config.image_start_token_id)
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        if rows.numel() != num_images:
            raise ValueError(
                f"The input holds {rows.numel()} image block(s) (`<im_start>` followed by {num_tokens} slots) but "
                f"{num_images} image(s) were given in `pixel_values`. Give one image per `<im_start>`, in reading order "
                "(the processor expands each `<image>` placeholder into a block)."
            )
        if num_images == 0:
            return inputs_embeds
        if (cols + num_tokens >= input_ids.shape[1]).any():
            raise ValueError(
                f"An image block is cut off by the end of the sequence: `<im_start>` must be followed by {num_tokens} "
                "slots and `<im_end>`. Do not truncate inside an image block."
            )
        features = self.get_image_features(pixel_values).to(inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.clone()
        inputs_embeds[rows[:, None], _slot_index(cols, num_tokens)] = features
        return inputs_embeds

    def _dream_blocks(self, input_ids, continuing: bool):
        """(rows, slot positions) of every complete dream block in `input_ids`."""
        num_queries = self.config.num_dream_queries
        if continuing and input_ids.shape[1] <= num_queries:
            # Too short to hold a whole block (e.g. a decode step): skip the scan, which syncs on GPUs.
            empty = input_ids.new_zeros(0, dtype=torch.long)
            return empty, empty.view(0, num_queries)
        rows, cols = _block_starts(input_ids, self.config.dream_start_token_id)
        cut = cols + num_queries >= input_ids.shape[1]
        if cut.any():
            # During cached decoding the model may emit `<dream_start>` as its last token: that is the cue to draw,
            # not a malformed block. In a fresh sequence a block without its slots is an error.
            if not continuing:
                raise ValueError(
                    f"A dream block is cut off by the end of the sequence: `<dream_start>` must be followed by "
                    f"{num_queries} `<im_patch>` slots and `<dream_end>`. To ask for a picture's conditioning, end the "
                    "text before `<dream_start>` and call `get_dream_embeddings`."
                )
            rows, cols = rows[~cut], cols[~cut]
        return rows, _slot_index(cols, num_queries)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> DreamLLMModelOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Token ids in the DreamLLM format: every `<im_start>` is followed by `num_image_tokens` slots that receive the
            next image of `pixel_values`; every `<dream_start>` by `num_dream_queries` slots that receive the queries.
        pixel_values (`torch.FloatTensor` of shape `(num_images, 3, height, width)`, *optional*):
            One image per `<im_start>` in the input, in reading order over the whole batch.
        inputs_embeds: precomputed embeddings; then blocks are not substituted (nothing to find them by).
        **kwargs: passed to the language model (`cache`, `use_cache`, `output_hidden_states`, ...).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        continuing = _has_cached_tokens(cache)
        dream_rows = dream_slots = None
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            inputs_embeds = self._merge_image_features(input_ids, inputs_embeds, pixel_values, continuing)
            dream_rows, dream_slots = self._dream_blocks(input_ids, continuing)
            if dream_rows.numel():
                queries = self.dream_queries(dream_rows.numel()).to(inputs_embeds.device, inputs_embeds.dtype)
                inputs_embeds = inputs_embeds.clone()
                inputs_embeds[dream_rows[:, None], dream_slots] = queries
        elif pixel_values is not None:
            raise ValueError(
                "`pixel_values` need `input_ids` to find the image blocks; pass `input_ids`, not embeddings."
            )

        batch_size, seq_len = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, cache, batch_size, seq_len, inputs_embeds.device)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        hidden = outputs.last_hidden_state
        dream_hidden = dream_embeddings = None
        if dream_rows is not None and dream_rows.numel():
            dream_hidden = hidden[dream_rows[:, None], dream_slots]
            dream_embeddings = self._project_condition(dream_hidden)
        return DreamLLMModelOutputWithPast(
            last_hidden_state=hidden,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            dream_hidden_states=dream_hidden,
            dream_embeddings=dream_embeddings,
        )

    def _project_condition(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.condition_projector(hidden.to(self.condition_projector.weight.dtype))

    def dream_block_embeddings(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """`[embed(<dream_start>), queries..., embed(<dream_end>)]` for each row: `(batch, num_dream_queries + 2, hidden)`."""
        # The device comes from the caller's ids: with `device_map` offloading, weights may sit on "meta".
        ids = torch.tensor([[self.config.dream_start_token_id, self.config.dream_end_token_id]], device=device)
        start, end = self.get_input_embeddings()(ids)[0].split(1)
        queries = self.dream_queries(1)[0].to(start.device, start.dtype)
        return torch.cat([start, queries, end], dim=0).unsqueeze(0).expand(batch_size, -1, -1)

    def get_dream_embeddings(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        project: bool = True,
        **kwargs,
    ) -> torch.FloatTensor:
        """
        Diffusion conditioning of a dream block appended after the given context: `(batch, num_dream_queries,
        cross_attention_dim)`, the UNet's `encoder_hidden_states`.

        The context is `input_ids` (with `pixel_values` for its image blocks). With `cache`, `input_ids` holds only the
        tokens not yet in the cache (it may be empty) and `attention_mask` covers cache + new tokens; the cache is
        extended in place by the context and the whole dream block (`<dream_start>`, queries, `<dream_end>`), so a
        document can go on from there without recomputing its prefix. Padding may be on the left.
        `project=False` returns the final-norm hidden states at the query slots instead (before the condition projector).
        """
        batch_size = input_ids.shape[0]
        continuing = cache is not None and cache.get_seq_length() > 0
        text_embeds = self.get_input_embeddings()(input_ids)
        text_embeds = self._merge_image_features(input_ids, text_embeds, pixel_values, continuing)
        if (input_ids == self.config.dream_start_token_id).any():
            raise ValueError(
                "`get_dream_embeddings` appends the dream block itself: end the context before `<dream_start>`."
            )
        block = self.dream_block_embeddings(batch_size, input_ids.device).to(text_embeds.dtype)
        inputs_embeds = torch.cat([text_embeds, block], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, block.shape[1])], dim=1)
        position_ids = self._position_ids(
            attention_mask, cache, batch_size, inputs_embeds.shape[1], inputs_embeds.device
        )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            **kwargs,
        )
        query_hidden = outputs.last_hidden_state[:, -block.shape[1] + 1 : -1]
        return self._project_condition(query_hidden) if project else query_hidden


class DreamLLMForConditionalGeneration(DreamLLMPreTrainedModel, GenerationMixin):
    """DreamLLM with its language-model head: comprehension and text generation, plus the dream conditioning."""

    _tp_plan = {"lm_head": "colwise_gather_output"}
    # Tied only when the config says so (an LLM that ties its embeddings, e.g. Gemma; never the release).
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: DreamLLMConfig):
        super().__init__(config)
        self.model = DreamLLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        return self.model.get_image_features(pixel_values)

    def _logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The LM head, with the final logit soft-capping of LLMs that have one (Gemma 2: tanh(x / 30) * 30)."""
        logits = self.lm_head(hidden_states)
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def get_dream_embeddings(self, input_ids, attention_mask=None, **kwargs) -> torch.FloatTensor:
        return self.model.get_dream_embeddings(input_ids, attention_mask=attention_mask, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> DreamLLMCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets (not shifted); -100 is ignored. The returned `loss` is the mean over the rest, or 0.
        logits_to_keep (`int` or `torch.Tensor`): compute logits only for the last `logits_to_keep` positions (0: all).
        See [`DreamLLMModel.forward`] for the other arguments.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        logits = self._logits(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = next_token_loss(logits, labels)
        return DreamLLMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            dream_hidden_states=outputs.dream_hidden_states,
            dream_embeddings=outputs.dream_embeddings,
        )


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted cross-entropy averaged over labels != -100; 0 when there are none (the stock loss would be NaN)."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return total / (shift_labels != -100).sum().clamp(min=1)


__all__ = ["DreamLLMModel", "DreamLLMForConditionalGeneration", "DreamLLMPreTrainedModel", "next_token_loss"]
