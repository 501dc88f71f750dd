"""The console of a run: progress, tables and paths; no library advertising, no `Epoch 0/-2`, no
hub-kernel warning (ortho_train/console.py, ortho_kernels/bitsandbytes_offline.py)."""
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from jsonargparse import Namespace

from ortho_train.console import DropTips, StepProgressBar, add_step_progress_bar

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
