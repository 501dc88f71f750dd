"""Atomic artifact writes: write to a temporary sibling, then rename.

A crash or a bad input mid-write never leaves a half-written file or directory in place of a
good one: readers see the old artifact or the new one, nothing in between. `atomic_artifacts`
extends this to a set (an adapter and a merged model, say): all of it lands or none. Artifacts
get ordinary permissions (the process umask), not the private mode of a temporary file.

The temporary lies in the artifact's own directory, so the rename never crosses a filesystem
(a move across filesystems is a copy, which a full disk truncates under the final name), and its
data are fsynced first. Before a write whose size is known, `ensure_room` compares it with the
room a file has there (free space, capped by the process's file-size limit, `ulimit -f`), and a
write that runs out of room anyway raises `DiskSpaceError` naming the directory and the bytes.
"""
from __future__ import annotations

import errno
import json
import math
import os
import resource
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


class DiskSpaceError(OSError):
    """An artifact does not fit where it goes; the message names the directory and the bytes."""


OUT_OF_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # disk full, file-size limit, quota


def available_bytes(directory: str | Path) -> int:
    """The size a new file in `directory` may reach: the filesystem's free space for this user,
    capped by the process's file-size limit (RLIMIT_FSIZE)."""
    free = shutil.disk_usage(directory).free
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return free if limit == resource.RLIM_INFINITY else min(free, limit)


def ensure_room(directory: str | Path, needed: int, what: str) -> None:
    """Refuse to start writing `what` (`needed` bytes) into `directory` when it cannot fit."""
    available = available_bytes(directory)
    if needed > available:
        raise DiskSpaceError(_no_room(directory, needed, what, f"only {available:,} bytes are available there"))


def _no_room(directory: str | Path, needed: int, what: str, detail: str) -> str:
    size = f"it needs {needed:,} bytes" if needed > 0 else "its size was not known beforehand"
    return (f"no room for {what} in {Path(directory).resolve()}: {size} and {detail} "
            "(free space, or the file-size limit `ulimit -f`); free some space and rerun")


def write_text_atomic(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write `text` to `path` atomically with `mode` (default: an ordinary file's mode)."""
    return write_bytes_atomic(path, text.encode("utf-8"), mode=mode)


def write_bytes_atomic(path: str | Path, data: bytes | memoryview, mode: int | None = None,
                       what: str | None = None) -> Path:
    """Write `data` to `path` atomically (a fsynced temporary beside it, then a rename).

    The room is checked first; a write that runs out of room anyway raises `DiskSpaceError`
    and leaves the old file, if any, in place, and no temporary.
    """
    path = Path(path)
    what = what or path.name
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_room(path.parent, len(data), what)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, shared_mode(directory=False) if mode is None else mode)
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        if error.errno in OUT_OF_ROOM:
            raise DiskSpaceError(_no_room(path.parent, len(data), what,
                                          f"writing it failed ({os.strerror(error.errno)})")) from error
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: some filesystems refuse to fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. some network filesystems: the rename is still atomic, only its durability is unknown
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(path: str | Path, needed: int = 0) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block succeeds.

    Usage: `with atomic_directory(out, needed=weight_bytes(model)) as tmp: model.save_pretrained(tmp)`.
    """
    with atomic_artifacts(Path(path).parent, [Path(path).name], needed=needed) as staged:
        staged[0].mkdir()
        yield staged[0]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_artifacts(directory: str | Path, names: list[str], needed: int = 0) -> Iterator[list[Path]]:
    """Stage several artifacts of `directory`; when the block succeeds all replace their
    targets, otherwise none does, and no temporary survives either way.

    Yields one staging path per name (write a file or a directory there; a name left unwritten
    keeps its old artifact). `needed` (bytes, an estimate of all of them) is checked against the
    room in `directory` first. The staged files are fsynced before they move in. The old
    artifacts are moved aside within `directory` (a same-directory rename never needs write
    access to a moved directory) and put back if any rename fails.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    what = " and ".join(names)
    ensure_room(directory, needed, what)
    stage = Path(tempfile.mkdtemp(dir=directory, prefix=".staging.", suffix=".tmp"))
    try:
        try:
            yield [stage / name for name in names]
        except OSError as error:
            if error.errno in OUT_OF_ROOM and not isinstance(error, DiskSpaceError):
                raise DiskSpaceError(_no_room(directory, needed, what,
                                              f"writing it failed ({os.strerror(error.errno)})")) from error
            raise
        _fsync_tree(stage)
        _swap_in(stage, directory, names)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root` (their data on disk before the renames publish them)."""
    for item in root.rglob("*"):
        if item.is_file() and not item.is_symlink():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())


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
