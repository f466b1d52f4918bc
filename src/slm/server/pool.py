"""The models a server answers for: each loaded once (at start or on first use), with its scheduler."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

import slm
from slm import catalog
from slm.api import Model
from slm.catalog import ResolvedModel
from slm.errors import ModelNotFound
from slm.scheduler import Scheduler


@dataclass
class Served:
    """A loaded model and the scheduler that owns its engine."""

    name: str
    model: Model
    scheduler: Scheduler
    file: ResolvedModel
    loaded_at: float = field(default_factory=time.time)


class ModelPool:
    """Model names -> served models. Names are resolved at once (a typo fails at start-up); a model is
    loaded by ``load_all`` or by the first request that names it."""

    def __init__(
        self,
        names: Sequence[str],
        *,
        parallel: int = 4,
        max_queue: int = 64,
        load_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.parallel = parallel
        self.max_queue = max_queue
        self._load_options = dict(load_options or {})
        self._files: dict[str, ResolvedModel] = {}
        self._asked: dict[str, str] = {}  # canonical name -> the name or path given, for slm.load
        for asked in names or [catalog.DEFAULT_MODEL]:
            resolved = catalog.resolve(asked)
            self._files[resolved.name] = resolved
            self._asked[resolved.name] = asked
        self._served: dict[str, Served] = {}
        self._loading = {name: asyncio.Lock() for name in self._files}
        self._guard = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self._files)

    def file(self, name: str) -> ResolvedModel:
        return self._files[self.lookup(name)]

    def loaded(self) -> list[Served]:
        return list(self._served.values())

    def lookup(self, requested: str) -> str:
        """The canonical name of a requested model ("smollm2", "SmolLM2", "smollm2:latest")."""
        for candidate in (requested, requested.lower(), requested.removesuffix(":latest").lower()):
            if candidate in self._files:
                return candidate
        served = ", ".join(self._files)
        raise ModelNotFound(f"model {requested!r} is not served here (this server has: {served})")

    async def get(self, requested: str) -> tuple[Served, float]:
        """The served model, loading it if needed; and the seconds this call spent loading it."""
        name = self.lookup(requested)
        served = self._served.get(name)
        if served is not None:
            return served, 0.0
        async with self._loading[name]:
            if name in self._served:
                return self._served[name], 0.0
            start = time.perf_counter()
            served = await asyncio.to_thread(self._load, name)
            return served, time.perf_counter() - start

    def load_all(self) -> None:
        for name in self._files:
            if name not in self._served:
                self._load(name)

    def _load(self, name: str) -> Served:
        # Twice the running sequences: the scheduler keeps finished ones in the spare slots for
        # prefix reuse (a chat's earlier turns are not read again).
        model = slm.load(self._asked[name], max_sequences=2 * self.parallel, **self._load_options)
        scheduler = Scheduler(model, max_running=self.parallel, max_queue=self.max_queue)
        scheduler.start()
        with self._guard:
            self._served[name] = served = Served(name, model, scheduler, self._files[name])
        return served

    def close(self) -> None:
        """Let every model finish its in-flight requests, then free it."""
        with self._guard:
            served, self._served = list(self._served.values()), {}
        for s in served:
            s.scheduler.stop()
            s.model.close()


def pool_of(request: Request) -> ModelPool:
    """The pool of the app serving ``request``."""
    pool: ModelPool = request.app.state.pool
    return pool
