"""Convert a DreamLLM checkpoint in the original release layout into the Hugging Face layout.

    OUTPUT/mllm/       DreamLLMForConditionalGeneration (safetensors, corrected bos/eos/pad ids, generation_config.json)
    OUTPUT/processor/  DreamLLMProcessor (legacy-exact fast tokenizer + CLIPImageProcessor)
    OUTPUT/unet/, OUTPUT/vae/, OUTPUT/scheduler/   diffusers components (DDPMScheduler, as the original samples)

Pickles are read with `torch.load(weights_only=True, mmap=True)` only, and models are built on the meta device, so
tensors are never copied more than needed. The output is written to a temporary folder beside it and renamed at the end.
"""

import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPImageProcessor, GenerationConfig

from ..modeling import DreamLLMConfig, DreamLLMForConditionalGeneration
from ..modeling.processing_dreamllm import DreamLLMProcessor
from . import original_layout as L
from .tokenizer import build_legacy_tokenizer

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ConversionSummary:
    output_dir: Path
    num_tensors: int
    num_bytes: int
    seconds: float
    config: DreamLLMConfig


def load_original_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A release `.bin`, read as tensors only: a pickle that would run code is refused."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise L.OriginalCheckpointError(
            f"Refusing to load {path}: it is not a plain tensor pickle (torch.load(weights_only=True) said: "
            f"{str(error).splitlines()[0]}). The DreamLLM release holds only tensors; this file may be tampered with."
        ) from error
    if not isinstance(state_dict, dict):
        raise L.OriginalCheckpointError(f"{path} holds a {type(state_dict).__name__}, not a state dict.")
    return state_dict


def _check_keys(what: str, expected: set[str], given: set[str]) -> None:
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise L.OriginalCheckpointError(
            f"The {what} weights do not match the model built from config.json.\n"
            f"  missing ({len(missing)}): {missing}\n  unexpected ({len(unexpected)}): {unexpected}"
        )


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def _load_into(model: torch.nn.Module, what: str, state_dict: dict[str, torch.Tensor], dtype) -> None:
    _check_keys(what, set(model.state_dict()), set(state_dict))
    expected = model.state_dict()
    for key, tensor in state_dict.items():
        if tensor.shape != expected[key].shape:
            raise L.OriginalCheckpointError(
                f"{what}: {key} has shape {tuple(tensor.shape)} in the release, the model expects {tuple(expected[key].shape)}."
            )
    model.load_state_dict({key: _cast(t, dtype) for key, t in state_dict.items()}, strict=True, assign=True)


def _mllm_state_dict(original_dir: Path, diffusion_sd: dict) -> dict[str, torch.Tensor]:
    state_dict = {}
    for file, mapper in ((L.LLM_FILE, L.map_llm_key), (L.CLIP_FILE, L.map_clip_key), (L.DREAM_FILE, L.map_dream_key)):
        for key, tensor in load_original_state_dict(original_dir / file).items():
            new_key = mapper(key)
            if new_key is not None:
                state_dict[new_key] = tensor
    queries = state_dict.get("model.dream_queries.weight")
    if queries is not None and queries.dim() == 3:  # stored as [1, Q, hidden]
        state_dict["model.dream_queries.weight"] = queries[0]
    for key, tensor in diffusion_sd.items():
        component, new_key = L.split_diffusion_key(key)
        if component == "mllm":
            state_dict[new_key] = tensor
    return state_dict


def _split_diffusion(diffusion_sd: dict) -> dict[str, dict[str, torch.Tensor]]:
    parts = {"vae": {}, "unet": {}, "unknown": {}}
    for key, tensor in diffusion_sd.items():
        component, new_key = L.split_diffusion_key(key)
        if component != "mllm":
            parts[component][new_key] = tensor
    if parts["unknown"]:
        raise L.OriginalCheckpointError(f"Unexpected keys in {L.DIFFUSION_FILE}: {sorted(parts['unknown'])}")
    return parts


def build_processor(original_dir: Path, components: L.OriginalComponents, config: DreamLLMConfig) -> DreamLLMProcessor:
    added_tokens_file = original_dir / L.ADDED_TOKENS_FILE
    if added_tokens_file.is_file():
        added_tokens = json.loads(added_tokens_file.read_text())
    else:
        added_tokens = {token: token_id for token, token_id in config.special_token_ids.items() if token_id > 2}
    tokenizer = build_legacy_tokenizer(original_dir / L.TOKENIZER_FILE, added_tokens)
    image_processor = CLIPImageProcessor.from_pretrained(components.clip_dir)
    return DreamLLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        num_dream_queries=config.num_dream_queries,
    )


def _prepare_output(output_dir: Path, overwrite: bool) -> Path:
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; choose another --output or pass --overwrite.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))


def convert_original_checkpoint(
    original_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> ConversionSummary:
    """Convert `original_dir` (release layout) into `output_dir` (Hugging Face layout); see the module docstring.

    `dtype` ("bfloat16", "float16", "float32" or a torch dtype) casts floating-point weights; None keeps the stored one.
    """
    start = time.perf_counter()
    original_dir, output_dir = Path(original_dir), Path(output_dir)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    original_config = L.read_original_config(original_dir)
    components = L.resolve_components(original_config, original_dir)
    unet_config = UNet2DConditionModel.load_config(components.diffusion_dir / "unet")
    vae_config = AutoencoderKL.load_config(components.diffusion_dir / "vae")
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(components.diffusion_dir / "scheduler"))
    config = L.build_config(original_config, components, cross_attention_dim=unet_config["cross_attention_dim"])

    diffusion_sd = load_original_state_dict(original_dir / L.DIFFUSION_FILE)
    mllm_sd = _mllm_state_dict(original_dir, diffusion_sd)
    diffusion_parts = _split_diffusion(diffusion_sd)

    with torch.device("meta"):
        mllm = DreamLLMForConditionalGeneration(config)
    _load_into(mllm, "language/vision", mllm_sd, dtype)
    mllm.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
    _load_into(unet, "UNet", diffusion_parts["unet"], dtype)
    _load_into(vae, "VAE", diffusion_parts["vae"], dtype)
    processor = build_processor(original_dir, components, config)

    tmp_dir = _prepare_output(output_dir, overwrite)
    try:
        mllm.save_pretrained(tmp_dir / "mllm", max_shard_size=max_shard_size)
        processor.save_pretrained(tmp_dir / "processor")
        unet.save_pretrained(tmp_dir / "unet", max_shard_size=max_shard_size)
        vae.save_pretrained(tmp_dir / "vae", max_shard_size=max_shard_size)
        scheduler.save_pretrained(tmp_dir / "scheduler")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp_dir.rename(output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    tensors = [*mllm_sd.values(), *diffusion_parts["unet"].values(), *diffusion_parts["vae"].values()]
    return ConversionSummary(
        output_dir=output_dir,
        num_tensors=len(tensors),
        num_bytes=sum(t.numel() * (t.element_size() if dtype is None else dtype.itemsize) for t in tensors),
        seconds=time.perf_counter() - start,
        config=config,
    )
