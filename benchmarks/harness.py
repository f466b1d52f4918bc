"""What the benchmark scripts share: the machine record, the load meter, paired ratios and the result writers.

A script here compares slm with a peer in the same run, on a machine that other processes share. So every
measurement waits for a quiet moment, records the share of the CPU that other processes took while it ran
(from /proc/stat), and is redone when they took too much (``Quiet``). Both sides of one repetition run within
seconds of each other, so their ratio cancels the machine's drift between repetitions, which a ratio of
medians does not: the median of the per-repetition ratios decides (``paired_ratios``). A script writes
``benchmarks/results/<name>.json`` (every figure, with the machine and versions) and ``<name>.md``, whose
prose is the template ``benchmarks/templates/<name>.md`` (``templates``, ``fill``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Generic, TypeVar

import llama_cpp
from rich.console import Console
from rich.table import Table

import slm
from slm.tools.bench import machine_info, model_hash, model_size

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TEMPLATES = ROOT / "benchmarks" / "templates"

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

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


# --- the machine and the run --------------------------------------------------------------------------


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


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Each installed package's version; None for one that is not installed."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def model_file(path: Path) -> dict[str, Any]:
    """The model file both sides read: where it is, its size and its sha256."""
    return {"model_file": str(path), "model_file_name": path.name, "model_size_bytes": model_size(path),
            "model_sha256": model_hash(path)}


def git_revision() -> str | None:
    """The commit the run measured, marked when src/ has changes that are not committed."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + (" (src/ modified)" if dirty.stdout.strip() else "")


def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (e.g. .venv/bin/python)."""
    return os.path.relpath(path, ROOT) if path.is_relative_to(ROOT) else str(path)


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def report_head(benchmark: str, started: float) -> dict[str, Any]:
    """The first fields of a report: which benchmark, when, the command that ran it, the commit, its wall time."""
    return {
        "benchmark": benchmark,
        "created": now(),
        "command": " ".join([shown(Path(sys.executable)), *sys.argv]),
        "git": git_revision(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def slm_executable() -> str:
    """The repository's own ``slm`` command (.venv/bin/slm), else the one on PATH."""
    venv = ROOT / ".venv" / "bin" / "slm"
    return str(venv) if venv.exists() else shutil.which("slm") or "slm"


def flash_attention_in_log(lines: list[str]) -> dict[str, str | None]:
    """The flash-attention type a llama.cpp context was created with (auto/enabled/disabled) and, for auto,
    what llama.cpp resolved it to, from the log lines of its creation."""
    requested = resolved = None
    for line in lines:
        if m := re.search(r"flash_attn\s+=\s+(\w+)", line):
            requested = m.group(1)
        elif m := re.search(r"Flash Attention (?:was auto, set to )?(enabled|disabled)\b", line, re.IGNORECASE):
            resolved = m.group(1).lower()
    if resolved is None and requested in ("enabled", "disabled"):
        resolved = requested
    return {"flash_attn_type": requested, "flash_attn": resolved}


def flash_attention(actual: Mapping[str, Any]) -> str:
    """``flash_attention_in_log``'s finding as a reader wants it: 'enabled', or 'auto -> enabled'."""
    resolved = actual.get("flash_attn") or "?"
    return f"auto -> {resolved}" if actual.get("flash_attn_type") == "auto" else resolved


# --- machine load -------------------------------------------------------------------------------------


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]
    total = sum(values)
    return (total - idle) / tick, total / tick


def _own_cpu() -> float:
    """CPU seconds of this process and of its children that have ended."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) and of its reaped children; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """While the block runs: the share of the machine's CPU time that processes other than this one (and than
    ``processes``, each given by a function that reads its CPU seconds) used (``others``, 0..1), this process's
    CPU seconds and each of ``processes``'."""

    def __init__(self, processes: Mapping[str, Callable[[], float]] | None = None) -> None:
        self.processes = dict(processes or {})
        self.others = 0.0
        self.own_cpu_seconds = 0.0
        self.process_cpu_seconds: dict[str, float] = {}

    def __enter__(self) -> LoadMeter:
        self._busy, self._total = _machine_cpu()
        self._own = _own_cpu()
        self._processes = {name: cpu() for name, cpu in self.processes.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        busy, total = _machine_cpu()
        self.process_cpu_seconds = {name: cpu() - self._processes[name] for name, cpu in self.processes.items()}
        self.own_cpu_seconds = _own_cpu() - self._own
        elapsed = total - self._total
        others = (busy - self._busy) - self.own_cpu_seconds - sum(self.process_cpu_seconds.values())
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


@dataclass(frozen=True)
class Measured(Generic[T]):
    """A measurement that ``Quiet.run`` kept, with the load it ran under."""

    result: T
    meter: LoadMeter
    retries: int
    """Earlier attempts thrown away because other processes were busy."""
    waited: float
    """Seconds this attempt waited for a quiet machine."""

    @property
    def others(self) -> float:
        return self.meter.others


@dataclass
class Quiet:
    """Run a measurement when the machine is quiet, and again if other processes took more than ``threshold``
    of it meanwhile (at most ``retries`` times; the last attempt is kept regardless)."""

    threshold: float
    retries: int
    max_wait: float
    processes: Mapping[str, Callable[[], float]] = field(default_factory=dict)
    """Processes that take part in the measurement (servers), so not counted as others: their CPU seconds."""
    keep: Callable[[Any], Any] | None = None
    """What the record of a thrown-away attempt keeps of its result; None: nothing."""
    rejected: list[dict[str, Any]] = field(default_factory=list)
    """Every attempt that was measured and then thrown away for contention."""

    def run(self, label: str, fn: Callable[[], T]) -> Measured[T]:
        for attempt in range(self.retries + 1):
            waited = wait_for_quiet(self.max_wait, self.threshold)
            with LoadMeter(self.processes) as meter:
                result = fn()
            if meter.others <= self.threshold or attempt == self.retries:
                return Measured(result, meter, attempt, waited)
            record: dict[str, Any] = {"what": label, "others_cpu_share": round(meter.others, 3),
                                      "waited_seconds": round(waited, 1)}
            if self.keep is not None:
                record["result"] = self.keep(result)
            self.rejected.append(record)
        raise AssertionError("unreachable")


def add_run_options(parser: argparse.ArgumentParser, *, unit: str, retries: int, quick: str) -> None:
    """The options every script takes: how each ``unit`` (a sample, a measurement) waits for a quiet machine
    and is redone, ``--quick`` (described by ``quick``) and ``--output``."""
    parser.add_argument("--max-contention", type=float, default=0.05,
                        help="wait for a second in which other processes use at most this share of the machine "
                             f"before each {unit}, and redo it if they used more during it (default 0.05)")
    parser.add_argument("--retries", type=int, default=retries, help=f"redos per {unit} at most (default {retries})")
    parser.add_argument("--max-wait", type=float, default=60.0,
                        help=f"seconds to wait for a quiet machine before each {unit} (default 60)")
    parser.add_argument("--quick", action="store_true", help=f"{quick}; writes no files unless --output")
    parser.add_argument("--output", type=Path, default=None, help=f"results directory (default {RESULTS})")


def output_directory(args: argparse.Namespace) -> Path | None:
    """Where the results go: ``--output``, else benchmarks/results/; nowhere for a ``--quick`` run."""
    output: Path | None = args.output
    return output or (None if args.quick else RESULTS)


# --- statistics ---------------------------------------------------------------------------------------


def median(values: Iterable[float | None], digits: int = 3) -> float | None:
    """The median of the values that are there (None for none), rounded."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), digits) if present else None


def paired_ratios(ours: Mapping[K, float], theirs: Mapping[K, float]) -> list[float]:
    """``ours[rep] / theirs[rep]`` for every repetition both sides have, in the order of ``ours``."""
    return [value / theirs[rep] for rep, value in ours.items() if rep in theirs]


# --- reports ------------------------------------------------------------------------------------------

_SECTION = re.compile(r"^<!-- (\w+) -->\n", re.MULTILINE)


def templates(name: str) -> dict[str, str]:
    """The sections of ``benchmarks/templates/<name>.md``: each runs from a line ``<!-- section -->`` to the
    next one; what comes before the first describes the file."""
    parts = _SECTION.split((TEMPLATES / f"{name}.md").read_text())
    return {section: text.strip("\n") for section, text in zip(parts[1::2], parts[2::2], strict=True)}


def fill(template: str, **values: Any) -> str:
    """``template`` (``str.format`` fields) filled with ``values``; a part left empty leaves no extra blank line."""
    return re.sub(r"\n{3,}", "\n\n", template.format(**values)).strip("\n")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> str:
    """A Markdown table; ``align`` has a letter a column, ``l`` (left) or ``r`` (right)."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align)
    return "\n".join([f"| {' | '.join(header)} |", rule, *(f"| {' | '.join(row)} |" for row in rows)])


def console_table(title: str, header: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> Table:
    """The same table for the terminal."""
    table = Table(title=title)
    for column, a in zip(header, align, strict=True):
        table.add_column(column, justify="right" if a == "r" else "left")
    for row in rows:
        table.add_row(*row)
    return table


def terminal(width: int) -> Console:
    """The terminal's console; ``width`` columns when the output goes to a file."""
    return Console() if sys.stdout.isatty() else Console(width=width)


def load_average(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def write_results(directory: Path, name: str, report: Mapping[str, Any], markdown: str, *, indent: int = 2,
                  ensure_ascii: bool = True, inline_number_lists: bool = False) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` into ``directory``; ``inline_number_lists`` puts each list of
    numbers on one line (long lists of per-request figures)."""
    text = json.dumps(report, indent=indent, ensure_ascii=ensure_ascii)
    if inline_number_lists:
        text = re.sub(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]",
                      lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
    directory.mkdir(parents=True, exist_ok=True)
    data, prose = directory / f"{name}.json", directory / f"{name}.md"
    data.write_text(text + "\n")
    prose.write_text(markdown)
    return data, prose


def stop_on_signals() -> None:
    """Let SIGINT and SIGTERM end the script through its ``finally`` blocks (so its servers stop too), even
    when it was started in the background, where SIGINT is ignored."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
