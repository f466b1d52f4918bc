"""GenerationParams: validation where it is built, normalization, ``replace`` and ``of``."""

from __future__ import annotations

import math
from typing import Any

import pytest

from slm.errors import InvalidParameter, SlmError
from slm.generation.params import MAX_TOP_LOGPROBS, GenerationParams


def _reject(field: str, **kwargs: Any) -> InvalidParameter:
    with pytest.raises(InvalidParameter) as caught:
        GenerationParams(**kwargs)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    return caught.value


def test_defaults_follow_llama_cpp() -> None:
    p = GenerationParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.8, 40, 0.95, 0.05)
    assert p.max_tokens is None and p.stop == () and p.logit_bias == {} and not p.greedy
    assert GenerationParams(temperature=0).greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", 0.0),
        ("top_p", 1.0001),
        ("top_p", 2),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("top_k", -1),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("typical_p", 0.0),
        ("typical_p", 1.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("presence_penalty", 3),
        ("seed", -1),
        ("top_logprobs", -1),
        ("top_logprobs", MAX_TOP_LOGPROBS + 1),
    ],
)
def test_out_of_range_values_name_their_field(field: str, value: object) -> None:
    err = _reject(field, **{field: value})
    assert str(value) in str(err)  # the message shows what was given


@pytest.mark.parametrize(
    "field",
    ["temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "frequency_penalty", "presence_penalty"],
)
@pytest.mark.parametrize("value", ["0.5", "abc", None, [0.5], True, False, math.nan, math.inf, -math.inf])
def test_float_fields_reject_non_numbers_bools_and_non_finite(field: str, value: object) -> None:
    _reject(field, **{field: value})


@pytest.mark.parametrize("field", ["max_tokens", "top_k", "seed", "top_logprobs"])
@pytest.mark.parametrize("value", ["3", "x", 2.5, 3.0, True, False, math.nan, math.inf])
def test_integer_fields_reject_non_integers_and_bools(field: str, value: object) -> None:
    _reject(field, **{field: value})


@pytest.mark.parametrize("field", ["logprobs", "truncate"])
@pytest.mark.parametrize("value", [1, 0, "true", None])
def test_flag_fields_want_real_booleans(field: str, value: object) -> None:
    _reject(field, **{field: value})


def test_boundary_values_are_accepted() -> None:
    p = GenerationParams(
        temperature=0,
        top_p=1.0,
        min_p=0.0,
        typical_p=1.0,
        max_tokens=1,
        top_k=0,
        seed=0,
        frequency_penalty=-2.0,
        presence_penalty=2.0,
        top_logprobs=MAX_TOP_LOGPROBS,
        repetition_penalty=0.01,
    )
    assert p.top_logprobs == 20 and p.max_tokens == 1 and p.frequency_penalty == -2.0
    assert GenerationParams(temperature=5, top_p=1e-9, min_p=1.0).temperature == 5  # ints count as numbers


def test_top_logprobs_limit_is_20() -> None:
    assert MAX_TOP_LOGPROBS == 20
    assert GenerationParams(top_logprobs=20).top_logprobs == 20
    err = _reject("top_logprobs", top_logprobs=21)
    assert "21" in str(err)


# --- logit_bias --------------------------------------------------------------------------------


def test_logit_bias_string_keys_become_ints_and_values_floats() -> None:
    p = GenerationParams(logit_bias={"42": 5, "7": -100, 3: 100})
    assert p.logit_bias == {42: 5.0, 7: -100.0, 3: 100.0}
    assert all(type(k) is int for k in p.logit_bias)
    assert all(type(v) is float for v in p.logit_bias.values())


@pytest.mark.parametrize("key", ["abc", "", "4.2.1", None, (1, 2)])
def test_logit_bias_bad_key(key: object) -> None:
    err = _reject("logit_bias", logit_bias={key: 1.0})
    assert repr(key) in str(err)


def test_logit_bias_negative_token_id_is_rejected() -> None:
    """-1 is not a token id; accepted, it would bias the last token of the vocabulary (numpy indexing)."""
    with pytest.raises(InvalidParameter) as caught:
        GenerationParams(logit_bias={-1: 5.0})
    assert "logit_bias" in caught.value.field


@pytest.mark.parametrize("value", [100.5, -101, math.inf, math.nan, "5", None, True])
def test_logit_bias_bad_value_names_the_token(value: object) -> None:
    with pytest.raises(InvalidParameter) as caught:
        GenerationParams(logit_bias={"12": value})
    assert caught.value.field == "logit_bias[12]"


@pytest.mark.parametrize("bias", [[1, 2], "12:5", 3])
def test_logit_bias_must_be_a_mapping(bias: object) -> None:
    _reject("logit_bias", logit_bias=bias)


# --- stop ---------------------------------------------------------------------------------------


def test_stop_plain_string_becomes_a_one_tuple() -> None:
    assert GenerationParams(stop="\n\n").stop == ("\n\n",)
    assert GenerationParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert GenerationParams(stop=("x",)).stop == ("x",)


@pytest.mark.parametrize("stop", ["", [""], ["ok", ""], [None], ["ok", 3], [b"bytes"]])
def test_stop_rejects_empty_and_non_strings(stop: object) -> None:
    _reject("stop", stop=stop)


@pytest.mark.parametrize("stop", [3, 2.5])
def test_stop_that_is_not_a_list_is_an_invalid_parameter(stop: object) -> None:
    """A user's bad value must come back as InvalidParameter, not a TypeError from deep inside."""
    _reject("stop", stop=stop)


def test_logits_processors_must_be_callables() -> None:
    _reject("logits_processors", logits_processors=["not callable"])
    p = GenerationParams(logits_processors=[lambda ids, logits: logits])
    assert isinstance(p.logits_processors, tuple) and len(p.logits_processors) == 1


def test_invalid_parameter_is_an_slm_error_and_a_value_error() -> None:
    err = _reject("temperature", temperature=-1)
    assert isinstance(err, SlmError) and isinstance(err, ValueError)
    assert err.exit_code == 2


def test_params_are_frozen() -> None:
    p = GenerationParams()
    with pytest.raises(AttributeError):
        p.temperature = 0.1  # type: ignore[misc]


# --- replace and of -----------------------------------------------------------------------------


def test_replace_changes_only_the_given_fields() -> None:
    base = GenerationParams(temperature=0.3, stop="END", logit_bias={"5": 1}, seed=9)
    new = base.replace(top_k=7, max_tokens=12)
    assert (new.top_k, new.max_tokens) == (7, 12)
    assert (new.temperature, new.stop, new.logit_bias, new.seed) == (0.3, ("END",), {5: 1.0}, 9)
    assert (base.top_k, base.max_tokens) == (40, None)  # the original is untouched


def test_replace_validates_again() -> None:
    with pytest.raises(InvalidParameter) as caught:
        GenerationParams().replace(top_p=0)
    assert caught.value.field == "top_p"
    assert GenerationParams().replace(stop="x").stop == ("x",)


def test_replace_rejects_unknown_fields_by_name() -> None:
    with pytest.raises(InvalidParameter) as caught:
        GenerationParams().replace(temprature=0.5)
    assert caught.value.field == "temprature"


def test_of_applies_overrides_and_ignores_none() -> None:
    base = GenerationParams(temperature=0.2, max_tokens=50, stop=["x"])
    p = GenerationParams.of(base, temperature=None, max_tokens=10, stop=None, seed=None)
    assert (p.temperature, p.max_tokens, p.stop, p.seed) == (0.2, 10, ("x",), None)
    assert GenerationParams.of(base, temperature=None) is base  # nothing given: the same object
    assert GenerationParams.of(None, top_k=3) == GenerationParams(top_k=3)
    assert GenerationParams.of() == GenerationParams()
    assert GenerationParams.of(None, temperature=0).greedy  # 0 is a value, not "not given"


def test_of_validates_and_rejects_unknown_fields() -> None:
    with pytest.raises(InvalidParameter) as caught:
        GenerationParams.of(None, max_tokens=0)
    assert caught.value.field == "max_tokens"
    with pytest.raises(InvalidParameter) as caught:
        GenerationParams.of(GenerationParams(), bogus=1)
    assert caught.value.field == "bogus"
    # An unknown field set to None is ignored like every other None.
    assert GenerationParams.of(None, bogus=None) == GenerationParams()
