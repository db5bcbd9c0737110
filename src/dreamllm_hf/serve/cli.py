"""`dreamllm-hf serve`: the web page on the shipped demo model or any DreamLLM pipeline folder."""

import argparse
import os
from pathlib import Path

from .. import checks


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="A web page (Gradio) where DreamLLM writes and draws documents in a conversation, live.",
        description="Starts a Gradio app on a DreamLLM pipeline folder (default: the shipped demo model). Needs the "
        "`demo` extra: pip install 'dreamllm-hf[demo]'.",
    )
    parser.add_argument("--model", default=None, help="A pipeline folder (default: the shipped demo model).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
    parser.add_argument("--port", type=checks.PORT.parse, default=7860, help="Port to listen on.")
    parser.add_argument("--share", action="store_true", help="Also open a temporary public gradio.live link.")
    parser.add_argument(
        "--device", default=None, help="cuda, cpu, ... (default: cuda when available, in float16; else cpu, float32)"
    )
    parser.set_defaults(func=run_serve)
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
    port: int = 7860,
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
    serve(args.model, host=args.host, port=args.port, share=args.share, device=args.device)
    return 0


__all__ = ["add_serve_parser", "load_pipeline", "run_serve", "serve"]
