"""Smoke test of the sieve-vs-GPTQ benchmark on one tiny synthetic layer."""
import json
import math

from tests.script_loader import load_script


def test_bench_reports_both_times_and_the_requested_density(tmp_path):
    bench = load_script("sieve_time")
    out = tmp_path / "bench.json"
    summary = bench.main(["--shapes", "64x256", "--rounds", "1", "--rho", "0.05", "--json", str(out)])
    (row,) = summary["layers"]
    assert row["shape"] == [64, 256]
    assert row["gptq_s"] > 0 and row["sieve_s"] > 0
    assert abs(row["ratio"] - row["sieve_s"] / row["gptq_s"]) < 1e-12
    budget = math.ceil(0.05 * 64 * 256) / (64 * 256)  # top-ρ budget: at most ceil(ρ·N·K) entries
    assert 0.7 * budget <= row["density"] <= budget
    assert json.loads(out.read_text())["total_ratio"] == summary["total_ratio"]
