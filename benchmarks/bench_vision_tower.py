"""The comprehension forward with a CLIP ViT-L/14-shaped tower: the tower stopping at the layer it reads vs running whole.

    python benchmarks/bench_vision_tower.py [--repeats 5] [--threads 1] [--clock cpu] [--llm-layers 4]

DreamLLM reads CLIP's hidden state -2. It used to run the whole tower (24 layers and the pooler) with every hidden
state kept, then pick layer -2; now `get_image_features` runs the patch embedding, the pre-norm and the first 23 layers
only. Both paths use the same weights and are asserted to give the same features (exactly). Random weights, no
download: a CLIP ViT-L/14 vision tower at 224 px (303M parameters) and a LLaMA of `--llm-layers` x 1024 (the share of
the tower in a comprehension forward depends on the LLM; with Vicuna-7B it is smaller).

Two timings, each the best of `--repeats` runs (after one warm-up run; the median is reported too), the two paths
taking turns so that other load on the machine hits both: `get_image_features` of one picture, and one comprehension
forward (`<image>` + 32 text tokens, logits of the last position, as a prefill). The last line of the output is one
JSON object with the figures, with the floating-point operations of both (counted by `torch.utils.flop_counter`: exact,
where the timings on a shared machine move by several per cent). `--clock cpu` (the default) reads this process's CPU time, which other processes on a
shared machine disturb much less than the wall clock (with one thread it is the time the work took).
"""

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dreamllm_hf import DreamLLMConfig, DreamLLMForConditionalGeneration
from dreamllm_hf.modeling.configuration_dreamllm import CLIP_VIT_L_14_VISION_CONFIG


def whole_tower_features(mllm, pixel_values):
    """The former `get_image_features`: the whole tower with every hidden state, then layer -2 without CLS."""
    model = mllm.model
    outputs = model.vision_tower(pixel_values, output_hidden_states=True)
    selected = outputs.hidden_states[model.config.vision_feature_layer][:, 1:]
    return model.multi_modal_projector(selected)


def build(llm_layers: int) -> DreamLLMForConditionalGeneration:
    config = DreamLLMConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=32008,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=llm_layers,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=2048,
        ),
        vision_config=dict(model_type="clip_vision_model", **CLIP_VIT_L_14_VISION_CONFIG),
        num_dream_queries=64,
        cross_attention_dim=1024,
    )
    torch.manual_seed(0)
    return DreamLLMForConditionalGeneration(config).eval()


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def flops(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def timed(function, clock) -> float:
    start = clock()
    function()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    mllm = build(args.llm_layers)
    config = mllm.config
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    image_block = [config.image_start_token_id] + [config.image_patch_token_id] * config.num_image_tokens
    ids = torch.tensor([[config.bos_token_id] + image_block + [config.image_end_token_id] + list(range(100, 132))])

    original = mllm.model.get_image_features
    whole = lambda pixel_values: whole_tower_features(mllm, pixel_values)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(original(pixels), whole(pixels)), "the two paths must give the same features"
        paths = {"stops_at_layer": original, "whole_tower": whole}
        counted = {name: flops(lambda path=path: path(pixels)) for name, path in paths.items()}
        features = {name: [] for name in paths}
        forward = {name: [] for name in paths}
        for _ in range(args.repeats + 1):
            for name, path in paths.items():
                features[name].append(timed(lambda path=path: path(pixels), CLOCKS[args.clock]))
                mllm.model.get_image_features = path  # the comprehension forward through this path
                forward[name].append(
                    timed(lambda: mllm(input_ids=ids, pixel_values=pixels, logits_to_keep=1), CLOCKS[args.clock])
                )
                mllm.model.get_image_features = original

    result = {
        "threads": args.threads,
        "clock": args.clock,
        "repeats": args.repeats,
        "llm": f"LLaMA {args.llm_layers} x 1024",
        "tower": "CLIP ViT-L/14, 224 px, 24 layers, reads hidden state -2",
        "get_image_features_gflops": {name: round(count / 1e9, 3) for name, count in counted.items()},
        "flops_ratio": round(counted["whole_tower"] / counted["stops_at_layer"], 4),
    }
    print(
        f"get_image_features: {counted['stops_at_layer'] / 1e9:.1f} GFLOP (stops at the layer) vs "
        f"{counted['whole_tower'] / 1e9:.1f} GFLOP (whole tower): {result['flops_ratio']:.4f}x"
    )
    for what, timings in (("get_image_features", features), ("comprehension_forward", forward)):
        runs = {name: times[1:] for name, times in timings.items()}  # the first run of each warms up
        new, old = (min(runs[name]) for name in ("stops_at_layer", "whole_tower"))
        new_median, old_median = (statistics.median(runs[name]) for name in ("stops_at_layer", "whole_tower"))
        result[what] = {
            "stops_at_layer_s": round(new, 4),
            "whole_tower_s": round(old, 4),
            "speedup": round(old / new, 4),
            "median_speedup": round(old_median / new_median, 4),
        }
        print(f"{what}: best {new:.3f} s (stops at the layer) vs {old:.3f} s (whole tower): {old / new:.3f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
