"""Remote models and routes: the same calls as a local model, answered by a provider or a route.

    slm.load("github:Phi-3.5-mini-instruct")   # GITHUB_TOKEN
    slm.load("nim:microsoft/phi-3.5-moe-instruct")
    slm.load("ollama:phi3.5")                  # OLLAMA_HOST, else this machine
    slm.load("hybrid")                         # a route from the configuration file
"""

from __future__ import annotations

from typing import Any

from slm.errors import InvalidParameter
from slm.model import LanguageModel
from slm.remote.config import Config, Provider, Route, config_path, load_config
from slm.remote.providers import RemoteModel
from slm.remote.router import Loader, Router
from slm.store import catalog

__all__ = ["Config", "Provider", "RemoteModel", "Route", "Router", "config_path", "is_remote", "load_config",
           "open_remote"]


def is_remote(name: str) -> bool:
    """A name the configuration makes a remote model or a route (``github:...``, a route's name)."""

    if catalog.looks_local(name):
        return False
    config = load_config()
    return name in config.routes or config.remote(name) is not None


def open_remote(name: str, load: Loader, **options: Any) -> RemoteModel | Router | None:
    """The remote model or route ``name`` stands for, or None when it is a local model's name. A route
    opens its targets with ``load`` (``slm.load``: a target may be local, remote or a route); ``options``
    go to its local targets."""
    config = load_config()
    if name in config.routes:

        def loader(target: str) -> LanguageModel:
            return load(target, **options) if config.remote(target) is None and target not in config.routes \
                else load(target)

        return Router(config.routes[name], loader)
    remote = config.remote(name)
    if remote is None:
        return None
    given = sorted(k for k, v in options.items() if v is not None)
    if given:
        raise InvalidParameter(given[0], f"{name} runs remotely: engine options such as {given[0]} do not apply")
    provider, model = remote
    return RemoteModel(provider, model)
