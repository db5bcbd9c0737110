"""The converter on what the real release may hold: streaming writes, atomic output, dtype and shards, hostile pickles,
plugin keys and RoPE buffers, and `--verify` (passing on the fixture, failing on a corrupted conversion)."""

import json
import pathlib
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamllm_hf.conversion import (
    OriginalCheckpointError,
    VerificationError,
    checkpoint_io,
    convert_original_checkpoint,
    verify_conversion,
)
from dreamllm_hf.conversion import original_layout as L


FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "original_tiny"


pytestmark = pytest.mark.usefixtures("one_thread")


def copy_fixture(dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(FIXTURE, dest, ignore=shutil.ignore_patterns("goldens*"))
    return dest


def read_folder(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def leftovers(parent: pathlib.Path, name: str) -> list[pathlib.Path]:
    return sorted(parent.glob(f".{name}.*"))


# ----------------------------------------------------------------------------------------------------------------------
# the safetensors writer and the page releaser


def test_streaming_writer_matches_safetensors(tmp_path):
    tensors = {
        "float": torch.randn(7, 5),
        "bf16": torch.randn(3, 33).to(torch.bfloat16),
        "transposed": torch.randn(4, 6).t(),  # not contiguous
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "ints": torch.arange(10, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }
    path = tmp_path / "a.safetensors"
    checkpoint_io.write_safetensors(path, tensors, metadata={"format": "pt"}, chunk_bytes=16)  # many chunks per tensor
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    with safe_open(path, framework="pt") as file:
        assert file.metadata() == {"format": "pt"}

    cast = tmp_path / "b.safetensors"
    checkpoint_io.write_safetensors(cast, tensors, dtype=torch.float16, chunk_bytes=16)
    loaded = load_file(cast)
    assert loaded["bf16"].dtype == torch.float16 and torch.equal(loaded["bf16"], tensors["bf16"].half())
    assert loaded["ints"].dtype == torch.int64 and loaded["mask"].dtype == torch.bool  # only floats are cast


def test_page_releaser_never_changes_values(tmp_path):
    path = tmp_path / "w.bin"
    torch.save({"a": torch.randn(1 << 20), "b": torch.randn(333, 77)}, path)
    releaser = checkpoint_io.PageReleaser()
    mapped = checkpoint_io.load_original_state_dict(path)
    releaser.register(path)
    in_memory = torch.load(path, weights_only=True)
    heap = torch.randn(1 << 20)
    heap_copy = heap.clone()
    for tensor in (*mapped.values(), heap):
        releaser.release(tensor)  # released pages of the mapping are read again from the file; the heap is left alone
    assert torch.equal(heap, heap_copy)
    for key in in_memory:
        assert torch.equal(mapped[key], in_memory[key])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on /proc/self/maps regions: Linux only")
def test_page_releaser_returns_mapped_pages(tmp_path):
    psutil = pytest.importorskip("psutil")
    path = tmp_path / "big.bin"
    torch.save({"w": torch.randn(16 << 20 >> 2)}, path)  # 16 MiB
    tensor = checkpoint_io.load_original_state_dict(path)["w"]
    releaser = checkpoint_io.PageReleaser()
    releaser.register(path)
    process = psutil.Process()
    before = process.memory_info().rss
    assert torch.isfinite(tensor.sum())  # touches every page
    touched = process.memory_info().rss
    releaser.release(tensor)
    released = process.memory_info().rss
    assert touched - before > 12 << 20
    assert touched - released > 12 << 20


# ----------------------------------------------------------------------------------------------------------------------
# what the release may contain


class _Hostile:
    """Unpickling this would create a file: what a tampered checkpoint would do, harmlessly."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_hostile_pickle_is_refused(tmp_path, zip_format):
    original = copy_fixture(tmp_path / "original")
    marker = tmp_path / "pwned"
    torch.save({"dream_queries": _Hostile(marker)}, original / L.DREAM_FILE, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(OriginalCheckpointError, match="Refusing to load .*could run code"):
        convert_original_checkpoint(original, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_hostile_pickle_cli_message(tmp_path, capsys):
    from dreamllm_hf.cli import main

    original = copy_fixture(tmp_path / "original")
    marker = tmp_path / "pwned"
    torch.save({"model.norm.weight": _Hostile(marker)}, original / L.LLM_FILE)
    assert main(["convert", "--original", str(original), "--output", str(tmp_path / "out"), "--no-progress"]) == 1
    assert "Refusing to load" in capsys.readouterr().err
    assert not marker.exists()


def test_plugin_keys_and_buffers_are_ignored(tmp_path, converted_tiny):
    """Plugin copies inside pytorch_model.bin (an FSDP full save), RoPE inv_freq and CLIP position_ids are dropped, as
    the original loader drops them; the plugins come from their own files, and nothing else changes."""
    original = copy_fixture(tmp_path / "original")
    llm = torch.load(original / L.LLM_FILE, weights_only=True)
    assert any(key.endswith("rotary_emb.inv_freq") for key in llm)  # the fixture holds them, as the release may
    generator = torch.Generator().manual_seed(0)
    llm["model.clip_vision_embedding.projector.projector.weight"] = torch.randn(64, 32, generator=generator).bfloat16()
    llm["model.dream_embedding.dream_queries"] = torch.randn(1, 4, 64, generator=generator).bfloat16()
    llm["stable_diffusion_head.projector.projector.weight"] = torch.randn(16, 64, generator=generator).bfloat16()
    torch.save(llm, original / L.LLM_FILE)
    clip = torch.load(original / L.CLIP_FILE, weights_only=True)
    clip["clip_vision_model.vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    torch.save(clip, original / L.CLIP_FILE)
    config = json.loads((original / L.CONFIG_FILE).read_text())
    assert config["bos_token_id"] == 0 and config["pad_token_id"] == -1  # the release's wrong generic ids
    assert config["plugins_init_kwargs"]["dream_embedding"]["pretrained_model_name_or_path"] == "none"

    summary = convert_original_checkpoint(original, tmp_path / "out")
    assert "pytorch_model.bin:model.dream_embedding.dream_queries" in summary.ignored_keys
    assert "clip_vision_embedding.bin:clip_vision_model.vision_model.embeddings.position_ids" in summary.ignored_keys
    assert sum(key.endswith("inv_freq") for key in summary.ignored_keys) == 2
    for component in ("mllm", "unet", "vae"):
        ours, reference = read_folder(tmp_path / "out" / component), read_folder(converted_tiny / component)
        assert set(ours) == set(reference)
        assert all(torch.equal(ours[key], reference[key]) for key in ours), component
    mllm_config = json.loads((tmp_path / "out" / "mllm" / "config.json").read_text())
    assert (mllm_config["bos_token_id"], mllm_config["eos_token_id"], mllm_config["pad_token_id"]) == (1, 2, 1000)


def test_unknown_llm_key_is_reported_before_writing(tmp_path):
    original = copy_fixture(tmp_path / "original")
    llm = torch.load(original / L.LLM_FILE, weights_only=True)
    llm["model.layers.0.self_attn.q_norm.weight"] = torch.ones(64).bfloat16()
    torch.save(llm, original / L.LLM_FILE)
    with pytest.raises(OriginalCheckpointError, match="unexpected \\(1\\)"):
        convert_original_checkpoint(original, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


# ----------------------------------------------------------------------------------------------------------------------
# atomic output


def _fail_on_nth_write(monkeypatch, n, error):
    real = checkpoint_io.write_safetensors
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == n:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "write_safetensors", flaky)
    return calls


def test_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    calls = _fail_on_nth_write(monkeypatch, 2, OSError("disk on fire"))
    with pytest.raises(OSError, match="disk on fire"):
        convert_original_checkpoint(FIXTURE, tmp_path / "out")
    assert len(calls) == 2  # one shard was complete when it failed
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_previous_output(tmp_path, monkeypatch):
    output = tmp_path / "out"
    output.mkdir()
    (output / "previous.txt").write_text("keep me")
    _fail_on_nth_write(monkeypatch, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        convert_original_checkpoint(FIXTURE, output, overwrite=True)
    assert [p.name for p in output.iterdir()] == ["previous.txt"]
    assert not leftovers(tmp_path, "out")


def test_refuses_non_empty_output_unless_overwrite(tmp_path, capsys):
    from dreamllm_hf.cli import main

    output = tmp_path / "out"
    output.mkdir()
    (output / "previous.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_original_checkpoint(FIXTURE, output)
    argv = ["convert", "--original", str(FIXTURE), "--output", str(output), "--no-progress"]
    assert main(argv) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (output / "previous.txt").read_text() == "keep me"
    assert main([*argv, "--overwrite"]) == 0
    assert not (output / "previous.txt").exists() and (output / "model_index.json").is_file()
    assert not leftovers(tmp_path, "out")


def test_refuses_to_start_without_disk_space(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(OSError, match="Not enough free disk space"):
        convert_original_checkpoint(FIXTURE, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------------
# dtype, shards, the pipeline index


def test_float16_in_small_shards_loads_back(tmp_path, tiny_mllm):
    from diffusers import UNet2DConditionModel

    from dreamllm_hf import DreamLLMForConditionalGeneration

    output = tmp_path / "out"
    summary = convert_original_checkpoint(FIXTURE, output, dtype="float16", max_shard_size="100KB")
    mllm_files = sorted(p.name for p in (output / "mllm").glob("*.safetensors"))
    assert len(mllm_files) > 3 and mllm_files[0] == "model-00001-of-%05d.safetensors" % len(mllm_files)
    assert (output / "mllm" / "model.safetensors.index.json").is_file()
    assert (output / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert summary.num_shards == sum(len(list((output / c).glob("*.safetensors"))) for c in ("mllm", "unet", "vae"))
    for component in ("mllm", "unet", "vae"):
        for path in (output / component).glob("*.safetensors"):
            assert path.stat().st_size < 100_000 + 40_000 or len(load_file(path)) == 1  # one big tensor may overflow
            assert all(t.dtype == torch.float16 for t in load_file(path).values())
    assert json.loads((output / "mllm" / "config.json").read_text())["dtype"] == "float16"
    assert json.loads((output / "conversion.json").read_text())["dtype"] == "float16"

    # Values: the release's bf16 numbers, rounded to fp16, key for key (the fp32 model's weights, cast).
    release = torch.load(FIXTURE / L.LLM_FILE, weights_only=True)
    ours = read_folder(output / "mllm")
    assert torch.equal(ours["lm_head.weight"], release["lm_head.weight"].half())
    assert torch.equal(
        ours["model.language_model.layers.1.mlp.down_proj.weight"],
        release["model.layers.1.mlp.down_proj.weight"].half(),
    )
    loaded = DreamLLMForConditionalGeneration.from_pretrained(output / "mllm", dtype=torch.float32)
    reference = tiny_mllm.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key].half().float()), key
    unet = UNet2DConditionModel.from_pretrained(output / "unet")
    diffusion = torch.load(FIXTURE / L.DIFFUSION_FILE, weights_only=True)
    assert torch.equal(unet.conv_in.weight, diffusion["unet.conv_in.weight"].half())
    report = verify_conversion(FIXTURE, output)  # the dtype comes from mllm/config.json: fp16, in shards
    assert report.passed, report.format_table()
    assert report.weights_compared == 412 and report.weights_max_abs_diff == 0.0


def test_model_index_is_the_pipelines(converted_tiny):
    pipelines = pytest.importorskip("dreamllm_hf.pipelines")
    index = json.loads((converted_tiny / "model_index.json").read_text())
    assert index["_class_name"] == "DreamLLMPipeline"
    assert index["mllm"] == ["dreamllm_hf.modeling.modeling_dreamllm", "DreamLLMForConditionalGeneration"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    pipe = pipelines.DreamLLMPipeline.from_pretrained(converted_tiny)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert pipe.mllm.config.num_dream_queries == 4


def test_converted_folder_loads_with_the_generic_loaders(converted_tiny):
    """`DiffusionPipeline.from_pretrained(DIR)` and `AutoProcessor.from_pretrained(DIR/mllm)`, as users try first."""
    from diffusers import DiffusionPipeline
    from transformers import AutoProcessor

    import dreamllm_hf

    pipe = DiffusionPipeline.from_pretrained(converted_tiny, dtype=torch.float32)
    assert type(pipe) is dreamllm_hf.DreamLLMPipeline
    processor = AutoProcessor.from_pretrained(converted_tiny / "mllm")
    assert type(processor) is dreamllm_hf.DreamLLMProcessor
    for name in ("tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (converted_tiny / "mllm" / name).read_bytes() == (converted_tiny / "processor" / name).read_bytes()
    text = "USER: What is a dream? ASSISTANT:"
    assert processor(text=text)["input_ids"] == pipe.processor(text=text)["input_ids"]
    assert processor.num_image_tokens == pipe.mllm.config.num_image_tokens


# ----------------------------------------------------------------------------------------------------------------------
# --verify


def test_verify_passes_on_the_fixture(converted_tiny):
    report = verify_conversion(FIXTURE, converted_tiny)
    print(report.format_table())
    assert report.passed, report.format_table()
    assert report.weights_compared == 412 and report.weights_max_abs_diff == 0.0
    names = [check.name for check in report.checks]
    assert (
        any("logits" in n for n in names)
        and any("conditioning" in n for n in names)
        and any("UNet" in n for n in names)
    )
    assert all(check.max_abs_diff <= 1e-5 for check in report.checks)
    assert report.checks[1].shape == [1, 1 + 5 + 6 + 7, 1008]  # BOS, text, <im_start> + 4 slots + <im_end>, text


def test_verify_fails_on_a_corrupted_conversion(tmp_path, converted_tiny):
    corrupted = shutil.copytree(converted_tiny, tmp_path / "corrupted")
    # Two mapping bugs that keep every shape: a transposed projection, and swapped attention weights in the UNet.
    mllm_file = corrupted / "mllm" / "model.safetensors"
    tensors = load_file(mllm_file)
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].t().contiguous()
    save_file(tensors, mllm_file, metadata={"format": "pt"})
    unet_file = corrupted / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(unet_file)
    q, k = (f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{x}.weight" for x in "qk")
    tensors[q], tensors[k] = tensors[k], tensors[q]
    save_file(tensors, unet_file, metadata={"format": "pt"})

    report = verify_conversion(FIXTURE, corrupted)
    assert not report.passed
    assert sorted(m.split(" ")[0] for m in report.weights_mismatched) == sorted(
        ["mllm/" + key, "unet/" + q, "unet/" + k]
    )
    results = {check.name.split(" ")[0]: check.passed for check in report.checks}
    assert results["logits,"] is False and results["UNet"] is False and results["VAE"] is True
    assert "FAIL" in report.format_table()


def test_verify_reports_an_unloadable_conversion(tmp_path, converted_tiny):
    broken = shutil.copytree(converted_tiny, tmp_path / "broken")
    unet_file = broken / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(unet_file)
    tensors["conv_in.weight"] = tensors["conv_in.weight"][:, :2].contiguous()  # a wrong shape: from_pretrained raises
    save_file(tensors, unet_file, metadata={"format": "pt"})
    report = verify_conversion(FIXTURE, broken)
    unet_checks = [check for check in report.checks if check.name.startswith("UNet")]
    assert len(unet_checks) == 1 and not unet_checks[0].passed and "converted unet failed" in unet_checks[0].name
    assert not report.passed and any("conv_in.weight" in m for m in report.weights_mismatched)


def test_failed_verification_leaves_no_output(tmp_path, monkeypatch):
    real = checkpoint_io.write_safetensors

    def corrupting(path, tensors, **kwargs):  # a writer bug: the dream queries come out negated
        key = "model.dream_queries.weight"
        if key in tensors:
            tensors = {**tensors, key: -tensors[key]}
        return real(path, tensors, **kwargs)

    monkeypatch.setattr(checkpoint_io, "write_safetensors", corrupting)
    with pytest.raises(VerificationError, match="does not match") as caught:
        convert_original_checkpoint(FIXTURE, tmp_path / "out", verify=True)
    assert not caught.value.report.passed
    assert any("dream_queries" in m for m in caught.value.report.weights_mismatched)
    assert list(tmp_path.iterdir()) == []


def test_verification_report_round_trips():
    from dreamllm_hf.conversion.verify import ParityCheck, VerificationReport

    report = VerificationReport(checks=[ParityCheck("logits", [1, 2], 1e-7, 3.0, 1e-4)], weights_compared=3)
    again = VerificationReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report and again.passed
    assert "| logits | 1x2 | 1e-07 | 3 | 0.0001 |" in again.to_markdown()


def test_one_dtype_table_for_every_command():
    """`--dtype` of every command (and `dtype=` of the converter and the trainer) read the one table."""
    import argparse

    from dreamllm_hf.cli import build_parser
    from dreamllm_hf.dtypes import DTYPE_NAMES, parse_dtype
    from dreamllm_hf.training.trainer import DreamLLMTrainingArguments

    found = {}

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, subparser in action.choices.items():
                    walk(subparser, f"{name} {command}")
            elif action.dest in ("dtype", "verify_dtype"):
                found[f"{name} {action.option_strings[0]}"] = tuple(c for c in action.choices if c != "auto")

    walk(build_parser(), "dreamllm-hf")
    for command in ("generate", "convert", "train", "evaluate fid", "evaluate captions", "evaluate vqa"):
        assert f"dreamllm-hf {command} --dtype" in found, command
    assert "dreamllm-hf convert --verify-dtype" in found
    assert set(found.values()) == {DTYPE_NAMES}
    for name in DTYPE_NAMES:
        assert parse_dtype(name) is getattr(torch, name)
    assert parse_dtype(torch.bfloat16) is torch.bfloat16 and parse_dtype(None) is None
    with pytest.raises(
        ValueError, match=r"`verify_dtype` must be one of 'float32', 'bfloat16', 'float16'; got 'fp16'"
    ):
        parse_dtype("fp16", "verify_dtype")
    with pytest.raises(ValueError, match="`verify_dtype` must be one of"):
        convert_original_checkpoint(FIXTURE, FIXTURE.parent / "never-written", verify_dtype="half")
    arguments = DreamLLMTrainingArguments(model="m", data="d", output_dir="o", dtype="bfloat16")
    assert arguments.weight_dtype() is torch.bfloat16
