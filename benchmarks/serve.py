"""Serving benchmark: ``slm serve`` against llama.cpp's own ``llama-server`` and llama-cpp-python's server.

One run starts the three servers as subprocesses on the same model file (the catalog's smollm2, SmolLM2-135M
Q4_1), the same threads (all available cores, for generation and for prompts) and flash attention on all
three, and measures them one at a time, never at the same moment (the idle ones wait on their sockets):

- ``slm serve --parallel P --ctx-size C``: up to P requests at once, drawing on one KV pool of C cells.
- ``llama-server -np P -c P*S``: llama.cpp's C++ server with P slots, built from the llama.cpp that
  llama-cpp-python vendors (the same version as slm's engine; built into ~/.cache/slm/llama-server/ when
  missing, see structured.py's ``llama_server``). Without ``--kv-unified`` it splits ``-c`` among its slots,
  so each gets S cells: the run's longest request (prompt and max_tokens) rounded up to 256.
- ``python -m llama_cpp.server --n_ctx C``: one sequence, one request at a time.

1. Throughput and latency: 1, 4, 8 and 16 concurrent streaming clients (asyncio + httpx), each sending
   ``--requests-per-client`` requests back to back to ``POST /v1/completions`` with ``"stream": true``,
   temperature 0, ``max_tokens`` 128 and a raw, unfinished English text (about 100 tokens) that the model
   continues rather than ends. Every request's prompt starts with its own tag ("Chapter 2.8.3.1."), so no
   request finds its prompt in any server's prefix cache. Per server and concurrency: aggregate generated
   tokens/s (all tokens / wall time of the round), time to first token p50/p95, per-token latency p50/p95
   (gaps between streamed chunks after the first) and requests completed; slm over each peer per repetition.
   Tokens: slm's and llama-server's ``usage.completion_tokens`` from the stream's last event
   (``stream_options.include_usage``; llama-server sends it unasked too); llama-cpp-python's server has no
   usage in streams, so its count is the number of streamed chunks that carry text (one per token).
2. The engine alone: slm's ``LlamaCppEngine``, loaded in this script's process as ``slm serve`` loads it (same
   file, context, sequences, threads, flash attention), decodes the prompts of slm's first 8 requests of the
   8-client round together, greedy: one ``engine.evaluate`` reads every prompt, then one per step appends each
   sequence's argmax token, ``max_tokens`` per sequence; no scheduler, no HTTP. It runs beside slm's 8-client
   round (right before it in even repetitions, right after it in odd ones), when no server is busy. Its decode
   rate (the steps after the prompts) against slm's aggregate through HTTP at 8 clients says what the server
   loses between the engine and the socket.
3. Shared prefix: a ~1,000-token system prompt in ``POST /v1/chat/completions`` (stream, ``max_tokens`` 16),
   sent twice, one after the other, with different user questions; the time to first token of the first and
   of the second request, their ratio, and the prompt tokens the second took from a cache (usage's
   ``prompt_tokens_details.cached_tokens``). Each repetition uses a new system prompt (its first words
   differ), so the first request of a pair never finds it cached.

Each measurement waits for a quiet machine, records the share of the CPU that processes other than this
script and the servers used meanwhile (/proc/stat), and is redone when that share was too high. Every
measurement is repeated (``--repetitions``, default 3; the servers take turns, so each goes first as often)
and the medians are reported, with slm's ratio to each peer as the median of the per-repetition ratios.

    .venv/bin/python benchmarks/serve.py              # full run, writes benchmarks/results/serve.{json,md}
    .venv/bin/python benchmarks/serve.py --quick      # a smoke test, writes nothing
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

import slm
from harness import (
    PROMPT_TEXT,
    ROOT,
    Quiet,
    add_run_options,
    console_table,
    fill,
    flash_attention,
    flash_attention_in_log,
    load_average,
    machine,
    markdown_table,
    median,
    model_file,
    output_directory,
    package_versions,
    paired_ratios,
    process_cpu_seconds,
    report_head,
    shown,
    slm_executable,
    stop_on_signals,
    templates,
    terminal,
    write_results,
)
from slm.engines.llamacpp import LlamaCppEngine, default_threads

MODEL = "smollm2"
SLM = "slm"
PEER = "llama-server"
LCP = "llama-cpp-python"
SERVERS = (SLM, PEER, LCP)
PEERS = (PEER, LCP)
USAGE = (SLM, PEER)
"""The servers whose streams end with usage (their token counts); llama-cpp-python's are counted in chunks."""
CONCURRENCY = (1, 4, 8, 16)
ENGINE = "engine"
ENGINE_SEQUENCES = 8
"""The engine decodes as many sequences as the HTTP round it is compared with has clients."""
QUICK_CONCURRENCY = (1, 8, 16)
"""--quick's clients: every concurrency a target names, once."""
SLOT_ROUNDING = 256
CHAT_TEMPLATE_TOKENS = 32
"""Allowed for the chat template's tokens around the system prompt and question (SmolLM2's take 14)."""


@dataclass(frozen=True)
class Target:
    """A figure slm must reach (or, ``at_most``, not exceed): a ratio, judged on the median of its
    per-repetition values."""

    name: str
    source: str
    what: str
    needed: float
    at_most: bool = False


TARGETS = (
    Target("one_client_vs_llama_server", "issue 15", "aggregate tok/s at 1 client, slm / llama-server", 1.0),
    Target("eight_clients_vs_llama_server", "issue 15", "aggregate tok/s at 8 clients, slm / llama-server", 1.2),
    Target("sixteen_clients_vs_llama_server", "issue 15", "aggregate tok/s at 16 clients, slm / llama-server", 1.2),
    Target("ttft_p95_sixteen_clients_vs_llama_server", "issue 15", "TTFT p95 at 16 clients, slm / llama-server",
           1.0, at_most=True),
    Target("http_over_engine", "issue 15", f"tok/s through HTTP at {ENGINE_SEQUENCES} clients / slm's engine's "
           f"batched decode of {ENGINE_SEQUENCES}", 0.9),
    Target("one_client_vs_llama_cpp_python", "earlier", "aggregate tok/s at 1 client, slm / llama-cpp-python", 1.1),
    Target("eight_clients_vs_llama_cpp_python", "earlier", "aggregate tok/s at 8 clients, slm / llama-cpp-python",
           2.0),
    Target("shared_prefix", "earlier", "shared system prompt: slm's 1st / 2nd request TTFT", 5.0),
)

# Appended to PROMPT_TEXT for the system prompt of the shared-prefix test, then cut to --system-tokens.
LIBRARY_NOTES = (
    "The library itself was founded in 1887 by a group of printers and schoolteachers who pooled their own books "
    "in a rented room above a bakery. It moved to its present building on the market square in 1912, when a "
    "local shipping family paid for a reading hall with tall windows, oak tables and a gallery for the "
    "newspaper archive. The east wing, added in 1968, holds the children's department, the music collection "
    "and a small theatre used for lectures and film evenings. The basement stores the local history "
    "collection: parish registers, maps of the harbour from the seventeenth century onwards, photographs of "
    "the shipyards, and the papers of the town's first newspaper, which was printed on a hand press that still "
    "stands in the entrance hall and is used once a year on the open day. Opening hours are nine to eight on "
    "weekdays, ten to five on Saturdays, and twelve to four on Sundays from October to March. Members may "
    "borrow up to fifteen items at a time for three weeks, renew them twice unless another member has "
    "reserved them, and return them at any branch or at the drop box beside the main door. Films and games "
    "are lent for one week. Reference works, the local history collection and newspapers older than a year "
    "may only be read in the building; staff will bring archive boxes to the reading room within twenty "
    "minutes of a request. Printing costs ten cents a page in black and white and forty cents in colour, and "
    "scanning to a memory stick or to an email address is free. The makerspace on the first floor has two "
    "3D printers, a sewing machine, a vinyl cutter and a bookbinding press, which members may book in "
    "two-hour slots after a short safety introduction. Quiet study rooms can be booked up to a week ahead for "
    "groups of two to six people. The library runs a reading club for adults on the first Tuesday of every "
    "month, a homework café for pupils on weekday afternoons, language exchange evenings on Thursdays, and "
    "computer help sessions for beginners on Wednesday mornings. Visitors without a library card may use the "
    "reading rooms, the public computers for one hour a day, and the wireless network, whose password is "
    "printed on the back of every receipt. A library card is free for anyone who lives, works or studies in "
    "the county; others pay twelve euros a year. Lost cards are replaced for two euros. Overdue items cost "
    "twenty cents a day each, up to five euros per item, and children's items are never fined. The library "
    "also lends e-books and audiobooks through its app, with up to five loans at a time, and offers free "
    "access to several newspaper archives, language courses and an encyclopedia from home with a card number "
    "and a PIN. Accessibility: the main entrance has a ramp and automatic doors, there is a lift to every "
    "floor, hearing loops at the information desk and in the theatre, large-print and braille collections, "
    "and magnifiers and a reading machine in the study area. When answering visitors, be brief and friendly, "
    "give the exact opening hours, prices or rules from these notes when they apply, say plainly when the "
    "notes do not cover a question, and suggest asking at the information desk on the ground floor for "
    "anything that needs a person, such as interlibrary loans, room bookings for events or complaints."
)
QUESTIONS = (
    "How many items can a member borrow at a time, and for how long?",
    "What did Bi Sheng make his movable characters out of?",
)
VERSIONS = ("slm", "llama-cpp-python", "uvicorn", "uvloop", "httptools", "fastapi", "starlette", "sse-starlette",
            "httpx")
"""The packages whose versions the report names: the Python servers' stacks and the clients'."""
METHOD = {
    "throughput": "per round: N clients start at once, each streams its requests one after the other; "
                  "aggregate tokens/s = all completion tokens of the round / wall time from the start "
                  "to the last request's end",
    "ttft": "from the client's call to the first server-sent event carrying a choice",
    "per_token": "gaps between consecutive streamed chunks carrying text, after the first, pooled over "
                 "the round's requests",
    "tokens": f"{SLM} and {PEER}: usage.completion_tokens of the stream's last event (stream_options."
              f"include_usage; {PEER} sends it unasked too); {LCP}: streamed chunks carrying text (one a token)",
    "medians": "p50/p95 are taken per round, then the median over repetitions; versus = slm / the peer: "
               "paired_ratio = median over repetitions of the per-repetition ratio (it decides a target), "
               "ratio = of the medians",
    "order": "per repetition and concurrency the servers take turns in a rotation, so each goes first as "
             f"often; the others are idle meanwhile; at {ENGINE_SEQUENCES} clients the engine runs right before slm's "
             "round in even repetitions and right after it in odd ones",
    "engine": f"slm's LlamaCppEngine in this script's process, loaded as slm serve loads it: {ENGINE_SEQUENCES} "
              "sequences (the prompts of slm's first requests of that round), one evaluate reading every prompt, "
              "then max_tokens - 1 evaluates of one argmax token per sequence (end tokens do not stop it); "
              "decode rate = sequences x (max_tokens - 1) / time of those steps; with prompts = sequences x "
              "max_tokens / time from the first evaluate to the last",
    "others_cpu_share": "share of the machine's CPU time used by processes other than this script and "
                        "the servers during a measurement (/proc/stat, /proc/PID/stat)",
}
REPORT = templates("serve")
"""The prose of serve.md and of the run's notes: benchmarks/templates/serve.md."""


# --- the servers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    key: str
    command: list[str]
    port: int
    ready_path: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    start_seconds: float = 0.0

    @property
    def shown_command(self) -> str:
        return " ".join(shown(Path(a)) if a.startswith("/") else a for a in self.command)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, **self.env}, start_new_session=True)
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.key} exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + self.ready_path, timeout=2.0).status_code == 200:
                    self.start_seconds = time.perf_counter() - started
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.key} did not answer {self.ready_path} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def log_settings(text: str) -> dict[str, Any]:
    """What llama.cpp reported while it created the context (from the server's log)."""
    lines = text.splitlines()
    found: dict[str, Any] = dict(flash_attention_in_log(lines))
    for key in ("n_ctx", "n_ctx_seq", "n_ctx_per_seq", "n_batch", "n_ubatch", "n_seq_max", "kv_unified"):
        for line in lines:
            if m := re.search(rf"\b{key}\s+=\s+(\S+)", line):
                found[key] = m.group(1)
                break
    return found


# --- the clients ---------------------------------------------------------------------------------------


@dataclass
class Workload:
    """What a round sends; the request bodies differ between the servers only where their APIs do."""

    max_tokens: int
    prompt_text: str
    system_text: str
    system_tokens: int

    def completion_prompt(self, tag: str) -> str:
        return f"Chapter {tag}. {self.prompt_text}"

    def completion_body(self, server: str, tag: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL, "prompt": self.completion_prompt(tag), "stream": True,
            "temperature": 0.0, "max_tokens": self.max_tokens,
        }
        return body | extras(server)

    def chat_body(self, server: str, tag: str, question: str, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": f"Session {tag}. {self.system_text}"},
                {"role": "user", "content": question},
            ],
            "stream": True, "temperature": 0.0, "max_tokens": max_tokens,
        }
        return body | extras(server)


def extras(server: str) -> dict[str, Any]:
    """slm and llama-server: usage in the stream's last event. llama-cpp-python: no repeat penalty (its
    server's default is 1.1, slm's and llama-server's none), so all sample the same greedy tokens; its server
    has no stream_options."""
    return {"repeat_penalty": 1.0} if server == LCP else {"stream_options": {"include_usage": True}}


async def stream_request(client: httpx.AsyncClient, path: str, body: dict[str, Any], origin: float) -> dict[str, Any]:
    """One streamed request, timed from the call to each server-sent event that carries a choice."""
    start = time.perf_counter()
    times: list[float] = []
    texts: list[str] = []
    finish = error = None
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"error in the stream: {event['error']}")
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    text = choice.get("text")
                    if text is None:
                        text = (choice.get("delta") or {}).get("content") or ""
                    times.append(now)
                    texts.append(text)
                    finish = choice.get("finish_reason") or finish
    except Exception as e:  # recorded: the round goes on, the request counts as not completed
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    carrying = [t for t, text in zip(times, texts, strict=True) if text]
    return {
        "started": round(start - origin, 6),
        "ttft": round(times[0] - start, 6) if times else None,
        "seconds": round(end - start, 6),
        "completion_tokens": usage["completion_tokens"] if usage else len(carrying),
        "prompt_tokens": usage["prompt_tokens"] if usage else None,
        # Prompt tokens a server took from its cache (OpenAI's field; slm and llama-server fill it).
        "cached_tokens": ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens"),
        "chunks": len(times),
        "chunks_with_text": len(carrying),
        "finish_reason": finish,
        "error": error,
        # Per-token latency: the gaps between the chunks that carry text, after the first one.
        "gaps_ms": [round((b - a) * 1e3, 3) for a, b in zip(carrying, carrying[1:], strict=False)],
        "text_head": "".join(texts)[:80],
    }


def _client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    return httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits)


async def throughput_round(server: Server, workload: Workload, concurrency: int, requests_per_client: int,
                           rep: int) -> dict[str, Any]:
    """``concurrency`` clients, each sending its requests one after the other; all start at once."""
    async with _client(concurrency) as client:
        origin = time.perf_counter()

        async def one_client(c: int) -> list[dict[str, Any]]:
            out = []
            for k in range(requests_per_client):
                body = workload.completion_body(server.key, f"{rep + 1}.{concurrency}.{c + 1}.{k + 1}")
                result = await stream_request(client, server.base_url + "/v1/completions", body, origin)
                out.append({"client": c, "request": k, **result})
            return out

        per_client = await asyncio.gather(*(one_client(c) for c in range(concurrency)))
        wall = time.perf_counter() - origin
    return {"wall_seconds": wall, "requests": [r for rs in per_client for r in rs]}


async def prefix_pair(server: Server, workload: Workload, tag: str, max_tokens: int) -> dict[str, Any]:
    async with _client(1) as client:
        url = server.base_url + "/v1/chat/completions"
        origin = time.perf_counter()
        first = await stream_request(client, url, workload.chat_body(server.key, tag, QUESTIONS[0], max_tokens), origin)
        second = await stream_request(client, url, workload.chat_body(server.key, tag, QUESTIONS[1], max_tokens),
                                      origin)
    return {"first": first, "second": second}


def health(server: Server) -> dict[str, Any] | None:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        response = httpx.get(server.base_url + "/health", timeout=5.0)
        if response.status_code == 200:
            result: dict[str, Any] = response.json()
            return result
    return None


# --- the engine alone ----------------------------------------------------------------------------------


def load_engine(path: Path, args: argparse.Namespace, threads: int) -> LlamaCppEngine:
    """slm's engine as ``slm serve`` loads it for this run: the same context (and KV pool), sequences, threads
    and flash attention."""
    return LlamaCppEngine(path, n_ctx=args.n_ctx, threads=threads, max_sequences=args.parallel,
                          flash_attention=args.flash_attn == "on")


def engine_round(engine: LlamaCppEngine, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """The engine alone decoding ``prompts`` together, greedy: one ``evaluate`` reads every prompt, then one a
    step appends each sequence's argmax token, ``max_tokens`` per sequence (end tokens do not stop it)."""
    ids = [engine.tokenize(prompt) for prompt in prompts]
    seqs = [engine.new_sequence() for _ in prompts]
    try:
        start = time.perf_counter()
        tokens = engine.evaluate(list(zip(seqs, ids, strict=True))).argmax(axis=1)  # (B,)
        first = time.perf_counter()
        generated = [tokens]
        for _ in range(max_tokens - 1):
            tokens = engine.evaluate([(seq, [int(t)]) for seq, t in zip(seqs, tokens, strict=True)]).argmax(axis=1)
            generated.append(tokens)
        end = time.perf_counter()
    finally:
        for seq in seqs:
            engine.free(seq)
    out = np.stack(generated, axis=1)  # (B, max_tokens)
    return {
        "sequences": len(seqs),
        "prompt_tokens": [len(i) for i in ids],
        "generated_tokens": int(out.size),
        "prompt_seconds": round(first - start, 6),
        "decode_seconds": round(end - first, 6),
        "decode_tokens_per_second": round(len(seqs) * (max_tokens - 1) / (end - first), 3),
        "tokens_per_second_with_prompts": round(out.size / (end - start), 3),
        "text_head": engine.detokenize(out[0].tolist())[:80],
    }


def summarize_engine(engine_samples: list[dict[str, Any]], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The engine's medians, and slm's aggregate through HTTP at as many clients over them, paired by
    repetition (``http_over_engine`` decides the target; ``..._with_prompts`` counts the prompts' time too)."""
    if not engine_samples:
        return {}
    decode = {s["repetition"]: s["decode_tokens_per_second"] for s in engine_samples}
    whole = {s["repetition"]: s["tokens_per_second_with_prompts"] for s in engine_samples}
    http = by_repetition(samples, SLM, ENGINE_SEQUENCES, "aggregate_tokens_per_second")
    return {
        "sequences": ENGINE_SEQUENCES,
        "decode_tokens_per_second": median(decode.values()),
        "tokens_per_second_with_prompts": median(whole.values()),
        "prompt_ms": median(s["prompt_seconds"] * 1e3 for s in engine_samples),
        "http_tokens_per_second": median(http.values()),
        "http_over_engine": versus(http, decode),
        "http_over_engine_with_prompts": versus(http, whole),
        "repetitions": len(engine_samples),
    }


# --- contention ----------------------------------------------------------------------------------------


def measure(quiet: Quiet, label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``'s result measured by ``quiet`` (servers' CPU not counted as others'), with the load it ran under:
    the share of other processes, this script's (the clients') CPU seconds and each server's."""
    m = quiet.run(label, fn)
    return m.result | {
        "others_cpu_share": round(m.others, 3),
        "client_cpu_seconds": round(m.meter.own_cpu_seconds, 3),
        "server_cpu_seconds": {key: round(used, 3) for key, used in m.meter.process_cpu_seconds.items()},
        "waited_seconds": round(m.waited, 1),
        "retries": m.retries,
    }


# --- summaries -----------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def round_stats(sample: dict[str, Any]) -> dict[str, Any]:
    requests = sample["requests"]
    done = [r for r in requests if r["error"] is None and r["finish_reason"] is not None]
    tokens = [r["completion_tokens"] for r in requests]
    ttft = [r["ttft"] * 1e3 for r in requests if r["ttft"] is not None]
    gaps = [g for r in requests for g in r["gaps_ms"]]
    return {
        "aggregate_tokens_per_second": round(sum(tokens) / sample["wall_seconds"], 3),
        "total_tokens": sum(tokens),
        "wall_seconds": round(sample["wall_seconds"], 4),
        "ttft_ms_p50": pct(ttft, 50),
        "ttft_ms_p95": pct(ttft, 95),
        "per_token_ms_p50": pct(gaps, 50),
        "per_token_ms_p95": pct(gaps, 95),
        "requests": len(requests),
        "completed": len(done),
        "tokens_per_request_min": min(tokens) if tokens else 0,
        "tokens_per_request_max": max(tokens) if tokens else 0,
        "finish_reasons": dict(Counter(str(r["finish_reason"]) for r in requests)),
        "errors": [r["error"] for r in requests if r["error"]][:3],
    }


def versus(ours: dict[int, float], theirs: dict[int, float]) -> dict[str, Any]:
    """``ours`` over ``theirs``, both by repetition: each repetition's ratio, their median (``paired_ratio``,
    which decides a target) and the ratio of the two medians."""
    per = [round(r, 3) for r in paired_ratios(ours, theirs)]
    a, b = median(ours.values()), median(theirs.values())
    return {"paired_ratio": median(per), "per_repetition_ratios": per, "ratio": round(a / b, 3) if a and b else None}


def by_repetition(samples: list[dict[str, Any]], server: str, clients: int, key: str) -> dict[int, float]:
    """A round statistic of one server at one concurrency, by repetition (rounds without it left out)."""
    return {s["repetition"]: s["stats"][key] for s in samples
            if s["server"] == server and s["concurrency"] == clients and s["stats"][key] is not None}


def summarize_throughput(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per concurrency: per server the medians over repetitions, and slm over each peer (``versus``: aggregate
    throughput; ``ttft_p95_versus``: the rounds' TTFT p95, where under 1 favours slm)."""
    out: dict[str, Any] = {}
    for c in sorted({s["concurrency"] for s in samples}):
        per: dict[str, Any] = {}
        for server in SERVERS:
            mine = [s["stats"] for s in samples if s["concurrency"] == c and s["server"] == server]
            if not mine:
                continue
            per[server] = {
                key: median([m[key] for m in mine])
                for key in ("aggregate_tokens_per_second", "ttft_ms_p50", "ttft_ms_p95", "per_token_ms_p50",
                            "per_token_ms_p95", "wall_seconds")
            } | {
                "aggregate_tokens_per_second_range": [min(m["aggregate_tokens_per_second"] for m in mine),
                                                      max(m["aggregate_tokens_per_second"] for m in mine)],
                "completed": sum(m["completed"] for m in mine),
                "requests": sum(m["requests"] for m in mine),
                "tokens_per_request_min": min(m["tokens_per_request_min"] for m in mine),
                "tokens_per_request_max": max(m["tokens_per_request_max"] for m in mine),
                "repetitions": len(mine),
            }
        peers = [peer for peer in PEERS if SLM in per and peer in per]
        per["versus"] = {peer: versus(*(by_repetition(samples, s, c, "aggregate_tokens_per_second")
                                        for s in (SLM, peer))) for peer in peers}
        per["ttft_p95_versus"] = {peer: versus(*(by_repetition(samples, s, c, "ttft_ms_p95") for s in (SLM, peer)))
                                  for peer in peers}
        out[str(c)] = per
    return out


def summarize_prefix(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for server in SERVERS:
        mine = [s for s in samples if s["server"] == server]
        if not mine:
            continue
        first = {s["repetition"]: s["first"]["ttft"] * 1e3 for s in mine if s["first"]["ttft"]}
        second = {s["repetition"]: s["second"]["ttft"] * 1e3 for s in mine if s["second"]["ttft"]}
        out[server] = {
            "first_ttft_ms": median(first.values()),
            "second_ttft_ms": median(second.values()),
            **versus(first, second),
            "prompt_tokens": mine[0]["first"]["prompt_tokens"],
            "reused_tokens": [s["second"]["cached_tokens"] for s in mine],
            "completion_tokens": sorted({s[k]["completion_tokens"] for s in mine for k in ("first", "second")}),
            "errors": [s[k]["error"] for s in mine for k in ("first", "second") if s[k]["error"]],
            "repetitions": len(mine),
        }
    return out


# --- the run -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=3, help="runs of every measurement (default 3)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)),
                        help="comma-separated numbers of concurrent clients (default 1,4,8,16)")
    parser.add_argument("--requests-per-client", type=int, default=2,
                        help="requests each client sends one after the other in a round (default 2)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per completion (default 128)")
    parser.add_argument("--prompt-tokens", type=int, default=96,
                        help="length of the completion prompt's text, before its tag (default 96)")
    parser.add_argument("--system-tokens", type=int, default=1000,
                        help="length of the shared system prompt (default 1000)")
    parser.add_argument("--prefix-max-tokens", type=int, default=16, help="max_tokens of the chat pair (default 16)")
    parser.add_argument("--parallel", type=int, default=16,
                        help="slm serve --parallel and llama-server -np (default 16)")
    parser.add_argument("--n-ctx", type=int, default=4096,
                        help="slm's context and KV pool, llama-cpp-python's context (default 4096; llama-server's "
                             "slots get the longest request's)")
    parser.add_argument("--threads", type=int, default=None, help="threads on every server (default: all cores)")
    parser.add_argument("--flash-attn", choices=("on", "off"), default="on",
                        help="flash attention on every server (default on: what llama.cpp's AUTO picks here)")
    add_run_options(parser, unit="measurement", retries=2,
                    quick="a smoke test (1 repetition, 1, 8 and 16 clients, 1 request each, 32 tokens)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repetitions, args.requests_per_client, args.max_tokens = 1, 1, 32
        args.retries, args.max_wait = 0, 2.0
        if args.concurrency == ",".join(map(str, CONCURRENCY)):
            args.concurrency = ",".join(map(str, QUICK_CONCURRENCY))
    if args.max_tokens < 2:
        parser.error("--max-tokens must be at least 2")
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return args


def make_workload(args: argparse.Namespace) -> tuple[Workload, dict[str, int]]:
    """The requests' texts, cut with the model's own tokenizer, and the token counts of the longest ones."""
    tokenizer = slm.load(MODEL, n_ctx=2048, threads=1)
    try:
        prompt_text = tokenizer.detokenize(tokenizer.tokenize(PROMPT_TEXT)[: args.prompt_tokens])
        system_ids = tokenizer.tokenize(f"You are the reference assistant of a public library. {LIBRARY_NOTES} "
                                        f"Background reading for questions about printing: {PROMPT_TEXT}")
        system_text = tokenizer.detokenize(system_ids[: args.system_tokens])
        # End the system prompt at a sentence end, just under the budget ("Session N. " comes before it).
        system_text = system_text[: system_text.rfind(". ") + 1]
        workload = Workload(args.max_tokens, prompt_text, system_text,
                            len(tokenizer.tokenize(f"Session 1.1. {system_text}")))
        longest_tag = f"{args.repetitions}.{max(args.concurrency)}.{max(args.concurrency)}.{args.requests_per_client}"
        counts = {
            "prompt_tokens_without_tag": len(tokenizer.tokenize(prompt_text)),
            "completion_request": len(tokenizer.tokenize(workload.completion_prompt(longest_tag))) + args.max_tokens,
            "chat_request": workload.system_tokens + max(len(tokenizer.tokenize(q)) for q in QUESTIONS)
            + CHAT_TEMPLATE_TOKENS + args.prefix_max_tokens,
        }
    finally:
        tokenizer.close()
    return workload, counts


def servers_for(args: argparse.Namespace, threads: int, model_path: Path, binary: Path, slot_ctx: int,
                logs: Path) -> dict[str, Server]:
    """The three servers on the same file, threads and flash attention; ``-np`` = slm's ``--parallel``."""
    slm_port, peer_port, lcp_port = free_port(), free_port(), free_port()
    return {
        SLM: Server(SLM, [slm_executable(), "serve", MODEL, "--host", "127.0.0.1",
                          "--port", str(slm_port), "--parallel", str(args.parallel), "--ctx-size",
                          str(args.n_ctx), "--threads", str(threads), "--flash-attn", args.flash_attn],
                    slm_port, "/health", logs / "slm.log", env={"SLM_VERBOSE": "1"}),
        PEER: Server(PEER, [str(binary), "-m", str(model_path), "-a", MODEL, "-t", str(threads), "-tb", str(threads),
                            "-c", str(args.parallel * slot_ctx), "-np", str(args.parallel), "-fa", args.flash_attn,
                            "--host", "127.0.0.1", "--port", str(peer_port), "--no-webui"],
                     peer_port, "/health", logs / "llama-server.log"),
        LCP: Server(LCP, [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--model_alias",
                          MODEL, "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx",
                          str(args.n_ctx), "--flash_attn", str(args.flash_attn == "on"),
                          "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(lcp_port)],
                    lcp_port, "/v1/models", logs / "llama-cpp-python.log"),
    }


def peer_context(peer: Server, logs: Path) -> dict[str, Any]:
    """The llama.cpp context settings of llama-server's command (flash attention, cells, sequences, unified
    KV), which its default verbosity does not print: the same command started once with ``-lv 4`` until it
    answers, then stopped."""
    probe = Server(f"{peer.key} -lv 4", [*peer.command, "-lv", "4"], peer.port, peer.ready_path,
                   logs / "llama-server-lv4.log")
    try:
        probe.start()
    finally:
        probe.stop()
    return log_settings(probe.log_text())


def rotated(items: tuple[str, ...], shift: int) -> list[str]:
    """``items`` rotated left by ``shift``: over ``len(items)`` consecutive shifts each goes first once."""
    k = shift % len(items)
    return list(items[k:] + items[:k])


def round_order(rep: int, index: int, clients: int) -> list[str]:
    """Who runs the ``index``-th concurrency's rounds of repetition ``rep``, in order: the servers in rotation;
    at ``ENGINE_SEQUENCES`` clients the engine beside slm, right before it in even repetitions and right after
    it in odd ones."""
    order = rotated(SERVERS, rep + index)
    if clients == ENGINE_SEQUENCES:
        order.insert(order.index(SLM) + rep % 2, ENGINE)
    return order


@dataclass
class Run:
    """A run's servers, engine and requests, and what it measured with them."""

    args: argparse.Namespace
    workload: Workload
    servers: dict[str, Server]
    engine: LlamaCppEngine
    quiet: Quiet
    console: Console
    samples: list[dict[str, Any]] = field(default_factory=list)
    engine_samples: list[dict[str, Any]] = field(default_factory=list)
    prefix_samples: list[dict[str, Any]] = field(default_factory=list)
    warmup: dict[str, Any] = field(default_factory=dict)

    def measure_all(self) -> None:
        """Warm-up, then every round of every repetition in ``round_order``, then the shared-prefix pairs."""
        self.warm_up()
        for rep in range(self.args.repetitions):
            for i, c in enumerate(self.args.concurrency):
                for position, key in enumerate(round_order(rep, i, c)):
                    if key == ENGINE:
                        self.measure_engine(c, rep, position)
                    else:
                        self.measure_server(key, c, rep, position)
        for rep in range(self.args.repetitions):
            for position, key in enumerate(rotated(SERVERS, rep)):
                self.measure_prefix(key, rep, position)

    def warm_up(self) -> None:
        """One completion and one shared-prefix pair per server, checking that a completion runs to
        max_tokens; the engine decoding the same completion's prompt among others."""
        max_tokens = self.args.max_tokens
        for key, s in self.servers.items():
            r = asyncio.run(throughput_round(s, self.workload, 1, 1, rep=-1))["requests"][0]
            pair = asyncio.run(prefix_pair(s, self.workload, "0.0", self.args.prefix_max_tokens))
            self.warmup[key] = {"completion": r, "chat": pair}
            self.console.print(f"  warm-up {key:17} {r['completion_tokens']} tokens ({r['finish_reason']}, "
                               f"{r['chunks_with_text']} chunks with text): {r['text_head'][:60]!r}")
            if r["error"] or r["completion_tokens"] < max_tokens:
                self.console.print(f"[yellow]  {key}: the warm-up completion did not run to {max_tokens} tokens[/]")
        tags = ["0.1.1.1", *(f"0.{ENGINE_SEQUENCES}.{k + 1}.1" for k in range(1, ENGINE_SEQUENCES))]
        e = engine_round(self.engine, [self.workload.completion_prompt(tag) for tag in tags], max_tokens)
        self.warmup[ENGINE] = {"completion": {"completion_tokens": max_tokens, **e}}
        self.console.print(f"  warm-up {ENGINE:17} {e['decode_tokens_per_second']:.1f} tok/s decoding "
                           f"{ENGINE_SEQUENCES} sequences: {e['text_head'][:60]!r}")

    def measure_server(self, key: str, clients: int, rep: int, position: int) -> None:
        s, n = self.servers[key], self.args.requests_per_client
        result = measure(self.quiet, f"{key} {clients} clients rep {rep}", lambda: asyncio.run(
            throughput_round(s, self.workload, clients, n, rep)))
        stats = round_stats(result)
        self.samples.append({"server": key, "concurrency": clients, "repetition": rep, "order": position,
                             "stats": stats, **result})
        self.console.print(
            f"  rep {rep} {clients:2} clients {key:17} {stats['aggregate_tokens_per_second']:7.1f} tok/s  "
            f"TTFT p50 {stats['ttft_ms_p50']} ms  p95 {stats['ttft_ms_p95']} ms  per-token p50 "
            f"{stats['per_token_ms_p50']} ms  {stats['completed']}/{stats['requests']} done, "
            f"{stats['tokens_per_request_min']}-{stats['tokens_per_request_max']} tokens  "
            f"others {result['others_cpu_share']:.0%}" + (f"  [red]{stats['errors'][0]}[/]" if stats["errors"] else ""))

    def measure_engine(self, sequences: int, rep: int, position: int) -> None:
        """The engine on the prompts of slm's first requests of this repetition's round at as many clients."""
        prompts = [self.workload.completion_prompt(f"{rep + 1}.{sequences}.{k + 1}.1") for k in range(sequences)]
        result = measure(self.quiet, f"engine {sequences} sequences rep {rep}",
                         lambda: engine_round(self.engine, prompts, self.args.max_tokens))
        self.engine_samples.append({"repetition": rep, "order": position, **result})
        self.console.print(f"  rep {rep} {sequences:2} sequences {ENGINE:15} {result['decode_tokens_per_second']:7.1f}"
                           f" tok/s decoding, {result['tokens_per_second_with_prompts']:.1f} with prompts  "
                           f"others {result['others_cpu_share']:.0%}")

    def measure_prefix(self, key: str, rep: int, position: int) -> None:
        s = self.servers[key]
        result = measure(self.quiet, f"{key} prefix rep {rep}", lambda: asyncio.run(
            prefix_pair(s, self.workload, f"{rep + 1}.1", self.args.prefix_max_tokens)))
        self.prefix_samples.append({"server": key, "repetition": rep, "order": position, **result})
        f, sec = result["first"], result["second"]
        self.console.print(
            f"  rep {rep} prefix {key:17} first TTFT {f['ttft'] and f['ttft'] * 1e3:.1f} ms, second "
            f"{sec['ttft'] and sec['ttft'] * 1e3:.1f} ms ({f['prompt_tokens']} / {sec['prompt_tokens']} "
            f"prompt tokens, reused {sec['cached_tokens']})"
            + (f"  [red]{f['error'] or sec['error']}[/]" if f["error"] or sec["error"] else ""))


def main(argv: list[str] | None = None) -> int:
    # Imported here: structured.py imports this module's Server, so an import at the top would be circular.
    from structured import CMAKE_OPTIONS, llama_server, llama_server_settings, llama_server_version

    started = time.perf_counter()
    args = parse_args(argv)
    output = output_directory(args)
    threads = args.threads or default_threads()
    console = terminal(180)

    resolved = slm.store.catalog.resolve(MODEL)
    model_path = resolved.path
    info = machine()
    binary = llama_server(console)
    peer_version = llama_server_version(binary)
    workload, counts = make_workload(args)
    # llama-server splits -c among its slots (no --kv-unified): each slot holds the run's longest request.
    slot_need = max(counts["completion_request"], counts["chat_request"])
    slot_ctx = -(-slot_need // SLOT_ROUNDING) * SLOT_ROUNDING

    console.print(f"[bold]serve[/] · {info['cpu']} · {info['cores']} cores · {model_path.name} · "
                  f"llama-server {peer_version}")
    console.print(f"threads={threads} n_ctx={args.n_ctx} parallel={args.parallel} llama-server slot={slot_ctx} "
                  f"clients={args.concurrency} requests/client={args.requests_per_client} "
                  f"max_tokens={args.max_tokens} prompt={counts['prompt_tokens_without_tag']}+tag tokens "
                  f"system={workload.system_tokens} tokens repetitions={args.repetitions}")

    logs = Path(tempfile.mkdtemp(prefix="slm-serve-bench-"))
    servers = servers_for(args, threads, model_path, binary, slot_ctx, logs)
    quiet = Quiet(args.max_contention, args.retries, args.max_wait,
                  processes={key: s.cpu_seconds for key, s in servers.items()})
    exit_codes: dict[str, int | None] = {}
    health_at_end: dict[str, Any] = {}
    stop_on_signals()
    engine = load_engine(model_path, args, threads)
    engine_settings = {"n_ctx": engine.info.context_length, "kv_cells": engine.info.kv_cells,
                       "max_sequences": engine.max_sequences, "n_batch": engine.n_batch, "threads": engine.threads,
                       "flash_attention": args.flash_attn == "on", "sequences_decoded": ENGINE_SEQUENCES}
    run = Run(args, workload, servers, engine, quiet, console)
    try:
        peer_actual = peer_context(servers[PEER], logs)
        for s in servers.values():
            console.print(f"starting {s.key}: {s.shown_command}")
            s.start()
            console.print(f"  up in {s.start_seconds:.1f} s")
        run.measure_all()
        health_at_end = {SLM: health(servers[SLM])}
    finally:
        for key, s in servers.items():
            exit_codes[key] = s.stop()
        engine.close()

    actual = {key: log_settings(s.log_text()) for key, s in servers.items()}
    actual[PEER] = peer_actual | llama_server_settings(servers[PEER].log_text())
    samples, prefix_samples = run.samples, run.prefix_samples
    throughput = summarize_throughput(samples)
    prefix = summarize_prefix(prefix_samples)
    engine_summary = summarize_engine(run.engine_samples, samples)
    kv_full = servers[SLM].log_text().count("failed to find a memory slot")
    notes = observations(samples, prefix_samples, run.warmup, args.max_tokens, health_at_end.get(SLM), kv_full)
    info["load_average_at_end"] = os.getloadavg()
    report: dict[str, Any] = report_head("serve", started) | {
        "machine": info | {"versions": package_versions(VERSIONS)},
        "llama_server": {"path": str(binary), "version": peer_version, "cmake_options": list(CMAKE_OPTIONS),
                         "source": f"llama-cpp-python {info['llama_cpp_python']} sdist, vendor/llama.cpp"},
        "settings": {
            "model": resolved.name,
            **model_file(model_path),
            "threads": threads,
            "n_ctx": args.n_ctx,
            "slm_parallel": args.parallel,
            "llama_server_parallel": args.parallel,
            "llama_server_slot_ctx": slot_ctx,
            "llama_server_ctx": args.parallel * slot_ctx,
            "longest_request_tokens": counts,
            "flash_attn": args.flash_attn == "on",
            "concurrency": args.concurrency,
            "requests_per_client": args.requests_per_client,
            "max_tokens": args.max_tokens,
            "prompt_tokens_without_tag": counts["prompt_tokens_without_tag"],
            "prompt_text": workload.prompt_text,
            "system_prompt_tokens": workload.system_tokens,
            "system_prompt": f"Session <tag>. {workload.system_text}",
            "questions": QUESTIONS,
            "prefix_max_tokens": args.prefix_max_tokens,
            "repetitions": args.repetitions,
            "max_contention": args.max_contention,
            "retries": args.retries,
            "max_wait_seconds": args.max_wait,
            "quick": args.quick,
            "commands": {key: s.shown_command for key, s in servers.items()},
            "slm_environment": servers[SLM].env,
            "request_extras": {key: extras(key) for key in SERVERS},
        },
        "actual": actual,
        "server_start_seconds": {key: round(s.start_seconds, 2) for key, s in servers.items()},
        "server_exit_codes": exit_codes,
        "slm_kv_cache_full_events": kv_full,
        "slm_health_at_end": health_at_end.get(SLM),
        "method": METHOD,
        "throughput": throughput,
        "engine": {"settings": engine_settings, **engine_summary},
        "prefix": prefix,
        "targets": build_targets(throughput, engine_summary, prefix),
        "notes": notes,
        "warmup": run.warmup,
        "rejected_for_contention": quiet.rejected,
        "samples": samples,
        "engine_samples": run.engine_samples,
        "prefix_samples": prefix_samples,
    }
    for table in render_tables(report):
        console.print(table)
    for line in notes:
        console.print(line)
    markdown = render_markdown(report)  # rendered on every run, so that --quick checks the template too
    console.print(f"wall time {report['wall_seconds']:.0f} s · server logs in {logs}")
    if output is not None:
        data, prose = write_results(output, "serve", report, markdown, indent=1, ensure_ascii=False,
                                    inline_number_lists=True)
        console.print(f"wrote {data} and {prose}")
    return 0


def observations(samples: list[dict[str, Any]], prefix_samples: list[dict[str, Any]], warmup: dict[str, Any],
                 max_tokens: int, slm_health: dict[str, Any] | None, kv_full: int) -> list[str]:
    """What the reader should know about the run, found in its own data."""
    notes = []
    for server in SERVERS:
        requests = [r for s in samples if s["server"] == server for r in s["requests"]]
        short = [r for r in requests if r["completion_tokens"] != max_tokens]
        failed = [r for r in requests if r["error"] or r["finish_reason"] is None]
        if short:
            notes.append(fill(REPORT["note_short"], server=server, short=len(short), requests=len(requests),
                              max_tokens=max_tokens, counts=sorted({r["completion_tokens"] for r in short}),
                              reasons=sorted({str(r["finish_reason"]) for r in short})))
        if failed:
            notes.append(fill(REPORT["note_failed"], server=server, failed=len(failed), requests=len(requests),
                              error=failed[0]["error"]))
        errors = [p[k]["error"] for p in prefix_samples if p["server"] == server for k in ("first", "second")
                  if p[k]["error"]]
        if errors:
            notes.append(fill(REPORT["note_prefix_failed"], server=server, failed=len(errors), error=errors[0]))
    for server in USAGE:
        requests = [r for s in samples if s["server"] == server for r in s["requests"]]
        mismatched = [r for r in requests if r["chunks_with_text"] != r["completion_tokens"]]
        if mismatched:
            notes.append(fill(REPORT["note_chunks"], server=server, mismatched=len(mismatched),
                              requests=len(requests)))
    if SLM in warmup:
        ours = warmup[SLM]["completion"]
        others = [fill(REPORT["warmup_same" if theirs["text_head"] == ours["text_head"] else "warmup_different"],
                       server=key, tokens=theirs["completion_tokens"], text=theirs["text_head"][:60])
                  for key in (*PEERS, ENGINE) if key in warmup for theirs in [warmup[key]["completion"]]]
        notes.append(fill(REPORT["note_warmup"], tokens=ours["completion_tokens"], text=ours["text_head"][:60],
                          others="; ".join(others)))
    stats = (slm_health or {}).get("models", {}).get(MODEL)
    if stats:
        notes.append(fill(REPORT["note_scheduler"], **{key: stats.get(key) for key in (
            "finished", "failed", "cancelled", "steps", "prefix_cache_hits", "prefix_cache_lookups",
            "prefix_cache_hit_tokens")}))
    if kv_full:
        notes.append(fill(REPORT["note_kv_full"], kv_full=kv_full))
    return notes


# --- targets and reports -------------------------------------------------------------------------------


def build_targets(throughput: dict[str, Any], engine: dict[str, Any], prefix: dict[str, Any]) -> dict[str, Any]:
    """Each target of ``TARGETS`` with its figures and whether it is met (None: not measured)."""

    def at(clients: int, peer: str, key: str = "versus") -> dict[str, Any] | None:
        found: dict[str, Any] | None = throughput.get(str(clients), {}).get(key, {}).get(peer)
        return found

    figures = {
        "one_client_vs_llama_server": at(1, PEER),
        "eight_clients_vs_llama_server": at(8, PEER),
        "sixteen_clients_vs_llama_server": at(16, PEER),
        "ttft_p95_sixteen_clients_vs_llama_server": at(16, PEER, "ttft_p95_versus"),
        "http_over_engine": engine.get("http_over_engine"),
        "one_client_vs_llama_cpp_python": at(1, LCP),
        "eight_clients_vs_llama_cpp_python": at(8, LCP),
        "shared_prefix": prefix.get(SLM),
    }
    out = {}
    for t in TARGETS:
        f = figures[t.name] or {}
        paired = f.get("paired_ratio")
        met = None if paired is None else paired <= t.needed if t.at_most else paired >= t.needed
        out[t.name] = {"source": t.source, "what": t.what, "target": t.needed, "at_most": t.at_most,
                       "paired_ratio": paired, "per_repetition_ratios": f.get("per_repetition_ratios"),
                       "ratio": f.get("ratio"), "met": met}
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _versus(v: dict[str, Any] | None) -> str:
    """A ratio cell: the median of the per-repetition ratios, the ratio of the medians in brackets."""
    return "" if v is None else f"{_times(v['paired_ratio'])} ({_times(v['ratio'])})"


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "not met"


THROUGHPUT_HEADER = ("clients", "server", "aggregate tok/s", "slm / it", "TTFT p50 ms", "TTFT p95 ms",
                     "slm / it, TTFT p95", "per-token p50 ms", "per-token p95 ms", "completed", "tokens/request")
THROUGHPUT_ALIGN = "rlrrrrrrrrr"


def _throughput_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for c, per in report["throughput"].items():
        for server in SERVERS:
            if server not in per:
                continue
            s = per[server]
            tokens = (str(s["tokens_per_request_min"]) if s["tokens_per_request_min"] == s["tokens_per_request_max"]
                      else f"{s['tokens_per_request_min']}-{s['tokens_per_request_max']}")
            rows.append((c, server, _fmt(s["aggregate_tokens_per_second"]), _versus(per["versus"].get(server)),
                         _fmt(s["ttft_ms_p50"]), _fmt(s["ttft_ms_p95"]), _versus(per["ttft_p95_versus"].get(server)),
                         _fmt(s["per_token_ms_p50"], 2), _fmt(s["per_token_ms_p95"], 2),
                         f"{s['completed']}/{s['requests']}", tokens))
    return rows


PREFIX_HEADER = ("server", "1st request TTFT ms", "2nd request TTFT ms", "1st / 2nd", "prompt tokens",
                 "reused by the 2nd")
PREFIX_ALIGN = "lrrrrr"


def _prefix_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for server in SERVERS:
        p = report["prefix"].get(server)
        if p is None:
            continue
        reused = [str(r) for r in p["reused_tokens"] if r is not None]
        rows.append((server, _fmt(p["first_ttft_ms"]), _fmt(p["second_ttft_ms"]), _versus(p),
                     "-" if p["prompt_tokens"] is None else str(p["prompt_tokens"]), ", ".join(reused) or "-"))
    return rows


ENGINE_HEADER = ("measured", "median", "per repetition")
ENGINE_ALIGN = "lrr"


def _engine_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    e = report["engine"]
    if "decode_tokens_per_second" not in e:
        return []
    n = e["sequences"]

    def values(key: str, digits: int = 1) -> str:
        return ", ".join(f"{x[key]:.{digits}f}" for x in report["engine_samples"])

    http = [f"{x['stats']['aggregate_tokens_per_second']:.1f}" for x in report["samples"]
            if x["server"] == SLM and x["concurrency"] == n]
    ratios = {key: e[key] for key in ("http_over_engine", "http_over_engine_with_prompts")}
    return [
        (f"engine, {n} sequences batched: decode steps", _fmt(e["decode_tokens_per_second"]),
         values("decode_tokens_per_second")),
        (f"engine, {n} sequences batched: prompts included", _fmt(e["tokens_per_second_with_prompts"]),
         values("tokens_per_second_with_prompts")),
        (f"slm serve, {n} streaming clients (aggregate)", _fmt(e["http_tokens_per_second"]), ", ".join(http)),
        *((f"HTTP / engine{' with prompts' if key.endswith('prompts') else ''}", _versus(v),
           ", ".join(_times(r) for r in v["per_repetition_ratios"]) or "-") for key, v in ratios.items()),
    ]


TARGET_HEADER = ("target", "from", "needed", "measured", "per repetition", "of medians", "verdict")
TARGET_ALIGN = "llrrrrl"


def _target_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(t["what"], t["source"], f"{'<=' if t['at_most'] else '>='} {t['target']:.1f}x", _times(t["paired_ratio"]),
             ", ".join(_times(r) for r in t["per_repetition_ratios"] or []) or "-", _times(t["ratio"]),
             _verdict(t["met"]))
            for t in report["targets"].values()]


def render_tables(report: dict[str, Any]) -> list[Table]:
    s = report["settings"]
    return [
        console_table(f"Streaming /v1/completions, {s['max_tokens']} tokens per request · medians of "
                      f"{s['repetitions']} · slm / it: median of the per-repetition ratios (of the medians)",
                      THROUGHPUT_HEADER, _throughput_rows(report), THROUGHPUT_ALIGN),
        console_table(f"The engine alone and through HTTP · medians of {s['repetitions']}", ENGINE_HEADER,
                      _engine_rows(report), ENGINE_ALIGN),
        console_table(f"Shared {s['system_prompt_tokens']}-token system prompt, /v1/chat/completions · medians of "
                      f"{s['repetitions']}", PREFIX_HEADER, _prefix_rows(report), PREFIX_ALIGN),
        console_table("Targets", TARGET_HEADER, _target_rows(report), TARGET_ALIGN),
    ]


def render_markdown(report: dict[str, Any]) -> str:
    """serve.md: the template's sections filled from the report."""
    m, s, a = report["machine"], report["settings"], report["actual"]
    measurements = report["samples"] + report["prefix_samples"]
    notes = report.get("notes") or []
    return fill(
        REPORT["report"], **report, versions=m["versions"], minutes=report["wall_seconds"] / 60,
        slm_flash_attention=flash_attention(a[SLM]), llama_server_flash_attention=flash_attention(a[PEER]),
        llama_cpp_python_flash_attention=flash_attention(a[LCP]),
        slm_actual=dict.fromkeys(("n_seq_max", "kv_unified"), "?") | a[SLM],
        peer_actual=dict.fromkeys(("n_slots", "n_ctx_slot", "kv_unified"), "?") | a[PEER],
        cmake=" ".join(report["llama_server"]["cmake_options"]),
        kv_need=_kv_need(report), load_at_start=load_average(m["load_average_at_start"]),
        load_at_end=load_average(m["load_average_at_end"]), redone=len(report["rejected_for_contention"]),
        contended=sum(x["others_cpu_share"] > s["max_contention"] for x in measurements),
        measured=len(measurements),
        throughput_table=markdown_table(THROUGHPUT_HEADER, _throughput_rows(report), THROUGHPUT_ALIGN),
        engine_table=markdown_table(ENGINE_HEADER, _engine_rows(report), ENGINE_ALIGN),
        prefix_table=markdown_table(PREFIX_HEADER, _prefix_rows(report), PREFIX_ALIGN),
        target_table=markdown_table(TARGET_HEADER, _target_rows(report), TARGET_ALIGN),
        notes_section=fill(REPORT["notes"], notes="\n".join(f"- {n}" for n in notes)) if notes else "",
    ) + "\n"


def _kv_need(report: dict[str, Any]) -> str:
    """How much of slm's KV pool the most concurrent round's running requests need by themselves."""
    prompts = [r["prompt_tokens"] for x in report["samples"] if x["server"] == SLM for r in x["requests"]
               if r["prompt_tokens"]]
    if not prompts:
        return ""
    clients, prompt, tokens = max(report["settings"]["concurrency"]), max(prompts), report["settings"]["max_tokens"]
    return fill(REPORT["kv_need"], clients=clients, prompt=prompt, tokens=tokens, cells=clients * (prompt + tokens))


if __name__ == "__main__":
    sys.exit(main())
