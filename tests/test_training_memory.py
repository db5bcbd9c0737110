"""`benchmarks/training_memory.py` on a tiny config: its counts are those of the real modules, sharding divides what
is sharded, activation checkpointing lowers activations, LoRA needs far fewer optimizer bytes than full training."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dreamllm_hf import DreamLLMConfig
from dreamllm_hf.testing_utils import tiny_config, tiny_model, tiny_unet, tiny_vae
from dreamllm_hf.training.stages import apply_trainable_parts, trainable_parts


pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "training_memory.py"
GPUS = 4


def _load_script():
    spec = importlib.util.spec_from_file_location("training_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tm = _load_script()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("training_memory")
    tiny_config().save_pretrained(folder / "mllm")
    tiny_unet().save_config(folder / "unet")
    tiny_vae().save_config(folder / "vae")
    argv = [
        "--config",
        str(folder / "mllm"),
        "--unet-config",
        str(folder / "unet"),
        "--vae-config",
        str(folder / "vae"),
    ]
    argv += ["--settings", "1", "2", "lora", "2-lora", "--sharding", *tm.SHARDINGS, "--gpus", "1", str(GPUS)]
    argv += ["--seq-len", "16", "--micro-batch", "1", "2", "--lora-rank", "2"]
    return tm.main(argv)


def _row(result, setting, sharding, gpus):
    return next(
        r for r in result["rows"] if r["setting"] == setting and r["sharding"] == sharding and r["gpus"] == gpus
    )


def test_counts_equal_the_meta_modules(tiny_run):
    for check in tiny_run["checks"]:
        pairs = {key: value for key, value in check.items() if key != "setting"}
        assert pairs and all(formula == real for formula, real in pairs.values()), check
    assert {check["setting"] for check in tiny_run["checks"]} == {"1", "2", "lora", "2-lora"}


@pytest.mark.parametrize("stage", ["1", "2"])
def test_counts_equal_a_real_model(stage):
    """Independent of the script's meta path: a real tiny model on the CPU, set up by the stage."""
    config = tiny_config()
    model = tiny_model(config)
    apply_trainable_parts(model, trainable_parts(stage))
    counts = tm.formula_counts(config, trainable_parts(stage), rank=2, unet_params=0, vae_params=0)
    tower = {id(p) for p in model.model.vision_tower.parameters()}
    assert counts["trained"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["frozen_mllm"] == sum(
        p.numel() for p in model.parameters() if not p.requires_grad and id(p) not in tower
    )
    assert counts["frozen_replicated"] == sum(p.numel() for p in model.model.vision_tower.parameters())


def test_sharding_divides_the_sharded_parts(tiny_run):
    for setting, info in tiny_run["settings"].items():
        replicated = tm.BF16 * info["counts"]["frozen_replicated"]
        for sharding in ("fsdp-full", "fsdp-grad-op", "zero3"):
            one, many = _row(tiny_run, setting, sharding, 1), _row(tiny_run, setting, sharding, GPUS)
            assert one["grads"] == pytest.approx(GPUS * many["grads"])
            assert one["optim"] == pytest.approx(GPUS * many["optim"])
            assert one["weights"] - replicated == pytest.approx(GPUS * (many["weights"] - replicated))
            assert one["gathered"] == many["gathered"]  # the gathered copies and activations are per GPU
            assert one["act_b1"] == many["act_b1"]
        zero2_one, zero2_many = _row(tiny_run, setting, "zero2", 1), _row(tiny_run, setting, "zero2", GPUS)
        assert zero2_one["optim"] == pytest.approx(GPUS * zero2_many["optim"])
        assert zero2_many["weights"] > replicated + tm.BF16 * info["counts"]["trained"]  # bf16 weights replicated
        # the bigger the micro-batch, the more activations: exactly twice as many samples
        row = _row(tiny_run, setting, "fsdp-full", GPUS)
        assert row["act_b2"] == pytest.approx(2 * row["act_b1"])


def test_checkpointing_lowers_activations(tiny_run):
    for row in tiny_run["rows"]:
        assert row["act_b1_ckpt"] < row["act_b1"], row
        assert row["total_b2_ckpt"] < row["total_b2"], row
    for info in tiny_run["settings"].values():
        assert info["activations"]["unet_per_picture_ckpt"] < info["activations"]["unet_per_picture"]


def test_lora_needs_far_fewer_optimizer_bytes_than_full(tiny_run):
    full, lora = _row(tiny_run, "2", "none", 1), _row(tiny_run, "2-lora", "none", 1)
    assert lora["optim"] < full["optim"] / 5
    # and at 7B (pure arithmetic, no module): LoRA's AdamW states are under 1 % of the full fine-tune's
    config = DreamLLMConfig()
    full7b = tm.formula_counts(config, trainable_parts("2"), 16, 0, 0)["trained"]
    lora7b = tm.formula_counts(config, trainable_parts("2", language_model="lora"), 16, 0, 0)["trained"]
    assert lora7b < full7b / 100


def test_fused_kernels_on_meta_are_put_back():
    sdpa, dropout = F.scaled_dot_product_attention, F.dropout
    with tm.fused_kernels_on_meta():
        assert F.scaled_dot_product_attention is not sdpa
        with pytest.raises(RuntimeError, match="meta tensors only"):
            F.dropout(torch.ones(2), 0.5)
    assert F.scaled_dot_product_attention is sdpa and F.dropout is dropout
