"""Convert a DreamLLM checkpoint in the original release layout into the Hugging Face layout.

    OUTPUT/model_index.json  DreamLLMPipeline (diffusers), loadable with `DreamLLMPipeline.from_pretrained(OUTPUT)`
    OUTPUT/mllm/             DreamLLMForConditionalGeneration (safetensors, real bos/eos/pad ids, generation config),
                             and the processor's files: a complete transformers repository
    OUTPUT/processor/        DreamLLMProcessor (legacy-exact fast tokenizer + CLIPImageProcessor)
    OUTPUT/unet/, OUTPUT/vae/, OUTPUT/scheduler/   diffusers components (DDPMScheduler, as the original samples)
    OUTPUT/README.md         model card (with the parity table of `verify=True`)
    OUTPUT/conversion.json   provenance: source files, dtype, shards, verification figures

Memory: the release's pickles are memory-mapped (`torch.load(weights_only=True, mmap=True)`) and every safetensors
shard is streamed from the mapping tensor by tensor (see `checkpoint_io`), so the model is never held twice; the peak
resident memory stays well under the size of the largest input file, whatever `max_shard_size` and `dtype` are.
The models are only ever built on the meta device, to check every key and shape before anything is written.

Atomicity: everything is written into a temporary folder beside the output, verified there when asked, and renamed
into place at the end; a failure or an interruption removes it, leaving any previous output untouched.
"""

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPImageProcessor, GenerationConfig

from ..dtypes import parse_dtype
from ..modeling import DreamLLMConfig, DreamLLMForConditionalGeneration
from ..modeling.folder_layout import MLLM_FOLDER, PROCESSOR_FOLDER, save_processor_with_model
from ..modeling.processing_dreamllm import DreamLLMProcessor
from ..pipelines import DreamLLMPipeline
from . import checkpoint_io
from . import original_layout as L
from .tokenizer import build_legacy_tokenizer


logger = logging.getLogger(__name__)

TRANSFORMERS_WEIGHTS_PATTERN = "model{suffix}.safetensors"
DIFFUSERS_WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
CONVERSION_REPORT = "conversion.json"
DEFAULT_BASE_MODEL = "RunpeiDong/dreamllm-7b-chat-v1.0"


@dataclass
class ConversionSummary:
    output_dir: Path
    num_tensors: int
    num_bytes: int
    seconds: float
    config: DreamLLMConfig
    num_shards: int = 0
    dtype: str = ""
    files: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    verification: "object | None" = None  # a `verify.VerificationReport` when verify=True

    def describe(self) -> str:
        rate = self.num_bytes / 2**20 / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"{self.num_tensors} tensors, {self.num_bytes / 2**20:.1f} MiB ({self.dtype}) in {self.num_shards} "
            f"safetensors shard(s), {self.seconds:.1f} s ({rate:.0f} MiB/s)"
            + (f"; {len(self.ignored_keys)} release key(s) ignored as the original does" if self.ignored_keys else "")
        )


def load_release_tensors(original_dir: Path, releaser: checkpoint_io.PageReleaser | None = None) -> L.ReleaseTensors:
    """Memory-maps the four release `.bin` files and maps their keys onto the output components."""
    state_dicts = {}
    for file in L.WEIGHT_FILES:
        state_dicts[file] = checkpoint_io.load_original_state_dict(original_dir / file)
        if releaser is not None:
            releaser.register(original_dir / file)
    return L.split_release_tensors(state_dicts)


def _check_against_model(what: str, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Every key the model expects, none it doesn't, each with the model's shape (checked before writing anything)."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise L.OriginalCheckpointError(
            f"The {what} weights do not match the model built from config.json.\n"
            f"  missing ({len(missing)}): {missing}\n  unexpected ({len(unexpected)}): {unexpected}"
        )
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise L.OriginalCheckpointError(
                f"{what}: {key} has shape {tuple(tensor.shape)} in the release, "
                f"the model expects {tuple(expected[key].shape)}."
            )


def build_processor(original_dir: Path, components: L.OriginalComponents, config: DreamLLMConfig) -> DreamLLMProcessor:
    added_tokens = L.read_added_tokens(original_dir)
    if added_tokens is None:
        added_tokens = {token: token_id for token, token_id in config.special_token_ids.items() if token_id > 2}
    tokenizer = build_legacy_tokenizer(original_dir / L.TOKENIZER_FILE, added_tokens)
    image_processor = CLIPImageProcessor.from_pretrained(components.clip_dir)
    return DreamLLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        num_dream_queries=config.num_dream_queries,
    )


def write_model_index(folder: Path, mllm, processor, unet, vae, scheduler) -> None:
    """`model_index.json` as `DreamLLMPipeline(...).save_pretrained` writes it (the weights are written apart)."""
    # The models are on the meta device: `save_config` records the component classes only, as `save_pretrained`
    # does first before saving each component.
    DreamLLMPipeline(mllm=mllm, processor=processor, unet=unet, vae=vae, scheduler=scheduler).save_config(folder)


def _prepare_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not overwrite:
        if not output_dir.is_dir():
            raise FileExistsError(f"{output_dir} exists and is a file; choose another --output or pass --overwrite.")
        if any(output_dir.iterdir()):
            raise FileExistsError(
                f"{output_dir} exists and is not empty; choose another --output or pass --overwrite."
            )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    stale = sorted(output_dir.parent.glob(f".{output_dir.name}.tmp-*"))
    if stale:
        logger.warning(
            "Found temporary folders of an earlier conversion that was killed before it could clean up: %s. "
            "They are not used; delete them once no conversion is running.",
            ", ".join(map(str, stale)),
        )


def _check_disk_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed * 1.02 + 16 * 2**20:
        raise OSError(
            f"Not enough free disk space in {folder}: the conversion writes about {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB are free."
        )


def _move_into_place(tmp_dir: Path, output_dir: Path, overwrite: bool) -> None:
    """Renames the finished temporary folder to `output_dir`; a replaced output is removed only afterwards."""
    if output_dir.exists():
        if output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        elif not overwrite:
            raise FileExistsError(f"{output_dir} appeared while converting; not replacing it without overwrite=True.")
        else:
            backup = output_dir.parent / f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}"
            output_dir.rename(backup)
            try:
                tmp_dir.rename(output_dir)
            except BaseException:
                backup.rename(output_dir)
                raise
            if backup.is_dir():
                shutil.rmtree(backup, ignore_errors=True)
            else:
                backup.unlink()
            return
    tmp_dir.rename(output_dir)


def convert_original_checkpoint(
    original_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    verify: bool = False,
    verify_dtype: str | torch.dtype = torch.float32,
    verify_device: str | torch.device = "cpu",
    verify_atol: float | None = None,
    verify_rtol: float | None = None,
    repo_id: str | None = None,
    base_model: str | None = DEFAULT_BASE_MODEL,
    card_template: str | os.PathLike | None = None,
    card_fields: dict | None = None,
    progress: bool | None = None,
) -> ConversionSummary:
    """Convert `original_dir` (release layout) into `output_dir` (Hugging Face layout); see the module docstring.

    Args:
        dtype: "bfloat16", "float16", "float32" or a torch dtype to cast floating-point weights to (per tensor chunk,
            while writing); None keeps the stored dtype (bf16 in the release).
        overwrite: replace a non-empty `output_dir` (only once the new output is complete).
        max_shard_size: largest safetensors file per component ("5GB", "500MB" or bytes).
        verify: compare the converted model with an independent reading of the original tensors before the output is
            moved into place (see `verify.verify_conversion`); a failure raises `VerificationError`, leaving no output.
        verify_dtype: the precision the verification computes in (defaults to float32).
        verify_device: where the verification runs (defaults to the CPU).
        verify_atol: the verification's absolute tolerance (None: the default of `verify_dtype`).
        verify_rtol: the verification's relative tolerance (None: the default of `verify_dtype`).
        repo_id: the Hub repository the model card's snippets name (None: the output folder's name).
        base_model: the model card's `base_model` entry.
        card_template: a model card template to render instead of the built-in one; see `dreamllm_hf.model_card`.
        card_fields: extra fields for the model card template; see `dreamllm_hf.model_card`.
        progress: show a progress bar over the bytes written (None: only on a terminal).
    """
    start = time.perf_counter()
    original_dir, output_dir = Path(original_dir), Path(output_dir).absolute()
    dtype = parse_dtype(dtype)
    verify_dtype = parse_dtype(verify_dtype, "verify_dtype")
    _prepare_output(output_dir, overwrite)

    original_config = L.read_original_config(original_dir)
    components = L.resolve_components(original_config, original_dir)
    unet_config = UNet2DConditionModel.load_config(components.diffusion_dir / "unet")
    vae_config = AutoencoderKL.load_config(components.diffusion_dir / "vae")
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(components.diffusion_dir / "scheduler"))
    config = L.build_config(
        original_config, components, unet_config["cross_attention_dim"], L.read_added_tokens(original_dir)
    )

    releaser = checkpoint_io.PageReleaser()
    release = load_release_tensors(original_dir, releaser)
    if release.ignored:
        logger.info(
            "Ignoring %d release key(s), as the original loader does: %s",
            len(release.ignored),
            ", ".join(f"{file}:{key}" for file, key in release.ignored[:8])
            + (" ..." if len(release.ignored) > 8 else ""),
        )
    stored_dtype = (
        release.components["mllm"]["lm_head.weight"].dtype if "lm_head.weight" in release.components["mllm"] else None
    )
    out_dtype = dtype or stored_dtype or torch.bfloat16

    with torch.device("meta"):
        mllm = DreamLLMForConditionalGeneration(config)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
    models = {"mllm": (mllm, "language/vision"), "unet": (unet, "UNet"), "vae": (vae, "VAE")}
    for name, (model, what) in models.items():
        _check_against_model(what, model, release.components[name])
    processor = build_processor(original_dir, components, config)

    patterns = {
        "mllm": TRANSFORMERS_WEIGHTS_PATTERN,
        "unet": DIFFUSERS_WEIGHTS_PATTERN,
        "vae": DIFFUSERS_WEIGHTS_PATTERN,
    }
    plans = {
        name: checkpoint_io.plan_shards(release.components[name], dtype, patterns[name], max_shard_size)
        for name in models
    }
    total_bytes = sum(plan.total_size for plan in plans.values())
    _check_disk_space(output_dir.parent, total_bytes)

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    files: list[str] = []
    report = None
    try:
        with tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="Converting",
            disable=None if progress is None else not progress,
        ) as bar:
            num_tensors, written_tensors = sum(len(plan.tensor_to_filename) for plan in plans.values()), [0]

            def count_tensor(key: str) -> None:
                written_tensors[0] += 1
                bar.set_postfix_str(f"{written_tensors[0]}/{num_tensors} tensors", refresh=False)

            for name, (model, _) in models.items():
                folder = tmp_dir / name
                index_metadata = (
                    {"total_parameters": sum(t.numel() for t in release.components[name].values())}
                    if name == "mllm"
                    else None
                )
                written = checkpoint_io.write_component_weights(
                    folder,
                    release.components[name],
                    plans[name],
                    dtype=dtype,
                    index_metadata=index_metadata,
                    releaser=releaser,
                    on_bytes=bar.update,
                    on_tensor=count_tensor,
                    on_shard=lambda f, n=name: bar.set_description(f"{n}/{f}"),
                )
                files += [f"{name}/{f}" for f in written]
            bar.set_description("Converted")

        config.architectures = [type(mllm).__name__]
        config.dtype = str(out_dtype).removeprefix("torch.")
        config.save_pretrained(tmp_dir / MLLM_FOLDER)
        GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        ).save_pretrained(tmp_dir / MLLM_FOLDER)
        unet.save_config(tmp_dir / "unet")
        vae.save_config(tmp_dir / "vae")
        scheduler.save_pretrained(tmp_dir / "scheduler")
        processor.save_pretrained(tmp_dir / PROCESSOR_FOLDER)
        save_processor_with_model(processor, tmp_dir)  # `mllm/` on its own is a complete transformers repository
        write_model_index(tmp_dir, mllm, processor, unet, vae, scheduler)
        ignored = [f"{file}:{key}" for file, key in release.ignored]
        del release  # the verification maps the files again, on its own

        if verify:
            from .verify import VerificationError, verify_conversion

            report = verify_conversion(
                original_dir,
                tmp_dir,
                dtype=out_dtype,
                compute_dtype=verify_dtype,
                device=verify_device,
                atol=verify_atol,
                rtol=verify_rtol,
            )
            if not report.passed:
                raise VerificationError(report)

        summary = ConversionSummary(
            output_dir=output_dir,
            num_tensors=sum(len(plan.tensor_to_filename) for plan in plans.values()),
            num_bytes=total_bytes,
            seconds=time.perf_counter() - start,
            config=config,
            num_shards=sum(plan.num_shards for plan in plans.values()),
            dtype=str(out_dtype).removeprefix("torch."),
            files=files,
            ignored_keys=ignored,
            verification=report,
        )
        info = conversion_info(original_dir, tmp_dir, summary, plans, max_shard_size, base_model)
        (tmp_dir / CONVERSION_REPORT).write_text(json.dumps(info, indent=2) + "\n")
        from ..model_card import ConvertedFolder, build_model_card

        card = build_model_card(
            ConvertedFolder(info, repo_id=repo_id or output_dir.name), template=card_template, fields=card_fields
        )
        card.save(tmp_dir / "README.md")
        _move_into_place(tmp_dir, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return summary


def _package_version() -> str:
    import dreamllm_hf

    return getattr(dreamllm_hf, "__version__", "unknown")


def conversion_info(
    original_dir: Path, folder: Path, summary: ConversionSummary, plans: dict, max_shard_size, base_model
) -> dict:
    """What `conversion.json` records (and the model card is rendered from); `folder` is the converted folder."""
    from ..model_card import model_facts

    return {
        "converter": {"name": "dreamllm_hf", "version": _package_version()},
        "source": {
            "base_model": base_model,
            "files": {file: (original_dir / file).stat().st_size for file in L.WEIGHT_FILES},
        },
        "dtype": summary.dtype,
        "max_shard_size": max_shard_size,
        "tensors": summary.num_tensors,
        "bytes": summary.num_bytes,
        "shards": summary.num_shards,
        "components": {
            name: {"tensors": len(plan.tensor_to_filename), "bytes": plan.total_size, "shards": plan.num_shards}
            for name, plan in plans.items()
        },
        "ignored_release_keys": summary.ignored_keys,
        "config": model_facts(folder),
        "verification": None if summary.verification is None else summary.verification.to_dict(),
        "seconds": round(summary.seconds, 2),
    }
