"""slm bench and slm compare: speed, memory and answers of several models side by side."""

from __future__ import annotations

import csv
import datetime as dt
import html
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.markup import escape as markup
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from slm.cli.options import ENGINE_CHOICES
from slm.cli.output import human_size, print_json, stderr, stdout
from slm.engines.base import DEFAULT_CONTEXT
from slm.errors import InvalidParameter, SlmError

WORKER_TIMEOUT = 3600
"""Seconds one model's measurement may take before it is reported as failed."""


def _writable(path: Path | None, flag: str, suffixes: tuple[str, ...]) -> None:
    """Fail before any work on an output path that cannot be written."""
    if path is None:
        return
    if path.suffix.lower() not in suffixes:
        raise InvalidParameter(flag, f"{path} should end in {' or '.join(suffixes)}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InvalidParameter(flag, f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InvalidParameter(flag, f"cannot write {path}: permission denied")


def _levels(values: tuple[str, ...]) -> list[int]:
    levels: list[int] = []
    for value in values:
        for part in value.split(","):
            try:
                level = int(part)
            except ValueError:
                raise InvalidParameter("--concurrency", f"{part!r} is not a number of clients") from None
            if level < 1:
                raise InvalidParameter("--concurrency", f"must be at least 1, got {level}")
            levels.append(level)
    return sorted(set(levels))


# --- slm bench ---------------------------------------------------------------------------------

@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--engine", "engines", multiple=True, type=click.Choice(ENGINE_CHOICES),
              help="Engine(s) to measure each model on (repeatable). [default: auto]")
@click.option("-p", "--prompt-tokens", type=int, default=512, show_default=True, help="Prompt length (pp).")
@click.option("-n", "--generate-tokens", type=int, default=128, show_default=True, help="Tokens generated (tg).")
@click.option("--threads", type=int, default=None, help="CPU threads. [default: all cores]")
@click.option("--ctx-size", "n_ctx", type=int, default=None, help="Context to allocate. [default: the model's]")
@click.option("-r", "--repetitions", type=int, default=3, show_default=True, help="Measured runs after a warm-up.")
@click.option("--concurrency", "concurrency", multiple=True,
              help="Also measure this many requests at once through the scheduler (e.g. 1,2,4,8; repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Write one CSV row per model and engine.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Draw the figures into a PNG file.")
def bench(models: tuple[str, ...], engines: tuple[str, ...], prompt_tokens: int, generate_tokens: int,
          threads: int | None, n_ctx: int | None, repetitions: int, concurrency: tuple[str, ...], as_json: bool,
          csv_path: Path | None, plot_path: Path | None) -> None:
    """Measure MODELS: prompt processing (pp) and generation (tg) tokens/s, time to first token, peak
    memory, size and parameters, against this machine's memory bandwidth."""
    if prompt_tokens < 1:
        raise InvalidParameter("-p", f"must be at least 1, got {prompt_tokens}")
    if generate_tokens < 2:
        raise InvalidParameter("-n", f"must be at least 2 (tg is timed between tokens), got {generate_tokens}")
    if repetitions < 1:
        raise InvalidParameter("--repetitions", f"must be at least 1, got {repetitions}")
    if threads is not None and threads < 1:
        raise InvalidParameter("--threads", f"must be at least 1, got {threads}")
    context = n_ctx or DEFAULT_CONTEXT
    if prompt_tokens + generate_tokens > context:
        raise InvalidParameter("-p", f"{prompt_tokens} prompt + {generate_tokens} generated tokens exceed the "
                                     f"context of {context} (--ctx-size)")
    levels = _levels(concurrency)
    _writable(csv_path, "--csv", (".csv",))
    _writable(plot_path, "--plot", (".png",))
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InvalidParameter("--plot", "drawing needs matplotlib: pip install 'slm[plot]'") from None

    from slm.tools import bench as measure

    report: dict[str, Any] = {
        "benchmark": "slm bench", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": measure.machine_info(),
        "settings": {"prompt_tokens": prompt_tokens, "generate_tokens": generate_tokens, "threads": threads,
                     "ctx_size": n_ctx, "repetitions": repetitions, "concurrency": levels},
        "results": [],
    }
    pairs = [(model, engine) for model in models for engine in (engines or ("auto",))]
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=stderr, transient=True) as progress:
        task = progress.add_task("memory bandwidth", total=len(pairs) + 1)
        bandwidth = measure.memory_bandwidth()
        report["machine"]["memory_bandwidth_bytes_per_s"] = bandwidth
        progress.advance(task)
        for model, engine in pairs:
            progress.update(task, description=f"{model} on {engine}")
            arguments = {"name": model, "engine": None if engine == "auto" else engine,
                         "prompt_tokens": prompt_tokens, "generate_tokens": generate_tokens, "threads": threads,
                         "repetitions": repetitions, "concurrency": levels, "n_ctx": n_ctx}
            result = _run_worker(arguments)
            result.update({"requested": model, "requested_engine": engine, "prompt_tokens": prompt_tokens,
                           "generate_tokens": generate_tokens})
            if "error" not in result:
                result["efficiency"] = measure.efficiency(result, bandwidth)
            report["results"].append(result)
            progress.advance(task)
    if csv_path is not None:
        _write_csv(csv_path, report)
    if plot_path is not None:
        _plot(plot_path, report)
    if as_json:
        print_json(report)
    else:
        _print_bench(report)
    failed = [r for r in report["results"] if "error" in r]
    if failed:
        sys.exit(1)


def _run_worker(arguments: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, "-m", "slm.tools.bench", json.dumps(arguments)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {WORKER_TIMEOUT} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "no output")
        return {"error": f"the measuring process failed (exit {done.returncode}): {last.strip()[:200]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _print_bench(report: dict[str, Any]) -> None:
    machine, settings = report["machine"], report["settings"]
    table = Table(box=None, header_style="bold")
    columns = ["model", "engine", "params", "size", "pp tok/s", "tg tok/s", "TTFT", "peak RSS", "efficiency"]
    columns += [f"x{c} tok/s" for c in settings["concurrency"]]
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "engine") else "right", no_wrap=True)
    for r in report["results"]:
        if "error" in r:
            table.add_row(f"[cyan]{markup(r['requested'])}[/]", r["requested_engine"], "[red]failed[/]")
            continue
        cells = [f"[cyan]{markup(r['model'])}[/]", r["engine"], f"{r['parameters'] / 1e6:.0f}M",
                 human_size(r["size_bytes"]),
                 f"{r['pp']['mean']:.0f} ± {r['pp']['std']:.0f}", f"{r['tg']['mean']:.1f} ± {r['tg']['std']:.1f}",
                 f"{r['ttft']['mean'] * 1000:.0f} ms", human_size(r["peak_rss_bytes"]),
                 f"{r['efficiency'] * 100:.0f}%" if r.get("efficiency") is not None else "-"]
        cells += [f"{v:.1f}" if (v := r["concurrency"][str(c)]) is not None else "-" for c in settings["concurrency"]]
        table.add_row(*cells)
    stdout.print(table)
    for r in report["results"]:
        if "error" in r:
            stdout.print(f"[red]{markup(r['requested'])} on {r['requested_engine']} failed:[/] {markup(r['error'])}")
    stdout.print(f"[dim]{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; memory bandwidth "
                 f"(copy) {machine['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; -p {settings['prompt_tokens']} "
                 f"-n {settings['generate_tokens']}, {settings['repetitions']} repetitions (mean ± std)[/]")


def _flat(result: dict[str, Any]) -> dict[str, Any]:
    row = {"model": result.get("model", result["requested"]),
           "engine": result.get("engine", result["requested_engine"]),
           "status": "failed" if "error" in result else "ok", "error": result.get("error", "")}
    if "error" not in result:
        row |= {"parameters": result["parameters"], "size_bytes": result["size_bytes"],
                "pp_mean": result["pp"]["mean"], "pp_std": result["pp"]["std"],
                "tg_mean": result["tg"]["mean"], "tg_std": result["tg"]["std"],
                "ttft_mean": result["ttft"]["mean"], "ttft_std": result["ttft"]["std"],
                "peak_rss_bytes": result["peak_rss_bytes"], "efficiency": result.get("efficiency"),
                "sha256": result["sha256"]}
        row |= {f"concurrency_{c}": v for c, v in result.get("concurrency", {}).items()}
    return row


def _write_csv(path: Path, report: dict[str, Any]) -> None:
    rows = [_flat(r) for r in report["results"]]
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if "error" not in r]
    levels = report["settings"]["concurrency"]
    figure, axes = plt.subplots(1, 2 if levels else 1, figsize=(11 if levels else 6, 4), squeeze=False)
    bars = axes[0][0]
    labels = [f"{r['model']}\n{r['engine']}" for r in ok]
    x = range(len(ok))
    width = 0.38
    for offset, key, name in ((-width / 2, "pp", "prompt processing (pp)"), (width / 2, "tg", "generation (tg)")):
        bars.bar([i + offset for i in x], [r[key]["mean"] for r in ok], width,
                 yerr=[r[key]["std"] for r in ok], capsize=3, label=name)
    bars.set_xticks(list(x), labels)
    bars.set_ylabel("tokens/s")
    settings = report["settings"]
    bars.set_title(f"-p {settings['prompt_tokens']} -n {settings['generate_tokens']}")
    if ok:
        bars.legend()
    if levels:
        lines = axes[0][1]
        for r in ok:
            shown = [(c, r["concurrency"][str(c)]) for c in levels if r["concurrency"][str(c)] is not None]
            lines.plot([c for c, _ in shown], [v for _, v in shown], marker="o", label=f"{r['model']} "
                       f"({r['engine']})")
        lines.set_xlabel("requests decoding at once")
        lines.set_ylabel("generated tokens/s in all")
        lines.set_xticks(levels)
        lines.set_ylim(bottom=0)
        lines.set_title("decode throughput through the scheduler")
        if ok:
            lines.legend()
    machine = report["machine"]
    figure.suptitle(f"slm bench · {machine['cpu']}, {machine['cores']} cores", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --- slm compare -------------------------------------------------------------------------------

@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), help="A file of prompts, one a line.")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="Most tokens per answer.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy, comparable runs.")
@click.option("--threads", type=int, default=None, help="CPU threads for local models. [default: all cores]")
@click.option("--out", "out_path", type=click.Path(path_type=Path),
              help="Write a self-contained report: .html (with charts) or .md.")
@click.option("--json", "as_json", is_flag=True, help="Print the answers and figures as JSON.")
def compare(models: tuple[str, ...], prompts: tuple[str, ...], prompts_file: Path | None, max_tokens: int,
            temperature: float, threads: int | None, out_path: Path | None, as_json: bool) -> None:
    """Answer the same prompts with several MODELS (local or remote) and show the answers side by side,
    with each one's latency, tokens/s, tokens used and size."""
    texts = list(prompts)
    if prompts_file is not None:
        try:
            texts += [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidParameter("--prompts", f"cannot read {prompts_file}: {e}") from None
    if not texts:
        raise InvalidParameter("--prompt", "give at least one prompt (--prompt TEXT or --prompts FILE)")
    if max_tokens < 1:
        raise InvalidParameter("--max-tokens", f"must be at least 1, got {max_tokens}")
    _writable(out_path, "--out", (".html", ".md"))

    from slm.tools import bench as measure

    report: dict[str, Any] = {"benchmark": "slm compare", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "machine": measure.machine_info(), "prompts": texts,
                              "settings": {"max_tokens": max_tokens, "temperature": temperature, "threads": threads},
                              "models": []}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=stderr, transient=True) as progress:
        task = progress.add_task("", total=len(models) * len(texts))
        for name in models:
            progress.update(task, description=name)
            report["models"].append(_answers(name, texts, max_tokens, temperature, threads,
                                             lambda: progress.advance(task)))
    if out_path is not None:
        out_path.write_text(_html(report) if out_path.suffix.lower() == ".html" else _markdown(report),
                            encoding="utf-8")
    if as_json:
        print_json(report)
    else:
        _print_compare(report)
    if any("error" in m for m in report["models"]):
        sys.exit(1)


def _answers(name: str, texts: list[str], max_tokens: int, temperature: float, threads: int | None,
             step: Any) -> dict[str, Any]:
    import slm
    from slm.api import Model

    entry: dict[str, Any] = {"name": name, "answers": []}
    try:
        model = slm.load(name, **({"threads": threads} if threads else {}))
    except SlmError as e:
        entry["error"] = str(e)
        for _ in texts:
            step()
        return entry
    with model:
        if isinstance(model, Model):
            from slm.store.catalog import resolve
            from slm.tools.bench import model_size

            entry |= {"engine": model.engine.name, "parameters": model.info.parameters,
                      "size_bytes": model_size(resolve(name).path)}
        else:
            entry |= {"engine": "remote", "parameters": None, "size_bytes": None}
        for text in texts:
            start = time.perf_counter()
            try:
                if model.instruct:
                    completion = model.chat([{"role": "user", "content": text}], max_tokens=max_tokens,
                                            temperature=temperature)
                else:  # a base model continues the text
                    completion = model.generate(text, max_tokens=max_tokens, temperature=temperature)
            except SlmError as e:
                entry["answers"].append({"prompt": text, "error": str(e)})
                step()
                continue
            entry["answers"].append({
                "prompt": text, "text": completion.text.strip(), "finish_reason": completion.finish_reason,
                "latency": time.perf_counter() - start, "time_to_first_token": completion.timings.time_to_first_token,
                "tokens_per_second": completion.timings.decode_tokens_per_second,
                "prompt_tokens": completion.usage.prompt_tokens,
                "completion_tokens": completion.usage.completion_tokens,
                "served_by": completion.served_by,
            })
            step()
    return entry


def _summary(entry: dict[str, Any]) -> dict[str, Any]:
    done = [a for a in entry["answers"] if "error" not in a]
    if not done:
        return {}
    return {"latency": sum(a["latency"] for a in done) / len(done),
            "tokens_per_second": sum(a["tokens_per_second"] for a in done) / len(done),
            "tokens": sum(a["prompt_tokens"] + a["completion_tokens"] for a in done)}


def _cell(entry: dict[str, Any], index: int) -> str:
    if "error" in entry:
        return f"failed: {entry['error']}"
    answer = entry["answers"][index]
    return f"failed: {answer['error']}" if "error" in answer else answer["text"]


def _print_compare(report: dict[str, Any]) -> None:
    table = Table(header_style="bold", show_lines=True)
    table.add_column("prompt", style="dim", max_width=30)
    for entry in report["models"]:
        table.add_column(markup(entry["name"]), overflow="fold")
    for i, prompt in enumerate(report["prompts"]):
        table.add_row(markup(prompt), *[markup(_cell(entry, i)) for entry in report["models"]])
    stdout.print(table)
    stats = Table(box=None, header_style="bold")
    for column in ("model", "engine", "size", "mean latency", "mean tok/s", "tokens used"):
        stats.add_column(column, justify="left" if column in ("model", "engine") else "right")
    for entry in report["models"]:
        s = _summary(entry)
        if not s:
            stats.add_row(markup(entry["name"]), "-", "-", "[red]failed[/]", "", "")
            continue
        size = human_size(entry["size_bytes"]) if entry.get("size_bytes") else "-"
        stats.add_row(markup(entry["name"]), entry["engine"], size, f"{s['latency']:.2f} s",
                      f"{s['tokens_per_second']:.1f}", str(s["tokens"]))
    stdout.print(stats)


def _markdown(report: dict[str, Any]) -> str:
    def escape(text: str) -> str:
        """A table cell: no live HTML, no pipes or backticks that end the cell or open code, lines kept."""
        return html.escape(text, quote=False).replace("|", "\\|").replace("`", "\\`").replace("\n", "<br>")

    names = [m["name"] for m in report["models"]]
    lines = [f"# slm compare: {', '.join(names)}", "",
             f"{report['date']} · {report['machine']['cpu']}, {report['machine']['cores']} cores · "
             f"max {report['settings']['max_tokens']} tokens, temperature {report['settings']['temperature']}", "",
             "| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, prompt in enumerate(report["prompts"]):
        lines.append(f"| {escape(prompt)} | " + " | ".join(escape(_cell(m, i)) for m in report["models"]) + " |")
    lines += ["", "| model | engine | size | mean latency | mean tokens/s | tokens used |",
              "|---|---|---:|---:|---:|---:|"]
    for entry in report["models"]:
        s = _summary(entry)
        size = human_size(entry["size_bytes"]) if entry.get("size_bytes") else "-"
        lines.append(f"| {entry['name']} | {entry.get('engine', '-')} | {size} | " + (
            f"{s['latency']:.2f} s | {s['tokens_per_second']:.1f} | {s['tokens']} |" if s else "failed | | |"))
    return "\n".join(lines) + "\n"


def _svg_bars(title: str, values: list[tuple[str, float]], unit: str) -> str:
    """A horizontal bar chart as inline SVG (no files, no scripts)."""
    top = max((v for _, v in values), default=1.0) or 1.0
    rows = []
    for i, (label, value) in enumerate(values):
        y = 28 + i * 26
        width = 300 * value / top
        rows.append(f'<text x="0" y="{y + 14}" font-size="12">{html.escape(label)}</text>'
                    f'<rect x="170" y="{y}" width="{width:.1f}" height="18" fill="#4c72b0"/>'
                    f'<text x="{176 + width:.1f}" y="{y + 14}" font-size="12">{value:.2f} {unit}</text>')
    height = 36 + 26 * len(values)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="560" height="{height}" role="img">'
            f'<text x="0" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>{"".join(rows)}</svg>')


def _html(report: dict[str, Any]) -> str:
    names = [m["name"] for m in report["models"]]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(
        f"<tr><td class='prompt'>{html.escape(prompt)}</td>"
        + "".join(f"<td>{html.escape(_cell(m, i))}</td>" for m in report["models"]) + "</tr>"
        for i, prompt in enumerate(report["prompts"]))
    summaries = [(m["name"], _summary(m)) for m in report["models"]]
    charts = _svg_bars("mean latency", [(n, s["latency"]) for n, s in summaries if s], "s")
    charts += _svg_bars("mean generation speed", [(n, s["tokens_per_second"]) for n, s in summaries if s], "tok/s")
    stats = "".join(
        f"<tr><td>{html.escape(m['name'])}</td><td>{html.escape(str(m.get('engine', '-')))}</td>"
        f"<td>{human_size(m['size_bytes']) if m.get('size_bytes') else '-'}</td>"
        + (f"<td>{s['latency']:.2f} s</td><td>{s['tokens_per_second']:.1f}</td><td>{s['tokens']}</td>" if s
           else "<td colspan='3'>failed</td>") + "</tr>"
        for m, (_, s) in zip(report["models"], summaries, strict=True))
    machine = report["machine"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>slm compare</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}
table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.4em .6em;vertical-align:top;white-space:pre-wrap}}td.prompt{{color:#555}}</style>
</head><body>
<h1>slm compare: {html.escape(', '.join(names))}</h1>
<p>{html.escape(report['date'])} · {html.escape(str(machine['cpu']))}, {machine['cores']} cores ·
max {report['settings']['max_tokens']} tokens, temperature {report['settings']['temperature']}</p>
<table><tr><th>prompt</th>{head}</tr>{body}</table>
<table><tr><th>model</th><th>engine</th><th>size</th><th>mean latency</th><th>mean tokens/s</th>
<th>tokens used</th></tr>
{stats}</table>
{charts}
</body></html>
"""
