"""`DPTableCallback`: the privacy table of a canary fine-tune, once the fit has ended.

Evaluates the run itself (at α = 0 and α = 1 when it trained on a support, with its DP-SGD ε
or "none"), post-hoc global/dual weight noise over a σ grid, GPTQ INT-k (plain and with
Gaussian noise) and DQC + stochastic quantisation over its σ grid
(`ortho_train.measurement.privacy`; the skeleton, with each row's seconds and peak RSS, is
`TableCallback`'s). Writes `<run>/dp_table.json` and `<run>/dp_table.md`, writes each
row to TensorBoard as the run `dp_table_rows/<row>` (kind, α, σ as hparams; scalars
`dp_table/<metric>`) and prints the table.

It runs at `on_fit_end`, after the module's `on_train_end` saved `hf_model/` and wrote
`summary.json`: a table that fails cannot lose the trained model. Reads only public attributes
of the module: `model`, `private_streams()`, `final_metrics` (the `dp` entry's ε), `run_dir`;
data from the datamodule's `probe` and `public_train_dataloader()`. Runs on rank zero.
"""
from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info

from ortho_callbacks.table_callback import TableCallback
from ortho_train.measurement.attacks import attack_notes
from ortho_train.measurement.privacy import PrivacyTable, PrivacyTableConfig, to_markdown
from ortho_train.measurement.progress import RowMeter
from ortho_train.report.tensorboard import log_table_rows

ROW_METRICS = ("extraction_rate", "exposure_mean", "mia_auc_loss", "mia_auc_minkpp", "public_ppl", "bits_per_weight")


class DPTableCallback(TableCallback):
    """Privacy table at the end of the fit (see the module docstring).

    Args:
        table: what the table contains and how it is measured (`PrivacyTableConfig`: α values,
            post-hoc and stochastic-quantisation σ grids, INT-k lattice, ρ, metrics, exposure
            cost, noise seed).
        calibration_batches: public training batches for the Hessians.
    """

    name, title = "dp_table", "privacy table"

    def __init__(self, table: PrivacyTableConfig | None = None, calibration_batches: int = 8):
        super().__init__(every_n_steps=0, at_fit_end=True, calibration_batches=calibration_batches)
        self.config = table if table is not None else PrivacyTableConfig()

    def build(self, trainer, pl_module, model, meter: RowMeter) -> PrivacyTable:
        dp = (pl_module.final_metrics or {}).get("dp") or {}
        streams = pl_module.private_streams() if hasattr(pl_module, "private_streams") else None
        return PrivacyTable(model, trainer.datamodule.probe, self.config, lambda m: self.calibration(trainer, m),
                            streams, dp.get("epsilon"), rank_zero_info, meter=meter, delta=dp.get("delta"),
                            pre_model=self.pre_canary_model(pl_module) if self.needs_reference() else None,
                            calibration_of=lambda: self.calibration_batch_list(trainer))

    def to_markdown(self, rows: list[dict], notes: list[str]) -> str:
        return to_markdown(rows, notes)

    def notes(self, trainer, pl_module, table: PrivacyTable) -> list[str]:
        dp, epsilon = (pl_module.final_metrics or {}).get("dp"), table.epsilon
        notes = []
        if dp is not None:
            notes.append(f"DP-SGD ({dp['scope']}): ε = {epsilon:.3f} at δ = {dp['delta']:g} ({dp['accountant']} "
                         f"accountant), σ = {dp['noise_multiplier']:.4f}, q = {dp['sample_rate']:.4f}, "
                         f"C = {dp['max_grad_norm']}, {dp['steps']} steps; privacy unit one member canary; "
                         f"every row derived from the trained model keeps that ε (post-processing)")
        else:
            notes.append("no DP-SGD: ε is 'none' for every model that saw the canaries")
        notes += ["α = 0 of a support is the quantised public model: it never saw a canary (ε = 0)",
                  "noise σ is a noise scale, not a privacy guarantee: post-hoc weight noise and "
                  "stochastic quantisation have no sensitivity bound",
                  f"exposure ranked against {self.config.exposure_references or 'all'} reference secrets; "
                  f"MIA members vs holdout canaries"]
        notes += attack_notes(self.config.metrics, self.config.attacks, dp.get("delta") if dp else None)
        return notes

    @staticmethod
    def row_label(row: dict) -> str:
        return row["kind"] + ("" if row["alpha"] is None else f"_a{row['alpha']:g}") + \
            ("" if row["noise"] is None else f"_s{row['noise']:g}")

    def log_rows(self, trainer, rows: list[dict]) -> None:
        log_table_rows(trainer.loggers, "dp_table", rows, ("kind", "alpha", "noise"), ROW_METRICS,
                       trainer.global_step, self.row_label)
