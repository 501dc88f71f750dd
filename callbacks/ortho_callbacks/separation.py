"""`SeparationTableCallback`: the separation table of a canary fine-tune, at fit end and/or every N steps.

Rows for the public model, the run's own model (dense SFT, OGD α ∈ {0, 1} or isolated
α ∈ {0, 1}), the SVD split W_clean = W_pre + τ_gen of the run's fine-tune and naive pruning at
the same budget; columns extraction, holdout extraction, exposure, MIA AUC, public PPL, η of
the tracked displacements, LMC barriers on fixed public batches, bits per weight, and the
extraction after NF4 and INT4 (`ortho_train.measurement.separation`; the skeleton, with each row's seconds and peak RSS, is
`TableCallback`'s). Writes
`<run>/separation_table.json` (rows, η per layer, notes) and `<run>/separation_table.md`
(`separation_table_step<N>.*` for periodic tables), and each row to TensorBoard as the run
`separation_rows/<row>` (variant, α as hparams; scalars `separation/<metric>`).

The final table is built in `on_fit_end`: Lightning runs callbacks' `on_train_end` *before*
the module's, so only `on_fit_end` comes after the module saved `hf_model` and wrote
`summary.json`; the callback checks that the summary exists.

Reads only public attributes of the module: `model`, `pre_canary_state_dict`,
`private_streams()`, `displacements()` (None unless the module sets `track_displacements`
or trains with OGD), `run_dir`, `final_metrics`; data from the datamodule's `probe`.
Runs on rank zero. The files hold numbers only, never a canary's text.
"""
from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info

from ortho_callbacks.table_callback import TableCallback
from ortho_train.measurement.progress import RowMeter
from ortho_train.measurement.separation import SeparationConfig, SeparationTable, to_markdown
from ortho_train.report.tensorboard import log_table_rows


class SeparationTableCallback(TableCallback):
    """The separation table of the model being fine-tuned (see the module docstring).

    Args:
        every_n_steps: also build a table every N optimiser steps of the canary phase (0: never).
        at_fit_end: build the table when fitting ends (after the module's model and summary).
        table: what the table measures (`SeparationConfig`: SVD energy, LMC barrier points and
            batches, metrics, quantised formats, INT4 group size, exposure cost).
    """

    name, title = "separation_table", "separation table"

    def __init__(self, every_n_steps: int = 0, at_fit_end: bool = True, table: SeparationConfig | None = None):
        super().__init__(every_n_steps, at_fit_end)
        self.config = table if table is not None else SeparationConfig()

    def ready(self, trainer, pl_module) -> bool:
        if pl_module.pre_canary_state_dict is None:
            rank_zero_info("SeparationTableCallback: no canary phase ran, no table")
            return False
        if not (pl_module.run_dir / "summary.json").exists():
            raise RuntimeError("SeparationTableCallback ran before the module wrote summary.json")
        return True

    def build(self, trainer, pl_module, model, meter: RowMeter) -> SeparationTable:
        return SeparationTable(model, pl_module.pre_canary_state_dict, trainer.datamodule.probe, self.config,
                               pl_module.private_streams(), pl_module.displacements(), rank_zero_info, meter)

    def to_markdown(self, rows: list[dict], notes: list[str]) -> str:
        return to_markdown(rows, notes)

    def payload(self, trainer, table: SeparationTable, rows: list[dict], notes: list[str]) -> dict:
        eta = table.eta
        return {"step": trainer.global_step, "rows": rows, "notes": notes,
                "eta": None if eta is None else {"overall": eta.overall, "per_layer": eta.per_layer,
                                                 "rule": table.displacement_rule}}

    @staticmethod
    def row_label(row: dict) -> str:
        return row["variant"] + ("" if row["alpha"] is None else f"_a{row['alpha']:g}")

    def log_rows(self, trainer, rows: list[dict]) -> None:
        metrics = sorted({k for r in rows for k, v in r.items()
                          if k not in ("alpha", "energy", "seconds", "peak_rss_mib") and isinstance(v, (int, float))})
        log_table_rows(trainer.loggers, "separation", rows, ("variant", "alpha", "energy"), metrics,
                       trainer.global_step, self.row_label)

    def notes(self, trainer, pl_module, table: SeparationTable) -> list[str]:
        c = self.config
        eta = ("η: not tracked (set model.track_displacements, or train with ogd)" if table.eta is None
               else f"η of the run's tracked displacements ({table.displacement_rule}); on the fine-tuned "
                    f"model's rows only — η of an SVD split's τ_gen, τ_mem is 0 by construction")
        return [eta,
                f"svd_clean: W_pre + τ_gen at {c.energy:g} spectral energy per matrix; pruned: the "
                f"largest-magnitude entries of τ at the same parameter budget",
                f"barriers on {len(table.batches)} fixed public validation batches of {c.barrier_batch_size}, "
                f"{c.barrier_points} points: (W_pre, W_clean), (W_pre, W_pruned), (α = 0, α = 1)",
                "bits/weight: fp32 rows 32; svd_clean 32 + fp32 factors; pruned 32 + 64 bits per kept entry "
                "(value + index); ogd/isolated α rows count their streams",
                f"NF4 (bitsandbytes, block 64) and INT4 (RTN, group {c.group_size}) of each row's model; "
                f"LM head not quantised"]

