"""`dreamllm-hf train` under `accelerate launch` with DeepSpeed on two CPU processes (DeepSpeed's CPU accelerator over
gloo, examples/accelerate/cpu_2proc_deepspeed_zero1.yaml), on the tiny converted fixture: ZeRO-1 gives the model of one
process, and ZeRO-2/3, which DreamLLM's mixed batches break, are refused before anything loads. The first launch on a
machine JIT-builds DeepSpeed's shared-memory op (about 25 s, needs a C++ compiler); it is cached afterwards."""

import json

import pytest
from test_training_fsdp import LOSS_RTOL, WEIGHT_ATOL, _flags, _log, _options, _weights

from dreamllm_hf.shapes_world.data import write_pairs_folder


pytest.importorskip("deepspeed")
pytestmark = pytest.mark.usefixtures("one_thread")

ZERO1_CONFIG = "cpu_2proc_deepspeed_zero1.yaml"


def test_zero1_on_two_processes_trains_the_model_of_one_process(converted_tiny, tmp_path, accelerate_launch):
    """Stage II in full, 2 processes x 1 sample under ZeRO-1 against 1 process accumulating 2 micro-batches: the same
    losses at every step, the same weights at the end, and a checkpoint holding one optimizer-state shard per
    process. The batches mix text-to-image and image-to-text pairs across the processes, which ZeRO-2 gets wrong."""
    from dreamllm_hf.training import DreamLLMTrainingArguments, train

    common = {"stage": 2, "cache_dir": str(tmp_path / "hf-cache")}
    data = write_pairs_folder(tmp_path / "pairs", 8, seed=0)
    sharded = tmp_path / "zero1"
    options = _options(converted_tiny, data, sharded, checkpointing_steps=2, **common)
    accelerate_launch(29581, "-m", "dreamllm_hf.cli", "train", *_flags(options), config=ZERO1_CONFIG)
    shards = sorted(path.name for path in (sharded / "checkpoint-2" / "pytorch_model").glob("*optim_states.pt"))
    assert shards == [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)]  # DeepSpeed, not DDP
    assert json.loads((sharded / "trainer_state.json").read_text())["num_processes"] == 2

    single = tmp_path / "single"
    train(DreamLLMTrainingArguments(**_options(str(converted_tiny), [str(data)], str(single), **common,
                                               gradient_accumulation_steps=2)))  # fmt: skip

    sharded_log, single_log = _log(sharded), _log(single)
    assert [record["step"] for record in sharded_log] == [record["step"] for record in single_log] == [1, 2, 3, 4]
    assert any(record["lm_loss"] is not None for record in single_log)
    for ours, theirs in zip(sharded_log, single_log):
        for key in ("loss", "lm_loss", "vm_loss"):
            if theirs[key] is None:
                assert ours[key] is None, (ours, theirs)
            else:
                assert ours[key] == pytest.approx(theirs[key], rel=LOSS_RTOL), (key, ours, theirs)

    before, after_sharded, after_single = _weights(converted_tiny), _weights(sharded), _weights(single)
    assert after_sharded.keys() == after_single.keys() == before.keys()
    assert max((after_single[key] - before[key]).abs().max().item() for key in before) > 100 * WEIGHT_ATOL
    for key in after_single:
        diff = (after_sharded[key] - after_single[key]).abs().max().item()
        assert diff <= WEIGHT_ATOL, f"{key}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("stage", [2, 3])
def test_zero2_and_zero3_are_refused(stage):
    from accelerate.utils import DeepSpeedPlugin

    from dreamllm_hf.training.sharding import check_deepspeed_settings

    check_deepspeed_settings(DeepSpeedPlugin(zero_stage=1))
    with pytest.raises(ValueError, match=f"ZeRO stage {stage} .*zero_stage: 1"):
        check_deepspeed_settings(DeepSpeedPlugin(zero_stage=stage))


def test_shipped_deepspeed_configs_parse_into_the_plugin():
    """The example configs, read as `accelerate launch` reads them, give a ZeRO-1 DeepSpeedPlugin that `train` runs."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin
    from conftest import REPO

    from dreamllm_hf.training.sharding import check_deepspeed_settings

    for name in ("8gpu_deepspeed_zero1.yaml", ZERO1_CONFIG):
        config = load_config_from_file(str(REPO / "examples" / "accelerate" / name))
        assert str(config.distributed_type).endswith("DEEPSPEED"), name
        ds = config.deepspeed_config
        plugin = DeepSpeedPlugin(
            zero_stage=ds["zero_stage"],
            gradient_accumulation_steps=ds["gradient_accumulation_steps"],
            gradient_clipping=ds["gradient_clipping"],
        )
        check_deepspeed_settings(plugin)
        assert plugin.deepspeed_config["zero_optimization"]["stage"] == 1
        assert plugin.deepspeed_config["gradient_clipping"] == 1.0  # as --max-grad-norm's default
