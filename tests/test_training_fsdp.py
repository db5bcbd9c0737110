"""`dreamllm-hf train` under `accelerate launch` with FSDP2 (`fully_shard`) on two CPU processes over gloo
(examples/accelerate/cpu_2proc_fsdp.yaml), on the tiny converted fixture and the shipped demo model: the same model as
one process, the stage I row mask on sharded weights, and settings refused before anything loads."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreamllm_hf.shapes_world.data import write_pairs_folder
from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH


pytestmark = pytest.mark.usefixtures("one_thread")

FSDP_CONFIG = "cpu_2proc_fsdp.yaml"
LOSS_RTOL = 1e-5  # as tests/test_training.py
WEIGHT_ATOL = 1e-4  # as tests/test_parity_model.py: fp32 reduction-order noise on these sizes is ~3e-6
LEFT_WHOLE = ("'unet'", "'vae'", ".model.vision_tower'")  # the tower's name is under PEFT's in a LoRA run


def _options(model, data, output, **overrides):
    values = {
        "model": model,
        "data": data,
        "output_dir": output,
        "max_steps": 4,
        "seed": 0,
        "learning_rate": 1e-2,
        "lr_scheduler": "constant",
        "per_device_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "checkpointing_steps": 0,
        "dtype": "float32",
    }
    values.update(overrides)
    return values


def _flags(options: dict) -> list:
    flags = []
    for key, value in options.items():
        flags += [f"--{key.replace('_', '-')}", value]
    return flags


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {key: value.float() for key, value in load_file(folder / "mllm" / "model.safetensors").items()}


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-data")
    return {"pairs": write_pairs_folder(root / "pairs", 8, seed=0), "cache": root / "hf-cache"}


def _assert_same_run(sharded: Path, single: Path, before: Path, lora: bool = False) -> None:
    """The sharded run `sharded` logged the losses of the one-process run `single` at every step and ended with its
    weights (the LLM's, from `before`, or the LoRA adapter's), both within fp32 reduction tolerance."""
    sharded_log, single_log = _log(sharded), _log(single)
    assert [record["step"] for record in sharded_log] == [record["step"] for record in single_log]
    assert any(record["lm_loss"] is not None for record in single_log)  # both terms are compared
    loss_diff = 0.0
    for ours, theirs in zip(sharded_log, single_log):
        for key in ("loss", "lm_loss", "vm_loss"):
            if theirs[key] is None:
                assert ours[key] is None, (ours, theirs)
            else:
                assert ours[key] == pytest.approx(theirs[key], rel=LOSS_RTOL), (key, ours, theirs)
                loss_diff = max(loss_diff, abs(ours[key] - theirs[key]) / abs(theirs[key]))

    if lora:
        after_sharded, after_single = _adapter(sharded), _adapter(single)
        start = {key: torch.zeros_like(value) for key, value in after_single.items() if "lora_B" in key}  # B starts 0
    else:
        start, after_sharded, after_single = _weights(before), _weights(sharded), _weights(single)
    assert after_sharded.keys() == after_single.keys() and start and start.keys() <= after_single.keys()
    moved = max((after_single[key] - start[key]).abs().max().item() for key in start)
    assert moved > 100 * WEIGHT_ATOL  # the comparison below is not between two untrained models
    diffs = {key: (after_sharded[key] - after_single[key]).abs().max().item() for key in after_single}
    print(
        f"largest relative loss difference {loss_diff:.3g}, weight difference {max(diffs.values()):.3g}, move {moved:.3g}"
    )
    for key in after_single:
        assert diffs[key] <= WEIGHT_ATOL, f"{key}: max abs diff {diffs[key]:.3g}"


@pytest.mark.parametrize(
    ("run", "port"),
    [
        pytest.param({"stage": 2}, 29571, id="stage2-full"),
        pytest.param({"language_model": "lora", "lora_dropout": 0.0}, 29573, id="lora"),  # no dropout draws
        pytest.param({"stage": 2, "vision_tower": "full"}, 29575, id="stage2-tower"),  # the tower in the root unit
    ],
)
def test_fsdp_on_two_processes_trains_the_model_of_one_process(
    run, port, converted_tiny, pairs, tmp_path, accelerate_launch
):
    """2 processes x 1 sample under FSDP2 against 1 process accumulating 2 micro-batches of 1, the same global batches
    in the same order: the same losses at every step and the same weights at the end (the LLM in full, or its LoRA
    adapter)."""
    from dreamllm_hf.training import DreamLLMTrainingArguments, train

    common = dict(run, cache_dir=str(pairs["cache"]))
    sharded = tmp_path / "fsdp"
    options = _options(converted_tiny, pairs["pairs"], sharded, checkpointing_steps=2, **common)
    launched = accelerate_launch(port, "-m", "dreamllm_hf.cli", "train", *_flags(options), config=FSDP_CONFIG)
    (shards,) = [line for line in launched.stdout.splitlines() if line.startswith("FSDP2:")]  # the main process's
    units, whole = shards.split("left whole:")
    trained_tower = run.get("vision_tower") == "full"
    kept = [part for part in LEFT_WHOLE if not (trained_tower and "vision_tower" in part)]
    assert units.count("language_model.layers.") == 2 and all(part[1:] in whole for part in kept), shards
    assert ("vision_tower" in whole) != trained_tower, shards  # a trained tower is sharded (with the root unit)
    assert (sharded / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # saved by FSDP's sharded state dict
    assert json.loads((sharded / "trainer_state.json").read_text())["num_processes"] == 2

    single = tmp_path / "single"
    train(DreamLLMTrainingArguments(**_options(str(converted_tiny), [str(pairs["pairs"])], str(single), **common,
                                               gradient_accumulation_steps=2)))  # fmt: skip

    assert [record["step"] for record in _log(single)] == [1, 2, 3, 4]
    _assert_same_run(sharded, single, converted_tiny, lora="lora" in run.values())


def test_fsdp_trains_the_shipped_demo_model_in_stage3_as_one_process(pairs, tmp_path, accelerate_launch):
    """The same check on the shipped demo model (its four decoder layers), in stage III."""
    from dreamllm_hf.training import DreamLLMTrainingArguments, train

    demo = Path(DEMO_MODEL_PATH)
    common = dict(stage=3, max_steps=3, cache_dir=str(pairs["cache"]))
    sharded, single = tmp_path / "fsdp", tmp_path / "single"
    options = _options(str(demo), pairs["pairs"], sharded, **common)
    launched = accelerate_launch(29579, "-m", "dreamllm_hf.cli", "train", *_flags(options), config=FSDP_CONFIG)
    (shards,) = [line for line in launched.stdout.splitlines() if line.startswith("FSDP2:")]
    layers = json.loads((demo / "mllm" / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert shards.split("left whole:")[0].count("language_model.layers.") == layers
    train(DreamLLMTrainingArguments(**_options(str(demo), [str(pairs["pairs"])], str(single), **common,
                                               gradient_accumulation_steps=2)))  # fmt: skip
    _assert_same_run(sharded, single, demo)


def test_stage1_row_mask_reaches_the_sharded_embeddings(converted_tiny, pairs, tmp_path, accelerate_launch):
    """Stage I under FSDP2, in bf16 with activation checkpointing: `fully_shard` replaces the embedding and lm_head
    weights (and the gradient hooks on them); still only the format-token rows move, every other row and every frozen
    weight stays bit for bit."""
    from dreamllm_hf.training import format_token_ids, load_mllm

    output = tmp_path / "stage1"
    options = _options(converted_tiny, pairs["pairs"], output, stage=1, max_steps=3, cache_dir=str(pairs["cache"]))
    options.update(mixed_precision="bf16", dtype="auto", activation_checkpointing=True)  # frozen weights in bf16
    run = accelerate_launch(29572, "-m", "dreamllm_hf.cli", "train", *_flags(options), config=FSDP_CONFIG)
    (shards,) = [line for line in run.stdout.splitlines() if line.startswith("FSDP2:")]
    assert "'mllm.model.language_model.layers.0'" in shards.split("left whole:")[1]  # a frozen layer is not sharded

    before, after = _weights(converted_tiny), _weights(output)
    embeddings = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    for prefix in ("model.multi_modal_projector.", "model.condition_projector.", "model.dream_queries."):
        assert any(not torch.equal(before[key], after[key]) for key in before if key.startswith(prefix)), prefix
    for key in before:
        if key.startswith(("model.language_model.", "lm_head.", "model.vision_tower.")) and key not in embeddings:
            assert torch.equal(before[key], after[key]), key
    rows = format_token_ids(load_mllm(converted_tiny).config)
    for key in embeddings:
        others = torch.ones(before[key].shape[0], dtype=torch.bool)
        others[rows] = False
        assert torch.equal(before[key][others], after[key][others]), key
        assert not torch.equal(before[key][rows], after[key][rows]), key


def test_bad_fsdp_settings_are_refused_from_the_config_alone(converted_tiny, tmp_path):
    """FSDP1, loading from rank 0 only, a layer class to wrap that the model does not have, or one inside a vision tower
    that trains, is refused from `mllm/config.json` alone."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from dreamllm_hf.training import trainable_parts
    from dreamllm_hf.training.sharding import check_fsdp_settings

    config_only = tmp_path / "config-only"
    (config_only / "mllm").mkdir(parents=True)
    shutil.copy(converted_tiny / "mllm" / "config.json", config_only / "mllm" / "config.json")  # no weights

    check_fsdp_settings(FullyShardedDataParallelPlugin(fsdp_version=2), config_only)
    layers = "LlamaDecoderLayer,CLIPEncoderLayer"
    check_fsdp_settings(
        FullyShardedDataParallelPlugin(fsdp_version=2, transformer_cls_names_to_wrap=layers), config_only
    )
    with pytest.raises(ValueError, match="trained vision tower"):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, transformer_cls_names_to_wrap=layers)
        check_fsdp_settings(plugin, config_only, trainable_parts(2, vision_tower="full"))
    check_fsdp_settings(plugin, config_only, trainable_parts(2))  # a frozen tower's layers make empty units
    rank0_loading = FullyShardedDataParallelPlugin(fsdp_version=2)
    rank0_loading.cpu_ram_efficient_loading = True  # as the launcher's environment sets it (the argument wants a GPU)
    with pytest.raises(ValueError, match="fsdp_cpu_ram_efficient_loading"):
        check_fsdp_settings(rank0_loading, config_only)
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_fsdp_settings(FullyShardedDataParallelPlugin(fsdp_version=1), config_only)
    wrong = FullyShardedDataParallelPlugin(fsdp_version=2, transformer_cls_names_to_wrap="LlamaDecoderLayer,GPT2Block")
    with pytest.raises(ValueError, match=r"\['GPT2Block'\].*LlamaDecoderLayer"):
        check_fsdp_settings(wrong, config_only)


def test_two_machines_train_the_model_of_one_process(converted_tiny, pairs, tmp_path, accelerate_launch_two_nodes):
    """Two `accelerate launch` calls as machines 0 and 1 of two (one process each, meeting at 127.0.0.1) train as one
    FSDP2 run of 2 processes: each machine writes its own shard of the checkpoint, and the run logs the losses and ends
    with the weights of one process. The same `global_batch_size` sets the accumulation of each (1 on two processes, 2
    on one)."""
    from dreamllm_hf.training import DreamLLMTrainingArguments, train

    common = dict(stage=2, cache_dir=str(pairs["cache"]), max_steps=3, global_batch_size=2)
    nodes = tmp_path / "nodes"
    options = _options(converted_tiny, pairs["pairs"], nodes, checkpointing_steps=2, **common)
    machine0, machine1 = accelerate_launch_two_nodes(29574, "-m", "dreamllm_hf.cli", "train", *_flags(options))
    for machine in (machine0, machine1):  # each machine's main process prints how it sharded the model
        (shards,) = [line for line in machine.stdout.splitlines() if line.startswith("FSDP2:")]
        assert shards.split("left whole:")[0].count("language_model.layers.") == 2, shards
    assert "Trained 3 steps" in machine0.stdout and "Trained" not in machine1.stdout  # the main process of the run
    state = json.loads((nodes / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_step"] == 3
    shards = sorted(path.name for path in (nodes / "checkpoint-2" / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"], shards  # one written by each machine's process
    assert json.loads((nodes / "training_args.json").read_text())["gradient_accumulation_steps"] == 1

    single = tmp_path / "single"
    train(DreamLLMTrainingArguments(**_options(str(converted_tiny), [str(pairs["pairs"])], str(single), **common)))
    assert json.loads((single / "training_args.json").read_text())["gradient_accumulation_steps"] == 2
    assert [record["step"] for record in _log(single)] == [1, 2, 3]
    _assert_same_run(nodes, single, converted_tiny)


def test_global_batch_the_processes_cannot_split_is_refused():
    from dreamllm_hf.training.sharding import check_global_batch

    assert check_global_batch(None, 4, 3, 8) == 3  # no global batch: the accumulation as given
    assert check_global_batch(256, 16, 1, 16) == 1
    assert check_global_batch(256, 16, 1, 8) == 2
    assert check_global_batch(256, 16, 2, 8) == 2  # given, and agreeing
    with pytest.raises(
        ValueError, match=r"256 is not a multiple of 3 process\(es\) x `per_device_batch_size` 16 = 48"
    ):
        check_global_batch(256, 16, 1, 3)
    with pytest.raises(ValueError, match=r"\[1, 2, 3, 6\]"):  # the process counts that would split 12 at batch 2
        check_global_batch(12, 2, 1, 4)
    with pytest.raises(ValueError, match="2 accumulation step.*`gradient_accumulation_steps` 4 given"):
        check_global_batch(256, 16, 4, 8)


def test_mixed_precision_the_device_cannot_run_is_refused(monkeypatch):
    from dreamllm_hf.training.sharding import check_mixed_precision

    for precision in ("no", "bf16"):
        check_mixed_precision(precision, "cpu")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        check_mixed_precision("fp16", "cpu")
    check_mixed_precision("fp16", "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # a V100, say
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "Tesla V100-SXM2-32GB")
    with pytest.raises(ValueError, match="bf16 needs a GPU with bf16, and Tesla V100-SXM2-32GB has none"):
        check_mixed_precision("bf16", "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    check_mixed_precision("bf16", "cuda")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(
            {"global_batch_size": 3, "per_device_batch_size": 2}, "3 is not a multiple of 1 process", id="batch"
        ),
        pytest.param({"mixed_precision": "fp16"}, "fp16 needs a GPU", id="fp16-on-cpu"),
    ],
)
def test_bad_settings_are_refused_before_anything_loads(options, message, tmp_path, monkeypatch, capsys):
    """`dreamllm-hf train` refuses them with argparse's one-line error and exit code 2, and `train` with a ValueError,
    with the model folder and the data missing: nothing was read, and the output folder was not made."""
    from dreamllm_hf.cli import main
    from dreamllm_hf.training import DreamLLMTrainingArguments, train

    if message.startswith("fp16") and torch.accelerator.is_available():
        pytest.skip("fp16 is refused on the CPU only")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    output = tmp_path / "run"
    options = _options(tmp_path / "no-model", tmp_path / "no-data", output, **options)
    with pytest.raises(SystemExit) as refused:
        main(["train", *map(str, _flags(options))])
    assert refused.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("dreamllm-hf train: error: ") and message in line, line
    with pytest.raises(ValueError, match=message):
        train(DreamLLMTrainingArguments(**dict(options, model=str(options["model"]), data=[str(options["data"])],
                                               output_dir=str(output))))  # fmt: skip
    assert not output.exists()


def test_the_two_node_config_is_the_one_node_config_on_two_machines(converted_tiny, tmp_path):
    """examples/accelerate/2x8gpu_fsdp.yaml, read as `accelerate launch` reads it: 2 machines x 8 processes, with the
    FSDP and precision settings of 8gpu_fsdp.yaml, which `train` accepts for the model."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin
    from conftest import REPO

    from dreamllm_hf.training.sharding import check_fsdp_settings

    two, one = (load_config_from_file(str(REPO / "examples" / "accelerate" / name))
                for name in ("2x8gpu_fsdp.yaml", "8gpu_fsdp.yaml"))  # fmt: skip
    assert (two.num_machines, two.num_processes, one.num_processes) == (2, 16, 8)
    assert two.rdzv_backend == "static" and two.main_process_ip and two.main_process_port
    assert two.fsdp_config == one.fsdp_config and two.mixed_precision == one.mixed_precision == "bf16"
    config_only = tmp_path / "config-only" / "mllm"
    config_only.mkdir(parents=True)
    shutil.copy(converted_tiny / "mllm" / "config.json", config_only / "config.json")
    fsdp = two.fsdp_config
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"], transformer_cls_names_to_wrap=fsdp["fsdp_transformer_layer_cls_to_wrap"]
    )
    check_fsdp_settings(plugin, config_only.parent)
