"""Writing a built DreamLLM: the pipeline folder, its model card and `building.json`, all or nothing."""

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..model_card import BuiltFolder, build_model_card
from .builder import BuildInfo


BUILD_REPORT = "building.json"


def _package_version() -> str:
    import dreamllm_hf

    return getattr(dreamllm_hf, "__version__", "unknown")


def check_output(output: str | os.PathLike, overwrite: bool) -> None:
    """Refuses a non-empty `output` unless `overwrite` (before anything is loaded for an output that would be
    refused)."""
    output = Path(output)
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} exists and is not empty; choose another output folder or pass --overwrite.")


def build_record(info: BuildInfo) -> dict:
    """What `building.json` records (and the model card is rendered from): `info` and the builder's version."""
    return {"builder": {"name": "dreamllm_hf", "version": _package_version()}, **dataclasses.asdict(info)}


def save_built_pipeline(pipe, info: BuildInfo, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """
    Saves a built pipeline (`DreamLLMPipeline(**build_components(...))`) to `output` with its model card (README.md)
    and `building.json` (`info`). Everything is written into a temporary folder beside `output`, renamed at the end;
    a non-empty `output` is replaced only with `overwrite=True`, and only once the new folder is complete.
    """
    output = Path(output)
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        pipe.save_pretrained(tmp)
        record = build_record(info)
        (tmp / BUILD_REPORT).write_text(json.dumps(record, indent=2) + "\n")
        build_model_card(BuiltFolder(json.loads((tmp / BUILD_REPORT).read_text()))).save(tmp / "README.md")
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


__all__ = ["BUILD_REPORT", "build_record", "check_output", "save_built_pipeline"]
