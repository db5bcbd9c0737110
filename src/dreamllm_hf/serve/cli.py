"""`dreamllm-hf serve`: the web page on the shipped demo model or any DreamLLM pipeline folder; with `--api`, the
OpenAI-compatible HTTP API instead."""

import argparse
import os
import sys
from pathlib import Path

from .. import checks
from .engine import DEFAULT_MAX_QUEUE
from .openai_api.settings import API_KEY_ENV, DEFAULT_MAX_REQUEST_MB, DEFAULT_PORT


PAGE_PORT = 7860


class _StoreGiven(argparse.Action):
    """Stores the option and notes that it was given (`port_given`): the default port depends on `--api`."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.port_given = True


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="A web page (Gradio) where DreamLLM writes and draws documents in a conversation, live; or (--api) an "
        "OpenAI-compatible HTTP API.",
        description="Starts a Gradio app on a DreamLLM pipeline folder (default: the shipped demo model; needs the "
        "`demo` extra: pip install 'dreamllm-hf[demo]'). With --api, an OpenAI-compatible API instead "
        "(POST /v1/chat/completions, POST /v1/images/generations, GET /v1/models, GET /health; needs the `serve` "
        "extra: pip install 'dreamllm-hf[serve]'). See docs/api.md.",
    )
    parser.add_argument("--model", default=None, help="A pipeline folder (default: the shipped demo model).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
    parser.add_argument(
        "--port",
        type=checks.PORT.parse,
        default=PAGE_PORT,
        action=_StoreGiven,
        help=f"Port to listen on (default: {PAGE_PORT}; with --api, {DEFAULT_PORT}).",
    )
    parser.add_argument("--share", action="store_true", help="Also open a temporary public gradio.live link.")
    parser.add_argument(
        "--device", default=None, help="cuda, cpu, ... (default: cuda when available, in float16; else cpu, float32)"
    )
    api = parser.add_argument_group("the OpenAI-compatible API (--api)")
    api.add_argument("--api", action="store_true", help="Serve the OpenAI-compatible HTTP API instead of the page.")
    api.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        metavar="KEY",
        help=f"Clients must send `Authorization: Bearer KEY` (default: ${API_KEY_ENV}; none: no key needed). "
        "The variable keeps the key out of the process list.",
    )
    api.add_argument(
        "--max-queue",
        type=checks.POSITIVE_INT.parse,
        default=DEFAULT_MAX_QUEUE,
        metavar="N",
        help="The most documents waiting or being written at once; past it requests get 429 (default: %(default)s).",
    )
    api.add_argument(
        "--max-request-mb",
        type=checks.POSITIVE_NUMBER.parse,
        default=DEFAULT_MAX_REQUEST_MB,
        metavar="M",
        help="The largest request body in MiB, pictures included; past it requests get 413 (default: %(default)s).",
    )
    ray = parser.add_argument_group("Ray Serve (--api --ray): replicas on the GPUs of one machine or a Ray cluster")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="Deploy the API as Ray Serve replicas, each with the whole pipeline and its own scheduler, behind one "
        "address (a local Ray, or the cluster at $RAY_ADDRESS). See docs/ray_serve.md.",
    )
    ray.add_argument(
        "--replicas",
        type=checks.POSITIVE_INT.parse,
        default=None,
        metavar="N",
        help="Replicas Ray keeps (default: 1).",
    )
    ray.add_argument(
        "--gpus-per-replica",
        type=checks.GPUS_PER_REPLICA.parse,
        default=None,
        metavar="G",
        help="GPUs Ray reserves for each replica: 1, 0.5 (two replicas share a GPU), 0 (on the CPU) (default: 1 where "
        "the Ray cluster has GPUs, else 0).",
    )
    parser.set_defaults(func=run_serve, parser=parser, port_given=False)
    return parser


def load_pipeline(model_dir: str | os.PathLike, device: str | None = None):
    import torch

    from ..pipelines import DreamLLMPipeline

    if not (Path(model_dir) / "model_index.json").is_file():
        raise SystemExit(
            f"error: {model_dir} has no model_index.json; give a folder written by `dreamllm-hf convert`, "
            "`dreamllm-hf train-demo` or `DreamLLMPipeline.save_pretrained`."
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    pipe = DreamLLMPipeline.from_pretrained(model_dir, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def serve(
    model_dir: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = PAGE_PORT,
    share: bool = False,
    device: str | None = None,
    block: bool = True,
):
    """
    Launches the page on `model_dir` (default: the shipped demo model, with its sampling settings). With `block=False`
    it returns the running `gr.Blocks` (stop it with `.close()`); otherwise it serves until interrupted.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry
    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise SystemExit("error: the web page needs Gradio: pip install 'dreamllm-hf[demo]'") from error
    from ..shapes_world.demo_model_path import DEMO_MODEL_PATH
    from .app import PageDefaults, build_app

    model_dir = Path(model_dir or DEMO_MODEL_PATH)
    is_demo = model_dir.resolve() == DEMO_MODEL_PATH.resolve()
    pipe = load_pipeline(model_dir, device)
    if is_demo:
        defaults = PageDefaults.for_demo_model()
        description = (
            "The shipped demo model: a tiny DreamLLM that knows a world of coloured shapes (32×32 pictures). Ask it "
            "*Tell me a story.*, or attach a picture of a shape and ask *What is in the picture?*"
        )
    else:
        defaults, description = PageDefaults(), f"Model: `{model_dir}`"
    app = build_app(pipe, defaults, title="DreamLLM", description=description)
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block)
    return app


def run_serve(args: argparse.Namespace) -> int:
    if not args.ray and (args.replicas is not None or args.gpus_per_replica is not None):
        checks.usage_error(args, "--replicas and --gpus-per-replica are options of --ray; add --api --ray.")
    if args.ray and not args.api:
        checks.usage_error(args, "--ray deploys the API; add --api (the web page runs on one process).")
    if args.api:
        return run_api(args)
    if args.api_key is not None and os.environ.get(API_KEY_ENV) != args.api_key:
        checks.usage_error(args, "--api-key is an option of the API; add --api (the web page has no key).")
    serve(args.model, host=args.host, port=args.port, share=args.share, device=args.device)
    return 0


def build_api(args: argparse.Namespace):
    """The API app of `serve --api` (its model loaded), from the parsed options."""
    try:
        from .openai_api import build_api_app
        from .openai_api.protocol import GenerationDefaults
    except ImportError as error:
        raise SystemExit(f"error: the API needs FastAPI: pip install 'dreamllm-hf[serve]' ({error})") from error
    from ..shapes_world.demo_model_path import DEMO_MODEL_PATH

    model_dir = Path(args.model or DEMO_MODEL_PATH)
    is_demo = model_dir.resolve() == DEMO_MODEL_PATH.resolve()
    pipe = load_pipeline(model_dir, args.device)
    defaults = GenerationDefaults.for_demo_model() if is_demo else GenerationDefaults()
    return build_api_app(
        pipe,
        api_key=args.api_key,
        max_queue=args.max_queue,
        max_request_mb=args.max_request_mb,
        model_name="dreamllm-demo" if is_demo else model_dir.name,
        defaults=defaults,
    )


def run_api(args: argparse.Namespace) -> int:
    """`serve --api`: the API under uvicorn on one process. (A `--ray` mode that deploys the same app as Ray Serve
    replicas branches off here.)"""
    try:
        import uvicorn
    except ImportError as error:
        raise SystemExit("error: the API needs uvicorn: pip install 'dreamllm-hf[serve]'") from error
    if args.share:
        checks.usage_error(args, "--share is an option of the web page, not of --api.")
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(
            f"warning: serving on {args.host} without --api-key: anyone who can reach this address can use the model.",
            file=sys.stderr,
        )
    if args.ray:
        return run_api_on_ray(args)
    app = build_api(args)
    uvicorn.run(app, host=args.host, port=args.port if args.port_given else DEFAULT_PORT, log_level="info")
    return 0


def run_api_on_ray(args: argparse.Namespace) -> int:
    """`serve --api --ray`: the same API as Ray Serve replicas (`serve.ray_deployment`), until interrupted."""
    try:
        from .ray_deployment import serve_on_ray
    except ImportError as error:
        raise SystemExit(f"error: --ray needs Ray Serve: pip install 'dreamllm-hf[serve]' ({error})") from error
    try:
        serve_on_ray(
            args.model,
            host=args.host,
            port=args.port if args.port_given else DEFAULT_PORT,
            replicas=args.replicas or 1,
            gpus_per_replica=args.gpus_per_replica,
            device=args.device,
            api_key=args.api_key,
            max_queue=args.max_queue,
            max_request_mb=args.max_request_mb,
        )
    except ValueError as error:  # a model folder that is none, found before Ray starts
        checks.usage_error(args, str(error))
    return 0


__all__ = ["add_serve_parser", "build_api", "load_pipeline", "run_api", "run_api_on_ray", "run_serve", "serve"]
