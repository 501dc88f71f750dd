"""What the attack columns cost per table row, on a finished canary SFT run.

    python benchmarks/attack_cost.py runs/quickstart/version_0 --holdouts 200 2000

Loads the run's `hf_model/` (the fine-tuned model) and `hf_model_pre_canary/` (the reference), rebuilds
its canaries from the run's `config.yaml` (the canary key file must be where the config names it),
and times, at each holdout count (the first n holdouts): the MIA pass over members and holdouts
(`evaluation.canary_scores`, which every table row runs), RMIA's reference scores (once per table),
RMIA of the fine-tuned model, extraction@k of the members and the one-run audit. Prints one line per
count and part, seconds and the metric's value; no secret or canary text.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout used without installing

from ortho_train.attack_evaluation import (ReferenceScores, rmia_evaluation,  # noqa: E402
                                           sampled_extraction_rate)
from ortho_train.datamodule import CanaryDataModule  # noqa: E402
from ortho_train.evaluation import canary_scores  # noqa: E402
from ortho_train.metrics.reference_mia import RMIAConfig  # noqa: E402
from ortho_train.metrics.sampled_extraction import SampledExtractionConfig  # noqa: E402
from ortho_train.models import load_causal_lm  # noqa: E402
from ortho_train.privacy.audit import AuditConfig, one_run_audit  # noqa: E402
from ortho_train.token_datasets import subset_canaries  # noqa: E402


def timed(label: str, fn):
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    return value, {"part": label, "seconds": round(seconds, 2)}


def measure(run: Path, holdouts: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    dm = CanaryDataModule(**data)
    dm.setup("fit")
    probe = dm.probe
    probe = replace(probe, holdout=subset_canaries(probe.holdout, range(min(holdouts, len(probe.holdout)))))
    model, reference = (load_causal_lm(run / name).eval() for name in ("hf_model", "hf_model_pre_canary"))
    config = RMIAConfig()
    rows = []
    scores, row = timed("MIA pass (members + holdouts)", lambda: canary_scores(model, probe))
    rows.append(row)
    ref, row = timed("RMIA reference scores (once per table)", lambda: ReferenceScores.of(reference, probe, config))
    rows.append(row)
    (report, rmia), row = timed("RMIA of the model", lambda: rmia_evaluation(model, probe, ref, config, scores))
    rows.append(row | {"auc": report["mia_auc_rmia"], "tpr@0.1%": report["mia_tpr_at_0.1pct_fpr_rmia"]})
    at_k, row = timed("extraction@k (members)", lambda: sampled_extraction_rate(model, probe.members,
                                                                                 SampledExtractionConfig()))
    rows.append(row | {"extraction_at_k": at_k})
    audit, row = timed("one-run audit", lambda: one_run_audit(rmia["members"], rmia["holdout"], AuditConfig()))
    rows.append(row | {"epsilon_lb": audit["audit_epsilon_lb"]})
    return [{"holdouts": len(probe.holdout)} | r for r in rows]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished canary SFT run directory (runs/<name>/version_N)")
    parser.add_argument("--holdouts", type=int, nargs="+", default=[200, 2000], help="holdout counts to time")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    rows = [row for n in args.holdouts for row in measure(args.run, n, args.threads)]
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
