"""LoRA adapters on the transformers engine: peft's LoRA layers put into the loaded model, and each step's rows
sent through their own adapter in one forward pass.

peft's LoRA layers take ``adapter_names``, one name per batch row (``"__base__"``: the model alone), and add
to each row only its own adapter's update (peft's "mixed adapter batches"). ``PeftModel.forward`` passes it
down with hooks it sets up and removes around each call; the engine calls the transformers model itself (its
own cache and mask), so here one forward pre-hook per LoRA layer, set once at load, hands every call the names
of the current step's rows, or ``"__base__"`` for each row of a call made outside a step.
"""

from __future__ import annotations

import contextlib
import json
import struct
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from slm.errors import InvalidParameter
from slm.store import catalog

BASE = "__base__"
"""peft's name for a row that runs through the model alone."""
WEIGHTS = "adapter_model.safetensors"
WIDTHS = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


class Adapters:
    """The LoRA adapters loaded into one model, and the routing of each step's rows to them."""

    def __init__(self, model: Any, folders: Mapping[str, Path]) -> None:
        """Load every adapter in ``folders`` into ``model`` (changed in place: its adapted Linear layers become
        peft's LoRA layers). InvalidParameter naming the adapter when one does not fit the model."""
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self._peft = attach(model, folders)
        self._rows: list[str] | None = None
        routed: list[Any] = [m for m in model.modules() if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]
        self._hooks = [m.register_forward_pre_hook(self._route, with_kwargs=True) for m in routed]

    def _route(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        # a LoRA layer takes its input first (a Linear: hidden states, an Embedding: ids), one row per sequence
        kwargs["adapter_names"] = self._rows if self._rows is not None else [BASE] * len(args[0])
        return args, kwargs

    @contextlib.contextmanager
    def routed(self, rows: Sequence[str | None]) -> Iterator[None]:
        """Within it, batch row b of each forward pass runs through adapter ``rows[b]`` (None: none)."""
        self._rows = [BASE if name is None else name for name in rows]
        try:
            yield
        finally:
            self._rows = None

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._peft = [], None


def attach(model: Any, folders: Mapping[str, Path]) -> Any:
    """A ``peft.PeftModel`` over ``model`` holding every adapter of ``folders`` under its name (the first one
    active); each is checked to fit the model first, and its weights must fill its layers exactly.
    InvalidParameter("adapters") naming the adapter and the mismatch otherwise."""
    import peft

    configs = {name: _config(name, Path(folder)) for name, folder in folders.items()}
    for name, folder in folders.items():
        check_base(model, name, Path(folder))
    wrapper: Any = None
    for name, folder in folders.items():
        try:
            with warnings.catch_warnings():  # peft asks about gradient checkpointing by a name transformers deprecates
                warnings.simplefilter("ignore", FutureWarning)
                if wrapper is None:
                    wrapper = peft.PeftModel(model, configs[name], adapter_name=name)
                loaded = wrapper.load_adapter(str(folder), adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as e:  # no such module, or a weight of another shape
            raise _unfit(model, name, folder, _first_line(e)) from None
        if loaded.unexpected_keys or loaded.missing_keys:
            keys = loaded.unexpected_keys or loaded.missing_keys
            what = "has weights for no layer of the model" if loaded.unexpected_keys else "lacks the weights of"
            raise _unfit(model, name, folder, f"it {what} {keys[0]} (and {len(keys) - 1} more)")
    assert wrapper is not None, "attach needs at least one adapter"
    wrapper.eval()
    return wrapper


def _config(name: str, folder: Path) -> Any:
    """The adapter's LoRA settings, for inference; a peft method other than plain LoRA is refused (DoRA cannot
    share a batch with other adapters)."""
    import peft

    try:
        config = peft.PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise InvalidParameter("adapters", f"{name}: {folder}/adapter_config.json cannot be read: "
                                           f"{_first_line(e)}") from None
    if not isinstance(config, peft.LoraConfig):
        raise InvalidParameter("adapters", f"{name} is a {config.peft_type} adapter; slm runs LoRA adapters")
    if config.use_dora:
        raise InvalidParameter("adapters", f"{name} is a DoRA adapter; slm runs plain LoRA adapters")
    config.inference_mode = True
    return config


def check_base(model: Any, name: str, folder: Path) -> None:
    """An adapter ``slm finetune`` wrote names the architecture it was trained on: refuse one of another
    architecture before peft touches the model (a peft adapter from elsewhere is checked by its weights)."""
    adapter = catalog.read_adapter(folder)
    have = list(getattr(model.config, "architectures", None) or [type(model).__name__])
    if adapter is not None and adapter.architecture and adapter.architecture not in have:
        raise _unfit(model, name, folder, f"it was trained on {adapter.architecture} and this model is {have[0]}")


def _unfit(model: Any, name: str, folder: Path, why: str) -> InvalidParameter:
    adapter = catalog.read_adapter(folder)
    of = f"a LoRA adapter of {adapter.base}" if adapter is not None else f"the LoRA adapter in {folder}"
    model_name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return InvalidParameter("adapters", f"{name} ({of}) does not fit {Path(model_name).name}: {why}")


def _first_line(error: BaseException) -> str:
    """The part of a peft or torch error that says what is wrong (torch lists every mismatched weight)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("size mismatch"):
            return line
    return lines[0] if lines else type(error).__name__


def adapter_bytes(folder: Path) -> int:
    """What an adapter's weights take in float32 (peft makes half-precision adapter weights float32), read
    from the safetensors header without loading them; the file's size when there is no header to read."""
    path = Path(folder) / WEIGHTS
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return sum(p.stat().st_size for p in Path(folder).glob("adapter_model.*"))
    total = 0
    for key, tensor in header.items():
        if key != "__metadata__":
            count = 1
            for n in tensor["shape"]:
                count *= n
            total += count * max(4, WIDTHS.get(tensor["dtype"], 4))
    return total


def merged(model: Any, name: str, folder: Path) -> Any:
    """``model`` with the adapter in ``folder`` added into its weights: a plain transformers model again."""
    return attach(model, {name: folder}).merge_and_unload(safe_merge=True)
