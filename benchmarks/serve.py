"""Serving benchmark: ``slm serve`` against llama-cpp-python's own server (``python -m llama_cpp.server``).

One run starts both servers as subprocesses on the same model file (the catalog's smollm2, SmolLM2-135M
Q4_1), the same threads (all available cores, for generation and for prompts) and the same context size, and
measures them alternately, never at the same moment (the idle one waits on its socket):

1. Throughput and latency: 1, 4, 8 and 16 concurrent streaming clients (asyncio + httpx), each sending
   ``--requests-per-client`` requests back to back to ``POST /v1/completions`` with ``"stream": true``,
   temperature 0, ``max_tokens`` 128 and a raw, unfinished English text (about 100 tokens) that the model
   continues rather than ends. Every request's prompt starts with its own tag ("Chapter 2.8.3.1."), so no
   request finds its prompt in either server's prefix cache. Per server and concurrency: aggregate generated
   tokens/s (all tokens / wall time of the round), time to first token p50/p95, per-token latency p50/p95
   (gaps between streamed chunks after the first) and requests completed. slm's token counts come from
   ``stream_options.include_usage``; llama-cpp-python's server has no usage in streams, so its count is the
   number of streamed chunks that carry text (one per token).
2. Shared prefix: a ~1,000-token system prompt in ``POST /v1/chat/completions`` (stream, ``max_tokens`` 16),
   sent twice, one after the other, with different user questions; the time to first token of the first and
   of the second request and their ratio. Each repetition uses a new system prompt (its first words differ),
   so the first request of a pair never finds it cached.

Each measurement waits for a quiet machine, records the share of the CPU that processes other than this
script and the two servers used meanwhile (/proc/stat), and is redone when that share was too high. Every
measurement is repeated (``--repetitions``, default 3; the server that goes first alternates) and the medians
are reported.

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
    templates,
    terminal,
    write_results,
)
from slm.engines.llamacpp import default_threads

MODEL = "smollm2"
SLM = "slm"
LCP = "llama-cpp-python"
SERVERS = (SLM, LCP)
CONCURRENCY = (1, 4, 8, 16)
TARGET_ONE_CLIENT = 1.1
TARGET_EIGHT_CLIENTS = 2.0
TARGET_PREFIX = 5.0

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
"""The packages whose versions the report names: the two servers' stacks and the clients'."""
METHOD = {
    "throughput": "per round: N clients start at once, each streams its requests one after the other; "
                  "aggregate tokens/s = all completion tokens of the round / wall time from the start "
                  "to the last request's end",
    "ttft": "from the client's call to the first server-sent event carrying a choice",
    "per_token": "gaps between consecutive streamed chunks carrying text, after the first, pooled over "
                 "the round's requests",
    "tokens": f"{SLM}: usage.completion_tokens (stream_options.include_usage); {LCP}: streamed chunks "
              "carrying text",
    "medians": "p50/p95 are taken per round, then the median over repetitions; ratio = slm median / "
               "llama-cpp-python median; paired_ratio = median over repetitions of the per-repetition "
               "ratio",
    "order": "per repetition and concurrency the server that goes first alternates; the other server is "
             "idle meanwhile",
    "others_cpu_share": "share of the machine's CPU time used by processes other than this script and "
                        "the two servers during a measurement (/proc/stat, /proc/PID/stat)",
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

    def completion_body(self, server: str, tag: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL, "prompt": f"Chapter {tag}. {self.prompt_text}", "stream": True,
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
    """slm: usage in the stream's last event. llama-cpp-python: no repeat penalty (its server's default is
    1.1, slm's none), so both sides sample the same greedy tokens; its server has no stream_options."""
    return {"stream_options": {"include_usage": True}} if server == SLM else {"repeat_penalty": 1.0}


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


def summarize_throughput(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per concurrency: per server the medians over repetitions, and the slm / llama-cpp-python ratio of
    aggregate throughput (of the medians, and the median of the per-repetition ratios)."""
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
        if SLM in per and LCP in per:
            per["ratio"] = round(per[SLM]["aggregate_tokens_per_second"] / per[LCP]["aggregate_tokens_per_second"], 3)
            throughput = {server: {s["repetition"]: s["stats"]["aggregate_tokens_per_second"] for s in samples
                                   if s["concurrency"] == c and s["server"] == server} for server in SERVERS}
            per["per_repetition_ratios"] = [round(r, 3) for r in paired_ratios(throughput[SLM], throughput[LCP])]
            per["paired_ratio"] = median(per["per_repetition_ratios"])
        out[str(c)] = per
    return out


def summarize_prefix(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for server in SERVERS:
        mine = [s for s in samples if s["server"] == server]
        if not mine:
            continue
        first = [s["first"]["ttft"] * 1e3 for s in mine if s["first"]["ttft"] is not None]
        second = [s["second"]["ttft"] * 1e3 for s in mine if s["second"]["ttft"] is not None]
        out[server] = {
            "first_ttft_ms": median(first),
            "second_ttft_ms": median(second),
            "ratio": round(median(first) / median(second), 3) if first and second else None,  # type: ignore[operator]
            "per_repetition_ratios": [round(s["first"]["ttft"] / s["second"]["ttft"], 3) for s in mine
                                      if s["first"]["ttft"] and s["second"]["ttft"]],
            "prompt_tokens": [s["first"]["prompt_tokens"] for s in mine][:1][0],
            "completion_tokens": sorted({s[k]["completion_tokens"] for s in mine for k in ("first", "second")}),
            "errors": [s[k]["error"] for s in mine for k in ("first", "second") if s[k]["error"]],
            "repetitions": len(mine),
        }
        out[server]["paired_ratio"] = median(out[server]["per_repetition_ratios"])
    return out


# --- the run -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
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
    parser.add_argument("--parallel", type=int, default=16, help="slm serve --parallel (default 16)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context size on both servers (default 4096)")
    parser.add_argument("--threads", type=int, default=None, help="threads on both servers (default: all cores)")
    parser.add_argument("--flash-attn", choices=("on", "off"), default="on",
                        help="flash attention on both servers (default on: what llama.cpp's AUTO picks here)")
    add_run_options(parser, unit="measurement", retries=2,
                    quick="a smoke test (1 repetition, 1 and 4 clients, 1 request each, 32 tokens)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repetitions, args.requests_per_client, args.max_tokens = 1, 1, 32
        args.retries, args.max_wait = 0, 2.0
        if args.concurrency == ",".join(map(str, CONCURRENCY)):
            args.concurrency = "1,4"
    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    output = output_directory(args)
    threads = args.threads or default_threads()
    console = terminal(160)

    resolved = slm.store.catalog.resolve(MODEL)
    model_path = resolved.path
    info = machine()
    tokenizer = slm.load(MODEL, n_ctx=2048, threads=1)
    prompt_ids = tokenizer.tokenize(PROMPT_TEXT)[: args.prompt_tokens]
    prompt_text = tokenizer.detokenize(prompt_ids)
    system_ids = tokenizer.tokenize(f"You are the reference assistant of a public library. {LIBRARY_NOTES} "
                                    f"Background reading for questions about printing: {PROMPT_TEXT}")
    system_text = tokenizer.detokenize(system_ids[: args.system_tokens])
    # End the system prompt at a sentence end, just under the budget ("Session N. " comes before it).
    system_text = system_text[: system_text.rfind(". ") + 1]
    system_tokens = len(tokenizer.tokenize(f"Session 1.1. {system_text}"))
    tokenizer.close()
    workload = Workload(args.max_tokens, prompt_text, system_text, system_tokens)

    console.print(f"[bold]serve[/] · {info['cpu']} · {info['cores']} cores · {model_path.name}")
    console.print(f"threads={threads} n_ctx={args.n_ctx} parallel={args.parallel} clients={concurrency} "
                  f"requests/client={args.requests_per_client} max_tokens={args.max_tokens} "
                  f"prompt={len(prompt_ids)}+tag tokens system={system_tokens} tokens "
                  f"repetitions={args.repetitions}")

    logs = Path(tempfile.mkdtemp(prefix="slm-serve-bench-"))
    slm_port, lcp_port = free_port(), free_port()
    servers = {
        SLM: Server(SLM, [slm_executable(), "serve", MODEL, "--host", "127.0.0.1",
                          "--port", str(slm_port), "--parallel", str(args.parallel), "--ctx-size",
                          str(args.n_ctx), "--threads", str(threads), "--flash-attn", args.flash_attn],
                    slm_port, "/health", logs / "slm.log", env={"SLM_VERBOSE": "1"}),
        LCP: Server(LCP, [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--model_alias",
                          MODEL, "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx",
                          str(args.n_ctx), "--flash_attn", str(args.flash_attn == "on"),
                          "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(lcp_port)],
                    lcp_port, "/v1/models", logs / "llama-cpp-python.log"),
    }
    quiet = Quiet(args.max_contention, args.retries, args.max_wait,
                  processes={key: s.cpu_seconds for key, s in servers.items()})
    samples: list[dict[str, Any]] = []
    prefix_samples: list[dict[str, Any]] = []
    warmup: dict[str, Any] = {}
    exit_codes: dict[str, int | None] = {}
    health_at_end: dict[str, Any] = {}
    # Stopped by a signal (even when started in the background, where SIGINT is ignored), stop the servers too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        for s in servers.values():
            console.print(f"starting {s.key}: {s.shown_command}")
            s.start()
            console.print(f"  up in {s.start_seconds:.1f} s")

        # Warm-up, and a check that a completion really runs to max_tokens on both sides.
        for key, s in servers.items():
            round_ = asyncio.run(throughput_round(s, workload, 1, 1, rep=-1))
            pair = asyncio.run(prefix_pair(s, workload, "0.0", args.prefix_max_tokens))
            r = round_["requests"][0]
            warmup[key] = {"completion": r, "chat": pair}
            console.print(f"  warm-up {key:17} {r['completion_tokens']} tokens ({r['finish_reason']}, "
                          f"{r['chunks_with_text']} chunks with text): {r['text_head'][:60]!r}")
            if r["error"] or r["completion_tokens"] < args.max_tokens:
                console.print(f"[yellow]  {key}: the warm-up completion did not run to {args.max_tokens} tokens[/]")

        for rep in range(args.repetitions):
            for i, c in enumerate(concurrency):
                order = SERVERS if (rep + i) % 2 == 0 else SERVERS[::-1]
                for position, key in enumerate(order):
                    s = servers[key]
                    result = measure(quiet, f"{key} {c} clients rep {rep}", lambda s=s, c=c, rep=rep: asyncio.run(
                        throughput_round(s, workload, c, args.requests_per_client, rep)))
                    stats = round_stats(result)
                    samples.append({"server": key, "concurrency": c, "repetition": rep, "order": position,
                                    "stats": stats, **result})
                    console.print(
                        f"  rep {rep} {c:2} clients {key:17} {stats['aggregate_tokens_per_second']:7.1f} tok/s  "
                        f"TTFT p50 {stats['ttft_ms_p50']} ms  per-token p50 {stats['per_token_ms_p50']} ms  "
                        f"{stats['completed']}/{stats['requests']} done, {stats['tokens_per_request_min']}-"
                        f"{stats['tokens_per_request_max']} tokens  others {result['others_cpu_share']:.0%}"
                        + (f"  [red]{stats['errors'][0]}[/]" if stats["errors"] else ""))

        for rep in range(args.repetitions):
            order = SERVERS if rep % 2 == 0 else SERVERS[::-1]
            for position, key in enumerate(order):
                s = servers[key]
                before = health(s) if key == SLM else None
                result = measure(quiet, f"{key} prefix rep {rep}", lambda s=s, rep=rep: asyncio.run(
                    prefix_pair(s, workload, f"{rep + 1}.1", args.prefix_max_tokens)))
                after = health(s) if key == SLM else None
                if before and after:
                    b, a = before["models"].get(MODEL, {}), after["models"].get(MODEL, {})
                    result["prefix_cache_hit_tokens"] = (a.get("prefix_cache_hit_tokens", 0)
                                                         - b.get("prefix_cache_hit_tokens", 0))
                prefix_samples.append({"server": key, "repetition": rep, "order": position, **result})
                f, sec = result["first"], result["second"]
                console.print(
                    f"  rep {rep} prefix {key:17} first TTFT {f['ttft'] and f['ttft'] * 1e3:.1f} ms, second "
                    f"{sec['ttft'] and sec['ttft'] * 1e3:.1f} ms ({f['prompt_tokens']} / {sec['prompt_tokens']} "
                    f"prompt tokens, reused {result.get('prefix_cache_hit_tokens', '?')})"
                    + (f"  [red]{f['error'] or sec['error']}[/]" if f["error"] or sec["error"] else ""))
        health_at_end = {SLM: health(servers[SLM])}
    finally:
        for key, s in servers.items():
            exit_codes[key] = s.stop()

    actual = {key: log_settings(s.log_text()) for key, s in servers.items()}
    throughput = summarize_throughput(samples)
    prefix = summarize_prefix(prefix_samples)
    targets = build_targets(throughput, prefix)
    kv_full = servers[SLM].log_text().count("failed to find a memory slot")
    notes = observations(samples, prefix_samples, warmup, args.max_tokens, health_at_end.get(SLM), kv_full)
    info["load_average_at_end"] = os.getloadavg()
    report: dict[str, Any] = report_head("serve", started) | {
        "machine": info | {"versions": package_versions(VERSIONS)},
        "settings": {
            "model": resolved.name,
            **model_file(model_path),
            "threads": threads,
            "n_ctx": args.n_ctx,
            "slm_parallel": args.parallel,
            "flash_attn": args.flash_attn == "on",
            "concurrency": concurrency,
            "requests_per_client": args.requests_per_client,
            "max_tokens": args.max_tokens,
            "prompt_tokens_without_tag": len(prompt_ids),
            "prompt_text": prompt_text,
            "system_prompt_tokens": system_tokens,
            "system_prompt": f"Session <tag>. {system_text}",
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
        "prefix": prefix,
        "targets": targets,
        "notes": notes,
        "warmup": warmup,
        "rejected_for_contention": quiet.rejected,
        "samples": samples,
        "prefix_samples": prefix_samples,
    }
    for table in render_tables(report):
        console.print(table)
    for line in target_lines(report) + notes:
        console.print(line)
    console.print(f"wall time {report['wall_seconds']:.0f} s · server logs in {logs}")
    if output is not None:
        data, prose = write_results(output, "serve", report, render_markdown(report), indent=1, ensure_ascii=False,
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
    slm_requests = [r for s in samples if s["server"] == SLM for r in s["requests"]]
    mismatched = [r for r in slm_requests if r["chunks_with_text"] != r["completion_tokens"]]
    if mismatched:
        notes.append(fill(REPORT["note_chunks"], mismatched=len(mismatched)))
    if SLM in warmup and LCP in warmup:
        a, b = warmup[SLM]["completion"], warmup[LCP]["completion"]
        same = a["text_head"] == b["text_head"] and a["completion_tokens"] == b["completion_tokens"]
        notes.append(fill(REPORT["note_warmup_same" if same else "note_warmup_different"],
                          tokens=a["completion_tokens"], chunks=b["chunks_with_text"], slm_text=a["text_head"][:60],
                          llama_cpp_python_text=b["text_head"][:60]))
    stats = (slm_health or {}).get("models", {}).get(MODEL)
    if stats:
        notes.append(fill(REPORT["note_scheduler"], **{key: stats.get(key) for key in (
            "finished", "failed", "cancelled", "steps", "prefix_cache_hits", "prefix_cache_lookups",
            "prefix_cache_hit_tokens")}))
    if kv_full:
        notes.append(fill(REPORT["note_kv_full"], kv_full=kv_full))
    return notes


# --- targets and reports -------------------------------------------------------------------------------


def build_targets(throughput: dict[str, Any], prefix: dict[str, Any]) -> dict[str, Any]:
    def ratio_target(clients: int, target: float) -> dict[str, Any]:
        t = throughput.get(str(clients), {})
        paired = t.get("paired_ratio")
        return {"target": target, "ratio": t.get("ratio"), "paired_ratio": paired,
                "per_repetition_ratios": t.get("per_repetition_ratios"),
                "met": paired >= target if paired is not None else None}

    slm_prefix = prefix.get(SLM, {})
    return {
        "one_client": ratio_target(1, TARGET_ONE_CLIENT),
        "eight_clients": ratio_target(8, TARGET_EIGHT_CLIENTS),
        "shared_prefix": {
            "target": TARGET_PREFIX,
            "ratio": slm_prefix.get("ratio"),
            "paired_ratio": slm_prefix.get("paired_ratio"),
            "per_repetition_ratios": slm_prefix.get("per_repetition_ratios"),
            "met": slm_prefix["paired_ratio"] >= TARGET_PREFIX if slm_prefix.get("paired_ratio") else None,
        },
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "not met"


THROUGHPUT_HEADER = ("clients", "server", "aggregate tok/s", "slm / llama-cpp-python", "TTFT p50 ms",
                     "TTFT p95 ms", "per-token p50 ms", "per-token p95 ms", "completed", "tokens/request")
THROUGHPUT_ALIGN = "rlrrrrrrrr"


def _throughput_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for c, per in report["throughput"].items():
        for server in SERVERS:
            if server not in per:
                continue
            s = per[server]
            ratio = (f"{per['paired_ratio']:.2f}x (of medians {per['ratio']:.2f}x)"
                     if server == SLM and per.get("paired_ratio") is not None else "")
            tokens = (str(s["tokens_per_request_min"]) if s["tokens_per_request_min"] == s["tokens_per_request_max"]
                      else f"{s['tokens_per_request_min']}-{s['tokens_per_request_max']}")
            rows.append((c, server, _fmt(s["aggregate_tokens_per_second"]), ratio, _fmt(s["ttft_ms_p50"]),
                         _fmt(s["ttft_ms_p95"]), _fmt(s["per_token_ms_p50"], 2), _fmt(s["per_token_ms_p95"], 2),
                         f"{s['completed']}/{s['requests']}", tokens))
    return rows


PREFIX_HEADER = ("server", "1st request TTFT ms", "2nd request TTFT ms", "1st / 2nd", "prompt tokens")
PREFIX_ALIGN = "lrrrr"


def _prefix_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for server in SERVERS:
        p = report["prefix"].get(server)
        if p is None:
            continue
        rows.append((server, _fmt(p["first_ttft_ms"]), _fmt(p["second_ttft_ms"]),
                     f"{_fmt(p['paired_ratio'], 2)}x (of medians {_fmt(p['ratio'], 2)}x)",
                     "-" if p["prompt_tokens"] is None else str(p["prompt_tokens"])))
    return rows


def render_tables(report: dict[str, Any]) -> list[Table]:
    s = report["settings"]
    return [
        console_table(f"Streaming /v1/completions, {s['max_tokens']} tokens per request · medians of "
                      f"{s['repetitions']}", THROUGHPUT_HEADER, _throughput_rows(report), THROUGHPUT_ALIGN),
        console_table(f"Shared {s['system_prompt_tokens']}-token system prompt, /v1/chat/completions · medians of "
                      f"{s['repetitions']}", PREFIX_HEADER, _prefix_rows(report), PREFIX_ALIGN),
    ]


def target_lines(report: dict[str, Any]) -> list[str]:
    t = report["targets"]
    figures = {
        f"{name}_figures": fill(
            REPORT["figures"], paired_ratio=_fmt(x["paired_ratio"], 2), ratio=_fmt(x["ratio"], 2),
            per_repetition=", ".join(f"{r:.2f}x" for r in x.get("per_repetition_ratios") or []) or "-",
            verdict=_verdict(x["met"]),
        )
        for name, x in t.items()
    }
    return fill(REPORT["targets"], **t, **figures).splitlines()


def render_markdown(report: dict[str, Any]) -> str:
    """serve.md: the template's sections filled from the report."""
    m, s, a = report["machine"], report["settings"], report["actual"]
    measurements = report["samples"] + report["prefix_samples"]
    reused = [p.get("prefix_cache_hit_tokens") for p in report["prefix_samples"] if p["server"] == SLM]
    notes = report.get("notes") or []
    return fill(
        REPORT["report"], **report, versions=m["versions"], minutes=report["wall_seconds"] / 60,
        slm_flash_attention=flash_attention(a[SLM]), llama_cpp_python_flash_attention=flash_attention(a[LCP]),
        slm_sequences=a[SLM].get("n_seq_max", "?"), slm_kv_unified=a[SLM].get("kv_unified", "?"),
        kv_need=_kv_need(report), load_at_start=load_average(m["load_average_at_start"]),
        load_at_end=load_average(m["load_average_at_end"]), redone=len(report["rejected_for_contention"]),
        contended=sum(x["others_cpu_share"] > s["max_contention"] for x in measurements),
        measured=len(measurements),
        throughput_table=markdown_table(THROUGHPUT_HEADER, _throughput_rows(report), THROUGHPUT_ALIGN),
        prefix_table=markdown_table(PREFIX_HEADER, _prefix_rows(report), PREFIX_ALIGN),
        reused=fill(REPORT["reused"], tokens=", ".join(str(r) for r in reused))
        if any(r is not None for r in reused) else "",
        target_list="\n".join(f"- {line}" for line in target_lines(report)),
        llama_cpp_python_prefix_ratio=_fmt(report["prefix"].get(LCP, {}).get("paired_ratio"), 2),
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
