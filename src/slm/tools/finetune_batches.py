"""Batches for ``slm finetune``: the validation split, each epoch's order, and padded micro-batches.

The order of an epoch is a pure function of the seed and the epoch number, so a resumed run finds its place
by counting micro-batches. Rows are shuffled, then sorted by length within buckets of ``BUCKET_BATCHES``
batches (little padding), and the batches of an epoch shuffled again.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

from slm.tools.finetune_data import IGNORE, Example

if TYPE_CHECKING:
    import torch

BUCKET_BATCHES = 16
"""Rows are sorted by length within buckets of this many batches: little padding, yet the batches of an epoch
still come in a random order."""


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded ``fraction`` of the rows held out (none from fewer than 2 rows)."""
    count = round(len(examples) * fraction) if len(examples) >= 2 else 0
    if fraction > 0 and count == 0 and len(examples) >= 2:
        count = 1
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def epoch_order(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (row indices) of one epoch: shuffled, sorted by length within buckets, batches shuffled."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    bucket = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start:start + bucket], key=lambda i: len(examples[i].input_ids))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def micro_batches(examples: list[Example], batch_size: int, seed: int, pad: int, device: torch.device,
                   start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Padded micro-batches epoch after epoch, from the ``start``-th one on (how a resumed run skips)."""
    per_epoch = math.ceil(len(examples) / batch_size)
    epoch, position = divmod(start, per_epoch)
    while True:
        for rows in epoch_order(examples, batch_size, seed, epoch)[position:]:
            yield pad_rows([examples[i] for i in rows], pad, device)
        epoch, position = epoch + 1, 0


def ordered_batches(examples: list[Example], batch_size: int, pad: int,
                     device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    for i in range(0, len(ordered), batch_size):
        yield pad_rows(ordered[i:i + batch_size], pad, device)


def pad_rows(rows: list[Example], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, labels, attention mask), each (B, T), padded on the right to the longest row."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        mask[i, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)
