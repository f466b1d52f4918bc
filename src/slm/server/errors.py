"""How errors leave the server: the error's status (``slm.errors``), and a body in the shape each API's
clients parse.

OpenAI routes answer ``{"error": {"message", "type", "param", "code"}}``; Ollama routes (``/api/``)
answer ``{"error": "..."}``; Anthropic's (``/v1/messages``) ``{"type": "error", "error": {"type", "message"}}``.
The message is the error's own one line, never a traceback.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from slm.errors import ContextOverflow, InvalidParameter, SlmError, http_status

RETRY_AFTER_SECONDS = 1


ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                   503: "overloaded_error"}
"""Anthropic's error type of each status (another 4xx is an ``invalid_request_error``, another 5xx an
``api_error``)."""


def _type_of(status: int) -> str:
    if status == 401:  # as llama.cpp's server types a bad key
        return "authentication_error"
    return "invalid_request_error" if status < 500 else "server_error"


def message_of(error: Exception) -> str:
    if isinstance(error, SlmError):
        return str(error)
    return "internal server error (the server log has the details)"


def openai_body(error: Exception) -> dict[str, object]:
    body: dict[str, object] = {
        "message": message_of(error),
        "type": _type_of(http_status(error)),
        "param": error.field if isinstance(error, InvalidParameter) else None,
        "code": error.code if isinstance(error, SlmError) else None,
    }
    if isinstance(error, ContextOverflow) and error.context is not None:  # as llama.cpp's server reports it
        body.update(n_prompt_tokens=error.prompt_tokens, n_ctx=error.context)
    return {"error": body}


def ollama_body(error: Exception) -> dict[str, object]:
    return {"error": message_of(error)}


def anthropic_body(error: Exception) -> dict[str, object]:
    status = http_status(error)
    kind = ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message_of(error)}}


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_response(error: Exception, path: str) -> JSONResponse:
    """The error as the API that ``path`` belongs to reports it."""
    status = http_status(error)
    if is_anthropic_path(path):
        body = anthropic_body(error)
    else:
        body = ollama_body(error) if is_ollama_path(path) else openai_body(error)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=status, headers=headers)
