"""benchmarks/: every script answers --help; ptq_formats.py end to end on a tiny GGUF model: every row, its bits per weight, the
float row as the reference, the calibration tokens of each GPTQ row, and the JSON it writes."""
import json
import subprocess
import sys

import pytest
import torch

from tests.script_loader import REPO, load_script


@pytest.mark.parametrize("script", sorted(p.stem for p in (REPO / "benchmarks").glob("*.py")))
def test_every_benchmark_answers_help(script):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]


def test_ptq_formats_table(tmp_path):
    pytest.importorskip("gguf")
    from tests.ortho_train.gguf_fixtures import write_tiny_llama_gguf

    model = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(model, hidden=64, ffn=128)
    threads = torch.get_num_threads()
    try:
        rows = load_script("ptq_formats").main(["--model", str(model), "--seq-len", "32", "--calibration-segments", "2",
                                                "4", "--eval-windows", "2", "--threads", "1", "--true-sequential",
                                                "--sieve-rho", "0.05", "--json", str(tmp_path / "t.json")])
    finally:
        torch.set_num_threads(threads)
    by_name = {r["row"]: r for r in rows}
    assert by_name["fp32"]["ppl_ratio"] == 1.0 and by_name["fp32"]["bits_per_weight"] == 32.0
    assert by_name["rtn g128"]["bits_per_weight"] == 4.25 and by_name["rtn g32"]["bits_per_weight"] == 5.0
    assert by_name["nf4 (bitsandbytes, block 64)"]["bits_per_weight"] == 4.5
    assert by_name["gptq g128, 2 segments"]["calibration_tokens"] == 64
    assert by_name["gptq g32 act-order, 4 segments"]["calibration_tokens"] == 128
    assert len(rows) == 16 and all(r["ppl"] > 1 and r["ppl"] == r["ppl"] for r in rows)
    for label in ("", " true-sequential"):  # α = 0: the base's stored bits (a 64-wide input is one group of 64:
        # 4.5 bits, 128-wide 4.25); α = 1 adds ρ = 5% of 48-bit COO entries (≈ 2.4 bits, ρ per layer within a few %)
        at = {a: by_name[f"sieve ρ=5.00% α={a} (gptq g128 act-order{label}, 4 segments)"] for a in (0, 1)}
        assert 4.25 < at[0]["bits_per_weight"] < 4.5
        assert 0.04 * 48 < at[1]["bits_per_weight"] - at[0]["bits_per_weight"] < 0.06 * 48
        assert at[0]["ppl"] != at[1]["ppl"]
    assert by_name["gptq g128 act-order true-sequential, 4 segments"]["ppl"] != \
        by_name["gptq g128 act-order, 4 segments"]["ppl"]
    # every quantised model differs from the float one
    assert all(r["ppl"] != by_name["fp32"]["ppl"] for r in rows if r["row"] != "fp32")
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == rows


def test_large_vocab_scoring_side_by_side(tmp_path):
    """benchmarks/large_vocab_scoring.py on a tiny random Llama, the head chunked 3 rows at a time:
    every mode scores the same batch, old and new agree, and bf16 reports its drift."""
    vocab = 512
    rows = load_script("large_vocab_scoring").main(
        ["--tiny", "--vocab", str(vocab), "--batch", "4", "--seq-len", "8", "--repeats", "1", "--threads", "1",
         "--logit-bytes", str(3 * vocab * 4), "--bf16", "--json", str(tmp_path / "s.json")])
    assert set(rows) == {"old", "new", "bf16"}
    assert rows["new"]["max_abs_nll_diff_vs_old"] < 1e-4 and rows["old"]["max_abs_nll_diff_vs_old"] == 0
    assert 0 <= rows["bf16"]["mean_abs_nll_diff_vs_new"] <= rows["bf16"]["max_abs_nll_diff_vs_new"] < 0.5
    assert all(r["seconds"] > 0 and r["peak_rss_gib"] > 0 for r in rows.values())
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == rows


def test_real_runs_rows_read_what_the_runs_wrote(tmp_path, capsys):
    run = tmp_path / "real_isolated" / "version_0"
    run.mkdir(parents=True)
    rows = [{"variant": "pre_sft", "alpha": None, "extraction_rate": 0.0, "exposure_mean": 1.0, "mia_auc_loss": 0.5,
             "mia_auc_loss_se": 0.08, "public_ppl": 100.0, "bits_per_weight": 32.0, "seconds": 70.0},
            {"variant": "isolated", "alpha": 0.0, "extraction_rate": 0.0, "exposure_mean": 0.7, "mia_auc_loss": 0.51,
             "mia_auc_loss_se": 0.07, "public_ppl": 104.0, "bits_per_weight": 4.25, "seconds": 2.0}]
    (run / "sieve_table.json").write_text(json.dumps(rows))
    (run / "summary.json").write_text(json.dumps({"extraction_rate": 1.0, "public_ppl": 99.0}))
    (run / "run_info.json").write_text(json.dumps({"wall_seconds": 600.0, "peak_rss_gib": 9.5}))
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "summary.json").write_text(json.dumps({"public_ppl": 80.0}))
    lines = load_script("real_runs").main([str(run), "--dense", str(dense)])
    assert lines[1] == (f"| {run} | isolated α=0 | 0.00 | 0.70 | 0.51 ± 0.07 | 104.0 | 1.040 | 1.300 | 4.25 | 2 s |")
    assert lines[2].endswith("| 10.0 min · 9.5 GiB |")

    unlearn = tmp_path / "unlearn"
    unlearn.mkdir()
    (unlearn / "ptq_gap.json").write_text(json.dumps({
        "variants": ["nf4"], "forget_extraction_fp": 0.0, "forget_extraction_fp_before": 1.0,
        "forget_extraction_nf4": 0.05, "forget_extraction_nf4_before": 0.9, "public_ppl_fp": 105.0,
        "public_ppl_fp_before": 100.0, "forget_privleak_fp": -3.5}))
    fp, nf4 = load_script("real_runs").main([str(unlearn), "--kind", "unlearn"])
    assert fp == f"| {unlearn} | fp | 1.00 → 0.00 | – | -3.5 | 105.0 (1.050×) | – min · – GiB |"
    assert nf4.startswith(f"| {unlearn} | nf4 | 0.90 → 0.05 |")


def test_busy_load_processes_end_with_the_block():
    busy_load = load_script("busy_load").busy_load
    with busy_load(2, seconds=30) as procs:
        assert all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)


def test_deploy_memory_table_ratios():
    """The table's ratios from hand-made rows: RSS ÷ (files + runtime) and ÷ the fp32 model."""
    bench = load_script("deploy_memory")
    rows = [{"variant": "runtime", "rss_load": 400.0},
            {"variant": "fp32", "file_mib": 400.0, "rss_load": 800.0, "rss_after": 840.0, "peak": 900.0},
            {"variant": "a0 cache=off head=float", "file_mib": 100.0, "rss_load": 500.0, "rss_after": 600.0,
             "peak": 610.0},
            {"variant": "a0 cache=on head=float", "file_mib": 100.0, "rss_load": 500.0, "rss_after": 800.0,
             "peak": 800.0}]
    args = type("Args", (), {"prompt": 128})()
    lines = bench.table(rows, {"fp32": {"wall": 1.0, "cpu": 0.5}, "a0 cache=off head=float": {"wall": 0.8, "cpu": 1.0}},
                        args)
    assert lines[3] == "| fp32 | 400 | 800 | 840 | 900 | 1.05 | 1.00 | yes |"  # 840 / (400 + 400)
    assert lines[4] == "| a0 cache=off head=float | 100 | 500 | 600 | 610 | 1.20 | 0.71 | yes |"  # 600 / 500
    assert lines[5].endswith("| 1.60 | 0.95 | no |")  # 800 / 500 > 1.5
    assert lines[-1] == "| a0 cache=off head=float | 160 | 1.25 | 128 | 0.50 |"  # 0.8 s vs 1.0 s; CPU 1.0 vs 0.5


@pytest.mark.slow
def test_deploy_memory_end_to_end(tmp_path):
    """deploy_memory.py on a tiny model: every asked variant in its own process, files read by each."""
    result = load_script("deploy_memory").main(
        ["--vocab", "512", "--hidden", "64", "--layers", "2", "--ffn", "128", "--prompt", "40", "--decode", "2",
         "--rounds", "1", "--variants", "fp32", "a0 cache=off head=float", "a1 cache=off head=int8",
         "--json", str(tmp_path / "d.json")])
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"runtime", "fp32", "a0 cache=off head=float", "a1 cache=off head=int8"}
    assert rows["a1 cache=off head=int8"]["file_mib"] < rows["fp32"]["file_mib"]
    assert all(r["rss_after"] >= r["rss_load"] > 0 for v, r in rows.items() if v != "runtime")
    assert set(result["prefill_seconds"]) == {"fp32", "a0 cache=off head=float", "a1 cache=off head=float"}
    assert json.loads((tmp_path / "d.json").read_text())["rows"] == result["rows"]


def test_llamacpp_check_recovers_ids_along_the_toolkit_pieces():
    check = load_script("llamacpp_check")
    pieces = [(7, b"The"), (9, b" fox"), (4, b"."), (5, b" It")]
    assert check.recover_ids(b"The fox. It", pieces) == ([7, 9, 4, 5], b"")
    assert check.recover_ids(b"The dog. It", pieces) == ([7], b" dog. It")  # " dog" is not " fox": stops there
    assert check.recover_ids(b"The foxes", pieces) == ([7, 9], b"es")  # a piece's bytes, not a word, are compared
    bytes_of = check.piece_bytes(check.bpe_tokenizer(), check.bpe_tokenizer().convert_tokens_to_ids("Ġthe"))
    assert bytes_of == b" the"  # GPT-2's Ġ is the space byte


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("LLAMA_SIMPLE"),
                    reason="set LLAMA_SIMPLE to llama.cpp's llama-simple binary (docs/deploy.md) to run it")
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_llamacpp_greedy_tokens_equal_the_alpha_zero_tokens(arch):
    import os

    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "llamacpp_check.py"), "--arch", arch,
                           "--llama-simple", os.environ["LLAMA_SIMPLE"], "--steps", "150"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "MATCH:" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
