"""What running the vision tower whole costs against stopping it at the layer DreamLLM reads (CLIP ViT-L/14 shapes).

    python benchmarks/bench_vision_tower.py [--repeats 5] [--threads 1] [--clock cpu] [--llm-layers 4]

DreamLLM reads CLIP's hidden state -2. `get_image_features` runs the tower's own forward (all 24 layers, keeping only
the hidden state it reads), so that the tower's code, hooks and checkpointing stay transformers'. Stopping after layer
23 instead saves one layer and the post-norm; this script measures that saving against a reference that drives the
tower's modules by hand (embeddings, pre-norm, the first 23 layers: what the model did before), asserting that both
give the same features. Random weights, no download: a CLIP ViT-L/14 vision tower at 224 px (303M parameters) and a
LLaMA of `--llm-layers` x 1024 (with Vicuna-7B the tower's share of a comprehension forward is smaller).

Timings are the best of `--repeats` runs after one warm-up run (the median is reported too), the two paths taking
turns so that other load on the machine hits both: `get_image_features` of one picture each way, and one comprehension
forward through the model (`<image>` + 32 text tokens, logits of the last position, as a prefill), which puts the
saving in proportion. The floating-point operations are counted by `torch.utils.flop_counter` (exact, where timings on a
shared machine move by several per cent). `--clock cpu` (the default) reads this process's CPU time, which other
processes disturb much less than the wall clock. The last line of the output is one JSON object with the figures.
"""

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dreamllm_hf import DreamLLMConfig, DreamLLMForConditionalGeneration
from dreamllm_hf.modeling.configuration_dreamllm import CLIP_VIT_L_14_VISION_CONFIG


def stopped_tower_features(mllm, pixel_values):
    """The reference: the tower driven module by module up to the layer read, then the model's projector."""
    model, tower = mllm.model, mllm.model.vision_tower
    layer = model.config.vision_feature_layer
    layers_read = layer if layer >= 0 else tower.config.num_hidden_layers + 1 + layer
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    for encoder_layer in tower.encoder.layers[:layers_read]:
        hidden = encoder_layer(hidden, None)
    return model.multi_modal_projector(hidden[:, 1:])  # CLIP's CLS token dropped


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
    clock = CLOCKS[args.clock]

    mllm = build(args.llm_layers)
    config = mllm.config
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    image_block = [config.image_start_token_id] + [config.image_patch_token_id] * config.num_image_tokens
    ids = torch.tensor([[config.bos_token_id] + image_block + [config.image_end_token_id] + list(range(100, 132))])

    paths = {
        "whole_tower": lambda: mllm.get_image_features(pixels).pooler_output,
        "stops_at_layer": lambda: stopped_tower_features(mllm, pixels),
    }
    with torch.no_grad():
        assert torch.equal(paths["whole_tower"](), paths["stops_at_layer"]()), "the two paths must agree exactly"
        counted = {name: flops(path) for name, path in paths.items()}
        counted["comprehension_forward"] = flops(lambda: mllm(input_ids=ids, pixel_values=pixels, logits_to_keep=1))
        features = {name: [] for name in paths}
        forward = []
        for _ in range(args.repeats + 1):
            for name, path in paths.items():
                features[name].append(timed(path, clock))
            forward.append(timed(lambda: mllm(input_ids=ids, pixel_values=pixels, logits_to_keep=1), clock))

    runs = {name: times[1:] for name, times in features.items()}  # the first run of each warms up
    whole, stopped = (min(runs[name]) for name in ("whole_tower", "stops_at_layer"))
    whole_median, stopped_median = (statistics.median(runs[name]) for name in ("whole_tower", "stops_at_layer"))
    forward_best = min(forward[1:])
    result = {
        "threads": args.threads,
        "clock": args.clock,
        "repeats": args.repeats,
        "llm": f"LLaMA {args.llm_layers} x 1024",
        "tower": "CLIP ViT-L/14, 224 px, 24 layers, reads hidden state -2",
        "gflops": {name: round(count / 1e9, 3) for name, count in counted.items()},
        "get_image_features": {
            "whole_tower_s": round(whole, 4),
            "stops_at_layer_s": round(stopped, 4),
            "ratio": round(whole / stopped, 4),
            "median_ratio": round(whole_median / stopped_median, 4),
        },
        "comprehension_forward_s": round(forward_best, 4),
        "saving_share_of_forward": round((whole - stopped) / forward_best, 4),
        "saving_flops_share_of_forward": round(
            (counted["whole_tower"] - counted["stops_at_layer"]) / counted["comprehension_forward"], 4
        ),
    }
    print(
        f"get_image_features: {counted['whole_tower'] / 1e9:.1f} GFLOP (whole tower) vs "
        f"{counted['stops_at_layer'] / 1e9:.1f} GFLOP (stopping at the layer); best {whole:.3f} s vs {stopped:.3f} s"
        f" ({whole / stopped:.3f}x)"
    )
    print(
        f"comprehension forward: {forward_best:.3f} s; stopping at the layer would save "
        f"{result['saving_share_of_forward']:.1%} of it ({result['saving_flops_share_of_forward']:.1%} of its FLOPs)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
