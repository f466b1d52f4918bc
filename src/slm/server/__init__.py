"""The HTTP server: OpenAI- and Ollama-compatible APIs over slm's scheduler."""

from slm.server.app import create_app

__all__ = ["create_app"]
