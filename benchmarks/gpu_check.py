"""GPU check for DreamLLM-7B shapes with random weights (no download): memory, decode speed, one picture, documents.

For fp16, 8-bit and 4-bit mllm it prints the mllm's GPU memory, the peak of the whole pipeline, batch-1 decode tokens/s
against the HBM roofline (bytes of weights read per token / measured device copy bandwidth), and the seconds for one
512x512 picture at 50 steps with guidance (`DreamLLMText2ImagePipeline`). `fp16-static` decodes the fp16 mllm with
`generate(cache_implementation="static")`, which transformers compiles with CUDA graphs on a GPU.

`fp16-documents` writes documents with `DreamLLMPipeline(..., cache_implementation="static")` (a `StaticCache`; the
decode step compiled on CUDA), every token forced by a logits processor (`bench_pipeline.RowScripts`) so that the
lengths are known:

* one document of text only, decode tokens/s and its share of the same roofline, from two documents of
  `--new-tokens` / 8 and `--new-tokens` text tokens (the prompt, set-up and end taken out by the difference);
* 8 documents (the 8 prompts and scripts of `bench_pipeline.py`'s `batched_documents_ratio`, `--doc-segment` tokens a
  segment: 4 draw one 512x512 picture of `--doc-steps` steps, two at a time, and they finish at 8 different steps;
  `do_sample=True` with one generator per document) in one call against one call each: documents/s ratio. The same
  again without the pictures (`documents_text_ratio`). Same text per document asserted; pictures compared.

`bf16-train-fsdp` (only when named) times one optimizer step of stage II on the 7B shapes in bf16 with FSDP2 over one
GPU (`run_training_step`): tokens/s and the peak memory, against `training_memory.py`'s prediction.

`fp16-serve` runs the same 8 documents through the serving engine of `dreamllm-hf serve --api` (continuous batching):
8 concurrent clients against one client at a time, documents/s ratio (`run_serving`).

The last line is one JSON object.

    python benchmarks/gpu_check.py                              # on a CUDA GPU, 7B shapes, every variant
    python benchmarks/gpu_check.py --variants fp16-documents    # documents only
    python benchmarks/gpu_check.py --tiny                       # on the CPU, tiny shapes: checks the script itself
    python benchmarks/gpu_check.py --variants bf16-train-fsdp --train-layers 16   # a training step on an 80 GB GPU

Goals (issue 5): fp16 decode >= 70% of the roofline; 4-bit mllm <= 4.5 GB and whole-pipeline peak <= 8 GB. Documents:
one document's decode >= 70% of the roofline; 8 documents in one call >= 6x the documents/s of one call each.
Serving (issue 23): 8 concurrent clients >= 6x the documents/s of one client at a time.
"""

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import BitsAndBytesConfig, CLIPImageProcessor

import dreamllm_hf  # noqa: F401
from dreamllm_hf import DreamLLMConfig, DreamLLMForConditionalGeneration, DreamLLMProcessor
from dreamllm_hf import constants as C
from dreamllm_hf.conversion.original_layout import KNOWN_CLIP_IDS, KNOWN_DIFFUSION_IDS
from dreamllm_hf.decoder_conditioning import vae_scale_factor
from dreamllm_hf.modeling.configuration_dreamllm import CLIP_VIT_L_14_VISION_CONFIG, VICUNA_7B_TEXT_CONFIG
from dreamllm_hf.pipelines import DreamLLMPipeline, DreamLLMText2ImagePipeline
from dreamllm_hf.testing_utils import (
    config_token_ids,
    tiny_config,
    tiny_processor,
    tiny_scheduler,
    tiny_unet,
    tiny_vae,
)


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import (  # noqa: E402
    PROMPTS,
    TEXT_TOKEN,
    batched_scripts,
    chat_ids,
    compare_documents,
    fixture_tokenizer,
    scripted,
)


SD_DIR = KNOWN_DIFFUSION_IDS["stabilityai/stable-diffusion-2-1-base"]
TRAINING_VARIANT = "bf16-train-fsdp"


def gpu_config(tiny: bool, tokenizer) -> DreamLLMConfig:
    """The 7B shapes, or tiny ones with the 7B's vocabulary and picture layout (256 image slots, 64 queries); the
    special token ids are the tokenizer's, so that the processor lays pictures out as the model reads them."""
    ids = config_token_ids(tokenizer)
    if not tiny:
        return DreamLLMConfig(**ids)
    return tiny_config(
        text_config=dict(
            vocab_size=VICUNA_7B_TEXT_CONFIG["vocab_size"],
            max_position_embeddings=VICUNA_7B_TEXT_CONFIG["max_position_embeddings"],
            hidden_size=64,
            intermediate_size=128,
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=128, image_size=CLIP_VIT_L_14_VISION_CONFIG["image_size"]
        ),
        num_dream_queries=C.NUM_DREAM_QUERIES,
        cross_attention_dim=32,
        **ids,
    )


def diffusion_components(tiny: bool, dtype, device):
    if tiny:
        unet, vae = tiny_unet(cross_attention_dim=32), tiny_vae()
    else:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD_DIR / "vae"))
    return unet.to(device, dtype), vae.to(device, dtype), tiny_scheduler()


def processor_for(config: DreamLLMConfig, tokenizer) -> DreamLLMProcessor:
    # Any legacy tokenizer will do: image mode is fed `prompt_embeds`, decode is fed ids.
    image_processor = CLIPImageProcessor.from_pretrained(KNOWN_CLIP_IDS["openai/clip-vit-large-patch14"])
    return tiny_processor(config, tokenizer=tokenizer, image_processor=image_processor)


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


def load_mllm(checkpoint, device, load_kwargs: dict):
    """(mllm, its bytes on the device, the memory allocated before it: `None` off CUDA), peak statistics reset."""
    before = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    mllm = DreamLLMForConditionalGeneration.from_pretrained(checkpoint, device_map={"": device}, **load_kwargs).eval()
    mllm_bytes = torch.cuda.memory_allocated() - before if device.type == "cuda" else weight_bytes(mllm)
    return mllm, mllm_bytes, before


def decode_row(mllm_bytes: int, tokens_per_s: float, roofline: float) -> dict:
    """A result row's memory and decode figures (picture figures NaN until measured)."""
    return {
        "mllm_gb": mllm_bytes / 1e9,
        "decode_tokens_per_s": tokens_per_s,
        "roofline_tokens_per_s": roofline,
        "roofline_fraction": tokens_per_s / roofline,
        "pipeline_peak_gb": float("nan"),
        "image_seconds": float("nan"),
    }


def run_variant(name, checkpoint, config, tokenizer, device, args, bandwidth):
    """`name`: fp16, int8, nf4, or fp16-static (fp16 decoding with a static cache, compiled; no picture)."""
    load_kwargs = {"dtype": torch.float16 if device.type == "cuda" else torch.float32}
    if name == "int8":
        load_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif name == "nf4":
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=load_kwargs["dtype"]
        )
    mllm, mllm_bytes, before = load_mllm(checkpoint, device, load_kwargs)
    static_cache = name == "fp16-static"
    tokens_per_s = decode_tokens_per_s(mllm, device, args.new_tokens, static_cache)
    roofline = bandwidth / decode_weight_bytes(mllm)  # every weight of the decoder is read once per token
    row = decode_row(mllm_bytes, tokens_per_s, roofline)
    if static_cache:
        step_tokens_per_s = decode_step_tokens_per_s(mllm, device, args.new_tokens, args.tiny)
        row.update(step_tokens_per_s=step_tokens_per_s, step_roofline_fraction=step_tokens_per_s / roofline)
        del mllm
        gc.collect()
        return row

    unet, vae, scheduler = diffusion_components(args.tiny, load_kwargs["dtype"], device)
    pipe = DreamLLMText2ImagePipeline(
        mllm=mllm, processor=processor_for(config, tokenizer), unet=unet, vae=vae, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    ids = torch.randint(3, 30000, (2, 12), device=device)
    ids[:, 0] = config.bos_token_id
    with torch.no_grad():
        embeds = mllm.get_dream_embeddings(ids).dream_embeddings.to(unet.dtype)
    size = unet.config.sample_size * pipe.vae_scale_factor
    generator = torch.Generator(device.type).manual_seed(0)
    sync(device)
    start = time.perf_counter()
    pipe(
        prompt_embeds=embeds[1:],
        negative_prompt_embeds=embeds[:1],
        height=size,
        width=size,
        num_inference_steps=args.steps,
        guidance_scale=7.5,
        generator=generator,
        output_type="np",
    )
    sync(device)
    image_seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else float("nan")
    del pipe, mllm, unet, vae
    gc.collect()
    row.update(pipeline_peak_gb=peak / 1e9, image_seconds=image_seconds, image_size=size)
    return row


def timed(device, fn):
    """(seconds, result) of `fn()`, the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def document_pipeline(checkpoint, config, tokenizer, device, args):
    """The fp16 pipeline of the documents' variants (fp32 on the CPU): it, the mllm's bytes, the memory before it."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    mllm, mllm_bytes, before = load_mllm(checkpoint, device, {"dtype": dtype})
    unet, vae, scheduler = diffusion_components(args.tiny, dtype, device)
    pipe = DreamLLMPipeline(
        mllm=mllm, processor=processor_for(config, tokenizer), unet=unet, vae=vae, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, mllm_bytes, before


def run_documents(checkpoint, config, tokenizer, device, args, bandwidth):
    """`fp16-documents`: `DreamLLMPipeline` documents with `cache_implementation="static"` (see the module doc)."""
    pipe, mllm_bytes, before = document_pipeline(checkpoint, config, tokenizer, device, args)
    mllm, unet = pipe.mllm, pipe.unet
    size = unet.config.sample_size * pipe.vae_scale_factor
    eos, dream_start = config.eos_token_id, config.dream_start_token_id
    piece = pipe.tokenizer.decode([TEXT_TOKEN])
    roofline = bandwidth / decode_weight_bytes(mllm)

    scripts = batched_scripts(args.doc_segment, dream_start=dream_start, eos=eos)
    text_scripts = [[t for t in script if t != dream_start] for script in scripts]
    long, short = args.new_tokens, max(args.new_tokens // 8, 2)
    # One budget and one picture limit for every call, so that a static cache has the same width for prompts of the
    # same length (the compiled step is reused, not rebuilt).
    common = dict(
        cache_implementation="static",
        max_new_tokens=max(long + 1, max(len(s) for s in scripts)),
        max_images=1,
        num_inference_steps=args.doc_steps,
        guidance_scale=7.5,
        height=size,
        width=size,
        output_type="np",
    )

    def check(out, index, script):
        assert out.stop_reasons[index] == "eos", out.stop_reasons
        assert len(out.images[index]) == script.count(dream_start), (index, len(out.images[index]))
        assert out.text[index].replace("\n", "") == piece * script.count(TEXT_TOKEN), (index, out.text[index])

    # 1. One document, text only: decode tokens/s from two lengths (greedy; the tokens are forced anyway).
    prompt = PROMPTS[3]
    prompt_ids = chat_ids(pipe, prompt)[0]

    def one_document(tokens: int):
        script = [TEXT_TOKEN] * tokens + [eos]
        processors = scripted({prompt: prompt_ids}, {prompt: script}, dream_start=dream_start)
        out = pipe(prompt, generation_kwargs={"logits_processor": processors}, **common)
        check(out, 0, script)

    for tokens in (short, long):  # warm-up (compilation, CUDA graphs)
        one_document(tokens)
    seconds = {
        n: min(timed(device, lambda: one_document(n))[0] for _ in range(args.doc_repeats)) for n in (short, long)
    }
    tokens_per_s = (long - short) / (seconds[long] - seconds[short])
    row = decode_row(mllm_bytes, tokens_per_s, roofline)
    row["document_seconds"] = {str(short): seconds[short], str(long): seconds[long]}

    # 2. 8 documents in one call against one call each, with pictures and without.
    all_ids = {p: chat_ids(pipe, p)[0] for p in PROMPTS}
    count = len(PROMPTS)
    for name, workload in (("documents", scripts), ("documents_text", text_scripts)):
        processors = scripted(all_ids, dict(zip(PROMPTS, workload)), dream_start=dream_start)
        settings = dict(common, do_sample=True, generation_kwargs={"logits_processor": processors})

        def call(indices):
            generators = [torch.Generator(device.type).manual_seed(i) for i in indices]
            return pipe([PROMPTS[i] for i in indices], generator=generators, **settings)

        def together():
            return call(range(count))

        def one_by_one():
            return [call([i]) for i in range(count)]

        batched, alone = together(), one_by_one()  # warm-up (every shape compiled) and the check
        for index, script in enumerate(workload):
            check(batched, index, script)
        # Same text asserted; fp16 pictures from a batch of another size are compared, not asserted.
        difference = compare_documents(batched, alone, tolerance=None)["largest_picture_difference"]
        batched_s = min(timed(device, together)[0] for _ in range(args.doc_repeats))
        alone_s = min(timed(device, one_by_one)[0] for _ in range(args.doc_repeats))
        row.update(
            {
                f"{name}_batched_s": batched_s,
                f"{name}_one_by_one_s": alone_s,
                f"{name}_ratio": alone_s / batched_s,
                f"{name}_pictures": sum(s.count(dream_start) for s in workload),
                f"{name}_tokens": sum(len(s) for s in workload),
                f"{name}_largest_picture_difference": difference,
            }
        )
    row["documents_count"] = count
    row["picture_size"] = size
    if device.type == "cuda":
        row["pipeline_peak_gb"] = (torch.cuda.max_memory_allocated() - before) / 1e9
    return row  # the pipeline goes with this frame (main collects)


def run_serving(checkpoint, config, tokenizer, device, args, bandwidth):
    """`fp16-serve`: the serving engine (what `dreamllm-hf serve --api` runs on) with 8 clients at once against one
    client at a time: the 8 documents of `fp16-documents` (forced tokens, 4 drawing a picture), each a request of its
    own with its own generator, submitted from 8 threads as concurrent requests reach the server. The engine's
    continuous batching writes them together; one at a time, each waits for the previous one. HTTP and JSON are
    left out here (`bench_serve.py` measures their cost on the CPU): this is what the GPU gains."""
    from concurrent.futures import ThreadPoolExecutor

    from dreamllm_hf.pipelines import DocumentRequest
    from dreamllm_hf.serve.engine import ServingEngine

    pipe, mllm_bytes, before = document_pipeline(checkpoint, config, tokenizer, device, args)
    eos, dream_start = config.eos_token_id, config.dream_start_token_id
    scripts = batched_scripts(args.doc_segment, dream_start=dream_start, eos=eos)
    processors = scripted(
        {p: chat_ids(pipe, p)[0] for p in PROMPTS}, dict(zip(PROMPTS, scripts)), dream_start=dream_start
    )
    piece = pipe.tokenizer.decode([TEXT_TOKEN])

    def request(index):
        return DocumentRequest(
            PROMPTS[index],
            do_sample=True,
            max_new_tokens=max(len(s) for s in scripts),
            max_images=1,
            num_inference_steps=args.doc_steps,
            guidance_scale=7.5,
            output_type="np",
            generation_kwargs={"logits_processor": processors},
            generator=torch.Generator(device.type).manual_seed(index),
        )

    def client(index):
        start = time.perf_counter()
        end = next(e for e in engine.submit(request(index)) if e.type == "document_end")
        script = scripts[index]
        assert end.stop_reason == "eos" and len(end.output.images[0]) == script.count(dream_start), index
        assert end.output.text[0].replace("\n", "") == piece * script.count(TEXT_TOKEN), index
        return time.perf_counter() - start

    count = len(PROMPTS)

    def one_at_a_time():
        return [client(i) for i in range(count)]

    def concurrent():
        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(client, range(count)))

    with ServingEngine(pipe, max_queue=count) as engine:
        one_at_a_time(), concurrent()  # warm-up
        alone_s, alone_latency = min(
            (timed(device, one_at_a_time) for _ in range(args.doc_repeats)), key=lambda r: r[0]
        )
        together_s, together_latency = min(
            (timed(device, concurrent) for _ in range(args.doc_repeats)), key=lambda r: r[0]
        )
    row = {
        "mllm_gb": mllm_bytes / 1e9,
        "serve_one_at_a_time_s": alone_s,
        "serve_concurrent_s": together_s,
        "serve_ratio": alone_s / together_s,
        "serve_latency_p50_concurrent_s": sorted(together_latency)[count // 2],
        "serve_latency_max_concurrent_s": max(together_latency),
        "serve_pictures": sum(s.count(dream_start) for s in scripts),
        "serve_tokens": sum(len(s) for s in scripts),
        "documents_count": count,
    }
    if device.type == "cuda":
        row["pipeline_peak_gb"] = (torch.cuda.max_memory_allocated() - before) / 1e9
    return row


def training_batch(config, seq_len: int, batch: int, picture_size: int, device):
    """`batch` samples of `seq_len` tokens, each with one dream block (its target picture random in [-1, 1])."""
    dream = [config.dream_start_token_id, *[config.image_patch_token_id] * config.num_dream_queries]
    dream.append(config.dream_end_token_id)
    ids = torch.randint(3, 30000, (batch, seq_len), device=device)
    ids[:, 0] = config.bos_token_id
    if seq_len < len(dream) + 2:
        raise SystemExit(f"--train-seq {seq_len} is shorter than a dream block ({len(dream)} tokens) and <s>.")
    start = (seq_len - len(dream)) // 2
    ids[:, start : start + len(dream)] = torch.tensor(dream, device=device)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "diffusion_pixel_values": torch.rand(batch, 3, picture_size, picture_size, device=device) * 2 - 1,
    }


def run_training_step(config, device, args):
    """`bf16-train-fsdp`: stage II (the LLM, projectors and queries trained; UNet, VAE and CLIP frozen) in bf16 with
    FSDP2 over one process, as accelerate sets it up (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16)`,
    fp32 master weights, each decoder layer a unit, the frozen tower outside), activation checkpointing on: a warm-up
    step, then a timed optimizer step (`--train-batch` samples of `--train-seq` tokens, one picture drawn each):
    tokens/s and the peak memory, against what `training_memory.py` predicts for the same shapes. The full 7B needs
    ~106 GiB on one GPU (an H200); `--train-layers 16` fits an 80 GB GPU."""
    import os
    from argparse import Namespace

    import torch.distributed as dist
    import training_memory
    from diffusers import DDPMScheduler
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from dreamllm_hf.training.losses import DreamLLMTrainingModel
    from dreamllm_hf.training.stages import apply_trainable_parts, trainable_parts

    if args.train_layers:
        config = DreamLLMConfig(
            **{
                **config.to_dict(),
                "text_config": {**config.text_config.to_dict(), "num_hidden_layers": args.train_layers},
            }
        )
    started_group = not dist.is_initialized()
    if started_group:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29541")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    before = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    with torch.device(device):
        mllm = DreamLLMForConditionalGeneration(config).to(torch.bfloat16)
    parts = trainable_parts("2")
    apply_trainable_parts(mllm, parts)  # the trained parameters in fp32, as the trainer keeps them
    mllm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    unet, vae, _ = diffusion_components(args.tiny, torch.bfloat16, device)
    unet.enable_gradient_checkpointing()
    noise_scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(SD_DIR / "scheduler"))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    for layer in mllm.model.language_model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(mllm, mp_policy=policy, ignored_params=set(mllm.model.vision_tower.parameters()))
    model = DreamLLMTrainingModel(mllm, unet, vae, noise_scheduler).train()
    optimizer = torch.optim.AdamW([p for p in mllm.parameters() if p.requires_grad], lr=1e-5)
    size = unet.config.sample_size * vae_scale_factor(vae.config)
    batch = training_batch(config, args.train_seq, args.train_batch, size, device)

    def step(model=model, optimizer=optimizer):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach().float().item(), out.vm_loss.detach().float().item()

    step()  # warm-up: the optimizer states are created here
    seconds, (loss, vm_loss) = timed(device, step)
    peak = (torch.cuda.max_memory_allocated() - before) if device.type == "cuda" else float("nan")

    with tempfile.TemporaryDirectory() as folder:  # the prediction for these very shapes
        folder = Path(folder)
        config.save_pretrained(folder / "mllm")
        unet.save_config(folder / "unet")
        vae.save_config(folder / "vae")
        del model, mllm, unet, vae, optimizer
        gc.collect()
        settings = Namespace(
            config=str(folder / "mllm"),
            unet_config=str(folder / "unet"),
            vae_config=str(folder / "vae"),
            settings=["2"],
            sharding=["fsdp-full"],
            gpus=[1],
            micro_batch=[args.train_batch],
            seq_len=args.train_seq,
            pictures_per_sample=1,
            lora_rank=training_memory._DEFAULT_ARGS.lora_rank,
            gpu_gib=0.0,
            reserve_gib=0.0,
        )
        predicted = training_memory.compute(settings)["rows"][0][f"total_b{args.train_batch}_ckpt"]
    if started_group:
        dist.destroy_process_group()
    tokens = args.train_seq * args.train_batch
    return {
        "train_layers": config.text_config.num_hidden_layers,
        "train_tokens": tokens,
        "train_step_s": seconds,
        "train_tokens_per_s": tokens / seconds,
        "train_peak_gib": peak / training_memory.GIB,
        "train_predicted_gib": predicted / training_memory.GIB,
        "train_loss": loss,
        "train_vm_loss": vm_loss,
    }


def _null_nans(results: dict) -> dict:
    return {name: {k: (None if v != v else v) for k, v in row.items()} for name, row in results.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny shapes on the CPU (checks the script).")
    parser.add_argument(
        "--variants",
        default="fp16,int8,nf4,fp16-static,fp16-documents,fp16-serve",
        help="Comma-separated, of fp16, int8, nf4, fp16-static, fp16-documents, fp16-serve (the default: all of "
        "these) and bf16-train-fsdp (one step of stage II in bf16 with FSDP over one GPU; asked for by name).",
    )
    parser.add_argument(
        "--train-seq", type=int, default=None, help="bf16-train-fsdp: tokens a sample (2048; 128 tiny)"
    )
    parser.add_argument("--train-batch", type=int, default=1, help="bf16-train-fsdp: samples in the micro-batch")
    parser.add_argument(
        "--train-layers",
        type=int,
        default=None,
        help="bf16-train-fsdp: decoder layers (default all 32, ~106 GiB: an H200; 16 fits an 80 GB GPU)",
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--doc-segment",
        type=int,
        default=None,
        help="fp16-documents: text tokens a segment (default 64; 8 with --tiny)",
    )
    parser.add_argument(
        "--doc-steps", type=int, default=None, help="fp16-documents: steps of each picture (default 50; 5 with --tiny)"
    )
    parser.add_argument("--doc-repeats", type=int, default=2, help="fp16-documents: timed runs (best taken)")
    parser.add_argument("--workdir", default=None, help="Where the random 7B checkpoint is written (~13.5 GB).")
    parser.add_argument("--json-out", default=None, help="Also write the results here, after every variant.")
    args = parser.parse_args()
    if args.doc_segment is None:
        args.doc_segment = 8 if args.tiny else 64
    if args.doc_steps is None:
        args.doc_steps = 5 if args.tiny else 50
    if args.train_seq is None:
        args.train_seq = 128 if args.tiny else 2048
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("No CUDA GPU here: run with --tiny to check the script on the CPU.")
    tokenizer = fixture_tokenizer()
    config = gpu_config(args.tiny, tokenizer)
    bandwidth = copy_bandwidth(device)

    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        checkpoint = Path(workdir) / "mllm"
        if any(name != TRAINING_VARIANT for name in variants):  # the training step builds its own model
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
        for name in variants:
            if name == TRAINING_VARIANT:
                results[name] = run_training_step(config, device, args)
                gc.collect()
            elif name in ("fp16-documents", "fp16-serve"):
                run = run_documents if name == "fp16-documents" else run_serving
                results[name] = run(checkpoint, config, tokenizer, device, args, bandwidth)
                gc.collect()
            else:
                results[name] = run_variant(name, checkpoint, config, tokenizer, device, args, bandwidth)
            print(name, json.dumps(results[name]), flush=True)
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(_null_nans(results), indent=1))

    print(
        f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (tiny shapes)'}; "
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s"
    )
    print(f"{'variant':12} {'mllm GB':>8} {'peak GB':>8} {'tok/s':>8} {'roofline':>9} {'frac':>6} {'image s':>8}")
    for name, row in results.items():
        if "train_tokens_per_s" in row:
            print(
                f"{name:12} one stage II step, {row['train_layers']} layers, {row['train_tokens']} tokens: "
                f"{row['train_step_s']:.2f} s, {row['train_tokens_per_s']:.0f} tokens/s; peak "
                f"{row['train_peak_gib']:.1f} GiB (training_memory.py predicts {row['train_predicted_gib']:.1f} GiB)"
            )
            continue
        if "serve_ratio" in row:
            print(
                f"{name:12} {row['documents_count']} concurrent clients ({row['serve_tokens']} tokens, "
                f"{row['serve_pictures']} pictures): {row['serve_concurrent_s']:.2f} s; one at a time "
                f"{row['serve_one_at_a_time_s']:.2f} s: {row['serve_ratio']:.2f}x documents/s (goal >= 6)"
            )
            continue
        print(
            f"{name:12} {row['mllm_gb']:8.2f} {row['pipeline_peak_gb']:8.2f} {row['decode_tokens_per_s']:8.1f} "
            f"{row['roofline_tokens_per_s']:9.1f} {row['roofline_fraction']:6.2f} {row['image_seconds']:8.2f}"
        )
        if "documents_ratio" in row:
            print(
                f"{'  documents':12} one document, text only: {row['decode_tokens_per_s']:.1f} tok/s = "
                f"{row['roofline_fraction']:.2f} of the roofline (goal >= 0.70)"
            )
            for key, what in (("documents", "with pictures"), ("documents_text", "text only")):
                print(
                    f"{'':12} {row['documents_count']} documents {what} ({row[key + '_tokens']} tokens, "
                    f"{row[key + '_pictures']} pictures): one call {row[key + '_batched_s']:.2f} s, one call "
                    f"each {row[key + '_one_by_one_s']:.2f} s: {row[key + '_ratio']:.2f}x documents/s "
                    f"(goal >= 6); pictures within {row[key + '_largest_picture_difference']:.1e}"
                )
        if "step_tokens_per_s" in row:
            print(
                f"{'  step only':12} {'':8} {'':8} {row['step_tokens_per_s']:8.1f} {row['roofline_tokens_per_s']:9.1f} "
                f"{row['step_roofline_fraction']:6.2f}   (compiled decode step looped on the device, no generate loop)"
            )
    print(json.dumps({"device": str(device), "tiny": args.tiny, **_null_nans(results)}))


if __name__ == "__main__":
    main()
