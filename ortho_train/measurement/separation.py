"""The separation table: how well each way of splitting a fine-tune hides its canaries (no Lightning).

Rows (one model each):
- `public`: W_pre, the model before the canary phase (the level "hidden" is measured against);
- the run's own model: `dense` (a dense fine-tune), `ogd` at α ∈ {0, 1}
  (W(α) = W_public_path + α·ΔW_priv), `isolated` at α ∈ {0, 1} (α = 0: the support's
  quantised bases Q(W_pre) on the sieved linears; α = 1: the trained weights);
- `svd_clean`: W_clean = W_pre + τ_gen of the run's fine-tune τ = W_ft − W_pre
  (`svd_split_state_dict` of every matrix: block linears, embeddings, LM head; norm gains
  from the fine-tune; spectral energy `energy`);
- `pruned`: W_pre + the largest-magnitude entries of τ at the split's parameter budget.

Columns: extraction and holdout extraction rates, mean exposure, MIA AUC (LOSS attack),
public perplexity; η = |⟨ΔW_pub, ΔW_priv⟩| / (‖ΔW_pub‖·‖ΔW_priv‖) of the run's tracked
displacements, on the rows of the run's fine-tuned model only (between τ_gen and τ_mem of an
SVD split η is 0 by construction and is never reported); the LMC loss barrier on fixed
public batches, linear form max_t [L(θ_t) − ((1−t)L(θ_a) + tL(θ_b))] and the paper form
max_t L(θ_t) − min(L(θ_a), L(θ_b)), for (W_pre, W_clean), (W_pre, W_pruned) and
(α = 0, α = 1); bits per weight over the split linears; extraction after NF4 and INT4
(`quantised_copy`) of each row's model.

bits/weight (over the run's own stream layers for `ogd`/`isolated`, over the split matrices
for `svd_clean`/`pruned`; everything else is fp32): fp32 models 32;
`svd_clean` 32 + 32·Σ k(d_out + d_in) / Σ d_out·d_in (W_pre plus fp32 rank-k factors);
`pruned` 32 + 64·budget/weights (fp32 value + 32-bit index per kept entry);
`ogd` α = 1 adds the fp16 coefficients and eigenbases, `isolated` counts its packed streams.

Every row is measured by `evaluate_memorisation` on its own model; the α = 1 rows of `ogd`
and `isolated` are the trained fp32 weights (their stored streams rebuild them to fp16
precision), the α = 0 rows the public path (OGD) or the dequantised bases (isolation).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ortho_train import metrics
from ortho_train.evaluation import evaluate_memorisation, extraction_metrics
from ortho_train.measurement.formatting import format_auc, format_value, markdown_table
from ortho_train.measurement.progress import RowMeter
from ortho_train.private_streams import PrivateStreams, SubspaceStreams, SupportStreams
from ortho_train.quantisation import PTQConfig, QuantConfig, quantised_copy
from ortho_train.separation.displacement import Displacements
from ortho_train.separation.geometry import LossBarrier, lmc_barrier
from ortho_train.separation.svd_split import pruned_state_dict, svd_split_state_dict
from ortho_train.sieve.core import SieveConfig
from ortho_train.sieve.model import build_dual_stream_model, sieve_model, stream_stats

MEASURED = ("extraction_rate", "holdout_extraction_rate", "exposure_mean", "mia_auc_loss", "mia_auc_loss_se",
            "public_ppl")  # from evaluate_memorisation, in every row
COLUMNS = ("variant", "alpha", "energy", *MEASURED, "eta", "barrier_linear", "barrier_paper", "bits_per_weight",
           "nf4_extraction_rate", "int4_rtn_extraction_rate")
METRICS = ("extraction", "exposure", "mia", "ppl")
QUANTISED = ("nf4", "int4_rtn")


@dataclass
class SeparationConfig:
    """What the separation table measures (see the module docstring).

    Args:
        energy: spectral energy τ_gen keeps in the SVD split, in (0, 1].
        barrier_points: interpolation points of the LMC barriers (≥ 11).
        barrier_batches: public validation batches the barriers average over (fixed batches).
        barrier_batch_size: windows per barrier batch.
        metrics: subset of extraction, exposure, mia, ppl.
        quantised: extraction after these formats: subset of nf4, int4_rtn.
        group_size: INT4 RTN group size.
        exposure_references: reference secrets for exposure (None: all).
        exposure_canaries: members whose exposure is measured (None: all).
    """

    energy: float = 0.9
    barrier_points: int = 11
    barrier_batches: int = 4
    barrier_batch_size: int = 8
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    quantised: list[str] = field(default_factory=lambda: list(QUANTISED))
    group_size: int = 128
    exposure_references: int | None = 1000
    exposure_canaries: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.barrier_points < 11:
            raise ValueError(f"barrier_points must be ≥ 11, got {self.barrier_points}")
        for name in ("barrier_batches", "barrier_batch_size", "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("exposure_references", "exposure_canaries"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be ≥ 1 or None (all), got {value}")
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ValueError(f"metrics must be a subset of {METRICS}, got unknown {bad}")
        bad = [q for q in self.quantised if q not in QUANTISED]
        if bad:
            raise ValueError(f"quantised must be a subset of {QUANTISED}, got unknown {bad}")


def mean_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean NLL of a public batch (the barrier's L)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp, mask = metrics.token_logprobs(logits, batch["labels"])
    return -(logp * mask).sum() / mask.sum()


def _with_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out.eval()


class SeparationTable:
    """Builds and evaluates the rows; `run()` returns them as a list of dicts.

    Args:
        model: the fine-tuned model W_ft (not modified).
        pre_state: the state dict of W_pre (the pre-canary public model).
        probe: the run's `MemorisationProbe`.
        config: a `SeparationConfig`.
        streams: the private fine-tune's typed streams (None: dense).
        displacements: the run's tracked ΔW_pub, ΔW_priv (None: η is "–").
        log: callable(str) for each finished row's one-line summary.
        meter: times and sizes the rows and prints what each is computing (default: a
            `RowMeter` titled "separation table").
    """

    def __init__(self, model: nn.Module, pre_state: dict[str, torch.Tensor], probe,
                 config: SeparationConfig, streams: PrivateStreams | None = None,
                 displacements: Displacements | None = None, log: Callable[[str], None] = print,
                 meter: RowMeter | None = None):
        self.model, self.probe, self.config, self.streams, self.log = model, probe, config, streams, log
        self.pre_state = {k: v.to(next(model.parameters()).device) for k, v in pre_state.items()}
        self.eta = None if displacements is None else displacements.entanglement()
        self.displacement_rule = None if displacements is None else displacements.rule
        batches = probe.public_val_batches(config.barrier_batch_size)
        self.batches = [b for _, b in zip(range(config.barrier_batches), batches)]
        self.rows: list[dict] = []
        self.meter = meter if meter is not None else RowMeter("separation table")
        self.meter.total = self.meter.total or self.expected_rows()

    def expected_rows(self) -> int:
        """Rows `run()` will produce: public, the run's own (two α rows with streams), svd_clean, pruned."""
        return 1 + (2 if isinstance(self.streams, (SubspaceStreams, SupportStreams)) else 1) + 2

    # ------------------------------------------------------------ measuring
    def _quantised_extraction(self, model: nn.Module, fmt: str) -> float:
        quantised = quantised_copy(model, fmt, PTQConfig(group_size=self.config.group_size))
        return extraction_metrics(quantised, self.probe.members)["extraction_rate"]

    def _barrier(self, state_a: dict, state_b: dict) -> LossBarrier:
        scratch = copy.deepcopy(self.model)
        return lmc_barrier(scratch, state_a, state_b, self.batches, mean_nll, self.config.barrier_points)

    def _row(self, variant: str, model: nn.Module, alpha: float | None = None, eta: float | None = None,
             barrier: LossBarrier | None = None, bits: float = 32.0, energy: float | None = None) -> dict:
        c = self.config
        self.meter.stage(f"{variant} {_setting({'alpha': alpha, 'energy': energy})} — evaluating "
                         f"{', '.join(c.metrics)}, extraction after {', '.join(c.quantised) or 'no format'}")
        found = evaluate_memorisation(model, self.probe, exposure_canaries=c.exposure_canaries,
                                      exposure_references=c.exposure_references, include=tuple(c.metrics),
                                      skewnorm_references=0,  # the table shows the exact rank only
                                      decode_holdout=False)  # holdout exact match by teacher forcing
        row = {"variant": variant, "alpha": alpha, "energy": energy,
               **{k: found.get(k) for k in MEASURED}, "eta": eta,
               "barrier_linear": None if barrier is None else barrier.linear,
               "barrier_paper": None if barrier is None else barrier.paper, "bits_per_weight": bits,
               **{f"{q}_extraction_rate": self._quantised_extraction(model, q) for q in c.quantised},
               "barrier_curve": None if barrier is None else barrier.losses}
        self.rows.append(self.meter.record(row))
        self.log(format_row(row))
        return row

    # --------------------------------------------------------------- rows
    def _run_rows(self) -> None:
        eta = None if self.eta is None else self.eta.overall
        ft_state = self.model.state_dict()
        if isinstance(self.streams, SubspaceStreams):
            zero = dict(ft_state)
            for name, (weight, bias) in self.streams.public.items():
                zero[f"{name}.weight"] = weight
                if bias is not None:
                    zero[f"{name}.bias"] = bias
            bits = self.streams.bits_per_weight()
            self._row("ogd", _with_state(self.model, zero), 0.0)
            self._row("ogd", self.model, 1.0, eta, self._barrier(zero, ft_state),
                      32.0 + bits["coefficients"] + bits["basis"])
        elif isinstance(self.streams, SupportStreams):
            zero = dict(ft_state)
            for name, base in self.streams.bases.items():
                zero[f"{name}.weight"] = base.dequantise().to(ft_state[f"{name}.weight"])
            stats = _support_bits(self.model, self.streams)
            self._row("isolated", _with_state(self.model, zero), 0.0, bits=stats["base_bits_per_weight"])
            self._row("isolated", self.model, 1.0, eta, self._barrier(zero, ft_state), stats["bits_per_weight"])
        else:
            self._row("dense", self.model, eta=eta)

    def _split_rows(self) -> None:
        ft_state = {k: v.detach() for k, v in self.model.state_dict().items()}
        energy = self.config.energy
        split = svd_split_state_dict(self.pre_state, ft_state, energy)  # every 2-D matrix
        budgets = {k: s.budget for k, s in split.layers.items()}
        kept = sum(budgets.values()) / sum(ft_state[k].numel() for k in budgets)
        pruned = pruned_state_dict(self.pre_state, ft_state, budgets)
        # W_base of the barrier: W_pre on the split matrices, the fine-tune's norm gains (as W_clean)
        base = {k: (self.pre_state[k] if k in split.layers else v) for k, v in ft_state.items()}
        self._row("svd_clean", _with_state(self.model, split.state_dict),
                  barrier=self._barrier(base, split.state_dict), bits=32.0 + 32.0 * kept, energy=energy)
        self._row("pruned", _with_state(self.model, pruned), barrier=self._barrier(base, pruned),
                  bits=32.0 + 64.0 * kept, energy=energy)

    def run(self) -> list[dict]:
        self._row("public", _with_state(self.model, self.pre_state))
        self._run_rows()
        self._split_rows()
        return self.rows


def _support_bits(model: nn.Module, streams: SupportStreams) -> dict[str, float]:
    spec = SieveConfig(QuantConfig(bits=next(iter(streams.bases.values())).bits), rho=streams.rho)
    layers = sieve_model(model, "isolated", spec, supports=streams.masks, bases=streams.bases)
    return stream_stats(build_dual_stream_model(model, layers))


def _setting(row: dict) -> str:
    if row["alpha"] is not None:
        return f"α={row['alpha']:g}"
    return f"energy {row['energy']:g}" if row.get("energy") is not None else ""


def format_row(row: dict) -> str:
    return (f"{row['variant']:>10} {_setting(row)}: extraction {format_value(row['extraction_rate'], 2)}"
            f" (NF4 {format_value(row.get('nf4_extraction_rate'), 2)}, INT4 {format_value(row.get('int4_rtn_extraction_rate'), 2)}),"
            f" PPL {format_value(row['public_ppl'])}, η {format_value(row['eta'])}, barrier {format_value(row['barrier_linear'])}")


def to_markdown(rows: list[dict], notes: list[str] = ()) -> str:
    head = ("| row | setting | extraction | holdout extr. | exposure | MIA AUC ± SE | public PPL | η "
            "| barrier (linear) | barrier (paper) | bits/weight | NF4 extr. | INT4 extr. |")
    cells = [[r["variant"], _setting(r), format_value(r["extraction_rate"], 2),
              format_value(r["holdout_extraction_rate"], 2), format_value(r["exposure_mean"], 2), format_auc(r),
              format_value(r["public_ppl"]), format_value(r["eta"]), format_value(r["barrier_linear"], 4),
              format_value(r["barrier_paper"], 4), format_value(r["bits_per_weight"], 2),
              format_value(r.get("nf4_extraction_rate"), 2), format_value(r.get("int4_rtn_extraction_rate"), 2)]
             for r in rows]
    return markdown_table(head, cells, notes)
