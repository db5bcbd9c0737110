"""Writing a built DreamLLM: the pipeline folder, its model card and `building.json`, all or nothing."""

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from .builder import BuildInfo, build_pipeline
from .model_card import build_model_card


BUILD_REPORT = "building.json"


def _package_version() -> str:
    import dreamllm_hf

    return getattr(dreamllm_hf, "__version__", "unknown")


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} exists and is not empty; choose another output folder or pass --overwrite.")


def save_built_pipeline(pipe, info: BuildInfo, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """
    Saves a built pipeline to `output` with its model card (README.md) and `building.json` (`info`). Everything is
    written into a temporary folder beside `output`, renamed at the end; a non-empty `output` is replaced only with
    `overwrite=True`, and only once the new folder is complete.
    """
    output = Path(output)
    _check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        pipe.save_pretrained(tmp)
        version = _package_version()
        build_model_card(info, version).save(tmp / "README.md")
        record = {"builder": {"name": "dreamllm_hf", "version": version}, **dataclasses.asdict(info)}
        (tmp / BUILD_REPORT).write_text(json.dumps(record, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def build_and_save(llm, vision, diffusion, output, overwrite: bool = False, **kwargs) -> Path:
    """`dreamllm-hf init`: [`build_pipeline`] then [`save_built_pipeline`] (`kwargs`: those of `build_pipeline`)."""
    _check_output(Path(output), overwrite)  # before loading anything for an output that would be refused
    pipe, info = build_pipeline(llm, vision, diffusion, return_info=True, **kwargs)
    return save_built_pipeline(pipe, info, output, overwrite=overwrite)


__all__ = ["BUILD_REPORT", "build_and_save", "save_built_pipeline"]
