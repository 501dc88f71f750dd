"""The benchmark script runs end to end on a tiny shape and writes the promised JSON keys."""
import json

from tests.script_loader import load_script


def test_bench_smoke(tmp_path, monkeypatch, capsys):
    bench = load_script("dual_stream_op")
    monkeypatch.setattr(bench, "SHAPES", [(48, 256)])
    monkeypatch.setattr(bench, "MS", [1, 3, 40])
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device, mib=8: 1e10)
    out = tmp_path / "bench.json"
    bench.main(["--json", str(out), "--rounds", "5", "--budget", "1", "--load", "1"])
    rows = json.loads(out.read_text())
    names = {r["name"] for r in rows}
    assert "fp32 nn.Linear" in names and "bitsandbytes NF4 Linear4bit" in names
    assert any("a=1 rho=5.0%" in n for n in names) and any(n.endswith("a=0") for n in names)
    for r in rows:
        assert {"name", "shape", "m", "ms", "ratio_to_fp32", "bits_per_weight"} <= set(r)
        assert r["shape"] == [48, 256] and r["m"] in (1, 3, 40) and r["ms"] > 0
    fp32 = [r for r in rows if r["name"] == "fp32 nn.Linear"]
    assert all(r["ratio_to_fp32"] == 1.0 for r in fp32)
    out_text = capsys.readouterr().out
    assert "null test" in out_text and "competing load: 1 busy-loop" in out_text
    assert "M=40" in out_text and "GEMV alone, OpenMP static split" in names
