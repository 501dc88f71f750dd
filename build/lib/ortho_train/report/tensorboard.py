"""The report's figures, table rows and a custom-scalars layout in TensorBoard, for the callbacks.

A table row (one α of one sieve, one PTQ deployment, …) is written as its own TensorBoard run,
`<log_dir>/<table>_rows/<row label>`, holding the row's identity (variant, α, ρ, deployment)
as hparams and one scalar per metric under a tag without them (`sieve/extraction_rate`,
`ptq/forget_extraction`): the HParams dashboard filters and plots rows by α or variant, and in
the Scalars and custom-scalars views every row of one metric is a curve of one chart, over
the steps at which periodic tables were built.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

from lightning.pytorch.loggers import TensorBoardLogger

LAYOUT = {
    "kill switch (every row of the sieve table per metric)": {
        metric: ["Multiline", [rf"sieve/{metric}"]]
        for metric in ("extraction_rate", "exposure_mean", "mia_auc_loss", "public_ppl", "bits_per_weight")
    },
    "PTQ gap (every deployment per metric)": {
        metric: ["Multiline", [rf"ptq/{metric}"]]
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


def _hparam(value):
    """A value TensorBoard's hparams accept (None and other types as text)."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _metric(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def log_table_rows(loggers, table: str, rows: Sequence[dict], identity: Sequence[str], metrics: Sequence[str],
                   step: int, label: Callable[[dict], str]) -> int:
    """Write each row to every TensorBoard logger as the run `<table>_rows/<label(row)>`: the row's
    `identity` fields as hparams, its numeric `metrics` as scalars `<table>/<metric>` at `step`.
    Rows with no numeric metric are skipped. Returns the number of rows written per logger."""
    written = 0
    for writer in tensorboard_writers(loggers):
        written = 0
        for row in rows:
            values = {f"{table}/{m}": v for m in metrics if (v := _metric(row.get(m))) is not None}
            if not values:
                continue
            run_name = f"{table}_rows/" + re.sub(r"[^A-Za-z0-9_.=+-]+", "_", label(row))
            hparams = {key: _hparam(row.get(key)) for key in identity}  # the step is the scalars'
            writer.add_hparams(hparams, values, run_name=run_name, global_step=step)
            written += 1
        writer.flush()
    return written


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
