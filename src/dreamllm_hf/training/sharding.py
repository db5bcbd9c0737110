"""FSDP2 (`torch.distributed.fsdp.fully_shard`, accelerate's `fsdp_version: 2`) for the DreamLLM trainer.

accelerate shards the model it prepares: every module of a class named in `fsdp_transformer_layer_cls_to_wrap` becomes
its own unit (the LLM's decoder layers), and what is left over forms the root unit. `train` adds what accelerate cannot
know:

* the settings are checked against the model before anything loads (`check_fsdp_settings`: FSDP2 only, every class
  to wrap must be one the model has, and none inside a vision tower that trains: a trained tower is sharded with the
  root unit, which is gathered for the whole forward, also of a micro-batch without pictures);
* parts with nothing to train are left out of the shards (`frozen_parts`, given to accelerate as `ignored_modules`):
  the UNet, the VAE, a frozen vision tower, the decoder layers of a frozen LLM. Each process keeps its own full copy, as
  without FSDP; they need no gradient and no optimizer state, so sharding them would only add all-gathers;
* the format-token row mask of a frozen LLM (`stages.py`) is a gradient hook on the embedding and `lm_head` weights,
  which `fully_shard` replaces by sharded parameters: `RowMask` re-finds them after sharding and masks their sharded
  gradients instead (each process masks the rows of its own shard).
"""

import os
from pathlib import Path

import torch
from torch import nn


def fsdp_version(plugin) -> int:
    return int(getattr(plugin, "fsdp_version", 1) or 1)


def check_fsdp_settings(plugin, model_dir: str | Path, parts=None) -> None:
    """Refuses FSDP settings the trainer cannot run, before any weight loads: FSDP1, loading from rank 0 only
    (`cpu_ram_efficient_loading`), a class to wrap that the model
    (built from its config on the meta device) does not have, or one inside a vision tower that trains (`parts`, a
    `TrainableParts`)."""
    if fsdp_version(plugin) != 2:
        raise ValueError(
            f"FSDP version {fsdp_version(plugin)} is not supported: set `fsdp_version: 2` in the accelerate config "
            "(`fsdp_config`) to shard with FSDP2's `fully_shard` (see examples/accelerate/cpu_2proc_fsdp.yaml)."
        )
    if getattr(plugin, "cpu_ram_efficient_loading", False):
        # Measured: with it, accelerate re-distributes every weight from rank 0, the parts `train` leaves whole too.
        raise ValueError(
            "`fsdp_cpu_ram_efficient_loading: true` is not supported: `train` loads the model on every process, and "
            "accelerate's loading from rank 0 would turn the frozen parts it leaves whole into distributed tensors. "
            "Set it to false."
        )
    names = plugin.transformer_cls_names_to_wrap
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    if not names:
        return
    from ..modeling import DreamLLMConfig, DreamLLMForConditionalGeneration

    path = Path(model_dir)
    config = DreamLLMConfig.from_pretrained(path / "mllm" if (path / "mllm").is_dir() else path)
    with torch.device("meta"):
        skeleton = DreamLLMForConditionalGeneration(config)
    present = {type(module).__name__ for module in skeleton.modules()}
    missing = [name for name in names if name not in present]
    if missing:
        candidates = sorted(name for name in present if name.endswith("Layer"))
        raise ValueError(
            f"`fsdp_transformer_layer_cls_to_wrap` names {missing}, which this model does not have; its layer classes "
            f"are {candidates}."
        )
    if parts is not None and parts.vision_tower == "full":
        tower = {type(module).__name__ for module in skeleton.model.vision_tower.modules()}
        inside = [name for name in names if name in tower]
        if inside:
            # A unit of its own only gathers its weights when it runs, and a micro-batch without pictures does not
            # run the tower: the zero-weighted terms that keep it in the graph (`DreamLLMTrainingModel`) would meet
            # sharded weights, and the processes would disagree on the collectives.
            raise ValueError(
                f"A trained vision tower cannot have FSDP units of its own ({inside} in "
                "`fsdp_transformer_layer_cls_to_wrap`): leave its classes out, and it is sharded with the root unit."
            )


def _trains(module: nn.Module) -> bool:
    return any(param.requires_grad for param in module.parameters())


def frozen_parts(training_model: nn.Module) -> list[nn.Module]:
    """The parts of a `DreamLLMTrainingModel` with no trainable parameter, to keep out of the shards: the UNet, the
    VAE, and each part of the DreamLLM (vision tower, projectors, queries, LLM) or LLM decoder layer that is frozen."""
    from .losses import _base_mllm

    inner = _base_mllm(training_model.mllm).model
    parts = [training_model.unet, training_model.vae]
    for module in inner.children():
        if not _trains(module):
            parts.append(module)
        elif module is inner.language_model:
            parts.extend(layer for layer in module.layers if not _trains(layer))
    return [part for part in parts if any(True for _ in part.parameters())]


class RowMask:
    """Keeps only the gradient rows `rows` of each weight, also of a weight FSDP2 sharded by rows (`Shard(0)`): each
    process masks the rows its shard holds. `apply` goes between backward and gradient clipping."""

    def __init__(self, weights: list[nn.Parameter], rows: list[int]):
        self.weights = weights
        self.rows = torch.tensor(sorted(rows), dtype=torch.long)

    @staticmethod
    def find(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
        params = dict(model.named_parameters())
        return [params[name] for name in names]

    def _local_mask(self, param: nn.Parameter, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The part of `grad` this process holds, and the 0/1 column that keeps its rows of `rows`."""
        from torch.distributed.tensor import DTensor, Shard

        local = grad.to_local() if isinstance(grad, DTensor) else grad
        start = 0
        if isinstance(grad, DTensor):
            (placement,) = grad.placements
            if not isinstance(placement, Shard) or placement.dim != 0:
                raise ValueError(f"A format-token row mask needs row sharding (Shard(0)), got {placement}.")
            # `fully_shard` splits rows as `torch.chunk` does: equal chunks of ceil(rows / processes), the last shorter.
            chunk = -(-param.shape[0] // grad.device_mesh.size())
            start = chunk * grad.device_mesh.get_local_rank()
        keep = torch.zeros(local.shape[0], 1, dtype=local.dtype, device=local.device)
        inside = self.rows[(self.rows >= start) & (self.rows < start + local.shape[0])] - start
        keep[inside.to(keep.device)] = 1
        return local, keep

    @torch.no_grad()
    def apply(self) -> None:
        for param in self.weights:
            if param.grad is None:
                continue
            local, keep = self._local_mask(param, param.grad)
            local.mul_(keep)


def enable_fsdp_on_cpu(accelerator) -> bool:
    """
    Puts an FSDP launch on CPU processes (gloo) onto the FSDP path; returns whether it did. accelerate 1.15 only turns
    a launch into FSDP for accelerator devices: on CPU processes it keeps MULTI_CPU (DDP) and drops the FSDP settings
    without a word, although `fully_shard` trains on the CPU over gloo. The plugin is then built from the launcher's
    settings as accelerate would have, and both of accelerate's shared states say FSDP (every `AcceleratorState()`
    copies `PartialState`'s). Nothing changes where accelerate itself chose FSDP, or where FSDP was not asked for.
    """
    import os

    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.state.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def deepspeed_on_cpu_kwargs() -> dict:
    """
    `Accelerator` arguments that keep a DeepSpeed launch on CPU processes on the DeepSpeed path. accelerate 1.15 drops
    DeepSpeed with `cpu=True` (the launch becomes DDP over gloo without a word) and, with `cpu=False` and no
    accelerator, counts one process; with `cpu=False` and gloo named as the backend it lets DeepSpeed join a gloo
    group on its CPU accelerator (`DS_ACCELERATOR=cpu`, found by itself without a GPU) on the CPU device. Empty where
    there is an accelerator or no DeepSpeed launch.
    """
    import os

    from accelerate.utils import InitProcessGroupKwargs

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or torch.accelerator.is_available():
        return {}
    return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def check_deepspeed_settings(plugin) -> None:
    """Refuses ZeRO stages 2 and 3 before anything loads: both assume every process runs the same modules in the same
    order, and DreamLLM's batches do not (a text-to-image pair runs the UNet, an image-to-text pair the vision
    projector). Measured here on 2 CPU processes with deepspeed 0.19.8: ZeRO-2 lays out its gradient buckets in the
    order gradients become ready on each process and reduces mismatched buckets, so the second step's gradients
    already differ from one process's, with no error (deepspeedai/DeepSpeed#2343); ZeRO-3 gathers each module's
    weights with a collective when the module runs, and the processes hang at the first step whose batches differ.
    ZeRO-1 reduces the gradients after backward in parameter order and gives the model of one process."""
    if plugin.zero_stage in (2, 3):
        raise ValueError(
            f"DeepSpeed ZeRO stage {plugin.zero_stage} needs every process to run the same modules in the same order, "
            "and DreamLLM's mixed batches (text-to-image and image-to-text samples) do not: stage 2 gives wrong "
            "gradients without an error, stage 3 hangs. Use `zero_stage: 1` "
            "(examples/accelerate/8gpu_deepspeed_zero1.yaml) or FSDP (examples/accelerate/8gpu_fsdp.yaml)."
        )


def launched_processes() -> int:
    """The process count of the run, before its Accelerator exists: as accelerate reads it from a torchrun-style launch
    (`accelerate launch`, torchrun), 1 for a plain `python`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_launch_settings(args) -> int:
    """The checks of `DreamLLMTrainingArguments` against the launch (process count, device), before the Accelerator
    (which they decide) and anything else: `check_global_batch` (whose accumulation it returns) and
    `check_mixed_precision` (of `mixed_precision`, or else `accelerate launch`'s)."""
    accumulation = check_global_batch(
        args.global_batch_size, args.per_device_batch_size, args.gradient_accumulation_steps, launched_processes()
    )
    device_type = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cpu"
    check_mixed_precision(args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no"), device_type)
    return accumulation


def check_global_batch(
    global_batch_size: int | None, per_device_batch_size: int, gradient_accumulation_steps: int, num_processes: int
) -> int:
    """The gradient accumulation that makes `global_batch_size` samples an optimizer step on `num_processes` processes
    of `per_device_batch_size` each; `gradient_accumulation_steps` when no global batch is set. Refuses, before
    anything loads, a global batch those processes cannot split into whole micro-batches, or an accumulation other
    than 1 (the default) that disagrees with it."""
    if global_batch_size is None:
        return gradient_accumulation_steps
    per_micro_step = num_processes * per_device_batch_size
    if global_batch_size % per_micro_step:
        fitting = [n for n in range(1, global_batch_size + 1) if global_batch_size % (n * per_device_batch_size) == 0]
        fix = (
            f"launch a process count that splits it at this batch size ({fitting}: `accelerate launch "
            "--num_processes N`), or change `per_device_batch_size` or `global_batch_size`."
            if fitting
            else f"no process count splits it into micro-batches of {per_device_batch_size}: change "
            "`per_device_batch_size` or `global_batch_size`."
        )
        raise ValueError(
            f"`global_batch_size` {global_batch_size} is not a multiple of {num_processes} process(es) x "
            f"`per_device_batch_size` {per_device_batch_size} = {per_micro_step}: {fix}"
        )
    accumulation = global_batch_size // per_micro_step
    if gradient_accumulation_steps not in (1, accumulation):
        raise ValueError(
            f"`global_batch_size` {global_batch_size} on {num_processes} process(es) x `per_device_batch_size` "
            f"{per_device_batch_size} means {accumulation} accumulation step(s), not the "
            f"`gradient_accumulation_steps` {gradient_accumulation_steps} given: leave one of the two unset."
        )
    return accumulation


def check_mixed_precision(mixed_precision: str, device_type: str) -> None:
    """Refuses, before anything loads, a mixed precision the device cannot run: fp16 on the CPU (accelerate then does
    not autocast at all, and the frozen weights would be fp16 next to fp32 trained ones), bf16 on a CUDA GPU without
    bf16 (before Ampere)."""
    if mixed_precision == "fp16" and device_type == "cpu":
        raise ValueError(
            "`mixed_precision` fp16 needs a GPU: on the CPU accelerate does not autocast in fp16. Use bf16 (which the "
            "CPU autocasts) or no."
        )
    if mixed_precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"`mixed_precision` bf16 needs a GPU with bf16, and {torch.cuda.get_device_name()} has none: use fp16, or "
            "no."
        )


def describe_shards(model: nn.Module, unsharded: list[nn.Module]) -> str:
    """One line on how a prepared model is sharded: its FSDP units and the parts left whole."""
    from torch.distributed.fsdp import FSDPModule

    names = {id(module): name for name, module in model.named_modules()}
    units = [name or "(root)" for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    sharded = sum(1 for param in model.parameters() if hasattr(param, "device_mesh"))
    whole = [names.get(id(module), "?") for module in unsharded]
    return f"FSDP2: {sharded} parameters sharded in {len(units)} units {units}; left whole: {whole}"


__all__ = [
    "RowMask",
    "check_deepspeed_settings",
    "check_fsdp_settings",
    "check_global_batch",
    "check_launch_settings",
    "check_mixed_precision",
    "deepspeed_on_cpu_kwargs",
    "describe_shards",
    "enable_fsdp_on_cpu",
    "frozen_parts",
    "fsdp_version",
    "launched_processes",
]
