"""GPU check for DreamLLM-7B shapes with random weights (no download): memory, decode speed, one picture.

For fp16, 8-bit and 4-bit mllm it prints the mllm's GPU memory, the peak of the whole pipeline, batch-1 decode tokens/s
against the HBM roofline (bytes of weights read per token / measured device copy bandwidth), and the seconds for one
512x512 picture at 50 steps with guidance. `fp16-static` decodes the fp16 mllm with
`generate(cache_implementation="static")`, which transformers compiles with CUDA graphs on a GPU. The last line is one
JSON object.

    python benchmarks/gpu_check.py                 # on a CUDA GPU, 7B shapes
    python benchmarks/gpu_check.py --tiny          # on the CPU, tiny shapes: checks the script itself

Goals (issue 5): fp16 decode >= 70% of the roofline; 4-bit mllm <= 4.5 GB and whole-pipeline peak <= 8 GB.
"""

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import BitsAndBytesConfig, CLIPImageProcessor

import dreamllm_hf  # noqa: F401
from dreamllm_hf import DreamLLMConfig, DreamLLMForConditionalGeneration, DreamLLMProcessor
from dreamllm_hf.conversion.original_layout import KNOWN_CLIP_IDS, KNOWN_DIFFUSION_IDS
from dreamllm_hf.conversion.tokenizer import build_legacy_tokenizer
from dreamllm_hf.pipelines import DreamLLMPipeline

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "original_tiny"
SD_DIR = KNOWN_DIFFUSION_IDS["stabilityai/stable-diffusion-2-1-base"]


def tiny_config() -> DreamLLMConfig:
    return DreamLLMConfig(
        text_config=dict(model_type="llama", vocab_size=32008, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
        vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, image_size=224, patch_size=14),
        num_dream_queries=64, cross_attention_dim=32,
    )


def diffusion_components(tiny: bool, dtype, device):
    if tiny:
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
        vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)
    else:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD_DIR / "vae"))
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(SD_DIR / "scheduler"))
    return unet.to(device, dtype), vae.to(device, dtype), scheduler


def processor_for(config: DreamLLMConfig) -> DreamLLMProcessor:
    # Any legacy tokenizer will do: image mode is fed `prompt_embeds`, decode is fed ids.
    added = json.loads((FIXTURE / "added_tokens.json").read_text())
    tokenizer = build_legacy_tokenizer(FIXTURE / "tokenizer.model", added)
    image_processor = CLIPImageProcessor.from_pretrained(KNOWN_CLIP_IDS["openai/clip-vit-large-patch14"])
    return DreamLLMProcessor(image_processor, tokenizer, num_image_tokens=config.num_image_tokens,
                             num_dream_queries=config.num_dream_queries)


def copy_bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy (read + write), the roofline's memory speed."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del src, dst
    return 2 * (1 << 30) * repeats / seconds


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def decode_weight_bytes(mllm) -> int:
    """Bytes a decode step reads: the LLM's layers, final norm and `lm_head` (one row of the embedding table, and none
    of CLIP, the projectors or the queries). Quantized weights count at their packed size."""
    language_model = mllm.model.language_model
    embedding = language_model.get_input_embeddings()
    return weight_bytes(language_model) - weight_bytes(embedding) + weight_bytes(mllm.lm_head)


def decode_step_tokens_per_s(mllm, device, steps: int, tiny: bool) -> float:
    """The compiled decode step alone (what `generate(cache_implementation="static")` runs per token), looped on the
    device with no host work between steps: the ceiling that transformers' generation loop adds its overhead to."""
    from transformers import CompileConfig, StaticCache

    prompt = 32
    ids = torch.randint(3, 30000, (1, prompt), device=device)
    cache = StaticCache(config=mllm.config.text_config, max_cache_len=prompt + 2 * steps + 16)
    compile_config = CompileConfig(backend="eager", mode=None) if tiny else CompileConfig()  # tiny: CPU check only
    step = mllm.get_compiled_call(compile_config)
    with torch.no_grad():
        logits = mllm(input_ids=ids, cache=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        position = torch.full((1, 1), prompt, device=device)

        def run(count: int):
            nonlocal token
            for _ in range(count):
                token = step(input_ids=token, position_ids=position, cache=cache, use_cache=True).logits.argmax(-1)
                position.add_(1)

        run(steps)  # compilation and CUDA-graph capture
        sync(device)
        start = time.perf_counter()
        run(steps)
        sync(device)
    return steps / (time.perf_counter() - start)


def decode_tokens_per_s(mllm, device, new_tokens: int, static_cache: bool = False) -> float:
    """Batch-1 greedy decode speed; the 32-token prefill and the set-up are taken out by timing two lengths.

    `static_cache`: `cache_implementation="static"`, which transformers compiles (CUDA graphs) on GPUs.
    """
    ids = torch.randint(3, 30000, (1, 32), device=device)
    extra = {"cache_implementation": "static"} if static_cache else {}

    def timed(tokens: int) -> float:
        sync(device)
        start = time.perf_counter()
        mllm.generate(input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **extra)
        sync(device)
        return time.perf_counter() - start

    short = max(new_tokens // 8, 2)
    for tokens in (short, new_tokens):  # warm-up (and, with a static cache, compilation for both cache sizes)
        timed(tokens)
    return (new_tokens - short) / (timed(new_tokens) - timed(short))


def run_variant(name, checkpoint, config, device, args, bandwidth):
    """`name`: fp16, int8, nf4, or fp16-static (fp16 decoding with a static cache, compiled; no picture)."""
    load_kwargs = {"dtype": torch.float16 if device.type == "cuda" else torch.float32}
    if name == "int8":
        load_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif name == "nf4":
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=load_kwargs["dtype"]
        )
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    mllm = DreamLLMForConditionalGeneration.from_pretrained(checkpoint, device_map={"": device}, **load_kwargs).eval()
    mllm_bytes = torch.cuda.memory_allocated() - before if device.type == "cuda" else weight_bytes(mllm)
    static_cache = name == "fp16-static"
    tokens_per_s = decode_tokens_per_s(mllm, device, args.new_tokens, static_cache)
    roofline = bandwidth / decode_weight_bytes(mllm)  # every weight of the decoder is read once per token
    row = {
        "mllm_gb": mllm_bytes / 1e9,
        "decode_tokens_per_s": tokens_per_s,
        "roofline_tokens_per_s": roofline,
        "roofline_fraction": tokens_per_s / roofline,
        "pipeline_peak_gb": float("nan"),
        "image_seconds": float("nan"),
    }
    if static_cache:
        step_tokens_per_s = decode_step_tokens_per_s(mllm, device, args.new_tokens, args.tiny)
        row.update(step_tokens_per_s=step_tokens_per_s, step_roofline_fraction=step_tokens_per_s / roofline)
        del mllm
        gc.collect()
        return row

    unet, vae, scheduler = diffusion_components(args.tiny, load_kwargs["dtype"], device)
    pipe = DreamLLMPipeline(mllm=mllm, processor=processor_for(config), unet=unet, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    ids = torch.randint(3, 30000, (2, 12), device=device)
    ids[:, 0] = config.bos_token_id
    with torch.no_grad():
        embeds = mllm.get_dream_embeddings(ids).to(unet.dtype)
    size = unet.config.sample_size * pipe.vae_scale_factor
    generator = torch.Generator(device.type).manual_seed(0)
    sync(device)
    start = time.perf_counter()
    pipe(generation_mode="image", prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1], height=size,
         width=size, num_inference_steps=args.steps, guidance_scale=7.5, generator=generator, output_type="np")
    sync(device)
    image_seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else float("nan")
    del pipe, mllm, unet, vae
    gc.collect()
    row.update(pipeline_peak_gb=peak / 1e9, image_seconds=image_seconds, image_size=size)
    return row


def _null_nans(results: dict) -> dict:
    return {name: {k: (None if v != v else v) for k, v in row.items()} for name, row in results.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny shapes on the CPU (checks the script).")
    parser.add_argument("--variants", default="fp16,int8,nf4,fp16-static")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--workdir", default=None, help="Where the random 7B checkpoint is written (~13.5 GB).")
    parser.add_argument("--json-out", default=None, help="Also write the results here, after every variant.")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("No CUDA GPU here: run with --tiny to check the script on the CPU.")
    config = tiny_config() if args.tiny else DreamLLMConfig()
    bandwidth = copy_bandwidth(device)

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        checkpoint = Path(workdir) / "mllm"
        torch.manual_seed(0)
        build_dtype = torch.float16 if device.type == "cuda" else torch.float32
        with torch.device(device):
            model = DreamLLMForConditionalGeneration(config).to(build_dtype)
        model.save_pretrained(checkpoint)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results = {}
        for name in args.variants.split(","):
            results[name] = run_variant(name, checkpoint, config, device, args, bandwidth)
            print(name, json.dumps(results[name]), flush=True)
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(_null_nans(results), indent=1))

    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (tiny shapes)'}; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'variant':12} {'mllm GB':>8} {'peak GB':>8} {'tok/s':>8} {'roofline':>9} {'frac':>6} {'image s':>8}")
    for name, row in results.items():
        print(f"{name:12} {row['mllm_gb']:8.2f} {row['pipeline_peak_gb']:8.2f} {row['decode_tokens_per_s']:8.1f} "
              f"{row['roofline_tokens_per_s']:9.1f} {row['roofline_fraction']:6.2f} {row['image_seconds']:8.2f}")
        if "step_tokens_per_s" in row:
            print(f"{'  step only':12} {'':8} {'':8} {row['step_tokens_per_s']:8.1f} {row['roofline_tokens_per_s']:9.1f} "
                  f"{row['step_roofline_fraction']:6.2f}   (compiled decode step looped on the device, no generate loop)")
    print(json.dumps({"device": str(device), "tiny": args.tiny, **_null_nans(results)}))


if __name__ == "__main__":
    main()
