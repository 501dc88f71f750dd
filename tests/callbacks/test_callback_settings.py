"""Every callback setting is checked when the callback is built, not after training: each case
is given as a shipped YAML gives it (`init_args`, parsed by jsonargparse as `train.py` does), so
the typed configs nested in the callbacks are checked on the path users take."""
from argparse import ArgumentError
from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from ortho_callbacks.adapter_export import AdapterExportCallback
from ortho_callbacks.dp_table import DPTableCallback
from ortho_callbacks.ptq_gap import PTQGapCallback
from ortho_callbacks.separation import SeparationTableCallback
from ortho_callbacks.sieve import SieveCallback


def from_init_args(callback_class, init_args: dict):
    """The callback a config's `init_args` block builds."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(callback_class, "callback")
    return parser.instantiate(parser.parse_object({"callback": init_args})).callback


@pytest.mark.parametrize("settings, message", [
    ({"max_extraction_gap": 2.0}, "max_extraction_gap must lie in"),
    ({"exposure_references": 0}, r"exposure_references=0 \(must be ≥ 1\)"),
    ({"final_exposure_references": -1}, r"final_exposure_references=-1"),
    ({"skewnorm_references": -1}, "skewnorm_references=-1"),
    ({"every_n_steps": -1}, r"every_n_steps=-1 \(must be ≥ 0\)"),
    ({"quant": {"blocksize": 100}}, "blocksize must be a power of two"),
    ({"quant": {"group_size": 0}}, "group_size must be ≥ 1"),
    ({"quant": {"compute_dtype": "float8"}}, r"Literal\['float32', 'bfloat16', 'float16'\]\. Got value: float8"),
    ({"formats": ["nf5"]}, "unknown quantisation formats"),
])
def test_ptq_gap_settings(settings, message):
    with pytest.raises((ValueError, ArgumentError), match=message):  # a Literal is refused while parsing
        from_init_args(PTQGapCallback, settings)


@pytest.mark.parametrize("settings, message", [
    ({"adapter_dirname": "../elsewhere"}, "adapter_dirname='../elsewhere'"),
    ({"card_name": ""}, "card_name=''"),
    ({"merged_dirname": "adapter"}, "give them different names"),
])
def test_adapter_export_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        AdapterExportCallback(**settings)


@pytest.mark.parametrize("table, message", [
    ({"rhos": [2.0]}, r"rhos .* must lie in \(0, 1\)"),
    ({"alphas": [-3, 7]}, r"alphas must lie in \[0, 1\]"),
    ({"metrics": ["speed"]}, "metrics must be a non-empty subset"),
    ({"exposure_references": 0}, "exposure_references must be ≥ 1"),
    ({"spec": {"quant": {"bits": 5}}}, "bits must be one of"),
    ({"variants": ["magic"]}, "unknown sieve variant"),
    ({"spec": {"hop_beta": 1.0}}, "hop_beta needs hop_report: true"),
    ({"hop_report": True, "spec": {"hop_beta": -1.0}}, "hop_beta must be a finite number ≥ 0"),
    ({"hop_report": True, "variants": ["ogd"]}, "hop_report needs a sieved variant"),
    ({"spec": {"dqc_gamma": 0.5}}, "dqc_gamma needs DQC rows"),
    ({"dqc": True, "spec": {"dqc_gamma": 0.0}}, "dqc_gamma must be a positive number"),
    ({"dqc": True, "variants": ["isolated"]}, "dqc: true adds posthoc_dqc / delta_dqc rows"),
])
def test_sieve_settings(table, message):
    with pytest.raises(ValueError, match=message):
        from_init_args(SieveCallback, {"table": table})


@pytest.mark.parametrize("settings, message", [
    ({"every_n_steps": -1}, "every_n_steps must be ≥ 0"),
    ({"calibration_batches": 0}, "calibration_batches must be ≥ 1"),
])
def test_sieve_schedule_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        from_init_args(SieveCallback, settings)


@pytest.mark.parametrize("settings, message", [
    ({"calibration_batches": 0}, "calibration_batches must be ≥ 1"),
    ({"table": {"posthoc_sigmas": [-1.0]}}, "sigmas must be finite and ≥ 0"),
    ({"table": {"bits": 5}}, "bits"),
    ({"table": {"metrics": ["ppl", "vibes"]}}, "metrics must be among"),
    ({"table": {"alphas": [2.0]}}, r"alphas must lie in \[0, 1\]"),
    ({"table": {"rho": 0.0}}, r"rho must lie in \(0, 1\)"),
])
def test_dp_table_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        from_init_args(DPTableCallback, settings)


def test_a_shipped_style_block_builds_the_typed_configs():
    sieve = from_init_args(SieveCallback, {"every_n_steps": 5, "table": {
        "variants": ["posthoc"], "rhos": [0.05], "dqc": True,
        "spec": {"quant": {"method": "rtn", "bits": 3, "group_size": 64}, "include_lm_head": True}}})
    assert sieve.every_n_steps == 5 and sieve.config.variants == ["posthoc", "posthoc_dqc"]
    assert (sieve.config.spec.quant.method, sieve.config.spec.quant.bits, sieve.config.spec.quant.group_size) == \
        ("rtn", 3, 64) and sieve.config.spec.include_lm_head
    ptq = from_init_args(PTQGapCallback, {"formats": ["int4_rtn"], "quant": {"group_size": 32, "skip_modules": []}})
    assert ptq.settings.group_size == 32 and ptq.settings.skip_modules == []
    separation = from_init_args(SeparationTableCallback, {"table": {"energy": 0.5, "group_size": 64}})
    assert separation.config.energy == 0.5 and separation.config.group_size == 64


def test_every_shipped_config_builds_its_callbacks():
    import importlib

    import yaml

    configs = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml")
                     if p.parent.name != "data")  # configs/data/: included `data:` groups
    built = 0
    for path in configs:
        for block in yaml.safe_load(path.read_text())["trainer"].get("callbacks") or []:
            module, _, name = block["class_path"].rpartition(".")
            if module.startswith("ortho_callbacks."):
                from_init_args(getattr(importlib.import_module(module), name), block.get("init_args", {}))
                built += 1
    assert built >= len(configs)
