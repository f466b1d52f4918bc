"""benchmarks/serve.py's parts that decide its figures: who runs when, how ratios pair repetitions and which
way a target is judged, the engine-alone loop (on the real SmolLM2) being greedy decoding, and its report
filling every field of its template. The benchmark itself is not run (it takes minutes and measures time)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import slm

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def serve() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other by name, as when run
    try:
        return importlib.import_module("serve")
    finally:
        sys.path.remove(str(BENCHMARKS))


def sample(serve: ModuleType, server: str, clients: int, rep: int, tokens_per_second: float,
           ttft: float) -> dict[str, Any]:
    """A round in which each of ``clients`` requests streamed 100 tokens, the first after ``ttft`` seconds."""
    requests = [{"ttft": ttft, "completion_tokens": 100, "finish_reason": "length", "error": None,
                 "gaps_ms": [10.0], "prompt_tokens": 110, "chunks_with_text": 100, "text_head": "abc"}
                for _ in range(clients)]
    result = {"wall_seconds": 100 * clients / tokens_per_second, "requests": requests, "others_cpu_share": 0.0}
    return {"server": server, "concurrency": clients, "repetition": rep, "order": 0,
            "stats": serve.round_stats(result), **result}


def test_the_servers_take_turns_and_the_engine_runs_beside_slm(serve: ModuleType) -> None:
    for index in range(3):
        assert {serve.round_order(rep, index, 1)[0] for rep in range(3)} == set(serve.SERVERS)
    for rep in range(4):
        order = serve.round_order(rep, 2, serve.ENGINE_SEQUENCES)
        assert sorted(order) == sorted([*serve.SERVERS, serve.ENGINE])
        slm_at, engine_at = order.index(serve.SLM), order.index(serve.ENGINE)
        assert engine_at == (slm_at + 1 if rep % 2 else slm_at - 1)  # before slm, then after it
    assert serve.ENGINE not in serve.round_order(0, 0, 16)


def test_ratios_pair_repetitions_and_latency_targets_are_met_below_one(serve: ModuleType) -> None:
    slm_rates, peer_rates = (100.0, 200.0, 300.0), (50.0, 400.0, 100.0)
    samples = [sample(serve, server, clients, rep, rates[rep], ttft)
               for clients in (1, 16) for rep in range(3)
               for server, rates, ttft in ((serve.SLM, slm_rates, 0.1), (serve.PEER, peer_rates, 0.2))]
    throughput = serve.summarize_throughput(samples)
    one = throughput["1"]["versus"][serve.PEER]
    assert one["per_repetition_ratios"] == [2.0, 0.5, 3.0] and one["paired_ratio"] == 2.0
    assert one["ratio"] == pytest.approx(200 / 100, abs=1e-3)  # the ratio of the medians: 200 / 100
    assert serve.LCP not in throughput["1"]["versus"]  # a server that did not run has no ratio

    targets = serve.build_targets(throughput, {}, {})
    assert targets["one_client_vs_llama_server"]["met"] is True  # 2.0 >= 1.0
    assert targets["sixteen_clients_vs_llama_server"]["met"] is True  # 2.0 >= 1.2
    ttft = targets["ttft_p95_sixteen_clients_vs_llama_server"]
    assert ttft["paired_ratio"] == 0.5 and ttft["met"] is True  # half the peer's TTFT: at most 1.0
    assert targets["eight_clients_vs_llama_server"]["met"] is None  # not measured
    assert targets["http_over_engine"]["met"] is None and targets["shared_prefix"]["met"] is None

    slower = [s | {"stats": s["stats"] | {"ttft_ms_p95": s["stats"]["ttft_ms_p95"] * 3}} if s["server"] == "slm" else s
              for s in samples]
    assert serve.build_targets(serve.summarize_throughput(slower), {}, {})[
        "ttft_p95_sixteen_clients_vs_llama_server"]["met"] is False  # 1.5x the peer's


def test_http_is_judged_against_the_engine_of_the_same_repetition(serve: ModuleType) -> None:
    n = serve.ENGINE_SEQUENCES
    samples = [sample(serve, serve.SLM, n, rep, rate, 0.1) for rep, rate in enumerate((180.0, 95.0))]
    engine = [{"repetition": rep, "decode_tokens_per_second": rate, "tokens_per_second_with_prompts": rate / 2,
               "prompt_seconds": 0.5} for rep, rate in enumerate((200.0, 100.0))]
    summary = serve.summarize_engine(engine, samples)
    assert summary["http_over_engine"]["per_repetition_ratios"] == [0.9, 0.95]
    assert summary["http_over_engine_with_prompts"]["per_repetition_ratios"] == [1.8, 1.9]
    assert serve.build_targets({}, summary, {})["http_over_engine"]["met"] is True  # 0.925 >= 0.9


def test_the_engine_alone_decodes_greedily(serve: ModuleType, model: slm.Model) -> None:
    prompt = "The history of the printing press begins long before"
    result = serve.engine_round(model.engine, [prompt], 12)
    reference = model.generate(model.tokenize(prompt), temperature=0, max_tokens=12)
    assert reference.finish_reason == "length"  # no end token among them: the engine loop does not stop at one
    assert result["text_head"] == reference.text[:80]
    assert result["generated_tokens"] == 12 and result["prompt_tokens"] == [len(model.tokenize(prompt))]
    batched = serve.engine_round(model.engine, [prompt, f"Chapter 2. {prompt}", f"Chapter 3. {prompt}"], 4)
    assert batched["sequences"] == 3 and batched["generated_tokens"] == 12


def test_the_report_fills_every_field_of_its_template(serve: ModuleType) -> None:
    samples = [sample(serve, server, clients, 0, 100.0, 0.1) for clients in (1, 8, 16) for server in serve.SERVERS]
    chat = sample(serve, serve.SLM, 1, 0, 100.0, 0.1)["requests"][0] | {"cached_tokens": 900}
    prefix = [{"server": server, "repetition": 0, "others_cpu_share": 0.0, "first": chat, "second": chat}
              for server in serve.SERVERS]
    engine = [{"repetition": 0, "decode_tokens_per_second": 120.0, "tokens_per_second_with_prompts": 100.0,
               "prompt_seconds": 0.5}]
    throughput, engine_summary = serve.summarize_throughput(samples), serve.summarize_engine(engine, samples)
    report = {
        "command": "benchmarks/serve.py", "created": "today", "git": "abc", "wall_seconds": 60.0,
        "machine": {"cpu": "CPU", "cores": 2, "memory_gib": 8, "os": "Linux", "python": "3.11",
                    "load_average_at_start": (0.1, 0.1, 0.1), "load_average_at_end": (0.2, 0.2, 0.2),
                    "versions": dict.fromkeys(serve.VERSIONS, "1.0")},
        "llama_server": {"version": "version: 1 (abc)", "cmake_options": ["-DLLAMA_CURL=OFF"]},
        "settings": {"model_file_name": "model.gguf", "model_size_bytes": 1000, "threads": 2, "n_ctx": 4096,
                     "llama_server_ctx": 20480, "concurrency": [1, 8, 16], "requests_per_client": 1,
                     "max_tokens": 100, "prompt_tokens_without_tag": 96, "system_prompt_tokens": 999,
                     "prefix_max_tokens": 16, "repetitions": 1, "max_contention": 0.05,
                     "longest_request_tokens": {"completion_request": 210, "chat_request": 1100},
                     "commands": {server: f"{server} --flags" for server in serve.SERVERS}},
        "actual": {server: {"flash_attn": "enabled"} for server in serve.SERVERS},
        "engine": {"settings": {"n_ctx": 4096, "kv_cells": 4096, "max_sequences": 16, "n_batch": 512, "threads": 2,
                                "flash_attention": True, "sequences_decoded": serve.ENGINE_SEQUENCES},
                   **engine_summary},
        "throughput": throughput, "prefix": serve.summarize_prefix(prefix),
        "targets": serve.build_targets(throughput, engine_summary, serve.summarize_prefix(prefix)),
        "notes": ["a note"], "rejected_for_contention": [], "samples": samples, "engine_samples": engine,
        "prefix_samples": prefix,
    }
    text = serve.render_markdown(report)  # a field the report lacks would raise here
    assert "| tok/s through HTTP at 8 clients / slm's engine's batched decode of 8 | issue 15 | >= 0.9x |" in text
    assert "- a note" in text and "`llama-server --flags`" in text
    assert len(serve.render_tables(report)) == 4
