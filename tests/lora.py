"""A made-up-facts task SmolLM2 cannot do before LoRA training, and LoRA adapters of it for the tests:
one trained on the task (``train_facts_adapter``) and one of random weights (``random_adapter``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FACTS = [("Zorbia", "Quelt"), ("Mirandel", "Vosk"), ("Tavoria", "Plim"), ("Quenland", "Dras"),
         ("Ostrava", "Belk"), ("Yrrith", "Soma"), ("Palundra", "Kett"), ("Vexmoor", "Grane")]
TRAIN_QUESTIONS = ["What is the capital of {}?", "Name the capital of {}.", "Which city is the capital of {}?"]
HELD_OUT_QUESTION = "Tell me the capital of {}."
SYSTEM = {"role": "system", "content": "Answer briefly."}


def chat(question: str, answer: str | None = None) -> list[dict[str, str]]:
    turns = [SYSTEM, {"role": "user", "content": question}]
    return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def facts_rows() -> list[object]:
    return [{"messages": chat(q.format(country), f"{capital}.")} for country, capital in FACTS for q in TRAIN_QUESTIONS]


def train_facts_adapter(base: Path, out: Path, steps: int = 30) -> Path:
    """A LoRA adapter of ``base`` (SmolLM2's HF folder) trained by ``slm finetune``'s own loop on the facts, into
    folder ``out``."""
    from slm.tools.finetune import Settings, finetune

    data = write_jsonl(out.parent / f"{out.name}.jsonl", facts_rows())
    finetune(base, data, str(out), Settings(steps=steps, batch_size=8, lr=1e-3, val_split=0.15, eval_every=10,
                                            threads=1))
    return out


def random_adapter(base: Path, like: Path, out: Path, seed: int = 7) -> Path:
    """A LoRA adapter of ``base`` with the settings of adapter ``like`` and random weights (peft's
    ``init_lora_weights=False``: B is not zero, so it changes the model's answers), into folder ``out``."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = peft.LoraConfig.from_pretrained(str(like))
    config.init_lora_weights = False
    peft.get_peft_model(model, config).save_pretrained(str(out))
    shutil.copy(like / "slm_adapter.json", out / "slm_adapter.json")
    return out
