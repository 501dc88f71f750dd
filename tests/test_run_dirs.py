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


@pytest.mark.parametrize("logger", ["default", "false"])
def test_a_setting_refused_while_building_leaves_no_version_directory(tmp_path, monkeypatch, logger):
    """A callback setting refused while the classes are built (after the run's directory was
    reserved) leaves nothing behind either."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(REPO / "configs/tiny.yaml"), "--trainer.callbacks+=ortho_callbacks.sieve.SieveCallback",
            "--trainer.callbacks.calibration_batches=0"] + (["--trainer.logger=false"] if logger == "false" else [])
    with pytest.raises((ValueError, SystemExit)):
        cli_main(args)
    assert not list(tmp_path.rglob("version_*"))


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


def test_runs_started_together_get_their_own_version(tmp_path, monkeypatch):
    # Two runs that both saw "version_3 is the next free one" (the race of two launches in the
    # same second) must still end in two directories: the reservation is a mkdir.
    from concurrent.futures import ThreadPoolExecutor

    import ortho_train.run_paths as run_paths

    root = tmp_path / "runs/dp_dual"
    (root / "version_2").mkdir(parents=True)
    monkeypatch.setattr(run_paths, "next_version", lambda _root: 3)  # both see the same "next" N
    reserved = []

    def launch(_):
        monkeypatch.delenv(run_paths.RESERVED_ENV, raising=False)  # each launch is its own process
        reserved.append(run_paths.reserve_version(root))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(launch, range(2)))
    assert sorted(reserved) == [3, 4] and (root / "version_3").is_dir() and (root / "version_4").is_dir()


def test_ddp_ranks_reuse_the_launchers_reservation(tmp_path, monkeypatch):
    from ortho_train.run_paths import RESERVED_ENV, reserve_version

    monkeypatch.delenv(RESERVED_ENV, raising=False)
    monkeypatch.delenv("NODE_RANK", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    root = tmp_path / "runs/tiny"
    first = reserve_version(root)  # the launching process (rank 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank re-launched with the launcher's environment
    assert reserve_version(root) == first
    assert reserve_version(tmp_path / "runs/other") == 0  # another root: its own reservation
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert reserve_version(root) == first + 1  # the launcher's next run in the same process
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1"]
