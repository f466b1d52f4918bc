"""Sentences and a comparison shared by the embedding tests (transformers and llama.cpp)."""

from __future__ import annotations

import numpy as np

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The new movie is awesome",
    "The cat sits outside", "A man is playing guitar", "I love pasta", "Do you like pizza?",
    "The new opera is great", "The dog plays in the garden", "A woman watches TV",
    "The new movie is so great", "Paris is the capital of France.", "Small models run on a laptop, offline.",
]
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)  # about 360 tokens, past MiniLM's 256


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.asarray((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))
