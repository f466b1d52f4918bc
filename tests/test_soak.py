"""The soak of benchmarks/soak.py, for one minute: 16 streaming clients (the official openai SDK) against a real
`slm serve` on a loopback port, with the benchmark's mix of prompt lengths, endpoints, `n`, stops, cancellations
and prompts beyond the context; then the server must account for every request and go back to idle, and its
resident memory must stay within the benchmark's bound. One run, shared by the tests of this module."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    """benchmarks/soak.py, imported the way the scripts there import each other (``from harness import ...``)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("soak")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def record(soak: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result: dict[str, Any] = soak.run(soak.QUICK, tmp_path_factory.mktemp("soak"), say=lambda line: None)
    return result


def test_the_mix_ran(record: dict[str, Any]) -> None:
    """Requests ran to their end and others were closed mid-stream, with n > 1 among them."""
    results = {r["result"] for r in record["requests"] if not r.get("probe")}
    assert "finished" in results
    assert results & {"cancelled", "stopped"}
    assert any(r["n"] > 1 for r in record["requests"])
    assert record["server_exit_code"] == 0


def test_no_errors_but_the_intended_ones(record: dict[str, Any]) -> None:
    errors = record["figures"]["errors"]
    assert not errors, errors
    statuses = record["http_statuses"]  # {"/v1/completions 200": count, ...}
    assert not [k for k in statuses if k.split()[-1].startswith("5")], statuses
    assert record["server_log_tracebacks"] == 0


def test_counters_account_for_every_request(record: dict[str, Any]) -> None:
    server, figures = record["figures"]["server"], record["figures"]
    assert server["requests"] == figures["choices"]  # every choice of every request reached the scheduler
    assert server["requests"] == server["finished"] + server["cancelled"] + server["failed"]
    assert server["failed"] == figures["intended_failures"]
    assert server["cancelled"] <= figures["choices_left_open"]


def test_kv_cells_back_to_idle(record: dict[str, Any]) -> None:
    idle = record["metrics_at_idle"]
    assert (idle["running"], idle["waiting"], idle["kv_cells_reserved"]) == (0, 0, 0)
    assert record["health_final"]["prefix_cache_bytes"] <= record["figures"]["prefix_cache_limit"]


def test_memory_flat_after_the_warmup(record: dict[str, Any]) -> None:
    f = record["figures"]
    assert f["rss_growth_after_warmup"] <= f["rss_growth_bound"], f
    assert f["rss_less_cache_growth_after_warmup"] <= record["settings"]["memory_margin"], f


def test_every_check_of_the_benchmark_passes(record: dict[str, Any]) -> None:
    failed = [c for c in record["checks"] if not c["passed"]]
    assert not failed, failed
