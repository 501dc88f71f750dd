"""A quiet console for `train.py`: progress, the tables and the artefact paths, not library chatter.

- Lightning's advertising (`💡 Tip: … litlogger …`, `… litmodels …`) is dropped by a logging filter
  on Lightning's rank-zero logger; every other message of that logger passes.
- Lightning's own use of a deprecated torch pytree API warns once per run; that warning is ignored.
- The rich progress bar says `Epoch 0/-2` for a run bounded by `trainer.max_steps` (it prints
  `max_epochs - 1`, and `max_epochs` is -1 there). `StepProgressBar` prints `Epoch N` alone when
  the run has no epoch bound, and is added by `train.py` where the config names no progress bar.
  Where the output is not a terminal it draws nothing, so it prints a line every half minute
  instead (`ortho_train.progress_lines`: step, seconds per step, loss, peak memory).

Warnings that matter (an unresolved TPR at 1% FPR, a tied head left dense, …) are untouched.
bitsandbytes' hub-kernel warning is handled where bitsandbytes is imported
(`ortho_kernels.bitsandbytes_offline`), since that is also where the download is refused.
"""
from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

from ortho_train.progress_lines import TrainingLines, is_terminal

LIGHTNING_LOGGER = "lightning.pytorch.utilities.rank_zero"
TIP_PREFIX = "💡 Tip:"
PYTREE_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class DropTips(logging.Filter):
    """Drops Lightning's `💡 Tip:` records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


def quiet_library_chatter() -> None:
    """Install the tip filter (once) and ignore the pytree deprecation warning."""
    logger = logging.getLogger(LIGHTNING_LOGGER)
    if not any(isinstance(f, DropTips) for f in logger.filters):
        logger.addFilter(DropTips())
    warnings.filterwarnings("ignore", message=PYTREE_DEPRECATION)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar without the `/-2` of an epoch count a step-bounded run lacks."""

    def _get_train_description(self, current_epoch: int) -> str:
        bounded = self.trainer.max_epochs is not None and self.trainer.max_epochs > 0
        description = f"Epoch {current_epoch}/{self.trainer.max_epochs - 1}" if bounded else f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not is_terminal() and trainer.is_global_zero:
            if not hasattr(self, "_lines"):
                self._lines = TrainingLines()
            self._lines.update(trainer.global_step, trainer.max_steps, trainer.progress_bar_metrics)


def add_step_progress_bar(trainer_config) -> None:
    """Name `StepProgressBar` in the trainer's callbacks, unless the config turns the bar off or
    names a progress bar of its own, or `rich` is missing (Lightning's tqdm bar has no `/-2`)."""
    callbacks = list(trainer_config.get("callbacks") or [])
    named = [str(c.get("class_path", "")) for c in callbacks if hasattr(c, "get")]
    if trainer_config.get("enable_progress_bar") is False or not _RICH_AVAILABLE:
        return
    if any(name.endswith("ProgressBar") for name in named):
        return
    trainer_config.callbacks = [*callbacks, {"class_path": f"{__name__}.StepProgressBar"}]
