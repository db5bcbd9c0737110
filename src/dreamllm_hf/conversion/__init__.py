"""Original DreamLLM release -> Hugging Face layout, its verification and upload (its model card:
`dreamllm_hf.model_card`).

The names are imported on first use.
"""

import importlib


_EXPORTS = {
    "ConversionSummary": ".convert_dreamllm_original_to_hf",
    "convert_original_checkpoint": ".convert_dreamllm_original_to_hf",
    "HubPushError": ".hub",
    "push_to_hub": ".hub",
    "OriginalCheckpointError": ".original_layout",
    "VerificationError": ".verify",
    "VerificationReport": ".verify",
    "verify_conversion": ".verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
