"""``slm embed``: texts -> vectors with an embedding model."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from slm.api import load_embedding
from slm.cli.output import print_json, stdout
from slm.errors import InvalidParameter

PREVIEW = 4
"""Leading components shown per vector without --json."""


@click.command()
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True, metavar="TEXT|FILE...")
@click.option("--json", "as_json", is_flag=True, help="Print the vectors as JSON.")
@click.option("--truncate", is_flag=True, help="Cut inputs longer than the model's limit (else: an error).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads.")
def embed(model: str, inputs: tuple[str, ...], as_json: bool, truncate: bool, threads: int | None) -> None:
    """Embed texts with an embedding model (minilm): each TEXT, or each non-empty line of FILE.

    \b
    slm embed minilm "a cat sits on the mat" "a dog"
    slm embed minilm sentences.txt --json > vectors.json
    """
    texts = [text for item in inputs for text in _texts(item)]
    if not texts:
        raise InvalidParameter("input", "no text to embed (the files are empty)")
    with load_embedding(model, threads=threads) as loaded:
        result = loaded.embed(texts, truncate=truncate)
    if as_json:
        print_json({"model": loaded.name, "dimensions": int(result.vectors.shape[1]),
                    "prompt_tokens": result.prompt_tokens, "embeddings": result.vectors.tolist()})
        return
    for text, vector in zip(texts, result.vectors, strict=True):
        head = ", ".join(f"{x:.4f}" for x in vector[:PREVIEW])
        shown = text if len(text) <= 40 else text[:39] + "…"
        stdout.print(f"{len(vector)} dims [{head}, ...]  {escape(shown)!r}", soft_wrap=True)


def _texts(item: str) -> list[str]:
    """A file's non-empty lines, or the argument itself as one text."""
    path = Path(item)
    try:
        is_file = path.is_file()
    except OSError:  # a long text is no file name
        is_file = False
    if not is_file:
        return [item]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
