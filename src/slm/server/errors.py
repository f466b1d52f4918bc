"""How errors leave the server: a status code, and a body in the shape each API's clients parse.

OpenAI routes answer ``{"error": {"message", "type", "param", "code"}}``; Ollama routes (``/api/``)
answer ``{"error": "..."}``. The message is the error's own one line, never a traceback.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from slm.errors import (
    ContextOverflow,
    EngineError,
    InvalidModelFile,
    InvalidParameter,
    ModelNotFound,
    OutOfMemory,
    RemoteContextExceeded,
    RemoteError,
    RemoteTimeout,
    SlmError,
)
from slm.serving.scheduler import QueueFull

RETRY_AFTER_SECONDS = 1


class RequestError(SlmError):
    """A request the server cannot take as sent (not JSON, too large, not authorized)."""

    def __init__(self, message: str, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class BodyTooLarge(RequestError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes", 413, "request_too_large")


class RequestTimeout(RequestError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 504, "timeout")


class Unauthorized(RequestError):
    def __init__(self) -> None:
        super().__init__(
            "a valid API key is required: send it as 'Authorization: Bearer <key>'", 401, "invalid_api_key"
        )


def status_of(error: Exception) -> int:
    if isinstance(error, RequestError):
        return error.status
    if isinstance(error, ModelNotFound):
        return 404
    if isinstance(error, InvalidParameter):
        return 400
    if isinstance(error, QueueFull | EngineError | OutOfMemory):  # busy (queue, KV cache, memory): retry later
        return 503
    if isinstance(error, RemoteError):  # a gateway's upstream: its limit, its deadline, else a bad gateway
        if isinstance(error, RemoteContextExceeded):
            return 400
        if isinstance(error, RemoteTimeout):
            return 504
        return 429 if error.status == 429 else 502
    return 500


def _code_of(error: Exception) -> str | None:
    if isinstance(error, RequestError):
        return error.code
    if isinstance(error, ContextOverflow | RemoteContextExceeded):
        return "context_length_exceeded"
    if isinstance(error, ModelNotFound):
        return "model_not_found"
    if isinstance(error, QueueFull):
        return "queue_full"
    if isinstance(error, OutOfMemory):
        return "insufficient_memory"
    if isinstance(error, InvalidModelFile):
        return "invalid_model_file"
    return None


def _type_of(status: int) -> str:
    if status == 401:
        return "invalid_request_error"  # as OpenAI answers a bad key
    return "invalid_request_error" if status < 500 else "server_error"


def message_of(error: Exception) -> str:
    if isinstance(error, SlmError):
        return str(error)
    return "internal server error (the server log has the details)"


def openai_body(error: Exception) -> dict[str, object]:
    status = status_of(error)
    return {
        "error": {
            "message": message_of(error),
            "type": _type_of(status),
            "param": error.field if isinstance(error, InvalidParameter) else None,
            "code": _code_of(error),
        }
    }


def ollama_body(error: Exception) -> dict[str, object]:
    return {"error": message_of(error)}


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def error_response(error: Exception, path: str) -> JSONResponse:
    """The error as the API that ``path`` belongs to reports it."""
    status = status_of(error)
    body = ollama_body(error) if is_ollama_path(path) else openai_body(error)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=status, headers=headers)
