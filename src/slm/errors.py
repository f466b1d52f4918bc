"""The errors slm raises on purpose.

Every error a user can cause is an ``SlmError``; its message is one actionable line. The CLI turns
them into that line and an exit code, the server into a JSON error with a status. Anything else
escaping the library is a bug.
"""

from __future__ import annotations


class SlmError(Exception):
    """Base of every error slm raises on purpose."""

    exit_code = 1


class ModelNotFound(SlmError):
    """A model name or path that resolves to nothing present on this machine."""

    exit_code = 2


class InvalidModelFile(SlmError):
    """A file that exists but is not a model the engine can load (truncated, wrong format)."""

    exit_code = 2


class InvalidParameter(SlmError, ValueError):
    """A generation or load parameter out of range; ``field`` names it."""

    exit_code = 2

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class ContextOverflow(InvalidParameter):
    """A prompt (plus the tokens asked for) that does not fit the model's context."""


class EngineUnavailable(SlmError):
    """The engine a model needs is not installed."""


class EngineError(SlmError):
    """The engine failed at run time (out of KV cache, a failed decode)."""


class KVCacheFull(EngineError):
    """The KV cache shared by a model's sequences has no room for a step (a scheduler makes room)."""


class OutOfMemory(SlmError):
    """Loading a model would go beyond the memory the server may use."""

    exit_code = 2


class ConfigError(SlmError):
    """The user's configuration file (providers, models, routes) is wrong; the message says where."""

    exit_code = 2


class MissingKey(SlmError):
    """A remote provider needs a secret that is not set; the message names the variable to set."""

    exit_code = 2


class RemoteError(SlmError):
    """A remote model did not answer well. ``retryable``: the same call may work later or elsewhere;
    ``status``: the HTTP status, when there was one."""

    retryable = True

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RemoteUnavailable(RemoteError):
    """Connection refused, DNS or TLS failure: nothing answered."""


class RemoteTimeout(RemoteError):
    """No answer (or no next piece of a stream) before the deadline."""


class RemoteRejected(RemoteError):
    """A 4xx the caller cannot fix by waiting (401, 403, 404, 400): trying again will not help."""

    retryable = False


class RemoteContextExceeded(RemoteRejected):
    """The prompt is longer than the remote model's context."""


class RemoteBadResponse(RemoteError):
    """Malformed JSON, or a stream cut before its end."""
