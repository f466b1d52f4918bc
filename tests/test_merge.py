"""`slm merge`: the facts adapter added into SmolLM2's weights through the real CLI is a model of its own in the
store, whose greedy answers equal peft's greedy over the base and the adapter, and which `slm convert --to gguf`
takes like any model; bad input is one line, exit 2, and leaves nothing in the store (a full disk included)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lora import FACTS
from slm.cli import main
from slm.engines.llamacpp import LlamaCppEngine
from slm.engines.transformers import TransformersEngine
from slm.store import catalog
from test_cli import one_line_error
from test_lora_transformers import SMALL, engine_greedy, peft_greedy, prompt_ids, tiny

pytestmark = pytest.mark.filterwarnings(  # peft on transformers 5
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture
def store(converted_home: Path, facts_adapter: Path, random_lora: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The shared store of the converted fixtures, left as it was found (other tests list its models)."""
    monkeypatch.setenv("SLM_HOME", str(converted_home))
    models = converted_home / "models"
    before = set(models.iterdir())
    yield models
    for path in set(models.iterdir()) - before:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def contents(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir())


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """`slm ARGS` in this process: exit 2 and one `error:` line on stderr (returned)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:"), captured
    return lines[0]


def test_the_merged_model_answers_as_peft_does(store: Path, smollm2_hf_path: Path, facts_adapter: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import peft

    capsys.readouterr()
    main(["merge", "smollm2-hf", "--adapter", "facts-lora", "--out", "smollm2-facts"])
    assert capsys.readouterr().out.strip() == 'facts-lora merged into smollm2-hf: slm run smollm2-facts "..."'
    merged = catalog.resolve("smollm2-facts")
    assert merged.format == "hf" and "smollm2-facts" in [m.name for m in catalog.stored_models()]
    assert {p.name for p in smollm2_hf_path.iterdir()} == {p.name for p in merged.path.iterdir()}
    assert not list(store.glob("*.part"))

    base = AutoModelForCausalLM.from_pretrained(str(smollm2_hf_path), dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(base, str(facts_adapter)).eval()
    engine = TransformersEngine(merged.path, n_ctx=512, threads=1, max_sequences=1)
    try:
        assert engine.info.chat_template is not None and "im_start" in engine.info.chat_template  # the base's
        right = 0
        for country, capital in FACTS:
            ids = prompt_ids(engine.tokenizer, country)
            ours, theirs = engine_greedy(engine, None, ids), peft_greedy(reference, ids)
            assert len(theirs) >= 3 and ours[: len(theirs)] == theirs, country
            right += capital in engine.detokenize(ours)
        assert right >= 6, right
    finally:
        engine.close()

    # like any Hugging Face folder in the store: `slm convert --to gguf` (llama.cpp then answers the facts too)
    main(["convert", "smollm2-facts", "--to", "gguf"])
    gguf = LlamaCppEngine(store / "smollm2-facts-q8_0.gguf", n_ctx=256, threads=1, max_sequences=1)
    try:
        country, capital = FACTS[0]
        seq = gguf.new_sequence()
        logits = gguf.evaluate([(seq, prompt_ids(engine.tokenizer, country))])[0]
        answer = []
        for _ in range(4):
            answer.append(int(np.argmax(logits)))
            logits = gguf.evaluate([(seq, answer[-1:])])[0]
        assert capital in gguf.detokenize(answer)
    finally:
        gguf.close()

    # an existing model is replaced only with --force
    line = refused(capsys, "merge", "smollm2-hf", "--adapter", "facts-lora", "--out", "smollm2-facts")
    assert "smollm2-facts already exists (--force replaces it)" in line
    main(["merge", "smollm2-hf", "--adapter", "random-lora", "--out", "smollm2-facts", "--force"])
    assert not list(store.glob("*.part")) and catalog.resolve("smollm2-facts").format == "hf"


def test_bad_input_is_one_line_and_leaves_nothing(store: Path, smollm2_hf_path: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    before = contents(store)
    llama = tiny(tmp_path / "tiny-llama", LlamaConfig(**SMALL), smollm2_hf_path)
    cases = [
        (["smollm2", "--adapter", "facts-lora"], ["smollm2 is gguf", "slm convert smollm2 --to hf"]),
        (["smollm2-hf", "--adapter", "nope"], ["no adapter named 'nope'"]),
        ([str(llama), "--adapter", "facts-lora"], ["--adapter: facts-lora (a LoRA adapter of smollm2-hf) does not fit "
                                                   "tiny-llama: size mismatch", "(base tiny-llama)"]),
        (["smollm2-hf", "--adapter", "facts-lora", "--out", "smollm2-hf"], ["is the base model itself"]),
    ]
    for args, needles in cases:
        out = args[args.index("--out") + 1] if "--out" in args else "merged"
        line = refused(capsys, "merge", *args, *([] if "--out" in args else ["--out", out]))
        for needle in needles:
            assert needle in line, line
        assert contents(store) == before, args


def test_a_full_disk_leaves_nothing(store: Path, converted_home: Path) -> None:
    """The merged weights (about 540 MB) on a disk that takes 20 MB: WriteFailed, and no folder, whole or part."""
    before = contents(store)

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))

    slm_bin = Path(sys.executable).parent / "slm"
    result = subprocess.run([str(slm_bin), "merge", "smollm2-hf", "--adapter", "facts-lora", "--out", "full"],
                            capture_output=True, text=True, timeout=300, preexec_fn=small_disk,
                            env={**os.environ, "SLM_HOME": str(converted_home)})
    one_line_error(result, "could not write the merged model to", "full")
    assert contents(store) == before
