"""`ReportCallback`: write the run's HTML report (`report.html`) into its directory at fit end.

Records `run_info.json` first (library versions, start/end time, wall seconds from `setup` to
the end of fit, last step, the process's peak RSS and the load average at the end), then builds the report from everything the run directory holds (`ortho_train.report`): the
other callbacks and the module have written their artifacts by then (`on_train_end`), so put
this callback last in the list. A run that fails with an exception (e.g. `PTQGapError`) still
gets its report, from `on_exception`. With a TensorBoard logger it also writes a
custom-scalars layout (every table row of a metric in one chart) at fit start and the
final headline numbers as `hparams` metrics at the end. Runs on rank zero.
"""
from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ortho_train.artifacts import write_json_atomic
from ortho_train.progress_lines import peak_rss_gib
from ortho_train.report import build_report, load_run
from ortho_train.report.comparison import headline
from ortho_train.report.tensorboard import add_layout, log_final_metrics

PACKAGES = ("ortho-train", "torch", "lightning", "transformers", "peft", "bitsandbytes", "matplotlib")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on (and Python's)."""
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class ReportCallback(L.Callback):
    """Write `run_info.json` and the HTML report into the run directory (see the module docstring).

    Args:
        filename: name of the report file in the run directory.
        tensorboard: also write the custom-scalars layout and final `hparams` metrics to
            TensorBoard loggers.
    """

    def __init__(self, filename: str = "report.html", tensorboard: bool = True):
        if not filename or Path(filename).name != filename:
            raise ValueError(f"filename must be a plain file name, got {filename!r}")
        self.filename, self.tensorboard = filename, tensorboard
        self.path: Path | None = None
        self._run_dir: Path | None = None
        self._started: float | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._started = time.time()  # before the data is prepared: the wall time covers it

    def on_fit_start(self, trainer, pl_module) -> None:
        # trainer.log_dir is a collective: resolve it on every rank, before rank-zero-only code
        self._run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if self.tensorboard and trainer.is_global_zero:
            add_layout(trainer.loggers)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.write(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # a run that failed before its first step has nothing to show (and its directory is removed)
        if self.path is None and self._run_dir is not None and trainer.global_step > 0:
            self.write(trainer)

    @rank_zero_only
    def write(self, trainer) -> None:
        """Flush the loggers, record run_info.json, build the report."""
        for logger in trainer.loggers:
            logger.save()
        ended = time.time()
        write_json_atomic(self._run_dir / "run_info.json", {
            "started": _utc(self._started), "ended": _utc(ended),
            "wall_seconds": round(ended - self._started, 1), "global_step": trainer.global_step,
            "peak_rss_gib": round(peak_rss_gib(), 2),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,  # not on Windows
            "versions": package_versions(),
        })
        self.path = build_report([self._run_dir], self._run_dir / self.filename)
        rank_zero_info(f"ReportCallback: report written to {self.path}")
        if self.tensorboard:
            self._log_hparams(trainer)

    def _log_hparams(self, trainer) -> None:
        numbers = headline(load_run(self._run_dir))
        if numbers:
            log_final_metrics(trainer.loggers, dict(getattr(trainer.lightning_module, "hparams", {})), numbers)
