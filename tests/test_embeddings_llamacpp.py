"""Embeddings on llama.cpp: all-MiniLM-L6-v2 converted by `slm convert minilm --to gguf`, against
sentence-transformers' own ``encode`` and the Hugging Face tokenizer; through the Python API, `slm embed`, and a
real `slm serve` with the official OpenAI client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

import slm
from embedding_cases import LONG, SENTENCES, cosines
from serving import SERVE_ARGS, Server, assert_no_traceback
from slm.engines.llamacpp_embedding import LlamaCppEmbedder
from slm.errors import InvalidModelFile, InvalidParameter
from slm.model.embedding import EmbeddingModel
from slm.store import catalog
from slm.store.gguf_header import leading_metadata
from slm.tools.gguf_export import PROBES


@pytest.fixture(scope="module")
def gguf_path(minilm_gguf: tuple[Path, str]) -> Path:
    return minilm_gguf[0]


@pytest.fixture(scope="module")
def minilm_llamacpp(gguf_path: Path) -> Iterator[EmbeddingModel]:
    model = slm.load(str(gguf_path), threads=1)
    assert isinstance(model, EmbeddingModel) and isinstance(model.embedder, LlamaCppEmbedder)
    yield model
    model.close()


def test_convert_writes_a_bert_gguf_with_its_pooling(minilm_gguf: tuple[Path, str], minilm_home: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path, printed = minilm_gguf
    metadata = leading_metadata(path, stop_prefix="\0")  # every key, the vocabulary's too
    assert metadata["general.architecture"] == "bert" and metadata["bert.attention.causal"] is False
    assert metadata["bert.pooling_type"] == 1  # mean, from 1_Pooling/config.json
    assert metadata["sentence_transformers.normalize"] is True
    assert metadata["sentence_transformers.max_seq_length"] == 256
    assert metadata["tokenizer.ggml.model"] == "bert" and metadata["tokenizer.ggml.normalizer.lowercase"] is True
    ids = [metadata[f"tokenizer.ggml.{role}_token_id"] for role in ("bos", "seperator", "padding", "unknown")]
    assert ids == [101, 102, 0, 100]  # [CLS] (llama.cpp's BOS), [SEP], [PAD], [UNK]
    assert printed.strip() == 'slm embed minilm-q8_0 "..."'
    monkeypatch.setenv("SLM_HOME", str(minilm_home))
    resolved = catalog.resolve("minilm-q8_0")  # by its store name, as printed
    assert resolved.format == "gguf" and catalog.is_embedding(resolved)
    assert not catalog.is_embedding(catalog.resolve("smollm2"))


def test_vectors_equal_sentence_transformers(minilm_llamacpp: EmbeddingModel, reference: object) -> None:
    ours = minilm_llamacpp.embed(SENTENCES)
    theirs = reference.encode(SENTENCES)  # type: ignore[attr-defined]
    assert ours.vectors.shape == (20, 384)
    assert cosines(ours.vectors, theirs).min() >= 0.999
    assert np.allclose(np.linalg.norm(ours.vectors, axis=1), 1.0, atol=1e-5)  # normalized by slm, as the folder asks


def test_token_ids_equal_the_hugging_face_tokenizer(minilm_llamacpp: EmbeddingModel, minilm_path: Path) -> None:
    from transformers import AutoTokenizer

    texts = [*SENTENCES, *PROBES, LONG]
    expected = AutoTokenizer.from_pretrained(minilm_path)(texts)["input_ids"]
    assert minilm_llamacpp.embedder.tokenize(texts) == [list(ids) for ids in expected]


def test_batched_equals_one_at_a_time(minilm_llamacpp: EmbeddingModel) -> None:
    """Several sequences in one llama_decode (distinct seq_ids) give each its own vector. Not bit-equal: the
    8-bit weights' kernels round differently with the batch's width."""
    batched = minilm_llamacpp.embed(SENTENCES).vectors
    single = np.stack([minilm_llamacpp.embed(s).vectors[0] for s in SENTENCES])
    assert cosines(batched, single).min() >= 0.9995
    again = minilm_llamacpp.embed(SENTENCES[::-1]).vectors[::-1]  # another order, another packing of the passes
    assert cosines(batched, again).min() >= 0.9995


def test_more_than_one_pass(minilm_llamacpp: EmbeddingModel) -> None:
    """Inputs past one pass's tokens are cut into several llama_decode calls, in order."""
    texts = [LONG, *SENTENCES[:3], "and " + LONG, SENTENCES[3]]
    cut = minilm_llamacpp.embed(texts, truncate=True)
    assert sum(len(t) for t in cut.tokens) > minilm_llamacpp.embedder.tokens_per_pass  # type: ignore[attr-defined]
    single = np.stack([minilm_llamacpp.embed([t], truncate=True).vectors[0] for t in texts])
    assert cosines(cut.vectors, single).min() >= 0.9995


def test_too_long_is_refused_by_index_unless_truncated(minilm_llamacpp: EmbeddingModel, reference: object) -> None:
    with pytest.raises(InvalidParameter) as e:
        minilm_llamacpp.embed(["short", LONG])
    assert e.value.field == "input[1]" and "256" in str(e.value) and "truncate" in str(e.value)
    cut = minilm_llamacpp.embed(["short", LONG], truncate=True)
    assert len(cut.tokens[1]) == 256 and cut.tokens[1][-1] == 102
    theirs = reference.encode([LONG])  # type: ignore[attr-defined]
    assert cosines(cut.vectors[1:], theirs).min() >= 0.999


def test_a_model_that_generates_text_is_refused(smollm2_path: Path, minilm_path: Path, gguf_path: Path) -> None:
    with pytest.raises(InvalidParameter, match="generates text") as e:
        slm.api.load_embedding(str(smollm2_path))
    assert e.value.field == "model" and smollm2_path.stem in str(e.value)
    with pytest.raises(InvalidModelFile, match="not an embedding model") as error:
        LlamaCppEmbedder(smollm2_path)  # the engine itself reads the file's pooling, not its name
    assert str(smollm2_path) in str(error.value)
    with pytest.raises(InvalidParameter) as e:
        slm.api.load_embedding(str(minilm_path), engine="llamacpp")
    assert e.value.field == "engine" and "slm convert" in str(e.value)
    with pytest.raises(InvalidParameter) as e:
        slm.api.load_embedding(str(gguf_path), engine="transformers")
    assert e.value.field == "engine"


def test_slm_embed_on_the_gguf(minilm_llamacpp: EmbeddingModel, minilm_home: Path) -> None:
    env = {**os.environ, "SLM_HOME": str(minilm_home)}
    command = [sys.executable, "-m", "slm", "embed", "minilm-q8_0", *SENTENCES[:2], "--threads", "1", "--json"]
    shown = json.loads(subprocess.run(command, capture_output=True, text=True, timeout=300, check=True,
                                      env=env).stdout)
    assert shown["model"] == "minilm-q8_0" and shown["dimensions"] == 384
    assert cosines(np.array(shown["embeddings"]), minilm_llamacpp.embed(SENTENCES[:2]).vectors).min() >= 0.99999
    refused = subprocess.run([sys.executable, "-m", "slm", "embed", "minilm-q8_0", LONG], capture_output=True,
                             text=True, timeout=300, env=env)
    assert refused.returncode == 2 and "input[0]" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def server(minilm_home: Path, gguf_path: Path) -> Iterator[Server]:
    workdir = minilm_home.parent / "minilm-gguf-serve"
    workdir.mkdir()
    (workdir / "home").symlink_to(minilm_home, target_is_directory=True)  # the server's SLM_HOME
    with Server(workdir, "minilm-q8_0", *SERVE_ARGS) as s:
        yield s
        assert_no_traceback(s)


def test_openai_sdk_embeds_on_llamacpp(server: Server, minilm_llamacpp: EmbeddingModel) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    expected = minilm_llamacpp.embed(SENTENCES[:3])
    reply = client.embeddings.create(model="minilm-q8_0", input=SENTENCES[:3])
    assert [d.index for d in reply.data] == [0, 1, 2] and reply.usage.prompt_tokens == expected.prompt_tokens
    assert cosines(np.array([d.embedding for d in reply.data]), expected.vectors).min() >= 0.99999
    models = {m.id: m for m in client.models.list().data}
    assert models["minilm-q8_0"].capabilities == ["embedding"]  # type: ignore[attr-defined]
    response = httpx.post(f"{server.url}/v1/embeddings", json={"model": "minilm-q8_0", "input": ["ok", LONG]},
                          timeout=60)
    assert response.status_code == 400 and "input[1]" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model="minilm-q8_0", messages=[{"role": "user", "content": "Hi"}])
