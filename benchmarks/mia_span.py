"""Membership inference of a run's models by the span it scores: the secret's tokens (what the toolkit
measures) against the whole canary (id and template tokens too), with the DeLong standard error.

    python benchmarks/mia_span.py runs/quickstart/version_0 [--models hf_model_pre_canary hf_model]

Run from the directory the run was started in (its `data.canary_key_file` is relative to it). The
pre-canary model never saw a canary: its AUC should lie within about 2 standard errors of 0.5, and
a score whose AUC does not (on several runs) measures something other than training — the id, for
a score over the whole canary. Prints one line per model and span; nothing of the canaries.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from ortho_train.datamodule import CanaryDataModule  # noqa: E402
from ortho_train.evaluation import sequence_mia_scores  # noqa: E402
from ortho_train.metrics import roc_auc, roc_auc_standard_error  # noqa: E402
from ortho_train.models import eval_mode, load_causal_lm  # noqa: E402


def span_aucs(model, probe) -> dict[str, tuple[float, float]]:
    """`{span: (LOSS AUC, its SE)}`, members against holdout canaries."""
    out = {}
    with eval_mode(model):
        for span in ("secret", "sequence"):
            members = sequence_mia_scores(model, probe.members, probe.pad_token_id, span=span)["loss"]
            holdout = sequence_mia_scores(model, probe.holdout, probe.pad_token_id, span=span)["loss"]
            out[span] = (roc_auc(members, holdout), roc_auc_standard_error(members, holdout))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--models", nargs="+", default=["hf_model_pre_canary", "hf_model"])
    args = parser.parse_args(argv)
    data = yaml.safe_load((args.run_dir / "config.yaml").read_text())["data"]
    datamodule = CanaryDataModule(**{k: v for k, v in data.items() if k != "tokenizer"},
                                  tokenizer=str(args.run_dir / args.models[0]))
    datamodule.setup("fit")
    results = {}
    for name in args.models:
        with torch.no_grad():
            results[name] = span_aucs(load_causal_lm(args.run_dir / name), datamodule.probe)
        for span, (auc, se) in results[name].items():
            print(f"{name:>20} {span:>8}: LOSS AUC {auc:.3f} ± {se:.3f} ({(auc - 0.5) / se if se else float('inf'):+.1f} SE "
                  f"from 0.5; {len(datamodule.probe.members)} members, {len(datamodule.probe.holdout)} holdouts)")
    return results


if __name__ == "__main__":
    main()
