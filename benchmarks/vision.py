"""Vision benchmark: images through ``slm serve`` next to llama.cpp's own ``llama-server``, on a tiny Gemma 3 VLM.

The model is tests/vision_models.py's tiny random Gemma 3 VLM (real-shaped config, 2 text layers, a 2-layer
SigLIP tower; a 224x224 image becomes 16 image tokens), converted by ``slm convert --to gguf`` into an fp32
text GGUF and its ``mmproj-<stem>.gguf``. One run starts both servers as subprocesses on those two files, the
same threads, sequences and context (llama-server with ``--mmproj``; built as benchmarks/structured.py builds
it), and measures them one at a time, the idle one waiting on its socket. Every request is a streamed
``POST /v1/chat/completions``, temperature 0, an image sent as an OpenAI ``image_url`` data URI (PNG):

1. Image prefill: the time to first token (max_tokens 1) of one user turn holding a text and a fresh random
   image (new pixels and a new tag every repetition, so no cache holds any of it), then of the very same
   request again, which each server's cache should answer (slm's prefix cache, llama-server's
   ``cache_prompt``). Paired ratios slm / llama-server, and fresh / repeated.
2. Image work must not stall text streams: 4 concurrent streaming text requests (``--text-tokens`` tokens
   each, greedy, the end-of-text tokens banned with ``logit_bias`` so they run full length), once alone and
   once while a new fresh-image request (max_tokens 1) arrives every ``--image-interval`` seconds. The gaps
   between streamed tokens, pooled over the 4 streams: median, p95 and max. The target (from the issue): the
   max gap with images <= the max gap without + the time of one image prefill (part 1's fresh TTFT).

Each measurement waits for a quiet machine and is redone when other processes took more than
``--max-contention`` of it; the server (and in part 2 the condition) that goes first alternates.

    .venv/bin/python benchmarks/vision.py          # writes benchmarks/results/vision.{json,md}
    .venv/bin/python benchmarks/vision.py --quick  # a smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gguf
import httpx
import llama_cpp
import numpy as np
from PIL import Image
from rich.console import Console

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
from serve import Server, free_port, log_settings, measure, pct, stream_request
from structured import CMAKE_OPTIONS, llama_server, llama_server_settings, llama_server_version

sys.path.insert(0, str(ROOT / "tests"))
from vision_models import MM_TOKENS_PER_IMAGE, SIGLIP, converted_tiny_gemma3_vlm  # noqa: E402

SLM, PEER = "slm", "llama-server"
SERVERS = (SLM, PEER)
ALONE, WITH_IMAGES = "alone", "with images"
CONDITIONS = (ALONE, WITH_IMAGES)
KINDS = ("fresh", "repeated", "text_only")
"""Part 1's requests: a new image, the same request again, the same turn without its image."""
STREAMS = 4
VERSIONS = ("slm", "llama-cpp-python", "uvicorn", "fastapi", "httpx", "pillow", "transformers", "torch")
METHOD = {
    "ttft": "from the client's call to the first streamed chunk with content (or, were the one token's text held "
            "back, with a finish_reason)",
    "fresh": "an image of new random pixels behind a new tag, so neither server has any of the prompt cached but "
             "the chat template's first tokens",
    "repeated": "the same request again at once; cached tokens from slm's usage.prompt_tokens_details, "
                "llama-server's timings.cache_n",
    "gaps": "between consecutive streamed chunks carrying text, after each stream's first, pooled over the "
            f"round's {STREAMS} streams; median, p95, max per round, then the median over repetitions",
    "image_arrivals": "open loop: a new fresh-image request every --image-interval seconds from the round's start "
                      "until its text streams end, each on its own connection, not waiting for the others",
    "target": "the median over repetitions of the round's max gap with images <= that without + the server's "
              "median fresh-image TTFT (part 1)",
    "ratios": "median over repetitions of the per-repetition ratio (both sides within seconds of each other)",
    "others_cpu_share": "share of the machine's CPU time used by processes other than this script and the two "
                        "servers during a measurement (/proc/stat, /proc/PID/stat)",
}
REPORT = templates("vision")
"""The prose of vision.md: benchmarks/templates/vision.md."""


# --- the model and the requests -----------------------------------------------------------------------


def end_tokens(path: Path) -> list[int]:
    """The ids that end a text, from the GGUF's own metadata: its eos token and Gemma's <end_of_turn>."""
    fields = gguf.GGUFReader(path).fields
    eos = fields["tokenizer.ggml.eos_token_id"]
    ids = [int(eos.parts[eos.data[0]][0])]
    tokens = fields["tokenizer.ggml.tokens"]
    for i, part in enumerate(tokens.data):
        if bytes(tokens.parts[part]) == b"<end_of_turn>":
            ids.append(i)
            break
    return ids


def picture(seed: int, size: int = SIGLIP["image_size"]) -> str:
    """A PNG of random pixels as a data URI: every seed a picture no cache has seen."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def extras(server: str) -> dict[str, Any]:
    """Usage in the stream's last event; llama-server: its prompt cache asked for explicitly (its default)."""
    return {"stream_options": {"include_usage": True}} | ({"cache_prompt": True} if server == PEER else {})


def image_body(server: str, model: str, tag: str, uri: str, max_tokens: int = 1) -> dict[str, Any]:
    content = [{"type": "text", "text": f"Picture {tag}. Describe this:"},
               {"type": "image_url", "image_url": {"url": uri}}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": True, "temperature": 0.0,
            "max_tokens": max_tokens} | extras(server)


def text_body(server: str, model: str, tag: str, max_tokens: int, banned: list[int]) -> dict[str, Any]:
    message = {"role": "user", "content": f"Story {tag}. Tell me a long story about the sea."}
    return {"model": model, "messages": [message], "stream": True, "temperature": 0.0, "max_tokens": max_tokens,
            "logit_bias": {str(i): -100 for i in banned}} | extras(server)


async def image_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], origin: float) -> dict[str, Any]:
    """One streamed image request: its time to first token and what the server says it took from its cache."""
    start = time.perf_counter()
    first = None
    usage: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    error = finish = None
    text = ""
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(f"error in the stream: {event['error']}")
                usage = event.get("usage") or usage
                timings = event.get("timings") or timings
                for choice in event.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content") or ""
                    text += content
                    finish = choice.get("finish_reason") or finish
                    if first is None and (content or finish):
                        first = time.perf_counter()
    except Exception as e:  # recorded: the round goes on, the request counts as failed
        error = f"{type(e).__name__}: {e}"
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return {
        "started": round(start - origin, 6),
        "ttft": round(first - start, 6) if first is not None else None,
        "seconds": round(time.perf_counter() - start, 6),
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": timings.get("cache_n", cached),
        "finish_reason": finish,
        "text": text,
        "error": error,
    }


def _client(connections: int, keep_alive: bool = True) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections if keep_alive else 0)
    return httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits)


# --- the measurements ---------------------------------------------------------------------------------


async def image_pair(server: Server, model: str, tag: str, seed: int) -> dict[str, Any]:
    """A fresh image's request, then the very same request again; then the same turn without its image, behind a
    tag of its own: what a request costs apart from the image."""
    body = image_body(server.key, model, tag, picture(seed))
    text_only = body | {"messages": [{"role": "user", "content": f"Picture {tag}.t. Describe this:"}]}
    url = server.base_url + "/v1/chat/completions"
    # A new connection for each request: llama-server closed a kept-alive one under the third request of a set.
    async with _client(2, keep_alive=False) as client:
        origin = time.perf_counter()
        fresh = await image_request(client, url, body, origin)
        repeated = await image_request(client, url, body, origin)
        text = await image_request(client, url, text_only, origin)
    return {"fresh": fresh, "repeated": repeated, "text_only": text}


async def stall_round(server: Server, model: str, tag: str, with_images: bool, args: argparse.Namespace,
                      banned: list[int], seed: int) -> dict[str, Any]:
    """``STREAMS`` text streams started at once; with images, a new image request every ``args.image_interval``
    seconds until they end."""
    url = server.base_url + "/v1/chat/completions"
    async with _client(STREAMS + 32) as client:
        origin = time.perf_counter()
        texts = asyncio.gather(*(stream_request(client, url, text_body(server.key, model, f"{tag}.{i + 1}",
                                                                       args.text_tokens, banned), origin)
                                 for i in range(STREAMS)))
        images: list[asyncio.Task[dict[str, Any]]] = []
        if with_images:
            async def arrivals() -> None:
                k = 0
                while True:
                    await asyncio.sleep(args.image_interval if k else args.image_interval / 2)
                    body = image_body(server.key, model, f"{tag}.i{k + 1}", picture(seed * 1000 + k))
                    images.append(asyncio.create_task(image_request(client, url, body, origin)))
                    k += 1

            sender = asyncio.create_task(arrivals())
        streams = await texts
        text_wall = time.perf_counter() - origin
        if with_images:
            sender.cancel()
        image_results = list(await asyncio.gather(*images))
    return {"text_wall_seconds": round(text_wall, 4), "streams": list(streams), "images": image_results}


def stall_stats(sample: dict[str, Any]) -> dict[str, Any]:
    gaps = [g for r in sample["streams"] for g in r["gaps_ms"]]
    ttft = [i["ttft"] * 1e3 for i in sample["images"] if i["ttft"] is not None]
    return {
        "gap_ms_median": pct(gaps, 50), "gap_ms_p95": pct(gaps, 95),
        "gap_ms_max": round(max(gaps), 3) if gaps else None,
        "tokens_per_stream": sorted({r["completion_tokens"] for r in sample["streams"]}),
        "chunks_with_text": sorted({r["chunks_with_text"] for r in sample["streams"]}),
        "stream_errors": [r["error"] for r in sample["streams"] if r["error"]][:3],
        "images_sent": len(sample["images"]),
        "image_errors": [i["error"] for i in sample["images"] if i["error"]][:3],
        "image_ttft_ms_median": median(ttft), "image_ttft_ms_max": round(max(ttft), 3) if ttft else None,
    }


# --- summaries ----------------------------------------------------------------------------------------


def summarize_prefill(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per server the medians of the fresh and repeated TTFT and their ratio; slm / llama-server, paired."""
    out: dict[str, Any] = {}
    ttft: dict[str, dict[str, dict[int, float]]] = {}
    for server in SERVERS:
        mine = [s for s in samples if s["server"] == server]
        if not mine:
            continue
        ttft[server] = {kind: {s["repetition"]: s[kind]["ttft"] * 1e3 for s in mine if s[kind]["ttft"]}
                        for kind in KINDS}
        speedups = paired_ratios(ttft[server]["fresh"], ttft[server]["repeated"])
        out[server] = {
            "fresh_ttft_ms": median(ttft[server]["fresh"].values()),
            "repeated_ttft_ms": median(ttft[server]["repeated"].values()),
            "fresh_over_repeated": median(speedups),
            "fresh_over_repeated_per_repetition": [round(r, 3) for r in speedups],
            "text_only_ttft_ms": median(ttft[server]["text_only"].values()),
            "text_only_prompt_tokens": sorted({s["text_only"]["prompt_tokens"] for s in mine
                                               if s["text_only"]["prompt_tokens"]}),
            "prompt_tokens": sorted({s["fresh"]["prompt_tokens"] for s in mine if s["fresh"]["prompt_tokens"]}),
            "cached_tokens_fresh": sorted({s["fresh"]["cached_tokens"] for s in mine
                                           if s["fresh"]["cached_tokens"] is not None}),
            "cached_tokens_repeated": sorted({s["repeated"]["cached_tokens"] for s in mine
                                              if s["repeated"]["cached_tokens"] is not None}),
            "errors": [s[k]["error"] for s in mine for k in KINDS if s[k]["error"]][:3],
            "repetitions": len(mine),
        }
    if SLM in ttft and PEER in ttft:
        for kind in KINDS:
            ratios = paired_ratios(ttft[SLM][kind], ttft[PEER][kind])
            out[f"slm_over_llama_server_{kind}"] = {"paired": median(ratios),
                                                    "per_repetition": [round(r, 3) for r in ratios]}
    return out


def summarize_stall(samples: list[dict[str, Any]], prefill: dict[str, Any]) -> dict[str, Any]:
    """Per server and condition the medians over repetitions; per server the target's check."""
    out: dict[str, Any] = {}
    for server in SERVERS:
        per: dict[str, Any] = {}
        for condition in CONDITIONS:
            mine = [s["stats"] for s in samples if s["server"] == server and s["condition"] == condition]
            if not mine:
                continue
            per[condition] = {key: median(m[key] for m in mine) for key in (
                "gap_ms_median", "gap_ms_p95", "gap_ms_max", "image_ttft_ms_median", "images_sent")} | {
                "gap_ms_max_per_repetition": [m["gap_ms_max"] for m in mine],
                "tokens_per_stream": sorted({t for m in mine for t in m["tokens_per_stream"]}),
                "chunks_with_text": sorted({t for m in mine for t in m["chunks_with_text"]}),
                "errors": [e for m in mine for e in m["stream_errors"] + m["image_errors"]][:3],
                "repetitions": len(mine),
            }
        if ALONE in per and WITH_IMAGES in per:
            prefill_ms = prefill.get(server, {}).get("fresh_ttft_ms")
            without, with_ = per[ALONE]["gap_ms_max"], per[WITH_IMAGES]["gap_ms_max"]
            alone, with_by_rep = ({x["repetition"]: x["stats"]["gap_ms_max"] for x in samples
                                   if x["server"] == server and x["condition"] == c and x["stats"]["gap_ms_max"]}
                                  for c in CONDITIONS)
            allowed = without + prefill_ms if without is not None and prefill_ms is not None else None
            per["target"] = {
                "max_gap_without_ms": without, "max_gap_with_images_ms": with_, "image_prefill_ms": prefill_ms,
                "allowed_ms": round(allowed, 3) if allowed is not None else None,
                "excess_ms": round(with_ - without, 3) if with_ is not None and without is not None else None,
                "met": with_ <= allowed if with_ is not None and allowed is not None else None,
                "repetitions_met": sum(w <= alone[rep] + prefill_ms for rep, w in with_by_rep.items() if rep in alone)
                if prefill_ms is not None else None,
                "repetitions": len(with_by_rep),
            }
        if per:
            out[server] = per
    return out


def observations(report: dict[str, Any]) -> list[str]:
    """What the reader should know about the run, found in its own data."""
    notes = []
    s, prefill, stall = report["settings"], report["prefill"], report["stall"]
    tokens = {server: prefill[server]["prompt_tokens"] for server in SERVERS if server in prefill}
    if len({tuple(t) for t in tokens.values()}) > 1:
        notes.append(fill(REPORT["note_prompts"], slm=tokens.get(SLM), peer=tokens.get(PEER)))
    for server, per in stall.items():
        for condition in CONDITIONS:
            x = per.get(condition)
            if x is None:
                continue
            if x["tokens_per_stream"] != [s["text_tokens"]]:
                notes.append(fill(REPORT["note_short"], server=server, condition=condition,
                                  tokens=x["tokens_per_stream"], max_tokens=s["text_tokens"]))
            if x["chunks_with_text"] != x["tokens_per_stream"]:
                notes.append(fill(REPORT["note_chunks"], server=server, condition=condition,
                                  chunks=x["chunks_with_text"], tokens=x["tokens_per_stream"]))
            if x["errors"]:
                notes.append(fill(REPORT["note_failed"], server=server, condition=condition, error=x["errors"][0]))
    for server in SERVERS:
        if server in prefill and prefill[server]["errors"]:
            notes.append(fill(REPORT["note_failed"], server=server, condition="image prefill",
                              error=prefill[server]["errors"][0]))
    measured = report["prefill_samples"] + report["stall_samples"]
    contended = [x["others_cpu_share"] for x in measured if x["others_cpu_share"] > s["max_contention"]]
    if contended:
        notes.append(fill(REPORT["note_contended"], contended=len(contended), measured=len(measured),
                          max_contention=s["max_contention"], worst=max(contended)))
    return notes


# --- reports ------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "**not met**"


def _list(values: list[Any] | None, digits: int = 1) -> str:
    return ", ".join(_fmt(v, digits) for v in values or []) or "-"


PREFILL_HEADER = ("server", "fresh image TTFT ms", "repeated image TTFT ms", "fresh / repeated", "text only TTFT ms",
                  "slm / llama-server, fresh", "slm / llama-server, repeated", "prompt tokens", "cached on repeat")
PREFILL_ALIGN = "lrrrrrrrr"


def _prefill_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    p = report["prefill"]
    rows = []
    for server in SERVERS:
        if server not in p:
            continue
        x = p[server]
        versus = [(_fmt(p[f"slm_over_llama_server_{k}"]["paired"], 2) + "x"
                   if server == SLM and f"slm_over_llama_server_{k}" in p else "") for k in ("fresh", "repeated")]
        rows.append((server, _fmt(x["fresh_ttft_ms"]), _fmt(x["repeated_ttft_ms"]),
                     _fmt(x["fresh_over_repeated"], 2) + "x", _fmt(x["text_only_ttft_ms"]), *versus,
                     _list(x["prompt_tokens"], 0), _list(x["cached_tokens_repeated"], 0)))
    return rows


STALL_HEADER = ("server", "text streams", "gap median ms", "gap p95 ms", "gap max ms", "max per repetition ms",
                "images per round", "image TTFT under load ms", "tokens per stream")
STALL_ALIGN = "llrrrrrrr"


def _stall_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for server, per in report["stall"].items():
        for condition in CONDITIONS:
            if condition not in per:
                continue
            x = per[condition]
            rows.append((server, condition, _fmt(x["gap_ms_median"]), _fmt(x["gap_ms_p95"]), _fmt(x["gap_ms_max"]),
                         _list(x["gap_ms_max_per_repetition"]), _fmt(x["images_sent"], 0) if condition == WITH_IMAGES
                         else "-", _fmt(x["image_ttft_ms_median"]), _list(x["tokens_per_stream"], 0)))
    return rows


def target_lines(report: dict[str, Any]) -> list[str]:
    return [fill(REPORT["target"], server=server, **t, without=_fmt(t["max_gap_without_ms"]),
                 with_images=_fmt(t["max_gap_with_images_ms"]), prefill=_fmt(t["image_prefill_ms"]),
                 allowed=_fmt(t["allowed_ms"]), excess=_fmt(t["excess_ms"]), verdict=_verdict(t["met"]))
            for server, per in report["stall"].items() if (t := per.get("target"))]


def render_tables(report: dict[str, Any]) -> list[Any]:
    s = report["settings"]
    return [console_table(f"Image prefill (max_tokens 1), medians of {s['repetitions']}", PREFILL_HEADER,
                          _prefill_rows(report), PREFILL_ALIGN),
            console_table(f"{STREAMS} text streams of {s['text_tokens']} tokens, alone and with an image every "
                          f"{s['image_interval']} s, medians of {s['repetitions']}", STALL_HEADER,
                          _stall_rows(report), STALL_ALIGN)]


def render_markdown(report: dict[str, Any]) -> str:
    """vision.md: the template's sections filled from the report."""
    m, s, a = report["machine"], report["settings"], report["actual"]
    measured = report["prefill_samples"] + report["stall_samples"]
    notes = report["notes"]
    # A run without llama-server (--skip-peer, or it did not start) still names it in the prose.
    peer = report["llama_server"] or {"path": "-", "version": "not run", "source": "-"}
    values = report | {"llama_server": peer, "settings": s | {"commands": {PEER: "not run"} | s["commands"]}}
    return fill(
        REPORT["report"], **values, versions=m["versions"], minutes=report["wall_seconds"] / 60, streams=STREAMS,
        slm_flash_attention=flash_attention(a[SLM]), slm_actual=dict.fromkeys(("n_seq_max", "n_ctx", "kv_unified"), "?")
        | a[SLM], peer_actual=dict.fromkeys(("n_slots", "n_ctx_slot", "kv_unified"), "?") | a[PEER],
        load_at_start=load_average(m["load_average_at_start"]), load_at_end=load_average(m["load_average_at_end"]),
        redone=len(report["rejected_for_contention"]), measured=len(measured),
        contended=sum(x["others_cpu_share"] > s["max_contention"] for x in measured), cmake=" ".join(CMAKE_OPTIONS),
        prefill_table=markdown_table(PREFILL_HEADER, _prefill_rows(report), PREFILL_ALIGN),
        stall_table=markdown_table(STALL_HEADER, _stall_rows(report), STALL_ALIGN),
        target_list="\n".join(f"- {line}" for line in target_lines(report)) or "- not measured",
        notes_section=fill(REPORT["notes"], notes="\n".join(f"- {n}" for n in notes)) if notes else "",
    ) + "\n"


# --- the run ------------------------------------------------------------------------------------------


def servers_for(model: str, text: Path, mmproj: Path, binary: Path, args: argparse.Namespace,
                logs: Path) -> dict[str, Server]:
    """Both servers on the text GGUF and its mmproj: the same threads, sequences, context and flash attention."""
    total = args.parallel * args.ctx_per_request
    slm_port, peer_port = free_port(), free_port()
    threads, parallel = str(args.threads), str(args.parallel)
    return {
        SLM: Server(SLM, [slm_executable(), "serve", str(text), "--host", "127.0.0.1", "--port", str(slm_port),
                          "--parallel", parallel, "--ctx-size", str(args.ctx_per_request), "--kv-size", str(total),
                          "--threads", threads, "--flash-attn", "on"],
                    slm_port, "/health", logs / "slm.log", env={"SLM_VERBOSE": "1"}),
        PEER: Server(PEER, [str(binary), "-m", str(text), "--mmproj", str(mmproj), "-a", model, "--host", "127.0.0.1",
                            "--port", str(peer_port), "-np", parallel, "-c", str(total), "-t", threads, "-tb", threads,
                            "-fa", "on"],
                     peer_port, "/health", logs / "llama-server.log"),
    }


def warm_up(servers: dict[str, Server], model: str, args: argparse.Namespace, banned: list[int],
            console: Console) -> dict[str, Any]:
    """Per server: the first image request since it started (it sets up the image encoder) and one text stream."""
    out: dict[str, Any] = {}
    for key, s in servers.items():
        url = s.base_url + "/v1/chat/completions"

        async def requests(key: str = key, url: str = url) -> dict[str, Any]:
            async with _client(2) as client:
                origin = time.perf_counter()
                image = await image_request(client, url, image_body(key, model, "0.0", picture(0), 8), origin)
                text = await stream_request(client, url, text_body(key, model, "0.0", args.text_tokens, banned), origin)
            return {"image": image, "text": text}

        out[key] = w = asyncio.run(requests())
        first = w["image"]["ttft"]
        console.print(f"  warm-up {key:12} first image request TTFT {_fmt(first and first * 1e3)} ms "
                      f"({w['image']['prompt_tokens']} prompt tokens) {w['image']['text']!r}; text stream "
                      f"{w['text']['completion_tokens']} tokens in {w['text']['chunks_with_text']} chunks "
                      f"({w['text']['finish_reason']})")
        for name in ("image", "text"):
            if w[name]["error"]:
                console.print(f"[red]  {key} {name}: {w[name]['error']}[/]")
    return out


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=5, help="runs of every measurement (default 5)")
    parser.add_argument("--text-tokens", type=int, default=128,
                        help="tokens of each text stream (default 128: a few image arrivals per round)")
    parser.add_argument("--image-interval", type=float, default=0.5,
                        help="seconds between image requests during a round with images (default 0.5)")
    parser.add_argument("--threads", type=int, default=2, help="threads on both servers (default 2)")
    parser.add_argument("--parallel", type=int, default=8,
                        help=f"sequences on both servers: the {STREAMS} streams and the images beside them (default 8)")
    parser.add_argument("--ctx-per-request", type=int, default=512,
                        help="context of each sequence; both servers' KV cache holds --parallel of them (default 512)")
    parser.add_argument("--skip-peer", action="store_true", help="measure slm alone")
    add_run_options(parser, unit="measurement", retries=2, quick="a smoke run (1 repetition, 32-token streams)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repetitions, args.text_tokens, args.retries, args.max_wait = 1, 32, 0, 2.0
    output = output_directory(args)
    console = terminal(170)

    info = machine()
    binary = None if args.skip_peer else llama_server(console)
    peer_version = llama_server_version(binary) if binary else None
    console.print("converting the tiny Gemma 3 VLM (tests/vision_models.py) with slm convert --to gguf")
    text, mmproj = converted_tiny_gemma3_vlm("fp32")
    model = text.stem
    banned = end_tokens(text)
    console.print(f"[bold]vision[/] · {info['cpu']} · {info['cores']} cores · {text.name} + {mmproj.name} · "
                  f"llama-server {peer_version} · end tokens banned in text streams: {banned}")
    logs = Path(tempfile.mkdtemp(prefix="slm-vision-bench-"))
    servers = servers_for(model, text, mmproj, binary or Path("llama-server"), args, logs)
    if args.skip_peer:
        del servers[PEER]
    keys = tuple(servers)
    quiet = Quiet(args.max_contention, args.retries, args.max_wait,
                  processes={key: s.cpu_seconds for key, s in servers.items()})
    prefill_samples: list[dict[str, Any]] = []
    stall_samples: list[dict[str, Any]] = []
    exit_codes: dict[str, int | None] = {}
    start_errors: dict[str, str] = {}
    stop_on_signals()
    try:
        for key, s in list(servers.items()):
            console.print(f"starting {key}: {s.shown_command}")
            try:
                s.start()
            except RuntimeError as e:
                if key == SLM:
                    raise
                start_errors[key] = str(e)
                console.print(f"[red]  {key} did not start: {e}[/]")
                del servers[key]
                continue
            console.print(f"  up in {s.start_seconds:.1f} s")
        keys = tuple(servers)
        warmup = warm_up(servers, model, args, banned, console)

        for rep in range(args.repetitions):
            for position, key in enumerate(keys if rep % 2 == 0 else keys[::-1]):
                s = servers[key]
                result = measure(quiet, f"{key} image prefill rep {rep}", lambda s=s, rep=rep: asyncio.run(
                    image_pair(s, model, f"{rep + 1}.p", seed=rep + 1)))
                prefill_samples.append({"server": key, "repetition": rep, "order": position, **result})
                f, r = result["fresh"], result["repeated"]
                console.print(f"  rep {rep} prefill {key:12} fresh {_fmt(f['ttft'] and f['ttft'] * 1e3)} ms, repeated "
                              f"{_fmt(r['ttft'] and r['ttft'] * 1e3)} ms ({f['prompt_tokens']} prompt tokens, "
                              f"{r['cached_tokens']} cached)  others {result['others_cpu_share']:.0%}"
                              + (f"  [red]{f['error'] or r['error']}[/]" if f["error"] or r["error"] else ""))

        for rep in range(args.repetitions):
            for i, key in enumerate(keys if rep % 2 == 0 else keys[::-1]):
                s = servers[key]
                for position, condition in enumerate(CONDITIONS if (rep + i) % 2 == 0 else CONDITIONS[::-1]):
                    result = measure(quiet, f"{key} {condition} rep {rep}", lambda s=s, rep=rep, c=condition:
                                     asyncio.run(stall_round(s, model, f"{rep + 1}.{CONDITIONS.index(c)}",
                                                             c == WITH_IMAGES, args, banned, seed=100 + rep)))
                    stats = stall_stats(result)
                    stall_samples.append({"server": key, "condition": condition, "repetition": rep,
                                          "order": position, "stats": stats, **result})
                    console.print(
                        f"  rep {rep} {key:12} {condition:11} gaps median {_fmt(stats['gap_ms_median'])} p95 "
                        f"{_fmt(stats['gap_ms_p95'])} max {_fmt(stats['gap_ms_max'])} ms; {stats['images_sent']} images"
                        f" (TTFT median {_fmt(stats['image_ttft_ms_median'])} ms); tokens {stats['tokens_per_stream']}"
                        f"  others {result['others_cpu_share']:.0%}"
                        + (f"  [red]{(stats['stream_errors'] + stats['image_errors'])[0]}[/]"
                           if stats["stream_errors"] or stats["image_errors"] else ""))
    finally:
        for key, s in servers.items():
            exit_codes[key] = s.stop()

    prefill = summarize_prefill(prefill_samples)
    info["load_average_at_end"] = os.getloadavg()
    report: dict[str, Any] = report_head("vision", started) | {
        "machine": info | {"versions": package_versions(VERSIONS)},
        "llama_server": {"path": str(binary), "version": peer_version, "cmake_options": list(CMAKE_OPTIONS),
                         "source": f"llama-cpp-python {llama_cpp.__version__} sdist, vendor/llama.cpp",
                         "start_errors": start_errors} if binary else None,
        "settings": {
            "model": model, **model_file(text), "mmproj_file_name": mmproj.name,
            "mmproj_size_bytes": mmproj.stat().st_size, "image_size": SIGLIP["image_size"],
            "image_tokens": MM_TOKENS_PER_IMAGE, "threads": args.threads, "parallel": args.parallel,
            "ctx_per_request": args.ctx_per_request, "kv_cells": args.parallel * args.ctx_per_request,
            "text_streams": STREAMS, "text_tokens": args.text_tokens, "banned_tokens": banned,
            "image_interval_seconds": args.image_interval, "image_interval": args.image_interval,
            "repetitions": args.repetitions, "max_contention": args.max_contention, "retries": args.retries,
            "max_wait_seconds": args.max_wait, "quick": args.quick,
            "commands": {key: s.shown_command for key, s in servers.items()},
            "image_prompt": "Picture <tag>. Describe this: <image>", "text_prompt":
                "Story <tag>. Tell me a long story about the sea.", "request_extras": {k: extras(k) for k in keys},
        },
        "actual": {SLM: log_settings(servers[SLM].log_text()),
                   PEER: llama_server_settings(servers[PEER].log_text()) if PEER in servers else {}},
        "server_start_seconds": {key: round(s.start_seconds, 2) for key, s in servers.items()},
        "server_exit_codes": exit_codes,
        "method": METHOD,
        "prefill": prefill,
        "stall": summarize_stall(stall_samples, prefill),
        "warmup": warmup,
        "rejected_for_contention": quiet.rejected,
        "prefill_samples": prefill_samples,
        "stall_samples": stall_samples,
    }
    report["notes"] = observations(report) + [fill(REPORT["note_peer_failed"], error=e) for e in start_errors.values()]
    for table in render_tables(report):
        console.print(table)
    for line in target_lines(report) + report["notes"]:
        console.print(line)
    console.print(f"wall time {report['wall_seconds']:.0f} s · server logs in {logs}")
    if output is not None:
        data, prose = write_results(output, "vision", report, render_markdown(report), indent=1, ensure_ascii=False,
                                    inline_number_lists=True)
        console.print(f"wrote {data} and {prose}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
