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
import datetime as dt
import hashlib
import json
import os
import platform
import re
import resource
import shutil
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
from slm.generation.generator import Generator
from slm.tools.bench import machine_info, no_end_bias

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
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


# A raw text that stops mid-sentence, so that a completion continues it rather than ending.
PROMPT_TEXT = (
    "The history of the printing press begins long before Johannes Gutenberg set up his workshop in Mainz. "
    "In China, craftsmen carved whole pages into wooden blocks as early as the seventh century, and by the "
    "eleventh century an artisan named Bi Sheng had made movable characters out of baked clay. Korean printers "
    "later cast metal type, and the oldest surviving book printed that way dates from 1377. In Europe, the "
    "spread of paper mills, the growth of universities and a rising merchant class created a demand for "
    "books that copyists working by hand could not meet. Gutenberg combined several existing techniques into "
    "one system: a hand mould for casting uniform letters from an alloy of lead, tin and antimony, an "
    "oil-based ink that clung to metal, and a screw press adapted from the presses used to make wine and "
    "olive oil. His Bible, finished around 1455, showed that a printed book could be as beautiful as a "
    "manuscript while costing far less to produce. Within fifty years, presses were running in more than two "
    "hundred and fifty European towns, and millions of volumes had been printed. The consequences reached "
    "far beyond the book trade. Scholars could compare identical copies of a text, errors could be corrected "
    "in later editions, and new ideas travelled faster than any authority could suppress them. Pamphlets "
    "carried the arguments of the Reformation across borders, scientific results were shared among readers "
    "who would never meet, and vernacular languages gained standard spellings as printers chose one form over "
    "another. Historians still debate how quickly these changes happened and which of them the press caused "
    "rather than merely accelerated, but few doubt that the world after Gutenberg was profoundly different "
    "from the one before him. In the centuries that followed, the basic design of the press changed very "
    "little, until the arrival of steam power in the early nineteenth century allowed newspapers to print "
    "thousands of sheets an hour, and"
)


# --- machine load -------------------------------------------------------------------------------------


def _proc_stat() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]
    total = sum(values)
    return (total - idle) / tick, total / tick


def _own_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class LoadMeter:
    """The share of the machine's CPU time that other processes used while the block ran (0..1)."""

    def __enter__(self) -> LoadMeter:
        self._busy, self._total = _proc_stat()
        self._own = _own_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, total = _proc_stat()
        elapsed = total - self._total
        others = (busy - self._busy) - (_own_cpu() - self._own)
        self.others = max(0.0, others / elapsed) if elapsed > 0 else 0.0


def wait_for_quiet(limit: float, threshold: float, window: float = 1.0) -> float:
    """Wait (up to ``limit`` seconds) for a ``window`` in which other processes use at most ``threshold``
    of the machine; return the seconds waited."""
    start = time.perf_counter()
    while True:
        with LoadMeter() as meter:
            time.sleep(window)
        waited = time.perf_counter() - start
        if meter.others <= threshold or waited >= limit:
            return waited


@dataclass
class Quiet:
    """Run a measurement when the machine is quiet, and again if other processes took more than
    ``threshold`` of it meanwhile (at most ``retries`` times; the last attempt is kept regardless)."""

    threshold: float
    retries: int
    max_wait: float
    rejected: list[dict[str, Any]]
    """Every attempt that was measured and then thrown away for contention."""

    def run(self, label: str, fn: Callable[[], Any]) -> tuple[Any, float, int]:
        for attempt in range(self.retries + 1):
            waited = wait_for_quiet(self.max_wait, self.threshold)
            with LoadMeter() as meter:
                result = fn()
            if meter.others <= self.threshold or attempt == self.retries:
                return result, meter.others, attempt
            self.rejected.append({"what": label, "others_cpu_share": round(meter.others, 3),
                                  "waited_seconds": round(waited, 1), "result": _brief(result)})
        raise AssertionError("unreachable")


def _brief(result: Any) -> Any:
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
    result: dict[str, Any],
    others: float,
    retries: int,
) -> Sample:
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
        others_cpu_share=round(others, 3),
        retries=retries,
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


# --- facts about the machine --------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """slm's own record of the machine (``slm.tools.bench.machine_info``: CPU, cores, memory, versions), with what
    these benchmarks add: the OS's own name, the cores this process may use, llama.cpp's build and the load."""
    info = machine_info()
    os_name = info["os"]
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        pretty = next((line.split("=", 1)[1].strip().strip('"') for line in f if line.startswith("PRETTY_NAME")), "")
        os_name = f"{pretty} ({platform.system()} {platform.release()}, {platform.machine()})"
    return {
        **info,
        "os": os_name,
        "cores_available": len(os.sched_getaffinity(0)),
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(" |"),
        "slm": slm.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def _git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + (" (src/ modified)" if dirty.stdout.strip() else "")


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (e.g. .venv/bin/python)."""
    return os.path.relpath(path, ROOT) if path.is_relative_to(ROOT) else str(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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


def flash_attention_in_log(lines: list[str]) -> dict[str, str | None]:
    """The flash-attention type a context was created with (auto/enabled/disabled) and, for auto, what
    llama.cpp resolved it to, from the log lines of its creation."""
    requested = resolved = None
    for line in lines:
        if m := re.search(r"flash_attn\s+=\s+(\w+)", line):
            requested = m.group(1)
        elif m := re.search(r"Flash Attention (?:was auto, set to )?(enabled|disabled)\b", line, re.IGNORECASE):
            resolved = m.group(1).lower()
    if resolved is None and requested in ("enabled", "disabled"):
        resolved = requested
    return {"flash_attn_type": requested, "flash_attn": resolved}


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


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


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
                "time_to_first_token_median": round(statistics.median(s.time_to_first_token for s in mine), 5),
                "decode_tokens_per_second_range": [
                    min(s.decode_tokens_per_second for s in mine), max(s.decode_tokens_per_second for s in mine)
                ],
                "others_cpu_share_median": median([s.others_cpu_share for s in mine]),
                "samples": len(mine),
                "contended_samples": sum(s.others_cpu_share > contended for s in mine),
            }
        a, b = per[SLM], per[LCP]
        pairs = {s.repetition: s for s in samples if s.mode == mode and s.side == LCP}
        mine = [s for s in samples if s.mode == mode and s.side == SLM]
        per["ratio_decode"] = round(a["decode_tokens_per_second_median"] / b["decode_tokens_per_second_median"], 3)
        per["ratio_prefill"] = round(
            a["prefill_tokens_per_second_median"] / b["prefill_tokens_per_second_median"], 3
        )
        per["paired_ratio_decode_median"] = median(
            [s.decode_tokens_per_second / pairs[s.repetition].decode_tokens_per_second for s in mine]
        )
        per["paired_ratio_prefill_median"] = median(
            [s.prefill_tokens_per_second / pairs[s.repetition].prefill_tokens_per_second for s in mine]
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

    def measure(name: str, mode: str, fn: Callable[[SlmSide | LlamaCppPythonSide, str], Any]) -> tuple[Any, float, int]:
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
                result, others, retries = measure(name, mode, generate)
                samples.append(_sample(cfg.key, name, mode, rep, position, result, others, retries))
                s = samples[-1]
                console.print(f"  rep {rep} {mode:7} {name:17} decode {s.decode_tokens_per_second:7.1f} tok/s  "
                              f"prefill {s.prefill_tokens_per_second:7.1f} tok/s  others {s.others_cpu_share:4.0%}  "
                              f"retries {retries}")
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
                    split, others, retries = measure(name, mode, overhead_run)
                    raw[mode][name].append(split | {"others_cpu_share": round(others, 3), "retries": retries})
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
    parser.add_argument("--max-contention", type=float, default=0.05,
                        help="wait for a second in which other processes use at most this share of the machine "
                             "before each sample, and redo the sample if they used more during it (default 0.05)")
    parser.add_argument("--retries", type=int, default=3, help="redos per sample at most (default 3)")
    parser.add_argument("--max-wait", type=float, default=60.0,
                        help="seconds to wait for the machine to go quiet before each sample (default 60)")
    parser.add_argument("--overhead-repetitions", type=int, default=3,
                        help="runs per side and mode with timing shims, in the first configuration (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test (2 repetitions, 32 tokens, 2 CLI runs); writes no files unless --output")
    parser.add_argument("--output", type=Path, default=None, help=f"results directory (default {RESULTS})")
    args = parser.parse_args(argv)
    known = {c.key: c for c in CONFIGS}
    chosen = [known.get(k.strip()) for k in args.configs.split(",") if k.strip()]
    if not chosen or None in chosen:
        parser.error(f"--configs takes a comma-separated subset of {', '.join(known)}")
    configs = [c for c in CONFIGS if c in chosen]
    if args.quick:
        args.repetitions, args.tokens, args.cli_runs, args.max_wait, args.retries = 2, 32, 2, 2.0, 0
        args.overhead_repetitions = 1
    output = args.output or (None if args.quick else RESULTS)
    threads = args.threads or slm_llamacpp.default_threads()
    console = Console() if sys.stdout.isatty() else Console(width=150)

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

    quiet = Quiet(args.max_contention, args.retries, args.max_wait, rejected=[])
    run = Run(args, threads, model_path, prompt, quiet, console)
    results = {cfg.key: run_config(cfg, run) for cfg in configs}

    cli: dict[str, Any] = {}
    slm_bin = ROOT / ".venv" / "bin" / "slm"
    command = [str(slm_bin if slm_bin.exists() else shutil.which("slm") or "slm"), "run", "Hello", "--max-tokens", "1"]
    if args.cli_runs > 0:
        console.print("CLI time to first token...")
        cli_first_byte(command)  # warm the disk cache and the bytecode cache
        runs = []
        for _ in range(args.cli_runs):
            result, others, retries = quiet.run("cli", lambda: cli_first_byte(command))
            runs.append(result | {"others_cpu_share": round(others, 3), "retries": retries})
        first = [r["first_byte_seconds"] for r in runs]
        cli = {
            "command": " ".join(command[:1] + [f'"{a}"' if " " in a else a for a in command[1:]]),
            "first_byte_seconds_median": round(statistics.median(first), 4),
            "first_byte_seconds_range": [min(first), max(first)],
            "exit_seconds_median": round(statistics.median(r["exit_seconds"] for r in runs), 4),
            "others_cpu_share_median": median([r["others_cpu_share"] for r in runs]),
            "python_startup_seconds_median": python_startup(["-c", "pass"], 3),
            "import_slm_cli_seconds_median": python_startup(["-c", "import slm.cli"], 3),
            "target_seconds": TARGET_CLI_SECONDS,
            "runs": runs,
        }

    settings = {
        "model": resolved.name,
        "model_file": str(model_path),
        "model_file_name": model_path.name,
        "model_size_bytes": model_path.stat().st_size,
        "model_sha256": _sha256(model_path),
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
    method = {
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
    report = {
        "benchmark": "bench_decode",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([_shown(Path(sys.executable)), *sys.argv]),
        "git": _git_revision(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": info,
        "settings": settings,
        "method": method,
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
        output.mkdir(parents=True, exist_ok=True)
        (output / "decode.json").write_text(json.dumps(report, indent=2) + "\n")
        (output / "decode.md").write_text(render_markdown(report))
        console.print(f"wrote {output / 'decode.json'} and {output / 'decode.md'}")
    return 0


# --- reports ------------------------------------------------------------------------------------------


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


OVERHEAD_HEADER = (
    "run", "ms/token", "llama_decode ms", "evaluate ms", "sample ms",
    "Python ms (vs llama_decode)", "loop ms (vs evaluate)",
)


def _engine(actual: dict[str, Any]) -> str:
    """'2 threads (prompt 2), flash attention auto -> enabled'"""
    fa = actual["flash_attn"] or "?"
    if actual["flash_attn_type"] == "auto":
        fa = f"auto -> {fa}"
    threads = f"{actual['n_threads']} thread{'s' if actual['n_threads'] != 1 else ''}"
    return f"{threads} (prompt {actual['n_threads_batch']}), flash attention {fa}"


def render_tables(report: dict[str, Any]) -> list[Table]:
    tables = []
    reps = report["settings"]["repetitions"]
    for number, (key, c) in enumerate(report["configurations"].items(), 1):
        table = Table(title=f"{number}. {c['title']} ({key}) · medians of {reps}\n"
                            f"slm: {_engine(c['actual'][SLM])} · llama-cpp-python: {_engine(c['actual'][LCP])}")
        for column in ("measure", SLM, LCP, "slm / llama-cpp-python"):
            table.add_column(column, justify="right" if column != "measure" else "left")
        for row in _rows(c["summary"]):
            table.add_row(*row)
        for mode, per in c.get("loop_overhead", {}).items():
            table.add_row(
                f"per-token Python work, {mode}",
                f"{per[SLM]['python_ms_per_token']:.2f} ms ({per[SLM]['python_over_llama_decode']:.0%} of "
                "llama_decode)",
                f"{per[LCP]['python_ms_per_token']:.2f} ms ({per[LCP]['python_over_llama_decode']:.0%} of "
                "llama_decode)",
                f"loop vs evaluate: {per[SLM]['loop_over_evaluate']:.1%}",
            )
        tables.append(table)
    cli = report["cli"]
    if cli:
        table = Table(title="CLI")
        for column in ("measure", "seconds", "target"):
            table.add_column(column)
        table.add_row("first byte on stdout", f"{cli['first_byte_seconds_median']:.3f}",
                      f"<= {cli['target_seconds']}")
        tables.append(table)
    return tables


def render_markdown(report: dict[str, Any]) -> str:
    m, s, t = report["machine"], report["settings"], report["targets"]
    configs = report["configurations"]
    lines = [
        "# Decode benchmark: slm vs llama-cpp-python",
        "",
        f"Generated by `{report['command']}` on {report['created']} (git {report['git']}) in "
        f"{report['wall_seconds'] / 60:.1f} minutes. Raw samples are in `decode.json`.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, Python {m['python']}",
        f"- llama-cpp-python {m['llama_cpp_python']} ({m['llama_cpp_system_info']}), slm {m['slm']}",
        f"- Model: {s['model_file_name']} ({s['model_size_bytes']:,} bytes)",
        f"- Every configuration: n_ctx {s['n_ctx']}, prompt {s['prompt_tokens']} tokens, {s['generated_tokens']} "
        f"generated tokens, {s['repetitions']} interleaved repetitions after a warm-up, sampled runs: "
        f"temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, seed {s['seed']}",
        f"- slm is timed as `{report['method'][SLM]}`; its engine context: {s['slm_engine_settings']}",
        f"- llama-cpp-python is timed as `{report['method'][LCP]}`; {s['llama_cpp_python_settings']}",
        f"- Threads and flash attention below are what each context actually got: {report['method']['actual']}",
        f"- Load average at start / end: {_load(m['load_average_at_start'])} / {_load(m['load_average_at_end'])}; "
        f"{len(report['rejected_for_contention'])} samples were redone because other processes used more than "
        f"{s['max_contention']:.0%} of the machine",
        "",
        f"## Speed (medians of {s['repetitions']} repetitions)",
        "",
    ]
    for number, (key, c) in enumerate(configs.items(), 1):
        contended = ", ".join(
            f"{mode} {name} {x['contended_samples']}/{x['samples']} ({x['others_cpu_share_median']:.0%})"
            for mode in MODES
            for name in (SLM, LCP)
            for x in [c["summary"][mode][name]]
        )
        lines += [
            f"### {number}. {c['title'][0].upper() + c['title'][1:]} (`{key}`)",
            "",
            f"- slm: `{c['slm_call']}` → {_engine(c['actual'][SLM])}",
            f"- llama-cpp-python: `{c['llama_cpp_python_call']}` → {_engine(c['actual'][LCP])}",
            "",
            "| measure | slm | llama-cpp-python | slm / llama-cpp-python |",
            "|---|---:|---:|---:|",
            *[f"| {' | '.join(row)} |" for row in _rows(c["summary"])],
            "",
            f"Kept samples during which other processes used more than {s['max_contention']:.0%} of the machine, "
            f"and the median share: {contended}.",
            "",
        ]
    for c in configs.values():
        if "loop_overhead" not in c:
            continue
        lines += [
            f"## Per-token time split ({c['title']}; medians of {s['overhead_repetitions']} runs with timing "
            "shims, after that configuration's speed runs)",
            "",
            f"| {' | '.join(OVERHEAD_HEADER)} |",
            "|---|" + "---:|" * (len(OVERHEAD_HEADER) - 1),
            *[f"| {' | '.join(row)} |" for row in _overhead_rows(c["loop_overhead"])],
            "",
            "`llama_decode` is the C forward pass; `evaluate` is slm's engine call around it; `Python ms` is "
            "everything else in a decoded token's time; `loop ms` is what slm's generation loop adds above "
            "`engine.evaluate` (sampling, detokenizing, bookkeeping).",
            "",
        ]
    cli = report["cli"]
    if cli:
        lines += [
            "## CLI time to first token",
            "",
            f"`{cli['command']}`, wall time from process start to the first byte on stdout: median "
            f"**{cli['first_byte_seconds_median']:.3f} s** over {len(report['cli_runs'])} runs after a warm-up "
            f"(range {cli['first_byte_seconds_range'][0]:.3f}-{cli['first_byte_seconds_range'][1]:.3f} s; process "
            f"exit {cli['exit_seconds_median']:.3f} s). For reference: Python start-up "
            f"{cli['python_startup_seconds_median']:.3f} s, `import slm.cli` "
            f"{cli['import_slm_cli_seconds_median']:.3f} s (each including start-up).",
            "",
        ]
    lines += [
        "## Targets",
        "",
        f"Decode >= {t['decode_target']:.2f}x llama-cpp-python, judged on the paired ratio (the median of the "
        "per-repetition ratios; the ratio of the medians in brackets):",
        "",
    ]
    for number, d in enumerate(t["decode"].values(), 1):
        met = [mode for mode in MODES if d[f"met_{mode}"]]
        verdict = "met" if len(met) == len(MODES) else f"met for {' and '.join(met)} only" if met else "not met"
        lines.append(
            f"{number}. {d['title'][0].upper() + d['title'][1:]}: greedy {d['paired_ratio_greedy']:.3f}x "
            f"({d['ratio_greedy']:.3f}x), sampled {d['paired_ratio_sampled']:.3f}x ({d['ratio_sampled']:.3f}x)"
            f": **{verdict}**"
        )
    spread = [(d["title"], mode, *d["slm_decode_range"][mode]) for d in t["decode"].values() for mode in MODES]
    title, mode, low, high = max(spread, key=lambda x: x[3] / x[2])
    lines += [
        "",
        "The paired ratio decides because the machine's speed drifts between repetitions while other processes "
        f"stay idle (e.g. slm's {mode} decode ranged {low:.1f}-{high:.1f} tok/s in \"{title}\"): both sides of one "
        "repetition run within seconds of each other, so their ratio cancels the drift, whereas the two medians can "
        "come from different repetitions.",
    ]
    lcp_defaults = configs.get("defaults", {}).get("actual", {}).get(LCP)
    slm_defaults = configs.get("defaults", {}).get("actual", {}).get(SLM)
    defaults = (
        f" (here slm: {_engine(slm_defaults)}; llama-cpp-python: {_engine(lcp_defaults)})"
        if lcp_defaults and slm_defaults else ""
    )
    lines += [
        "",
        "The forward pass is the same llama.cpp C code in both tools, so at identical settings only the loop "
        "overhead around it can differ (see the per-token split); the default-vs-default gap comes from slm's "
        f"defaults — all cores and flash attention AUTO — against llama-cpp-python's `Llama()` defaults{defaults}.",
        "",
    ]
    if cli:
        lines.append(
            f"CLI first token <= {t['cli_target_seconds']} s: {t['cli_first_byte_seconds']:.3f} s, "
            f"**{'met' if t['cli_met'] else 'not met'}**."
        )
    return "\n".join(lines) + "\n"


def _load(values: tuple[float, float, float] | list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    sys.exit(main())
