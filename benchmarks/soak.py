"""Soak: 16 streaming clients against a real ``slm serve`` for minutes, and what the server holds afterwards.

``slm serve smollm2`` runs as a subprocess on a loopback port (``--parallel 16``, a context of 4,096 tokens
and a KV pool of 8,192 cells). Sixteen clients (the official ``openai`` SDK on one asyncio loop) each send
requests one after the other until the time is up, drawn from a seeded mix (``Mix``): chat and completions,
prompts from tens to ~1,500 tokens, a few shared system prompts (prefix-cache hits) beside unique ones, ``n``
1-3, ``stop`` strings, ``max_tokens`` small to large, greedy and seeded sampling. Some requests end on purpose
before their answer does: the client closes the stream after a random number of chunks (a cancellation), or
sends a prompt longer than the context (a 400 that fails in the scheduler). Every other request must finish.
When the time is up the clients start nothing new, the requests in flight get ``drain_seconds`` to end (the
rest are cancelled and counted as such), one last request must succeed, and the server must go idle.

Meanwhile a thread samples the server process's resident memory (RSS) and ``/health`` every second, and
``/metrics`` every five. The checks (``checks``): no errors but the intended ones; the scheduler's counters
account for every request (submitted = finished + cancelled + failed, failed = the intended failures,
cancelled at most the choices the clients left open); no 5xx; at the end nothing running, waiting or holding KV
cells, and the prefix cache within its limit; RSS after the warm-up (the first 20% of the run) grows by no
more than what the prefix cache may still take (its limit less what it held at the end of the warm-up) plus
``MEMORY_MARGIN``. tests/test_soak.py runs the same code for a minute.

    PYTHONPATH=src .venv/bin/python benchmarks/soak.py              # 10 minutes, writes benchmarks/results/soak.*
    PYTHONPATH=src .venv/bin/python benchmarks/soak.py --quick      # 1 minute, writes nothing
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil

from harness import (
    PROMPT_TEXT,
    ROOT,
    LoadMeter,
    fill,
    load_average,
    machine,
    markdown_table,
    output_directory,
    package_versions,
    report_head,
    stop_on_signals,
    templates,
    terminal,
    write_results,
)
from serve import LIBRARY_NOTES, QUESTIONS, Server, free_port

MODEL = "smollm2"
WARMUP_SHARE = 0.2
"""The first part of the run, in which RSS may grow freely (allocator arenas, the prefix cache filling)."""
MEMORY_MARGIN = 64 << 20
"""RSS growth allowed after the warm-up beyond what the prefix cache may still take (see soak.md)."""
VERSIONS = ("slm", "llama-cpp-python", "uvicorn", "fastapi", "starlette", "openai", "httpx", "psutil", "matplotlib")
FLAT_WITHOUT_FRAGMENTATION = 35
"""MiB: the most RSS less the prefix cache grew after the warm-up in ten minutes with glibc's mmap threshold fixed
(benchmarks/results/soak-mmap-threshold.json), the ground for MEMORY_MARGIN."""
REPORT = templates("soak")
"""The prose of soak.md: benchmarks/templates/soak.md."""

# The text prompts are cut from: ~1,730 tokens of English (about 5 characters a token with SmolLM2's tokenizer).
CORPUS = f"{LIBRARY_NOTES} {PROMPT_TEXT} {LIBRARY_NOTES}"
CHARS_PER_TOKEN = 5
QUESTIONS_MIX = (*QUESTIONS, "When is the library open on Sundays?", "Can I print in colour, and what does it cost?",
                 "Write one sentence about Gutenberg.", "List three things the makerspace has.")
STOPS = (["."], ["\n"], [" the", " a "], [",", ";", ":"])


@dataclass(frozen=True)
class Settings:
    """One soak: the server's options and the load."""

    seconds: float = 600.0
    clients: int = 16
    threads: int = 1
    parallel: int = 16
    ctx_size: int = 4096
    kv_size: int = 8192
    prefix_cache_mib: int = 256
    large_max_tokens: int = 256
    drain_seconds: float = 30.0
    seed: int = 0
    memory_margin: int = MEMORY_MARGIN
    server_env: dict[str, str] = field(default_factory=dict)
    """Environment variables for the server on top of this process's (e.g. glibc's MALLOC_* tunables)."""

    def serve_args(self) -> list[str]:
        return ["--parallel", str(self.parallel), "--ctx-size", str(self.ctx_size), "--kv-size", str(self.kv_size),
                "--threads", str(self.threads), "--prefix-cache", f"{self.prefix_cache_mib}MiB", "--keep-alive", "-1"]


QUICK = Settings(seconds=60.0, large_max_tokens=128, drain_seconds=10.0, prefix_cache_mib=32)
"""The CI soak: a small prefix cache, so that it fills and evicts within the minute (what once grew RSS)."""
"""The one-minute soak of tests/test_soak.py and ``--quick``."""


# --- the mix -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One request of the mix and how it is meant to end: ``complete``, ``cancel`` (the client closes the
    stream after ``cancel_after`` chunks) or ``too_long`` (a 400 naming the context)."""

    endpoint: str
    body: dict[str, Any]
    intent: str
    cancel_after: int = 0

    @property
    def n(self) -> int:
        n: int = self.body.get("n", 1)
        return n


def _text(tokens: int, tag: str | None) -> str:
    text = CORPUS[: tokens * CHARS_PER_TOKEN]
    return f"Chapter {tag}. {text}" if tag else text


def _tokens(rng: random.Random) -> int:
    """A prompt length: short (tens of tokens), medium or long (up to ~1,500)."""
    low, high = rng.choices([(20, 80), (200, 500), (1000, 1450)], weights=[55, 30, 15])[0]
    return rng.randint(low, high)


SYSTEM_PROMPTS = tuple(f"You are the reference assistant of a public library. {_text(t, None)}"
                       for t in (150, 600, 1300))
"""Shared by every client's chats: their KV caches come back from the prefix cache."""


def plan(rng: random.Random, settings: Settings, tag: str) -> Plan:
    """The next request of a client; ``tag`` (client.request) makes a prompt unique where the mix wants one."""
    body: dict[str, Any] = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}}
    if rng.random() < 0.02:  # beyond the context: refused with a 400 after the scheduler failed it
        return Plan("completions", body | {"prompt": "word " * (settings.ctx_size + 100), "max_tokens": 8},
                    "too_long")
    low, high = rng.choices([(4, 32), (64, 128), (settings.large_max_tokens // 2, settings.large_max_tokens)],
                            weights=[45, 40, 15])[0]
    body["max_tokens"] = rng.randint(low, high)
    body["n"] = rng.choices([1, 2, 3], weights=[60, 25, 15])[0]
    if rng.random() < 0.35:
        body["stop"] = rng.choice(STOPS)
    if rng.random() < 0.6:
        body["temperature"], body["seed"] = 0.8, rng.randrange(1 << 30)
    else:
        body["temperature"] = 0.0
    if rng.random() < 0.6:
        shared = rng.random() < 0.7
        system = rng.choice(SYSTEM_PROMPTS) if shared else f"Session {tag}. {_text(_tokens(rng), None)}"
        body["messages"] = [{"role": "system", "content": system},
                            {"role": "user", "content": rng.choice(QUESTIONS_MIX)}]
        endpoint = "chat"
    else:
        body["prompt"] = _text(_tokens(rng), tag if rng.random() < 0.5 else None)
        endpoint = "completions"
    if rng.random() < 0.15:
        return Plan(endpoint, body, "cancel", rng.randint(1, 16))
    return Plan(endpoint, body, "complete")


# --- the clients ---------------------------------------------------------------------------------------


async def send(client: openai.AsyncOpenAI, plan: Plan, origin: float, out: list[dict[str, Any]]) -> None:
    """Stream one request and append what became of it to ``out`` (also when the task is cancelled)."""
    body = plan.body
    record: dict[str, Any] = {
        "t": round(time.perf_counter() - origin, 3), "endpoint": plan.endpoint, "intent": plan.intent, "n": plan.n,
        "max_tokens": body["max_tokens"], "stop": bool(body.get("stop")), "temperature": body.get("temperature"),
        "prompt_chars": len(body.get("prompt") or "".join(m["content"] for m in body.get("messages", []))),
        "cancel_after": plan.cancel_after, "chunks": 0, "result": None, "error": None,
    }
    texts: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    start = time.perf_counter()
    try:
        create = client.chat.completions.create if plan.endpoint == "chat" else client.completions.create
        stream: Any = await create(**{k: v for k, v in body.items() if k != "stream"}, stream=True)
        async with stream:
            async for chunk in stream:
                if chunk.usage is not None:
                    record["prompt_tokens"] = chunk.usage.prompt_tokens
                    record["completion_tokens"] = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    record["chunks"] += 1
                    record.setdefault("ttft", round(time.perf_counter() - start, 3))
                    text = choice.delta.content if plan.endpoint == "chat" else choice.text
                    texts.setdefault(choice.index, []).append(text or "")
                    if choice.finish_reason is not None:
                        finish[choice.index] = choice.finish_reason
                if plan.intent == "cancel" and record["chunks"] >= plan.cancel_after and len(finish) < plan.n:
                    record["result"] = "cancelled"
                    break
        if record["result"] is None:
            record["result"] = "finished"
            record["error"] = _wrong_answer(plan, finish, texts, record.get("completion_tokens"))
    except openai.BadRequestError as e:
        record["result"] = "rejected"
        if plan.intent != "too_long" or e.code != "context_length_exceeded":
            record["error"] = f"HTTP 400: {e.message}"
    except Exception as e:  # any other end is an error of the run: recorded, and the client goes on
        record["result"], record["error"] = "failed", f"{type(e).__name__}: {e}"
    except asyncio.CancelledError:
        record["result"] = "stopped"  # in flight when the drain ended: closed by the soak itself
        raise
    finally:
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["open_choices"] = plan.n - len(finish)
        record["finish_reasons"] = sorted(finish.values())
        out.append(record)


def _wrong_answer(plan: Plan, finish: dict[int, str], texts: dict[int, list[str]], tokens: int | None) -> str | None:
    """What is wrong with a stream that ended by itself, or None."""
    if plan.intent == "too_long":
        return "a prompt beyond the context was answered"
    if sorted(finish) != list(range(plan.n)):
        return f"the stream ended with finish reasons for choices {sorted(finish)} of {plan.n}"
    if tokens is None:
        return "no usage in the stream"
    if tokens > plan.n * plan.body["max_tokens"]:
        return f"{tokens} completion tokens for n={plan.n} x max_tokens={plan.body['max_tokens']}"
    for index, pieces in texts.items():
        text = "".join(pieces)
        if plan.body.get("stop") and any(s in text for s in plan.body["stop"]):
            return f"choice {index} contains a stop string: {text[-60:]!r}"
    return None


async def drive(base_url: str, settings: Settings, origin: float) -> list[dict[str, Any]]:
    """``settings.clients`` clients sending the mix until ``settings.seconds`` have passed; the requests in flight
    then get ``drain_seconds`` to end before they are cancelled. Every request's record, in order of ending."""
    out: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=2 * settings.clients, max_keepalive_connections=settings.clients)
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="soak", max_retries=0,
                                  http_client=httpx.AsyncClient(timeout=300.0, limits=limits)) as client:

        async def one_client(c: int) -> None:
            rng = random.Random(settings.seed * 1000 + c)
            k = 0
            while time.perf_counter() - origin < settings.seconds:
                k += 1
                await send(client, plan(rng, settings, f"{c}.{k}"), origin, out)

        tasks = [asyncio.create_task(one_client(c)) for c in range(settings.clients)]
        await asyncio.sleep(settings.seconds)
        _, pending = await asyncio.wait(tasks, timeout=settings.drain_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        probe = Plan("completions", {"model": MODEL, "prompt": "The printing press", "max_tokens": 8,
                                     "temperature": 0.0, "stream_options": {"include_usage": True}}, "complete")
        await send(client, probe, origin, out)
        out[-1]["probe"] = True
    return out


# --- the server's side ---------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as ``{'name{labels}': value}`` (a series without labels under its bare name)."""
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


SCHEDULER_SERIES = {
    "requests": "slm_requests_submitted_total", "finished": "slm_requests_finished_total",
    "failed": "slm_requests_failed_total", "cancelled": "slm_requests_cancelled_total",
    "preemptions": "slm_requests_preempted_total", "generated_tokens": "slm_generated_tokens_total",
    "prompt_tokens": "slm_prompt_tokens_total", "prefill_tokens": "slm_prefill_tokens_total",
    "forked_tokens": "slm_forked_tokens_total", "prefix_cache_hit_tokens": "slm_prefix_cache_hit_tokens_total",
    "prefix_cache_hits": "slm_prefix_cache_hits_total", "prefix_cache_lookups": "slm_prefix_cache_lookups_total",
    "running": "slm_sequences_running", "waiting": "slm_requests_waiting",
    "kv_cells": "slm_kv_cache_cells", "kv_cells_reserved": "slm_kv_cache_cells_reserved",
}
"""What the soak reads from /metrics, by the names of the scheduler's stats (src/slm/server/metrics.py)."""


def scheduler_metrics(series: dict[str, float]) -> dict[str, int]:
    return {key: int(series[f'{name}{{model="{MODEL}"}}']) for key, name in SCHEDULER_SERIES.items()}


def http_statuses(series: dict[str, float]) -> dict[str, int]:
    """``{'/v1/completions 200': count, ...}`` from slm_http_responses_total."""
    found = (re.fullmatch(r'slm_http_responses_total\{path="([^"]*)",status="(\d+)"\}', k) for k in series)
    return {f"{m[1]} {m[2]}": int(series[m[0]]) for m in found if m}


class Sampler:
    """A thread sampling the server every second: its RSS, CPU seconds and /health (running, waiting, KV cells
    reserved, the prefix cache's bytes and entries: /metrics has no prefix-cache gauges), and /metrics every
    ``metrics_every`` samples."""

    def __init__(self, base_url: str, pid: int, origin: float, metrics_every: int = 5) -> None:
        self.base_url, self.origin, self.metrics_every = base_url, origin, metrics_every
        self.process = psutil.Process(pid)
        self.samples: list[dict[str, Any]] = []
        self.metrics: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10.0) as http:
            tick = 0
            while not self._stop.is_set():
                try:
                    self.sample(http, with_metrics=tick % self.metrics_every == 0)
                except (httpx.HTTPError, psutil.Error, KeyError, ValueError) as e:
                    self.errors.append(f"{time.perf_counter() - self.origin:.0f} s: {type(e).__name__}: {e}")
                tick += 1
                self._stop.wait(1.0)

    def sample(self, http: httpx.Client, with_metrics: bool) -> None:
        t = round(time.perf_counter() - self.origin, 2)
        earlier = http.get("/health").json()["models"][MODEL]
        rss = self.process.memory_info().rss
        cpu = self.process.cpu_times()
        stats = http.get("/health").json()["models"][MODEL]
        self.samples.append({
            "t": t, "rss": rss, "cpu_seconds": round(cpu.user + cpu.system, 2), "load1": os.getloadavg()[0],
            **{k: stats[k] for k in ("running", "waiting", "kv_cells_reserved", "prefix_cache_bytes",
                                     "prefix_cache_entries")},
            # RSS was read while the cache held these bytes (an entry of up to ~40 MB comes or goes in between).
            "steady": earlier["prefix_cache_bytes"] == stats["prefix_cache_bytes"],
        })
        if with_metrics:
            self.metrics.append({"t": t, "series": parse_metrics(http.get("/metrics").text)})


def wait_until_idle(base_url: str, timeout: float = 60.0) -> dict[str, int]:
    """/metrics once nothing runs, waits or holds KV cells and every request is accounted for (or at the
    timeout, as it stands)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scheduler_metrics(parse_metrics(httpx.get(f"{base_url}/metrics", timeout=10.0).text))
        idle = m["running"] == m["waiting"] == m["kv_cells_reserved"] == 0
        if (idle and m["requests"] == m["finished"] + m["cancelled"] + m["failed"]) or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def run(settings: Settings, logs: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Start the server, soak it, let it go idle, stop it: the soak's record with its checks."""
    port = free_port()
    # The server runs this tree's slm (not another checkout's installed in the environment), as the script does.
    path = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    server = Server("slm", [sys.executable, "-m", "slm", "serve", MODEL, "--host", "127.0.0.1", "--port", str(port),
                            *settings.serve_args()], port, "/health", logs / "slm-soak.log",
                    env={**settings.server_env, "PYTHONPATH": path})
    say(f"starting {server.shown_command}")
    server.start()
    assert server.proc is not None
    try:
        base = server.base_url
        before = scheduler_metrics(parse_metrics(httpx.get(f"{base}/metrics").text))
        origin = time.perf_counter()
        with Sampler(base, server.proc.pid, origin) as sampler, LoadMeter({"slm": server.cpu_seconds}) as meter:
            say(f"  up in {server.start_seconds:.1f} s, RSS {sampler.process.memory_info().rss / 2**20:.0f} MiB; "
                f"{settings.clients} clients for {settings.seconds:.0f} s")
            requests = asyncio.run(drive(base, settings, origin))
            load_seconds = time.perf_counter() - origin
            idle = wait_until_idle(base)
            time.sleep(5.0)  # a few samples of the idle server
        health = httpx.get(f"{base}/health").json()["models"][MODEL]
        final = parse_metrics(httpx.get(f"{base}/metrics").text)
    finally:
        exit_code = server.stop()
    log = server.log_text()
    record: dict[str, Any] = {
        "settings": asdict(settings),
        "server_command": server.shown_command,
        "server_start_seconds": round(server.start_seconds, 2),
        "server_exit_code": exit_code,
        "load_seconds": round(load_seconds, 1),
        "others_cpu_share": round(meter.others, 3),
        "server_cpu_seconds": round(meter.process_cpu_seconds["slm"], 1),
        "client_cpu_seconds": round(meter.own_cpu_seconds, 1),
        "metrics_before": before,
        "metrics_at_idle": idle,
        "metrics_final": scheduler_metrics(final),
        "http_statuses": http_statuses(final),
        "health_final": health,
        "server_log_tracebacks": log.count("Traceback"),
        "server_log_errors": [line for line in log.splitlines() if re.match(r"(ERROR|CRITICAL)\b", line)][:10],
        "sampler_errors": sampler.errors,
        "requests": requests,
        "samples": sampler.samples,
        "metrics_samples": [{"t": m["t"], **scheduler_metrics(m["series"])} for m in sampler.metrics],
    }
    record["figures"] = figures(record)
    record["checks"] = checks(record)
    return record


# --- what the run shows --------------------------------------------------------------------------------


def figures(record: dict[str, Any]) -> dict[str, Any]:
    """The run in numbers: requests by intent and outcome, what the server counted, memory."""
    requests, settings = record["requests"], record["settings"]
    samples = record["samples"]
    warmup_end = WARMUP_SHARE * record["load_seconds"]
    at_warmup = next((s for s in samples if s["t"] >= warmup_end), samples[-1])
    after = [s for s in samples if s["t"] >= at_warmup["t"]]
    peak_after = max(after, key=lambda s: s["rss"])
    cache_limit = settings["prefix_cache_mib"] << 20
    before, final = record["metrics_before"], record["metrics_final"]
    delta = {k: final[k] - before[k] for k in ("requests", "finished", "failed", "cancelled", "preemptions",
                                               "generated_tokens", "prompt_tokens", "prefill_tokens",
                                               "forked_tokens", "prefix_cache_hit_tokens", "prefix_cache_hits",
                                               "prefix_cache_lookups")}
    prompts = sorted(r["prompt_tokens"] for r in requests if r.get("prompt_tokens"))
    rest = [s["rss"] - s["prefix_cache_bytes"] for s in after if s["steady"]]
    return {
        "requests": len(requests),
        "by_intent_and_result": {f"{i} -> {r}": n for (i, r), n in
                                 sorted(Counter((x["intent"], x["result"]) for x in requests).items())},
        "endpoints": dict(Counter(r["endpoint"] for r in requests)),
        "n": dict(sorted(Counter(str(r["n"]) for r in requests).items())),
        "with_stop": sum(r["stop"] for r in requests),
        "finish_reasons": dict(Counter(f for r in requests for f in r["finish_reasons"])),
        "choices": sum(r["n"] for r in requests),
        "choices_left_open": sum(r["open_choices"] for r in requests if r["result"] in ("cancelled", "stopped")),
        "intended_failures": sum(r["result"] == "rejected" and r["error"] is None for r in requests),
        "errors": [f"{r['endpoint']} n={r['n']} at {r['t']} s: {r['error']}" for r in requests if r["error"]],
        "prompt_tokens_min_median_max": [prompts[0], prompts[len(prompts) // 2], prompts[-1]] if prompts else None,
        "completion_tokens": sum(r.get("completion_tokens") or 0 for r in requests),
        "server": delta,
        "rss_start": samples[0]["rss"],
        "rss_at_warmup_end": at_warmup["rss"],
        "warmup_end_seconds": at_warmup["t"],
        "rss_peak": max(s["rss"] for s in samples),
        "rss_peak_after_warmup": peak_after["rss"],
        "rss_peak_after_warmup_seconds": peak_after["t"],
        "rss_end": samples[-1]["rss"],
        "rss_growth_after_warmup": peak_after["rss"] - at_warmup["rss"],
        "prefix_cache_limit": cache_limit,
        "prefix_cache_bytes_at_warmup_end": at_warmup["prefix_cache_bytes"],
        "prefix_cache_bytes_peak": max(s["prefix_cache_bytes"] for s in samples),
        "rss_growth_bound": cache_limit - at_warmup["prefix_cache_bytes"] + settings["memory_margin"],
        "rss_less_cache_growth_after_warmup": max(rest) - rest[0],
        "load_average_mean": round(sum(s["load1"] for s in samples) / len(samples), 2),
    }


def checks(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The soak's verdicts: each a name, what was found, what it had to be, and whether it was."""
    f, idle, health = record["figures"], record["metrics_at_idle"], record["health_final"]
    s = f["server"]
    five_xx = {k: v for k, v in record["http_statuses"].items() if k.split()[-1].startswith("5")}
    probe = next(r for r in record["requests"] if r.get("probe"))
    margin, mib = record["settings"]["memory_margin"], 2**20

    def check(name: str, found: Any, wanted: str, passed: bool) -> dict[str, Any]:
        return {"check": name, "found": found, "wanted": wanted, "passed": bool(passed)}

    return [
        check("unintended errors", len(f["errors"]), "0", not f["errors"]),
        check("server counted every request", f"{s['requests']} submitted",
              f"{f['choices']} choices sent", s["requests"] == f["choices"]),
        check("submitted = finished + cancelled + failed",
              f"{s['requests']} = {s['finished']} + {s['cancelled']} + {s['failed']}", "equal",
              s["requests"] == s["finished"] + s["cancelled"] + s["failed"]),
        check("failed = intended failures", s["failed"], f"{f['intended_failures']} prompts beyond the context",
              s["failed"] == f["intended_failures"]),
        check("cancelled <= choices the clients left open", s["cancelled"], f"<= {f['choices_left_open']}",
              s["cancelled"] <= f["choices_left_open"]),
        check("no 5xx responses", sum(five_xx.values()), "0", not five_xx),
        check("no tracebacks in the server's log", record["server_log_tracebacks"], "0",
              record["server_log_tracebacks"] == 0),
        check("idle: running, waiting, KV cells reserved",
              f"{idle['running']}, {idle['waiting']}, {idle['kv_cells_reserved']}", "0, 0, 0",
              idle["running"] == idle["waiting"] == idle["kv_cells_reserved"] == 0),
        check("idle: prefix cache within its limit", f"{health['prefix_cache_bytes'] / mib:.1f} MiB "
              f"({health['prefix_cache_entries']} entries)", f"<= {f['prefix_cache_limit'] / mib:.0f} MiB",
              health["prefix_cache_bytes"] <= f["prefix_cache_limit"]),
        check("RSS growth after the warm-up", f"{f['rss_growth_after_warmup'] / mib:.1f} MiB",
              f"<= {f['rss_growth_bound'] / mib:.1f} MiB", f["rss_growth_after_warmup"] <= f["rss_growth_bound"]),
        check("RSS less the prefix cache, growth after the warm-up",
              f"{f['rss_less_cache_growth_after_warmup'] / mib:.1f} MiB", f"<= {margin / mib:.0f} MiB",
              f["rss_less_cache_growth_after_warmup"] <= margin),
        check("the last request after the soak", probe["result"], "finished",
              probe["result"] == "finished" and probe["error"] is None),
    ]


# --- the report ----------------------------------------------------------------------------------------


def plot_memory(record: dict[str, Any], path: Path) -> None:
    """The server's RSS over the run (and the prefix cache's share of it) above what it was holding in flight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, f, mib = record["samples"], record["figures"], 2**20
    t = [s["t"] for s in samples]
    fig, (memory, flight) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, height_ratios=(3, 2))
    memory.plot(t, [s["rss"] / mib for s in samples], label="RSS", color="C0")
    steady = [s for s in samples if s["steady"]]
    memory.plot([s["t"] for s in steady], [(s["rss"] - s["prefix_cache_bytes"]) / mib for s in steady],
                label="RSS less the prefix cache", color="C2")
    memory.plot(t, [s["prefix_cache_bytes"] / mib for s in samples], label="prefix cache", color="C1")
    memory.axhline((f["rss_at_warmup_end"] + f["rss_growth_bound"]) / mib, color="C3", linestyle="--",
                   label="bound after the warm-up")
    for axis in (memory, flight):
        axis.axvline(f["warmup_end_seconds"], color="grey", linestyle=":")
        axis.axvline(record["load_seconds"], color="grey", linestyle=":")
        axis.grid(alpha=0.3)
    memory.set_ylabel("MiB")
    memory.set_ylim(bottom=0)
    memory.legend(loc="lower right", fontsize=8)
    memory.set_title(f"slm serve {MODEL}: {record['settings']['clients']} streaming clients, "
                     f"{record['load_seconds'] / 60:.1f} minutes (warm-up and end of load dotted)")
    flight.plot(t, [s["kv_cells_reserved"] for s in samples], label="KV cells reserved", color="C4")
    flight.set_ylabel("KV cells")
    flight.set_xlabel("seconds since the clients started")
    sequences = flight.twinx()
    sequences.plot(t, [s["running"] for s in samples], label="running", color="C0", linewidth=0.8)
    sequences.plot(t, [s["waiting"] for s in samples], label="waiting", color="C1", linewidth=0.8)
    sequences.set_ylabel("sequences / requests")
    lines = flight.get_legend_handles_labels()[0] + sequences.get_legend_handles_labels()[0]
    flight.legend(lines, [str(line.get_label()) for line in lines], loc="upper right", fontsize=8, framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def render_markdown(report: dict[str, Any], data: str, png: str) -> str:
    """soak.md: the template's sections filled from the report."""
    m, f, s = report["machine"], report["figures"], report["settings"]
    rows = [(c["check"], str(c["found"]), c["wanted"], "pass" if c["passed"] else "**FAIL**") for c in report["checks"]]
    outcomes = [(k, str(v)) for k, v in f["by_intent_and_result"].items()]
    counters = [(k, str(v)) for k, v in f["server"].items()]
    notes = [*f["errors"][:10], *report["server_log_errors"], *report["sampler_errors"][:5]]
    if f["rss_less_cache_growth_after_warmup"] > s["memory_margin"]:
        notes.append(fill(REPORT["note_fragmentation"], growth=mib(f["rss_less_cache_growth_after_warmup"])))
    return fill(
        REPORT["report"], **report, versions=m["versions"], minutes=report["wall_seconds"] / 60,
        load_at_start=load_average(m["load_average_at_start"]), load_at_end=load_average(m["load_average_at_end"]),
        memory={k: mib(v) for k, v in f.items() if k.startswith(("rss_", "prefix_cache_")) and "seconds" not in k},
        data=data, png=png, passed=sum(c["passed"] for c in report["checks"]), total=len(report["checks"]),
        check_table=markdown_table(("check", "found", "wanted", ""), rows, "llll"),
        outcome_table=markdown_table(("intent -> outcome", "requests"), outcomes, "lr"),
        counter_table=markdown_table(("scheduler counter (/metrics, over the run)", "value"), counters, "lr"),
        prompt_tokens=", ".join(map(str, f["prompt_tokens_min_median_max"] or [])),
        env_note=fill(REPORT["env"], env=", ".join(f"`{k}={v}`" for k, v in s["server_env"].items()))
        if s["server_env"] else "",
        margin=mib(s["memory_margin"]), warmup_share=f"{WARMUP_SHARE:.0%}",
        large=f"{s['large_max_tokens'] // 2}-{s['large_max_tokens']}",
        finish_reasons=", ".join(f"{k} {v}" for k, v in sorted(f["finish_reasons"].items())),
        margin_reason=fill(REPORT["margin"], margin=mib(s["memory_margin"]), kv_size=s["kv_size"],
                           flat=FLAT_WITHOUT_FRAGMENTATION),
        notes_section=fill(REPORT["notes"], notes="\n".join(f"- {n}" for n in notes)) if notes else "",
    ) + "\n"


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="how long the clients send (default 10)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default 16)")
    parser.add_argument("--threads", type=int, default=1,
                        help="server threads (default 1: the machine is shared, contended threads are slower)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (default 0)")
    parser.add_argument("--prefix-cache-mib", type=int, default=None,
                        help=f"the server's --prefix-cache in MiB (default {Settings.prefix_cache_mib}, the server's)")
    parser.add_argument("--name", default="soak", help="results file names: NAME.json, NAME.md, NAME-memory.png")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the server (repeatable), e.g. MALLOC_ARENA_MAX=2")
    parser.add_argument("--quick", action="store_true",
                        help="the one-minute soak of tests/test_soak.py; writes no files unless --output")
    parser.add_argument("--output", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Settings()
    minutes = args.minutes if args.minutes is not None else base.seconds / 60
    settings = replace(base, seconds=minutes * 60, clients=args.clients, threads=args.threads, seed=args.seed,
                       server_env=dict(item.split("=", 1) for item in args.server_env),
                       prefix_cache_mib=args.prefix_cache_mib or base.prefix_cache_mib)
    output = output_directory(args)
    console = terminal(140)
    info = machine()
    console.print(f"[bold]soak[/] · {info['cpu']} · {info['cores']} cores · load average "
                  f"{load_average(info['load_average_at_start'])}")
    logs = Path(tempfile.mkdtemp(prefix="slm-soak-"))
    stop_on_signals()
    record = run(settings, logs, say=console.print)
    info["load_average_at_end"] = os.getloadavg()
    report = report_head("soak", started) | {"machine": info | {"versions": package_versions(VERSIONS)}} | record
    f = report["figures"]
    console.print(f"{f['requests']} requests ({f['choices']} choices), {f['completion_tokens']} tokens: "
                  f"{f['by_intent_and_result']}")
    console.print(f"RSS start {mib(f['rss_start'])} MiB, at the end of the warm-up {mib(f['rss_at_warmup_end'])}, "
                  f"peak {mib(f['rss_peak'])}, end {mib(f['rss_end'])}; prefix cache peak "
                  f"{mib(f['prefix_cache_bytes_peak'])} MiB; load average {f['load_average_mean']} on average")
    for c in report["checks"]:
        console.print(f"  {'pass' if c['passed'] else '[red]FAIL[/]'}  {c['check']}: {c['found']} ({c['wanted']})")
    console.print(f"wall time {report['wall_seconds']:.0f} s · server log in {logs}")
    if output is not None:
        png = output / f"{args.name}-memory.png"
        output.mkdir(parents=True, exist_ok=True)
        plot_memory(report, png)
        markdown = render_markdown(report, f"{args.name}.json", png.name)
        data, prose = write_results(output, args.name, report, markdown, indent=1, ensure_ascii=False,
                                    inline_number_lists=True)
        console.print(f"wrote {data}, {prose} and {png}")
    return 0 if all(c["passed"] for c in report["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
