"""Serving many requests on one engine: the continuous-batching scheduler and the prefix cache."""
