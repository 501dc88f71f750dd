"""The DP benchmark runs end to end on a tiny model and reports every step beside the isolated one."""
from ortho_train.models import TinyLlamaConfig
from tests.script_loader import load_script


def test_bench_reports_all_steps_with_ratios():
    result = load_script("dp_step").run(rho=0.015, rounds=1, device="cpu",
                 size=TinyLlamaConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    assert set(result["median_s"]) == {"isolated", "dp_support", "dp_global"}
    assert result["ratio_to_isolated"]["isolated"] == 1.0
    assert all(t > 0 for t in result["median_s"].values())
    assert result["batch_size"] == 20 and 0 < result["support_entries"] < result["linear_weight_entries"]
