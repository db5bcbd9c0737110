"""Benchmark DreamLLMPipeline against its parts, on random models of a few hundred million parameters (no download).

    python benchmarks/bench_pipeline.py [--hidden 1024 --layers 12 --intermediate 2816] [--steps 10] [--repeats 3]

Five ratios, each comparing two runs of the same work (each timing is the best of `--repeats` runs):

* `decode_ratio`: tokens/s of `DreamLLMForConditionalGeneration.generate` / tokens/s of a stock `LlamaForCausalLM`
  with the same weights (goal >= 0.98);
* `image_ratio`: `DreamLLMText2ImagePipeline` time on given embeddings / a bare diffusers loop (UNet + CFG + DDPM +
  VAE decode + postprocess) on the same embeddings (goal <= 1.02);
* `interleaved_ratio`: an interleaved document with 3 pictures / the sum of its parts, each timed alone on the same
  growing cache (per text segment a bare greedy loop of cached forward calls through the model's public API, the
  unconditional, and per picture its dream block, the bare diffusion loop and the CLIP read-back): what the pipeline's
  own orchestration costs (goal <= 1.10);
* `naive_ratio`: the same document / a naive loop that re-runs the whole prefix (and CLIP on every earlier picture)
  after each picture, with `generate` per text segment (below 1 means the cached loop is faster);
* `batched_documents_ratio`: documents/s of 8 documents written in ONE pipeline call / the same 8 documents written one
  call each (goal >= 2.0). The 8 prompts differ in length; each document is seeded by its own generator (seeds 0..7,
  `do_sample=True`) and its tokens are forced by a logits processor that decides every row from that row's tokens
  alone, so it is the same document alone or in the batch, and the two runs are asserted to give the same text and
  pictures within 1e-4. Each document writes `segment + 2 (i % 4)` text tokens, then (even i) `<dream_start>`, then
  `segment / 2 + 3 i` more, then `</s>`: 4 documents draw one picture (two pairs of them at the same step, drawn in one
  UNet batch each), 4 draw none, and they finish at 8 different steps. `segment` is `--batched-segment-tokens`
  (default 48: documents of 87 text tokens on average, the length of a short illustrated paragraph). On 2 CPU cores the
  UNet, VAE and CLIP are compute-bound and gain little from batching (about 1.1x for a pair), so this ratio falls with
  the share of pictures: with 12-token segments (pictures about half of the batched time) it is about 1.7-1.8.

Every document's tokens are forced (`RowScripts`), so every variant writes the same text and pictures. The tokenizer
is the test fixture's (special ids 1000..1007); the vocabulary is 32008 as in the release. The pipeline is driven
through its public API only (`pipe(...)`, `pipe.stream`).

How it times, so that a ratio does not depend on what ran before it or beside it:

* each of the four parts (decode, text-to-image, the interleaved document, the batched documents) runs in a fresh
  Python process of its own (this script with `--part NAME`, which prints that part's JSON), on the same seeded
  components; inside it, both runs are warmed up once, then take turns (A B A B ...), so that a change of load hits
  both;
* those processes run torch's OpenMP threads with `OMP_WAIT_POLICY=PASSIVE` (unless the variable is set): by
  default they spin between operations, and where other processes share the cores, every operation then waits for a
  thread that the scheduler has taken off its core. A 64-token decode on 2 threads took anything from 1.2 s to 39 s
  from one round to the next that way, so the best of 3 rounds was a draw of the other processes' load, not a
  property of either side; with passive threads the rounds stay within 1.6-2.7 s under the same load. Set
  `OMP_WAIT_POLICY=ACTIVE` to time spinning threads on cores of your own.

The last line of the output is one JSON object with the five ratios, the timings they come from and the load average
(1 minute) when each part started and ended.
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from dreamllm_hf import constants as C
from dreamllm_hf.conversion.tokenizer import build_legacy_tokenizer
from dreamllm_hf.pipelines import DreamLLMPipeline, DreamLLMText2ImagePipeline
from dreamllm_hf.testing_utils import (
    config_token_ids,
    tiny_config,
    tiny_model,
    tiny_processor,
    tiny_scheduler,
    tiny_unet,
    tiny_vae,
)


FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "original_tiny"
_FIXTURE_ADDED_TOKENS = json.loads((FIXTURE / "added_tokens.json").read_text())  # its 8 DreamLLM tokens, 1000..1007
BOS, EOS = C.RELEASE_BOS_TOKEN_ID, C.RELEASE_EOS_TOKEN_ID  # LLaMA's SentencePiece layout
PAD, IM_START, IM_END, DREAM_START = (
    _FIXTURE_ADDED_TOKENS[token]
    for token in (C.PAD_TOKEN, C.IMAGE_START_TOKEN, C.IMAGE_END_TOKEN, C.DREAM_START_TOKEN)
)
TEXT_TOKEN = 500  # any ordinary piece of the fixture tokenizer


def fixture_tokenizer():
    """The test fixture's SentencePiece tokenizer (1000 pieces, English), as the converter builds the release's."""
    return build_legacy_tokenizer(FIXTURE / "tokenizer.model", _FIXTURE_ADDED_TOKENS)


class RowScripts(LogitsProcessor):
    """Forces every row's next token from that row's tokens alone, so that it serves `generate`, the pipeline's
    batched document engine and a bare loop alike, whatever rows they hold and however they pad them.

    A row's prompt names its script: the key is the sum of the row's ordinary token ids (3 .. `vocab_end` - 1, the
    fixture tokenizer's pieces, but `text_token`), a checksum of its prompt that padding and picture blocks leave
    alone. How far along its script the row is: the `text_token`s and `<dream_start>`s in it (the engine keeps each
    drawn picture's `<dream_start>` in its rows, as `generate` keeps the tokens it sampled). All on the rows' device,
    without a host sync. A row with an unknown prompt gets some script: the callers check every document's text."""

    def __init__(self, scripts: dict, text_token=TEXT_TOKEN, dream_start=DREAM_START, vocab_end=PAD):
        self.text_token, self.dream_start, self.vocab_end = text_token, dream_start, vocab_end
        keys = sorted(scripts)
        self.width = max(len(script) for script in scripts.values())
        # Scripts padded with their last token (`</s>`): a finished row that is still fed gets it again.
        self.table = torch.tensor([scripts[k] + [scripts[k][-1]] * (self.width - len(scripts[k])) for k in keys])
        self.keys = torch.tensor(keys)

    @staticmethod
    def key(ids, text_token=TEXT_TOKEN, vocab_end=PAD) -> torch.Tensor:
        ordinary = (ids >= 3) & (ids < vocab_end) & (ids != text_token)
        return (ids * ordinary).sum(-1)

    def __call__(self, input_ids, scores):
        if self.table.device != input_ids.device:
            self.table, self.keys = self.table.to(input_ids.device), self.keys.to(input_ids.device)
        key = self.key(input_ids, self.text_token, self.vocab_end)
        script = torch.searchsorted(self.keys, key).clamp(max=self.keys.numel() - 1)
        done = ((input_ids == self.text_token) | (input_ids == self.dream_start)).sum(-1).clamp(max=self.width - 1)
        token = self.table[script, done]
        return torch.full_like(scores, -float("inf")).scatter_(1, token[:, None], 0.0)


def scripted(prompt_ids: dict, scripts: dict, text_token=TEXT_TOKEN, dream_start=DREAM_START, vocab_end=PAD):
    """A `LogitsProcessorList` of one `RowScripts` for `{name: prompt ids}` (as the model reads them: BOS, chat
    template and all) and `{name: script}`."""
    keys = {}
    for name, ids in prompt_ids.items():
        ids = torch.as_tensor(ids)
        if (ids == text_token).any():
            raise ValueError(f"Prompt {name!r} holds the forced text token {text_token}; pick another.")
        keys[name] = int(RowScripts.key(ids, text_token, vocab_end))
    if len(set(keys.values())) != len(keys):
        raise ValueError(f"Two prompts have the same checksum, pick others: {keys}")
    processor = RowScripts({keys[name]: scripts[name] for name in scripts}, text_token, dream_start, vocab_end)
    return LogitsProcessorList([processor])


# The clock every measurement reads: wall time by default; `--clock cpu` reads this process's CPU time instead, which
# load from other processes on a shared machine barely moves (use it with `--threads 1`).
clock_now = time.perf_counter


class Parts(dict):
    """Named seconds of the parts of one run, timed inside it."""


def best_of(fns: dict, repeats: int) -> dict:
    """Best (smallest) seconds of each function over `repeats` rounds, run in turns (A B A B ...) after one untimed
    warm-up each. Other load on the machine only ever adds time, so the minimum is the steadiest estimate. A function
    that returns `Parts` is scored by their sum; the parts of its best round are kept under `"<name>_parts"`."""
    for fn in fns.values():
        fn()
    best = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock_now()
            result = fn()
            seconds = clock_now() - start
            if isinstance(result, Parts):
                seconds = sum(result.values())
            if seconds < best.get(name, float("inf")):
                best[name] = seconds
                if isinstance(result, Parts):
                    best[f"{name}_parts"] = result
    return best


def build(args):
    """The benchmark's pipeline: the factory's components (`dreamllm_hf.testing_utils`) at the sizes of `args`."""
    tokenizer = fixture_tokenizer()
    config = tiny_config(
        text_config=dict(
            vocab_size=C.RELEASE_VOCAB_SIZE,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads,
            max_position_embeddings=2048,
        ),
        vision_config=dict(
            hidden_size=args.vision_hidden,
            intermediate_size=4 * args.vision_hidden,
            num_hidden_layers=args.vision_layers,
            num_attention_heads=args.vision_hidden // 64,
            image_size=224,
            patch_size=14,
            hidden_act="quick_gelu",
        ),
        num_dream_queries=args.queries,
        cross_attention_dim=args.cross_attention_dim,
        **config_token_ids(tokenizer),
    )
    mllm = tiny_model(config)
    mllm.generation_config.update(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False)

    channels = tuple(args.unet_channels)
    unet = tiny_unet(
        cross_attention_dim=args.cross_attention_dim,
        sample_size=args.height // 8,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1),
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = tiny_vae(
        num_blocks=4,
        block_out_channels=(64, 128, 128, 128),
        norm_num_groups=32,
        sample_size=args.height,
    )
    processor = tiny_processor(config, tokenizer=tokenizer)
    pipe = DreamLLMPipeline(mllm=mllm, processor=processor, unet=unet, vae=vae, scheduler=tiny_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count(module):
    return sum(p.numel() for p in module.parameters())


def bench_decode(pipe, args):
    mllm = pipe.mllm
    llama = LlamaForCausalLM(LlamaConfig(**mllm.config.text_config.to_dict())).eval()
    # The very same weight tensors: a copy lands elsewhere in memory and times differently on a CPU (in one profile
    # the same matmuls ran 8 % apart on two copies), which is not what this compares.
    llama.model = mllm.model.language_model
    llama.lm_head = mllm.lm_head
    llama.generation_config.update(**mllm.generation_config.to_dict())
    prompt = torch.randint(3, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
    )
    with torch.no_grad():
        same = torch.equal(mllm.generate(prompt, **kwargs), llama.generate(prompt, **kwargs))
        times = best_of(
            {"dreamllm": lambda: mllm.generate(prompt, **kwargs), "llama": lambda: llama.generate(prompt, **kwargs)},
            args.repeats,
        )
    return {
        "dreamllm_tok_s": args.new_tokens / times["dreamllm"],
        "llama_tok_s": args.new_tokens / times["llama"],
        "same_tokens": same,
    }


def bare_loop(pipe, cond, uncond, steps, height, guidance_scale, seed):
    """Stable Diffusion sampling written with diffusers parts only: what the pipeline adds is measured against it."""
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    latents = torch.randn((1, 4, height // 8, height // 8), generator=generator) * scheduler.init_noise_sigma
    states = torch.cat([uncond, cond])
    for t in scheduler.timesteps:
        noise = unet(scheduler.scale_model_input(torch.cat([latents] * 2), t), t, encoder_hidden_states=states).sample
        noise_uncond, noise_cond = noise.chunk(2)
        noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents, generator=generator).prev_sample
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="pil")


def bench_image(pipe, args):
    text2image = DreamLLMText2ImagePipeline.from_pipe(pipe)  # the same components, not copies
    text2image.set_progress_bar_config(disable=True)
    with torch.no_grad():
        cond = pipe.mllm.get_dream_embeddings(torch.tensor([[BOS, 400, 401, 402]])).dream_embeddings
        uncond = pipe.mllm.get_dream_embeddings(torch.tensor([[BOS]])).dream_embeddings

        def run_pipe():
            return text2image(
                prompt_embeds=cond,
                negative_prompt_embeds=uncond,
                num_inference_steps=args.steps,
                guidance_scale=3.5,
                height=args.height,
                width=args.height,
                generator=torch.Generator().manual_seed(0),
            )

        def run_bare():
            return bare_loop(pipe, cond, uncond, args.steps, args.height, 3.5, 0)

        same = np.array_equal(np.asarray(run_pipe().images[0]), np.asarray(run_bare()[0]))
        times = best_of({"pipeline": run_pipe, "bare": run_bare}, args.repeats)
    return {"pipeline_s": times["pipeline"], "bare_s": times["bare"], "same_image": bool(same)}


def document_script(args):
    """Text, then 3 x (`<dream_start>`, text), then `</s>`."""
    text = [TEXT_TOKEN] * args.segment_tokens
    return text + ([DREAM_START] + text) * 3 + [EOS]


def chat_ids(pipe, prompt: str) -> torch.Tensor:
    """The ids the pipeline feeds for `prompt` (chat template, BOS): `[1, length]`."""
    return pipe.processor(text=[pipe.format_chat_prompt(prompt)], return_tensors="pt")["input_ids"]


def engine_step(mllm, ids, cache, feed: int):
    """One cached decode forward, as a document engine makes it: the last `feed` tokens of `ids` into `cache`, with
    its attention mask over cache + new tokens, explicit positions and `logits_to_keep=1`. Returns next-token logits."""
    length = ids.shape[1]
    out = mllm(
        input_ids=ids[:, length - feed :],
        attention_mask=torch.ones(1, length, dtype=torch.long),
        position_ids=torch.arange(length - feed, length)[None],
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1]


def bare_decode(mllm, ids, cache, processors, feed: int):
    """Greedy decode on `cache` with `engine_step` and nothing else: feeds the last `feed` tokens of
    `ids`, then one token per step until `</s>` or `<dream_start>`. Returns `ids` with the sampled text tokens (not the
    stop token, which is never fed) and the stop token."""
    logits = engine_step(mllm, ids, cache, feed)
    while True:
        token = int(processors(ids, logits).argmax(-1))
        if token in (EOS, DREAM_START):
            return ids, token
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        logits = engine_step(mllm, ids, cache, 1)


def bench_interleaved(pipe, args):
    mllm, config = pipe.mllm, pipe.mllm.config
    prompt = "Write an illustrated story about a fox."
    diffusion = dict(num_inference_steps=args.steps, guidance_scale=3.5, height=args.height, width=args.height)
    script = document_script(args)
    ids = chat_ids(pipe, prompt)
    processors = scripted({"story": ids[0]}, {"story": script})

    def cached_document():
        out = pipe(
            prompt,
            generation_kwargs={"logits_processor": processors},
            max_new_tokens=len(script),
            generator=torch.Generator().manual_seed(0),
            **diffusion,
        )
        assert len(out.images[0]) == 3 and out.stop_reasons == ["eos"], (out.stop_reasons, len(out.images[0]))
        return out

    # A drawn picture in the stream, but its `<im_end>`, which the next decode step feeds (as in the engine).
    block = torch.tensor([pipe.processor.drawn_picture_ids[:-1]])

    def read_back(image, cache):
        """`<im_start>` + the picture's CLIP features into the cache (public model API only)."""
        pixel_values = pipe.processor.image_processor([image], return_tensors="pt")["pixel_values"]
        embeds = torch.cat(
            [
                mllm.get_input_embeddings()(torch.tensor([[IM_START]])),
                mllm.get_image_features(pixel_values).pooler_output,
            ],
            dim=1,
        )
        mask = torch.ones(1, cache.get_seq_length() + embeds.shape[1], dtype=torch.long)
        mllm(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)

    def parts() -> dict:
        """The same document from its parts, each timed alone: per text segment a bare decode loop on the shared
        cache (`engine_step`, `processors`, argmax), the unconditional, and per picture its dream block, the bare
        diffusion loop and the CLIP read-back."""
        spent = Parts()

        @contextlib.contextmanager
        def clock(name):
            start = clock_now()
            yield
            spent[name] = spent.get(name, 0.0) + clock_now() - start

        with clock("uncond"):
            uncond = mllm.get_dream_embeddings(torch.tensor([[BOS]])).dream_embeddings
        cache, stream, feed = DynamicCache(config=config.text_config), ids, ids.shape[1]
        for index in range(4):
            with clock("text"):
                stream, stop = bare_decode(mllm, stream, cache, processors, feed)
            if stop == EOS:
                return spent
            past = torch.ones(1, stream.shape[1], dtype=torch.long)
            with clock("dream_block"):
                cond = mllm.get_dream_embeddings(stream[:, :0], attention_mask=past, cache=cache).dream_embeddings
            with clock("diffusion"):
                image = bare_loop(pipe, cond, uncond, args.steps, args.height, 3.5, index)[0]
            with clock("read_back"):
                read_back(image, cache)
            stream, feed = torch.cat([stream, block, torch.tensor([[IM_END]])], dim=1), 1
        raise AssertionError("the forced script ends in </s>")

    def naive_document():
        """Re-runs the whole prefix (and CLIP on every earlier picture) after each picture, `generate` per segment."""
        stream, pictures, processor = ids, [], pipe.processor
        uncond = mllm.get_dream_embeddings(torch.tensor([[BOS]])).dream_embeddings
        segment = args.segment_tokens + 1
        for index in range(4):
            pixel_values = torch.cat(pictures) if pictures else None
            out = mllm.generate(
                stream,
                attention_mask=torch.ones_like(stream),
                pixel_values=pixel_values,
                max_new_tokens=segment,
                logits_processor=processors,
                eos_token_id=[EOS, DREAM_START],
            )
            if int(out[0, -1]) == EOS:
                return
            stream = out[:, :-1]
            # The whole prefix again; the forward reads every complete dream block, the new one is the last.
            with_block = torch.cat([stream, block[:, : len(pipe.processor.dream_block_ids)]], dim=1)
            cond = mllm(with_block, pixel_values=pixel_values, logits_to_keep=1).dream_embeddings[-1:]
            image = bare_loop(pipe, cond, uncond, args.steps, args.height, 3.5, index)[0]
            pictures.append(processor.image_processor([image], return_tensors="pt")["pixel_values"])
            stream = torch.cat([stream, block, torch.tensor([[IM_END]])], dim=1)
        raise AssertionError("the forced script ends in </s>")

    with torch.no_grad():
        times = best_of({"cached": cached_document, "parts": parts, "naive": naive_document}, args.repeats)
    return {
        "document_s": times["cached"],
        "naive_s": times["naive"],
        "parts_s": times["parts"],
        "parts": times["parts_parts"],
    }


PROMPTS = [
    "Draw a cat.",
    "Describe the sea at night.",
    "Write a short poem about autumn leaves.",
    "Tell a story about a fox who finds a lantern in the woods.",
    "Explain how a lighthouse works, with a picture of one on a rocky coast.",
    "Write a travel diary entry about a small mountain village, its bakery and the old stone bridge over the river.",
    "Describe a busy harbour at dawn: the fishing boats coming in, the gulls, the market stalls being set up and the "
    "smell of salt and diesel in the cold air.",
    "Write an illustrated guide for children about the water cycle: the sun warming the ocean, vapour rising, clouds "
    "forming over the hills, rain falling on the fields and rivers carrying the water back to the sea.",
]


def batched_scripts(segment: int, count: int = 8, text_token=TEXT_TOKEN, dream_start=DREAM_START, eos=EOS):
    """Document i: `segment + 2 (i % 4)` text tokens, then (even i) `<dream_start>`, then `segment // 2 + 3 i` text
    tokens, then `</s>`. Documents 0 and 4 ask for their picture at the same step, as do 2 and 6."""
    scripts = []
    for i in range(count):
        head = [text_token] * (segment + 2 * (i % 4))
        tail = [text_token] * (segment // 2 + 3 * i)
        scripts.append(head + ([dream_start] if i % 2 == 0 else []) + tail + [eos])
    return scripts


def compare_documents(together, alone, tolerance: float | None = 1e-4) -> dict:
    """Asserts that a call of several documents wrote each one's text, stop reason and number of pictures as its own
    call did, and (unless `tolerance` is None) its pictures within `tolerance`; returns the largest picture
    difference (pictures as `output_type="np"`, 0..1)."""
    largest = 0.0
    for index, single in enumerate(alone):
        assert together.text[index] == single.text[0], (index, together.text[index], single.text[0])
        assert together.stop_reasons[index] == single.stop_reasons[0], (index, together.stop_reasons[index])
        pictures, expected = together.images[index], single.images[0]
        assert len(pictures) == len(expected), (index, len(pictures), len(expected))
        for a, b in zip(pictures, expected):
            difference = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max()
            largest = max(largest, float(difference))
    if tolerance is not None:
        assert largest <= tolerance, f"pictures differ by {largest} between the batched call and the single calls"
    return {"largest_picture_difference": largest}


def split_seconds(pipe, prompts, **kwargs) -> dict:
    """Seconds of one call (through `pipe.stream`, the same engine) spent drawing pictures and the rest: a step's
    pictures are timed from its first `picture_start` event to its first `picture` event (the engine conditions, draws,
    decodes and reads back all of them in between); the rest is prefill, decode steps and bookkeeping."""
    start, drawing, since = clock_now(), 0.0, None
    for event in pipe.stream(prompts, **kwargs):
        if event.type == "picture_start" and since is None:
            since = clock_now()
        elif event.type == "picture" and since is not None:
            drawing, since = drawing + clock_now() - since, None
    total = clock_now() - start
    return {"pictures": drawing, "rest": total - drawing}


def bench_batched(pipe, args):
    """8 documents in one call against the same 8 documents one call each."""
    scripts = batched_scripts(args.batched_segment_tokens)
    prompt_ids = {prompt: chat_ids(pipe, prompt)[0] for prompt in PROMPTS}
    processors = scripted(prompt_ids, dict(zip(PROMPTS, scripts)))
    settings = dict(
        max_new_tokens=max(len(s) for s in scripts),
        max_images=1,
        num_inference_steps=args.steps,
        guidance_scale=3.5,
        height=args.height,
        width=args.height,
        do_sample=True,
        generation_kwargs={"logits_processor": processors},
        output_type="np",
    )

    def call(indices):
        generators = [torch.Generator().manual_seed(i) for i in indices]
        return pipe([PROMPTS[i] for i in indices], generator=generators, **settings)

    def together():
        return call(range(len(PROMPTS)))

    def one_by_one():
        return [call([i]) for i in range(len(PROMPTS))]

    with torch.no_grad():
        batched, alone = together(), one_by_one()
        check = compare_documents(batched, alone)
        for index, script in enumerate(scripts):
            assert batched.stop_reasons[index] == "eos", batched.stop_reasons
            assert len(batched.images[index]) == script.count(DREAM_START), (index, len(batched.images[index]))
            # Every text token is the same piece: the document's text is that piece as many times as forced.
            piece = pipe.tokenizer.decode([TEXT_TOKEN])
            assert batched.text[index].replace("\n", "") == piece * script.count(TEXT_TOKEN), batched.text[index]
        times = best_of({"together": together, "one_by_one": one_by_one}, args.repeats)
        # Where the time goes (one more untimed round, through the events).
        split_together = split_seconds(
            pipe, PROMPTS, generator=[torch.Generator().manual_seed(i) for i in range(len(PROMPTS))], **settings
        )
        split_alone = {"pictures": 0.0, "rest": 0.0}
        for i, prompt in enumerate(PROMPTS):
            part = split_seconds(pipe, [prompt], generator=[torch.Generator().manual_seed(i)], **settings)
            split_alone = {k: split_alone[k] + part[k] for k in split_alone}
    count = len(PROMPTS)
    return {
        "documents": count,
        "pictures": sum(s.count(DREAM_START) for s in scripts),
        "tokens": sum(len(s) for s in scripts),
        "together_s": times["together"],
        "one_by_one_s": times["one_by_one"],
        "together_docs_s": count / times["together"],
        "one_by_one_docs_s": count / times["one_by_one"],
        "split_together_s": split_together,
        "split_one_by_one_s": split_alone,
        **check,
    }


PARTS = ("decode", "image", "interleaved", "batched")


def run_part(name: str, args) -> dict:
    """One part in this process: the pipeline built (the factory is seeded: the same weights in every process), then
    the part's compared runs, each warmed up once and then timed in turns."""
    pipe = build(args)
    bench = {"decode": bench_decode, "image": bench_image, "interleaved": bench_interleaved, "batched": bench_batched}
    result = bench[name](pipe, args)
    language_model, vision_tower = pipe.mllm.model.language_model, pipe.mllm.model.vision_tower
    result["params_m"] = {
        "mllm": count(pipe.mllm) / 1e6,
        "llm": count(language_model) / 1e6,
        "clip": count(vision_tower) / 1e6,
        "unet": count(pipe.unet) / 1e6,
        "vae": count(pipe.vae) / 1e6,
    }
    result["threads"] = torch.get_num_threads()
    return result


def run_parts_apart(argv: list[str]) -> dict:
    """Every part in a fresh Python process of its own (this script with `--part NAME` and the same options), one
    after the other, with passive OpenMP threads unless `OMP_WAIT_POLICY` is set (see the module docstring): no
    part's timings depend on what an earlier part left behind in the process."""
    results = {}
    start = time.perf_counter()
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    for name in PARTS:
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--part", name]
        load_before = os.getloadavg()[0]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)  # its stderr passes through
        if done.returncode != 0:
            raise SystemExit(f"The {name} part failed with exit status {done.returncode} (its error is above).")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        results[name]["load_1min"] = [load_before, os.getloadavg()[0]]
        print(f"{name} done ({time.perf_counter() - start:.0f} s)", flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vision-hidden", type=int, default=512)
    parser.add_argument("--vision-layers", type=int, default=8)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--cross-attention-dim", type=int, default=768)
    parser.add_argument("--unet-channels", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--height", type=int, default=128, help="picture size (latents are height / 8)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--segment-tokens", type=int, default=12, help="text tokens before/after each picture")
    parser.add_argument(
        "--batched-segment-tokens", type=int, default=48, help="batched_documents_ratio: text tokens per segment"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="what the timings measure")
    parser.add_argument(
        "--part",
        choices=PARTS,
        default=None,
        help="run only this part, in this process, and print its JSON (what the full run does in a fresh process per "
        "part)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock_now
    clock_now = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.part is not None:
        print(json.dumps(run_part(args.part, args)))
        return

    start = time.perf_counter()
    parts = run_parts_apart(sys.argv[1:])
    sizes, threads = parts["decode"]["params_m"], parts["decode"]["threads"]
    for part in parts.values():  # the same in every part's process
        del part["params_m"], part["threads"]
    decode, image, interleaved, batched = (parts[name] for name in PARTS)
    print(
        f"parameters (M): mllm {sizes['mllm']:.0f} (LLM {sizes['llm']:.0f}, CLIP {sizes['clip']:.0f}), unet "
        f"{sizes['unet']:.0f}, vae {sizes['vae']:.0f}; threads {threads} "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}); clock {args.clock}; each part in a fresh "
        "process; load average (1 min) at its start and end: "
        + ", ".join(f"{name} {parts[name]['load_1min'][0]:.2f} -> {parts[name]['load_1min'][1]:.2f}" for name in PARTS)
    )
    result = {
        "decode_ratio": decode["dreamllm_tok_s"] / decode["llama_tok_s"],
        "image_ratio": image["pipeline_s"] / image["bare_s"],
        "interleaved_ratio": interleaved["document_s"] / interleaved["parts_s"],
        "naive_ratio": interleaved["document_s"] / interleaved["naive_s"],
        "batched_documents_ratio": batched["together_docs_s"] / batched["one_by_one_docs_s"],
    }

    rows = [
        (
            "decode tok/s: DreamLLM vs stock Llama",
            f"{decode['dreamllm_tok_s']:.1f} vs {decode['llama_tok_s']:.1f}",
            result["decode_ratio"],
            ">= 0.98",
        ),
        (
            "text-to-image s: pipeline vs bare loop",
            f"{image['pipeline_s']:.3f} vs {image['bare_s']:.3f}",
            result["image_ratio"],
            "<= 1.02",
        ),
        (
            "3-picture document s: cached vs parts",
            f"{interleaved['document_s']:.2f} vs {interleaved['parts_s']:.2f}",
            result["interleaved_ratio"],
            "<= 1.10",
        ),
        (
            "3-picture document s: cached vs naive",
            f"{interleaved['document_s']:.2f} vs {interleaved['naive_s']:.2f}",
            result["naive_ratio"],
            "< 1",
        ),
        (
            f"{batched['documents']} documents docs/s: 1 call vs {batched['documents']}",
            f"{batched['together_docs_s']:.3f} vs {batched['one_by_one_docs_s']:.3f}",
            result["batched_documents_ratio"],
            ">= 2.0",
        ),
    ]
    print(f"{'measure':<42} {'figures':>22} {'ratio':>7}  goal")
    for name, figures, ratio, goal in rows:
        print(f"{name:<42} {figures:>22} {ratio:>7.3f}  {goal}")
    print("parts (s): " + ", ".join(f"{k} {v:.3f}" for k, v in interleaved["parts"].items()))
    print(
        f"{batched['documents']} documents ({batched['tokens']} tokens, {batched['pictures']} pictures): "
        f"{batched['together_s']:.2f} s in one call, {batched['one_by_one_s']:.2f} s one call each; same text, "
        f"pictures within {batched['largest_picture_difference']:.1e}"
    )
    together, alone = batched["split_together_s"], batched["split_one_by_one_s"]
    print(
        f"  split (s, one more run): one call: text and the rest {together['rest']:.2f}, pictures "
        f"{together['pictures']:.2f}; one call each: text and the rest {alone['rest']:.2f}, pictures "
        f"{alone['pictures']:.2f}"
    )
    print(
        f"same tokens as stock Llama: {decode['same_tokens']}; same picture as the bare loop: {image['same_image']}; "
        f"total {time.perf_counter() - start:.0f} s"
    )
    result.update(
        params_m=sizes,
        threads=threads,
        decode=decode,
        image=image,
        interleaved={k: v for k, v in interleaved.items() if k != "parts"},
        parts=interleaved["parts"],
        batched=batched,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
