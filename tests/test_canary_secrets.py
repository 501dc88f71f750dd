"""Secrets come from a key file by default; the seed-only mode is an explicit, warned opt-in; a start
that fails leaves no key file behind (ortho_train/datamodule.py, train.py)."""
import json
import stat
from pathlib import Path

import pytest
import torch

from ortho_train.datamodule import SEED_ONLY_WARNING, CanaryDataModule
from ortho_train.settings import SettingError
from train import main

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(seq_len=64, secret_length=4, num_member_canaries=2, num_holdout_canaries=4, num_reference_secrets=20)


def test_the_key_file_mode_needs_its_file_and_the_seed_mode_takes_none(tmp_path):
    with pytest.raises(SettingError, match=r"data.canary_key_file=null: the secrets come from a key file"):
        CanaryDataModule(**SMALL)
    with pytest.raises(SettingError, match=r"with data.canary_secrets=seed: the seed-only mode reads no key"):
        CanaryDataModule(**SMALL, canary_secrets="seed", canary_key_file=str(tmp_path / "k"))
    with pytest.warns(UserWarning, match="anyone with this run's config.yaml can regenerate them"):
        seeded = CanaryDataModule(**SMALL, canary_secrets="seed")
    assert seeded.canary_record["canary_settings"]["canary_secrets"] == "seed"
    keyed = CanaryDataModule(**SMALL, canary_key_file=str(tmp_path / "k"))
    assert keyed.canary_record["canary_settings"]["canary_secrets"] == "key_file"


def _train(workdir: Path, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.chdir(workdir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = main(["fit", "--config", str(REPO / "configs/tiny.yaml"), "--trainer.enable_progress_bar=false",
                       "--data.canary_key_file=null", *args])
    finally:
        torch.set_num_threads(threads)
    return status, capsys.readouterr().err


def test_a_config_without_a_key_file_gets_one_beside_its_runs(tmp_path, monkeypatch, capsys):
    status, _ = _train(tmp_path, monkeypatch, capsys, "--trainer.max_steps=14")
    assert status == 0
    key = tmp_path / "runs/tiny/canary.key"
    assert key.is_file() and stat.S_IMODE(key.stat().st_mode) == 0o600
    config = (tmp_path / "runs/tiny/version_0/config.yaml").read_text()
    assert "canary_key_file: runs/tiny/canary.key" in config and "canary_secrets: key_file" in config


def test_a_failed_start_leaves_no_key_file(tmp_path, monkeypatch, capsys):
    status, err = _train(tmp_path, monkeypatch, capsys, "--data.batch_size=100000")
    assert status == 2 and "data.batch_size=100000" in err.strip().splitlines()[-1]
    assert not (tmp_path / "runs/tiny/canary.key").exists()


def test_the_seed_only_mode_is_warned_in_the_log_and_recorded_in_the_summary(tmp_path, monkeypatch, capsys):
    with pytest.warns(UserWarning) as warned:  # on a console: stderr
        status, _ = _train(tmp_path, monkeypatch, capsys, "--trainer.max_steps=14", "--data.canary_secrets=seed")
    assert status == 0 and any(str(w.message) == SEED_ONLY_WARNING for w in warned)
    summary = json.loads((tmp_path / "runs/tiny/version_0/summary.json").read_text())
    assert summary["canary_settings"]["canary_secrets"] == "seed"
    assert not (tmp_path / "runs/tiny/canary.key").exists()
