"""Checkpoints of ``slm finetune`` in its working folder, and the Ctrl-C that asks for one.

A checkpoint is everything a resumed run needs to continue the same curve: the adapter's weights, the
optimizer's and the scheduler's state, the RNG state, the step, the validation losses so far, and the
settings it was made with (a resumed run with others is refused, by the first that differs).
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slm.errors import InvalidParameter

if TYPE_CHECKING:
    import torch

CHECKPOINT = "checkpoint"


class StopFlag:
    """SIGINT sets ``requested`` while installed (the loop stops at a safe point); a second SIGINT raises
    KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Catch SIGINT in this block (signals reach the main thread only: elsewhere, nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def last_checkpoint(work: Path) -> Path | None:
    """The newest complete checkpoint in ``work`` (the old one if a save was cut between its two renames)."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        if (work / name / "state.pt").is_file():
            return work / name
    return None


def save(work: Path, model: Any, optimizer: Any, scheduler: Any, step: int,
                     val_history: list[tuple[int, float]], fingerprint: dict[str, Any]) -> None:
    """Write the checkpoint beside the last one, then swap them, so a crash mid-save keeps the last intact."""
    import peft
    import torch
    from safetensors.torch import save_file

    fresh, current, old = work / (CHECKPOINT + ".new"), work / CHECKPOINT, work / (CHECKPOINT + ".old")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in peft.get_peft_model_state_dict(model).items()}
    save_file(weights, str(fresh / "adapter_model.safetensors"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "cuda_rng": _cuda_rng(), "val_history": val_history,
                "settings": json.dumps(fingerprint)}, fresh / "state.pt")
    shutil.rmtree(old, ignore_errors=True)
    if current.exists():
        current.rename(old)
    fresh.rename(current)
    shutil.rmtree(old, ignore_errors=True)


def _cuda_rng() -> list[torch.Tensor]:
    import torch

    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def load(checkpoint: Path, model: Any, optimizer: Any, scheduler: Any,
                     fingerprint: dict[str, Any]) -> tuple[int, list[tuple[int, float]]]:
    """Restore a checkpoint into the run; refuse one made with other settings (by the first that differs)."""
    import peft
    import torch
    from safetensors.torch import load_file

    state = torch.load(checkpoint / "state.pt", weights_only=True)
    saved = json.loads(state["settings"])
    for key, value in fingerprint.items():
        if key not in ("eval_every", "save_every", "threads") and saved.get(key) != value:
            raise InvalidParameter("--resume", f"the checkpoint was made with {key} = {saved.get(key)!r}, "
                                               f"not {value!r} (--force starts over)")
    peft.set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if torch.cuda.is_available() and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), [(int(s), float(v)) for s, v in state["val_history"]]
