"""The errors slm raises on purpose, each mapped here, once, to what a user sees.

Every error a user can cause is an ``SlmError``; its message is one actionable line. The CLI prints
that line and exits with ``exit_code``; the server answers with ``http_status`` and a JSON error whose
``code`` (OpenAI's machine-readable field) is ``code``. Anything else escaping the library is a bug
(exit code 1, status 500).
"""

from __future__ import annotations


class SlmError(Exception):
    """Base of every error slm raises on purpose."""

    exit_code = 1
    http_status = 500
    code: str | None = None


class ModelNotFound(SlmError):
    """A model name or path that resolves to nothing present on this machine."""

    exit_code = 2
    http_status = 404
    code = "model_not_found"


class InvalidModelFile(SlmError):
    """A file that exists but is not a model the engine can load (truncated, wrong format)."""

    exit_code = 2
    code = "invalid_model_file"


class InvalidParameter(SlmError, ValueError):
    """A generation or load parameter out of range; ``field`` names it."""

    exit_code = 2
    http_status = 400

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class PreviousResponseNotFound(InvalidParameter):
    """A ``previous_response_id`` the server does not hold (never stored, deleted or expired)."""

    code = "previous_response_not_found"


class ContextOverflow(InvalidParameter):
    """A prompt (plus the tokens asked for) that does not fit the model's context."""

    code = "context_length_exceeded"

    def __init__(self, field: str, message: str, prompt_tokens: int | None = None, context: int | None = None) -> None:
        super().__init__(field, message)
        self.prompt_tokens = prompt_tokens
        self.context = context
        """The tokens the prompt took and the context they did not fit, when known (the server reports them
        as llama.cpp's ``n_prompt_tokens`` and ``n_ctx``)."""


class EngineUnavailable(SlmError):
    """The engine a model needs is not installed; the message says how to install it."""

    exit_code = 2
    http_status = 503  # the server was started without it: no request can fix that
    code = "engine_unavailable"


class EngineError(SlmError):
    """The engine failed at run time (out of KV cache, a failed decode): busy, retry later."""

    http_status = 503


class KVCacheFull(EngineError):
    """The KV cache shared by a model's sequences has no room for a step (a scheduler makes room)."""


class QueueFull(SlmError):
    """Too many requests are waiting for a model; try again later."""

    http_status = 503
    code = "queue_full"


class OutOfMemory(SlmError):
    """Loading a model would go beyond the memory the server may use."""

    exit_code = 2
    http_status = 503
    code = "insufficient_memory"


class WriteFailed(SlmError):
    """A result could not be written (a full disk, a size limit, no permission); nothing half-written is
    left where it was going."""

    exit_code = 2
    http_status = 507
    code = "write_failed"


class DownloadError(SlmError):
    """A download that failed; the message names the URL."""


class ConfigError(SlmError):
    """The user's configuration file (providers, models, routes) is wrong; the message says where."""

    exit_code = 2


class MissingKey(SlmError):
    """A remote provider needs a secret that is not set; the message names the variable to set."""

    exit_code = 2


class RemoteError(SlmError):
    """A remote model did not answer well. ``retryable``: the same call may work later or elsewhere;
    ``status``: the upstream's HTTP status, when there was one. A gateway answers 429 for an upstream's
    429 (its limit), else 502 (a bad gateway)."""

    retryable = True
    http_status = 502

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        if status == 429:  # the upstream's rate limit: the gateway's client should slow down too
            self.http_status = 429


class RemoteUnavailable(RemoteError):
    """Connection refused, DNS or TLS failure: nothing answered."""


class RemoteTimeout(RemoteError):
    """No answer (or no next piece of a stream) before the deadline."""

    http_status = 504


class RemoteRejected(RemoteError):
    """A 4xx the caller cannot fix by waiting (401, 403, 404, 400): trying again will not help."""

    retryable = False


class RemoteContextExceeded(RemoteRejected):
    """The prompt is longer than the remote model's context."""

    http_status = 400
    code = "context_length_exceeded"


class RemoteBadResponse(RemoteError):
    """Malformed JSON, or a stream cut before its end."""


# --- what only an HTTP request can get wrong ---------------------------------------------------------


class RequestError(SlmError):
    """A request the server cannot take as sent (not JSON, too large, not authorized)."""

    def __init__(self, message: str, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.http_status = status
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
            "a valid API key is required: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'", 401,
            "invalid_api_key",
        )


class ClientGone(Exception):
    """The client closed the connection before the answer was ready (nobody to tell: not an SlmError)."""


def http_status(error: BaseException) -> int:
    """The status a server answers ``error`` with: its own, 500 for a bug."""
    return error.http_status if isinstance(error, SlmError) else 500
