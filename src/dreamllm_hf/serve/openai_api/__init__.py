"""An OpenAI-compatible HTTP API for DreamLLM (`dreamllm-hf serve --api`): chat completions whose answers are
documents of text and pictures, and text-to-image, on the continuous-batching [`ServingEngine`].

FastAPI and uvicorn are the `serve` extra (`pip install 'dreamllm-hf[serve]'`). They are imported when the app is
(`build_api_app`), not with this package, so that the command line can read `settings` without them.
"""

import importlib


_LAZY = {
    "build_api_app": ".app",
    "APIError": ".errors",
    "GenerationDefaults": ".protocol",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["APIError", "GenerationDefaults", "build_api_app"]
