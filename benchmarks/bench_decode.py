"""Decode and prefill speed of slm against llama-cpp-python's own high-level generation.

One run measures three configurations on the same machine, model file, prompt and context size:

1. ``fa_off``, "same settings, flash attention off": both sides on the same threads (all available cores,
   for generation and for the prompt) with flash attention off.
2. ``fa_on``, "same settings, flash attention on": the same, with flash attention on
   (``flash_attention=True`` / ``Llama(flash_attn=True)``).
3. ``defaults``, "each tool's defaults": ``slm.load(name, n_ctx=...)`` with no other engine option
   (threads = all cores, flash attention AUTO, llama.cpp's own default) against
   ``Llama(model_path, n_ctx=..., verbose=False)`` with nothing else set (its defaults: ``n_threads =
   cpu_count() // 2``, ``n_threads_batch = cpu_count()``, flash attention off). The thread counts and the
   flash-attention setting each side actually got are read back from the llama.cpp contexts and logs.

In each configuration:

* slm: ``model.generate(prompt_ids, max_tokens=N)``, greedy (temperature 0) and with the default sampler
  (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, a seed). Prefill speed is the prompt length over the
  time to first token, decode speed is (generated - 1) over the time from the first to the last token, both
  from ``Completion.timings``.
* llama-cpp-python: ``Llama.create_completion(prompt_ids, stream=True, ...)`` with the same parameters
  (``repeat_penalty=1.0``), timed from outside: the first streamed chunk is the first token, the final chunk
  (the one with the finish reason) is the last. ``Llama.reset()`` runs before every call, so its
  prompt-prefix cache never skips the prefill.
* Both sides read the same prompt ids (a raw, unfinished English text cut to ``--prompt-tokens`` tokens)
  and must stop for "length" after exactly N tokens; runs are interleaved, the side that goes first
  alternating between repetitions.

Then, for configuration 1 only:

* Loop overhead: the same generations with timing shims around ``llama_decode`` (the C forward pass),
  slm's ``engine.evaluate`` and ``Generator.sample``, to split each decoded token's time into engine and
  Python work. The shims exist only in this script, only during that phase.

And once:

* CLI time to first token: ``slm run "Hello" --max-tokens 1`` as a subprocess, wall time from ``Popen`` to
  the first byte on its stdout.

Every sample waits for a quiet second, records how much of the machine other processes used while it ran
(from /proc/stat), and is redone when they used too much, since a shared two-core machine makes
llama.cpp's spinning threads very sensitive to contention.

    .venv/bin/python benchmarks/bench_decode.py                  # full run, writes benchmarks/results/
    .venv/bin/python benchmarks/bench_decode.py --quick          # a smoke test, writes nothing
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as llama_cpp_lowlevel
from rich.console import Console
from rich.table import Table

import slm
import slm.engines.llamacpp as slm_llamacpp
from harness import (
    PROMPT_TEXT,
    ROOT,
    Measured,
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
    paired_ratios,
    report_head,
    slm_executable,
    templates,
    terminal,
    write_results,
)
from slm.generation.generator import Generator
from slm.tools.bench import no_end_bias

SLM = "slm"
LCP = "llama-cpp-python"
GREEDY = "greedy"
SAMPLED = "sampled"
MODES = (GREEDY, SAMPLED)
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
TARGET_DECODE_RATIO = 1.10
TARGET_CLI_SECONDS = 1.5


@dataclass(frozen=True)
class Config:
    """One pairing of engine settings. ``threads``/``flash`` None means: leave the option unset on both sides,
    so each tool uses its own default."""

    key: str
    title: str
    threads: bool
    """True: both sides get the same explicit thread count (``--threads``)."""
    flash: bool | None
    overhead: bool = False
    """Also run the per-token time split in this configuration."""

    def slm_options(self, threads: int) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.threads:
            options["threads"] = threads
        if self.flash is not None:
            options["flash_attention"] = self.flash
        return options

    def llama_cpp_python_options(self, threads: int) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.threads:
            options |= {"n_threads": threads, "n_threads_batch": threads}
        if self.flash is not None:
            options["flash_attn"] = self.flash
        return options


CONFIGS = (
    Config("fa_off", "same settings, flash attention off", threads=True, flash=False, overhead=True),
    Config("fa_on", "same settings, flash attention on", threads=True, flash=True),
    Config("defaults", "each tool's defaults", threads=False, flash=None),
)

MODEL = "smollm2"

METHOD = {
    SLM: "model.generate(prompt_ids, max_tokens=N, ...); prefill = prompt tokens / "
         "Completion.timings.time_to_first_token; decode = (N - 1) / Completion.timings.decode_seconds",
    LCP: "Llama.reset(); Llama.create_completion(prompt_ids, max_tokens=N, repeat_penalty=1.0, stream=True, "
         "...); time to first token = first streamed chunk; decode = (N - 1) / (final chunk - first chunk)",
    "order": "configurations one after the other; in each, per repetition: greedy then sampled, each side "
             "once; the side that goes first alternates",
    "actual": "threads read back with llama_n_threads / llama_n_threads_batch on each side's context; flash "
              "attention from llama.cpp's log while the context was created (the requested type, and what "
              "auto resolved to)",
    "ratios": "ratio_* = slm median / llama-cpp-python median; paired_ratio_* = median over repetitions of "
              "the per-repetition ratio",
    "loop_overhead": "separate runs with timing shims around llama_decode, slm's engine.evaluate and "
                     "Generator.sample; per decoded token (the prefill step excluded), medians over runs",
    "cli": "wall time from Popen to the first byte read from the command's stdout (pipe, unbuffered)",
    "others_cpu_share": "share of the machine's CPU time used by other processes during a sample (/proc/stat); "
                        "each sample waits for a quiet moment and is redone (up to `retries` times) when "
                        "others took more than `max_contention`; redone attempts are in "
                        "rejected_for_contention",
}

REPORT = templates("decode")
"""The prose of decode.md: benchmarks/templates/decode.md."""


def _brief(result: Any) -> Any:
    """What the record of a sample thrown away for contention keeps of it: its figures, not its text."""
    if isinstance(result, dict):
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in result.items() if k not in ("text", "output")}
    return result


# --- the two sides ------------------------------------------------------------------------------------


@dataclass
class Sample:
    config: str
    side: str
    mode: str
    repetition: int
    order: int
    """0 if this side ran first in its repetition, 1 if second."""
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    time_to_first_token: float
    decode_seconds: float
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    wall_seconds: float
    others_cpu_share: float
    """Share of the machine's CPU time other processes used during this sample."""
    retries: int
    """Earlier attempts of this sample thrown away because other processes were busy (see ``rejected``)."""


def _params(mode: str, seed: int) -> dict[str, Any]:
    return {"temperature": 0.0} if mode == GREEDY else {**SAMPLING, "seed": seed}


class SlmSide:
    def __init__(self, model: slm.Model, prompt: list[int], tokens: int, seed: int) -> None:
        self.model, self.prompt, self.tokens, self.seed = model, prompt, tokens, seed
        self.logit_bias: dict[int, float] = {}

    def run(self, mode: str) -> dict[str, Any]:
        extra = {"logit_bias": self.logit_bias} if self.logit_bias else {}
        start = time.perf_counter()
        c = self.model.generate(self.prompt, max_tokens=self.tokens, **_params(mode, self.seed), **extra)
        wall = time.perf_counter() - start
        t = c.timings
        return {
            "prompt_tokens": c.usage.prompt_tokens,
            "completion_tokens": c.usage.completion_tokens,
            "finish_reason": c.finish_reason,
            "time_to_first_token": t.time_to_first_token,
            "decode_seconds": t.decode_seconds,
            "wall_seconds": wall,
            "text": c.text,
        }


class LlamaCppPythonSide:
    """``Llama.create_completion(stream=True)`` timed from outside: first chunk = first token, the final
    chunk (with the finish reason) = after the last token."""

    def __init__(self, llm: llama_cpp.Llama, prompt: list[int], tokens: int, seed: int) -> None:
        self.llm, self.prompt, self.tokens, self.seed = llm, prompt, tokens, seed
        self.logit_bias: dict[int, float] = {}

    def run(self, mode: str) -> dict[str, Any]:
        params = _params(mode, self.seed)
        extra = {"logit_bias": self.logit_bias} if self.logit_bias else {}
        self.llm.reset()  # no prompt-prefix reuse from the previous call: every run reads the whole prompt
        parts: list[str] = []
        finish = None
        start = time.perf_counter()
        first = last = start
        for i, chunk in enumerate(
            self.llm.create_completion(
                self.prompt, max_tokens=self.tokens, repeat_penalty=1.0, stream=True, **params, **extra
            )
        ):
            last = time.perf_counter()
            if i == 0:
                first = last
            choice = chunk["choices"][0]
            parts.append(choice["text"])
            finish = choice["finish_reason"] or finish
        wall = time.perf_counter() - start
        # The last sampled token is never evaluated: the cache holds prompt + generated - 1 tokens.
        generated = self.llm.n_tokens - len(self.prompt) + 1 if finish == "length" else self.llm.n_tokens - len(
            self.prompt
        )
        return {
            "prompt_tokens": len(self.prompt),
            "completion_tokens": generated,
            "finish_reason": finish or "?",
            "time_to_first_token": first - start,
            "decode_seconds": last - first,
            "wall_seconds": wall,
            "text": "".join(parts),
        }


def _sample(
    config: str,
    side: str,
    mode: str,
    repetition: int,
    order: int,
    measured: Measured[dict[str, Any]],
) -> Sample:
    result = measured.result
    ttft, decode, n = result["time_to_first_token"], result["decode_seconds"], result["completion_tokens"]
    return Sample(
        config=config,
        side=side,
        mode=mode,
        repetition=repetition,
        order=order,
        prompt_tokens=result["prompt_tokens"],
        completion_tokens=n,
        finish_reason=result["finish_reason"],
        time_to_first_token=round(ttft, 6),
        decode_seconds=round(decode, 6),
        prefill_tokens_per_second=round(result["prompt_tokens"] / ttft, 3) if ttft > 0 else 0.0,
        decode_tokens_per_second=round((n - 1) / decode, 3) if decode > 0 else 0.0,
        wall_seconds=round(result["wall_seconds"], 6),
        others_cpu_share=round(measured.others, 3),
        retries=measured.retries,
    )


# --- loop overhead ------------------------------------------------------------------------------------


@contextlib.contextmanager
def patched(owner: Any, name: str, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """Replace ``owner.name`` by ``wrapper(original)`` for the duration of the block."""
    had_own = name in vars(owner)
    original = getattr(owner, name)
    setattr(owner, name, wrapper(original))
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def _timed(log: list[float]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                log.append(time.perf_counter() - start)

        return timed

    return wrap


def overhead_run(side: SlmSide | LlamaCppPythonSide, mode: str) -> dict[str, float]:
    """One generation with timing shims; per decoded token (the first token's step, which holds the
    prefill, is left out): the total, the C forward pass, and for slm ``engine.evaluate`` and sampling."""
    decodes: list[float] = []
    evaluates: list[float] = []
    samples: list[float] = []
    with contextlib.ExitStack() as stack:
        if isinstance(side, SlmSide):
            stack.enter_context(patched(slm_llamacpp.lc, "llama_decode", _timed(decodes)))
            stack.enter_context(patched(side.model.engine, "evaluate", _timed(evaluates)))
            stack.enter_context(patched(Generator, "sample", _timed(samples)))
        else:
            stack.enter_context(patched(llama_cpp_lowlevel, "llama_decode", _timed(decodes)))
        result = side.run(mode)
    steps = result["completion_tokens"] - 1
    per_token = result["decode_seconds"] / steps
    # The last `steps` calls each evaluate one generated token; the ones before read the prompt.
    decode = sum(decodes[-steps:]) / steps
    out = {"total_ms": per_token * 1e3, "llama_decode_ms": decode * 1e3}
    if evaluates:
        evaluate = sum(evaluates[-steps:]) / steps
        sample = sum(samples[-steps:]) / steps
        out |= {
            "evaluate_ms": evaluate * 1e3,
            "sample_ms": sample * 1e3,
            "other_ms": (per_token - evaluate - sample) * 1e3,
        }
    return out


def summarize_overhead(runs: list[dict[str, float]]) -> dict[str, Any]:
    med = {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}
    python = med["total_ms"] - med["llama_decode_ms"]
    summary: dict[str, Any] = {
        "per_token_ms_median": med,
        "python_ms_per_token": round(python, 4),
        "python_over_llama_decode": round(python / med["llama_decode_ms"], 4),
        "python_share_of_token": round(python / med["total_ms"], 4),
    }
    if "evaluate_ms" in med:
        loop = med["total_ms"] - med["evaluate_ms"]
        summary |= {
            "loop_ms_per_token": round(loop, 4),
            "loop_over_evaluate": round(loop / med["evaluate_ms"], 4),
            "evaluate_wrapper_ms_per_token": round(med["evaluate_ms"] - med["llama_decode_ms"], 4),
        }
    return summary


# --- CLI time to first token --------------------------------------------------------------------------


def cli_first_byte(command: list[str]) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, cwd=ROOT)
    assert proc.stdout is not None
    first = os.read(proc.stdout.fileno(), 1)
    first_at = time.perf_counter()
    rest, err = proc.communicate()
    end = time.perf_counter()
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}): {err.decode(errors='replace')}")
    return {
        "first_byte_seconds": round(first_at - start, 4),
        "exit_seconds": round(end - start, 4),
        "output": (first + rest).decode(errors="replace").strip(),
    }


def python_startup(args: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, cwd=ROOT, capture_output=True)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def cli_time_to_first_token(quiet: Quiet, runs: int, console: Console) -> dict[str, Any]:
    """``slm run "Hello" --max-tokens 1``: ``runs`` measured runs after a warm-up, and Python's own start-up."""
    command = [slm_executable(), "run", "Hello", "--max-tokens", "1"]
    console.print("CLI time to first token...")
    cli_first_byte(command)  # warm the disk cache and the bytecode cache
    measured = []
    for _ in range(runs):
        m = quiet.run("cli", lambda: cli_first_byte(command))
        measured.append(m.result | {"others_cpu_share": round(m.others, 3), "retries": m.retries})
    first = [r["first_byte_seconds"] for r in measured]
    return {
        "command": " ".join(command[:1] + [f'"{a}"' if " " in a else a for a in command[1:]]),
        "first_byte_seconds_median": median(first, 4),
        "first_byte_seconds_range": [min(first), max(first)],
        "exit_seconds_median": median([r["exit_seconds"] for r in measured], 4),
        "others_cpu_share_median": median([r["others_cpu_share"] for r in measured]),
        "python_startup_seconds_median": python_startup(["-c", "pass"], 3),
        "import_slm_cli_seconds_median": python_startup(["-c", "import slm.cli"], 3),
        "target_seconds": TARGET_CLI_SECONDS,
        "runs": measured,
    }


# --- settings each side actually used -----------------------------------------------------------------


@contextlib.contextmanager
def llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines during the block. Its log callback is process-wide: slm's own callback
    still sees every line meanwhile, and is put back afterwards."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def record(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))
        slm_llamacpp._on_log(level, text, user_data)

    llama_cpp.llama_log_set(record, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(slm_llamacpp._on_log, ctypes.c_void_p(0))


def context_settings(ctx: Any, log: list[str]) -> dict[str, Any]:
    """What a llama.cpp context was actually created with."""
    return {
        "n_threads": llama_cpp.llama_n_threads(ctx),
        "n_threads_batch": llama_cpp.llama_n_threads_batch(ctx),
        **flash_attention_in_log(log),
        "n_ctx": llama_cpp.llama_n_ctx(ctx),
        "n_batch": llama_cpp.llama_n_batch(ctx),
        "n_ubatch": llama_cpp.llama_n_ubatch(ctx),
    }


def _call(function: str, first: str, options: dict[str, Any]) -> str:
    return f"{function}({', '.join([first, *(f'{k}={v!r}' for k, v in options.items())])})"


# --- the run ------------------------------------------------------------------------------------------


def _by_repetition(samples: list[Sample], mode: str, side: str, figure: str) -> dict[int, float]:
    return {s.repetition: getattr(s, figure) for s in samples if s.mode == mode and s.side == side}


def summarize(samples: list[Sample], contended: float) -> dict[str, Any]:
    """Medians and ratios per mode; ``contended_samples`` counts kept samples during which other processes
    used more than ``contended`` of the machine (kept because every redo was contended too)."""
    summary: dict[str, Any] = {}
    for mode in MODES:
        per: dict[str, Any] = {}
        for side in (SLM, LCP):
            mine = [s for s in samples if s.mode == mode and s.side == side]
            per[side] = {
                "decode_tokens_per_second_median": median([s.decode_tokens_per_second for s in mine]),
                "prefill_tokens_per_second_median": median([s.prefill_tokens_per_second for s in mine]),
                "time_to_first_token_median": median([s.time_to_first_token for s in mine], 5),
                "decode_tokens_per_second_range": [
                    min(s.decode_tokens_per_second for s in mine), max(s.decode_tokens_per_second for s in mine)
                ],
                "others_cpu_share_median": median([s.others_cpu_share for s in mine]),
                "samples": len(mine),
                "contended_samples": sum(s.others_cpu_share > contended for s in mine),
            }
        a, b = per[SLM], per[LCP]
        per["ratio_decode"] = round(a["decode_tokens_per_second_median"] / b["decode_tokens_per_second_median"], 3)
        per["ratio_prefill"] = round(
            a["prefill_tokens_per_second_median"] / b["prefill_tokens_per_second_median"], 3
        )
        for what in ("decode", "prefill"):
            figure = f"{what}_tokens_per_second"
            per[f"paired_ratio_{what}_median"] = median(
                paired_ratios(_by_repetition(samples, mode, SLM, figure), _by_repetition(samples, mode, LCP, figure))
            )
        summary[mode] = per
    return summary


@dataclass
class Run:
    """What every configuration shares."""

    args: argparse.Namespace
    threads: int
    model_path: Path
    prompt: list[int]
    quiet: Quiet
    console: Console
    samples: list[Sample] = field(default_factory=list)


def run_config(cfg: Config, run: Run) -> dict[str, Any]:
    """Load both sides with ``cfg``'s settings, check and warm them up, then the interleaved speed runs
    (and the per-token split when ``cfg.overhead``)."""
    args, console = run.args, run.console
    slm_options = {"n_ctx": args.n_ctx, **cfg.slm_options(run.threads)}
    lcp_options = {"n_ctx": args.n_ctx, **cfg.llama_cpp_python_options(run.threads)}
    with llama_log() as log:
        model = slm.load(MODEL, **slm_options)
    actual = {SLM: context_settings(model.engine._ctx, log)}
    with llama_log() as log:
        llm = llama_cpp.Llama(str(run.model_path), **lcp_options, verbose=False)
    actual[LCP] = context_settings(llm.ctx, log)
    console.print(f"[bold]{cfg.key}: {cfg.title}[/]")
    for name in (SLM, LCP):
        a = actual[name]
        console.print(f"  {name:17} threads {a['n_threads']} (batch {a['n_threads_batch']}), flash attention "
                      f"{a['flash_attn_type']} -> {a['flash_attn']}, n_ctx {a['n_ctx']}")
    if llm.tokenize(PROMPT_TEXT.encode(), add_bos=True, special=True)[: len(run.prompt)] != run.prompt:
        console.print("[yellow]note: the two tokenizers differ on the prompt; both sides get slm's ids[/]")
    sides: dict[str, SlmSide | LlamaCppPythonSide] = {
        SLM: SlmSide(model, run.prompt, args.tokens, args.seed),
        LCP: LlamaCppPythonSide(llm, run.prompt, args.tokens, args.seed),
    }

    # Warm-up, and a check that every run generates exactly N tokens (the outputs are deterministic:
    # greedy, or a fixed seed). If one side would stop early, bias the end-of-generation tokens on both.
    eog_bias = no_end_bias(model.info)
    forced: dict[str, bool] = {}
    for mode in MODES:
        results = {name: side.run(mode) for name, side in sides.items()}
        forced[mode] = any(r["completion_tokens"] != args.tokens for r in results.values())
        if forced[mode]:
            console.print(f"[yellow]{mode}: a side stopped early; forcing the length with logit_bias {eog_bias}[/]")
            for side in sides.values():
                side.logit_bias = eog_bias
            results = {name: side.run(mode) for name, side in sides.items()}
            for side in sides.values():
                side.logit_bias = {}
        for name, r in results.items():
            console.print(f"  warm-up {mode:7} {name:17} {r['completion_tokens']} tokens: {r['text'][:60]!r}...")

    def measure(name: str, mode: str, fn: Callable[[SlmSide | LlamaCppPythonSide, str], dict[str, Any]]
                ) -> Measured[dict[str, Any]]:
        side = sides[name]
        side.logit_bias = eog_bias if forced[mode] else {}
        try:
            return run.quiet.run(f"{cfg.key} {name} {mode}", lambda: fn(side, mode))
        finally:
            side.logit_bias = {}

    def generate(side: SlmSide | LlamaCppPythonSide, mode: str) -> dict[str, Any]:
        result = side.run(mode)
        if result["completion_tokens"] != args.tokens or result["finish_reason"] != "length":
            raise RuntimeError(f"{side} {mode}: {result['completion_tokens']} tokens ({result['finish_reason']})")
        return result

    samples: list[Sample] = []
    for rep in range(args.repetitions):
        order = (SLM, LCP) if rep % 2 == 0 else (LCP, SLM)
        for mode in MODES:
            for position, name in enumerate(order):
                measured = measure(name, mode, generate)
                samples.append(_sample(cfg.key, name, mode, rep, position, measured))
                s = samples[-1]
                console.print(f"  rep {rep} {mode:7} {name:17} decode {s.decode_tokens_per_second:7.1f} tok/s  "
                              f"prefill {s.prefill_tokens_per_second:7.1f} tok/s  others {s.others_cpu_share:4.0%}  "
                              f"retries {s.retries}")
    run.samples += samples
    out: dict[str, Any] = {
        "title": cfg.title,
        "slm_call": _call("slm.load", repr(MODEL), slm_options),
        "llama_cpp_python_call": _call("Llama", "model_path", {**lcp_options, "verbose": False}),
        "actual": actual,
        "forced_length_with_logit_bias": forced,
        "summary": summarize(samples, args.max_contention),
    }

    if cfg.overhead and args.overhead_repetitions > 0:
        console.print("  loop overhead...")
        raw: dict[str, dict[str, list[dict[str, float]]]] = {m: {SLM: [], LCP: []} for m in MODES}
        for rep in range(args.overhead_repetitions):
            order = (SLM, LCP) if rep % 2 == 0 else (LCP, SLM)
            for mode in MODES:
                for name in order:
                    split = measure(name, mode, overhead_run)
                    raw[mode][name].append(split.result | {"others_cpu_share": round(split.others, 3),
                                                           "retries": split.retries})
        out["loop_overhead"] = {m: {n: summarize_overhead(runs) for n, runs in per.items()} for m, per in raw.items()}
        out["loop_overhead_runs"] = raw
    model.close()
    llm.close()
    return out


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=5,
                        help="measured runs per side, mode and configuration (default 5)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens to generate per run (default 128)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads on both sides in the 'same settings' configurations "
                             "(default: all available cores)")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prompt length in tokens (default 256)")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context size on both sides (default 2048)")
    every = ",".join(c.key for c in CONFIGS)
    parser.add_argument("--configs", default=every, help=f"comma-separated configurations to run (default {every})")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the sampled runs (both sides)")
    parser.add_argument("--cli-runs", type=int, default=5, help="measured CLI runs (default 5; 0 skips)")
    parser.add_argument("--overhead-repetitions", type=int, default=3,
                        help="runs per side and mode with timing shims, in the first configuration (default 3)")
    add_run_options(parser, unit="sample", retries=3, quick="a smoke test (2 repetitions, 32 tokens, 2 CLI runs)")
    args = parser.parse_args(argv)
    known = {c.key: c for c in CONFIGS}
    chosen = [known.get(k.strip()) for k in args.configs.split(",") if k.strip()]
    if not chosen or None in chosen:
        parser.error(f"--configs takes a comma-separated subset of {', '.join(known)}")
    configs = [c for c in CONFIGS if c in chosen]
    if args.quick:
        args.repetitions, args.tokens, args.cli_runs, args.max_wait, args.retries = 2, 32, 2, 2.0, 0
        args.overhead_repetitions = 1
    output = output_directory(args)
    threads = args.threads or slm_llamacpp.default_threads()
    console = terminal(150)

    resolved = slm.store.catalog.resolve(MODEL)
    model_path = resolved.path
    info = machine()
    console.print(f"[bold]bench_decode[/] · {info['cpu']} · {info['cores']} cores · {model_path.name}")
    console.print(f"configs={','.join(c.key for c in configs)} threads={threads} n_ctx={args.n_ctx} "
                  f"tokens={args.tokens} prompt={args.prompt_tokens} repetitions={args.repetitions}")

    tokenizer = slm.load(MODEL, n_ctx=args.n_ctx, threads=1)
    prompt = tokenizer.tokenize(PROMPT_TEXT)[: args.prompt_tokens]
    tokenizer.close()
    if len(prompt) < args.prompt_tokens:
        parser.error(f"the prompt text has only {len(prompt)} tokens")

    quiet = Quiet(args.max_contention, args.retries, args.max_wait, keep=_brief)
    run = Run(args, threads, model_path, prompt, quiet, console)
    results = {cfg.key: run_config(cfg, run) for cfg in configs}

    cli = cli_time_to_first_token(quiet, args.cli_runs, console) if args.cli_runs > 0 else {}

    settings = {
        "model": resolved.name,
        **model_file(model_path),
        "configurations": [c.key for c in configs],
        "same_settings_threads": threads,
        "n_ctx": args.n_ctx,
        "prompt_tokens": len(prompt),
        "generated_tokens": args.tokens,
        "repetitions": args.repetitions,
        "overhead_repetitions": args.overhead_repetitions,
        "overhead_configuration": next((c.key for c in configs if c.overhead), None),
        "seed": args.seed,
        "sampling": SAMPLING,
        "max_contention": args.max_contention,
        "retries": args.retries,
        "max_wait_seconds": args.max_wait,
        "quick": args.quick,
        "slm_engine_settings": "n_batch=n_ubatch=512, n_seq_max=4, kv_unified=true, no_perf=true (slm's own "
                               "choices, in every configuration)",
        "llama_cpp_python_settings": "Llama(...) defaults for everything not in its call: n_batch=512, "
                                     "n_ubatch=512, n_seq_max=1",
    }
    targets: dict[str, Any] = {"decode_target": TARGET_DECODE_RATIO, "decode": {}}
    for key, result in results.items():
        s = result["summary"]
        targets["decode"][key] = {
            "title": result["title"],
            **{f"ratio_{mode}": s[mode]["ratio_decode"] for mode in MODES},
            **{f"paired_ratio_{mode}": s[mode]["paired_ratio_decode_median"] for mode in MODES},
            **{f"met_{mode}": s[mode]["paired_ratio_decode_median"] >= TARGET_DECODE_RATIO for mode in MODES},
            "slm_decode_range": {mode: s[mode][SLM]["decode_tokens_per_second_range"] for mode in MODES},
        }
    targets["decode_verdict_on"] = ("paired ratio (median of the per-repetition slm / llama-cpp-python ratios): "
                                    "it cancels the machine's drift between repetitions, a ratio of medians does not")
    targets |= {
        "cli_first_byte_seconds": cli.get("first_byte_seconds_median"),
        "cli_target_seconds": TARGET_CLI_SECONDS,
        "cli_met": cli["first_byte_seconds_median"] <= TARGET_CLI_SECONDS if cli else None,
    }
    info["load_average_at_end"] = os.getloadavg()
    report = report_head("bench_decode", started) | {
        "machine": info,
        "settings": settings,
        "method": METHOD,
        "targets": targets,
        "configurations": {k: {n: v for n, v in r.items() if n != "loop_overhead_runs"} for k, r in results.items()},
        "cli": {k: v for k, v in cli.items() if k != "runs"},
        "rejected_for_contention": quiet.rejected,
        "samples": [asdict(s) for s in run.samples],
        "loop_overhead_runs": {k: r["loop_overhead_runs"] for k, r in results.items() if "loop_overhead_runs" in r},
        "cli_runs": cli.get("runs", []),
    }

    for table in render_tables(report):
        console.print(table)
    console.print(f"wall time {report['wall_seconds']:.0f} s")
    if output is not None:
        data, prose = write_results(output, "decode", report, render_markdown(report))
        console.print(f"wrote {data} and {prose}")
    return 0


# --- reports ------------------------------------------------------------------------------------------

SPEED_HEADER = ("measure", SLM, LCP, "slm / llama-cpp-python")
OVERHEAD_HEADER = (
    "run", "ms/token", "llama_decode ms", "evaluate ms", "sample ms",
    "Python ms (vs llama_decode)", "loop ms (vs evaluate)",
)


def _rows(summary: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    for mode in MODES:
        s = summary[mode]
        for what, key, ratio, paired in (
            ("decode", "decode_tokens_per_second_median", "ratio_decode", "paired_ratio_decode_median"),
            ("prefill", "prefill_tokens_per_second_median", "ratio_prefill", "paired_ratio_prefill_median"),
        ):
            rows.append((
                f"{what} tok/s, {mode}",
                f"{s[SLM][key]:.1f}",
                f"{s[LCP][key]:.1f}",
                f"{s[ratio]:.3f}x (paired {s[paired]:.3f}x)",
            ))
    return rows


def _overhead_rows(overhead: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for mode in MODES:
        for name in (SLM, LCP):
            o = overhead[mode][name]
            m = o["per_token_ms_median"]
            rows.append((
                f"{name}, {mode}",
                f"{m['total_ms']:.3f}",
                f"{m['llama_decode_ms']:.3f}",
                f"{m['evaluate_ms']:.3f}" if "evaluate_ms" in m else "-",
                f"{m['sample_ms']:.3f}" if "sample_ms" in m else "-",
                f"{o['python_ms_per_token']:.3f} ({o['python_over_llama_decode']:.1%})",
                f"{o['loop_ms_per_token']:.3f} ({o['loop_over_evaluate']:.1%})" if "loop_ms_per_token" in o else "-",
            ))
    return rows


def _engine(actual: dict[str, Any]) -> str:
    """'2 threads (prompt 2), flash attention auto -> enabled'"""
    threads = f"{actual['n_threads']} thread{'s' if actual['n_threads'] != 1 else ''}"
    return f"{threads} (prompt {actual['n_threads_batch']}), flash attention {flash_attention(actual)}"


def _capitalized(title: str) -> str:
    return title[0].upper() + title[1:]


def render_tables(report: dict[str, Any]) -> list[Table]:
    tables = []
    reps = report["settings"]["repetitions"]
    for number, (key, c) in enumerate(report["configurations"].items(), 1):
        rows = _rows(c["summary"])
        for mode, per in c.get("loop_overhead", {}).items():
            rows.append((
                f"per-token Python work, {mode}",
                f"{per[SLM]['python_ms_per_token']:.2f} ms ({per[SLM]['python_over_llama_decode']:.0%} of "
                "llama_decode)",
                f"{per[LCP]['python_ms_per_token']:.2f} ms ({per[LCP]['python_over_llama_decode']:.0%} of "
                "llama_decode)",
                f"loop vs evaluate: {per[SLM]['loop_over_evaluate']:.1%}",
            ))
        title = (f"{number}. {c['title']} ({key}) · medians of {reps}\n"
                 f"slm: {_engine(c['actual'][SLM])} · llama-cpp-python: {_engine(c['actual'][LCP])}")
        tables.append(console_table(title, SPEED_HEADER, rows, "lrrr"))
    cli = report["cli"]
    if cli:
        row = ("first byte on stdout", f"{cli['first_byte_seconds_median']:.3f}", f"<= {cli['target_seconds']}")
        tables.append(console_table("CLI", ("measure", "seconds", "target"), [row], "lll"))
    return tables


def render_markdown(report: dict[str, Any]) -> str:
    """decode.md: the template's sections filled from the report."""
    s, t = report["settings"], report["targets"]
    configs = report["configurations"]
    sections = []
    for number, (key, c) in enumerate(configs.items(), 1):
        contended = ", ".join(
            f"{mode} {name} {x['contended_samples']}/{x['samples']} ({x['others_cpu_share_median']:.0%})"
            for mode in MODES
            for name in (SLM, LCP)
            for x in [c["summary"][mode][name]]
        )
        sections.append(fill(
            REPORT["configuration"], number=number, title=_capitalized(c["title"]), key=key,
            slm_call=c["slm_call"], slm_engine=_engine(c["actual"][SLM]),
            llama_cpp_python_call=c["llama_cpp_python_call"], llama_cpp_python_engine=_engine(c["actual"][LCP]),
            table=markdown_table(SPEED_HEADER, _rows(c["summary"]), "lrrr"), max_contention=s["max_contention"],
            contended=contended,
        ))
    sections += [
        fill(REPORT["overhead"], title=c["title"], runs=s["overhead_repetitions"],
             table=markdown_table(OVERHEAD_HEADER, _overhead_rows(c["loop_overhead"]), "lrrrrrr"))
        for c in configs.values() if "loop_overhead" in c
    ]
    cli = report["cli"]
    if cli:
        sections.append(fill(REPORT["cli"], **cli, runs=len(report["cli_runs"])))

    decode_targets = []
    for number, d in enumerate(t["decode"].values(), 1):
        met = [mode for mode in MODES if d[f"met_{mode}"]]
        verdict = "met" if len(met) == len(MODES) else f"met for {' and '.join(met)} only" if met else "not met"
        decode_targets.append(fill(REPORT["target"], **(d | {"number": number, "title": _capitalized(d["title"]),
                                                               "verdict": verdict})))
    spread = [(d["title"], mode, *d["slm_decode_range"][mode]) for d in t["decode"].values() for mode in MODES]
    spread_title, spread_mode, spread_low, spread_high = max(spread, key=lambda x: x[3] / x[2])
    defaults = configs.get("defaults", {}).get("actual", {})
    return fill(
        REPORT["report"], **report, minutes=report["wall_seconds"] / 60,
        load_at_start=load_average(report["machine"]["load_average_at_start"]),
        load_at_end=load_average(report["machine"]["load_average_at_end"]),
        redone=len(report["rejected_for_contention"]), sections="\n\n".join(sections),
        decode_targets="\n".join(decode_targets), spread_title=spread_title, spread_mode=spread_mode,
        spread_low=spread_low, spread_high=spread_high,
        defaults=fill(REPORT["defaults"], slm=_engine(defaults[SLM]), llama_cpp_python=_engine(defaults[LCP]))
        if defaults.get(SLM) and defaults.get(LCP) else "",
        cli_target=fill(REPORT["cli_target"], **t, verdict="met" if t["cli_met"] else "not met") if cli else "",
    ) + "\n"


if __name__ == "__main__":
    sys.exit(main())
