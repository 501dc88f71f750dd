"""Every callback setting is checked when the callback is built, not after training."""
import pytest

from callbacks.adapter_export import AdapterExportCallback
from callbacks.ptq_gap import PTQGapCallback
from callbacks.sieve import SieveCallback


@pytest.mark.parametrize("settings, message", [
    ({"max_extraction_gap": 2.0}, "max_extraction_gap must lie in"),
    ({"exposure_references": 0}, r"exposure_references=0 \(must be ≥ 1\)"),
    ({"final_exposure_references": -1}, r"final_exposure_references=-1"),
    ({"skewnorm_references": 0}, "skewnorm_references=0"),
    ({"every_n_steps": -1}, r"every_n_steps=-1 \(must be ≥ 0\)"),
    ({"blocksize": 100}, "blocksize must be a power of two"),
    ({"formats": ["nf5"]}, "unknown quantisation formats"),
])
def test_ptq_gap_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        PTQGapCallback(**settings)


@pytest.mark.parametrize("settings, message", [
    ({"adapter_dirname": "../elsewhere"}, "adapter_dirname='../elsewhere'"),
    ({"card_name": ""}, "card_name=''"),
    ({"merged_dirname": "adapter"}, "give them different names"),
])
def test_adapter_export_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        AdapterExportCallback(**settings)


@pytest.mark.parametrize("settings, message", [
    ({"rhos": [2.0]}, r"rhos .* must lie in \(0, 1\)"),
    ({"alphas": [-3, 7]}, r"alphas must lie in \[0, 1\]"),
    ({"metrics": ["speed"]}, "metrics must be a non-empty subset"),
    ({"exposure_references": 0}, "exposure_references must be ≥ 1"),
    ({"bits": 5}, "bits must be one of"),
    ({"variants": ["magic"]}, "unknown sieve variant"),
    ({"hop_beta": 1.0}, "hop_beta needs hop_report: true"),
    ({"hop_report": True, "hop_beta": -1.0}, "hop_beta must be a finite number ≥ 0"),
    ({"hop_report": True, "variants": ["ogd"]}, "hop_report needs a sieved variant"),
    ({"dqc_gamma": 0.5}, "dqc_gamma needs DQC rows"),
    ({"dqc": True, "dqc_gamma": 0.0}, "dqc_gamma must be a positive number"),
    ({"dqc": True, "variants": ["isolated"]}, "dqc: true adds posthoc_dqc / delta_dqc rows"),
])
def test_sieve_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        SieveCallback(**settings)
