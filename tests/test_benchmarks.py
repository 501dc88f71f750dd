"""benchmarks/ptq_formats.py end to end on a tiny GGUF model: every row, its bits per weight, the
float row as the reference, the calibration tokens of each GPTQ row, and the JSON it writes."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_ptq_formats_table(tmp_path):
    pytest.importorskip("gguf")
    from tests.ortho_train.gguf_fixtures import write_tiny_llama_gguf

    model = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(model, hidden=64, ffn=128)
    threads = torch.get_num_threads()
    try:
        rows = load_script("ptq_formats").main(["--model", str(model), "--seq-len", "32", "--calibration-segments", "2",
                                                "4", "--eval-windows", "2", "--threads", "1", "--json", str(tmp_path / "t.json")])
    finally:
        torch.set_num_threads(threads)
    by_name = {r["row"]: r for r in rows}
    assert by_name["fp32"]["ppl_ratio"] == 1.0 and by_name["fp32"]["bits_per_weight"] == 32.0
    assert by_name["rtn g128"]["bits_per_weight"] == 4.25 and by_name["rtn g32"]["bits_per_weight"] == 5.0
    assert by_name["nf4 (bitsandbytes, block 64)"]["bits_per_weight"] == 4.5
    assert by_name["gptq g128, 2 segments"]["calibration_tokens"] == 64
    assert by_name["gptq g32 act-order, 4 segments"]["calibration_tokens"] == 128
    assert len(rows) == 10 and all(r["ppl"] > 1 and r["ppl"] == r["ppl"] for r in rows)
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
