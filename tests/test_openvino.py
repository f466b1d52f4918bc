"""The OpenVINO engine on SmolLM2 exported by `slm convert --to openvino` (the conformance suite in test_engines
runs on it too, and its scheduler test): greedy text equals transformers' `generate()`, the server answers
concurrent requests as one at a time, and a folder it cannot run is refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch

import slm
from slm.engines.openvino import OpenVINOEngine
from slm.errors import InvalidModelFile

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at"]


def test_float32_greedy_text_equals_transformers_generate(smollm2_openvino_fp32_path: Path,
                                                          smollm2_hf_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(smollm2_hf_path), dtype=torch.float32)
    with slm.load(str(smollm2_openvino_fp32_path), engine="openvino", max_sequences=1) as model:
        assert model.engine.name == "openvino"
        for prompt in PROMPTS:
            ids = model.tokenize(prompt)
            ours = model.generate(ids, temperature=0, max_tokens=32).tokens
            theirs = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                        pad_token_id=model.info.special.eos_id)[0, len(ids):].tolist()
            assert ours == theirs[: len(ours)] and len(ours) in (len(theirs), 32)


def test_a_folder_that_is_not_a_stateful_llm_is_refused_by_name(tmp_path: Path,
                                                                smollm2_openvino_fp32_path: Path) -> None:
    with pytest.raises(InvalidModelFile, match="has no openvino_model.xml"):
        OpenVINOEngine(tmp_path)
    stateless = tmp_path / "stateless"
    stateless.mkdir()
    layer = ov.convert_model(torch.nn.Linear(4, 4), example_input=torch.zeros(1, 4))
    ov.save_model(layer, stateless / "openvino_model.xml")
    (stateless / "config.json").write_text((smollm2_openvino_fp32_path / "config.json").read_text())
    with pytest.raises(InvalidModelFile, match="lacks inputs input_ids, attention_mask, position_ids, beam_idx"):
        OpenVINOEngine(stateless)


def test_rewind_cuts_the_kv_state_and_the_engine_follows_its_threads(smollm2_openvino_fp32_path: Path) -> None:
    engine = OpenVINOEngine(smollm2_openvino_fp32_path, n_ctx=256, threads=1, max_sequences=2)
    try:
        assert engine.info.context_length == 256 and engine.info.kv_cells == 512
        assert int(engine._compiled.get_property("INFERENCE_NUM_THREADS")) == 1
        seq = engine.new_sequence()
        prompt = engine.tokenize(PROMPTS[0])
        first = engine.evaluate([(seq, prompt + [11, 12])])[0]
        engine.rewind(seq, len(prompt))
        assert engine.sequence_length(seq) == len(prompt)
        again = engine.evaluate([(seq, [11, 12])])[0]
        assert np.abs(again - first).max() < 1e-3
        saved = engine.save(seq)
        assert saved.nbytes == saved.length * engine.info.kv_bytes_per_token
        engine.free(seq)
    finally:
        engine.close()


def test_the_server_answers_concurrent_requests_on_openvino_as_one_at_a_time(
        tmp_path: Path, smollm2_openvino_fp32_path: Path) -> None:
    """`slm serve` on the OpenVINO folder, through the official OpenAI client: four greedy chats at once get
    the answers each gets alone (float32; batched rows differ from a row alone by float rounding only)."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from serving import Server

    with Server(tmp_path, str(smollm2_openvino_fp32_path), "--parallel", "4", "--ctx-size", "512") as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        name = client.models.list().data[0].id

        def ask(question: str) -> str:
            reply = client.chat.completions.create(model=name, temperature=0, max_tokens=24,
                                                   messages=[{"role": "user", "content": question}])
            return reply.choices[0].message.content or ""

        questions = [f"Name a colour, number {i}." for i in range(4)]
        alone = [ask(q) for q in questions]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, questions))
        assert together == alone and all(alone)
        assert server.models()[name]["finished"] >= 8


def test_sequences_batched_in_shared_groups_give_the_logits_each_gets_alone(
        smollm2_openvino_fp32_path: Path) -> None:
    """A random run of what a server does (sequences joining, decoding side by side, idling, drafting and
    rewinding, forking, saving, restoring, leaving) on an engine whose groups merge at once, against the same
    engine with every sequence in an infer request of its own: the same logits after every call."""
    import random

    batched = OpenVINOEngine(smollm2_openvino_fp32_path, n_ctx=512, max_sequences=6)
    alone = OpenVINOEngine(smollm2_openvino_fp32_path, n_ctx=512, max_sequences=6)
    batched.seconds_per_byte, alone.batching = 0.0, False
    rng = random.Random(7)
    pairs: list[tuple[int, int]] = []  # (batched handle, alone handle)
    shared_calls = 0

    def evaluate(work: list[tuple[int, list[int]]], keep: list[int]) -> None:
        ours = batched.evaluate([(pairs[i][0], tokens) for i, tokens in work], keep)
        theirs = alone.evaluate([(pairs[i][1], tokens) for i, tokens in work], keep)
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-3

    try:
        for _ in range(60):
            lengths = [batched.sequence_length(a) for a, _ in pairs]
            choice = rng.random()
            if len(pairs) < 2 or (choice < 0.15 and len(pairs) < 5):
                pairs.append((batched.new_sequence(), alone.new_sequence()))
                evaluate([(len(pairs) - 1, [rng.randrange(200, 2000) for _ in range(rng.randrange(2, 30))])], [1])
            elif choice < 0.2:  # a draft of several tokens, then a rewind that keeps some
                i = rng.randrange(len(pairs))
                evaluate([(i, [rng.randrange(200, 2000) for _ in range(4)])], [4])
                cut = lengths[i] + rng.randrange(0, 4)
                batched.rewind(pairs[i][0], cut)
                alone.rewind(pairs[i][1], cut)
            elif choice < 0.25 and len(pairs) < 5:  # a fork or a save and restore
                i = rng.randrange(len(pairs))
                if rng.random() < 0.5:
                    pairs.append((batched.fork(pairs[i][0]), alone.fork(pairs[i][1])))
                else:
                    pairs.append((batched.restore(batched.save(pairs[i][0])), alone.restore(alone.save(pairs[i][1]))))
            elif choice < 0.3 and len(pairs) > 2:
                a, b = pairs.pop(rng.randrange(len(pairs)))
                batched.free(a)
                alone.free(b)
            else:  # a decoding step: most sequences take one token, some idle
                chosen = [i for i in range(len(pairs)) if rng.random() < 0.8] or [0]
                evaluate([(i, [rng.randrange(200, 2000)]) for i in chosen], [1] * len(chosen))
                groups = {id(batched._sequences[pairs[i][0]].group) for i in chosen}
                shared_calls += len(groups) < len(chosen)
        assert shared_calls >= 20  # most steps really ran several sequences in one call
    finally:
        batched.close()
        alone.close()
