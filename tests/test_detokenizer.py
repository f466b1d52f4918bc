"""Streaming detokenization over real tokenizers, the stop matcher, and stop strings end to end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from slm.engines.llamacpp import LlamaCppEngine
from slm.generation.detokenizer import StopMatcher, StreamingDetokenizer
from slm.generation.params import GenerationParams
from slm.generation.stream import complete

REPLACEMENT = "\ufffd"

TEXTS = {
    "emoji": "Party time 🎉🥳 and a thumbs up 👍🏽!",
    "zwj": "family 👨\u200d👩\u200d👧\u200d👦 and 🧑\u200d💻 coder",
    "flags": "flags 🇯🇵🇫🇷🇧🇷 and 🏳️\u200d🌈",
    "cjk": "日本語のテキスト、中文文本和한국어 텍스트",
    "accents": "Crème brûlée, naïve café, Ærøskøbing, Łódź, ñandú",
    "arabic": "مرحبا بالعالم، كيف حالك؟",
    "hindi": "नमस्ते दुनिया, आप कैसे हैं?",
    "mixed": "mix: naïve 😀 東京 ok — «ß» ∑ x² → ∞ 🇺🇳",
}
#: The texts whose tokens include partial UTF-8 characters in both tokenizers' vocabularies.
SPLIT = {
    "smollm2": ["emoji", "zwj", "flags", "cjk", "mixed"],
    "gemma": ["rare"],
}
GEMMA_TEXTS = {**TEXTS, "rare": "龘 𓀀𓀁 🫠🦩 ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"}


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _stream(engine: LlamaCppEngine, ids: list[int]) -> list[str]:
    detok = StreamingDetokenizer(engine.token_bytes)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> Iterator[LlamaCppEngine]:
    e = LlamaCppEngine(gemma_path, n_ctx=512, max_sequences=1)
    yield e
    e.close()


@pytest.fixture(params=["smollm2", "gemma"])
def tokenizer(request: pytest.FixtureRequest) -> tuple[str, LlamaCppEngine]:
    name = request.param
    return name, request.getfixturevalue("engine" if name == "smollm2" else "gemma")


def _texts(name: str) -> dict[str, str]:
    return TEXTS if name == "smollm2" else GEMMA_TEXTS


# --- the streaming detokenizer ------------------------------------------------------------------


def test_stream_equals_text_and_has_no_replacement_character(tokenizer: tuple[str, LlamaCppEngine]) -> None:
    name, engine = tokenizer
    for label, text in _texts(name).items():
        ids = engine.tokenize(text, add_special=False)
        assert len(ids) > 1, label
        deltas = _stream(engine, ids)
        assert not any(REPLACEMENT in d for d in deltas), (label, deltas)
        streamed = "".join(deltas)
        assert streamed == engine.detokenize(ids), label
        assert streamed == text, label


def test_texts_exercise_partial_characters(tokenizer: tuple[str, LlamaCppEngine]) -> None:
    """Some tokens are incomplete UTF-8 on their own, and naive per-token decoding breaks them."""
    name, engine = tokenizer
    texts = _texts(name)
    for label in SPLIT[name]:
        ids = engine.tokenize(texts[label], add_special=False)
        pieces = [engine.token_bytes(t) for t in ids]
        assert b"".join(pieces) == texts[label].encode("utf-8"), label
        partial = [p for p in pieces if not _valid_utf8(p)]
        assert partial, f"{label}: every token is whole UTF-8, the test does not exercise the hard case"
        naive = "".join(p.decode("utf-8", errors="replace") for p in pieces)
        assert REPLACEMENT in naive and naive != texts[label], label
        # The streaming detokenizer holds those fragments back: some tokens produce no text at all.
        deltas = _stream(engine, ids)
        assert "" in deltas[:-1] and REPLACEMENT not in "".join(deltas), label


def test_every_delta_is_whole_characters(engine: LlamaCppEngine) -> None:
    text = TEXTS["zwj"] + TEXTS["cjk"]
    ids = engine.tokenize(text, add_special=False)
    detok = StreamingDetokenizer(engine.token_bytes)
    emitted = b""
    for i, token in enumerate(ids, 1):
        emitted += detok.add(token).encode("utf-8")
        pending = b"".join(engine.token_bytes(t) for t in ids[:i])
        # Everything decodable so far has been released; only an unfinished character (< 4 bytes) waits.
        assert pending.startswith(emitted)
        assert len(pending) - len(emitted) < 4
        assert _valid_utf8(emitted)
    assert detok.flush() == ""


def test_unfinished_character_at_the_end_flushes_as_replacement(engine: LlamaCppEngine) -> None:
    ids = engine.tokenize("ok 🎉", add_special=False)
    first_partial = next(i for i, t in enumerate(ids) if not _valid_utf8(engine.token_bytes(t)))
    detok = StreamingDetokenizer(engine.token_bytes)
    text = "".join(detok.add(t) for t in ids[: first_partial + 1])
    assert REPLACEMENT not in text
    assert detok.flush() == REPLACEMENT


def test_special_tokens_render_empty(engine: LlamaCppEngine) -> None:
    eos = engine.info.special.eos_id
    assert eos is not None
    detok = StreamingDetokenizer(engine.token_bytes)
    ids = engine.tokenize("hi", add_special=False)
    assert "".join(detok.add(t) for t in [*ids, eos]) + detok.flush() == "hi"


# --- the stop matcher ---------------------------------------------------------------------------


def _feed(matcher: StopMatcher, chunks: list[str]) -> list[str]:
    return [matcher.feed(c) for c in chunks]


def test_stop_spanning_chunk_boundaries() -> None:
    matcher = StopMatcher(["lo Wo"])
    out = _feed(matcher, ["Hel", "lo W", "orld"])
    assert "".join(out) == "Hel"
    assert out == ["He", "l", ""]  # "l" and then "lo W" were held back as possible starts of the stop
    assert matcher.stopped
    assert matcher.flush() == ""


def test_the_stop_that_matched_is_the_first_in_the_text() -> None:
    matcher = StopMatcher(["World", "lo"])
    assert matcher.matched is None
    assert "".join(_feed(matcher, ["Hel", "lo Wor", "ld"])) == "Hel"
    assert matcher.matched == "lo"  # it comes first in the text, though second in the list
    unmatched = StopMatcher(["END"])
    unmatched.feed("no end here")
    assert unmatched.matched is None and not unmatched.stopped


def test_held_prefix_is_released_when_it_is_not_a_stop() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("the E") == "the "
    assert matcher.feed("N") == ""
    assert matcher.feed("ergy") == "ENergy"
    assert not matcher.stopped
    assert matcher.feed(" ok") == " ok"


def test_overlapping_prefixes_are_handled() -> None:
    matcher = StopMatcher(["aab"])
    assert matcher.feed("xaa") == "x"
    assert matcher.feed("a") == "a"  # "aaa": the first "a" can no longer start the stop
    assert matcher.feed("b!") == ""
    assert matcher.stopped


def test_multiple_stops_earliest_wins() -> None:
    assert StopMatcher(["world", "lo"]).feed("hello world") == "hel"
    assert StopMatcher(["lo", "world"]).feed("hello world") == "hel"
    matcher = StopMatcher(["\n\n", "User:", "###"])
    assert "".join(_feed(matcher, ["Answer: 4", "2.\nUs", "er: ne", "xt\n\n"])) == "Answer: 42.\n"
    assert matcher.stopped


def test_stop_at_the_very_start() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("STOP now") == ""
    assert matcher.stopped
    matcher = StopMatcher(["STOP"])
    assert _feed(matcher, ["ST", "OP", "later"]) == ["", "", ""]
    assert matcher.stopped


def test_flush_releases_the_held_text() -> None:
    matcher = StopMatcher(["END", "<|x|>"])
    assert matcher.feed("almost EN") == "almost "
    assert matcher.flush() == "EN"
    assert matcher.flush() == ""
    matcher = StopMatcher(["END", "<|x|>"])
    assert matcher.feed("a <|") == "a "
    assert matcher.flush() == "<|"


def test_nothing_is_emitted_after_stopping() -> None:
    matcher = StopMatcher(["."])
    assert matcher.feed("One. Two") == "One"
    assert matcher.feed("three") == ""
    assert matcher.feed(".") == ""
    assert matcher.flush() == ""
    assert matcher.stopped


def test_no_stops_passes_everything_through() -> None:
    matcher = StopMatcher([])
    assert _feed(matcher, ["a", "", "bc"]) == ["a", "", "bc"]
    assert matcher.flush() == "" and not matcher.stopped


# --- end to end -----------------------------------------------------------------------------------


def test_stop_string_spanning_tokens_in_a_real_generation(engine: LlamaCppEngine) -> None:
    prompt = engine.tokenize("The three primary colors are", add_special=False)
    # Greedy without a stop string (a short run: greedy decoding makes the longer one start the same way).
    free = complete(engine, prompt, GenerationParams(temperature=0, max_tokens=6))
    assert free.finish_reason == "length" and len(free.tokens) == 6
    # Character offset where each generated token ends.
    ends = [len(engine.detokenize(free.tokens[:i])) for i in range(1, len(free.tokens) + 1)]
    assert engine.detokenize(free.tokens) == free.text
    # A stop string made of the last 2 characters of one token and the first 2 of the next, whose first
    # occurrence is exactly there, past the first token.
    stop, cut, last_token = None, None, None
    for i in range(1, len(ends) - 1):
        boundary = ends[i]
        candidate = free.text[boundary - 2 : boundary + 2]
        if ends[i] - ends[i - 1] >= 2 and ends[i + 1] - boundary >= 2 and free.text.find(candidate) == boundary - 2:
            stop, cut, last_token = candidate, boundary - 2, i + 1
            break
    assert stop is not None, f"no usable token boundary in {free.text!r}"

    stopped = complete(engine, prompt, GenerationParams(temperature=0, max_tokens=40, stop=[stop]))
    assert stopped.text == free.text[:cut]
    assert stopped.finish_reason == "stop"
    # Generation ended on the token that completed the stop string.
    assert stopped.tokens == free.tokens[: last_token + 1]
    assert stopped.usage.completion_tokens == last_token + 1 < 40
