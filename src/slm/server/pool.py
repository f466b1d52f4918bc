"""The models a server answers for: loaded on first use, kept while used, unloaded when idle.

Each HTTP call that uses a model holds a lease on it (``ModelPool.get``), returned when its response
has ended (``ModelPool.release``, called by the app's middleware however the call ends). A model
with no lease and an empty queue is unloaded once its keep-alive has passed since the last lease
ended (Ollama's ``keep_alive``: a duration, 0 to unload at once, negative to keep it forever). A load
that would take the loaded models past the memory budget first unloads idle ones, least recently
used first, and is refused when that is not enough.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from slm.api import adapter_folders, estimate_memory, load_embedding, load_language, load_local
from slm.errors import InvalidParameter, ModelNotFound, OutOfMemory
from slm.model import LanguageModel
from slm.remote import is_remote
from slm.server.backends import Backend, LocalBackend, RemoteBackend, Resident, Served
from slm.serving.embed_batcher import EmbedBatcher
from slm.serving.prefix_cache import MAX_BYTES as PREFIX_CACHE_BYTES
from slm.serving.scheduler import Scheduler
from slm.store import catalog
from slm.store.catalog import ResolvedModel
from slm.units import format_size

log = logging.getLogger("slm.server")

KEEP_ALIVE = 300.0
"""Seconds an idle model stays loaded (Ollama's default)."""

LEASES = "slm_leases"
"""Where a request's leases live in its ASGI scope state."""


@dataclass(eq=False, kw_only=True)
class ServedEmbedder(Resident):
    """A loaded embedding model and its batcher: leased, kept alive and counted in the budget as a ``Served``."""

    batcher: EmbedBatcher

    def idle(self) -> bool:
        return self.leases == 0 and self.batcher.pending() == 0


class ModelPool:
    """Model names -> served models. Names are resolved at once (a typo fails at start-up); a model is
    loaded by ``load_all`` or by the first request that names it."""

    def __init__(
        self,
        names: Sequence[str],
        *,
        parallel: int = 4,
        max_queue: int = 64,
        keep_alive: float = KEEP_ALIVE,
        memory_budget: int | None = None,
        timeout: float | None = None,
        prefix_cache_bytes: int = PREFIX_CACHE_BYTES,
        load_options: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        lookup: int = 0,
        any_name: bool = False,
    ) -> None:
        """``clock``: seconds (wall-clock time by default) for keep-alive expiry and least-recent use.
        ``lookup``: prompt-lookup draft length for requests that do not set one (0: none). ``any_name``: every
        model name a request gives means the one model served (clients with a name written in, such as
        ``gpt-4o-mini``); refused unless exactly one is."""
        self.clock = clock
        self.default_lookup = lookup
        self.parallel = parallel
        self.max_queue = max_queue
        self.keep_alive = keep_alive
        self.memory_budget = memory_budget
        self.timeout = timeout
        """Seconds a request may take, queueing included (None: no limit)."""
        self.prefix_cache_bytes = prefix_cache_bytes
        """Host memory per model for finished requests' KV caches (0: no prefix reuse)."""
        self._load_options = dict(load_options or {})
        adapters = self._load_options.pop("adapters", ())
        self._files: dict[str, ResolvedModel] = {}
        self._asked: dict[str, str] = {}  # canonical name -> the name or path given, for slm.load
        self._remote: dict[str, LanguageModel | None] = {}  # remote models and routes (opened on first use)
        for asked in names or [catalog.DEFAULT_MODEL]:
            if is_remote(asked):
                self._remote[asked] = None
                continue
            resolved = catalog.resolve(asked)
            self._files[resolved.name] = resolved
            self._asked[resolved.name] = asked
        self._adapters = self._adapters_of(adapters)
        """Adapter name -> the name of the model it runs over (the first local model named)."""
        self.any_name = any_name
        if any_name and len(self.names) != 1:
            raise InvalidParameter("any_model_name", f"answers every name with the one model served, and this "
                                                     f"server has {len(self.names)}: {', '.join(self.names)}")
        self._served: dict[str, Served] = {}
        self._embedders: dict[str, ServedEmbedder] = {}
        self._lifecycle = asyncio.Lock()  # loads and unloads, one at a time
        self.unloads = 0
        self.reaps = 0
        """Times ``reap`` has looked for expired models (tests wait on it rather than on time)."""

    def _adapters_of(self, adapters: Sequence[str]) -> dict[str, str]:
        if not adapters:
            return {}
        if not self._files:
            raise InvalidParameter("adapters", "LoRA adapters run over a local model, and none is served")
        base = next(iter(self._files))
        names = list(adapter_folders(adapters))
        taken = [name for name in names if name in self._files or name in self._remote]
        if taken:
            raise InvalidParameter("adapters", f"adapter {taken[0]!r} has the name of a served model")
        return {name: base for name in names}

    @property
    def names(self) -> list[str]:
        return [*self._files, *self._adapters, *self._remote]

    def adapter_of(self, requested: str) -> str | None:
        """The LoRA adapter a requested name stands for (served over its base model), or None."""
        requested = requested.removesuffix(":latest")
        return requested if requested in self._adapters else None

    def opened_remotes(self) -> dict[str, LanguageModel]:
        """The remote models and routes that have answered (been opened) so far, by name."""
        return {name: remote for name, remote in self._remote.items() if remote is not None}

    def is_remote_name(self, name: str) -> bool:
        return name in self._remote

    def remote(self, requested: str) -> LanguageModel | None:
        """The remote model or route served under ``requested`` (opened now if need be), or None when
        it is a local model. A gateway: the calls go to the provider, nothing is loaded here."""
        requested = self.names[0] if self.any_name else requested
        requested = requested if requested in self._remote else requested.removesuffix(":latest")
        if requested not in self._remote:
            return None
        model = self._remote[requested]
        if model is None:
            model = self._remote[requested] = load_language(requested)
        return model

    async def backend(self, requested: str, request: Request, keep_alive: float | None = None) -> Backend:
        """What answers for ``requested``: a remote model or route as it is, or a local model, loaded if
        needed and leased to ``request`` (see ``get``)."""
        remote = await asyncio.to_thread(self.remote, requested)
        if remote is not None:
            return RemoteBackend(requested, remote)
        served, load_seconds = await self.get(requested, request, keep_alive)
        return LocalBackend(served, load_seconds, self.adapter_of(requested))

    @property
    def engine(self) -> str | None:
        """The engine models are loaded in (``--engine``), or None for each one's ``auto`` choice."""
        engine = self._load_options.get("engine")
        return str(engine) if engine else None

    def file(self, name: str) -> ResolvedModel:
        return self._files[self.lookup(name)]

    def loaded(self) -> list[Served]:
        return list(self._served.values())

    def loaded_embedders(self) -> list[ServedEmbedder]:
        return list(self._embedders.values())

    def _residents(self) -> list[Resident]:
        return [*self._served.values(), *self._embedders.values()]

    def memory_in_use(self) -> int:
        return sum(s.memory for s in self._residents())

    def lookup(self, requested: str) -> str:
        """The canonical name of a requested model ("smollm2", "SmolLM2", "smollm2:latest"); an adapter's is its
        base model's."""
        if self.any_name:
            return self.names[0]
        adapter = self.adapter_of(requested)
        if adapter is not None:
            return self._adapters[adapter]
        for candidate in (requested, requested.lower(), requested.removesuffix(":latest").lower()):
            if candidate in self._files:
                return candidate
        served = ", ".join(self.names)
        shown = repr(requested) if len(requested) <= 200 else f"{requested[:200]!r}... ({len(requested)} characters)"
        raise ModelNotFound(f"model {shown} is not served here (this server has: {served})")

    # --- leases (on the event loop) ----------------------------------------------------------

    def is_embedding(self, name: str) -> bool:
        return name in self._files and catalog.is_embedding(self._files[name])

    async def embedder(self, requested: str, request: Request,
                       keep_alive: float | None = None) -> tuple[EmbedBatcher, float]:
        """The batcher of embedding model ``requested``, loaded if needed (within the memory budget) and leased
        to ``request`` as ``get`` leases a model, and the seconds spent loading it; InvalidParameter naming the
        model when it generates text."""
        name = self.lookup(requested)
        if not self.is_embedding(name):
            raise InvalidParameter("model", f"{name} generates text and makes no embeddings; serve an embedding "
                                            "model (such as minilm) and ask it")
        start = time.perf_counter()
        entry, load_seconds = self._embedders.get(name), 0.0
        if entry is None:
            async with self._lifecycle:
                entry = self._embedders.get(name)
                if entry is None:
                    need = self._estimate_embedder(name)
                    await self._make_room(name, need)
                    entry = await asyncio.to_thread(self._open_embedder, name, need)
                    load_seconds = time.perf_counter() - start
        self._lease(entry, request, keep_alive)
        return entry.batcher, load_seconds

    def embedding_stats(self) -> dict[str, dict[str, int]]:
        """Each loaded embedding model's requests and the forward passes that ran them (fewer: batched)."""
        return {name: {"requests": e.batcher.requests, "passes": e.batcher.passes}
                for name, e in self._embedders.items()}

    def _estimate_embedder(self, name: str) -> int:
        """An embedding model's weights as they lie on disk, with a margin for activations (it keeps no cache)."""
        path = self._files[name].path
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        weights = sum(p.stat().st_size for p in files)
        return weights + weights // 5 + (32 << 20)

    def _open_embedder(self, name: str, memory: int) -> ServedEmbedder:
        model = load_embedding(self._asked[name], threads=self._load_options.get("threads"))
        now = self.clock()
        entry = self._embedders[name] = ServedEmbedder(
            name=name, batcher=EmbedBatcher(model, max_queue=self.max_queue), file=self._files[name], memory=memory,
            loaded_at=now, last_used=now)
        return entry

    async def get(self, requested: str, request: Request, keep_alive: float | None = None) -> tuple[Served, float]:
        """The served model, loaded if needed, leased to ``request`` until its response ends; and the
        seconds this call spent loading it. ``keep_alive`` (seconds, inf: forever) applies from then."""
        name = self.lookup(requested)
        if self.is_embedding(name):
            raise InvalidParameter("model", f"{name} is an embedding model: it makes vectors (/v1/embeddings, "
                                            "/api/embed) and does not generate text")
        start = time.perf_counter()
        served, load_seconds = self._served.get(name), 0.0
        if served is None:
            async with self._lifecycle:
                served = self._served.get(name)
                if served is None:
                    served = await self._load(name)
                    load_seconds = time.perf_counter() - start
        self._lease(served, request, keep_alive)  # no await since the lookup: an unload cannot slip in
        return served, load_seconds

    def _lease(self, resident: Resident, request: Request, keep_alive: float | None) -> None:
        resident.leases += 1
        resident.last_used = self.clock()
        request.scope.setdefault("state", {}).setdefault(LEASES, []).append((resident, keep_alive))

    async def release(self, scope: Mapping[str, Any]) -> None:
        """Return the leases of a finished HTTP call; unload what asked for ``keep_alive`` 0."""
        leases = scope.get("state", {}).get(LEASES, ())
        for served, keep_alive in leases:  # every lease back first: an unload below may fail
            served.leases -= 1
            served.last_used = self.clock()
            served.expires_at = served.last_used + (self.keep_alive if keep_alive is None else keep_alive)
        for served, _ in leases:
            if served.expires_at <= self.clock():  # keep_alive 0; otherwise the reaper's job
                await self._unload_logged(served)

    async def reap(self) -> None:
        """Unload every idle model whose keep-alive has passed."""
        self.reaps += 1
        now = self.clock()
        for resident in self._residents():
            if resident.expires_at <= now:
                await self._unload_logged(resident)

    async def run_reaper(self, every: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every)
            await self.reap()

    async def _unload_logged(self, served: Resident) -> None:
        try:
            await self.unload(served)
        except Exception:  # the model stays; the server goes on
            log.exception("could not unload %s", served.name)

    async def unload(self, served: Resident) -> bool:
        """Unload ``served`` if it is idle; whether it was."""
        async with self._lifecycle:
            if self._registry(served).get(served.name) is not served or not served.idle():
                return False
            await self._drop(served, "idle")
            return True

    def _registry(self, resident: Resident) -> dict[str, Any]:
        return self._embedders if isinstance(resident, ServedEmbedder) else self._served

    async def _drop(self, served: Resident, why: str) -> None:
        """Unload an idle model; the caller holds ``_lifecycle``."""
        del self._registry(served)[served.name]  # before any await: no new lease can find it
        await asyncio.to_thread(self._close, served)
        self.unloads += 1
        log.info("unloaded %s (%s)", served.name, why)

    # --- loading ---------------------------------------------------------------------------

    async def _load(self, name: str) -> Served:
        need = await asyncio.to_thread(self._estimate, name)
        await self._make_room(name, need)
        return await asyncio.to_thread(self._open, name, need)

    async def _make_room(self, name: str, need: int) -> None:
        """Unload idle models (least recently used first) until ``need`` more bytes fit the budget."""
        budget = self.memory_budget
        if budget is None:
            return
        if need > budget:
            raise self._beyond_budget(name, need)
        for served in sorted(self._residents(), key=lambda s: s.last_used):
            if self.memory_in_use() + need <= budget:
                return
            if served.idle():
                await self._drop(served, f"to make room for {name}")
        in_use = self.memory_in_use()
        if in_use + need > budget:
            busy = ", ".join(s.name for s in self._residents())
            raise OutOfMemory(
                f"{name} needs about {format_size(need)} but only {format_size(budget - in_use)} of the "
                f"{format_size(budget)} memory budget is free while {busy} serve requests; retry later"
            )

    def load_all(self) -> None:
        """Load every model now (at start-up, before the event loop), as far as the budget allows;
        raises OutOfMemory if not even the first fits."""
        for name in self._files:
            embedding = self.is_embedding(name)
            need = self._estimate_embedder(name) if embedding else self._estimate(name)
            if self.memory_budget is not None and self.memory_in_use() + need > self.memory_budget:
                if not self._residents():
                    raise self._beyond_budget(name, need)
                log.warning("not preloading %s: it would go beyond the memory budget", name)
                continue
            resident = self._open_embedder(name, need) if embedding else self._open(name, need)
            resident.expires_at = self.clock() + self.keep_alive

    def _beyond_budget(self, name: str, need: int) -> OutOfMemory:
        assert self.memory_budget is not None
        return OutOfMemory(f"{name} needs about {format_size(need)}, more than this server's memory budget of "
                           f"{format_size(self.memory_budget)} (--memory-budget)")

    def _estimate(self, name: str) -> int:
        return estimate_memory(self._asked[name], **self._options(name)) + self.prefix_cache_bytes

    def _options(self, name: str) -> dict[str, Any]:
        adapters = [adapter for adapter, base in self._adapters.items() if base == name]
        return {"max_sequences": self.parallel, **self._load_options, **({"adapters": adapters} if adapters else {})}

    def _open(self, name: str, memory: int) -> Served:
        # requests name their adapter; the base model's own name runs it alone
        model = load_local(self._asked[name], **self._options(name)).with_adapter(None)
        scheduler = Scheduler(model.engine, model.name, max_running=self.parallel, max_queue=self.max_queue,
                              prefix_cache_bytes=self.prefix_cache_bytes, draft=model.draft)
        scheduler.start()
        now = self.clock()
        served = Served(name=name, model=model, scheduler=scheduler, file=self._files[name], memory=memory,
                        loaded_at=now, last_used=now, timeout=self.timeout, lookup=self.default_lookup)
        self._served[name] = served
        return served

    @staticmethod
    def _close(served: Resident) -> None:
        if isinstance(served, ServedEmbedder):
            served.batcher.stop()
            served.batcher.model.close()
        elif isinstance(served, Served):
            served.scheduler.stop()
            served.model.close()

    def close(self) -> None:
        """Let every model finish its in-flight requests, then free it."""
        residents, self._served, self._embedders = self._residents(), {}, {}
        for resident in residents:
            self._close(resident)
        for remote in self._remote.values():
            if remote is not None:
                remote.close()



def pool_of(request: Request) -> ModelPool:
    """The pool of the app serving ``request``."""
    pool: ModelPool = request.app.state.pool
    return pool
