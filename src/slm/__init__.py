"""slm: small language models, offline, behind one API, one CLI and one server."""

from slm.api import Model, estimate_memory, load
from slm.errors import (
    ContextOverflow,
    EngineError,
    EngineUnavailable,
    InvalidModelFile,
    InvalidParameter,
    KVCacheFull,
    ModelNotFound,
    OutOfMemory,
    SlmError,
)
from slm.generation import Chunk, Completion, GenerationParams, Generator, TokenLogprob
from slm.generation.beam import Beam, BeamCompletion
from slm.model import Choices

__version__ = "0.1.0"

__all__ = [
    "Beam", "BeamCompletion", "Choices", "Chunk", "Completion", "ContextOverflow", "EngineError", "EngineUnavailable",
    "GenerationParams", "Generator", "InvalidModelFile", "InvalidParameter", "KVCacheFull", "Model", "ModelNotFound",
    "OutOfMemory", "SlmError", "TokenLogprob", "estimate_memory", "load",
]
