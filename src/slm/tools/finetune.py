"""LoRA fine-tuning of a Hugging Face model with peft, on CPU (or a GPU when there is one).

    summary = finetune("smollm2-hf", Path("facts.jsonl"), "facts", Settings(steps=200))

Our own training loop (torch AdamW and a warmup + cosine/linear/constant schedule), not transformers'
Trainer: it computes the vocabulary projection only at the positions that take a loss (a chat or completion
row's prompt costs no lm_head), batches rows of similar length together (sorted within buckets, so little
padding), and checkpoints everything a resumed run needs to continue the same curve: the adapter, the
optimizer and scheduler, the RNG state and the step. The data order is a pure function of the seed and the
epoch, so a resumed run skips to where it was.

Everything is written into ``<store>/NAME.part`` (checkpoints included) and renamed to ``NAME`` when the
adapter is complete. SIGINT (Ctrl-C) stops at the end of the current micro-batch, saves a checkpoint of the
last finished step and raises Interrupted (exit code 130); a second one stops at once, leaving the last
checkpoint as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slm.errors import EngineUnavailable, InvalidModelFile, InvalidParameter, SlmError
from slm.store import catalog
from slm.tools import finetune_batches as batching
from slm.tools import finetune_checkpoint as checkpoints
from slm.tools import finetune_data
from slm.tools.finetune_data import IGNORE

if TYPE_CHECKING:
    import torch

SCHEDULES = ("cosine", "linear", "constant")
MAX_GRAD_NORM = 1.0


class Interrupted(SlmError):
    """Training was stopped by Ctrl-C after saving a checkpoint that ``resume`` continues."""

    exit_code = 130


@dataclass(frozen=True)
class Settings:
    """LoRA and training options; each field is the CLI flag of the same name."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None
    """Module names to adapt; None: every Linear layer inside the decoder blocks, read from the model."""
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup: int | None = None
    """Warmup steps; None: 5% of the steps."""
    epochs: float | None = None
    steps: int | None = None
    """Optimizer steps; overrides ``epochs``. Neither: one epoch."""
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    truncate: bool = True
    val_split: float = 0.1
    eval_every: int = 50
    save_every: int = 100
    seed: int = 0
    threads: int | None = None
    """CPU threads; None: torch's default (all cores). One is faster on a machine busy with other work."""

    def check(self) -> None:
        """InvalidParameter naming the flag of the first value out of range."""
        positive = {"--rank": self.rank, "--alpha": self.alpha, "--lr": self.lr, "--batch-size": self.batch_size,
                    "--grad-accum": self.grad_accum, "--eval-every": self.eval_every,
                    "--save-every": self.save_every}
        for flag, value in positive.items():
            if not value > 0:
                raise InvalidParameter(flag, f"must be positive, not {value}")
        if not 0 <= self.dropout < 1:
            raise InvalidParameter("--dropout", f"must be in [0, 1), not {self.dropout}")
        if not 0 <= self.val_split < 1:
            raise InvalidParameter("--val-split", f"must be a fraction in [0, 1), not {self.val_split}")
        if self.schedule not in SCHEDULES:
            raise InvalidParameter("--schedule", f"must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.steps is not None and self.steps < 1:
            raise InvalidParameter("--steps", f"must be positive, not {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise InvalidParameter("--epochs", f"must be positive, not {self.epochs}")
        if self.warmup is not None and self.warmup < 0:
            raise InvalidParameter("--warmup", f"must be 0 or more, not {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise InvalidParameter("--threads", f"must be positive, not {self.threads}")
        if self.target_modules is not None and not self.target_modules:
            raise InvalidParameter("--target-modules", "names no module")


@dataclass(frozen=True)
class StepReport:
    """What ``on_step`` is told after each optimizer step (and after each validation)."""

    step: int
    total: int
    loss: float
    """Training loss of this step (mean over its label tokens)."""
    tokens_per_second: float
    val_loss: float | None = None
    """Set when this report is a validation."""


@dataclass(frozen=True)
class Summary:
    """What a finished run did; also written into the adapter's ``slm_adapter.json``."""

    output: str
    base: str
    base_path: str
    architecture: str
    data: str
    format: str
    examples: int
    val_examples: int
    truncated: int
    steps: int
    epochs: float
    target_modules: list[str]
    trainable_parameters: int
    settings: dict[str, Any]
    train_loss: float
    val_loss: float | None
    first_val_loss: float | None
    tokens: int
    """Tokens (padding excluded) the model was trained on in this run."""
    seconds: float
    tokens_per_second: float
    resumed_from: int | None = None
    val_history: list[tuple[int, float]] = field(default_factory=list)


def output_path(name: str) -> Path:
    """``--out NAME``: the store's ``NAME`` folder, or a path when it has a folder in it."""
    return Path(name).expanduser() if "/" in name or os.sep in name else catalog.store_dir() / name


def finetune(model: str | Path, data: str | Path, out: str, settings: Settings | None = None, *,
             force: bool = False, resume: bool = False,
             on_step: Callable[[StepReport], None] | None = None,
             on_start: Callable[[dict[str, Any]], None] | None = None) -> Summary:
    """Train a LoRA adapter of ``model`` (a Hugging Face folder) on the JSONL file ``data`` into ``out``.

    ``on_start`` is told the plan (rows, steps, target modules) before the first step, ``on_step`` each step.
    """
    settings = settings or Settings()
    settings.check()
    base = catalog.resolve(model)
    if base.format != "hf":
        raise InvalidParameter("MODEL", f"{base.name} is {base.format}; slm finetune trains a Hugging Face folder "
                                        f"(slm convert {base.name} --to hf writes one)")
    target = output_path(out)
    work = target.with_name(target.name + ".part")
    if target.exists() and not force:
        raise InvalidParameter("--out", f"{target} already exists (--force replaces it)")
    checkpoint = checkpoints.last_checkpoint(work)
    if resume and checkpoint is None:
        raise InvalidParameter("--resume", f"no checkpoint of {out} to resume (looked in {work})")
    if not resume and checkpoint is not None and not force:
        raise InvalidParameter("--out", f"an unfinished run of {out} has a checkpoint in {work} "
                                        "(--resume continues it, --force starts over)")
    if not target.parent.is_dir():
        raise InvalidParameter("--out", f"{target.parent} is not a folder")
    try:
        import peft  # noqa: F401
        import torch
        import transformers
    except ImportError as e:
        raise EngineUnavailable(f"fine-tuning needs torch, transformers and peft ({e}); "
                                "pip install 'slm[torch]' (torch's CPU build first)") from None

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base.path))
    dataset = finetune_data.read(Path(data), tokenizer, settings.max_length, settings.truncate)

    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _train(base, Path(data), target, work, checkpoint, settings, dataset, tokenizer, resume,
                      on_step, on_start)
    finally:
        torch.set_num_threads(threads)


def _train(base: catalog.ResolvedModel, data: Path, target: Path, work: Path, checkpoint: Path | None,
           settings: Settings, dataset: finetune_data.Dataset, tokenizer: Any, resume: bool,
           on_step: Callable[[StepReport], None] | None,
           on_start: Callable[[dict[str, Any]], None] | None) -> Summary:
    import torch
    import transformers

    from slm.engines.transformers import quiet

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, val = batching.split(dataset.examples, settings.val_split, settings.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches_per_epoch = math.ceil(len(train) / settings.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / settings.grad_accum)
    total = settings.steps or max(1, math.ceil((settings.epochs or 1.0) * steps_per_epoch))
    if not train:
        raise InvalidParameter("--val-split", f"leaves none of the {len(dataset.examples)} rows to train on")
    torch.manual_seed(settings.seed)  # the adapter's initial weights
    try:
        with quiet():
            lm = transformers.AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32)
        torch.nn.Module.to(lm, device)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidModelFile(f"{base.path} could not be loaded by transformers: {e}") from None
    modules = list(settings.target_modules or decoder_linear_names(lm))
    with warnings.catch_warnings():  # peft asks about gradient checkpointing by a name transformers deprecates
        warnings.simplefilter("ignore", FutureWarning)
        model_ = _with_lora(lm, settings, modules)
    trainable = [p for p in model_.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    warmup = settings.warmup if settings.warmup is not None else total // 20
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings.schedule, warmup, total))
    fingerprint = {**asdict(settings), "base": str(base.path), "data": str(data.resolve()), "total_steps": total,
                   "target_modules": modules}

    step, resumed_from = 0, None
    val_history: list[tuple[int, float]] = []
    if resume:
        assert checkpoint is not None
        step, val_history = checkpoints.load(checkpoint, model_, optimizer, scheduler, fingerprint)
        resumed_from = step
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)

    if on_start is not None:
        on_start({"examples": len(train), "val_examples": len(val), "format": dataset.format,
                  "truncated": dataset.truncated, "total_steps": total, "step": step, "target_modules": modules,
                  "trainable_parameters": sum(p.numel() for p in trainable), "device": str(device)})
    forward = _loss_function(lm)
    batches = batching.micro_batches(train, settings.batch_size, settings.seed, pad, device,
                                     start=step * settings.grad_accum)

    def evaluate() -> float:
        model_.eval()
        with torch.no_grad():
            loss, count = 0.0, 0
            for chunk in batching.ordered_batches(val, settings.batch_size, pad, device):
                value, n = forward(*chunk)
                loss, count = loss + float(value), count + n
        model_.train()
        return loss / max(count, 1)

    first_val = None
    if val and step == 0:
        first_val = evaluate()
        val_history.append((0, first_val))
        if on_step is not None:
            on_step(StepReport(0, total, math.nan, 0.0, first_val))
    elif val_history:
        first_val = val_history[0][1]

    stop = checkpoints.StopFlag()
    started, tokens, loss_value = time.perf_counter(), 0, math.nan
    rng_at_step = torch.get_rng_state()
    model_.train()
    with stop.installed():
        while step < total:
            window = [next(batches) for _ in range(settings.grad_accum)]
            labelled = sum(int((b[1][:, 1:] != IGNORE).sum()) for b in window)
            loss_sum = 0.0
            for ids, labels, mask in window:
                value, _ = forward(ids, labels, mask)
                (value / max(labelled, 1)).backward()
                loss_sum += float(value.detach())
                tokens += int(mask.sum())
                if stop.requested:
                    break
            if stop.requested:  # the window is not finished: the checkpoint is of the last whole step
                optimizer.zero_grad(set_to_none=True)
                torch.set_rng_state(rng_at_step)
                checkpoints.save(work, model_, optimizer, scheduler, step, val_history, fingerprint)
                raise Interrupted(f"interrupted at step {step} of {total}; the checkpoint is in {work}: "
                                  "the same command with --resume continues it")
            torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            rng_at_step = torch.get_rng_state()
            loss_value = loss_sum / max(labelled, 1)
            speed = tokens / (time.perf_counter() - started)
            if on_step is not None:
                on_step(StepReport(step, total, loss_value, speed))
            if val and (step % settings.eval_every == 0 or step == total):
                val_history.append((step, evaluate()))
                if on_step is not None:
                    on_step(StepReport(step, total, loss_value, speed, val_history[-1][1]))
            if step % settings.save_every == 0 and step < total:
                checkpoints.save(work, model_, optimizer, scheduler, step, val_history, fingerprint)
    seconds = time.perf_counter() - started

    summary = Summary(
        output=str(target), base=base.name, base_path=str(base.path.resolve()),
        architecture=(lm.config.architectures or [type(lm).__name__])[0], data=str(data), format=dataset.format,
        examples=len(train), val_examples=len(val), truncated=dataset.truncated, steps=step,
        epochs=round(step * settings.grad_accum / max(batches_per_epoch, 1), 3), target_modules=modules,
        trainable_parameters=sum(p.numel() for p in trainable), settings=asdict(settings), train_loss=loss_value,
        val_loss=val_history[-1][1] if val_history else None, first_val_loss=first_val, tokens=tokens,
        seconds=round(seconds, 2), tokens_per_second=round(tokens / seconds, 1) if seconds else 0.0,
        resumed_from=resumed_from, val_history=val_history,
    )
    _finish(work, target, model_, summary, lm.config.model_type)
    return summary


def decoder_linear_names(lm: torch.nn.Module) -> list[str]:
    """The names of the Linear layers inside the model's repeated blocks (``model.layers.3.self_attn.q_proj``
    -> ``q_proj``), as the model is built: the projections LoRA usually adapts, never the lm_head."""
    import torch

    names = []
    for name, module in lm.named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and any(p.isdigit() for p in parts[:-1]) \
                and parts[-1] not in names:
            names.append(parts[-1])
    if not names:
        raise InvalidParameter("--target-modules", f"{type(lm).__name__} has no Linear layer inside numbered "
                                                   "blocks; name the modules to adapt")
    return names


def _with_lora(lm: Any, settings: Settings, modules: list[str]) -> Any:
    import peft

    present = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
    missing = [m for m in modules if m not in present]
    if missing:
        raise InvalidParameter("--target-modules", f"{type(lm).__name__} has no module named "
                                                   f"{', '.join(missing)}")
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=modules, task_type="CAUSAL_LM", bias="none")
    return peft.get_peft_model(lm, config)


def _loss_function(lm: Any) -> Callable[..., tuple[torch.Tensor, int]]:
    """(ids, labels, mask) -> (summed cross-entropy of the next-token predictions, tokens counted), computing
    the vocabulary projection only where a label is set."""
    import torch

    backbone = getattr(lm, lm.base_model_prefix)
    head = lm.get_output_embeddings()
    plain = getattr(lm.config, "final_logit_softcapping", None) is None and \
        getattr(lm.config, "logit_scale", None) is None  # otherwise the model's own head has more to do

    def forward(ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at t
        keep = targets != IGNORE
        if plain:
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
            logits = head(hidden[:, :-1][keep])  # (N, V)
        else:
            logits = lm(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss, int(keep.sum())

    return forward


def _schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning rate's factor at each step: linear warmup, then cosine or linear decay to 0, or constant."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def _finish(work: Path, target: Path, model: Any, summary: Summary, model_type: str) -> None:
    """Write the adapter into ``work`` and rename it to ``target`` (replacing one only after it is complete)."""
    model.save_pretrained(str(work))
    info = {"kind": "lora", "base": {"name": summary.base, "path": summary.base_path,
                                     "architecture": summary.architecture, "model_type": model_type},
            "training": asdict(summary)}
    (work / catalog.ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    for name in (checkpoints.CHECKPOINT, checkpoints.CHECKPOINT + ".old", checkpoints.CHECKPOINT + ".new"):
        shutil.rmtree(work / name, ignore_errors=True)
    if target.exists():
        replaced = target.with_name(target.name + ".old")
        shutil.rmtree(replaced, ignore_errors=True)
        target.rename(replaced)
        work.rename(target)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        work.rename(target)
