"""Benchmark the OpenAI-compatible API (`dreamllm-hf serve --api`) on the shipped demo model, with the openai client.

    python benchmarks/bench_serve.py [--concurrency 1 2 4 8] [--repeats 2] [--steps 25]
    python benchmarks/bench_serve.py --base-url http://127.0.0.1:8000/v1   # a server already running (see below)

It starts the API server in a subprocess (`dreamllm-hf serve --api` on a free port), then sends the same 8 requests
from 1, 2, 4 and 8 concurrent openai clients (threads, each with its own client; streaming, so that the time to the
first token is seen). The 8 requests are sampled (temperature 1, each with its own seed), prompts of different
lengths (a bare request, one behind a long system prompt, a picture sent in): four stories that draw pictures (the
demo model draws one to three, each of `--steps` denoising steps), two text stories of 96 tokens, two questions
about a picture (short answers). Per concurrency it prints documents/s, completion tokens/s, and the time to first token and the
end-to-end latency (p50 / p95 over the 8 requests, best round of `--repeats`).

Two ratios (goals of issue 23):

* `concurrency_ratio`: documents/s with 8 concurrent clients / documents/s one request at a time (goal >= 2.0): the
  engine writes the documents of concurrent requests together (continuous batching);
* `server_vs_direct`: the 8 requests one at a time through the server / the same 8 calls of the pipeline in this
  process (`DreamLLMPipeline.__call__`, same seeds and settings), in time (goal <= 1.10): what HTTP, JSON, PNG
  encoding and the engine cost. `server_vs_direct_batched` compares 8 concurrent clients with the 8 documents
  submitted at once to a `DocumentWriter` in this process. The documents are checked equal to the direct ones.

The server denoises continuously (`DocumentWriter(denoising="continuous")`): the pictures being drawn share one UNet
call per step whenever their documents asked for them, and the other documents write on meanwhile. What bounds the
gain is a document's own pictures, which are drawn one after the other: a story with three pictures of 25 steps needs
75 UNet calls in a row, however many documents ride along. `--max-images N` caps the pictures per document (default
4, more than the demo model draws) to show that bound; `--no-pictures` writes the same 8 prompts as text answers of
96 tokens, where only the text decoding is batched.

Timings take turns (server, direct, server, ...) so that other load on the machine hits both; on a shared 2-core
machine they move by 10-20 % between runs.

`--base-url` points the clients at a server that is already running (a Ray Serve deployment, say) instead of starting
one; the direct runs still load the model here (`--model`), so that the ratios compare the two (`--no-direct` skips
them). The last line is one JSON object.

`--ray` also deploys the API as one Ray Serve replica (`dreamllm-hf serve --api --ray --replicas 1`, on a local Ray
started here) and sends the same rounds to it, in turn with the plain server: `ray_vs_server_cN` is its time over the
server's at N concurrent clients (goal <= 1.10), what Ray's HTTP proxy and its hop to the replica cost;
`same_text_ray` checks the documents are the server's.
"""

import argparse
import dataclasses
import json
import os
import queue
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import openai
import torch

from dreamllm_hf.pipelines import DocumentRequest, DocumentWriter, DreamLLMPipeline
from dreamllm_hf.serve.openai_api.pictures import png_data_url
from dreamllm_hf.shapes_world import draw_shape, sample_spec
from dreamllm_hf.shapes_world.demo_model_path import DEMO_GUIDANCE_SCALE, DEMO_MODEL_PATH, DEMO_NUM_INFERENCE_STEPS


API_KEY = "bench"
STORY = "Tell me a story."
QUESTION = "What is in the picture?"


@dataclass
class Workload:
    """One request: its messages (pictures as PIL, sent as data URLs), seed and settings."""

    messages: list
    seed: int
    pictures: bool = True
    max_tokens: int = 96


def workload() -> list[Workload]:
    """The 8 requests: stories with pictures, text answers and picture questions, prompts of different lengths."""
    rng = random.Random(0)
    circle = draw_shape(sample_spec(rng, colour="red", shape="circle"))
    square = draw_shape(sample_spec(rng, colour="blue", shape="square"))
    system = {"role": "system", "content": "You tell short illustrated stories about coloured shapes. " * 4}
    return [
        Workload([{"role": "user", "content": STORY}], seed=0),
        Workload([{"role": "user", "content": STORY}], seed=1, pictures=False, max_tokens=96),
        Workload([system, {"role": "user", "content": STORY}], seed=2),
        Workload([{"role": "user", "content": [circle, QUESTION]}], seed=3, pictures=False, max_tokens=32),
        Workload([{"role": "user", "content": STORY}], seed=4),
        Workload([system, {"role": "user", "content": STORY}], seed=5, pictures=False, max_tokens=96),
        Workload([{"role": "user", "content": STORY}], seed=6),
        Workload([{"role": "user", "content": [square, QUESTION]}], seed=7, pictures=False, max_tokens=32),
    ]


def api_messages(messages: list) -> list:
    def part(item):
        if isinstance(item, str):
            return {"type": "text", "text": item}
        return {"type": "image_url", "image_url": {"url": png_data_url(item)}}

    return [
        {
            "role": m["role"],
            "content": m["content"] if isinstance(m["content"], str) else [part(i) for i in m["content"]],
        }
        for m in messages
    ]


def pipeline_messages(messages: list) -> list:
    return [
        {
            "role": m["role"],
            "content": m["content"]
            if isinstance(m["content"], str)
            else [i if isinstance(i, str) else {"type": "image", "image": i} for i in m["content"]],
        }
        for m in messages
    ]


# ---------------------------------------------------------------------------------------------------------------------
# The server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ray_replica(model: str | None, max_queue: int, threads: int) -> str:
    """One Ray Serve replica of the API (`serve --api --ray --replicas 1`) on a local Ray of 2 CPUs started here;
    returns its base URL once it answers. Stop it with `stop_ray()`."""
    import logging

    import ray

    from dreamllm_hf.serve.ray_deployment import serve_on_ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the replica's torch threads, as the plain server's
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    port = free_port()
    serve_on_ray(model, port=port, replicas=1, api_key=API_KEY, max_queue=max_queue, blocking=False)
    return f"http://127.0.0.1:{port}/v1"


def stop_ray() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def start_server(model: str | None, max_queue: int, threads: int) -> tuple[str, subprocess.Popen]:
    """`dreamllm-hf serve --api` in a subprocess on a free port (`threads` torch threads); returns its base URL once
    it answers."""
    port = free_port()
    command = [sys.executable, "-m", "dreamllm_hf.cli", "serve", "--api", "--port", str(port)]
    command += ["--max-queue", str(max_queue)] + (["--model", model] if model else [])
    env = dict(os.environ, DREAMLLM_API_KEY=API_KEY, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would stall the server's logging
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=5)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited: {log.read()[-3000:]}")
        try:
            client.models.list()
            return f"http://127.0.0.1:{port}/v1", process
        except openai.APIConnectionError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not start within 300 s")


# ---------------------------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Result:
    texts: list = field(default_factory=list)  # the document's text segments (between its pictures)
    pictures: int = 0
    completion_tokens: int = 0
    first_token_s: float = float("nan")
    latency_s: float = float("nan")


@dataclass
class Round:
    wall_s: float
    results: list = field(default_factory=list)

    @property
    def documents_per_s(self) -> float:
        return len(self.results) / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return sum(r.completion_tokens for r in self.results) / self.wall_s


def send(client: openai.OpenAI, model: str, request: Workload, settings: dict) -> Result:
    result, start, after_picture = Result(), time.perf_counter(), False
    stream = client.chat.completions.create(
        model=model,
        messages=api_messages(request.messages),
        seed=request.seed,
        temperature=1.0,
        max_tokens=request.max_tokens,
        modalities=["text", "image"] if request.pictures else ["text"],
        stream=True,
        extra_body=settings,
    )
    for chunk in stream:
        if chunk.usage is not None:
            result.completion_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            content = choice.delta.content
            if content and result.first_token_s != result.first_token_s:  # the first text or picture
                result.first_token_s = time.perf_counter() - start
            if isinstance(content, str) and content:
                if result.texts and not after_picture:
                    result.texts[-1] += content
                else:
                    result.texts.append(content)
                after_picture = False
            elif content:
                result.pictures += len(content)
                after_picture = True
    result.latency_s = time.perf_counter() - start
    return result


def run_server_round(base_url: str, model: str, requests: list[Workload], concurrency: int, settings: dict) -> Round:
    """The requests from `concurrency` clients at once (made, and connected, before the clock starts)."""
    clients = queue.Queue()
    for _ in range(concurrency):
        client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=600)
        client.models.list()  # its connection opened
        clients.put(client)

    def one(request):
        client = clients.get()
        try:
            return send(client, model, request, settings)
        finally:
            clients.put(client)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: time.sleep(0.01), range(concurrency)))  # the threads started
        start = time.perf_counter()
        results = list(pool.map(one, requests))
        wall = time.perf_counter() - start
    while not clients.empty():
        clients.get().close()
    return Round(wall, results)


def run_direct_round(pipe, requests: list[Workload], settings: dict) -> Round:
    """The requests one `pipe(...)` call each, in this process."""
    results, start = [], time.perf_counter()
    for request in requests:
        begin = time.perf_counter()
        out = pipe(
            pipeline_messages(request.messages),
            generator=[torch.Generator("cpu").manual_seed(request.seed)],
            do_sample=True,
            temperature=1.0,
            max_new_tokens=request.max_tokens,
            allow_images=request.pictures,
            **settings,
        )
        results.append(document_result(out.documents[0], latency_s=time.perf_counter() - begin))
    return Round(time.perf_counter() - start, results)


def run_direct_batched_round(pipe, requests: list[Workload], settings: dict) -> Round:
    """The 8 requests submitted at once to a `DocumentWriter` in this process, denoising as the engine does."""
    start = time.perf_counter()
    writer = DocumentWriter(pipe, denoising="continuous")
    ids = [
        writer.submit(
            DocumentRequest(
                pipeline_messages(r.messages),
                generator=torch.Generator("cpu").manual_seed(r.seed),
                do_sample=True,
                temperature=1.0,
                max_new_tokens=r.max_tokens,
                allow_images=r.pictures,
                **settings,
            )
        )
        for r in requests
    ]
    ends = {}
    while writer.has_work:
        for event in writer.step():
            if event.type == "document_end":
                ends[event.document] = event
    wall = time.perf_counter() - start
    results = []
    for document in ids:
        results.append(document_result(ends[document].output.documents[0]))
    return Round(wall, results)


def document_result(document: list, latency_s: float = float("nan")) -> Result:
    texts = [segment for segment in document if isinstance(segment, str)]
    return Result(texts=texts, pictures=len(document) - len(texts), latency_s=latency_s)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return statistics.quantiles(ordered, n=100, method="inclusive")[q - 1] if len(ordered) > 1 else ordered[0]


def summary(round_: Round) -> dict:
    first = [r.first_token_s for r in round_.results]
    latency = [r.latency_s for r in round_.results]
    return {
        "wall_s": round(round_.wall_s, 3),
        "documents_per_s": round(round_.documents_per_s, 3),
        "tokens_per_s": round(round_.tokens_per_s, 1),
        "ttft_p50_s": round(percentile(first, 50), 3),
        "ttft_p95_s": round(percentile(first, 95), 3),
        "latency_p50_s": round(percentile(latency, 50), 3),
        "latency_p95_s": round(percentile(latency, 95), 3),
        "pictures": sum(r.pictures for r in round_.results),
        "completion_tokens": sum(r.completion_tokens for r in round_.results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="A pipeline folder (default: the shipped demo model).")
    parser.add_argument("--base-url", default=None, help="An API server already running (its .../v1 address).")
    parser.add_argument("--served-model", default=None, help="The model name that server answers to.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=2, help="Rounds per measurement (the best one is kept).")
    parser.add_argument("--steps", type=int, default=DEMO_NUM_INFERENCE_STEPS, help="Denoising steps a picture.")
    parser.add_argument("--guidance-scale", type=float, default=DEMO_GUIDANCE_SCALE)
    parser.add_argument("--no-direct", action="store_true", help="Skip the runs of the pipeline in this process.")
    parser.add_argument("--max-images", type=int, default=4, help="The most pictures a document may draw.")
    parser.add_argument(
        "--no-pictures",
        action="store_true",
        help="The same 8 prompts as text answers of 96 tokens (the stories' pictures off, the questions' answers "
        "allowed as long): how far the batching goes where no picture is drawn.",
    )
    parser.add_argument(
        "--ray", action="store_true", help="Also time one Ray Serve replica of the API against the plain server."
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the server and of the direct runs (default 1: on a shared 2-core machine two OpenMP "
        "threads spin against the server's other threads and the timings swing by several times).",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    requests = workload()
    if args.no_pictures:
        requests = [dataclasses.replace(r, pictures=False, max_tokens=96) for r in requests]
    settings = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "max_images": args.max_images,
    }
    process, ray_url = None, None
    if args.base_url is None:
        base_url, process = start_server(args.model, max_queue=64, threads=args.threads)
    else:
        base_url = args.base_url
    try:
        if args.ray:
            ray_url = start_ray_replica(args.model, max_queue=64, threads=args.threads)
        model = args.served_model or openai.OpenAI(base_url=base_url, api_key=API_KEY).models.list().data[0].id
        pipe = None
        if not args.no_direct:
            pipe = DreamLLMPipeline.from_pretrained(args.model or DEMO_MODEL_PATH, dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)
        run_server_round(base_url, model, requests[:2], 2, settings)  # warm-up: first calls, caches
        if ray_url is not None:
            run_server_round(ray_url, model, requests[:2], 2, settings)
        if pipe is not None:
            run_direct_round(pipe, requests[:2], settings)

        best: dict[str, Round] = {}

        def keep(name, round_):
            if name not in best or round_.wall_s < best[name].wall_s:
                best[name] = round_

        for _ in range(args.repeats):
            for concurrency in args.concurrency:
                keep(f"server_c{concurrency}", run_server_round(base_url, model, requests, concurrency, settings))
                if ray_url is not None:
                    keep(f"ray_c{concurrency}", run_server_round(ray_url, model, requests, concurrency, settings))
                if pipe is not None and concurrency == 1:
                    keep("direct", run_direct_round(pipe, requests, settings))
                if pipe is not None and concurrency == max(args.concurrency):
                    keep("direct_batched", run_direct_batched_round(pipe, requests, settings))
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
        if ray_url is not None:
            stop_ray()

    report = {name: summary(round_) for name, round_ in best.items()}
    print(
        f"{'run':>16} {'docs/s':>8} {'tok/s':>8} {'TTFT p50':>9} {'p95':>7} {'latency p50':>12} {'p95':>7} {'wall':>7}"
    )
    for name, numbers in report.items():
        print(
            f"{name:>16} {numbers['documents_per_s']:8.3f} {numbers['tokens_per_s']:8.1f} {numbers['ttft_p50_s']:9.3f} "
            f"{numbers['ttft_p95_s']:7.3f} {numbers['latency_p50_s']:12.3f} {numbers['latency_p95_s']:7.3f} "
            f"{numbers['wall_s']:7.2f}"
        )
    low, high = min(args.concurrency), max(args.concurrency)
    ratios = {}
    if f"server_c{low}" in best and f"server_c{high}" in best:
        ratios["concurrency_ratio"] = best[f"server_c{high}"].documents_per_s / best[f"server_c{low}"].documents_per_s
    if "direct" in best and "server_c1" in best:
        ratios["server_vs_direct"] = best["server_c1"].wall_s / best["direct"].wall_s
        same = [a.texts == b.texts for a, b in zip(best["server_c1"].results, best["direct"].results)]
        ratios["same_text_as_direct"] = all(same)
    if "direct_batched" in best and f"server_c{high}" in best:
        ratios["server_vs_direct_batched"] = best[f"server_c{high}"].wall_s / best["direct_batched"].wall_s
        same = [a.texts == b.texts for a, b in zip(best[f"server_c{high}"].results, best["direct_batched"].results)]
        ratios["same_text_batched"] = all(same)
    if ray_url is not None:
        for concurrency in args.concurrency:
            ratios[f"ray_vs_server_c{concurrency}"] = (
                best[f"ray_c{concurrency}"].wall_s / best[f"server_c{concurrency}"].wall_s
            )
        same = [
            a.texts == b.texts
            for c in args.concurrency
            for a, b in zip(best[f"ray_c{c}"].results, best[f"server_c{c}"].results)
        ]
        ratios["same_text_ray"] = all(same)
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}")
    print(json.dumps({"settings": settings, "runs": report, **ratios}))


if __name__ == "__main__":
    main()
