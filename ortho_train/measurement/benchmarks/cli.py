"""Command line of the benchmark evaluation (`python -m ortho_train.measurement.benchmarks`).

    python -m ortho_train.measurement.benchmarks --benchmark tofu --data DIR|hub \\
        --model RUN/hf_model --retain-model RETAIN_RUN/hf_model --out OUT
    python -m ortho_train.measurement.benchmarks --benchmark muse --corpus news --data DIR|hub \\
        --model RUN/hf_model --retain-model RETRAINED/hf_model --out OUT

Writes `OUT/tofu_<forget split>.{json,md}` or `OUT/muse_<corpus>.{json,md}` atomically. The
retain model (trained without the forget set) gives TOFU's forget quality and MUSE's PrivLeak;
without it those are absent (never a made-up reference). docs/benchmarks.md has the layouts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ortho_train.benchmarks_data import muse as muse_data
from ortho_train.benchmarks_data.records import BenchmarkDataError
from ortho_train.benchmarks_data.tofu import load_tofu_eval_sets
from ortho_train.measurement.benchmarks import muse_eval, tofu_eval
from ortho_train.measurement.benchmarks.config import MUSE_METRICS, MuseEvalConfig, TofuEvalConfig
from ortho_train.measurement.benchmarks.report import muse_table, tofu_table, write_results
from ortho_train.metrics.muse import privleak
from ortho_train.models import load_causal_lm
from ortho_train.settings import SettingError
from ortho_train.threads import configure_threads
from ortho_train.tokenization import load_tokenizer

LIMIT_NOTE = "--limit {n}: only the first {n} rows of each split; the numbers are not the benchmark's"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ortho_train.measurement.benchmarks",
                                description="TOFU / MUSE metrics of a local model (docs/benchmarks.md).")
    p.add_argument("--benchmark", required=True, choices=("tofu", "muse"))
    p.add_argument("--data", required=True,
                   help="directory of the benchmark's files (layout: docs/benchmarks.md), or 'hub' (needs network)")
    p.add_argument("--model", required=True, help="local Hugging Face model directory (e.g. RUN/hf_model)")
    p.add_argument("--retain-model", default=None,
                   help="model never trained on the forget set: TOFU forget quality, MUSE PrivLeak")
    p.add_argument("--out", required=True, type=Path, help="directory for the .json and .md results")
    p.add_argument("--forget-split", default="forget10", help="TOFU: forget01, forget05 or forget10")
    p.add_argument("--corpus", default="news", help="MUSE: news or books")
    p.add_argument("--metrics", default=",".join(MUSE_METRICS), help="MUSE: comma-separated subset")
    p.add_argument("--max-new-tokens", type=int, default=128, help="TOFU: greedy tokens per answer (ROUGE)")
    p.add_argument("--rouge-stemmer", default="none",
                   help="TOFU: none, or porter (the Porter stemmer on ROUGE-L's words, as TOFU's code)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N rows of each split only (quick checks)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all available cores)")
    return p


def _load(path: str, setting: str):
    try:
        return load_causal_lm(path).eval(), load_tokenizer(path)
    except (FileNotFoundError, ValueError) as err:
        raise SettingError(f"{setting}={path!r}: {err}") from None


def run_tofu(args) -> tuple[dict, str]:
    cfg = TofuEvalConfig(forget=args.forget_split, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, limit=args.limit, rouge_stemmer=args.rouge_stemmer)
    sets = load_tofu_eval_sets(cfg.forget, None if args.data == "hub" else args.data, cfg.limit)
    models = {"model": args.model, **({"retain_model": args.retain_model} if args.retain_model else {})}
    scores = {role: tofu_eval.score_model(*_load(path, f"--{role.replace('_', '-')}"), sets, cfg)
              for role, path in models.items()}
    retain = scores.get("retain_model")
    summaries = {"model": tofu_eval.summarise(scores["model"], retain)}
    if retain is not None:
        summaries["retain_model"] = tofu_eval.summarise(retain, None)
    notes = ["forget quality: KS-test p-value of the forget-set truth ratios against the retain model's"
             + ("" if retain is not None else " (no --retain-model: not computed)"),
             "TR: mean min(R, 1/R) on forget, mean max(0, 1 − R) elsewhere; RA / WF: Real Authors / World Facts"]
    notes += [LIMIT_NOTE.format(n=cfg.limit)] if cfg.limit else []
    record = {"benchmark": "tofu", "forget_split": cfg.forget, "data": args.data, "models": models,
              "config": {"max_new_tokens": cfg.max_new_tokens, "answer_eos": cfg.answer_eos, "limit": cfg.limit,
                         "rouge_stemmer": cfg.rouge_stemmer, "qa_format": vars(cfg.qa_format)}, "results": summaries}
    return record, tofu_table({models[r]: s for r, s in summaries.items()}, notes)


def _muse_data(cfg: MuseEvalConfig, data_dir) -> muse_eval.MuseData:
    data = muse_eval.MuseData()
    if "verbmem_f" in cfg.metrics:
        data.verbmem = muse_data.load_verbmem(cfg.corpus, data_dir, cfg.limit)
    splits = [s for m, s in (("knowmem_f", "forget_qa"), ("knowmem_r", "retain_qa")) if m in cfg.metrics]
    data.knowmem = {s: (muse_data.load_knowmem(s, cfg.corpus, data_dir, cfg.limit),
                        muse_data.load_knowmem(f"{s}_icl", cfg.corpus, data_dir)) for s in splits} or None
    if "privleak" in cfg.metrics:
        data.privleak = {s: muse_data.load_texts("privleak", s, cfg.corpus, data_dir, cfg.limit)
                         for s in ("forget", "holdout")}
    return data


def run_muse(args) -> tuple[dict, str]:
    cfg = MuseEvalConfig(corpus=args.corpus, metrics=tuple(m for m in args.metrics.split(",") if m),
                         batch_size=args.batch_size, limit=args.limit)
    data = _muse_data(cfg, None if args.data == "hub" else args.data)
    models = {"model": args.model, **({"retain_model": args.retain_model} if args.retain_model else {})}
    results = {role: muse_eval.evaluate(*_load(path, f"--{role.replace('_', '-')}"), data, cfg)
               for role, path in models.items()}
    if "retain_model" in results and "privleak_auc" in results["model"]:
        reference = results["retain_model"]["privleak_auc"]
        results["model"]["privleak"] = privleak(results["model"]["privleak_auc"], reference)
        results["retain_model"]["privleak"] = 0.0
    notes = ["VerbMem / KnowMem: mean ROUGE-L F1 in [0, 1] (MUSE's tables print ×100)",
             f"PrivLeak: (AUC − AUC_retain)/AUC_retain·100 with Min-{round(100 * cfg.mink)}% on privleak holdout vs "
             "forget; negative = under-unlearning"
             + ("" if args.retain_model else " (no --retain-model: not computed)")]
    notes += [LIMIT_NOTE.format(n=cfg.limit)] if cfg.limit else []
    record = {"benchmark": "muse", "corpus": cfg.corpus, "data": args.data, "models": models,
              "config": {k: getattr(cfg, k) for k in ("metrics", "verbmem_max_new_tokens", "knowmem_max_new_tokens",
                                                      "mink", "max_length", "limit")}, "results": results}
    return record, muse_table({models[r]: s for r, s in results.items()}, notes)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.threads is not None and args.threads < 1:
            raise SettingError(f"--threads={args.threads}: must be ≥ 1 (or left out: the available cores)")
        configure_threads(args.threads)
        if args.data != "hub" and not Path(args.data).is_dir():
            raise SettingError(f"--data={args.data!r}: no such directory (or pass 'hub')")
        with torch.inference_mode():
            record, table = (run_tofu if args.benchmark == "tofu" else run_muse)(args)
    except (SettingError, BenchmarkDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = f"tofu_{args.forget_split}" if args.benchmark == "tofu" else f"muse_{args.corpus}"
    paths = write_results(args.out, name, record, table)
    print(table + "\nwrote " + " and ".join(map(str, paths)))
    return 0
