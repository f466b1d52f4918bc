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
