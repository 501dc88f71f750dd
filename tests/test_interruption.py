"""SIGTERM, Ctrl-C and a full disk lose nothing: model and summary on disk, non-zero exit, and the
printed resume command ends with the uninterrupted run's numbers.

Each stopped run is a fresh `train.py` process (configs/tiny.yaml, 8 steps, a checkpoint every 2)
that stops itself after 5 optimiser steps (`tests/resume_helpers.py`): by a signal, as `timeout`
or Ctrl-C would send it, or by a file-size limit that the step-6 checkpoint does not fit (a disk
filling up mid-run, without root). The resume command printed by the stopped run is then run as
printed (its arguments, in the test's own process), from the run's own saved config. The
uninterrupted run (module fixture) shares the stopped runs' canary key, thread count and machine,
so the resumed numbers must equal it exactly (wall-clock entries aside), as in tests/test_resume.py.
The slow test does the same for a LoRA unlearning run (configs/unlearn_lora_npo_gdr.yaml, 6 steps).
"""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.in_process import fit_in_this_process
from tests.resume_helpers import (REPO, checkpoint_every, file_size_limit, results, signaller, train,
                                  train_in_this_process, write_config)

STOP_AFTER = 5  # the helpers act at the start of step 6, which completes before the run stops
LIMIT = 400_000  # bytes: the model (~151 kB) fits, a canary-phase checkpoint (~647 kB) does not


def _config(*extra_callbacks: dict) -> dict:
    """configs/tiny.yaml, 8 steps (3 public), validation at 4 and 8 (two batches), 50 reference
    secrets, a checkpoint every 2 steps."""
    config = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    config["trainer"].update(max_steps=8, val_check_interval=4, limit_val_batches=2, num_sanity_val_steps=0)
    config["trainer"]["callbacks"] = [checkpoint_every(2), *extra_callbacks]
    config["model"]["init_args"].update(public_steps=3, eval_during_validation=False)
    config["data"].update(num_reference_secrets=50)
    return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The uninterrupted run's directory (its canary key lies in `runs/tiny/` beside it)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train_in_this_process(workdir, write_config(workdir / "run.yaml", _config()))
    return workdir / "runs/tiny/version_0"


def _stop(tmp_path: Path, uninterrupted: Path, helper: dict, returncode: int, *args: str) -> tuple[Path, str]:
    """Run `_config(helper)` [args] in a fresh process with the uninterrupted run's canary key;
    check its exit code; (its run directory, its stderr)."""
    (tmp_path / "runs/tiny").mkdir(parents=True)
    shutil.copy2(uninterrupted.parent / "canary.key", tmp_path / "runs/tiny/canary.key")
    stopped = train(tmp_path, write_config(tmp_path / "run.yaml", _config(helper)), *args, returncode=returncode)
    return tmp_path / "runs/tiny/version_0", stopped.stderr


def _resume_as_printed(workdir: Path, stderr: str, run_dir: Path, monkeypatch) -> list[str]:
    """Run the printed resume command (as printed, in this process); returns its arguments. The
    run's saved config names the stopping helper as the subprocess saw it (`resume_helpers.…`)."""
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    printed = [line.removeprefix("resume with: ") for line in stderr.splitlines() if line.startswith("resume with: ")]
    assert len(printed) == 1, stderr[-3000:]
    command = shlex.split(printed[0])
    assert command[0] == "python" and Path(command[1]).name == "train.py" and command[2] == "fit", command
    assert json.loads((run_dir / "summary.json").read_text())["resume_command"] == printed[0]
    fit_in_this_process(workdir, *command[3:])
    assert sorted(p.name for p in (workdir / "runs/tiny").iterdir() if p.is_dir()) == ["version_0"]  # no new version
    return command


def _assert_stopped_run_kept(run_dir: Path, step: int, reason: str) -> dict:
    """A stopped run's summary says so; its model is whole and differs from the public one."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["step"], summary["max_steps"]) == ("interrupted", step, 8)
    assert summary["reason"].startswith(reason) and summary["canary_fingerprint"]
    assert "extraction_rate" not in summary  # no evaluation after a stop
    model = load_file(run_dir / "hf_model/model.safetensors")
    public = load_file(run_dir / "hf_model_pre_canary/model.safetensors")
    assert any(not torch.equal(model[key], public[key]) for key in public)  # canary steps were saved
    assert not (run_dir / "sieve_table.json").exists() and not (run_dir / "roc.json").exists()
    return summary


def _assert_reaches_the_uninterrupted_numbers(resumed: Path, uninterrupted: Path) -> None:
    assert results(resumed / "summary.json") == results(uninterrupted / "summary.json")
    first = load_file(resumed / "hf_model/model.safetensors")
    second = load_file(uninterrupted / "hf_model/model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("signal_name, returncode", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stop_signal_keeps_checkpoint_model_and_summary_and_resumes_to_the_same_numbers(
        tmp_path, uninterrupted, signal_name, returncode, monkeypatch):
    run_dir, stderr = _stop(tmp_path, uninterrupted, signaller(STOP_AFTER, signal_name), returncode)
    summary = _assert_stopped_run_kept(run_dir, STOP_AFTER + 1, signal_name)
    checkpoint = run_dir / f"checkpoints/interrupted-step={STOP_AFTER + 1}.ckpt"
    assert summary["checkpoint"] == str(checkpoint.relative_to(tmp_path))
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["global_step"] == STOP_AFTER + 1  # the step in progress was finished and kept
    if signal_name == "SIGINT":
        assert "Ctrl-C: stopping after the current step" in stderr
    command = _resume_as_printed(tmp_path, stderr, run_dir, monkeypatch)
    assert command[command.index("--ckpt_path") + 1] == summary["checkpoint"]
    assert (run_dir / "metrics_before_resume_0.csv").is_file()  # the rows logged before the stop are kept
    _assert_reaches_the_uninterrupted_numbers(run_dir, uninterrupted)


def test_a_run_without_logger_resumes_in_its_own_directory(tmp_path, uninterrupted, monkeypatch):
    """With `trainer.logger=false` the saved config names the version directory itself as the root:
    its resume command continues there, not in a version directory nested inside it."""
    _, stderr = _stop(tmp_path, uninterrupted, signaller(STOP_AFTER, "SIGTERM"), 143,
                      "--trainer.logger=false", "--trainer.default_root_dir=runs/tiny")
    run_dir = tmp_path / "runs/tiny/version_0"
    _assert_stopped_run_kept(run_dir, STOP_AFTER + 1, "SIGTERM")
    _resume_as_printed(tmp_path, stderr, run_dir, monkeypatch)
    assert not list(run_dir.glob("version_*"))
    _assert_reaches_the_uninterrupted_numbers(run_dir, uninterrupted)


def test_a_signal_during_validation_stops_it_and_resumes_to_the_same_numbers(tmp_path, uninterrupted, monkeypatch):
    """SIGTERM at the first batch of the validation after step 4: Lightning stops it mid-way; the
    checkpoint of step 4 resumes into the rest of it, and training continues exactly."""
    run_dir, stderr = _stop(tmp_path, uninterrupted, signaller(4, "SIGTERM", in_validation=True), 143)
    summary = _assert_stopped_run_kept(run_dir, 4, "SIGTERM")
    assert summary["checkpoint"].endswith("interrupted-step=4.ckpt")
    _resume_as_printed(tmp_path, stderr, run_dir, monkeypatch)
    _assert_reaches_the_uninterrupted_numbers(run_dir, uninterrupted)


def test_a_full_disk_leaves_no_truncated_checkpoint_keeps_model_and_summary_and_resumes(
        tmp_path, uninterrupted, monkeypatch):
    run_dir, stderr = _stop(tmp_path, uninterrupted, file_size_limit(STOP_AFTER, LIMIT), returncode=1)
    checkpoints = run_dir / "checkpoints"
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: no room for checkpoint") and str(checkpoints.resolve()) in last_line, last_line
    needed = (uninterrupted / "checkpoints/step=6.ckpt").stat().st_size  # the same state, written uninterrupted
    assert f"{needed:,} bytes" in last_line and f"{LIMIT:,} bytes are available" in last_line
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step=2.ckpt", "step=4.ckpt"]  # no step=6, no temporary
    for path in checkpoints.iterdir():
        torch.load(path, map_location="cpu", weights_only=False)  # whole
    summary = _assert_stopped_run_kept(run_dir, STOP_AFTER + 1, "disk full")
    assert summary["checkpoint"] == str((checkpoints / "step=4.ckpt").relative_to(tmp_path))
    _resume_as_printed(tmp_path, stderr, run_dir, monkeypatch)
    _assert_reaches_the_uninterrupted_numbers(run_dir, uninterrupted)


def test_a_truncated_checkpoint_is_refused_by_name(tmp_path, uninterrupted):
    """As a full disk under Lightning's own checkpoint IO left it: the first half of a checkpoint
    under its final name. The resume fails before the first step, says what the file is and which
    checkpoints lie beside it, and never suggests weights_only=False."""
    from ortho_train.checkpoint_io import UnreadableCheckpointError

    checkpoints = tmp_path / "runs/tiny/version_0/checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy2(uninterrupted.parent / "canary.key", tmp_path / "runs/tiny/canary.key")
    shutil.copy2(uninterrupted / "checkpoints/step=4.ckpt", checkpoints / "step=4.ckpt")
    whole = (uninterrupted / "checkpoints/step=6.ckpt").read_bytes()
    (checkpoints / "step=6.ckpt").write_bytes(whole[: len(whole) // 2])
    config = write_config(tmp_path / "run.yaml", _config())
    with pytest.raises(UnreadableCheckpointError) as refused:
        train_in_this_process(tmp_path, config, f"--ckpt_path={checkpoints / 'step=6.ckpt'}")
    message = str(refused.value)
    assert "step=6.ckpt" in message and f"{len(whole) // 2:,} bytes" in message and "step=4.ckpt" in message
    assert "weights_only" not in message


@pytest.mark.slow  # ~40 s on a loaded 2-core machine (memorised model, PTQ copies, three runs)
def test_a_stopped_lora_unlearning_run_exports_its_adapter_and_resumes_to_the_same_numbers(
        tmp_path, tmp_path_factory, monkeypatch):
    """SIGTERM after 4 of 6 unlearning steps: checkpoint, adapter and summary.json (no card, no PTQ
    table); the printed command resumes to the uninterrupted run's PTQ gaps and training outcome."""
    from tests.ortho_train.unlearn_helpers import cached_tiny_canary_model
    from tests.test_resume import _unlearn_config

    config = _unlearn_config(cached_tiny_canary_model(tmp_path_factory))
    train_in_this_process(tmp_path, write_config(tmp_path / "plain.yaml", config))
    config["trainer"]["callbacks"].append(signaller(4, "SIGTERM"))
    stopped = train(tmp_path, write_config(tmp_path / "stopped.yaml", config), returncode=143)
    runs = tmp_path / "runs/unlearn_lora_npo_gdr"
    plain, run_dir = runs / "version_0", runs / "version_1"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["step"], summary["reason"]) == ("interrupted", 5, "SIGTERM")
    assert (run_dir / "adapter/adapter_config.json").is_file()
    assert (run_dir / "checkpoints/interrupted-step=5.ckpt").is_file()
    assert not (run_dir / "metrics_card.json").exists() and not (run_dir / "ptq_gap.json").exists()
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    command = shlex.split(stopped.stderr.split("resume with: ")[-1].splitlines()[0])
    fit_in_this_process(tmp_path, *command[3:])
    assert results(run_dir / "ptq_gap.json") == results(plain / "ptq_gap.json")
    assert results(run_dir / "metrics_card.json")["training"] == results(plain / "metrics_card.json")["training"]
