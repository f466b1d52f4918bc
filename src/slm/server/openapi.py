"""The server's OpenAPI document (``/openapi.json``), with the request bodies its handlers read.

A handler parses its body itself (``schemas.parse``), so that an error names the field in the API's own
shape; FastAPI cannot see those bodies. This adds each one's JSON schema to the document, so that clients,
code generators and the fuzz tests (Schemathesis) know what every endpoint takes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from slm.server.anthropic_schema import CountTokensRequest, MessagesRequest
from slm.server.embeddings_api import OllamaEmbeddingsRequest, OllamaEmbedRequest, OpenAIEmbeddingRequest
from slm.server.responses_schema import ResponsesRequest
from slm.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelRequest,
    OllamaChatRequest,
    OllamaGenerateRequest,
)
from slm.server.tokenizer_api import DetokenizeRequest, TokenizeRequest

BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/responses": ResponsesRequest,
    "/v1/messages": MessagesRequest,
    "/v1/messages/count_tokens": CountTokensRequest,
    "/api/chat": OllamaChatRequest,
    "/api/generate": OllamaGenerateRequest,
    "/api/show": ModelRequest,
    "/v1/embeddings": OpenAIEmbeddingRequest,
    "/api/embed": OllamaEmbedRequest,
    "/api/embeddings": OllamaEmbeddingsRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
"""The body each POST endpoint parses."""


def document_bodies(app: FastAPI) -> None:
    """Make ``app.openapi()`` describe the JSON body of every endpoint in ``BODIES``."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = plain()
            refs, defs = models_json_schema([(model, "validation") for model in BODIES.values()],
                                            ref_template="#/components/schemas/{model}")
            document.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            for path, model in BODIES.items():
                document["paths"][path]["post"]["requestBody"] = {
                    "required": True, "content": {"application/json": {"schema": refs[(model, "validation")]}},
                }
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
