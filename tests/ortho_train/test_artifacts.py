"""Atomic artifact writes: all of a set lands or none does, no temporary survives a failure,
artifacts get ordinary permissions, and a write without room is refused (before it starts when its
size is known) naming the directory and the bytes."""
import os
import resource
import signal
import stat
from contextlib import contextmanager

import pytest

from ortho_train import artifacts
from ortho_train.artifacts import (DiskSpaceError, atomic_artifacts, atomic_directory, write_bytes_atomic,
                                   write_json_atomic)


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_failing_block_keeps_the_old_set_and_leaves_no_temporary(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "w").write_text("old")
    with pytest.raises(RuntimeError, match="second artifact failed"):
        with atomic_artifacts(tmp_path, ["adapter", "merged"]) as (adapter, merged):
            adapter.mkdir()
            (adapter / "w").write_text("new")
            raise RuntimeError("second artifact failed")
    assert (tmp_path / "adapter" / "w").read_text() == "old" and not (tmp_path / "merged").exists()
    assert _leftovers(tmp_path) == []


def test_a_failing_rename_rolls_back_the_artifacts_already_moved(tmp_path, monkeypatch):
    (tmp_path / "a").write_text("old a")
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("/b"):
            raise PermissionError("b not writable")
        return real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", replace)
    with pytest.raises(PermissionError):
        with atomic_artifacts(tmp_path, ["a", "b"]) as (a, b):
            a.write_text("new a")
            b.write_text("new b")
    assert (tmp_path / "a").read_text() == "old a" and not (tmp_path / "b").exists()
    assert _leftovers(tmp_path) == []


def test_atomic_directory_rename_failure_leaves_no_temporary(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("full disk")))
    with pytest.raises(OSError, match="full disk"):
        with atomic_directory(tmp_path / "hf_model") as tmp:
            (tmp / "f").write_text("x")
    assert list(tmp_path.iterdir()) == []


def test_artifacts_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "hf_model") as tmp:
            (tmp / "model.safetensors").write_bytes(b"w")
            os.chmod(tmp / "model.safetensors", 0o600)  # as safetensors writes it
        path = write_json_atomic(tmp_path / "summary.json", {"a": 1})
    finally:
        os.umask(old)
    for p in (tmp_path / "hf_model", tmp_path / "hf_model" / "model.safetensors", path):
        assert p.stat().st_mode & stat.S_IROTH, f"{p.name} is not readable by others"


@contextmanager
def _file_size_limit(limit):
    """Files this process writes may not grow past `limit` bytes (a write past it fails with EFBIG)."""
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_the_room_counts_the_file_size_limit(tmp_path):
    with _file_size_limit(1000):
        assert artifacts.available_bytes(tmp_path) == 1000
    assert artifacts.available_bytes(tmp_path) > 1000


def test_a_write_without_room_is_refused_before_it_starts_naming_directory_and_bytes(tmp_path, monkeypatch):
    (tmp_path / "model.ckpt").write_bytes(b"old")
    monkeypatch.setattr(artifacts, "available_bytes", lambda directory: 4000)
    with pytest.raises(DiskSpaceError) as refused:
        write_bytes_atomic(tmp_path / "model.ckpt", b"x" * 5000, what="checkpoint model.ckpt")
    message = str(refused.value)
    assert str(tmp_path.resolve()) in message and "5,000 bytes" in message and "4,000" in message
    assert (tmp_path / "model.ckpt").read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_a_write_that_runs_out_of_room_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """The probe said there was room (another process filled the disk meanwhile): the write fails
    with EFBIG half-way, and neither a truncated file nor a temporary is left."""
    (tmp_path / "model.ckpt").write_bytes(b"old")
    monkeypatch.setattr(artifacts, "available_bytes", lambda directory: 10**9)
    with _file_size_limit(2000), pytest.raises(DiskSpaceError) as failed:
        write_bytes_atomic(tmp_path / "model.ckpt", b"x" * 5000)
    assert str(tmp_path.resolve()) in str(failed.value) and "5,000 bytes" in str(failed.value)
    assert (tmp_path / "model.ckpt").read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_a_directory_that_does_not_fit_is_neither_staged_nor_half_written(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "available_bytes", lambda directory: 100)
    with pytest.raises(DiskSpaceError, match="hf_model"):
        with atomic_directory(tmp_path / "hf_model", needed=150_000) as tmp:
            (tmp / "model.safetensors").write_bytes(b"w")
    assert list(tmp_path.iterdir()) == []


def test_a_directory_write_out_of_room_names_the_directory(tmp_path):
    with _file_size_limit(1000), pytest.raises(DiskSpaceError) as failed:
        with atomic_directory(tmp_path / "hf_model") as tmp:
            (tmp / "model.safetensors").write_bytes(b"w" * 5000)
    assert str(tmp_path.resolve()) in str(failed.value)
    assert list(tmp_path.iterdir()) == []
