"""Memory per GPU of training DreamLLM (the release's 7B by default): stages I-III and LoRA, FSDP and DeepSpeed ZeRO.

For each setting (stage `1`, `2`, `3` as `training/stages.py` presets them, `lora` = plain LoRA fine-tuning, or
`STAGE-lora` = a stage with `--language-model lora`), each sharding and each number of GPUs it prints the bytes a GPU
holds, in GiB, as a Markdown table, then one JSON line. Nothing is loaded or run on a GPU: the counts come from the
configs, and are checked against the real modules built on the meta device.

Counts (formulas, from the configs; checked against `sum(p.numel())` of the meta modules set up by the project's own
`apply_trainable_parts` / `apply_lora`, as `dreamllm-hf train` sets `requires_grad`):

* LLaMA: `V h` (embeddings) + `L (h (q + 2 kv + q) + 3 h i + 2 h)` (attention without bias, SwiGLU MLP, two RMSNorms;
  `q = heads x head_dim`, `kv = kv_heads x head_dim`) + `h` (final norm) + `V h` (`lm_head`, untied).
* CLIP vision: patch conv `3 p^2 h` + class token `h` + positions `(n + 1) h` + pre-LN `2 h` +
  `L (4 (h^2 + h) + h i + i + i h + h + 4 h)` + post-LN `2 h`.
* Glue: image projector `h_v h + h`, condition projector `h c`, dream queries `Q h` (pooled projector `h p` if any).
* LoRA (`DreamLLMTrainingArguments`' rank `r`): `r (in + out)` on each of q, k, v, o, gate, up, down of every layer,
  trained copies of the projectors and queries (`modules_to_save`; the frozen originals stay), and the format-token
  rows `5 h` of the embeddings and of `lm_head` (`trainable_token_indices`).
* Stage I trains the format-token rows through the whole embedding and `lm_head` weights (`requires_grad` on both, a
  gradient hook masking the other rows): their gradients and AdamW states are full-size.
* UNet and VAE (SD 2.1-base, the project's shipped configs) and the frozen vision tower: counted from the meta modules
  (frozen, only their bf16 bytes count; a closed form of diffusers' blocks is not written out).

Bytes, mixed precision bf16 as accelerate sets it up (trained parameters fp32 master weights, frozen ones bf16):

* no sharding (one process, or DDP): trained `4 + 4 (grad) + 8 (AdamW exp_avg, exp_avg_sq)` bytes a parameter;
  DDP adds its gradient buckets (`4` more: `gradient_as_bucket_view` is off by default).
* FSDP2 full shard (`reshard_after_forward=True`, accelerate's `MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=bf16)`): the mllm's parameters (trained fp32, frozen bf16), gradients (fp32) and AdamW states are
  divided by N; all-gathered bf16 copies live for two decoder layers (the one computing, the one prefetched) plus the
  root unit (embeddings, `lm_head`, norms, projectors, queries: FSDP2 keeps the root gathered through the step), and
  one layer's unsharded bf16 gradients before their reduce-scatter.
* FSDP shard_grad_op (the original's `shard_grad_op`; FSDP2 `reshard_after_forward=False`): as full shard, but the
  whole mllm stays gathered in bf16 from its forward to its backward.
* ZeRO-2: bf16 parameters replicated, fp32 master weights, bf16 gradients and AdamW states divided by N (the ZeRO
  paper's 2 + 2 + 12 bytes); ZeRO-3: all of it divided by N, plus two layers and the largest root tensor gathered.
  DeepSpeed's communication buckets (`reduce_bucket_size`, `stage3_prefetch_bucket_size`) are not counted.
* Frozen and outside the optimizer, replicated on every GPU in every sharding (what issue 26 asks of the trainer: not
  sharded needlessly): the UNet, the VAE and a frozen vision tower, in bf16. They run without storing activations for
  backward except the UNet, through which the diffusion loss reaches the dream queries.

Activations, per sample of `--seq-len` tokens, bf16 compute, SDPA with a fused (flash / memory-efficient) kernel that
saves `q, k, v`, its output and an fp32 log-sum-exp per head, never the `s x s` scores. Per token and decoder layer
(LLaMA: RMSNorm in fp32, SwiGLU), bytes saved for backward:

* a trained layer: `26 h + 8 i + 4 heads` (each RMSNorm: its fp32 input 4 h, the normalized bf16 2 h, its output
  2 h, read by the next linear; attention: q, k, v, out 8 h and `o_proj`'s contiguous input 2 h; MLP: gate, up,
  SiLU(gate), product 8 i);
* a frozen layer the gradient passes through (stage I: the format rows and the image projector sit before it):
  `16 h + 6 i + 4 heads` (a frozen linear saves nothing: its input gradient needs only the weight);
* a frozen layer with LoRA (dropout > 0): the frozen layer's, plus for each adapted linear its dropout mask (1 byte),
  its dropped input (2 bytes) per input feature and `lora_A`'s output `2 r`: `+ 18 h + 3 i + 14 r`;
* with activation checkpointing (non-reentrant, per decoder layer, as `activation_checkpointing_enable`): each layer
  keeps its bf16 input `2 h`, and the backward recomputes one layer at a time (one layer's activations on top);
* the head: the final norm as above, `lm_head`'s input `2 h` when it trains, the fp32 log-softmax `4 V` saved by the
  cross entropy (transformers' loss upcasts the logits), the bf16 logits `2 V` kept in the output, and their fp32
  gradient `4 V` at the start of the backward;
* the UNet, per drawn picture (`--pictures-per-sample`, 512 x 512, latents 64 x 64): measured, not a formula - the
  bytes of every tensor its forward saves for backward, on the meta device with the same fused attention; with
  checkpointing (`unet.enable_gradient_checkpointing()`, as the trainer): the inputs of each checkpointed block, what
  is saved outside them, and the largest block recomputed.

The per-layer and head formulas are checked the same way against the real layer (from the set-up meta model) and
against the head's saved tensors. Not counted: CUDA context, NCCL buffers and allocator fragmentation
(`--reserve-gib` is kept free for them), the transient VAE encoding of the target pictures and CLIP's forward (no
grad), the attention mask of padded batches, temporaries inside one operation.

    python benchmarks/training_memory.py                                     # the 7B, every setting
    python benchmarks/training_memory.py --settings 2 --gpus 8 --micro-batch 1 16
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

import dreamllm_hf  # noqa: F401
from dreamllm_hf import DreamLLMConfig, DreamLLMForConditionalGeneration
from dreamllm_hf.conversion.original_layout import KNOWN_DIFFUSION_IDS
from dreamllm_hf.training.lora import FORMAT_TOKENS, apply_lora
from dreamllm_hf.training.stages import TrainableParts, apply_trainable_parts, trainable_parts
from dreamllm_hf.training.trainer import DreamLLMTrainingArguments


GIB = 1 << 30
SD_DIR = KNOWN_DIFFUSION_IDS["stabilityai/stable-diffusion-2-1-base"]
SHARDINGS = ("none", "ddp", "fsdp-full", "fsdp-grad-op", "zero3", "zero2")
DEFAULT_SHARDINGS = ("fsdp-full", "fsdp-grad-op", "zero3", "zero2")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BF16, FP32 = 2, 4
ADAMW_STATES = 2  # exp_avg, exp_avg_sq (fp32 each)
_DEFAULT_ARGS = DreamLLMTrainingArguments()  # what `dreamllm-hf train` uses unless told otherwise


# ---------------------------------------------------------------------------------------------------------- counts
def llama_counts(tc) -> dict:
    h, i, V, L = tc.hidden_size, tc.intermediate_size, tc.vocab_size, tc.num_hidden_layers
    head_dim = getattr(tc, "head_dim", None) or h // tc.num_attention_heads
    q, kv = tc.num_attention_heads * head_dim, tc.num_key_value_heads * head_dim
    layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    if getattr(tc, "attention_bias", False):
        layer += q + 2 * kv + h
    if getattr(tc, "mlp_bias", False):
        layer += 2 * i + h
    embed = V * h
    lm_head = 0 if getattr(tc, "tie_word_embeddings", False) else V * h
    return {
        "embed": embed,
        "layer": layer,
        "layers": L * layer,
        "norm": h,
        "lm_head": lm_head,
        "total": embed + L * layer + h + lm_head,
    }


def clip_vision_counts(vc) -> dict:
    h, i, L, p = vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers, vc.patch_size
    patches = (vc.image_size // p) ** 2
    embeddings = vc.num_channels * p * p * h + h + (patches + 1) * h
    layer = 4 * (h * h + h) + h * i + i + i * h + h + 4 * h
    return {"layer": layer, "total": embeddings + 2 * h + L * layer + 2 * h}


def glue_counts(config) -> dict:
    h = config.text_config.hidden_size
    counts = {
        "model.multi_modal_projector": config.vision_config.hidden_size * h + h,
        "model.condition_projector": h * config.cross_attention_dim,
        "model.dream_queries": config.num_dream_queries * h,
    }
    if config.pooled_projection_dim is not None:
        counts["model.pooled_projector"] = h * config.pooled_projection_dim
    return counts


def lora_layer_counts(tc, rank: int) -> int:
    h, i = tc.hidden_size, tc.intermediate_size
    head_dim = getattr(tc, "head_dim", None) or h // tc.num_attention_heads
    q, kv = tc.num_attention_heads * head_dim, tc.num_key_value_heads * head_dim
    shapes = ((h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h))
    return sum(rank * (n_in + n_out) for n_in, n_out in shapes)


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    parts: TrainableParts


def parse_setting(name: str) -> Setting:
    """`1`, `2`, `3` (the presets), `lora` (no stage: LoRA fine-tuning), `STAGE-lora` (a stage, LLM in LoRA)."""
    stage, _, mode = name.partition("-")
    if stage == "lora":
        return Setting(name, trainable_parts(None))
    if mode not in ("", "lora"):
        raise ValueError(f"Unknown setting {name!r}: use 1, 2, 3, lora or STAGE-lora.")
    return Setting(name, trainable_parts(stage, language_model="lora" if mode else None))


def formula_counts(config, parts: TrainableParts, rank: int, unet_params: int, vae_params: int) -> dict:
    """Parameter counts by role for `parts`, from the configs: `trained` (fp32, in the optimizer), `frozen_mllm`
    (bf16, sharded with the mllm), `frozen_replicated` (bf16: a frozen vision tower, the UNet, the VAE)."""
    tc = config.text_config
    llm, tower, glue = llama_counts(tc), clip_vision_counts(config.vision_config), glue_counts(config)
    trained_glue = set(parts.fully_trained_modules(config)) - {"model.vision_tower"}
    trained = frozen = 0
    glue_trained = sum(n for name, n in glue.items() if name in trained_glue)
    glue_frozen = sum(glue.values()) - glue_trained
    rows = len(FORMAT_TOKENS) * tc.hidden_size
    layer_trained = 0
    if parts.language_model == "full":
        trained += llm["total"]
        layer_trained = llm["layer"]
    elif parts.language_model == "frozen":
        frozen += llm["total"]
        if parts.format_tokens:  # the whole embedding and lm_head weights require grad (rows masked by a hook)
            moved = llm["embed"] + llm["lm_head"]
            trained, frozen = trained + moved, frozen - moved
    else:  # LoRA: adapters, trained copies of the glue (the originals stay, frozen), the format-token rows
        frozen += llm["total"] + glue_trained
        layer_trained = lora_layer_counts(tc, rank)
        trained += tc.num_hidden_layers * layer_trained
        if parts.format_tokens:
            trained += rows * (1 if llm["lm_head"] == 0 else 2)
    trained += glue_trained
    frozen += glue_frozen
    replicated = unet_params + vae_params
    if parts.vision_tower == "full":
        trained += tower["total"]
        if parts.language_model == "lora":
            frozen += tower["total"]
    else:
        replicated += tower["total"]
    return {
        "trained": trained,
        "frozen_mllm": frozen,
        "frozen_replicated": replicated,
        "unet": unet_params,
        "vae": vae_params,
        "vision_tower": tower["total"],
        "llm": llm["total"],
        "glue": sum(glue.values()),
        "layer": llm["layer"],
        "layer_trained": layer_trained,
        "root": llm["embed"] + llm["norm"] + llm["lm_head"] + sum(glue.values()),
        "largest_root_tensor": max(llm["embed"], llm["lm_head"]),
    }


# ------------------------------------------------------------------------------------------------------ meta modules
def diffusion_configs(unet_dir: Path, vae_dir: Path):
    return UNet2DConditionModel.load_config(unet_dir), AutoencoderKL.load_config(vae_dir)


def meta_diffusion(unet_config, vae_config):
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
    return unet.to(torch.bfloat16).requires_grad_(False), vae.to(torch.bfloat16).requires_grad_(False)


def meta_mllm(config, parts: TrainableParts, rank: int):
    """The mllm on the meta device, frozen weights bf16, set up as `train` sets it up (the project's functions)."""
    with torch.device("meta"):
        mllm = DreamLLMForConditionalGeneration(config).to(torch.bfloat16)
    if parts.language_model == "lora":
        return apply_lora(
            mllm,
            rank=rank,
            alpha=_DEFAULT_ARGS.lora_alpha,
            dropout=_DEFAULT_ARGS.lora_dropout,
            lora_lm_head=_DEFAULT_ARGS.lora_lm_head,
            train_format_tokens=parts.format_tokens,
            train_modules=parts.fully_trained_modules(mllm.config),
        )
    apply_trainable_parts(mllm, parts)
    return mllm


def adamw_state_numel(params: list[torch.nn.Parameter]) -> int:
    """Elements of AdamW's tensor states after one step over `params` (meta tensors: no memory, no compute)."""
    for param in params:
        param.grad = torch.empty_like(param)
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    optimizer.step()
    numel = sum(v.numel() for state in optimizer.state.values() for k, v in state.items() if k != "step")
    for param in params:
        param.grad = None
    return numel


def meta_counts(mllm, unet, vae) -> dict:
    tower = next(m for name, m in mllm.named_modules() if name.endswith("model.vision_tower"))
    tower_ids = {id(p) for p in tower.parameters()}
    trained = [p for p in mllm.parameters() if p.requires_grad]
    wrong_dtype = [p.dtype for p in trained if p.dtype != torch.float32]
    if wrong_dtype:
        raise AssertionError(f"trained parameters not fp32: {set(wrong_dtype)}")
    frozen_tower = sum(p.numel() for p in mllm.parameters() if not p.requires_grad and id(p) in tower_ids)
    frozen_mllm = sum(p.numel() for p in mllm.parameters() if not p.requires_grad and id(p) not in tower_ids)
    unet_n, vae_n = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in vae.parameters())
    return {
        "trained": sum(p.numel() for p in trained),
        "adamw_state": adamw_state_numel(trained),
        "frozen_mllm": frozen_mllm,
        "frozen_replicated": frozen_tower + unet_n + vae_n,
    }


# -------------------------------------------------------------------------------------------------------- activations
class _FusedAttentionOnMeta(torch.autograd.Function):
    """What a fused SDPA kernel saves for backward (q, k, v, output, fp32 log-sum-exp), on meta tensors."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


class _FusedDropoutOnMeta(torch.autograd.Function):
    """What CUDA's fused dropout saves (a bool mask; the CPU and meta path keep a mask in the input's dtype)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(torch.empty(x.shape, dtype=torch.bool, device=x.device))
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.empty_like(grad)


@contextlib.contextmanager
def fused_kernels_on_meta():
    """Measure on meta as a GPU runs: fused attention and fused dropout."""
    sdpa, dropout = F.scaled_dot_product_attention, F.dropout

    def fused_sdpa(query, key, value, *args, **kwargs):
        if not query.is_meta:
            raise RuntimeError("fused_kernels_on_meta measures meta tensors only")
        return _FusedAttentionOnMeta.apply(query, key, value)

    def fused_dropout(x, p=0.5, training=True, inplace=False):
        if not x.is_meta:
            raise RuntimeError("fused_kernels_on_meta measures meta tensors only")
        return _FusedDropoutOnMeta.apply(x) if training and p > 0 else x

    F.scaled_dot_product_attention, F.dropout = fused_sdpa, fused_dropout
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.dropout = sdpa, dropout


class SavedTensors:
    """Bytes of the distinct storages saved for backward inside the context, but those of `exclude` (give the
    parameters: a frozen linear saves its weight's transpose, a view of the parameter)."""

    def __init__(self, exclude=()):
        self.storages = {}
        self.excluded = {t.untyped_storage()._cdata for t in exclude}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in self.excluded:
            self.storages[storage._cdata] = (storage.nbytes(), tensor)  # the tensor keeps its storage's address taken
        return tensor

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(n for n, _ in self.storages.values())


def layer_formula(tc, mode: str, rank: int) -> int:
    """Bytes per token saved by one decoder layer (`mode`: full, frozen, lora); see the module docstring."""
    h, i, heads = tc.hidden_size, tc.intermediate_size, tc.num_attention_heads
    if mode == "full":
        return 26 * h + 8 * i + 4 * heads + 8
    frozen = 16 * h + 6 * i + 4 * heads + 8
    if mode == "frozen":
        return frozen
    if _DEFAULT_ARGS.lora_dropout == 0:
        raise NotImplementedError("the LoRA formula assumes dropout > 0 (a mask and a dropped input per target)")
    return frozen + 18 * h + 3 * i + 2 * len(LORA_TARGETS) * rank


def head_flags(parts: TrainableParts) -> dict:
    """Which head weights get gradients, as the setting trains them."""
    full, lora = parts.language_model == "full", parts.language_model == "lora"
    lora_lm_head = lora and _DEFAULT_ARGS.lora_lm_head
    return {
        "norm_trained": full,
        "lm_head_trained": full or lora_lm_head or parts.format_tokens,
        # PEFT's trainable-token rows on lm_head: the forward builds a merged copy of the weight, kept for backward
        "merged_lm_head": lora and parts.format_tokens and not lora_lm_head,
    }


def head_saved_formula(tc, flags: dict) -> tuple[int, int]:
    """(bytes per token, fixed bytes) the final norm, `lm_head` and the cross entropy save for backward: the norm's
    fp32 input and rsqrt, its bf16 normalized input when its weight trains, `lm_head`'s input when it trains, the
    fp32 log-softmax and the int64 targets; fixed: two scalars and PEFT's merged `lm_head` weight."""
    h, V = tc.hidden_size, tc.vocab_size
    per_token = 4 * h + 4 + 2 * h * flags["norm_trained"] + 2 * h * flags["lm_head_trained"] + FP32 * V + 8
    fixed = 12  # the mean's two scalars (fp32 and int64)
    if flags["merged_lm_head"]:
        fixed += BF16 * V * h + 8 * len(FORMAT_TOKENS)
    return per_token, fixed


def head_formula(tc, flags: dict) -> tuple[int, int]:
    """The head's bytes: what it saves, plus the bf16 logits kept in the output and their fp32 gradient."""
    per_token, fixed = head_saved_formula(tc, flags)
    return per_token + BF16 * tc.vocab_size + FP32 * tc.vocab_size, fixed


def per_token_and_fixed(measure, seq_len: int) -> tuple[int, int]:
    """(bytes per token, fixed bytes) of `measure(seq_len)` from two lengths."""
    short, long = measure(seq_len), measure(2 * seq_len)
    per_token = (long - short) // seq_len
    return per_token, short - per_token * seq_len


def _find(module, suffix_class: str):
    return next(m for m in module.modules() if type(m).__name__.endswith(suffix_class))


def measure_layer(mllm, seq_len: int) -> int:
    """Bytes saved for backward by the mllm's first decoder layer, as set up (meta)."""
    language_model = next(m for name, m in mllm.named_modules() if name.endswith("model.language_model"))
    layer = _find(language_model, "DecoderLayer").to(torch.bfloat16)  # FSDP's bf16 compute copy; keeps requires_grad
    tc = language_model.config
    x = torch.empty(1, seq_len, tc.hidden_size, device="meta", dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(seq_len, device="meta")[None]
    cos, sin = language_model.rotary_emb(x, positions)
    with fused_kernels_on_meta(), SavedTensors(exclude=(cos, sin, *layer.parameters())) as saved:
        out = layer(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=positions)
    del out
    return saved.nbytes


def measure_head(mllm, seq_len: int) -> int:
    """Bytes the final norm + lm_head + the causal-LM loss save for backward, meta."""
    language_model = next(m for name, m in mllm.named_modules() if name.endswith("model.language_model"))
    base = next(m for m in mllm.modules() if isinstance(m, DreamLLMForConditionalGeneration))
    tc = language_model.config
    x = torch.empty(1, seq_len, tc.hidden_size, device="meta", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    lm_head = base.get_output_embeddings().to(torch.bfloat16)
    language_model.norm.to(torch.bfloat16)
    with SavedTensors(exclude=(*lm_head.parameters(), *language_model.norm.parameters())) as saved:
        logits = lm_head(language_model.norm(x))
        loss = base.loss_function(logits=logits, labels=labels, vocab_size=tc.vocab_size)
    del loss, logits
    return saved.nbytes


def measure_unet(unet, num_queries: int, cross_dim: int, checkpointing: bool) -> int:
    """Bytes one picture's UNet forward keeps for backward (the conditioning requires grad), meta."""
    size = unet.config.sample_size
    latents = torch.empty(1, unet.config.in_channels, size, size, device="meta", dtype=torch.bfloat16)
    condition = torch.empty(1, num_queries, cross_dim, device="meta", dtype=torch.bfloat16, requires_grad=True)
    timesteps = torch.zeros(1, dtype=torch.long, device="meta")
    kept, recompute = {}, [0]

    def checkpoint(function, *args, **kwargs):
        for arg in list(args) + list(kwargs.values()):
            if torch.is_tensor(arg) and arg.requires_grad:
                kept[arg.untyped_storage()._cdata] = (arg.untyped_storage().nbytes(), arg)
        with SavedTensors(exclude=tuple(unet.parameters())) as inner:
            inner_out = function(*args, **kwargs)
        recompute[0] = max(recompute[0], inner.nbytes)
        del inner_out
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)

    if checkpointing:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    try:
        with fused_kernels_on_meta(), SavedTensors(exclude=tuple(unet.parameters())) as saved:
            prediction = unet(latents, timesteps, condition).sample
            loss = F.mse_loss(prediction.float(), torch.empty_like(prediction).float())
        del loss, prediction
    finally:
        if checkpointing:
            unet.disable_gradient_checkpointing()
    stored = dict(saved.storages)
    stored.update(kept)
    return sum(n for n, _ in stored.values()) + recompute[0]


# ------------------------------------------------------------------------------------------------------ per-GPU bytes
def per_gpu(counts: dict, sharding: str, gpus: int) -> dict:
    """Bytes of weights, gradients, AdamW states and all-gathered copies on one GPU (see the module docstring)."""
    t, fm, rep = counts["trained"], counts["frozen_mllm"], counts["frozen_replicated"]
    n = gpus if sharding not in ("none", "ddp") else 1
    layer, layer_trained = BF16 * counts["layer"], BF16 * counts["layer_trained"]
    if sharding in ("none", "ddp"):
        weights, grads, gathered = FP32 * t + BF16 * (fm + rep), FP32 * t * (2 if sharding == "ddp" else 1), 0
        optim = ADAMW_STATES * FP32 * t
    elif sharding in ("fsdp-full", "fsdp-grad-op"):
        weights = (FP32 * t + BF16 * fm) / n + BF16 * rep
        grads = FP32 * t / n
        optim = ADAMW_STATES * FP32 * t / n
        if sharding == "fsdp-full":
            gathered = 2 * layer + BF16 * counts["root"] + layer_trained
        else:
            gathered = BF16 * (t + fm) + layer_trained
    elif sharding in ("zero3", "zero2"):
        master = FP32 * t / n
        if sharding == "zero3":
            weights = BF16 * (t + fm) / n + master + BF16 * rep
            gathered = 2 * layer + BF16 * counts["largest_root_tensor"]
        else:
            weights = BF16 * (t + fm) + master + BF16 * rep
            gathered = 0
        grads = BF16 * t / n
        optim = ADAMW_STATES * FP32 * t / n
    else:
        raise ValueError(f"Unknown sharding {sharding!r}: one of {SHARDINGS}.")
    return {"weights": weights, "grads": grads, "optim": optim, "gathered": gathered}


def activations(act: dict, micro_batch: int, checkpointing: bool) -> float:
    """Activation bytes of a micro-batch: per sample, then one recomputed layer with checkpointing."""
    if checkpointing:
        return micro_batch * (act["sample_ckpt"] + act["layer_recompute"])
    return micro_batch * act["sample_full"]


def compute(args) -> dict:
    config = DreamLLMConfig.from_pretrained(args.config) if args.config else DreamLLMConfig()
    tc = config.text_config
    if tc.model_type != "llama":
        raise SystemExit(f"The formulas are LLaMA's; this config's LLM is {tc.model_type!r}.")
    rank = args.lora_rank
    unet_config, vae_config = diffusion_configs(Path(args.unet_config), Path(args.vae_config))
    unet, vae = meta_diffusion(unet_config, vae_config)
    unet_n, vae_n = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in vae.parameters())
    s = args.seq_len
    unet_bytes = {
        ckpt: measure_unet(unet, config.num_dream_queries, config.cross_attention_dim, ckpt) for ckpt in (False, True)
    }

    settings, checks, rows = {}, [], []
    for name in args.settings:
        setting = parse_setting(name)
        parts = setting.parts
        counts = formula_counts(config, parts, rank, unet_n, vae_n)
        mllm = meta_mllm(config, parts, rank)
        real = meta_counts(mllm, unet, vae)
        mode = parts.language_model
        per_layer, per_layer_real = (
            (layer_formula(tc, mode, rank), 0),
            per_token_and_fixed(functools.partial(measure_layer, mllm), s),
        )
        flags = head_flags(parts)
        head_saved, head_real = (
            head_saved_formula(tc, flags),
            per_token_and_fixed(functools.partial(measure_head, mllm), s),
        )
        check = {
            "setting": name,
            "trained": (counts["trained"], real["trained"]),
            "adamw_state": (ADAMW_STATES * counts["trained"], real["adamw_state"]),
            "frozen_mllm": (counts["frozen_mllm"], real["frozen_mllm"]),
            "frozen_replicated": (counts["frozen_replicated"], real["frozen_replicated"]),
            "layer_bytes_per_token": (per_layer[0], per_layer_real[0]),
            "layer_fixed_bytes": (per_layer[1], per_layer_real[1]),
            "head_saved_bytes_per_token": (head_saved[0], head_real[0]),
            "head_saved_fixed_bytes": (head_saved[1], head_real[1]),
        }
        bad = {k: v for k, v in check.items() if k != "setting" and v[0] != v[1]}
        checks.append(check)
        if bad:
            raise AssertionError(f"setting {name}: formula != meta module for {bad}")
        del mllm
        head, head_fixed = head_formula(tc, flags)
        per_layer = per_layer[0]
        L = tc.num_hidden_layers
        act = {
            "layer_per_token": per_layer,
            "head_per_token": head,
            "head_fixed": head_fixed,
            "unet_per_picture": unet_bytes[False],
            "unet_per_picture_ckpt": unet_bytes[True],
            "sample_full": s * (L * per_layer + head) + head_fixed + args.pictures_per_sample * unet_bytes[False],
            "sample_ckpt": s * (L * BF16 * tc.hidden_size + head)
            + head_fixed
            + args.pictures_per_sample * unet_bytes[True],
            "layer_recompute": s * per_layer,
        }
        settings[name] = {"parts": parts.to_dict(), "counts": counts, "activations": act}
        for sharding in args.sharding:
            for gpus in args.gpus if sharding not in ("none", "ddp") else [args.gpus[0]]:
                if sharding == "none" and gpus != 1:
                    continue
                state = per_gpu(counts, sharding, gpus)
                fixed = sum(state.values())
                row = {"setting": name, "sharding": sharding, "gpus": gpus, **state}
                for b in args.micro_batch:
                    for ckpt in (False, True):
                        tag = f"b{b}{'_ckpt' if ckpt else ''}"
                        row[f"act_{tag}"] = activations(act, b, ckpt)
                        row[f"total_{tag}"] = fixed + row[f"act_{tag}"]
                usable = (args.gpu_gib - args.reserve_gib) * GIB
                for ckpt in (False, True):
                    per_sample = activations(act, 1, ckpt)
                    row[f"max_b{'_ckpt' if ckpt else ''}"] = max(0, math.floor((usable - fixed) / per_sample))
                rows.append(row)
    return {
        "config": args.config or "release 7B (DreamLLMConfig())",
        "seq_len": s,
        "pictures_per_sample": args.pictures_per_sample,
        "lora_rank": rank,
        "gpu_gib": args.gpu_gib,
        "reserve_gib": args.reserve_gib,
        "checks": checks,
        "settings": settings,
        "rows": rows,
    }


def print_report(result: dict, micro_batches) -> None:
    for check in result["checks"]:
        parts = ", ".join(f"{k} {v[0]:,} == {v[1]:,}" for k, v in check.items() if k != "setting")
        print(f"check {check['setting']}: formula == meta module: {parts}")
    for name, setting in result["settings"].items():
        c, a = setting["counts"], setting["activations"]
        print(
            f"{name}: trained {c['trained'] / 1e9:.3f} B, frozen mllm {c['frozen_mllm'] / 1e9:.3f} B, frozen "
            f"replicated {c['frozen_replicated'] / 1e9:.3f} B (UNet {c['unet'] / 1e6:.0f} M, VAE {c['vae'] / 1e6:.0f} "
            f"M); activations per token: layer {a['layer_per_token']:,} B, head {a['head_per_token']:,} B; UNet per "
            f"picture {a['unet_per_picture'] / GIB:.2f} GiB ({a['unet_per_picture_ckpt'] / GIB:.2f} checkpointed)"
        )
    tags = [f"b{b}{suffix}" for b in micro_batches for suffix in ("", "_ckpt")]
    labels = [f"b={t[1:].replace('_ckpt', ' ckpt')}" for t in tags]
    head = ["setting", "sharding", "GPUs", "weights", "grads", "AdamW", "gathered"]
    head += [f"act {x}" for x in labels] + [f"total {x}" for x in labels] + ["max b", "max b ckpt"]
    print()
    print(
        f"GiB per GPU, sequence {result['seq_len']}, {result['pictures_per_sample']} picture(s) drawn per sample; "
        f"max b: largest micro-batch within {result['gpu_gib']} - {result['reserve_gib']} GiB"
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in result["rows"]:
        cells = [row["setting"], row["sharding"], str(row["gpus"])]
        cells += [f"{row[k] / GIB:.1f}" for k in ("weights", "grads", "optim", "gathered")]
        cells += [f"{row['act_' + t] / GIB:.1f}" for t in tags] + [f"{row['total_' + t] / GIB:.1f}" for t in tags]
        cells += [str(row["max_b"]), str(row["max_b_ckpt"])]
        print("| " + " | ".join(cells) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="A DreamLLM mllm folder or config.json (default: the 7B).")
    parser.add_argument("--unet-config", default=str(SD_DIR / "unet"), help="UNet config folder (SD 2.1-base).")
    parser.add_argument("--vae-config", default=str(SD_DIR / "vae"), help="VAE config folder (SD 2.1-base).")
    parser.add_argument("--settings", nargs="+", default=["1", "2", "3", "lora"])
    parser.add_argument("--sharding", nargs="+", default=list(DEFAULT_SHARDINGS), choices=SHARDINGS)
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 8, 16])
    parser.add_argument("--micro-batch", nargs="+", type=int, default=[1, 16], help="Samples per GPU (16: original).")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--pictures-per-sample", type=int, default=1, help="Dream blocks drawn per sample.")
    parser.add_argument("--lora-rank", type=int, default=_DEFAULT_ARGS.lora_rank)
    parser.add_argument("--gpu-gib", type=float, default=79.6, help="GPU memory (an 80 GB H100/A100: 79.6 GiB).")
    parser.add_argument("--reserve-gib", type=float, default=5.0, help="Kept free: CUDA context, NCCL, fragments.")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    result = compute(args)
    print_report(result, args.micro_batch)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
