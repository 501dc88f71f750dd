"""Atomic artifact writes: write to a temporary sibling, then rename.

A crash or a bad input mid-write never leaves a half-written file or directory in place of a
good one: readers see the old artifact or the new one, nothing in between. `atomic_artifacts`
extends this to a set (an adapter and a merged model, say): all of it lands or none. Artifacts
get ordinary permissions (the process umask), not the private mode of a temporary file.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _json_safe(value: Any) -> Any:
    """NaN/inf become None (JSON has no NaN); everything else passes through."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def to_json(obj: Any) -> str:
    """`obj` as the indented JSON every artifact uses (NaN/inf as null)."""
    return json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n"


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON to `path` atomically; returns the path."""
    return write_text_atomic(path, to_json(obj))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shared_mode(directory: bool) -> int:
    """The mode an ordinary file or directory gets under the process umask (tempfile's are private)."""
    return (0o777 if directory else 0o666) & ~_umask()


def write_text_atomic(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write `text` to `path` atomically with `mode` (default: an ordinary file's mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, shared_mode(directory=False) if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block succeeds.

    Usage: `with atomic_directory(out) as tmp: model.save_pretrained(tmp)`.
    """
    with atomic_artifacts(Path(path).parent, [Path(path).name]) as staged:
        staged[0].mkdir()
        yield staged[0]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_artifacts(directory: str | Path, names: list[str]) -> Iterator[list[Path]]:
    """Stage several artifacts of `directory`; when the block succeeds all replace their
    targets, otherwise none does, and no temporary survives either way.

    Yields one staging path per name (write a file or a directory there; a name left unwritten
    keeps its old artifact). The old artifacts are moved aside within `directory` (a
    same-directory rename never needs write access to a moved directory) and put back if any
    rename fails.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=directory, prefix=".staging.", suffix=".tmp"))
    try:
        yield [stage / name for name in names]
        _swap_in(stage, directory, names)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _share(path: Path) -> None:
    """Ordinary permissions for `path` and everything under it (some writers create 0600 files)."""
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, shared_mode(directory=item.is_dir()))


def _swap_in(stage: Path, directory: Path, names: list[str]) -> None:
    moved: list[tuple[Path, Path | None]] = []  # (target, its old artifact moved aside or None)
    try:
        for name in names:
            source, target = stage / name, directory / name
            if not source.exists():
                continue
            _share(source)
            aside = None
            if target.exists() or target.is_symlink():
                aside = directory / f".{name}.{stage.name}.old"
                os.replace(target, aside)
            moved.append((target, aside))
            os.replace(source, target)
    except BaseException:
        for target, aside in reversed(moved):  # target: the new artifact, or nothing if its rename failed
            if target.exists() or target.is_symlink():
                _remove(target)
            if aside is not None:
                os.replace(aside, target)
        raise
    for _, aside in moved:
        if aside is not None:  # best effort: the new artifacts are in place already
            shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink(missing_ok=True)
