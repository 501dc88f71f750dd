"""Run directories written by hand in the exact schemas the callbacks write, for the report's tests.

Keys follow the writers: `DPTableCallback` (`dp_table.json`: the kill-switch table's row keys plus
`kind`, `epsilon`, `noise`, and where asked the attacks' keys: `audit_epsilon_lb`, `extraction_at_k`,
`mia_auc_rmia` with its SE and TPRs, `mia_holdout_count`), the
`SeparationTableCallback` (`separation_table.json`: `{step, rows, notes, eta}`), the
`PTQGapCallback` (`ptq_gap.json` with `forget_privleak_<deployment>` and `privleak_reference`),
the relearning callback (`relearning.json`: `{schema, config, deployments, rows, notes}`), and
`train.py`'s saved `config.yaml` for runs of one configuration with different seeds.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

ROC = {"fpr": [0.0, 0.0, 0.25, 0.5, 1.0], "tpr": [0.0, 0.5, 0.75, 1.0, 1.0]}


def _write(run: Path, name: str, value) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / name).write_text(json.dumps(value))


def table_row(variant: str, alpha, rho, extraction: float, auc: float, ppl: float, bits: float) -> dict:
    """A row as `KillSwitchTable.measure` writes it (the privacy table's rows are these too)."""
    return {"variant": variant, "alpha": alpha, "rho": rho, "extraction_rate": extraction, "exposure_mean": 3.0,
            "mia_auc_loss": auc, "public_ppl": ppl, "bits_per_weight": bits, "ortho_density": 0.05,
            "holdout_extraction_rate": 0.0, "symbol_accuracy": extraction, "mia_auc_loss_se": 0.1,
            "mia_auc_minkpp": auc, "mia_tpr_at_1pct_fpr_loss": 0.0, "mia_tpr_at_1pct_fpr_minkpp": 0.0,
            "base": "the run's support and base", "mia_roc_loss": ROC, "seconds": 0.5, "peak_rss_mib": 700.0}


def attack_keys(extraction_at_k: float, auc: float, holdout: int = 200) -> dict:
    """The attack keys of a row (`ortho_train.measurement.attacks`): TPR at 0.1% FPR unresolved by
    200 holdouts (200 · 0.001 < 1), resolved by 2,000."""
    return {"extraction_at_k": extraction_at_k, "mia_auc_rmia": auc, "mia_auc_rmia_se": 0.05,
            "mia_tpr_at_1pct_fpr_rmia": 0.25, "mia_tpr_at_0.1pct_fpr_rmia": None if holdout < 1000 else 0.1,
            "mia_holdout_count": holdout}


def dp_rows(audit: bool) -> list[dict]:
    """The privacy table of a DP-SGD run on a support: run α = 0 / 1, post-hoc noise, GPTQ, SQ."""
    specs = [("run", "run", 0.0, 0.0, None, 0.0, 0.56, 28.6), ("run", "run", 1.0, 7.99, None, 0.0, 0.49, 28.9),
             ("run", "posthoc_global", 1.0, 7.99, 0.1, 0.0, 0.50, 29.1),
             ("run", "posthoc_dual", 1.0, 7.99, 0.1, 0.0, 0.49, 29.0),
             ("int4_gptq", "int4_gptq", None, 7.99, None, 0.0, 0.46, 28.9),
             ("run", "stochastic_quant", 1.0, 7.99, 1.0, 0.0, 0.46, 29.0)]
    rows = []
    for variant, kind, alpha, epsilon, noise, extraction, auc, ppl in specs:
        row = table_row(variant, alpha, 0.05, extraction, auc, ppl, 7.4) | {"kind": kind, "epsilon": epsilon,
                                                                               "noise": noise}
        if audit:  # the table's attacks, on every row but stochastic quantisation's (a missing value)
            row["audit_epsilon_lb"] = None if alpha == 0.0 else 0.4
            row |= attack_keys(0.5 * (alpha or 0.0), auc) if kind != "stochastic_quant" else {}
        rows.append(row)
    return rows


def write_dp_run(root: Path, audit: bool = True) -> Path:
    run = root / "dp_dual" / "version_0"
    _write(run, "dp_table.json", dp_rows(audit))
    _write(run, "summary.json", {"extraction_rate": 0.0, "mia_auc_loss": 0.49, "public_ppl": 28.9,
                                 "dp": {"epsilon": 7.99, "delta": 1e-3, "noise_multiplier": 1.59, "sample_rate": 0.5,
                                        "steps": 30, "scope": "support", "accountant": "rdp"}})
    return run


def write_ogd_run(root: Path) -> Path:
    """An OGD run with its kill-switch table (fp32, pre_sft, ogd α ∈ {0, 0.5, 1}) and separation table."""
    run = root / "ogd_sft" / "version_0"
    sieve = [table_row("fp32", None, None, 0.5, 0.9, 15.6, 32.0) | {"mia_roc_loss": None},
             table_row("pre_sft", None, None, 0.0, 0.52, 56.3, 32.0)]
    sieve += [table_row("ogd", a, None, 0.5 * a, 0.5 + 0.4 * a, 15.0 + a, 32.0 + 45 * a) for a in (0.0, 0.5, 1.0)]
    for row in sieve[1:]:  # the attacks on every row but fp32 (missing values); 2,000 holdouts on ogd α=1
        row |= attack_keys(row["extraction_rate"], row["mia_auc_loss"], 2000 if row["alpha"] == 1.0 else 200)
        row["audit_epsilon_lb"] = 1.82 * (row["alpha"] or 0.0)
    _write(run, "sieve_table.json", sieve)
    _write(run, "roc.json", {"fpr_level": 0.01, "members": 4, "holdout": 4, "curves": {
        "loss": ROC | {"auc": 0.9, "tpr_at_fpr": 0.5}}})
    curve = [2.70 + 0.005 * i for i in range(11)]
    rows = [{"variant": "public", "alpha": None, "energy": None, "eta": None, "barrier_linear": None,
             "barrier_paper": None, "barrier_curve": None, "bits_per_weight": 32.0},
            {"variant": "ogd", "alpha": 0.0, "energy": None, "eta": None, "barrier_linear": None,
             "barrier_paper": None, "barrier_curve": None, "bits_per_weight": 32.0},
            {"variant": "ogd", "alpha": 1.0, "energy": None, "eta": 0.085, "barrier_linear": 0.0,
             "barrier_paper": 0.0478, "barrier_curve": curve, "bits_per_weight": 77.2},
            {"variant": "svd_clean", "alpha": None, "energy": 0.9, "eta": None, "barrier_linear": 0.0,
             "barrier_paper": 0.896, "barrier_curve": [3.9 - 0.09 * i for i in range(11)], "bits_per_weight": 45.6},
            {"variant": "pruned", "alpha": None, "energy": 0.9, "eta": None, "barrier_linear": 0.0319,
             "barrier_paper": 0.285, "barrier_curve": [3.9 + 0.03 * i for i in range(11)], "bits_per_weight": 59.2}]
    for i, row in enumerate(rows):
        row |= {"extraction_rate": 0.0 if i != 2 else 0.5, "holdout_extraction_rate": 0.0, "exposure_mean": 1.1,
                "mia_auc_loss": 0.55, "mia_auc_loss_se": 0.09, "public_ppl": 15.6 + i,
                "nf4_extraction_rate": 0.0, "int4_rtn_extraction_rate": 0.0, "seconds": 1.0, "peak_rss_mib": 740.0}
    eta = {"overall": 0.085, "rule": "OGD: public path and private stream, kept apart by construction",
           "per_layer": {f"model.layers.{i}.mlp.down_proj.weight": 0.02 * (i + 1) for i in range(3)}}
    _write(run, "separation_table.json", {"step": 30, "rows": rows, "notes": ["svd_clean: W_pre + τ_gen"],
                                          "eta": eta})
    return run


def write_unlearn_run(root: Path) -> Path:
    """A LoRA unlearning run: the PTQ gap with PrivLeak per deployment and a relearning table."""
    run = root / "unlearn" / "version_0"
    variants = ["nf4", "int4_rtn"]
    gap = {"variants": variants, "status": "ok", "forgetting_survives": True, "max_extraction_gap": 0.05,
           "privleak_reference": {"path": "/runs/tiny/version_0/hf_model_pre_canary", "forget_mia_auc_mink_40": 0.54}}
    for name in ["fp"] + variants:
        gap |= {f"forget_extraction_{name}": 0.0, f"forget_extraction_{name}_before": 1.0,
                f"forget_mia_auc_loss_{name}": 0.6, f"public_ppl_{name}": 27.0, f"forget_exposure_{name}": 1.4,
                f"forget_privleak_{name}": 0.0 if name == "nf4" else 30.6, f"forget_privleak_{name}_before": 47.4}
        if name != "fp":
            gap[f"ptq_gap_extraction_{name}"] = 0.0
        # the forget canaries' attacks (`attack_metrics`), none measured on int4_rtn (missing values)
        attacks = {} if name == "int4_rtn" else attack_keys(0.0 if name == "fp" else 0.25, 0.6)
        gap |= {f"forget_{k}_{name}": v for k, v in attacks.items()}
        gap |= {f"forget_{k}_{name}_before": v for k, v in attack_keys(1.0, 1.0).items()} if name == "fp" else {}
        gap[f"forget_mia_roc_loss_{name}"] = ROC
    gap["forget_mia_roc_loss_fp_before"] = {"fpr": [0.0, 0.0, 1.0], "tpr": [0.0, 1.0, 1.0]}
    _write(run, "ptq_gap.json", gap)
    rows = [{"model": model, "condition": condition, "steps": steps, "deployment": deployment,
             "extraction": min(1.0, steps / 20 + (0.5 if model == "start" else 0.0)), "symbol_accuracy": 0.5,
             "nll_mean": 10.0 - steps / 5, "train_loss": None if steps == 0 else 2.0, "seconds": 1.0,
             "peak_rss_mib": 800.0}
            for model in ("unlearned", "start") for condition in ("public", "forget") for steps in (0, 10, 25)
            for deployment in ("fp", "nf4")]
    _write(run, "relearning.json", {"schema": 1, "config": {"steps": [0, 10, 25], "lr": 1e-3},
                                    "deployments": ["fp", "nf4"], "rows": rows,
                                    "notes": ["relearning on 2 of 8 forget canaries, the table measures the other 6"]})
    return run


def write_seed_runs(root: Path, seeds=(0, 1, 2)) -> list[Path]:
    """Three runs of one configuration (config.yaml differs in seed_everything only) with
    extraction 0.2, 0.4, 0.9 and a kill-switch curve over α ∈ {0, 0.5, 1}."""
    runs = []
    for seed, extraction in zip(seeds, (0.2, 0.4, 0.9)):
        run = root / "isolated_sft" / f"version_{seed}"
        config = {"seed_everything": seed, "model": {"class_path": "ortho_train.sft_module.CanarySFTModule",
                                                     "init_args": {"sft_lr": 0.01}}, "trainer": {"max_steps": 30}}
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        _write(run, "summary.json", {"extraction_rate": extraction, "mia_auc_loss": 0.5 + extraction / 2,
                                     "public_ppl": 6.0 + extraction})
        _write(run, "sieve_table.json", [table_row("isolated", a, 0.05, a * extraction, 0.5, 6.0 + a, 4.3)
                                         for a in (0.0, 0.5, 1.0)])
        runs.append(run)
    return runs
