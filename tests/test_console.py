"""The console of a run: progress, tables and paths; no library advertising, no `Epoch 0/-2`, no
hub-kernel warning (ortho_train/console.py, ortho_kernels/bitsandbytes_offline.py)."""
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from jsonargparse import Namespace

from ortho_train.console import DropTips, StepProgressBar, add_step_progress_bar
from ortho_train.progress_lines import TrainingLines, phase

REPO = Path(__file__).resolve().parents[1]


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, "f", 1, message, None, None)


def test_tips_are_dropped_and_other_messages_kept():
    assert not DropTips().filter(record("💡 Tip: For seamless cloud logging … litlogger"))
    assert DropTips().filter(record("GPU available: False, used: False"))


def test_progress_bar_shows_an_epoch_bound_only_where_there_is_one():
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)  # a run bounded by max_steps
    assert bar._get_train_description(0).strip() == "Epoch 0"
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


def test_the_bar_is_added_unless_turned_off_or_named():
    plain = Namespace(callbacks=[{"class_path": "ortho_callbacks.report.ReportCallback"}], enable_progress_bar=None)
    add_step_progress_bar(plain)
    assert plain.callbacks[-1] == {"class_path": "ortho_train.console.StepProgressBar"}
    off = Namespace(callbacks=None, enable_progress_bar=False)
    add_step_progress_bar(off)
    assert off.callbacks is None
    own = Namespace(callbacks=[Namespace(class_path="lightning.pytorch.callbacks.TQDMProgressBar")],
                    enable_progress_bar=True)
    add_step_progress_bar(own)
    assert len(own.callbacks) == 1


def test_a_tiny_run_prints_progress_and_paths_and_no_chatter(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs/tiny.yaml")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    for chatter in ("💡", "litlogger", "litmodels", "LeafSpec", "gemm_4bit_forward", "/-2"):
        assert chatter not in console, chatter
    assert "Epoch 0" in console and "summary written to" in console and "report written to" in console
    assert "TPR at FPR=0.01" in console  # a warning that matters stays
    # not a terminal (a log file): training progress and the final evaluation as lines with peak memory
    assert re.search(r"\[train\] step \d+/\d+ · [\d.]+ s/step · loss [\d.e+-]+ · peak RSS [\d.]+ GiB", console)
    assert re.search(r"\[final memorisation evaluation .*\] done in \d+ s · peak RSS", console)


def test_training_lines_print_at_most_every_interval_and_at_the_last_step(capsys):
    lines = TrainingLines(every_s=1e9)
    for step in range(1, 11):
        lines.update(step, 10, {"train/loss": 2.5})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" · ")[0] for line in printed] == ["[train] step 1/10", "[train] step 10/10"]
    assert "loss 2.5" in printed[-1] and "peak RSS" in printed[-1]


def test_a_phase_prints_its_seconds_and_peak_memory(capsys):
    with phase("tables"):
        pass
    start, end = capsys.readouterr().out.splitlines()
    assert start == "[tables] …" and re.fullmatch(r"\[tables\] done in \d+ s · peak RSS \d+\.\d GiB", end)
