"""Options shared by the generating commands: every sampling parameter as a flag named after it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click

from slm.engines import REGISTRY
from slm.errors import InvalidParameter
from slm.generation import GenerationParams

F = Callable[..., Any]

DEFAULT_MAX_TOKENS = 1024

_SAMPLING: list[tuple[str, type, str]] = [
    ("temperature", float, "Randomness; 0 picks the most likely token every time (greedy). [default: 0.8]"),
    ("top-k", int, "Sample among the k most likely tokens; 0 disables. [default: 40]"),
    ("top-p", float, "Nucleus sampling: smallest set of tokens with this total probability. [default: 0.95]"),
    ("min-p", float, "Drop tokens less likely than min-p times the most likely one. [default: 0.05]"),
    ("typical-p", float, "Locally typical sampling mass; 1 disables. [default: 1.0]"),
    ("repetition-penalty", float, "Penalize tokens already in the text (>1 discourages). [default: 1.0]"),
    ("frequency-penalty", float, "Penalize generated tokens by how often they occurred, -2..2. [default: 0]"),
    ("presence-penalty", float, "Penalize generated tokens that occurred at all, -2..2. [default: 0]"),
    ("seed", int, "Seed for reproducible sampling."),
]


def _parse_early_stopping(ctx: click.Context, param: click.Parameter, value: str | None) -> bool | str | None:
    choices: dict[str, bool | str] = {"true": True, "false": False, "never": "never"}
    return None if value is None else choices[value]


BEAM_OPTIONS = [
    click.option("--beams", "num_beams", type=int, default=None,
                 help="Beam search with N beams (deterministic; sampling flags are refused). [default: 1, off]"),
    click.option("--length-penalty", type=float, default=None,
                 help="Beam search: a beam scores its summed logprobs / its length ** X. [default: 1.0]"),
    click.option("--early-stopping", type=click.Choice(["true", "false", "never"]), default=None,
                 callback=_parse_early_stopping,
                 help="Beam search: stop at N finished beams (true), when no running beam can beat them at "
                      "its length (false), or at any length (never). [default: false]"),
    click.option("--num-return-sequences", type=int, default=None,
                 help="Beam search: how many of the best beams to return (with --json, all of them). [default: 1]"),
    click.option("--no-repeat-ngram-size", type=int, default=None,
                 help="Never repeat an n-gram of this many tokens (prompt included); 0 disables. [default: 0]"),
    click.option("--min-new-tokens", type=int, default=None,
                 help="Beam search: no end of the answer before this many tokens. [default: 0]"),
]

FLAGS = {"num_beams": "--beams"}
"""Flags not named after their field."""


def _parse_bias(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[int, float]:
    bias = {}
    for item in values:
        token, sep, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r} is not TOKEN_ID=BIAS (e.g. 2=-100)") from None
        if not sep:
            raise click.BadParameter(f"{item!r} is not TOKEN_ID=BIAS (e.g. 2=-100)")
    return bias


def with_options(options: Sequence[Callable[[Any], Any]]) -> Callable[[F], F]:
    """A decorator adding click options in the order listed."""

    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def as_flag(error: InvalidParameter, flag: str) -> InvalidParameter:
    """The same complaint, naming the command-line flag instead of the API field."""
    return InvalidParameter(flag, error.reason)


def sampling_options(f: F) -> F:
    """Add the generation flags; the command receives them as keyword arguments."""
    options = [
        click.option("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, show_default=True,
                     help="Most tokens to generate."),
        *[click.option(f"--{name}", type=kind, default=None, help=text) for name, kind, text in _SAMPLING],
        click.option("--stop", multiple=True, help="Stop before this text (repeatable)."),
        click.option("--logit-bias", multiple=True, callback=_parse_bias, metavar="ID=BIAS",
                     help="Add BIAS to token ID's logit (repeatable, -100..100)."),
        click.option("--truncate", is_flag=True, help="Drop the oldest prompt tokens if the prompt is too long."),
        click.option("--lookup", type=int, default=None, metavar="N",
                     help="Speculative decoding by prompt lookup: check up to N drafted tokens a step (fast when "
                          "the answer copies the prompt; the answer is unchanged)."),
        click.option("--ctx-size", "n_ctx", type=int, default=None,
                     help="Context to allocate. [default: the model's, at most 8192]"),
        *ENGINE_OPTIONS,
    ]
    return with_options(options)(f)


ENGINE_CHOICES = ["auto", *REGISTRY]
"""What ``--engine`` takes: ``auto`` and every engine in the registry."""
ENGINE_OPTIONS = [
    click.option("--engine", type=click.Choice(ENGINE_CHOICES), default="auto",
                 show_default=True, help="What runs the model (auto: the engine for its format)."),
    click.option("--threads", type=int, default=None, help="CPU threads. [default: all cores]"),
    click.option("--flash-attn", "flash_attention", type=click.Choice(["auto", "on", "off"]), default="auto",
                 show_default=True, help="Flash attention (auto: where the engine finds it faster)."),
    click.option("--draft", default=None, metavar="MODEL",
                 help="Speculative decoding with a smaller model of the same vocabulary drafting tokens "
                      "(e.g. qwen2.5-coder:0.5b for qwen2.5-coder:1.5b; the answer is unchanged)."),
    click.option("--adapter", "adapters", multiple=True, metavar="NAME",
                 help="A LoRA adapter (from `slm finetune`, or a peft adapter folder) over the model (repeatable: "
                      "`slm serve` serves each as a model of its own name)."),
]


def generation_params(options: dict[str, Any], **extra: Any) -> GenerationParams:
    """Build and validate the parameters from the flags (a bad value names its flag)."""
    fields = {key: options.pop(key) for key in list(options) if key in _PARAM_FIELDS}
    fields["stop"] = tuple(fields.get("stop") or ())
    fields["logit_bias"] = fields.get("logit_bias") or {}
    try:
        return GenerationParams.of(**fields, **extra)
    except InvalidParameter as e:
        raise as_flag(e, FLAGS.get(e.field, "--" + e.field.replace("_", "-"))) from None


def engine_options(options: dict[str, Any]) -> dict[str, Any]:
    """The engine's load options among the flags (removed from ``options``)."""
    names = ("n_ctx", "threads", "kv_cells", "max_sequences", "draft")
    chosen = {k: v for k in names if (v := options.pop(k, None)) is not None}
    engine = options.pop("engine", "auto")
    if engine != "auto":
        chosen["engine"] = engine
    adapters = options.pop("adapters", ())
    if adapters:
        chosen["adapters"] = tuple(adapters)
    flash = options.pop("flash_attention", "auto")
    if flash != "auto":
        chosen["flash_attention"] = flash == "on"
    return chosen


_PARAM_FIELDS = {
    "max_tokens", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
    "frequency_penalty", "presence_penalty", "seed", "stop", "logit_bias", "truncate", "top_logprobs", "lookup",
    "num_beams", "length_penalty", "early_stopping", "num_return_sequences", "no_repeat_ngram_size", "min_new_tokens",
}
