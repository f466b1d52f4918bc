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
    the answers each gets alone (float32, each sequence in its own infer request: equal, not just close)."""
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
