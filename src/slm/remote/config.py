"""The user's configuration: remote providers, model names and routes, in one TOML file.

The file is ``config.toml`` in the platform's configuration directory (``~/.config/slm`` on Linux,
``~/Library/Application Support/slm`` on macOS, ``%APPDATA%\\slm`` on Windows); ``SLM_CONFIG`` names
another. Secrets are never in it: a provider names the environment variable that holds its key.

    [providers.cluster]                 # any OpenAI-compatible server: vLLM, SGLang, llama.cpp, slm
    base_url = "http://gpu-box:8000/v1"
    api_key_env = "CLUSTER_KEY"         # optional

    [providers.lab]
    type = "ollama"
    base_url = "http://lab:11434"

    [models]                            # short names for remote models
    phi-cloud = "github:Phi-3.5-mini-instruct"

    [routes.hybrid]                     # try the targets in order
    targets = ["smollm2", "phi-cloud"]
    max_prompt_tokens = [1500, 0]       # optional, per target (0: no limit)
    timeout = 60                        # seconds per attempt
    retries = 1                         # more attempts per target, with backoff and jitter
    deadline = 120                      # seconds for the whole call, fallbacks included

    [routes.replicas]                   # equal servers: each call to the one with the fewest in flight
    strategy = "balance"                # "fallback" (the default): in order
    targets = ["box1:smollm2", "box2:smollm2", "box3:smollm2"]  # providers box1..box3, like cluster
    health_interval = 10                # seconds between health probes of a target (balance only)

    [prices]                            # USD per million tokens, for the playground's cost estimates
    phi-cloud = { input = 0.13, output = 0.52 }
    smollm2 = { input = 0.01, output = 0.02 }   # a local model costs 0 unless given a figure
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slm.errors import ConfigError, MissingKey


@dataclass(frozen=True)
class Provider:
    """Where a remote model lives and how to reach it."""

    name: str
    kind: str
    """``openai`` (any OpenAI-compatible endpoint) or ``ollama`` (Ollama's own API)."""
    base_url: str | None
    base_url_env: str | None = None
    """The variable that holds the base URL when it depends on the account (Azure AI Foundry)."""
    api_key_env: str | None = None
    key_required: bool = False
    extended_sampling: bool = False
    """Accepts top_k, min_p, typical_p and repetition_penalty beside OpenAI's own (vLLM, SGLang,
    llama.cpp's server, slm)."""
    completions: bool = False
    """Offers raw text completion (``/v1/completions``), not only chat."""

    def url(self) -> str:
        value = os.environ.get(self.base_url_env, "").strip() if self.base_url_env else ""
        if not value and not self.base_url:
            raise MissingKey(f"{self.name} needs its endpoint: set {self.base_url_env} "
                             "(e.g. https://<resource>.services.ai.azure.com/models)")
        value = value or str(self.base_url)
        if "://" not in value:  # OLLAMA_HOST=127.0.0.1:11434, or just a host, as Ollama takes it
            value = "http://" + value
            if self.kind == "ollama" and ":" not in value.removeprefix("http://"):
                value += ":11434"
        return value.rstrip("/")

    def key(self) -> str | None:
        """The secret from the environment, else from the OS keyring (service "slm", user: the provider's
        name) when the ``keyring`` package is installed; never logged, never written anywhere."""
        if not self.api_key_env:
            return None
        value = os.environ.get(self.api_key_env, "").strip() or _from_keyring(self.name)
        if value and not all(33 <= ord(c) <= 126 for c in value):  # it would go into a header, and leak
            raise MissingKey(f"{self.name}: the key in {self.api_key_env} has characters a key cannot have "
                             "(a space, a newline, a non-ASCII letter?)")
        if not value and self.key_required:
            raise MissingKey(f"{self.name} needs an API key: set {self.api_key_env} "
                             f"(or store it with: keyring set slm {self.name})")
        return value or None


def _from_keyring(provider: str) -> str:
    try:
        import keyring
        from keyring.errors import KeyringError
    except ImportError:
        return ""
    try:
        return (keyring.get_password("slm", provider) or "").strip()
    except KeyringError:  # no usable backend on this machine
        return ""


PRESETS = {
    "github": Provider("github", "openai", "https://models.github.ai/inference", api_key_env="GITHUB_TOKEN",
                       key_required=True),
    "azure": Provider("azure", "openai", None, base_url_env="AZURE_AI_ENDPOINT", api_key_env="AZURE_AI_API_KEY",
                      key_required=True),
    "nim": Provider("nim", "openai", "https://integrate.api.nvidia.com/v1", api_key_env="NVIDIA_API_KEY",
                    key_required=True),
    "openai": Provider("openai", "openai", "https://api.openai.com/v1", api_key_env="OPENAI_API_KEY",
                       key_required=True, completions=True),
    "ollama": Provider("ollama", "ollama", "http://127.0.0.1:11434", base_url_env="OLLAMA_HOST"),
}
"""Providers known without any configuration: GitHub Models, Azure AI Foundry, NVIDIA NIM, OpenAI, and an
Ollama server (``OLLAMA_HOST``, else this machine)."""


STRATEGIES = ("fallback", "balance")
"""How a route picks its targets: in order, the next one when one fails; or each call to the target with
the fewest calls in flight (equal replicas), the next least loaded when one fails."""


@dataclass(frozen=True)
class Route:
    name: str
    targets: tuple[str, ...]
    strategy: str = "fallback"
    """One of STRATEGIES."""
    max_prompt_tokens: tuple[int, ...] = ()
    timeout: float = 60.0
    retries: int = 1
    deadline: float = 300.0
    backoff: float = 0.5
    """Seconds before the first retry; doubled each time, with jitter."""
    circuit_failures: int = 3
    """Consecutive failures after which a target is skipped..."""
    circuit_cooldown: float = 30.0
    """...for this many seconds."""
    health_interval: float = 10.0
    """Seconds between two health probes of a balance route's remote target."""


@dataclass(frozen=True)
class Price:
    """What a model's tokens cost, in US dollars per million."""

    input: float = 0.0
    output: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


@dataclass
class Config:
    providers: dict[str, Provider] = field(default_factory=lambda: dict(PRESETS))
    models: dict[str, str] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)
    prices: dict[str, Price] = field(default_factory=dict)
    """Model name (local, remote or route) -> its price; a model not listed costs 0."""
    path: Path | None = None

    def price(self, name: str) -> Price:
        return self.prices.get(name, self.prices.get(name.removesuffix(":latest"), Price()))

    def remote(self, name: str) -> tuple[Provider, str] | None:
        """(provider, model id) for ``provider:model`` or a name from ``[models]``; None otherwise."""
        name = self.models.get(name, name)
        prefix, sep, model = name.partition(":")
        if not sep or prefix not in self.providers:
            return None
        if not model.strip():
            raise ConfigError(f"{name!r} names no model after '{prefix}:'")
        return self.providers[prefix], model


def config_path() -> Path:
    explicit = os.environ.get("SLM_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    import click

    return Path(click.get_app_dir("slm")) / "config.toml"


def load_config(path: Path | None = None) -> Config:
    """The configuration in ``path`` (default: ``config_path()``); presets only when there is no file."""
    path = path or config_path()
    if not path.exists():
        if os.environ.get("SLM_CONFIG"):
            raise ConfigError(f"SLM_CONFIG names {path}, which does not exist")
        return Config()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    return _parse(data, path)


def _parse(data: dict[str, Any], path: Path) -> Config:
    config = Config(path=path)
    unknown = set(data) - {"providers", "models", "routes", "prices"}
    if unknown:
        raise ConfigError(f"{path}: unknown section {sorted(unknown)[0]!r} "
                          "(expected providers, models, routes, prices)")
    for name, table in _tables(data, "providers", path).items():
        config.providers[name] = _provider(name, table, path)
    models = data.get("models", {})
    if not isinstance(models, dict) or not all(isinstance(v, str) for v in models.values()):
        raise ConfigError(f"{path}: [models] maps names to strings like \"github:Phi-3.5-mini-instruct\"")
    config.models.update(models)
    for name, table in _tables(data, "routes", path).items():
        config.routes[name] = _route(name, table, path)
    for name, table in _tables(data, "prices", path).items():
        config.prices[name] = _price(name, table, path)
    _check_cycles(config, path)
    for name, target in config.models.items():
        if config.remote(name) is None:
            raise ConfigError(f"{path}: models.{name} = {target!r} names no known provider "
                              f"(known: {', '.join(sorted(config.providers))})")
    return config


def _check_cycles(config: Config, path: Path) -> None:
    """A route may name another route, never (through others) itself."""
    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in trail:
            loop = " -> ".join((*trail[trail.index(name):], name))
            raise ConfigError(f"{path}: routes loop: {loop}")
        for target in config.routes[name].targets:
            if target in config.routes:
                visit(target, (*trail, name))

    for name in config.routes:
        visit(name, ())


def _tables(data: dict[str, Any], section: str, path: Path) -> dict[str, dict[str, Any]]:
    tables = data.get(section, {})
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(f"{path}: [{section}] must hold tables like [{section}.NAME]")
    return tables


def _provider(name: str, table: dict[str, Any], path: Path) -> Provider:
    where = f"{path}: providers.{name}"
    allowed = {"type", "base_url", "base_url_env", "api_key_env", "extended_sampling", "completions"}
    if unknown := set(table) - allowed:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (keys: {', '.join(sorted(allowed))})")
    if "api_key" in table:
        raise ConfigError(f"{where}: put the key in an environment variable and name it with api_key_env")
    kind = table.get("type", "openai")
    if kind not in ("openai", "ollama"):
        raise ConfigError(f"{where}: type {kind!r} is not openai or ollama")
    base_url, base_url_env = table.get("base_url"), table.get("base_url_env")
    if not base_url and not base_url_env:
        raise ConfigError(f"{where}: needs base_url (or base_url_env)")
    if base_url and not str(base_url).startswith(("http://", "https://")):
        raise ConfigError(f"{where}: base_url {base_url!r} must start with http:// or https://")
    # A server of one's own (vLLM, SGLang, llama.cpp, slm) takes llama.cpp's sampling too, unless told not to.
    return Provider(name, kind, base_url, base_url_env, table.get("api_key_env"), False,
                    bool(table.get("extended_sampling", kind == "openai")), bool(table.get("completions", True)))


def _route(name: str, table: dict[str, Any], path: Path) -> Route:
    where = f"{path}: routes.{name}"
    allowed = {"targets", "strategy", "max_prompt_tokens", "timeout", "retries", "deadline", "backoff",
               "circuit_failures", "circuit_cooldown", "health_interval"}
    if unknown := set(table) - allowed:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (keys: {', '.join(sorted(allowed))})")
    strategy = table.get("strategy", "fallback")
    if strategy not in STRATEGIES:
        raise ConfigError(f"{where}.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if "health_interval" in table and strategy != "balance":
        raise ConfigError(f"{where}.health_interval applies to strategy = \"balance\" only (a fallback route "
                          "learns of a failed target from its calls)")
    targets = table.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"{where}: targets must be a non-empty list of model names")
    limits = table.get("max_prompt_tokens", [])
    if not isinstance(limits, list) or len(limits) not in (0, len(targets)) \
            or not all(isinstance(n, int) and n >= 0 for n in limits):
        raise ConfigError(f"{where}: max_prompt_tokens must list one count (0: no limit) per target")
    numbers: dict[str, Any] = {}
    for key, low in (("timeout", 0.0), ("deadline", 0.0), ("backoff", 0.0), ("circuit_cooldown", 0.0),
                     ("health_interval", 0.0)):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > low \
                    and not (key == "backoff" and value == 0):
                raise ConfigError(f"{where}: {key} must be a positive number of seconds, got {value!r}")
            numbers[key] = float(value)
    for key, low in (("retries", 0), ("circuit_failures", 1)):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{where}: {key} must be an integer >= {low}, got {value!r}")
            numbers[key] = value
    return Route(name, tuple(targets), strategy, tuple(limits), **numbers)


def _price(name: str, table: dict[str, Any], path: Path) -> Price:
    where = f"{path}: prices.{name}"
    if unknown := set(table) - {"input", "output"}:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (keys: input, output: USD per million tokens)")
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
            raise ConfigError(f"{where}.{key} must be a number of US dollars per million tokens >= 0, got {value!r}")
    return Price(float(table.get("input", 0.0)), float(table.get("output", 0.0)))
