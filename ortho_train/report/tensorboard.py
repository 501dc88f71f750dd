"""The report's figures and a custom-scalars layout in TensorBoard, for the callbacks.

Scalars keep their tags (`sieve/<variant>_rho<ρ>_a<α>/<metric>`, `ptq/<metric>_<deployment>`);
the layout puts every row of one metric into one chart (tags matched by regular expression),
so α and the variant are curves of a chart rather than one chart each.
"""
from __future__ import annotations

import re
from typing import Callable

from lightning.pytorch.loggers import TensorBoardLogger

LAYOUT = {
    "kill switch (all rows per metric)": {
        metric: ["Multiline", [rf"sieve/.*/{metric}"]]
        for metric in ("extraction_rate", "exposure_mean", "mia_auc_loss", "public_ppl", "bits_per_weight")
    },
    "PTQ gap (all deployments per metric)": {
        metric: ["Multiline", [rf"ptq(_final)?/{metric}_.*"]]
        for metric in ("forget_extraction", "forget_exposure", "forget_mia_auc_loss", "public_ppl")
    },
    "memorisation during training": {
        "extraction": ["Multiline", [r"val/(holdout_)?extraction_rate"]],
        "MIA AUC": ["Multiline", [r"val/mia_auc_.*"]],
    },
}


def tensorboard_loggers(loggers) -> list[TensorBoardLogger]:
    """The TensorBoard loggers among `loggers`."""
    return [logger for logger in loggers if isinstance(logger, TensorBoardLogger)]


def tensorboard_writers(loggers) -> list:
    """The `SummaryWriter` of every TensorBoard logger among `loggers`."""
    return [logger.experiment for logger in tensorboard_loggers(loggers)]


def log_figures(loggers, prefix: str, make_figures: Callable[[], list[tuple[str, object]]], step: int) -> int:
    """`add_figure` each (caption, figure) of `make_figures()` as `<prefix>/<i>` to every
    TensorBoard logger; the figures are drawn only when there is one. Returns the writer count."""
    writers = tensorboard_writers(loggers)
    figures = make_figures() if writers else []
    for writer in writers:
        for i, (caption, figure) in enumerate(figures):
            writer.add_figure(f"{prefix}/{i}", figure, global_step=step, close=False)
            writer.add_text(f"{prefix}/{i}/caption", caption, global_step=step)
        writer.flush()
    return len(writers)


def log_final_metrics(loggers, hparams: dict, numbers: dict[str, float]) -> None:
    """The run's hyper-parameters with its final numbers (`hparams` plugin), tags made safe."""
    safe = {"headline/" + re.sub(r"[^A-Za-z0-9]+", "_", k).strip("_"): v for k, v in numbers.items()}
    for logger in tensorboard_loggers(loggers):
        logger.log_hyperparams(hparams, metrics=safe)
        logger.experiment.flush()


def add_layout(loggers) -> None:
    """Write `LAYOUT` to every TensorBoard logger (once per run)."""
    for writer in tensorboard_writers(loggers):
        writer.add_custom_scalars(LAYOUT)
