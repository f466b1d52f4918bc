"""``GET /metrics``: the server's counters in Prometheus's text format.

Per model, from its scheduler: requests by outcome, prompt and generated tokens, running and waiting
sequences, KV cache cells, prefix-cache lookups and hits, and histograms of time to first token and
time per output token; its estimated memory. For the server: unloads, the memory budget, and the
HTTP responses by route and status (counted by the app's gate); for each route of remote models (slm
as a gateway), its requests, fallbacks, per-target outcomes and calls in flight. A model's series start
again at zero when it is loaded again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from slm.remote import Router
from slm.server.pool import ModelPool
from slm.serving.histogram import Histogram

COUNTERS = {
    "requests": ("slm_requests_submitted_total", "Generation requests queued"),
    "finished": ("slm_requests_finished_total", "Generation requests that ran to their end"),
    "failed": ("slm_requests_failed_total", "Generation requests that failed"),
    "cancelled": ("slm_requests_cancelled_total", "Generation requests cancelled (client gone)"),
    "prompt_tokens": ("slm_prompt_tokens_total", "Prompt tokens admitted"),
    "generated_tokens": ("slm_generated_tokens_total", "Tokens generated"),
    "steps": ("slm_engine_steps_total", "Batched engine calls"),
    "preemptions": ("slm_requests_preempted_total", "Requests paused for KV cache room and recomputed"),
    "prefill_tokens": ("slm_prefill_tokens_total", "Prompt tokens evaluated (not from a cache or a fork)"),
    "forked_tokens": ("slm_forked_tokens_total", "Prompt tokens taken by forking a running request's KV cache"),
    "draft_tokens": ("slm_draft_tokens_total", "Tokens drafted for speculative decoding and checked"),
    "draft_tokens_accepted": ("slm_draft_tokens_accepted_total", "Drafted tokens the model kept"),
    "prefix_cache_lookups": ("slm_prefix_cache_lookups_total", "Prompts looked up in the prefix cache"),
    "prefix_cache_hits": ("slm_prefix_cache_hits_total", "Prompts that reused a cached prefix"),
    "prefix_cache_hit_tokens": ("slm_prefix_cache_hit_tokens_total", "Prompt tokens taken from the cache"),
}
GAUGES = {
    "running": ("slm_sequences_running", "Sequences in the running batch"),
    "waiting": ("slm_requests_waiting", "Requests in the queue"),
    "kv_cells": ("slm_kv_cache_cells", "KV cache positions allocated"),
    "kv_cells_reserved": ("slm_kv_cache_cells_reserved", "KV positions reserved by running requests"),
    "prefix_cache_entries": ("slm_prefix_cache_entries", "Finished requests' KV caches kept for prefix reuse"),
    "prefix_cache_bytes": ("slm_prefix_cache_bytes", "Host memory those take"),
}


def render(pool: ModelPool, responses: Counter[tuple[str, int]], dropped: Counter[str] | None = None) -> str:
    """The text of /metrics. ``dropped``: streams the server dropped, by reason (``slow_reader``)."""
    lines: list[str] = []
    served = pool.loaded()
    stats = [(s.name, s.scheduler.stats()) for s in served]
    for key, (name, text) in {**COUNTERS, **GAUGES}.items():
        kind = "counter" if key in COUNTERS else "gauge"
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{model="{model}"}} {values[key]}' for model, values in stats]
    for attribute, name, text in (
        ("time_to_first_token", "slm_time_to_first_token_seconds", "Time from queueing to the first token"),
        ("time_per_token", "slm_time_per_output_token_seconds", "Mean time between output tokens"),
    ):
        lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
        for s in served:
            lines += _histogram(name, s.name, getattr(s.scheduler, attribute))
    lines += ["# HELP slm_model_memory_bytes Estimated memory of each loaded model",
              "# TYPE slm_model_memory_bytes gauge"]
    embedders = pool.loaded_embedders()
    lines += [f'slm_model_memory_bytes{{model="{name}"}} {memory}'
              for name, memory in [*((s.name, s.memory) for s in served), *((e.name, e.memory) for e in embedders)]]
    for attribute, name, text in (("requests", "slm_embedding_requests_total", "Embedding requests answered"),
                                  ("passes", "slm_embedding_passes_total",
                                   "Forward passes of an embedding model (fewer than requests: batched)")):
        lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
        lines += [f'{name}{{model="{e.name}"}} {getattr(e.batcher, attribute)}' for e in embedders]
    lines += ["# HELP slm_model_unloads_total Models unloaded (idle past their keep-alive, or to make room)",
              "# TYPE slm_model_unloads_total counter", f"slm_model_unloads_total {pool.unloads}"]
    if pool.memory_budget is not None:
        lines += ["# HELP slm_memory_budget_bytes Memory the loaded models may take together",
                  "# TYPE slm_memory_budget_bytes gauge", f"slm_memory_budget_bytes {pool.memory_budget}"]
    routes = {name: r.metrics for name, r in pool.opened_remotes().items() if hasattr(r, "metrics")}
    lines += ["# HELP slm_route_events_total A route's requests, fallbacks, and per target: answers, failures, "
              "skips (circuit open, prompt too long, probe failed), circuit openings and health changes",
              "# TYPE slm_route_events_total counter"]
    for route, counts in sorted(routes.items()):
        for key, n in sorted(counts.items()):
            event, _, target = key.partition(":")
            label = f',target="{target}"' if target else ""
            lines.append(f'slm_route_events_total{{route="{route}",event="{event}"{label}}} {n}')
    lines += ["# HELP slm_route_outstanding_requests Calls in flight through a route, per target",
              "# TYPE slm_route_outstanding_requests gauge"]
    lines += [f'slm_route_outstanding_requests{{route="{name}",target="{target}"}} {n}'
              for name, remote in sorted(pool.opened_remotes().items()) if isinstance(remote, Router)
              for target, n in remote.outstanding().items()]
    lines += ["# HELP slm_http_responses_total HTTP responses by route and status",
              "# TYPE slm_http_responses_total counter"]
    lines += [f'slm_http_responses_total{{path="{path}",status="{status}"}} {n}'
              for (path, status), n in sorted(responses.items())]
    lines += ["# HELP slm_streams_dropped_total Streamed answers the server dropped (slow_reader: the client read "
              "nothing for the write timeout)", "# TYPE slm_streams_dropped_total counter"]
    lines += [f'slm_streams_dropped_total{{reason="{reason}"}} {n}' for reason, n in sorted((dropped or {}).items())]
    return "\n".join(lines) + "\n"


def _histogram(name: str, model: str, histogram: Histogram) -> Iterable[str]:
    for bound, count in histogram.cumulative():
        yield f'{name}_bucket{{model="{model}",le="{bound}"}} {count}'
    yield f'{name}_sum{{model="{model}"}} {histogram.total}'
    yield f'{name}_count{{model="{model}"}} {histogram.count}'
