"""slm finetune: LoRA on SmolLM2-135M learns made-up facts, resumes the same curve, stops cleanly on Ctrl-C,
and names every bad row by its line.

The runs are short (tens of steps on rows of ~25 tokens, one thread: fast on a busy two-core machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lora import FACTS, HELD_OUT_QUESTION, chat, facts_rows, write_jsonl
from slm.cli import main
from slm.errors import InvalidModelFile, InvalidParameter
from slm.tools import finetune_data
from slm.tools.finetune import Interrupted, Settings, StepReport, finetune


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "facts.jsonl", facts_rows())


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf_path: Path):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_hf_path))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLM_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "models").mkdir(parents=True)
    return tmp_path / "home" / "models"


def correct_answers(model, tokenizer) -> int:  # type: ignore[no-untyped-def]
    """How many held-out questions the model answers greedily with the right capital."""
    import torch

    right = 0
    for country, capital in FACTS:
        prompt = tokenizer.apply_chat_template(chat(HELD_OUT_QUESTION.format(country)), add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
        right += capital in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    return right


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft on transformers 5
def test_learns_made_up_facts(smollm2_hf_path: Path, facts_file: Path, tokenizer, home: Path,  # type: ignore[no-untyped-def]
                              capsys: pytest.CaptureFixture[str]) -> None:
    """Validation loss falls and greedy answers to a phrasing never trained on become right."""
    import peft
    import torch
    import transformers

    summary = finetune(smollm2_hf_path, facts_file, "facts",
                       Settings(steps=30, batch_size=8, lr=1e-3, val_split=0.15, eval_every=10, threads=1))
    assert summary.steps == 30 and summary.format == "chat"
    assert summary.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert summary.first_val_loss is not None and summary.val_loss is not None
    assert summary.val_loss < summary.first_val_loss / 3
    adapter = home / "facts"
    written = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "slm_adapter.json"} <= written
    info = json.loads((adapter / "slm_adapter.json").read_text())
    assert info["base"]["architecture"] == "LlamaForCausalLM" and info["training"]["steps"] == 30
    assert not (home / "facts.part").exists()

    torch.set_num_threads(1)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_hf_path), dtype=torch.float32)
    before = correct_answers(base, tokenizer)
    after = correct_answers(peft.PeftModel.from_pretrained(base, str(adapter)), tokenizer)
    assert before <= 1 and after >= before + 5, (before, after)

    # `slm list` shows it with its base; it is not mistaken for a model
    from slm.store import catalog

    assert [(a.name, a.base) for a in catalog.stored_adapters()] == [("facts", summary.base)]
    capsys.readouterr()
    main(["list", "--json"])
    rows = {row["alias"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["facts"]["format"] == "lora" and rows["facts"]["base"] == "smollm2-hf"
    assert "facts" not in [m.name for m in catalog.stored_models()]
    with pytest.raises(InvalidModelFile, match="LoRA adapter of"):
        catalog.resolve("facts")
    # an existing adapter is refused without --force
    with pytest.raises(InvalidParameter, match="already exists"):
        finetune(smollm2_hf_path, facts_file, "facts", Settings(steps=1))


def test_resume_continues_the_same_curve(smollm2_hf_path: Path, facts_file: Path, home: Path) -> None:
    """A run stopped by SIGINT at step 3 and resumed ends where an uninterrupted run with the same seed does."""
    settings = Settings(steps=6, batch_size=4, lr=1e-3, val_split=0.15, eval_every=3, save_every=100, threads=1)
    whole = finetune(smollm2_hf_path, facts_file, "whole", settings)

    def interrupt(report: StepReport) -> None:
        if report.step == 3 and report.val_loss is None:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would: the loop stops at its next safe point

    with pytest.raises(Interrupted, match="--resume"):
        finetune(smollm2_hf_path, facts_file, "split", settings, on_step=interrupt)
    assert (home / "split.part" / "checkpoint" / "state.pt").is_file() and not (home / "split").exists()
    with pytest.raises(InvalidParameter, match="--resume continues"):
        finetune(smollm2_hf_path, facts_file, "split", settings)
    resumed = finetune(smollm2_hf_path, facts_file, "split", settings, resume=True)
    assert resumed.resumed_from == 3 and resumed.steps == whole.steps == 6
    assert resumed.val_history[0] == whole.val_history[0]  # (0, loss before training), kept by the checkpoint
    assert resumed.val_loss == pytest.approx(whole.val_loss, rel=0.02)
    assert resumed.train_loss == pytest.approx(whole.train_loss, rel=0.05)


def test_ctrl_c_saves_a_checkpoint(smollm2_hf_path: Path, facts_file: Path, home: Path) -> None:
    """SIGINT to `slm finetune`: exit 130, one line saying how to resume, and a checkpoint --resume continues."""
    slm_bin = Path(sys.executable).parent / "slm"
    args = [str(slm_bin), "finetune", str(smollm2_hf_path), str(facts_file), "--out", "stopped", "--steps", "8",
            "--batch-size", "4", "--val-split", "0.05", "--eval-every", "1", "--threads", "1"]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "SLM_HOME": str(home.parent)})
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("step 1:"):  # the validation after the first step
            process.send_signal(signal.SIGINT)
            break
    rest = process.stderr.read().strip().splitlines()
    assert process.wait(timeout=120) == 130, lines + rest
    assert len(rest) == 1 and rest[0].startswith("error: interrupted at step ") and "--resume" in rest[0], rest
    step = int(rest[0].split("step ")[1].split()[0])
    assert step >= 1
    resumed = finetune(smollm2_hf_path, facts_file, "stopped",
                       Settings(steps=8, batch_size=4, val_split=0.05, eval_every=1, threads=1), resume=True)
    assert resumed.resumed_from == step and resumed.steps == 8 and (home / "stopped" / "slm_adapter.json").is_file()


# --- the data ---------------------------------------------------------------------------------------------------


def test_loss_only_on_assistant_turns(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    messages = chat("What is the capital of Zorbia?", "Quelt.") + [
        {"role": "user", "content": "And of Vexmoor?"}, {"role": "assistant", "content": "Grane, I think."}]
    data = finetune_data.read(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), tokenizer, 512)
    example = data.examples[0]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    learned = [token for token in example.labels if token != finetune_data.IGNORE]
    assert tokenizer.decode(learned) == "Quelt.<|im_end|>\nGrane, I think.<|im_end|>\n"
    for token, label in zip(example.input_ids, example.labels, strict=True):
        assert label in (token, finetune_data.IGNORE)

    rows = [{"prompt": "Capital of Zorbia:", "completion": " Quelt"}]
    completion = finetune_data.read(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer, 512).examples[0]
    prompt_length = len(tokenizer("Capital of Zorbia:")["input_ids"])
    assert completion.labels[:prompt_length] == [finetune_data.IGNORE] * prompt_length
    assert tokenizer.decode(completion.labels[prompt_length:]) == " Quelt<|im_end|>"
    text = finetune_data.read(write_jsonl(tmp_path / "t.jsonl", [{"text": "Quelt is old."}]), tokenizer, 512)
    assert text.format == "text" and text.examples[0].labels == text.examples[0].input_ids


@pytest.mark.parametrize(("rows", "message"), [
    ([{"text": "fine"}, "{not json"], "bad.jsonl:2: not JSON"),
    ([{"text": "fine"}, [1, 2]], "bad.jsonl:2: a JSON object is needed"),
    ([{"text": "fine"}, {"txt": "typo"}], "bad.jsonl:2: missing field"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "only"}], "bad.jsonl:2: missing field 'completion'"),
    ([{"text": "fine"}, {"text": 3}], "bad.jsonl:2: 'text' must be a string, not int"),
    ([{"messages": chat("q", "a")}, {"messages": [{"role": "user", "content": 1}]}], "bad.jsonl:2: messages\\[0\\]"),
    ([{"messages": chat("q", "a")}, {"messages": chat("no answer")}], "bad.jsonl:2: no assistant message"),
    ([{"text": "fine"}, {"prompt": "a", "completion": "b"}], "bad.jsonl:2: a completion row in a text file"),
    ([], "has no rows"),
])
def test_bad_rows_name_their_line(rows: list[object], message: str, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidParameter, match=message):
        finetune_data.read(write_jsonl(tmp_path / "bad.jsonl", rows), tokenizer, 512)


def test_template_errors_and_long_rows(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    strict = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    strict.chat_template = ("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool role') }}"
                            "{% endif %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}")
    rows = [{"messages": chat("q", "a")}, {"messages": [{"role": "tool", "content": "x"}, *chat("q", "a")]}]
    with pytest.raises(InvalidParameter, match="bad.jsonl:2: the model's chat template cannot render this row: "
                                               "no tool role"):
        finetune_data.read(write_jsonl(tmp_path / "bad.jsonl", rows), strict, 512)

    long = write_jsonl(tmp_path / "long.jsonl", [{"text": "short"}, {"text": "word " * 50}, {"text": "word " * 60}])
    data = finetune_data.read(long, tokenizer, 16)
    assert data.truncated == 2 and max(len(e.input_ids) for e in data.examples) == 16
    with pytest.raises(InvalidParameter, match=r"long.jsonl:2: \d+ tokens, more than --max-length 16"):
        finetune_data.read(long, tokenizer, 16, truncate=False)


def test_cli_bad_input_is_one_line(smollm2_hf_path: Path, home: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "oops"])
    cases = [
        ([str(smollm2_hf_path), str(bad), "--out", "x"], "bad.jsonl:2: not JSON"),
        ([str(smollm2_hf_path), str(tmp_path / "missing.jsonl"), "--out", "x"], "cannot read"),
        ([str(smollm2_hf_path), str(bad), "--out", "x", "--rank", "0"], "--rank: must be positive"),
        ([str(smollm2_hf_path), str(bad), "--out", "x", "--val-split", "1.5"], "--val-split"),
        ([str(smollm2_hf_path), str(bad), "--out", "x", "--resume"], "--resume: no checkpoint"),
        (["smollm2", str(bad), "--out", "x"], "smollm2 is gguf; slm finetune trains a Hugging Face folder "
                                              "(slm convert smollm2 --to hf writes one)"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["finetune", *args])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("error: ") and message in err, err
        assert len(err.splitlines()) == 1, err
    assert list(home.iterdir()) == []  # nothing half-written
