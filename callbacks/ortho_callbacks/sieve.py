"""`SieveCallback`: the kill-switch table of a canary fine-tune, every N steps and/or at fit end.

Sieves copies of the module's model with public calibration batches and evaluates each α in
`alphas` beside references (fp32, INT4 RTN/GPTQ, NF4, the pre-fine-tuning model and its INT4
base): extraction, exposure, MIA AUC, public perplexity, bits per weight, ortho density
(`ortho_train.measurement.kill_switch`; the skeleton, with each row's seconds and peak RSS, is
`TableCallback`'s). Writes `<run>/sieve_table.json` and `<run>/sieve_table.md`
(`sieve_table_step<N>.*` for periodic tables; the final table after the module has saved the
model and the summary, so a failing table loses neither), writes each row to TensorBoard as
the run `sieve_rows/<row>` (variant, α, ρ as hparams; scalars `sieve/<metric>`) with the
report's kill-switch figures as `sieve/figures/<i>`, prints the table at the end of the fit, and with `save_isolated`
saves the isolated sieve as separate base/ortho safetensors files (`<run>/sieved_isolated`).

The HOP/DQC paper ("A Geometric Theory of Functionally Sensitive Outlier Separability") is
measured two ways. `dqc: true` adds a `posthoc_dqc` / `delta_dqc` row beside every posthoc /
delta row: the same base and ortho positions, the ortho values DQC-compensated, so DQC sits in
the table beside plain GPTQ (`int4_gptq`) and the uncompensated sieve. `hop_report: true`
writes `<run>/hop_report.json` (`hop_report_step<N>.json` for periodic tables): for every
sieve, ρ and sieved linear the HOP per-column geometric errors E_j of the base error
ΔW = dequant(base) − W_ft under the public calibration Hessian, the outlier threshold
τ = μ + β·σ (β = `hop_beta`), the outlier columns and their share of the error, and the layer
losses tr(ΔW H ΔWᵀ) at α = 0 and α = 1.

Reads only public attributes of the module: `model`, `pre_canary_state_dict`,
`private_streams()` (a typed stream view: `SupportStreams` of an isolated fine-tune give the
`isolated` rows, `SubspaceStreams` of an OGD fine-tune the `ogd` rows), `isolation`, `ogd`,
`run_dir`, `in_canary_phase`; data from the datamodule's
`probe` and `public_train_dataloader()`. Runs on rank zero.
"""
from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info

from ortho_callbacks.table_callback import TableCallback, periodic_table_due
from ortho_train.artifacts import write_json_atomic
from ortho_train.measurement.attacks import attack_notes
from ortho_train.measurement.kill_switch import SIEVED_VARIANTS, KillSwitchTable, TableConfig, to_markdown
from ortho_train.measurement.progress import RowMeter
from ortho_train.model_fingerprint import model_fingerprint
from ortho_train.private_streams import SupportStreams
from ortho_train.quantisation import QuantConfig
from ortho_train.report.kill_switch import kill_switch_figures
from ortho_train.report.tensorboard import log_figures, log_table_rows
from ortho_train.sieve.artifacts import save_sieved
from ortho_train.sieve.core import SieveConfig
from ortho_train.sieve.model import build_dual_stream_model, sieve_model

__all__ = ["ROW_METRICS", "SieveCallback", "periodic_table_due"]

ROW_METRICS = ("extraction_rate", "exposure_mean", "mia_auc_loss", "public_ppl", "bits_per_weight", "ortho_density")


class SieveCallback(TableCallback):
    """Kill-switch table of the model being fine-tuned (see the module docstring).

    Args:
        every_n_steps: also build a table every N optimiser steps of the canary phase (0: never).
        at_fit_end: build the table when training ends.
        table: what the table contains and how it is measured (`TableConfig`: variants,
            references, α and ρ lists, the posthoc/delta sieve spec, metrics, exposure cost,
            DQC rows, HOP report).
        calibration_batches: public training batches for the Hessians.
        save_isolated: save the isolated sieve as base/ortho safetensors at fit end.
    """

    name, title = "sieve_table", "kill-switch table"

    def __init__(self, every_n_steps: int = 0, at_fit_end: bool = True, table: TableConfig | None = None,
                 calibration_batches: int = 8, save_isolated: bool = True):
        super().__init__(every_n_steps, at_fit_end, calibration_batches)
        self.config = table if table is not None else TableConfig()
        self.save_isolated = save_isolated

    def build(self, trainer, pl_module, model, meter: RowMeter) -> KillSwitchTable:
        pre_model = self.pre_canary_model(pl_module)
        streams = pl_module.private_streams() if hasattr(pl_module, "private_streams") else None
        return KillSwitchTable(model, pre_model, trainer.datamodule.probe, self.config,
                               lambda m: self.calibration(trainer, m), streams, rank_zero_info,
                               known=self._known(pl_module, model, pre_model), meter=meter,
                               calibration_of=lambda: self.calibration_batch_list(trainer))

    def to_markdown(self, rows: list[dict], notes: list[str]) -> str:
        return to_markdown(rows, notes)

    def after(self, trainer, pl_module, model, table: KillSwitchTable, suffix: str, final: bool) -> None:
        run_dir = pl_module.run_dir
        if self.config.hop_report:
            write_json_atomic(run_dir / f"hop_report{suffix}.json", self._hop(table, trainer.global_step))
        if final and self.save_isolated and table.isolated is not None:
            self._save_isolated(pl_module, model, table.isolated, run_dir)

    @staticmethod
    def _known(pl_module, model, pre_model) -> dict[str, dict]:
        """What the run measured already on the same weights: the final evaluation of the
        fine-tuned model and the public model's perplexity (by fingerprint: a copy in another
        dtype does not match, and is measured)."""
        known = {}
        final = getattr(pl_module, "final_metrics", None)
        if final:
            known[model_fingerprint(model)] = final
        ppl = getattr(pl_module, "public_ppl_before_canaries", None)
        if pre_model is not None and ppl is not None:
            known[model_fingerprint(pre_model)] = {"public_ppl": ppl}
        return known

    def _hop(self, table: KillSwitchTable, step: int) -> dict:
        spec = self.config.spec
        return {
            "step": step, "beta": spec.hop_beta, "damp": spec.quant.damp,
            "what": "per sieve, ρ and sieved linear (W: N × K): column_errors[j] = E_j = ‖(ΔW L)_{:, j}‖² "
                    "with H = L Lᵀ the public-calibration Hessian (through the model named in 'hessians'), "
                    "damped by damp·mean(diag H), and ΔW = dequant(base) − W_ft, the α = 0 error; "
                    "Σ_j E_j = total_error = tr(ΔW H ΔWᵀ); outlier_columns: E_j > tau = μ_E + β·σ_E, "
                    "outlier_error_share their share of total_error; h_error_alpha0 / h_error_alpha1: "
                    "tr(ΔW H ΔWᵀ) with the undamped H at α = 0 / with the ortho stream added (α = 1)",
            "sieves": table.hop,
        }

    def notes(self, trainer, pl_module, table) -> list[str]:
        c = self.config
        refs = "all" if c.exposure_references is None else c.exposure_references
        notes = [f"exposure ranked against {refs} reference secrets "
                 f"(max measurable log2 = exposure ceiling); MIA = LOSS attack, members vs holdout",
                 "bits/weight over the sieved linears only (embeddings, norms"
                 + ("" if c.spec.include_lm_head else ", LM head") + " stay fp32 in every row); "
                 "α=0 rows count the base stream alone (the base file is that model), α>0 rows "
                 "both streams (48-bit COO entries)",
                 f"posthoc/delta: {c.spec.quant.name} g{c.spec.quant.group_size}, {c.spec.selection} "
                 f"selection"]
        if any(v.endswith("_dqc") for v in c.variants):
            notes.append(f"posthoc_dqc/delta_dqc: the posthoc/delta sieve's base and ortho positions, ortho "
                         f"values DQC-compensated (γ={c.spec.dqc_gamma:g}): the regular part's error folded "
                         f"into S by the H-metric projection")
        notes += attack_notes(c.metrics, c.attacks)
        if c.hop_report:
            notes.append(f"HOP per-column report (β={c.spec.hop_beta:g}) of every sieve: hop_report.json")
        ogd = getattr(pl_module, "ogd", None)
        if ogd is not None:
            size = f"k={ogd.k}" if ogd.k is not None else f"fraction={ogd.fraction}"
            notes.append(f"ogd: S_gen = {ogd.subspace} directions of the public model's K-FAC eigenbasis "
                         f"({size} per linear); α=0 = the fp32 public path (never saw a canary), "
                         f"α=1 adds ΔW_priv from fp16 coefficients; bits count coefficients and bases")
        if pl_module.isolation is not None:
            iso = pl_module.isolation
            notes.append(f"isolated: support {iso.support}, ρ={iso.rho}, base "
                         f"int{iso.quant.bits}_{iso.quant.method}, train_on_base={iso.train_on_base}, "
                         f"public_base_updates={iso.public_base_updates}")
        return notes

    @staticmethod
    def row_label(row: dict) -> str:
        label = row["variant"]
        if row["rho"] is not None and row["variant"] in SIEVED_VARIANTS:
            label += f"_rho{row['rho']:g}"
        if row["alpha"] is not None:
            label += f"_a{row['alpha']:g}"
        return label

    def log_rows(self, trainer, rows: list[dict]) -> None:
        log_table_rows(trainer.loggers, "sieve", rows, ("variant", "alpha", "rho", "base"), ROW_METRICS,
                       trainer.global_step, self.row_label)
        log_figures(trainer.loggers, "sieve/figures", lambda: kill_switch_figures(rows), trainer.global_step)

    def _save_isolated(self, pl_module, model, isolated: SupportStreams, run_dir) -> None:
        spec = SieveConfig(QuantConfig(bits=next(iter(isolated.bases.values())).bits), rho=isolated.rho)
        layers = sieve_model(model, "isolated", spec, supports=isolated.masks, bases=isolated.bases)
        dual = build_dual_stream_model(model, layers, alpha=1.0)
        path = save_sieved(dual, run_dir / "sieved_isolated",
                           metadata={"variant": "isolated", "rho": isolated.rho,
                                     "support": isolated.support},
                           tokenizer=getattr(pl_module, "tokenizer", None))
        rank_zero_info(f"SieveCallback: isolated sieve saved to {path} (base.safetensors alone = α=0)")
