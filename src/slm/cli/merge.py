"""``slm merge``: a LoRA adapter added into its base model's weights, a model of its own in the store."""

from __future__ import annotations

import click

from slm.cli.output import stderr, stdout


@click.command("merge")
@click.argument("base")
@click.option("--adapter", required=True, help="The LoRA adapter: its name in the store, or its folder.")
@click.option("--out", "out", required=True, help="The merged model's name in the store (or a folder path).")
@click.option("--force", is_flag=True, help="Replace an existing model of that name.")
def merge(base: str, adapter: str, out: str, force: bool) -> None:
    """Add the LoRA ADAPTER (`slm finetune`'s) into the weights of BASE, the Hugging Face folder it was trained
    on: a model that `slm run`, `slm serve` and `slm convert` take by name like any other."""
    from slm.store import catalog
    from slm.tools.merge import merge as add

    with stderr.status(f"merging {adapter} into {base}..."):
        target = add(base, adapter, out, force)
    name = target.name if target.parent == catalog.store_dir() else str(target)
    stdout.print(f"{adapter} merged into {base}: slm run {name} \"...\"", soft_wrap=True, markup=False)
