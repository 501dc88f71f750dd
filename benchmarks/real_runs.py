"""One markdown row per run directory of the real-model recipes (`configs/real/`): the numbers
`docs/results.md` reports, read from what each run wrote (`sieve_table.json`, `summary.json`,
`ptq_gap.json`, `run_info.json`), so no number is copied by hand.

    python benchmarks/real_runs.py runs/real_isolated/version_0 runs/real_isolated/version_1
    python benchmarks/real_runs.py --kind unlearn runs/real_unlearn_lora/version_0

`--kind sft` (default): extraction, exposure and MIA AUC ± SE of every kill-switch table row, public
perplexity against the pretrained (pre-canary) model and, with `--dense`, against a dense fine-tune's
`summary.json`. `--kind unlearn`: forget extraction before, after (fp) and in every 4-bit deployment,
PrivLeak and the public perplexity against the start model. Every row ends with wall minutes and peak
RSS from `run_info.json`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read(run: Path, name: str):
    """The JSON a run wrote, or None where it has none."""
    path = run / name
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def auc(row: dict) -> str:
    value, se = row.get("mia_auc_loss"), row.get("mia_auc_loss_se")
    return "–" if value is None else f"{value:.2f} ± {fmt(se)}"


def row_label(row: dict) -> str:
    return row["variant"] if row.get("alpha") is None else f"{row['variant']} α={row['alpha']:g}"


def resources(run: Path) -> str:
    info = read(run, "run_info.json") or {}
    minutes = info.get("wall_seconds", 0) / 60 if info.get("wall_seconds") else None
    return f"{fmt(minutes, 1)} min · {fmt(info.get('peak_rss_gib'), 1)} GiB"


def sft_rows(run: Path, dense_ppl: float | None) -> list[str]:
    """`| run | row | extraction | exposure | MIA AUC ± SE | PPL | ÷ pre-canary | ÷ dense | bits/w | time |`."""
    table = read(run, "sieve_table.json") or []
    pre = next((r["public_ppl"] for r in table if r["variant"] == "pre_sft"), None)
    lines = []
    for row in table:
        ppl = row.get("public_ppl")
        ratio = None if ppl is None or pre is None else ppl / pre
        dense = None if ppl is None or dense_ppl is None else ppl / dense_ppl
        lines.append(f"| {run} | {row_label(row)} | {fmt(row.get('extraction_rate'))} | "
                     f"{fmt(row.get('exposure_mean'))} | {auc(row)} | {fmt(ppl, 1)} | {fmt(ratio, 3)} | "
                     f"{fmt(dense, 3)} | {fmt(row.get('bits_per_weight'))} | {fmt(row.get('seconds'), 0)} s |")
    summary = read(run, "summary.json") or {}
    lines.append(f"| {run} | summary (fp) | {fmt(summary.get('extraction_rate'))} | {fmt(summary.get('exposure_mean'))} | "
                 f"{auc(summary)} | {fmt(summary.get('public_ppl'), 1)} | – | – | – | {resources(run)} |")
    return lines


def unlearn_rows(run: Path) -> list[str]:
    """`| run | deployment | forget extraction (before → after) | forget MIA AUC | PrivLeak | public PPL (÷ start) | time |`
    from ptq_gap.json's flat keys (`forget_extraction_<deployment>`, `…_before`)."""
    gap = read(run, "ptq_gap.json") or {}
    lines = []
    for name in ["fp", *gap.get("variants", [])]:
        ppl, start = gap.get(f"public_ppl_{name}"), gap.get(f"public_ppl_{name}_before")
        ratio = None if ppl is None or not start else ppl / start
        lines.append(f"| {run} | {name} | {fmt(gap.get(f'forget_extraction_{name}_before'))} → "
                     f"{fmt(gap.get(f'forget_extraction_{name}'))} | {fmt(gap.get(f'forget_mia_auc_loss_{name}'))} | "
                     f"{fmt(gap.get(f'forget_privleak_{name}'), 1)} | {fmt(ppl, 1)} ({fmt(ratio, 3)}×) | "
                     f"{resources(run)} |")
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--kind", choices=["sft", "unlearn"], default="sft")
    parser.add_argument("--dense", type=Path, default=None, help="a dense fine-tune's run directory")
    args = parser.parse_args(argv)
    dense_ppl = (read(args.dense, "summary.json") or {}).get("public_ppl") if args.dense else None
    lines = []
    for run in args.runs:
        lines += sft_rows(run, dense_ppl) if args.kind == "sft" else unlearn_rows(run)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
