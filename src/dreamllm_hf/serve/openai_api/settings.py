"""The API's defaults, importable without FastAPI (the command line's options and help read them)."""

DEFAULT_MAX_REQUEST_MB = 20  # the largest request body, pictures included (413 past it)
DEFAULT_MODEL_NAME = "dreamllm"  # the served model's name in `GET /v1/models` and the answers
DEFAULT_PORT = 8000
API_KEY_ENV = "DREAMLLM_API_KEY"  # where `serve --api` reads its key when `--api-key` is not given

__all__ = ["API_KEY_ENV", "DEFAULT_MAX_REQUEST_MB", "DEFAULT_MODEL_NAME", "DEFAULT_PORT"]
