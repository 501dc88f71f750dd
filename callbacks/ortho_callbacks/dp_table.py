"""`DPTableCallback`: the privacy table of a canary fine-tune, once the fit has ended.

Evaluates the run itself (at α = 0 and α = 1 when it trained on a support, with its DP-SGD ε
or "none"), post-hoc global/dual weight noise over a σ grid, GPTQ INT-k (plain and with
Gaussian noise) and DQC + stochastic quantisation over its σ grid
(`ortho_train.privacy.table`). Writes `<run>/dp_table.json` and `<run>/dp_table.md`, writes each
row to TensorBoard as the run `dp_table_rows/<row>` (kind, α, σ as hparams; scalars
`dp_table/<metric>`) and prints the table.

It runs at `on_fit_end`, after the module's `on_train_end` saved `hf_model/` and wrote
`summary.json`: a table that fails cannot lose the trained model. Reads only public attributes
of the module: `model`, `private_streams()`, `final_metrics` (the `dp` entry's ε), `run_dir`;
data from the datamodule's `probe` and `public_train_dataloader()`. Runs on rank zero.
"""
from __future__ import annotations

import copy
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from ortho_train.artifacts import write_json_atomic, write_text_atomic
from ortho_train.curvature import collect_hessians
from ortho_train.model_support import require_linear_only
from ortho_train.models import linear_layers
from ortho_train.privacy.table import PrivacyTable, PrivacyTableConfig, to_markdown
from ortho_train.report.tensorboard import log_table_rows

class DPTableCallback(L.Callback):
    """Privacy table at the end of the fit (see the module docstring).

    Args:
        table: what the table contains and how it is measured (`PrivacyTableConfig`: α values,
            post-hoc and stochastic-quantisation σ grids, INT-k lattice, ρ, metrics, exposure
            cost, noise seed).
        calibration_batches: public training batches for the Hessians.
    """

    def __init__(self, table: PrivacyTableConfig | None = None, calibration_batches: int = 8):
        super().__init__()
        if calibration_batches < 1:
            raise ValueError(f"dp table calibration_batches must be ≥ 1, got {calibration_batches}")
        self.config = table if table is not None else PrivacyTableConfig()
        self.calibration_batches = calibration_batches
        self.rows: list[dict] | None = None
        self.markdown: str | None = None

    def _calibration(self, trainer, model) -> dict[str, torch.Tensor]:
        modules = linear_layers(model, include_lm_head=True)
        with torch.random.fork_rng():  # drawing batches must not shift the training RNG
            return collect_hessians(model, trainer.datamodule.public_train_dataloader(), modules,
                                    self.calibration_batches)

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Refuse, before any training, a model whose projections the table would skip (Conv1D)."""
        require_linear_only(pl_module.model, "ortho_callbacks.dp_table.DPTableCallback")

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        start = time.perf_counter()
        final = pl_module.final_metrics or {}
        epsilon = (final.get("dp") or {}).get("epsilon")
        streams = pl_module.private_streams() if hasattr(pl_module, "private_streams") else None
        model = copy.deepcopy(pl_module.model).float().eval()  # the table's maths in float32
        rank_zero_info("DPTableCallback: building the privacy table…")
        table = PrivacyTable(model, trainer.datamodule.probe, self.config,
                             lambda m: self._calibration(trainer, m), streams, epsilon, rank_zero_info)
        self.rows = table.run()
        self.markdown = to_markdown(self.rows, self._notes(final, epsilon, time.perf_counter() - start))
        run_dir = pl_module.run_dir
        write_json_atomic(run_dir / "dp_table.json", self.rows)
        write_text_atomic(run_dir / "dp_table.md", self.markdown)
        self._log(trainer)
        print("\nprivacy table (dp_table.md):\n" + self.markdown, flush=True)

    def _notes(self, final: dict, epsilon: float | None, seconds: float) -> list[str]:
        dp = final.get("dp")
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
                  f"MIA members vs holdout canaries",
                  f"table built in {seconds:.0f} s"]
        return notes

    def _log(self, trainer) -> None:
        def label(row: dict) -> str:
            return row["kind"] + ("" if row["alpha"] is None else f"_a{row['alpha']:g}") + \
                ("" if row["noise"] is None else f"_s{row['noise']:g}")

        log_table_rows(trainer.loggers, "dp_table", self.rows, ("kind", "alpha", "noise"),
                       ("extraction_rate", "exposure_mean", "mia_auc_loss", "mia_auc_minkpp", "public_ppl",
                        "bits_per_weight"), trainer.global_step, label)
