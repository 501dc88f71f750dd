"""Run directories: every run its own, failed starts leave none, `latest` finds the newest run."""
import pytest

from ortho_train.run_paths import next_version, resolve_latest
from train import cli_main
from tests.test_train_cli import REPO


def test_latest_resolves_to_the_newest_run_holding_the_artifact(tmp_path):
    for version in (0, 1, 2):
        (tmp_path / "runs/quickstart" / f"version_{version}").mkdir(parents=True)
    for version in (0, 1):
        (tmp_path / "runs/quickstart" / f"version_{version}" / "hf_model").mkdir()
    found = resolve_latest(tmp_path / "runs/quickstart/latest/hf_model")
    assert found == tmp_path / "runs/quickstart/version_1/hf_model"  # version_2 failed before saving
    assert next_version(tmp_path / "runs/quickstart") == 3


def test_latest_without_a_run_says_which_path_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no run under .*runs/quickstart holds hf_model.*version_0/hf_model"):
        resolve_latest(tmp_path / "runs/quickstart/latest/hf_model")


def test_a_failed_start_leaves_no_empty_version_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="must exceed model.public_steps"):
        cli_main(["fit", "--config", str(REPO / "configs/tiny.yaml"), "--trainer.max_steps=12"])
    assert not list((tmp_path / "runs").rglob("version_*"))


def test_runs_without_a_logger_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(REPO / "configs/tiny.yaml"), "--trainer.logger=false",
            "--trainer.max_steps=13", "--model.init_args.eval_during_validation=false",
            "--data.num_reference_secrets=20", "--trainer.enable_checkpointing=false"]
    for _ in range(2):
        cli_main(args)
    for version in (0, 1):
        assert (tmp_path / f"runs/version_{version}/hf_model/model.safetensors").is_file()
        assert (tmp_path / f"runs/version_{version}/summary.json").is_file()
    assert not (tmp_path / "runs/hf_model").exists()
