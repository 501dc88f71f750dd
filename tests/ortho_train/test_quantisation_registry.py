"""The format registry: lookups by role, and a format registered here (in the test only) is usable by
the fake-quantised copy, the PTQ gap's diagnostics, the kill-switch table and the sieve with no other edit."""
from types import SimpleNamespace

import pytest
import torch

from ortho_callbacks.ptq_gap import PTQGapCallback
from ortho_train.models import TinyLlamaConfig, build_tiny_llama
from ortho_train.quantisation import (
    FORMATS,
    PTQConfig,
    QuantConfig,
    WeightFormat,
    base_quantisers,
    deployment_formats,
    effective_linear_weights,
    int_formats,
    quantise_weight,
    quantised_copy,
)
from ortho_train.measurement.kill_switch import KillSwitchTable, TableConfig, int_reference
from ortho_train.quantisation.int_rtn import RTN
from ortho_train.sieve.core import SieveConfig, sieve_posthoc


class Sign1(WeightFormat):
    """Toy 1-bit format: ŵ = sign(w) · mean|w| of its row (binary weights with a per-row scale)."""

    name, bits, deployable = "sign1", (1,), True

    def fake_quantise(self, w, settings):
        w = w.detach().float()
        return torch.sign(w) * w.abs().mean(dim=1, keepdim=True)  # (d_out, d_in)

    def bin_width(self, w, settings):  # the two levels ±mean|w| are 2·mean|w| apart
        return (2 * w.detach().float().abs().mean(dim=1, keepdim=True)).expand(w.shape)  # (d_out, d_in)

    def bits_per_weight(self, settings):
        return 1.0


class HessianRTN(RTN):
    """Toy base quantiser: RTN that insists on a calibration Hessian (as any calibration-based one)."""

    name, needs_hessian = "hrtn", True

    def quantise(self, w, spec, hessian=None):
        assert hessian is not None, "quantise_weight must refuse before calling a Hessian quantiser without one"
        return super().quantise(w, spec, hessian)


@pytest.fixture
def toy_formats(monkeypatch):
    monkeypatch.setitem(FORMATS, "sign1", Sign1())
    monkeypatch.setitem(FORMATS, "hrtn", HessianRTN())


def _model():
    return build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), 40, 0, 1)


def test_roles_of_the_registered_formats():
    assert base_quantisers() == ("rtn", "gptq", "q4_0", "q4_1") and deployment_formats() == ("nf4", "fp4", "int4_rtn")
    assert FORMATS["gptq"].needs_hessian and FORMATS["gptq"].outlier_aware and not FORMATS["rtn"].needs_hessian
    assert FORMATS["nf4"].blockwise and not FORMATS["int4_rtn"].blockwise
    with pytest.raises(ValueError, match=r"method must be one of \('rtn', 'gptq', 'q4_0', 'q4_1'\), got 'sign1'"):
        QuantConfig("sign1")
    with pytest.raises(ValueError, match="unknown quantisation format 'sign1'"):
        quantised_copy(_model(), "sign1", PTQConfig())


def test_a_registered_format_makes_copies_and_ptq_diagnostics(toy_formats):
    model = _model()
    copy_ = quantised_copy(model, "sign1", PTQConfig())
    linears = effective_linear_weights(model)  # every linear but the (skipped) LM head
    assert len(linears) == 14
    for name, w in linears.items():
        expected = torch.sign(w) * w.abs().mean(dim=1, keepdim=True)
        assert torch.equal(copy_.get_submodule(name).weight, expected), name
    assert torch.equal(copy_.lm_head.weight, model.lm_head.weight)

    callback = PTQGapCallback(formats=["sign1"], privleak_reference=None)  # accepted by name
    moved = _model()
    with torch.no_grad():
        moved.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0  # far across the sign boundary
        moved.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-6  # well inside its bin
    out = callback.weight_diagnostics(SimpleNamespace(model=moved, original_weights=linears))
    assert out["updated_weights_sign1"] == 2 and out["bin_crossing_fraction_sign1"] == 0.5


def test_a_registered_format_is_a_kill_switch_table_row(toy_formats):
    model, seen = _model(), []
    table = KillSwitchTable(model, None, probe=None, config=TableConfig(variants=[], references=["sign1"]),
                            hessians_of=lambda m: {}, log=lambda line: None)
    table._evaluate = lambda m: seen.append(m) or {"extraction_rate": 0.25}
    (row,) = table.run()
    assert row["variant"] == "sign1" and row["bits_per_weight"] == 1.0 and row["extraction_rate"] == 0.25
    w = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(seen[0].model.layers[0].self_attn.q_proj.weight,
                       torch.sign(w) * w.abs().mean(dim=1, keepdim=True))


def test_a_registered_base_quantiser_serves_quant_spec_the_sieve_and_the_tables(toy_formats):
    spec = QuantConfig("hrtn", bits=4, group_size=16)
    assert spec.name == "int4_hrtn" and int_reference("int4_hrtn") == (4, "hrtn")
    assert int_reference("int4_awq") is None
    torch.manual_seed(0)
    w, x = torch.randn(8, 32), torch.randn(64, 32)
    with pytest.raises(ValueError, match="HRTN needs a calibration Hessian"):
        quantise_weight(w, spec)
    hessian = x.T @ x / 64  # (32, 32)
    sieved = sieve_posthoc(w, hessian, SieveConfig(quant=spec, rho=0.125))
    rtn = quantise_weight(w, QuantConfig("rtn", bits=4, group_size=16))
    assert torch.equal(sieved.base.dequantise(), rtn.dequantise())  # the same quantiser, the same computation
    assert sieved.ortho.nnz == 32  # ρ = 1/8 of 256 weights, chosen from the residual


def test_one_spelling_per_format():
    """INT4 RTN is `int4_rtn` everywhere a name is written: the base stream `QuantConfig("rtn", 4)`,
    the deployment copy and the table reference; the old `int4` is refused with the canonical name."""
    assert QuantConfig("rtn", 4).name == "int4_rtn" and "int4_rtn" in deployment_formats()
    assert int_formats()["int4_rtn"] == ("rtn", 4) and int_formats()["int3_gptq"] == ("gptq", 3)
    assert int_reference("int4_rtn") == (4, "rtn") and int_reference("int4_pre_sft") == (4, "pre_sft")
    for refuse in (lambda: quantised_copy(_model(), "int4", PTQConfig()),
                   lambda: TableConfig(references=["int4"]),
                   lambda: PTQGapCallback(formats=["int4"], privleak_reference=None)):
        with pytest.raises(ValueError, match="'int4' is spelt 'int4_rtn'"):
            refuse()
