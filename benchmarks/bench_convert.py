"""Benchmark `dreamllm-hf convert` on a checkpoint of realistic size: peak memory and throughput.

Builds a DreamLLM checkpoint in the ORIGINAL release layout with random bf16 weights (a scaled-down 7B: the LLM is
wide and deep enough for `pytorch_model.bin` to weigh more than 1 GB; `inv_freq` buffers included as in the release),
the CLIP / dream-query / Stable Diffusion `.bin` files and the tokenizer files. The vocabulary (1008) and the CLIP and
diffusion component configs are the test fixture's, so its SentencePiece tokenizer fits. Then it converts the folder in
a subprocess and measures that process's peak resident memory (the kernel's high-water mark, cross-checked by psutil
sampling) against the largest input file.

    python benchmarks/bench_convert.py [--workdir DIR] [--hidden 2048 --intermediate 5504 --layers 16] [--dtype ...]

The last line of the output is a JSON object: `rss_ratio` (peak RSS of the converting process / largest input file;
the converter promises <= 1.25), `mb_per_s` (input MB per second of `convert`, imports excluded; `mb_per_s_process`
counts the whole process, interpreter start and imports included), and the figures they come from.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch


FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "original_tiny"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

# Runs inside the measured subprocess: the CLI, then the process's own peak RSS (ru_maxrss is in KiB on Linux).
CHILD = """
import json, resource, sys, time
from dreamllm_hf.cli import main
import dreamllm_hf.conversion.convert_dreamllm_original_to_hf  # imports are not conversion time
start = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
print(json.dumps({"ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "convert_seconds": seconds}))
sys.exit(code)
"""


def _randn(shape, generator, std=0.02):
    return (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)


def _like_fixture(path: Path, generator, overrides: dict) -> dict:
    """The fixture `.bin`'s keys and shapes with fresh random bf16 values (some shapes overridden)."""
    reference = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for key, tensor in reference.items():
        shape = overrides.get(key, tuple(tensor.shape))
        out[key] = torch.ones(shape, dtype=torch.bfloat16) if key.endswith("norm.weight") else _randn(shape, generator)
    return out


def build_original_checkpoint(
    dest: Path, hidden: int, intermediate: int, layers: int, heads: int, queries: int
) -> None:
    """Writes a random DreamLLM checkpoint in the release layout into `dest`."""
    generator = torch.Generator().manual_seed(0)
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((FIXTURE / "config.json").read_text())
    vocab = config["vocab_size"]
    config.update(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    plugins = config["plugins_init_kwargs"]
    for name in ("clip_vision_embedding", "dream_embedding", "stable_diffusion_head"):
        plugins[name]["embed_hidden_size"] = hidden
    plugins["dream_embedding"]["num_dream_queries"] = queries
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        shutil.copy(FIXTURE / name, dest / name)
    shutil.copytree(FIXTURE / "components", dest / "components", dirs_exist_ok=True)

    head_dim = hidden // heads
    inv_freq = 1.0 / (config["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    llm = {"model.embed_tokens.weight": _randn((vocab, hidden), generator)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            llm[p + f"self_attn.{proj}_proj.weight"] = _randn((hidden, hidden), generator)
        llm[p + "self_attn.rotary_emb.inv_freq"] = inv_freq.to(torch.bfloat16)  # as the release may hold
        llm[p + "mlp.gate_proj.weight"] = _randn((intermediate, hidden), generator)
        llm[p + "mlp.up_proj.weight"] = _randn((intermediate, hidden), generator)
        llm[p + "mlp.down_proj.weight"] = _randn((hidden, intermediate), generator)
        llm[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        llm[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    llm["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    llm["lm_head.weight"] = _randn((vocab, hidden), generator)
    torch.save(llm, dest / "pytorch_model.bin")
    del llm

    clip = _like_fixture(FIXTURE / "clip_vision_embedding.bin", generator, {})
    clip_hidden = clip["projector.projector.weight"].shape[1]
    clip["projector.projector.weight"] = _randn((hidden, clip_hidden), generator)
    clip["projector.projector.bias"] = _randn((hidden,), generator)
    torch.save(clip, dest / "clip_vision_embedding.bin")
    torch.save({"dream_queries": _randn((1, queries, hidden), generator)}, dest / "dream_embedding.bin")
    diffusion = _like_fixture(FIXTURE / "stable_diffusion_head.bin", generator, {})
    cross = diffusion["projector.projector.weight"].shape[0]
    diffusion["projector.projector.weight"] = _randn((cross, hidden), generator)
    torch.save(diffusion, dest / "stable_diffusion_head.bin")
    (dest / ".bench-shape.json").write_text(json.dumps([hidden, intermediate, layers, heads, queries]))


def _sample_rss(pid: int, peak: list, stop: threading.Event) -> None:
    try:
        process = psutil.Process(pid)
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.01)
    except psutil.Error:
        pass


def run_conversion(original: Path, output: Path, extra: list[str]) -> dict:
    argv = ["convert", "--original", str(original), "--output", str(output), "--overwrite", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdout=subprocess.PIPE, text=True, env=env)
    peak, stop = [0], threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(child.pid, peak, stop), daemon=True)
    sampler.start()
    stdout, _ = child.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    sys.stdout.write(stdout)
    if child.returncode != 0:
        raise SystemExit(f"conversion failed with exit code {child.returncode}")
    child_report = json.loads(stdout.strip().splitlines()[-1])
    maxrss = child_report["ru_maxrss_bytes"]
    return {
        "seconds": seconds,
        "convert_seconds": child_report["convert_seconds"],
        "peak_rss_bytes": max(maxrss, peak[0]),
        "ru_maxrss_bytes": maxrss,
        "psutil_peak_rss_bytes": peak[0],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="Keeps the generated checkpoint here for reruns.")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    parser.add_argument("--max-shard-size", default=None)
    parser.add_argument("--verify", action="store_true", help="Also run --verify (its memory is not the bound's).")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    original, output = workdir / "original", workdir / "converted"
    shape = [args.hidden, args.intermediate, args.layers, args.heads, args.queries]
    marker = original / ".bench-shape.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == shape):
        shutil.rmtree(original, ignore_errors=True)
        t = time.perf_counter()
        build_original_checkpoint(original, *shape)
        print(f"built the original-layout checkpoint in {time.perf_counter() - t:.1f} s")
    inputs = {p.name: p.stat().st_size for p in original.glob("*.bin")}
    extra = []
    if args.dtype:
        extra += ["--dtype", args.dtype]
    if args.max_shard_size:
        extra += ["--max-shard-size", args.max_shard_size]
    if args.verify:
        extra += ["--verify"]
    result = run_conversion(original, output, extra)
    largest = max(inputs.values())
    total = sum(inputs.values())
    written = sum(p.stat().st_size for p in output.rglob("*.safetensors"))
    summary = {
        "largest_input_file": max(inputs, key=inputs.get),
        "largest_input_mb": round(largest / 1e6, 1),
        "input_mb": round(total / 1e6, 1),
        "output_safetensors_mb": round(written / 1e6, 1),
        "shards": len(list(output.rglob("*.safetensors"))),
        "dtype": args.dtype or "bfloat16 (kept)",
        "seconds": round(result["convert_seconds"], 2),
        "process_seconds": round(result["seconds"], 2),
        "peak_rss_mb": round(result["peak_rss_bytes"] / 1e6, 1),
        "ru_maxrss_mb": round(result["ru_maxrss_bytes"] / 1e6, 1),
        "psutil_peak_rss_mb": round(result["psutil_peak_rss_bytes"] / 1e6, 1),
        "rss_ratio": round(result["peak_rss_bytes"] / largest, 3),
        "mb_per_s": round(total / 1e6 / result["convert_seconds"], 1),
        "mb_per_s_process": round(total / 1e6 / result["seconds"], 1),
    }
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
