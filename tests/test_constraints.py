"""Constrained decoding (generation/constraints.py): grammars checked when made, answers that always fit
them on every engine, masks computed in one batch equal to masks computed one by one, and a constraint
that follows its sequence through rewinds and the scheduler's pauses."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import llguidance
import llguidance.numpy
import numpy as np
import pytest

import slm
from slm.engines.llamacpp import LlamaCppEngine
from slm.errors import InvalidParameter
from slm.generation import GenerationParams
from slm.generation.constraints import (
    Grammar,
    GrammarConstraint,
    allocate_masks,
    apply_mask,
    fill_masks,
    grammar_tokenizer,
    requested_grammar,
    tightened,
)
from slm.generation.generator import Generator
from slm.serving.scheduler import Scheduler
from structured_cases import SCHEMAS
from test_engines import ENGINES, open_engine
from test_scheduler import Collector, run_until_idle

GREEDY = GenerationParams(temperature=0, max_tokens=160)


def ask(model: slm.Model, question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{question} Answer in JSON."}]


# --- grammars are checked when made ---------------------------------------------------------------


@pytest.mark.parametrize(("make", "field", "words"), [
    (lambda: Grammar.json_schema({"type": "object", "properties": {"a": {"type": "strin"}}}), "response_format",
     "strin"),
    (lambda: Grammar.json_schema({"type": "object", "x-unknown-keyword": 1, "minProperties": 1,
                                  "propertyNames": {"pattern": "a"}}), "response_format", "propertyNames"),
    (lambda: Grammar.json_schema({"type": "array", "uniqueItems": True}), "response_format", "uniqueItems"),
    (lambda: Grammar.json_schema("{not json"), "response_format", "not valid JSON"),
    (lambda: Grammar.json_schema([1, 2]), "response_format", "must be an object"),  # type: ignore[arg-type]
    (lambda: Grammar.regex("(unclosed"), "regex", "not a valid regular expression"),
    (lambda: Grammar.regex(""), "regex", "non-empty"),
    (lambda: Grammar.choice([]), "choices", "non-empty strings"),
    (lambda: Grammar.choice("yes"), "choices", "non-empty strings"),  # type: ignore[arg-type]
    (lambda: Grammar.lark("start: undefined_rule"), "grammar", "undefined_rule"),
    (lambda: Grammar.gbnf("root ::= [unclosed"), "grammar", ""),
])
def test_a_bad_grammar_is_refused_when_made_naming_its_field(make, field: str, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidParameter) as caught:
        make()
    assert caught.value.field == field
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_regex_is_read_in_llguidances_syntax_not_pythons() -> None:
    assert Grammar.regex(r"\p{Lu}[a-z]+").kind == "regex"  # Python's re refuses \p{...}


def test_only_one_constraint_at_a_time_and_response_format_in_its_forms() -> None:
    with pytest.raises(InvalidParameter, match="regex.*cannot be combined with response_format"):
        requested_grammar(response_format="json", regex="a+")
    assert requested_grammar() == (None, None)
    assert requested_grammar(response_format="text") == (None, None)
    assert requested_grammar(response_format={"type": "text"}) == (None, None)
    assert requested_grammar(response_format={"type": "json_object"})[0] == Grammar.any_json()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    wrapped = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    assert requested_grammar(response_format=wrapped)[0].schema == schema  # type: ignore[union-attr]
    assert requested_grammar(response_format=schema)[0].schema == schema  # type: ignore[union-attr]
    with pytest.raises(InvalidParameter, match="response_format"):
        requested_grammar(response_format=42)
    assert requested_grammar(grammar='root ::= "yes" | "no"')[0].kind == "gbnf"  # type: ignore[union-attr]
    assert requested_grammar(grammar='start: "yes" | "no"')[0].kind == "lark"  # type: ignore[union-attr]


def test_schemas_are_tightened_to_a_subset_that_a_small_model_cannot_run_on_in() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}}},
              "$defs": {"p": {"properties": {"x": {}}}}, "allOf": [{"properties": {"c": {}}}]}
    tight = tightened(schema)
    assert tight["additionalProperties"] is False
    assert tight["properties"]["a"]["additionalProperties"] is False
    assert tight["$defs"]["p"]["additionalProperties"] is False
    assert "additionalProperties" not in tight["allOf"][0]  # closing each member would refuse the others
    assert tightened({"properties": {}, "additionalProperties": True})["additionalProperties"] is True
    assert "additionalProperties" not in schema  # the caller's schema is left as it was
    number = tightened({"type": ["number", "null"]})
    assert number["minimum"] < 0 < number["maximum"] and number["multipleOf"] == 1e-6
    bounded = tightened({"type": "integer", "exclusiveMinimum": 0, "maximum": 5})
    assert bounded == {"type": "integer", "exclusiveMinimum": 0, "maximum": 5}


# --- masks --------------------------------------------------------------------------------------


def test_the_vectorised_mask_equals_llguidances_own_and_a_batch_fill_equals_one_by_one(engine: LlamaCppEngine) -> None:
    tokenizer = grammar_tokenizer(engine)
    vocab = engine.info.vocab_size
    grammars = [Grammar.json_schema(s) for _, _, s in SCHEMAS[:6]]
    prefixes = ['{"', "", '{"sen', '{"rating": 1', "", '{"fruits": ["']
    constraints, histories = [], []
    for grammar, prefix in zip(grammars, prefixes, strict=True):
        c = GrammarConstraint(grammar, tokenizer, vocab)
        prompt = [1, 2, 3]
        c.sync(prompt)
        ids = prompt + (engine.tokenize(prefix, add_special=False) if prefix else [])
        constraints.append(c)
        histories.append(ids)
    fill_masks(list(zip(constraints, histories, strict=True)), vocab)
    rng = np.random.default_rng(0)
    for c, ids, grammar in zip(constraints, histories, grammars, strict=True):
        logits = rng.normal(size=vocab).astype(np.float32)
        batched = c(ids, logits.copy())
        alone = GrammarConstraint(grammar, tokenizer, vocab)
        alone.sync(ids[:3])
        single = alone(ids, logits.copy())
        np.testing.assert_array_equal(batched, single)
        # the same as llguidance's own (slow) numpy helper
        mask = allocate_masks(1, vocab)
        alone._matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        reference = logits.copy()[None]
        llguidance.numpy.apply_token_bitmask_inplace(reference, mask)
        np.testing.assert_array_equal(single, reference[0])
        assert np.isfinite(single).sum() >= 1


def test_apply_mask_keeps_exactly_the_allowed_ids() -> None:
    vocab = 70
    mask = allocate_masks(1, vocab)[0]
    mask[:] = 0
    allowed = [0, 5, 31, 32, 63, 64, 69]
    for t in allowed:
        mask[t // 32] |= np.int32(1 << (t % 32)) if t % 32 != 31 else np.int32(-(1 << 31))
    logits = np.zeros(vocab, dtype=np.float32)
    apply_mask(logits, mask)
    assert np.flatnonzero(np.isfinite(logits)).tolist() == allowed


# --- answers fit their schema on every engine ------------------------------------------------------------


@pytest.fixture(scope="module", params=ENGINES)
def any_engine(request: pytest.FixtureRequest, smollm2_path: Path) -> Iterator[slm.Model]:
    made = open_engine(request.param, request, smollm2_path)
    yield slm.Model("smollm2", made)
    made.close()


def test_every_answer_parses_and_validates_against_its_schema_on_every_engine(any_engine: slm.Model) -> None:
    assert len(SCHEMAS) >= 20
    unfinished = []
    for name, question, schema in SCHEMAS:
        answer = any_engine.chat(ask(any_engine, question), GREEDY, response_format=schema)
        if answer.finish_reason == "length":  # cut by max_tokens: said so, and never handed out as parsed
            assert answer.parsed is None
            unfinished.append(name)
            continue
        assert answer.finish_reason == "stop", name
        jsonschema.validate(json.loads(answer.text), schema)
        assert answer.parsed == json.loads(answer.text)
    assert not unfinished, f"answers that ran to max_tokens: {unfinished}"


def test_sampled_answers_fit_their_schema_too(model: slm.Model) -> None:
    for seed, (_, question, schema) in enumerate(SCHEMAS[:8]):
        params = GenerationParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed, max_tokens=200)
        answer = model.chat(ask(model, question), params, response_format=schema)
        if answer.finish_reason == "stop":
            jsonschema.validate(json.loads(answer.text), schema)
        else:
            assert answer.finish_reason == "length" and answer.parsed is None


def test_regex_choices_and_grammars_constrain_the_whole_answer(model: slm.Model) -> None:
    date = model.chat([{"role": "user", "content": "When did the Berlin Wall fall?"}], GREEDY,
                      regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", date.text) and date.finish_reason == "stop"
    choice = model.chat([{"role": "user", "content": "Is the sky blue? yes or no"}], GREEDY, choices=["yes", "no"])
    assert choice.text in ("yes", "no")
    lark = model.generate("Count: ", GREEDY, grammar='start: NUM ", " NUM ", " NUM\nNUM: /[0-9]{1,2}/')
    assert re.fullmatch(r"[0-9]{1,2}, [0-9]{1,2}, [0-9]{1,2}", lark.text) and lark.finish_reason == "stop"
    gbnf = model.generate("The answer is", GREEDY, grammar='root ::= " " ("yes" | "no") "."')
    assert gbnf.text in (" yes.", " no.")


def test_logprobs_under_a_grammar_list_only_tokens_it_allows(model: slm.Model) -> None:
    params = GREEDY.replace(logprobs=True, top_logprobs=5)
    answer = model.chat([{"role": "user", "content": "Is the sky blue?"}], params, choices=["yes", "no"])
    assert answer.logprobs and all(np.isfinite(p) for lp in answer.logprobs for _, p in lp.top)
    assert all(len(lp.top) >= 1 for lp in answer.logprobs)


def test_an_answer_cut_by_max_tokens_says_so_and_is_not_parsed(model: slm.Model) -> None:
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    answer = model.chat(ask(model, "Tell a long story."), GenerationParams(temperature=0, max_tokens=8),
                        response_format=schema)
    assert answer.finish_reason == "length" and answer.parsed is None
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer.text)


def test_a_pydantic_model_as_response_format_gives_a_parsed_instance(model: slm.Model) -> None:
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    answer = model.chat(ask(model, "Describe a person called Ada, aged 36."), GREEDY, response_format=Person)
    assert answer.finish_reason == "stop"
    assert isinstance(answer.parsed, Person) and answer.parsed == Person.model_validate_json(answer.text)


# --- the constraint follows its sequence -------------------------------------------------------------


def test_a_rewound_constrained_generator_goes_on_as_if_it_had_never_left(model: slm.Model) -> None:
    schema = SCHEMAS[7][2]
    params = GREEDY.replace(grammar=Grammar.json_schema(schema))
    prompt = model.chat_tokens(ask(model, SCHEMAS[7][1]))
    reference = model.chat(ask(model, SCHEMAS[7][1]), GREEDY, response_format=schema).tokens
    with Generator(model.engine, params) as gen:
        gen.append_tokens(prompt)
        for _ in range(12):
            gen.generate_next_token()
        gen.rewind_to(len(prompt) + 5)  # back into the answer: the grammar rolls back with it
        while not gen.is_done():
            gen.generate_next_token()
        assert gen.tokens[len(prompt):] == reference
        gen.rewind_to(len(prompt))  # back to the prompt's end: the grammar starts over
        while not gen.is_done():
            gen.generate_next_token()
        assert gen.tokens[len(prompt):] == reference


def test_tokens_appended_outside_the_grammar_are_refused(model: slm.Model) -> None:
    params = GREEDY.replace(grammar=Grammar.choice(["yes", "no"]))
    with Generator(model.engine, params) as gen:
        gen.append_tokens(model.tokenize("Is it?"))
        gen.generate_next_token()
        gen.append_tokens(model.tokenize(" maybe", add_special=False))
        with pytest.raises(InvalidParameter, match="tokens.*do not fit the grammar"):
            gen.generate_next_token()


def test_a_trigger_leaves_the_text_free_until_it_appears(model: slm.Model) -> None:
    engine = model.engine
    grammar = Grammar.lark('start: "ANSWER:" " " ("yes" | "no")', trigger="ANSWER:")
    constraint = GrammarConstraint(grammar, grammar_tokenizer(engine), engine.info.vocab_size)
    prompt = model.tokenize("Think, then answer.")
    logits = np.zeros(engine.info.vocab_size, dtype=np.float32)
    thought = prompt + engine.tokenize(" I think so.", add_special=False)
    for free in (constraint(prompt, logits.copy()), constraint(thought, logits.copy())):
        assert np.isfinite(free).all() and not constraint.active
    opened = thought + engine.tokenize(" ANSWER:", add_special=False)  # the match starts inside " ANSWER"
    held = constraint(opened, logits.copy())
    assert not constraint.active  # " ANSWER" begins with a space the grammar does not take: passed over
    grammar = Grammar.lark('start: /[ ]?/ "ANSWER:" " " ("yes" | "no")', trigger="ANSWER:")
    constraint = GrammarConstraint(grammar, grammar_tokenizer(engine), engine.info.vocab_size)
    constraint(prompt, logits.copy())
    held = constraint(opened, logits.copy())
    assert constraint.active and 0 < np.isfinite(held).sum() < 50
    allowed = [engine.token_bytes(int(t)) for t in np.flatnonzero(np.isfinite(held))]
    assert allowed and all(piece.startswith(b" ") for piece in allowed)  # what comes after "ANSWER:"
    back = constraint(thought, logits.copy())  # rewound to before the trigger: free again
    assert np.isfinite(back).all() and not constraint.active


def test_constrained_requests_batched_paused_and_recomputed_still_fit(smollm2_path: Path) -> None:
    # Four answers of about 80 tokens, 128 positions each, 256 cells between them: they outgrow the cache,
    # the youngest are paused and recomputed, and each one's grammar follows. Each has a system message of
    # its own, so that none forks another's prompt (which would share its KV cells).
    schema = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 10, "maxItems": 10}
    with slm.load(str(smollm2_path), n_ctx=128, kv_cells=256, max_sequences=8) as small:
        scheduler = Scheduler(small.engine, max_running=4, reserve_tokens=8)
        params = GenerationParams(temperature=0, grammar=Grammar.json_schema(schema))
        questions = ["List ten animals.", "List ten colours.", "List ten cities.", "List ten foods."]
        sinks = []
        for q in questions:
            sink = Collector()
            own = [{"role": "system", "content": f"{q.split()[-1]} only. You are a helpful AI assistant named SmolLM, "
                                                 "trained by Hugging Face."}, *ask(small, q)]
            scheduler.submit(small.chat_tokens(own), params, sink.on_chunk, sink.on_error)
            sinks.append(sink)
        run_until_idle(scheduler, limit=5000)
        stats = scheduler.stats()
        scheduler.stop(timeout=60)
        assert stats["preemptions"] > 0 and stats["failed"] == 0
        for sink in sinks:
            assert not sink.errors
            finish = sink.chunks[-1].finish_reason
            if finish == "stop":
                jsonschema.validate(json.loads(sink.text), schema)
            else:  # its context (128) ended first: said so
                assert finish == "length"
        assert any(s.chunks[-1].finish_reason == "stop" for s in sinks)
