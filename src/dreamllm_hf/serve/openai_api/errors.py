"""OpenAI's error schema (`{"error": {"message", "type", "param", "code"}}`), and the guard in front of the routes that
refuses a missing or wrong API key (401) and a body over the size limit (413) before anything reads it."""

import hmac
import json

from starlette.datastructures import Headers
from starlette.responses import JSONResponse


class APIError(Exception):
    """A request the server refuses, as OpenAI reports it.

    Args:
        status (`int`): the HTTP status (400 bad parameter or picture, 401 key, 404 model or route, 413 size, 429
            queue full, 500 model error, 503 closed).
        message (`str`): what is wrong and how to fix it.
        param (`str`, *optional*): the request field at fault, as a path (`messages[0].content[1].image_url`).
        code (`str`, *optional*): a machine-readable reason (`invalid_api_key`, `model_not_found`, `queue_full`...).
        type (`str`, *optional*): OpenAI's error type; by default from the status.
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, type=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        if self.status == 429:
            headers = {"Retry-After": "1"}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}

# A refused body is read (and dropped) up to this many times the limit, so that a client that is still sending gets the
# answer instead of a reset connection; past that the connection is closed.
_DRAIN_FACTOR = 4

# Routes a client may call without the key: a load balancer's health check.
PUBLIC_PATHS = frozenset({"/health"})


class RequestGuard:
    """
    ASGI middleware: with `api_key` set, every route but `/health` needs `Authorization: Bearer <api_key>` (compared in
    constant time); a body over `max_bytes` (by its `Content-Length`, or counted as it arrives when it is sent in
    chunks) is refused with 413 without being kept. The body is read here, whole, and handed on to the app.
    """

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app = app
        self.api_key = None if api_key is None else api_key.encode("utf-8")
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        error = self._key_error(scope["path"], headers) or self._length_error(headers)
        if error is not None:
            await _drain(receive, _DRAIN_FACTOR * self.max_bytes)
            await error.response()(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await _drain(receive, _DRAIN_FACTOR * self.max_bytes)
                await self._too_large().response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # what comes after the body: the disconnect, when the client goes away

        await self.app(scope, replay, send)

    def _key_error(self, path: str, headers: Headers) -> APIError | None:
        if self.api_key is None or path in PUBLIC_PATHS:
            return None
        authorization = headers.get("authorization")
        if not authorization:
            return APIError(
                401,
                "No API key was given. This server needs one: send the header `Authorization: Bearer <key>` (the "
                "openai client does so with `OpenAI(api_key=...)`).",
                code="missing_api_key",
            )
        scheme, _, token = authorization.partition(" ")
        given = token.strip().encode("utf-8")
        # compare_digest also when the scheme is wrong, so that the time taken says nothing about the key
        same = hmac.compare_digest(given, self.api_key)
        if scheme.lower() != "bearer" or not same:
            return APIError(
                401,
                "Incorrect API key. Send the key the server was started with (`--api-key`) as `Authorization: "
                "Bearer <key>`.",
                code="invalid_api_key",
            )
        return None

    def _length_error(self, headers: Headers) -> APIError | None:
        length = headers.get("content-length")
        if length is None:
            return None
        if not length.strip().isdigit():
            return APIError(400, f"The `Content-Length` header {length!r} is not a number of bytes.")
        if int(length) > self.max_bytes:
            return self._too_large(int(length))
        return None

    def _too_large(self, length: int | None = None) -> APIError:
        size = f"{length / 2**20:.1f} MiB" if length is not None else "more"
        return APIError(
            413,
            f"The request body is {size} but this server takes at most {self.max_bytes / 2**20:g} MiB "
            "(`--max-request-mb`). Send smaller pictures (the model reads them at its own resolution) or start the "
            "server with a larger `--max-request-mb`.",
            code="request_too_large",
        )


async def _drain(receive, limit: int) -> None:
    """Reads and drops what the client still sends of a refused body, up to `limit` bytes."""
    size = 0
    while size <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def read_json(body: bytes):
    """The request's JSON (a `NaN` or `Infinity` is read as the float, then refused by the field's range check)."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise APIError(400, f"The request body is not valid JSON: {error}.", code="invalid_json") from None


__all__ = ["PUBLIC_PATHS", "APIError", "RequestGuard", "read_json"]
