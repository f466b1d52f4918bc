"""``slm merge``: a LoRA adapter added into its base model's weights, written into the store as a Hugging Face
folder of its own.

    merge("smollm2-hf", "facts-lora", "smollm2-facts")   # -> <store>/smollm2-facts

peft's ``merge_and_unload`` over the base folder's model (float32; saved back in the dtype the base was
stored in), its tokenizer files and chat template copied beside the weights: the result runs, serves and
converts by name like any model. It is written to ``<out>.part`` and renamed only when complete, so a failed
write (a full disk) leaves nothing that looks like a model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from slm.errors import EngineUnavailable, InvalidParameter, WriteFailed
from slm.store import catalog
from slm.tools.finetune import output_path

WRITTEN = {"config.json", "generation_config.json", "model.safetensors.index.json"}
"""Files of the base that the merged model's own ``save_pretrained`` writes anew."""


def merge(base: str | Path, adapter: str | Path, out: str, force: bool = False) -> Path:
    """Write ``base`` (a Hugging Face folder) with the LoRA adapter ``adapter`` (a name in the store or a
    folder) added into its weights to ``out`` (a name in the store or a folder path); where it went."""
    model = catalog.resolve(base)
    if model.format != "hf":
        raise InvalidParameter("BASE", f"{model.name} is {model.format}; slm merge writes over a Hugging Face "
                                       f"folder (slm convert {model.name} --to hf writes one)")
    found = catalog.resolve_adapter(adapter)
    target = output_path(out)
    for what, path in (("base model", model.path), ("adapter", found.path)):
        if target.resolve() == path.resolve():
            raise InvalidParameter("--out", f"{target} is the {what} itself; name a new model")
    if target.exists() and not force:
        raise InvalidParameter("--out", f"{target} already exists (--force replaces it)")
    if not target.parent.is_dir():
        raise InvalidParameter("--out", f"{target.parent} is not a folder")
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        from safetensors import SafetensorError
    except ImportError as e:
        raise EngineUnavailable(f"merging needs torch, transformers and peft ({e}); "
                                "pip install 'slm[torch]' (torch's CPU build first)") from None

    from slm.engines.transformers import load_pretrained, quiet
    from slm.engines.transformers_lora import merged

    _, lm = load_pretrained(model.path)
    try:
        lm = merged(lm, found.name, found.path)
    except InvalidParameter as e:  # the engine's message, under this command's flag
        raise InvalidParameter("--adapter", f"{e.reason} (base {model.name})") from None
    work = target.with_name(target.name + ".part")
    _remove(work)
    try:
        with quiet():
            _write(lm, model.path, work)
        _remove(target)
        work.rename(target)
    except (OSError, SafetensorError) as e:
        raise WriteFailed(f"could not write the merged model to {target}: {e}") from None
    finally:
        _remove(work)
    return target


def _write(lm: Any, base: Path, folder: Path) -> None:
    """The merged model's config and safetensors weights (in the base's stored dtype), and every other file of
    the base folder but its weights: tokenizer, chat template, processor settings."""
    stored = _stored_dtype(base)
    if stored is not None:
        lm.to(stored)
    lm.save_pretrained(str(folder))
    for path in sorted(base.iterdir()):
        if path.is_file() and path.suffix not in (".safetensors", ".bin", ".pt") and path.name not in WRITTEN:
            shutil.copy2(path, folder / path.name)


def _stored_dtype(base: Path) -> Any:
    """The torch dtype the base's config.json says its weights are stored in (None: not said)."""
    import torch

    try:
        config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
