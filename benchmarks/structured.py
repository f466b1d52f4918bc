"""Structured-output benchmark: what a JSON-schema constraint costs ``slm serve``, next to llama.cpp's own server.

One run per model (the catalog's smollm2, SmolLM2-135M Q4_1, and qwen2.5-coder:0.5b, Q4_K_M) starts both
servers as subprocesses on the same file, 2 threads, 8 sequences of 512 tokens each: ``slm serve``, and
``llama-server`` from the llama.cpp that llama-cpp-python vendors (the same version as slm's engine; built
into ~/.cache/slm/llama-server/ when missing, see ``llama_server``). Both get the same OpenAI requests to
``POST /v1/chat/completions`` (stream, temperature 0, usage in the stream), one server at a time:

1. Rounds at 1 and 8 concurrent clients, each client streaming its requests one after the other; every
   request asks one of the schemas of tests/structured_cases.py, behind a tag of its own so that no prompt
   is found in a cache. Constrained requests carry ``response_format`` ``json_schema`` (max_tokens
   ``--max-tokens``, which the answers end before); unconstrained ones the same prompt without it and a
   max_tokens of what that server's constrained answer to that schema took, so both do the same work.
   Decode tok/s of a round = tokens after each request's first / time from its first streamed token to its
   last, over the round's requests; the constraint's cost is the per-repetition ratio constrained /
   unconstrained, paired because the two rounds run back to back.
2. Time to first token, at 1 client, of pairs of requests: one without a constraint, one with a schema
   neither server has seen (one of the schemas under a key of its own), in alternating order.

Each round waits for a quiet machine and is redone when other processes took more than ``--max-contention``
of it; the server and the mode that go first alternate between repetitions.

    .venv/bin/python benchmarks/structured.py          # writes benchmarks/results/structured.{json,md}
    .venv/bin/python benchmarks/structured.py --quick  # a smoke run on SmolLM2, writes nothing
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import llama_cpp
from rich.console import Console

import slm
from harness import (
    ROOT,
    Quiet,
    add_run_options,
    console_table,
    fill,
    flash_attention,
    load_average,
    machine,
    markdown_table,
    median,
    model_file,
    output_directory,
    package_versions,
    paired_ratios,
    report_head,
    slm_executable,
    stop_on_signals,
    templates,
    terminal,
    write_results,
)
from serve import Server, free_port, log_settings, measure
from slm.store.catalog import store_dir

MODELS = ("smollm2", "qwen2.5-coder:0.5b")
SLM, PEER = "slm", "llama-server"
SERVERS = (SLM, PEER)
FREE, SCHEMA = "unconstrained", "json_schema"
MODES = (FREE, SCHEMA)
CONCURRENCY = (1, 8)
SCHEMA_NAMES = ("person", "city", "sentiment", "list", "nested", "ref", "array-of-objects", "mixed")
"""The schemas of tests/structured_cases.py the rounds ask, in turn."""
TARGET_COST = 0.95
"""Constrained / unconstrained decode throughput, at 1 and at 8 sequences (from the issue)."""
TARGET_TTFT_MS = 20.0
"""Time to first token with a new schema, over the time without a constraint (from the issue)."""
LLAMA_SERVER = store_dir().parent / "llama-server" / "bin" / "llama-server"
CMAKE_OPTIONS = ("-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release",
                 "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")
VERSIONS = ("slm", "llama-cpp-python", "llguidance", "uvicorn", "fastapi", "httpx")
METHOD = {
    "decode": "per round: sum over requests of (completion tokens - 1) / sum of the time from each request's first "
              "streamed token to its last; tokens from usage",
    "aggregate": "all completion tokens of the round / its wall time (prompts and, for constrained answers, the "
                 "step that samples the end token included)",
    "equal_work": "an unconstrained request has the prompt of a constrained one and a max_tokens of the tokens "
                  "that server's constrained answer to it took in the warm-up",
    "ttft": "from the client's call to the first streamed chunk with content; pairs of an unconstrained request "
            "and one with a never-seen schema, order alternating; the difference is the median of the pairs'",
    "ratios": "median over repetitions of the per-repetition ratio (rounds run back to back)",
    "others_cpu_share": "share of the machine's CPU time used by processes other than this script and the two "
                        "servers during a round (/proc/stat, /proc/PID/stat)",
}
REPORT = templates("structured")
"""The prose of structured.md: benchmarks/templates/structured.md."""


# --- llama.cpp's server ---------------------------------------------------------------------------


def llama_server(console: Console) -> Path:
    """llama.cpp's ``llama-server``, built once (about 10 minutes on 2 cores) from the llama.cpp vendored in
    the sdist of the installed llama-cpp-python, into ~/.cache/slm/llama-server/bin/ (statically linked)."""
    if LLAMA_SERVER.exists():
        return LLAMA_SERVER
    version = llama_cpp.__version__
    console.print(f"building llama-server from llama-cpp-python {version}'s llama.cpp into {LLAMA_SERVER.parent}")
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              f"llama-cpp-python=={version}", "-d", tmp])
        [sdist] = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        source = Path(tmp) / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
        _run(["cmake", "-S", str(source), "-B", str(source / "build"), *CMAKE_OPTIONS])
        _run(["cmake", "--build", str(source / "build"), "--target", "llama-server", "-j", "2"])
        LLAMA_SERVER.parent.mkdir(parents=True, exist_ok=True)
        partial = LLAMA_SERVER.with_suffix(".part")
        shutil.copy2(source / "build" / "bin" / "llama-server", partial)
        partial.rename(LLAMA_SERVER)
    return LLAMA_SERVER


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def llama_server_settings(log: str) -> dict[str, str]:
    """The slots llama-server made (from its log): how many, the context of each, whether they share one KV
    cache."""
    m = re.search(r"n_slots = (\d+), n_ctx_slot = (\d+), kv_unified = '(\w+)'", log)
    return dict(zip(("n_slots", "n_ctx_slot", "kv_unified"), m.groups(), strict=True)) if m else {}


def llama_server_version(path: Path) -> str:
    """``llama-server --version``'s line: llama.cpp's build number and commit."""
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True)
    return next((line for line in (out.stdout + out.stderr).splitlines() if line.startswith("version")), "?")


# --- the requests ---------------------------------------------------------------------------------


def structured_cases() -> list[tuple[str, str, dict[str, Any]]]:
    """The benchmark's schemas (``SCHEMA_NAMES``) from tests/structured_cases.py, in that order."""
    spec = importlib.util.spec_from_file_location("structured_cases", ROOT / "tests" / "structured_cases.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cases = {name: (name, question, schema) for name, question, schema in module.SCHEMAS}
    return [cases[name] for name in SCHEMA_NAMES]


def response_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def chat_body(model: str, tag: str, question: str, max_tokens: int, schema: dict[str, Any] | None,
              name: str = "answer") -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model, "messages": [{"role": "user", "content": f"Question {tag}: {question} Answer in JSON."}],
        "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0, "max_tokens": max_tokens,
    }
    return body | ({"response_format": response_format(name, schema)} if schema is not None else {})


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat request: when each chunk with content came, the text, the usage, the finish reason."""
    start = time.perf_counter()
    times: list[float] = []
    text: list[str] = []
    usage: dict[str, Any] | None = None
    finish = error = None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
            async for line in response.aiter_lines():
                data = line[5:].strip() if line.startswith("data:") else ""
                if not data or data == "[DONE]":
                    continue
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"error in the stream: {event['error']}")
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    if content := (choice.get("delta") or {}).get("content"):
                        times.append(time.perf_counter())
                        text.append(content)
                    finish = choice.get("finish_reason") or finish
    except Exception as e:  # recorded: the round goes on, the request counts as failed
        error = f"{type(e).__name__}: {e}"
    tokens = usage["completion_tokens"] if usage else len(text)
    return {
        "ttft": round(times[0] - start, 6) if times else None,
        "seconds": round(time.perf_counter() - start, 6),
        "decode_seconds": round(times[-1] - times[0], 6) if len(times) > 1 else None,
        "completion_tokens": tokens,
        "prompt_tokens": usage.get("prompt_tokens") if usage else None,
        "finish_reason": finish,
        "error": error,
        "text": "".join(text),
    }


def matches(text: str, schema: dict[str, Any]) -> bool:
    """Whether ``text`` is one JSON value that ``schema`` accepts."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return bool(jsonschema.Draft202012Validator(schema).is_valid(value))


def _client(concurrency: int) -> httpx.AsyncClient:
    # A new connection per request, to both servers: httpx reusing a connection that llama-server's
    # cpp-httplib was closing lost requests ("Server disconnected without sending a response").
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=0)
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits)


# --- rounds and probes -----------------------------------------------------------------------------


async def run_round(server: Server, model: str, cases: list[tuple[str, str, dict[str, Any]]], mode: str,
                    concurrency: int, requests: int, max_tokens: int, lengths: dict[str, int], tag: str
                    ) -> dict[str, Any]:
    """``concurrency`` clients sharing ``requests`` requests, each client's one after the other; request i
    asks schema i (in turn); constrained with ``max_tokens``, unconstrained with the schema's ``lengths``."""
    url = server.base_url + "/v1/chat/completions"
    async with _client(concurrency) as client:
        origin = time.perf_counter()

        async def one_client(c: int) -> list[dict[str, Any]]:
            out = []
            for i in range(c, requests, concurrency):
                name, question, schema = cases[i % len(cases)]
                constrained = mode == SCHEMA
                body = chat_body(model, f"{tag}.{i + 1}", question, max_tokens if constrained else lengths[name],
                                 schema if constrained else None, name)
                result = await stream_chat(client, url, body)
                result["schema"] = name
                if constrained:
                    result["matches_schema"] = matches(result["text"], schema)
                out.append(result)
            return out

        per_client = await asyncio.gather(*(one_client(c) for c in range(concurrency)))
        wall = time.perf_counter() - origin
    return {"wall_seconds": round(wall, 4), "requests": [r for rs in per_client for r in rs]}


def round_stats(sample: dict[str, Any]) -> dict[str, Any]:
    requests = sample["requests"]
    done = [r for r in requests if r["error"] is None and r["finish_reason"] is not None]
    decoded = [r for r in done if r["decode_seconds"]]
    tokens = [r["completion_tokens"] for r in requests]
    checked = [r["matches_schema"] for r in requests if "matches_schema" in r]
    return {
        "decode_tokens_per_second": round(sum(r["completion_tokens"] - 1 for r in decoded)
                                          / sum(r["decode_seconds"] for r in decoded), 3) if decoded else None,
        "aggregate_tokens_per_second": round(sum(tokens) / sample["wall_seconds"], 3),
        "ttft_ms_p50": median(r["ttft"] * 1e3 for r in requests if r["ttft"] is not None),
        "total_tokens": sum(tokens),
        "requests": len(requests),
        "completed": len(done),
        "matching_schema": sum(checked) if checked else None,
        "length_finishes": sum(r["finish_reason"] == "length" for r in requests),
        "errors": [r["error"] for r in requests if r["error"]][:3],
    }


def new_schema(cases: list[tuple[str, str, dict[str, Any]]], n: int) -> tuple[str, str, dict[str, Any]]:
    """A schema no server has seen: case ``n`` (in turn) under a key of its own."""
    name, question, schema = cases[n % len(cases)]
    key = f"answer_{n}"
    return f"{name}-{n}", question, {"type": "object", "properties": {key: schema}, "required": [key]}


async def ttft_pair(server: Server, model: str, cases: list[tuple[str, str, dict[str, Any]]], n: int,
                    tag: str) -> dict[str, Any]:
    """Time to first token without a constraint and with a new schema, one after the other (the order
    alternates with ``n``), each behind a tag of its own."""
    name, question, schema = new_schema(cases, n)
    url = server.base_url + "/v1/chat/completions"
    bodies = {FREE: chat_body(model, f"{tag}.1", question, 4, None),
              SCHEMA: chat_body(model, f"{tag}.2", question, 4, schema, name)}
    out: dict[str, Any] = {"schema": name, "first": MODES[n % 2]}
    async with _client(1) as client:
        for mode in (MODES if n % 2 == 0 else MODES[::-1]):
            out[mode] = await stream_chat(client, url, bodies[mode])
    return out


# --- one model -------------------------------------------------------------------------------------


def servers_for(model: str, path: Path, binary: Path, args: argparse.Namespace, logs: Path) -> dict[str, Server]:
    """Both servers on ``path``: the same threads, sequences, context per sequence and flash attention."""
    total = args.parallel * args.ctx_per_request
    slm_port, peer_port = free_port(), free_port()
    threads, parallel = str(args.threads), str(args.parallel)
    stem = model.replace(":", "-")
    return {
        SLM: Server(SLM, [slm_executable(), "serve", model, "--host", "127.0.0.1", "--port", str(slm_port),
                          "--parallel", parallel, "--ctx-size", str(args.ctx_per_request), "--kv-size", str(total),
                          "--threads", threads, "--flash-attn", "on"],
                    slm_port, "/health", logs / f"{stem}-slm.log", env={"SLM_VERBOSE": "1"}),
        PEER: Server(PEER, [str(binary), "-m", str(path), "-a", model, "--host", "127.0.0.1", "--port",
                            str(peer_port), "-np", parallel, "-c", str(total), "-t", threads, "-tb", threads,
                            "-fa", "on"],
                     peer_port, "/health", logs / f"{stem}-llama-server.log"),
    }


def warm_up(servers: dict[str, Server], model: str, cases: list[tuple[str, str, dict[str, Any]]],
            max_tokens: int, console: Console) -> dict[str, Any]:
    """Per server: one unconstrained request, then the first constrained one since the server started (it
    builds whatever a server builds once), then every schema constrained: the tokens each answer takes."""
    out: dict[str, Any] = {}
    for key, s in servers.items():
        url = s.base_url + "/v1/chat/completions"

        async def requests(s: Server = s, url: str = url) -> dict[str, Any]:
            async with _client(1) as client:
                free = await stream_chat(client, url, chat_body(model, "0.0", cases[0][1], 8, None))
                cold_name, cold_question, cold_schema = new_schema(cases, -1)
                first = await stream_chat(client, url, chat_body(model, "0.1", cold_question, 8, cold_schema,
                                                                 cold_name))
                answers = {}
                for name, question, schema in cases:
                    answers[name] = await stream_chat(client, url, chat_body(model, "0.2", question, max_tokens,
                                                                             schema, name))
                    answers[name]["matches_schema"] = matches(answers[name]["text"], schema)
            return {"unconstrained": free, "first_constrained": first, "answers": answers}

        out[key] = asyncio.run(requests())
        first = out[key]["first_constrained"]
        console.print(f"  warm-up {key:12} first constrained request's TTFT {first['ttft'] and first['ttft'] * 1e3:.0f}"
                      f" ms; answers: " + ", ".join(f"{n} {a['completion_tokens']}" for n, a in
                                                    out[key]["answers"].items()))
        for name, a in out[key]["answers"].items():
            if a["error"] or not a["matches_schema"]:
                console.print(f"[yellow]  {key} {name}: {a['error'] or 'answer does not match'}: {a['text'][:80]!r}[/]")
    return out


def measure_model(model: str, binary: Path, cases: list[tuple[str, str, dict[str, Any]]], args: argparse.Namespace,
                  logs: Path, console: Console) -> dict[str, Any]:
    """Both servers on ``model``: warm-up, then per repetition the rounds (concurrency, server and mode in
    alternating order) and the TTFT pairs. Every figure of the model, and its raw samples."""
    path = slm.store.catalog.resolve(model).path
    servers = servers_for(model, path, binary, args, logs)
    quiet = Quiet(args.max_contention, args.retries, args.max_wait,
                  processes={key: s.cpu_seconds for key, s in servers.items()})
    samples: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    exit_codes: dict[str, int | None] = {}
    try:
        for s in servers.values():
            console.print(f"starting {s.key}: {s.shown_command}")
            s.start()
        warmup = warm_up(servers, model, cases, args.max_tokens, console)
        lengths = {key: {name: max(1, a["completion_tokens"]) for name, a in w["answers"].items()}
                   for key, w in warmup.items()}
        for rep in range(args.repetitions):
            for i, c in enumerate(args.concurrency):
                for position, key in enumerate(SERVERS if (rep + i) % 2 == 0 else SERVERS[::-1]):
                    for mode in MODES if (rep + i + position) % 2 == 0 else MODES[::-1]:
                        s, tag = servers[key], f"{rep + 1}.{MODES.index(mode) + 1}.{c}"
                        result = measure(quiet, f"{model} {key} {mode} {c} clients rep {rep}",
                                         lambda s=s, c=c, mode=mode, tag=tag: asyncio.run(run_round(
                                             s, model, cases, mode, c, args.requests, args.max_tokens,
                                             lengths[s.key], tag)))
                        stats = round_stats(result)
                        samples.append({"server": key, "mode": mode, "concurrency": c, "repetition": rep,
                                        "stats": stats, **result})
                        console.print(f"  rep {rep} {c} clients {key:12} {mode:13} decode "
                                      f"{stats['decode_tokens_per_second'] or 0:6.1f} tok/s, aggregate "
                                      f"{stats['aggregate_tokens_per_second']:6.1f} tok/s, TTFT p50 "
                                      f"{stats['ttft_ms_p50']} ms, {stats['completed']}/{stats['requests']} done, "
                                      f"{stats['total_tokens']} tokens, others {result['others_cpu_share']:.0%}"
                                      + (f" [red]{stats['errors'][0]}[/]" if stats["errors"] else ""))
            for key in SERVERS if rep % 2 == 0 else SERVERS[::-1]:
                s = servers[key]
                result = measure(quiet, f"{model} {key} TTFT rep {rep}", lambda s=s, rep=rep: asyncio.run(
                    ttft_pairs(s, model, cases, rep, args.ttft_pairs)))
                probes.append({"server": key, "repetition": rep, **result})
                differences = [p[SCHEMA]["ttft"] - p[FREE]["ttft"] for p in result["pairs"]
                               if p[SCHEMA]["ttft"] and p[FREE]["ttft"]]
                console.print(f"  rep {rep} TTFT {key:12} new schema - unconstrained: median "
                              f"{(median(differences) or 0) * 1e3:.1f} ms over {len(differences)} pairs")
    finally:
        for key, s in servers.items():
            exit_codes[key] = s.stop()
    return {
        "model": model, **model_file(path),
        "commands": {key: s.shown_command for key, s in servers.items()},
        "actual": {SLM: log_settings(servers[SLM].log_text()), PEER: llama_server_settings(servers[PEER].log_text())},
        "server_start_seconds": {key: round(s.start_seconds, 2) for key, s in servers.items()},
        "server_exit_codes": exit_codes,
        "unconstrained_max_tokens": lengths,
        "throughput": summarize_rounds(samples),
        "ttft": summarize_ttft(probes, warmup),
        "rejected_for_contention": quiet.rejected,
        "warmup": warmup,
        "samples": samples,
        "ttft_samples": probes,
    }


async def ttft_pairs(server: Server, model: str, cases: list[tuple[str, str, dict[str, Any]]], rep: int,
                     pairs: int) -> dict[str, Any]:
    """``pairs`` TTFT pairs, each with a schema of its own (numbered across repetitions)."""
    return {"pairs": [await ttft_pair(server, model, cases, rep * pairs + j, f"t{rep + 1}.{j + 1}")
                      for j in range(pairs)]}


# --- summaries -------------------------------------------------------------------------------------


def _by_repetition(samples: list[dict[str, Any]], server: str, mode: str, c: int, metric: str) -> dict[int, float]:
    return {s["repetition"]: s["stats"][metric] for s in samples
            if (s["server"], s["mode"], s["concurrency"]) == (server, mode, c) and s["stats"][metric]}


RATIOS = {
    "slm_cost": ((SLM, SCHEMA), (SLM, FREE)),
    "llama_server_cost": ((PEER, SCHEMA), (PEER, FREE)),
    "slm_vs_llama_server_constrained": ((SLM, SCHEMA), (PEER, SCHEMA)),
    "slm_vs_llama_server_unconstrained": ((SLM, FREE), (PEER, FREE)),
}
"""Each ratio's (server, mode) over (server, mode), per repetition."""


def summarize_rounds(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per concurrency: each server and mode's medians over repetitions, and the paired ratios (decode and
    aggregate)."""
    out: dict[str, Any] = {}
    for c in sorted({s["concurrency"] for s in samples}):
        per: dict[str, Any] = {}
        for server in SERVERS:
            for mode in MODES:
                mine = [s["stats"] for s in samples if (s["server"], s["mode"], s["concurrency"]) == (server, mode, c)]
                checked = [m["matching_schema"] for m in mine if m["matching_schema"] is not None]
                per.setdefault(server, {})[mode] = {
                    key: median(m[key] for m in mine) for key in ("decode_tokens_per_second",
                                                                  "aggregate_tokens_per_second", "ttft_ms_p50",
                                                                  "total_tokens")
                } | {
                    "decode_tokens_per_second_range": [min((m["decode_tokens_per_second"] or 0) for m in mine),
                                                       max((m["decode_tokens_per_second"] or 0) for m in mine)],
                    "completed": sum(m["completed"] for m in mine),
                    "requests": sum(m["requests"] for m in mine),
                    "matching_schema": sum(checked) if checked else None,
                    "length_finishes": sum(m["length_finishes"] for m in mine),
                    "repetitions": len(mine),
                }
        per["ratios"] = {}
        for name, (ours, theirs) in RATIOS.items():
            for metric in ("decode_tokens_per_second", "aggregate_tokens_per_second"):
                ratios = paired_ratios(_by_repetition(samples, *ours, c, metric),
                                       _by_repetition(samples, *theirs, c, metric))
                per["ratios"].setdefault(name, {})[metric.split("_")[0]] = {
                    "per_repetition": [round(r, 3) for r in ratios], "paired": median(ratios)}
        out[str(c)] = per
    return out


def summarize_ttft(probes: list[dict[str, Any]], warmup: dict[str, Any]) -> dict[str, Any]:
    """Per server: the medians of the TTFT pairs, the median of their differences, and the warm-up's first
    constrained request (the first since the server started)."""
    out: dict[str, Any] = {}
    for server in SERVERS:
        pairs = [p for x in probes if x["server"] == server for p in x["pairs"]]
        complete = [p for p in pairs if p[FREE]["ttft"] and p[SCHEMA]["ttft"]]
        cold = warmup[server]["first_constrained"]["ttft"]
        out[server] = {
            "unconstrained_ms": median(p[FREE]["ttft"] * 1e3 for p in complete),
            "new_schema_ms": median(p[SCHEMA]["ttft"] * 1e3 for p in complete),
            "difference_ms": median((p[SCHEMA]["ttft"] - p[FREE]["ttft"]) * 1e3 for p in complete),
            "differences_ms": [round((p[SCHEMA]["ttft"] - p[FREE]["ttft"]) * 1e3, 2) for p in complete],
            "pairs": len(complete),
            "failed": len(pairs) - len(complete),
            "first_constrained_after_start_ms": round(cold * 1e3, 1) if cold else None,
            "warmup_unconstrained_ms": median([(warmup[server]["unconstrained"]["ttft"] or 0) * 1e3]),
        }
    return out


def build_targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: the constraint's cost to slm's decode throughput at 1 and at 8 clients, and the TTFT of a
    new schema over that without a constraint."""
    targets: dict[str, Any] = {}
    for r in results:
        per: dict[str, Any] = {}
        for c, t in r["throughput"].items():
            cost = t["ratios"]["slm_cost"]["decode"]
            per[f"cost_{c}"] = {"clients": int(c), "target": TARGET_COST, "paired_ratio": cost["paired"],
                                "per_repetition_ratios": cost["per_repetition"],
                                "met": cost["paired"] >= TARGET_COST if cost["paired"] is not None else None}
        difference = r["ttft"][SLM]["difference_ms"]
        per["ttft"] = {"target_ms": TARGET_TTFT_MS, "difference_ms": difference,
                       "met": difference <= TARGET_TTFT_MS if difference is not None else None}
        targets[r["model"]] = per
    return targets


def observations(results: list[dict[str, Any]], max_tokens: int, max_contention: float) -> list[str]:
    """What the reader should know about the run, found in its own data."""
    notes = []
    for r in results:
        for c, t in r["throughput"].items():
            for server in SERVERS:
                for mode in MODES:
                    x = t[server][mode]
                    if x["completed"] < x["requests"]:
                        errors = [e for s in r["samples"] if (s["server"], s["mode"], str(s["concurrency"])) ==
                                  (server, mode, c) for e in s["stats"]["errors"]]
                        notes.append(fill(REPORT["note_failed"], model=r["model"], server=server, mode=mode,
                                          clients=c, failed=x["requests"] - x["completed"], requests=x["requests"],
                                          error=errors[0] if errors else "no finish reason"))
                    if mode == SCHEMA and x["length_finishes"]:
                        notes.append(fill(REPORT["note_length"], model=r["model"], server=server, clients=c,
                                          count=x["length_finishes"], requests=x["requests"], max_tokens=max_tokens))
                    if mode == SCHEMA and x["matching_schema"] is not None and x["matching_schema"] < x["requests"]:
                        notes.append(fill(REPORT["note_mismatch"], model=r["model"], server=server, clients=c,
                                          count=x["requests"] - x["matching_schema"], requests=x["requests"]))
        for c, t in r["throughput"].items():
            ratios = t["ratios"]["slm_cost"]["decode"]["per_repetition"]
            if ratios and max(ratios) - min(ratios) > 2 * (1 - TARGET_COST):
                notes.append(fill(REPORT["note_spread"], model=r["model"], clients=c, low=min(ratios), high=max(ratios),
                                  allowed=1 - TARGET_COST))
        for server in SERVERS:
            twins = [q for s in r["samples"] if s["server"] == server and s["mode"] == FREE for q in s["requests"]]
            early = [q for q in twins if q["finish_reason"] == "stop"]
            if early:
                notes.append(fill(REPORT["note_twins"], model=r["model"], server=server, early=len(early),
                                  requests=len(twins)))
        lengths = r["unconstrained_max_tokens"]
        if lengths[SLM] != lengths[PEER]:
            notes.append(fill(REPORT["note_lengths"], model=r["model"], slm=sum(lengths[SLM].values()),
                              peer=sum(lengths[PEER].values()), schemas=len(lengths[SLM])))
        kept = [s["others_cpu_share"] for s in r["samples"] + r["ttft_samples"]]
        contended = sum(share > max_contention for share in kept)
        if contended:
            notes.append(fill(REPORT["note_contended"], model=r["model"], contended=contended, measured=len(kept),
                              max_contention=max_contention, worst=max(kept)))
    return notes


# --- reports ---------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "**not met**"


ROUND_HEADER = ("clients", "server", "constraint", "decode tok/s", "aggregate tok/s", "TTFT p50 ms",
                "tokens (median)", "completed", "answers matching")
ROUND_ALIGN = "rllrrrrrr"


def _round_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for c, t in result["throughput"].items():
        for server in SERVERS:
            for mode in MODES:
                x = t[server][mode]
                matching = "-" if x["matching_schema"] is None else f"{x['matching_schema']}/{x['requests']}"
                rows.append((c, server, mode, _fmt(x["decode_tokens_per_second"]),
                             _fmt(x["aggregate_tokens_per_second"]), _fmt(x["ttft_ms_p50"]),
                             _fmt(x["total_tokens"], 0), f"{x['completed']}/{x['requests']}", matching))
    return rows


RATIO_HEADER = ("clients", "slm json_schema / unconstrained", "llama-server json_schema / unconstrained",
                "slm / llama-server, json_schema", "slm / llama-server, unconstrained")
RATIO_ALIGN = "rrrrr"


def _ratio(ratio: dict[str, Any]) -> str:
    return f"{_fmt(ratio['decode']['paired'], 3)}x (aggregate {_fmt(ratio['aggregate']['paired'], 3)}x)"


def _ratio_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(c, *(_ratio(t["ratios"][name]) for name in RATIOS)) for c, t in result["throughput"].items()]


TTFT_HEADER = ("server", "unconstrained ms", "new schema ms", "difference ms (median of pairs)", "pairs",
               "first constrained request after start ms")
TTFT_ALIGN = "lrrrrr"


def _ttft_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(server, _fmt(t["unconstrained_ms"]), _fmt(t["new_schema_ms"]), _fmt(t["difference_ms"]), str(t["pairs"]),
             _fmt(t["first_constrained_after_start_ms"])) for server, t in result["ttft"].items()]


def target_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for model, per in report["targets"].items():
        for name, t in per.items():
            if name == "ttft":
                lines.append(fill(REPORT["target_ttft"], model=model, **t, difference=_fmt(t["difference_ms"]),
                                  verdict=_verdict(t["met"])))
            else:
                lines.append(fill(REPORT["target_cost"], model=model, **t, ratio=_fmt(t["paired_ratio"], 3),
                                  per_repetition=", ".join(f"{r:.3f}x" for r in t["per_repetition_ratios"]) or "-",
                                  verdict=_verdict(t["met"])))
    return lines


def render_tables(report: dict[str, Any]) -> list[Any]:
    tables = []
    for r in report["results"]:
        tables += [console_table(f"{r['model']}: rounds, medians of {report['settings']['repetitions']}", ROUND_HEADER,
                                 _round_rows(r), ROUND_ALIGN),
                   console_table(f"{r['model']}: paired ratios, decode (aggregate)", RATIO_HEADER, _ratio_rows(r),
                                 RATIO_ALIGN),
                   console_table(f"{r['model']}: time to first token", TTFT_HEADER, _ttft_rows(r), TTFT_ALIGN)]
    return tables


def _known(found: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``found`` with "?" for each of ``keys`` that a server's log did not give."""
    return dict.fromkeys(keys, "?") | found


def render_markdown(report: dict[str, Any]) -> str:
    """structured.md: the template's sections filled from the report."""
    m, s = report["machine"], report["settings"]
    models = [fill(REPORT["model"], **r, settings=s, slm_flash_attention=flash_attention(r["actual"][SLM]),
                   slm_actual=_known(r["actual"][SLM], "n_seq_max", "n_ctx", "kv_unified"),
                   peer_actual=_known(r["actual"][PEER], "n_slots", "n_ctx_slot", "kv_unified"),
                   round_table=markdown_table(ROUND_HEADER, _round_rows(r), ROUND_ALIGN),
                   ratio_table=markdown_table(RATIO_HEADER, _ratio_rows(r), RATIO_ALIGN),
                   ttft_table=markdown_table(TTFT_HEADER, _ttft_rows(r), TTFT_ALIGN))
              for r in report["results"]]
    measured = [x for r in report["results"] for x in r["samples"] + r["ttft_samples"]]
    notes = report["notes"]
    return fill(
        REPORT["report"], **report, versions=m["versions"], minutes=report["wall_seconds"] / 60,
        load_at_start=load_average(m["load_average_at_start"]), load_at_end=load_average(m["load_average_at_end"]),
        redone=sum(len(r["rejected_for_contention"]) for r in report["results"]),
        contended=sum(x["others_cpu_share"] > s["max_contention"] for x in measured), measured=len(measured),
        schemas=", ".join(SCHEMA_NAMES), models="\n\n".join(models), cmake=" ".join(CMAKE_OPTIONS),
        target_list="\n".join(f"- {line}" for line in target_lines(report)),
        notes_section=fill(REPORT["notes"], notes="\n".join(f"- {n}" for n in notes)) if notes else "",
    ) + "\n"


# --- the run ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    parser.add_argument("--repetitions", type=int, default=6,
                        help="runs of every round and TTFT set (default 6: even, so each order runs as often)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)),
                        help="comma-separated numbers of concurrent clients (default 1,8)")
    parser.add_argument("--requests", type=int, default=2 * len(SCHEMA_NAMES),
                        help=f"requests per round, shared by its clients (default {2 * len(SCHEMA_NAMES)}: "
                             "every schema twice)")
    parser.add_argument("--max-tokens", type=int, default=96, help="max_tokens of constrained requests (default 96)")
    parser.add_argument("--ttft-pairs", type=int, default=6, help="TTFT pairs per server and repetition (default 6)")
    parser.add_argument("--threads", type=int, default=2, help="threads on both servers (default 2)")
    parser.add_argument("--parallel", type=int, default=8, help="sequences on both servers (default 8)")
    parser.add_argument("--ctx-per-request", type=int, default=512,
                        help="context of each sequence; both servers' KV cache holds --parallel of them (default 512)")
    add_run_options(parser, unit="round", retries=2,
                    quick="a smoke run (SmolLM2, 1 repetition, 8 requests per round, 2 TTFT pairs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repetitions, args.requests, args.ttft_pairs, args.retries, args.max_wait = 1, 8, 2, 0, 2.0
        if args.models == ",".join(MODELS):
            args.models = MODELS[0]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    models = [m for m in args.models.split(",") if m.strip()]
    output = output_directory(args)
    console = terminal(170)

    info = machine()
    binary = llama_server(console)
    peer_version = llama_server_version(binary)
    cases = structured_cases()
    console.print(f"[bold]structured[/] · {info['cpu']} · {info['cores']} cores · {', '.join(models)} · "
                  f"llama-server {peer_version}")
    logs = Path(tempfile.mkdtemp(prefix="slm-structured-bench-"))
    stop_on_signals()
    results = [measure_model(model, binary, cases, args, logs, console) for model in models]

    info["load_average_at_end"] = os.getloadavg()
    report: dict[str, Any] = report_head("structured", started) | {
        "machine": info | {"versions": package_versions(VERSIONS)},
        "llama_server": {"path": str(binary), "version": peer_version, "cmake_options": list(CMAKE_OPTIONS),
                         "source": f"llama-cpp-python {llama_cpp.__version__} sdist, vendor/llama.cpp"},
        "settings": {
            "models": models, "threads": args.threads, "parallel": args.parallel,
            "ctx_per_request": args.ctx_per_request, "kv_cells": args.parallel * args.ctx_per_request,
            "concurrency": args.concurrency, "requests_per_round": args.requests, "max_tokens": args.max_tokens,
            "ttft_pairs": args.ttft_pairs, "schemas": list(SCHEMA_NAMES), "repetitions": args.repetitions,
            "max_contention": args.max_contention, "retries": args.retries, "max_wait_seconds": args.max_wait,
            "quick": args.quick, "prompt": "Question <tag>: <the schema's question> Answer in JSON.",
        },
        "method": METHOD,
        "targets": build_targets(results),
        "notes": observations(results, args.max_tokens, args.max_contention),
        "results": results,
    }
    for table in render_tables(report):
        console.print(table)
    for line in target_lines(report) + report["notes"]:
        console.print(line)
    console.print(f"wall time {report['wall_seconds']:.0f} s · server logs in {logs}")
    if output is not None:
        data, prose = write_results(output, "structured", report, render_markdown(report), indent=1,
                                    ensure_ascii=False, inline_number_lists=True)
        console.print(f"wrote {data} and {prose}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
