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
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import ModelOutput, auto_docstring, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from ..checks import InputTypeError
from .configuration_dreamllm import DreamLLMConfig


# transformers 5.24 renamed `past_key_values` to `cache`; the old name keeps working, with a FutureWarning, until the
# version its own models drop it in.
PAST_KEY_VALUES_REMOVED_IN = "5.40.0"


@auto_docstring
@dataclass
class DreamLLMModelOutputWithPast(MultimodalBaseModelOutputWithPast):
    r"""
    dream_hidden_states (`torch.FloatTensor` of shape `(num_dream_blocks, num_dream_queries, hidden_size)`, *optional*):
        The language model's last hidden states (after its final normalization layer, whatever kind the LLM uses) at
        the query slots of every complete dream block in the input, in reading order (row by row, left to right).
        `None` when the input holds no dream block.
    dream_embeddings (`torch.FloatTensor` of shape `(num_dream_blocks, num_dream_queries, cross_attention_dim)`, *optional*):
        `dream_hidden_states` through the condition projector: the diffusion UNet's `encoder_hidden_states`. `None`
        when the input holds no dream block.
    dream_pooled_embeddings (`torch.FloatTensor` of shape `(num_dream_blocks, pooled_projection_dim)`, *optional*):
        `dream_hidden_states` through the pooled projector: an SDXL-style UNet's `text_embeds`. Only when the config
        sets `pooled_projection_dim` and the input holds a dream block.
    """

    dream_hidden_states: torch.FloatTensor | None = None
    dream_embeddings: torch.FloatTensor | None = None
    dream_pooled_embeddings: torch.FloatTensor | None = None


@auto_docstring
@dataclass
class DreamLLMCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    r"""
    dream_hidden_states (`torch.FloatTensor` of shape `(num_dream_blocks, num_dream_queries, hidden_size)`, *optional*):
        The language model's last hidden states (after its final normalization layer, whatever kind the LLM uses) at
        the query slots of every complete dream block in the input, in reading order (row by row, left to right).
        `None` when the input holds no dream block.
    dream_embeddings (`torch.FloatTensor` of shape `(num_dream_blocks, num_dream_queries, cross_attention_dim)`, *optional*):
        `dream_hidden_states` through the condition projector: the diffusion UNet's `encoder_hidden_states`. `None`
        when the input holds no dream block.
    dream_pooled_embeddings (`torch.FloatTensor` of shape `(num_dream_blocks, pooled_projection_dim)`, *optional*):
        `dream_hidden_states` through the pooled projector: an SDXL-style UNet's `text_embeds`. Only when the config
        sets `pooled_projection_dim` and the input holds a dream block.
    """

    dream_hidden_states: torch.FloatTensor | None = None
    dream_embeddings: torch.FloatTensor | None = None
    dream_pooled_embeddings: torch.FloatTensor | None = None


@dataclass
class DreamEmbeddingsOutput(ModelOutput):
    r"""
    The diffusion conditioning of one dream block per row, from [`DreamLLMModel.get_dream_embeddings`].

    Args:
        dream_embeddings (`torch.FloatTensor` of shape `(batch_size, num_dream_queries, cross_attention_dim)`):
            `dream_hidden_states` through the condition projector: the diffusion UNet's `encoder_hidden_states`.
        dream_pooled_embeddings (`torch.FloatTensor` of shape `(batch_size, pooled_projection_dim)`, *optional*):
            `dream_hidden_states` through the pooled projector: an SDXL-style UNet's `text_embeds`. `None` unless the
            config sets `pooled_projection_dim`.
        dream_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_dream_queries, hidden_size)`):
            The language model's last hidden states (after its final normalization layer) at the query slots.
    """

    dream_embeddings: torch.FloatTensor | None = None
    dream_pooled_embeddings: torch.FloatTensor | None = None
    dream_hidden_states: torch.FloatTensor | None = None


class DreamQueries(nn.Module):
    """The learned dream queries, one set shared by every picture. A module, so PEFT and `device_map` can handle it."""

    def __init__(self, num_queries: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_queries, hidden_size))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


class DreamPooledProjector(nn.Module):
    """The pooled conditioning of a dream block, for decoders that read one besides the sequence (SDXL's
    `text_embeds`): the mean of the query states, then a linear map. The mean treats every query alike, where SDXL's
    text encoder reads its last token: no query of a block is the summary of the others."""

    def __init__(self, hidden_size: int, pooled_projection_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, pooled_projection_dim, bias=False)

    def forward(self, query_hidden_states: torch.Tensor) -> torch.Tensor:
        """`(..., num_dream_queries, hidden_size)` -> `(..., pooled_projection_dim)`."""
        pooled = query_hidden_states.to(self.linear.weight.dtype).mean(dim=-2)
        return self.linear(pooled)


@auto_docstring
class DreamLLMPreTrainedModel(PreTrainedModel):
    # `config_class` comes from this annotation, and `_no_split_modules` (LLaMA's and CLIP's layers) from the
    # sub-models, collected by `post_init`.
    config: DreamLLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    output_modalities = ("text",)
    supports_gradient_checkpointing = True
    # The small parts DreamLLM learned on top of its backbones stay precise: upcast when loading in fp16, and never
    # quantized by bitsandbytes. The lm_head is not among them: it is LLaMA's, as large as the embeddings, and loads in
    # the dtype asked for (it is left out of quantization by transformers' default rule). The pooled projector joins
    # them only where it exists (`DreamLLMModel.__init__`): the list names modules of the model, none that may be absent.
    _keep_in_fp32_modules = ["multi_modal_projector", "condition_projector", "dream_queries"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # A decode step (no image, no block scan) compiles as one graph; see `_has_cached_tokens`.
    _can_compile_fullgraph = True

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers takes any model defined outside it for code whose `_init_weights` may overwrite loaded weights,
        # and then marks every module without parameters of its own as initialized unseen: the CLIP tower's attention
        # and MLP layers, which CLIP initializes from the parent module, kept the generic init when missing from a
        # checkpoint. Ours uses only the guarded `torch.nn.init` functions, as the library's models do.
        return cls.is_remote_code()

    def _init_weights(self, module):
        if isinstance(module, DreamQueries):
            std = getattr(self.config.get_text_config(), "initializer_range", None) or 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
        else:
            super()._init_weights(module)


# The vision towers DreamLLM reads: ViTs of a fixed input size, whose patch count the config computes
# (`num_image_tokens`). The tower runs its own forward; the hidden state read is picked from its outputs.
VIT_TOWER_TYPES = ("clip_vision_model", "siglip_vision_model")
# What a caller may ask of the vision tower through the model's `forward` (the rest of its kwargs are the LLM's).
VISION_OUTPUT_KWARGS = ("output_attentions", "output_hidden_states")
# The head's `forward` kwargs that go to `self.loss_function`, not to the language model.
LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


def _block_starts(input_ids: torch.Tensor, token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every `token_id`, in reading order (row-major)."""
    rows, cols = (input_ids == token_id).nonzero(as_tuple=True)
    return rows, cols


def _slot_index(cols: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Positions p+1 .. p+num_slots for every block start p: shape (num_blocks, num_slots)."""
    return cols[:, None] + 1 + torch.arange(num_slots, device=cols.device)


def _check_pixel_values(pixel_values, vision_config) -> None:
    """`pixel_values` against the vision tower they will meet: `(num_images, channels, size, size)`, finite floats."""
    channels, size = vision_config.num_channels, vision_config.image_size
    expected = f"(num_images, {channels}, {size}, {size}) as the processor gives them"
    if not isinstance(pixel_values, torch.Tensor):
        raise InputTypeError(f"`pixel_values` must be a torch.Tensor {expected}, got {type(pixel_values).__name__}.")
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (channels, size, size):
        raise ValueError(f"`pixel_values` have shape {tuple(pixel_values.shape)}, expected {expected}.")
    if not pixel_values.is_floating_point():
        raise InputTypeError(f"`pixel_values` must be floating point (normalized pixels), got {pixel_values.dtype}.")
    if pixel_values.device.type != "meta" and not bool(torch.isfinite(pixel_values).all()):
        raise ValueError("`pixel_values` hold NaN or infinite values.")


def _check_token_ids(input_ids, attention_mask, vocab_size: int, cached: int) -> None:
    """`input_ids` (2-D ids in the vocabulary) and an `attention_mask` covering the cache and them."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise InputTypeError(f"`input_ids` must be a 2-D integer tensor (batch, sequence_length), got {shape}.")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(
            f"`input_ids` hold ids in [{int(input_ids.min())}, {int(input_ids.max())}], but the vocabulary has "
            f"{vocab_size} (ids 0 to {vocab_size - 1})."
        )
    if attention_mask is None:
        return
    expected = (input_ids.shape[0], cached + input_ids.shape[1])
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != expected:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
        raise ValueError(
            f"`attention_mask` has shape {shape}, expected {expected}: (batch, cached tokens {cached} + new tokens "
            f"{input_ids.shape[1]})."
        )


def _has_cached_tokens(cache) -> bool:
    if cache is None:
        return False
    if torch.compiler.is_compiling():
        # `generate` compiles only the decode step, never the prefill. A static cache keeps its length in a device
        # tensor: reading it here would break the graph.
        return True
    return bool(cache.get_seq_length() > 0)


@auto_docstring(
    custom_intro="""
    The DreamLLM backbone, without a language-modeling head: the vision tower and its projector, the language model,
    the dream queries and the condition projector.
    """
)
class DreamLLMModel(DreamLLMPreTrainedModel):
    def __init__(self, config: DreamLLMConfig):
        super().__init__(config)
        text_hidden = config.text_config.hidden_size
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = nn.Linear(config.vision_config.hidden_size, text_hidden, bias=True)
        self.language_model = AutoModel.from_config(config.text_config)
        self.dream_queries = DreamQueries(config.num_dream_queries, text_hidden)
        self.condition_projector = nn.Linear(text_hidden, config.cross_attention_dim, bias=False)
        # Only for decoders that read a pooled conditioning (SDXL): the release has none, and no key for it.
        self.pooled_projector = None
        if config.pooled_projection_dim is not None:
            self.pooled_projector = DreamPooledProjector(text_hidden, config.pooled_projection_dim)
            self._keep_in_fp32_modules = [*type(self)._keep_in_fp32_modules, "pooled_projector"]
        self.post_init()

    def _encode_images(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        """The vision tower's output, its `pooler_output` replaced by the patch tokens of hidden state number
        `vision_feature_layer` through the image projector."""
        layer = self.config.vision_feature_layer
        asked = kwargs.get("output_hidden_states")
        if asked is None:
            asked = self.config.output_hidden_states or self.vision_tower.config.output_hidden_states
        if asked is True:
            # Said by the DreamLLM config only, it must still reach the tower, whose own config says nothing.
            kwargs["output_hidden_states"] = True
        else:
            # Only the hidden states asked for by index (transformers 5 selects them so) and the one that is read are
            # kept; the tower runs its own forward, so its layers, hooks and checkpointing are its own.
            selected = [] if asked is False or asked is None else [asked] if isinstance(asked, int) else list(asked)
            kwargs["output_hidden_states"] = [*selected, layer]  # a list: the index 0 alone would read as False
        outputs = self.vision_tower(pixel_values.to(self.vision_tower.dtype), return_dict=True, **kwargs)
        hidden = outputs.hidden_states[layer]
        num_tokens = self.config.num_image_tokens
        if hidden.shape[1] < num_tokens:
            raise ValueError(
                f"The vision tower gave {hidden.shape[1]} tokens per picture but the config counts {num_tokens} "
                "patches; check `vision_config.image_size`/`patch_size` and the image processor's output size."
            )
        patches = hidden[:, hidden.shape[1] - num_tokens :]  # CLIP puts its CLS token first; SigLIP has none
        features = self.multi_modal_projector(patches.to(self.multi_modal_projector.weight.dtype))
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=features,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @can_return_tuple
    @auto_docstring
    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> tuple | BaseModelOutputWithPooling:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, height, width)`):
            Pictures as the processor prepares them.

        Returns:
            [`~modeling_outputs.BaseModelOutputWithPooling`] or `tuple` (with `return_dict=False`): the vision tower's
            `last_hidden_state`, `hidden_states` (only the `vision_feature_layer` one is kept, the others `None`,
            unless `output_hidden_states=True`) and `attentions` (with `output_attentions=True`); and as
            `pooler_output` the vectors written after each `<im_start>`, `(num_images, num_image_tokens,
            text_hidden_size)`: the patch tokens of hidden state `vision_feature_layer` (CLIP's CLS token dropped)
            through the image projector.
        """
        _check_pixel_values(pixel_values, self.config.vision_config)
        return self._encode_images(pixel_values, **kwargs)

    def _position_ids(self, attention_mask, cache, batch_size, seq_len, device):
        """Positions that skip padding, so a left-padded row gets the same positions as the row alone."""
        if attention_mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            return torch.arange(past, past + seq_len, device=device).unsqueeze(0).expand(batch_size, -1)
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids = position_ids.masked_fill(attention_mask == 0, 1)
        return position_ids[:, -seq_len:]

    def _block_token_ids(self, inputs_embeds: torch.Tensor) -> torch.LongTensor | None:
        """The starts of the blocks found in `inputs_embeds`, as ids (`<im_start>`, `<dream_start>`; -1 elsewhere),
        found as Llava's `get_placeholder_mask` finds its image slots: by the embeddings of the block tokens. Only whole
        blocks count (start, every slot still the `<im_patch>` embedding, end), so embeddings made with
        `get_input_embeddings()` give the blocks their ids would, while a block already filled (an image's features
        written after `<im_start>`, as a document reads its picture back) is fed as it is. `None` when no block fits."""
        config = self.config
        blocks = (
            (config.image_start_token_id, config.num_image_tokens, config.image_end_token_id),
            (config.dream_start_token_id, config.num_dream_queries, config.dream_end_token_id),
        )
        batch_size, length = inputs_embeds.shape[:2]
        if length < min(slots for _, slots, _ in blocks) + 2:
            return None
        tokens = [config.image_patch_token_id] + [token for start, _, end in blocks for token in (start, end)]
        references = self.get_input_embeddings()(torch.tensor(tokens, device=inputs_embeds.device))
        references = references.to(inputs_embeds.dtype)
        found = {token: (inputs_embeds == ref).all(-1) for token, ref in zip(tokens, references)}
        # Slots in a row of `<im_patch>` embeddings: a window sum of `found[patch]` from any start position.
        patch_runs = torch.nn.functional.pad(found[config.image_patch_token_id].long().cumsum(-1), (1, 0))
        block_ids = torch.full((batch_size, length), -1, dtype=torch.long, device=inputs_embeds.device)
        for start, slots, end in blocks:
            span = length - slots - 1  # the start positions a whole block fits after
            if span <= 0:
                continue
            whole = (
                found[start][:, :span]
                & (patch_runs[:, 1 + slots : 1 + slots + span] - patch_runs[:, 1 : 1 + span] == slots)
                & found[end][:, slots + 1 : slots + 1 + span]
            )
            block_ids[:, :span] = block_ids[:, :span].masked_fill(whole, start)
        distinct = torch.cdist(references.float(), references.float()).fill_diagonal_(1).min() > 0
        if not distinct and (block_ids >= 0).any():
            raise ValueError(
                "`inputs_embeds` cannot show where its image and dream blocks are: in this model the block tokens "
                "(`<im_start>`, `<im_patch>`, `<im_end>`, `<dream_start>`, `<dream_end>`) share embeddings (a model "
                "built from backbones and not trained yet); pass `input_ids` instead."
            )
        return block_ids

    def _merge_image_features(
        self, input_ids, inputs_embeds, pixel_values, continuing: bool, **vision_kwargs
    ) -> tuple[torch.Tensor, BaseModelOutputWithPooling | None]:
        """`inputs_embeds` with every image block's slots filled, and the vision output (None without images)."""
        if continuing and pixel_values is None:
            # A decode step may emit `<im_start>`; its image is fed later by the caller. No scan: this is the hot path.
            return inputs_embeds, None
        num_tokens = self.config.num_image_tokens
        if pixel_values is not None:
            _check_pixel_values(pixel_values, self.config.vision_config)  # shape first: the count reads its dim 0
        rows, cols = _block_starts(input_ids, self.config.image_start_token_id)
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        if rows.numel() != num_images:
            raise ValueError(
                f"The input holds {rows.numel()} image block(s) (`<im_start>` followed by {num_tokens} slots) but "
                f"{num_images} image(s) were given in `pixel_values`. Give one image per `<im_start>`, in reading order "
                "(the processor expands each `<image>` placeholder into a block)."
            )
        if num_images == 0:
            return inputs_embeds, None
        if (cols + num_tokens >= input_ids.shape[1]).any():
            raise ValueError(
                f"An image block is cut off by the end of the sequence: `<im_start>` must be followed by {num_tokens} "
                "slots and `<im_end>`. Do not truncate inside an image block."
            )
        image_outputs = self._encode_images(pixel_values, **vision_kwargs)
        inputs_embeds = inputs_embeds.clone()
        inputs_embeds[rows[:, None], _slot_index(cols, num_tokens)] = image_outputs.pooler_output.to(
            inputs_embeds.dtype
        )
        return inputs_embeds, image_outputs

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

    @can_return_tuple
    @auto_docstring
    @deprecate_kwarg("past_key_values", PAST_KEY_VALUES_REMOVED_IN, new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> tuple | DreamLLMModelOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids in the DreamLLM format: every `<im_start>` is followed by `num_image_tokens` slots that receive
            the next image of `pixel_values`; every `<dream_start>` by `num_dream_queries` slots that receive the
            dream queries. Exactly one of `input_ids` and `inputs_embeds` is given.
        pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, height, width)`, *optional*):
            One image per `<im_start>` in `input_ids`, in reading order over the whole batch.
        inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
            The input embeddings instead of `input_ids`, e.g. `get_input_embeddings()(input_ids)`. Whole blocks are
            found by the embeddings of their tokens (a start, every slot still `<im_patch>`'s embedding, an end) and
            filled as they are for `input_ids` (with `pixel_values` for the image blocks); anything else, such as
            slots already filled with a picture's features, goes to the language model as it is.

        Returns:
            [`DreamLLMModelOutputWithPast`] or `tuple`: the output, or its `to_tuple()` when `return_dict=False`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        continuing = _has_cached_tokens(cache)
        if inputs_embeds is None:
            block_ids = input_ids
            inputs_embeds = self.get_input_embeddings()(input_ids)
        else:
            block_ids = self._block_token_ids(inputs_embeds)
            if block_ids is None and pixel_values is not None:
                block_ids = inputs_embeds.new_full(inputs_embeds.shape[:2], -1, dtype=torch.long)  # counted: none
        dream_rows = image_outputs = None
        if block_ids is not None:
            vision_kwargs = {key: kwargs[key] for key in VISION_OUTPUT_KWARGS if key in kwargs}
            inputs_embeds, image_outputs = self._merge_image_features(
                block_ids, inputs_embeds, pixel_values, continuing, **vision_kwargs
            )
            dream_rows, dream_slots = self._dream_blocks(block_ids, continuing)
            if dream_rows.numel():
                queries = self.dream_queries(dream_rows.numel()).to(inputs_embeds.device, inputs_embeds.dtype)
                inputs_embeds = inputs_embeds.clone()
                inputs_embeds[dream_rows[:, None], dream_slots] = queries

        batch_size, seq_len = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, cache, batch_size, seq_len, inputs_embeds.device)
        # Always a ModelOutput from the language model: `return_dict` applies to this model's own output.
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        dream_hidden = dream_embeddings = dream_pooled = None
        if dream_rows is not None and dream_rows.numel():
            dream_hidden = hidden[dream_rows[:, None], dream_slots]
            dream_embeddings = self._project_condition(dream_hidden)
            if self.pooled_projector is not None:
                dream_pooled = self.pooled_projector(dream_hidden)
        return DreamLLMModelOutputWithPast(
            last_hidden_state=hidden,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
            dream_hidden_states=dream_hidden,
            dream_embeddings=dream_embeddings,
            dream_pooled_embeddings=dream_pooled,
        )

    def _project_condition(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.condition_projector(hidden.to(self.condition_projector.weight.dtype))

    def dream_block_embeddings(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        r"""
        The input embeddings of one dream block, `[embed(<dream_start>), queries..., embed(<dream_end>)]`, per row.

        Args:
            batch_size (`int`):
                Rows to return (one view of the same block).
            device (`torch.device` or `str`, *optional*):
                Where the token ids are made; with `device_map` offloading the weights may sit on "meta", so give
                the device of the caller's ids.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_dream_queries + 2, hidden_size)`.
        """
        ids = torch.tensor([[self.config.dream_start_token_id, self.config.dream_end_token_id]], device=device)
        start, end = self.get_input_embeddings()(ids)[0].split(1)
        queries = self.dream_queries(1)[0].to(start.device, start.dtype)
        return torch.cat([start, queries, end], dim=0).unsqueeze(0).expand(batch_size, -1, -1)

    @deprecate_kwarg("past_key_values", PAST_KEY_VALUES_REMOVED_IN, new_name="cache")
    def get_dream_embeddings(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> DreamEmbeddingsOutput:
        r"""
        Diffusion conditioning of a dream block appended after the given context: the UNet's `encoder_hidden_states`
        (and an SDXL-style UNet's `text_embeds`). The whole block (`<dream_start>`, queries, `<dream_end>`) goes
        through the language model in one pass.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                The context, ending before `<dream_start>` (the block is appended here). With `cache`, only the tokens
                not yet in the cache (it may be empty). Padding may be on the left.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for tokens, 0 for padding; with `cache`, it covers the cached tokens and the new ones.
            pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, height, width)`, *optional*):
                One image per `<im_start>` in `input_ids`, in reading order.
            cache (`Cache`, *optional*):
                A key/value cache holding the context so far. It is extended in place by `input_ids` and the whole
                dream block, so a document can go on from there without recomputing its prefix.
            **kwargs:
                Passed to the language model.

        Returns:
            [`DreamEmbeddingsOutput`]: `dream_embeddings` (the UNet's `encoder_hidden_states`),
            `dream_pooled_embeddings` (`None` without a pooled projector) and `dream_hidden_states` (before the
            projectors), one row per row of `input_ids`.
        """
        cached = int(cache.get_seq_length()) if cache is not None else 0
        _check_token_ids(input_ids, attention_mask, self.config.text_config.vocab_size, cached)
        if (input_ids == self.config.dream_start_token_id).any():
            raise ValueError(
                "`get_dream_embeddings` appends the dream block itself: end the context before `<dream_start>`."
            )
        batch_size = input_ids.shape[0]
        continuing = cached > 0
        text_embeds = self.get_input_embeddings()(input_ids)
        text_embeds, _ = self._merge_image_features(input_ids, text_embeds, pixel_values, continuing)
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
            return_dict=True,
            **kwargs,
        )
        query_hidden = outputs.last_hidden_state[:, -block.shape[1] + 1 : -1]
        return DreamEmbeddingsOutput(
            dream_embeddings=self._project_condition(query_hidden),
            dream_pooled_embeddings=self.pooled_projector(query_hidden) if self.pooled_projector is not None else None,
            dream_hidden_states=query_hidden,
        )


@auto_docstring(
    custom_intro="""
    DreamLLM with its language-modeling head: comprehension and text generation, and the dream conditioning the
    diffusion decoder draws from.
    """
)
class DreamLLMForConditionalGeneration(DreamLLMPreTrainedModel, GenerationMixin):
    # The input and output embeddings are found by `PreTrainedModel` itself: through `base_model_prefix` ("model") to
    # the language model's `embed_tokens`, and `lm_head`.
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # Tied only when the config says so (an LLM that ties its embeddings, e.g. Gemma; never the release).
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: DreamLLMConfig):
        super().__init__(config)
        self.model = DreamLLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @auto_docstring
    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> tuple | BaseModelOutputWithPooling:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, height, width)`):
            Pictures as the processor prepares them.

        Returns:
            See [`DreamLLMModel.get_image_features`].
        """
        return self.model.get_image_features(pixel_values, **kwargs)

    def _logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The LM head, with the final logit soft-capping of LLMs that have one (Gemma 2: tanh(x / 30) * 30)."""
        logits = self.lm_head(hidden_states)
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _language_model_loss(self, logits, labels, num_items_in_batch=None, shift_labels=None, **kwargs):
        """`self.loss_function` (transformers' causal-LM loss), averaged over the targets that are not ignored and
        0 when there are none: the stock mean would be NaN there, where the original (and its golden losses) gives 0
        for a batch that learns no text (a text-to-image pair)."""
        if num_items_in_batch is None:
            targets = labels[..., 1:] if shift_labels is None else shift_labels
            num_items_in_batch = (targets != kwargs.get("ignore_index", -100)).sum()
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.clamp(min=1)
        else:
            num_items_in_batch = max(num_items_in_batch, 1)
        return self.loss_function(
            logits=logits,
            labels=labels,
            vocab_size=self.config.text_config.vocab_size,
            num_items_in_batch=num_items_in_batch,
            shift_labels=shift_labels,
            **kwargs,
        )

    def get_dream_embeddings(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> DreamEmbeddingsOutput:
        r"""
        See [`DreamLLMModel.get_dream_embeddings`].

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                The context, ending before `<dream_start>`.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for tokens, 0 for padding.
            **kwargs:
                `pixel_values`, `cache` and what goes to the language model.
        """
        return self.model.get_dream_embeddings(input_ids, attention_mask=attention_mask, **kwargs)

    @deprecate_kwarg("past_key_values", PAST_KEY_VALUES_REMOVED_IN, new_name="cache")
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        is_first_iteration: bool | None = False,
        pixel_values: torch.FloatTensor | None = None,
        **kwargs,
    ) -> dict:
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            pixel_values=pixel_values,
            **kwargs,
        )
        # `generate` gives the pictures to its first forward only, and never to an assistant model (assisted
        # decoding), though the assistant's cache starts empty too. Any forward that reads the image blocks from the
        # start gets them: this model refuses an image block without its picture.
        if pixel_values is not None and not _has_cached_tokens(cache):
            model_inputs["pixel_values"] = pixel_values
        return model_inputs

    @can_return_tuple
    @auto_docstring
    @deprecate_kwarg("past_key_values", PAST_KEY_VALUES_REMOVED_IN, new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> tuple | DreamLLMCausalLMOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids in the DreamLLM format: every `<im_start>` is followed by `num_image_tokens` slots that receive
            the next image of `pixel_values`; every `<dream_start>` by `num_dream_queries` slots that receive the
            dream queries. Exactly one of `input_ids` and `inputs_embeds` is given.
        pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, height, width)`, *optional*):
            One image per `<im_start>` in `input_ids`, in reading order over the whole batch.
        inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
            The input embeddings instead of `input_ids`, e.g. `get_input_embeddings()(input_ids)`; the blocks are
            found by the embeddings of their tokens and filled as for `input_ids` (see [`DreamLLMModel.forward`]).
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets, not shifted; -100 is ignored. The `loss` is `self.loss_function`'s (the causal-LM
            loss: `shift_labels`, already aligned with the logits, replace the shifted `labels`; `num_items_in_batch`
            divides the summed loss), and without `num_items_in_batch` the mean over the targets that are not -100:
            0, not NaN, when every one is -100, as in the original.

        Returns:
            [`DreamLLMCausalLMOutputWithPast`] or `tuple`: the output, or its `to_tuple()` when `return_dict=False`.

        Example:

        ```python
        >>> import dreamllm_hf  # registers DreamLLM with the Auto classes
        >>> from transformers import AutoModelForImageTextToText, AutoProcessor

        >>> model = AutoModelForImageTextToText.from_pretrained("dreamllm-7b-hf/mllm")
        >>> processor = AutoProcessor.from_pretrained("dreamllm-7b-hf/mllm")
        >>> inputs = processor(text="<image>\nWhat is in the picture?", images=image, return_tensors="pt")
        >>> answer = model.generate(**inputs, max_new_tokens=32)
        ```
        """
        loss_kwargs = {key: kwargs.pop(key) for key in LOSS_KWARGS if key in kwargs}
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        logits = self._logits(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None or loss_kwargs.get("shift_labels") is not None:
            loss = self._language_model_loss(logits, labels, **loss_kwargs)
        return DreamLLMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            dream_hidden_states=outputs.dream_hidden_states,
            dream_embeddings=outputs.dream_embeddings,
            dream_pooled_embeddings=outputs.dream_pooled_embeddings,
        )


__all__ = ["DreamEmbeddingsOutput", "DreamLLMModel", "DreamLLMForConditionalGeneration", "DreamLLMPreTrainedModel"]
