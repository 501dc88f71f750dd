"""Atomic artifact writes: all of a set lands or none does, no temporary survives a failure,
and artifacts get ordinary permissions."""
import os
import stat

import pytest

from ortho_train import artifacts
from ortho_train.artifacts import atomic_artifacts, atomic_directory, write_json_atomic


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
