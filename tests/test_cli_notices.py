"""The commands print nothing a user cannot act on: not the notices that importing diffusers logs (bitsandbytes' CPU
kernel, transformers' torchvision fallback), while every other record of those loggers still comes through."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import dreamllm_hf
from dreamllm_hf.import_notices import IMPORT_NOTICES, dropped_import_notices
from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH


# Words of the notices rather than the beginnings the filters match: a notice reworded upstream fails this test.
NOTICE_WORDS = ("kernels-community", "gemm_4bit_forward", "requires torchvision", "falling back to")


def run_cli(*arguments, cwd: Path) -> subprocess.CompletedProcess:
    """`dreamllm-hf ARGUMENTS` in a fresh Python (as the console script starts: the package, then its `cli`), on the
    code under test, offline."""
    src = str(Path(dreamllm_hf.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "dreamllm_hf.cli", *map(str, arguments)]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def notices(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(word in line for word in NOTICE_WORDS)]


def test_help_and_generate_print_no_import_notices(tmp_path):
    shown = run_cli("--help", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "generate" in shown.stdout
    answer = tmp_path / "answer.md"
    generated = run_cli(
        "generate", "--model", DEMO_MODEL_PATH, "What is this?", "--mode", "text", "--max-new-tokens", 4,
        "--out", answer, cwd=tmp_path,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert answer.read_text().strip()
    assert notices(shown.stderr) == []
    assert notices(generated.stderr) == []


class Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_only_those_notices_are_dropped_and_only_inside_the_block():
    for name, beginnings in IMPORT_NOTICES.items():
        logger, kept = logging.getLogger(name), Kept()
        logger.addHandler(kept)
        try:
            notice = beginnings[0] + ": the rest of it"
            with dropped_import_notices():
                logger.warning(notice)
                logger.warning("Another warning from the same logger")
            logger.warning(notice)
        finally:
            logger.removeHandler(kept)
        assert kept.messages == ["Another warning from the same logger", notice], name
