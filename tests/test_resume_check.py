"""Resuming keeps the run's settings and never overwrites a finished run (ortho_train/resume_check.py)."""
import shutil
from pathlib import Path

import pytest

from ortho_train.resume_check import differing_settings
from train import main

REPO = Path(__file__).resolve().parents[1]


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _resume(workdir: Path, ckpt: Path, *extra: str, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.chdir(workdir)
    status = main(["fit", "--config", str(REPO / "configs/tiny.yaml"), "--trainer.enable_progress_bar=false",
                   f"--ckpt_path={ckpt}", *extra])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return status, lines[-1] if lines else ""


@pytest.fixture
def finished_run(tiny_run, tmp_path):
    """A copy of the session's finished tiny run in a fresh working directory."""
    _, run_dir = tiny_run
    copy = tmp_path / "runs/tiny/version_0"
    shutil.copytree(run_dir, copy)
    shutil.copy2(run_dir.parent / "canary.key", copy.parent / "canary.key")
    return copy


def test_a_finished_run_is_never_overwritten(finished_run, tmp_path, monkeypatch, capsys):
    before = _files(finished_run)
    ckpt = next((finished_run / "checkpoints").glob("*.ckpt"))
    status, last = _resume(tmp_path, ckpt, monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2 and last.startswith("error: ckpt_path=") and "finished" in last
    assert _files(finished_run) == before


def test_other_canaries_on_a_checkpoint_are_refused_naming_the_setting(finished_run, tmp_path, monkeypatch, capsys):
    (finished_run / "summary.json").unlink()  # as a killed run leaves it
    before = _files(finished_run)
    ckpt = next((finished_run / "checkpoints").glob("*.ckpt"))
    status, last = _resume(tmp_path, ckpt, "--data.canary_seed=999", monkeypatch=monkeypatch, capsys=capsys)
    assert status == 2 and "1 differ" in last and "data.canary_seed: 1234 in the run, 999 now" in last, last
    assert f"--config {finished_run / 'config.yaml'}" in last
    assert _files(finished_run) == before


def test_differing_settings_compares_model_data_and_seed_only():
    saved = {"seed_everything": 0, "trainer": {"max_steps": 10}, "model": {"init_args": {"lr": 0.1, "betas": [0.9, 0.95]}},
             "data": {"canary_seed": 1}}
    same_but_trainer = {**saved, "trainer": {"max_steps": 20}}
    assert differing_settings(saved, same_but_trainer) == []
    other = {**saved, "seed_everything": 1, "model": {"init_args": {"lr": 0.2, "betas": [0.9, 0.95]}}}
    assert differing_settings(saved, other) == ["model.init_args.lr: 0.1 in the run, 0.2 now",
                                                "seed_everything: 0 in the run, 1 now"]
    newer = {**saved, "data": {"canary_seed": 1, "canary_secrets": "key_file"}}  # a setting added since the run
    assert differing_settings(saved, newer) == []
