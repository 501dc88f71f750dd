"""Every mode on tiny random models of the architectures users bring (Llama, Qwen2, Mistral, Phi):
dense, isolated, OGD and DP SFT, the sieve table, LoRA and MANSU unlearning, the PTQ gap;
GPT-2's Conv1D projections (PTQ and LoRA supported, sieve/isolation/MANSU refused by name) and
bfloat16 loading (`dtype:`).

Each model is built from its transformers config (`tests/ortho_train/arch_models.py`) and loaded
through `model_path`, as a user's model is. Two to four steps per run: the claims are structural
(the α = 0 model is the quantised public model, every projection is adapted and quantised, every
row is finite), not how much is memorised.
"""
import json
import math

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from ortho_callbacks.adapter_export import AdapterExportCallback
from ortho_callbacks.ptq_gap import PTQGapCallback
from ortho_callbacks.sieve import SieveCallback
from ortho_train import quantisation as quant
from ortho_train.datamodule import CanaryDataModule
from ortho_train.model_support import UnsupportedLayerError, conv1d_as_linear
from ortho_train.ogd import OGDConfig
from ortho_train.privacy import DPConfig
from ortho_train.quantisation import QuantConfig
from ortho_train.sft_module import CanarySFTModule
from ortho_train.sieve.core import SieveConfig
from ortho_train.sieve.isolation import IsolationConfig
from ortho_train.measurement.kill_switch import TableConfig
from ortho_train.unlearn_module import LoraAdapterConfig, UnlearnModule
from ortho_train.unlearning.mansu import MansuConfig
from tests.ortho_train.arch_models import ARCHITECTURES, BLOCKS, PROJECTIONS, WIDTH, cached_tiny_model
from tests.ortho_train.unlearn_helpers import single_thread, tiny_datamodule  # noqa: F401

SFT_DATA = dict(canary_secrets="seed", seq_len=64, batch_size=2, canary_batch_size=2, val_windows=2, secret_length=4,
                num_member_canaries=3, num_holdout_canaries=4, num_reference_secrets=30)
ALL_LINEAR = LoraAdapterConfig(rank=4, target_modules=["all-linear"])
QUANT = dict(blocksize=64, group_size=32)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_dir(request, tmp_path_factory):
    return request.param, cached_tiny_model(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return cached_tiny_model("gpt2", tmp_path_factory)


# PTQ-gap evaluation on few references, skew-normal fit skipped (architecture-independent, tested in
# tests/ortho_train/test_evaluation.py and test_metrics_exposure.py)
FEW_REFERENCES = dict(exposure_references=10, final_exposure_references=10, skewnorm_references=0)


def _trainer(tmp, steps, callbacks=()):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     limit_val_batches=0, default_root_dir=tmp, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=list(callbacks), gradient_clip_val=1.0)


def _sft_data(model_dir):
    return CanaryDataModule(tokenizer=str(model_dir), **SFT_DATA)


def _table(rows):
    return {(row["variant"], row["alpha"]): row for row in rows}


def _finite(row, keys):
    return all(isinstance(row[k], float) and math.isfinite(row[k]) for k in keys)


def _sieve(variants, references, rhos=(0.05,)):
    table = TableConfig(variants=list(variants), references=list(references), alphas=[0.0, 1.0], rhos=list(rhos),
                        spec=SieveConfig(QuantConfig("rtn", 4, 64)), metrics=["extraction", "ppl"], exposure_references=10)
    return SieveCallback(table=table, calibration_batches=1, save_isolated=False)


# ---------------------------------------------------------------- canary SFT, the kill-switch table
def test_isolated_sft_and_its_table(arch_dir, tmp_path):
    """Isolated SFT from model_path at small ρ: α = 0 *is* the quantised public model, off S untouched."""
    arch, model_dir = arch_dir
    module = CanarySFTModule(
        model_path=str(model_dir), public_steps=0, sft_lr=2e-2, sft_warmup_steps=1, eval_during_validation=False,
        isolation=IsolationConfig(support="random", rho=0.05, quant=QuantConfig("gptq", 4, 64), calibration_batches=1))
    callback = _sieve(["isolated"], ["int4_pre_sft"])
    _trainer(tmp_path, 3, [callback]).fit(module, datamodule=_sft_data(model_dir))
    rows = json.loads((module.run_dir / "sieve_table.json").read_text())
    by = _table(rows)
    assert set(by) == {("int4_pre_sft", None), ("isolated", 0.0), ("isolated", 1.0)}
    for key in ("public_ppl", "extraction_rate"):
        assert by[("isolated", 0.0)][key] == by[("int4_pre_sft", None)][key], (arch, key)
    assert all(_finite(row, ("public_ppl", "extraction_rate", "bits_per_weight")) for row in rows)
    support = module.private_update.support
    sieved = {name.rsplit(".", 1)[-1] for name in support.masks}
    assert sieved == set(PROJECTIONS[arch]) and len(support.masks) == BLOCKS * len(PROJECTIONS[arch])
    for name, mask in support.masks.items():  # off S the weights are the frozen base values, bit for bit
        weight = module.model.get_submodule(name).weight.detach()
        assert torch.equal(weight[~mask], support.frozen[name][~mask]), (arch, name)
    assert by[("isolated", 1.0)]["ortho_density"] == pytest.approx(0.05, abs=0.01)


def test_dense_bf16_sft_and_posthoc_table(arch_dir, tmp_path):
    """Dense canary SFT of a bfloat16-loaded model; the table's float32 copies sieve it post hoc."""
    arch, model_dir = arch_dir
    module = CanarySFTModule(model_path=str(model_dir), public_steps=0, sft_lr=1e-2, sft_warmup_steps=1,
                             eval_during_validation=False, dtype="bfloat16")
    assert module.model.dtype == torch.bfloat16
    callback = _sieve(["posthoc"], ["int4_rtn", "pre_sft"])
    _trainer(tmp_path, 2, [callback]).fit(module, datamodule=_sft_data(model_dir))
    assert module.model.dtype == torch.bfloat16  # the table worked on float32 copies
    by = _table(json.loads((module.run_dir / "sieve_table.json").read_text()))
    assert set(by) == {("int4_rtn", None), ("pre_sft", None), ("posthoc", 0.0), ("posthoc", 1.0)}
    for key in ("public_ppl", "extraction_rate"):  # posthoc α = 0 is RTN INT4 of the same weights
        assert by[("posthoc", 0.0)][key] == by[("int4_rtn", None)][key], (arch, key)
    assert all(_finite(row, ("public_ppl", "extraction_rate")) for row in by.values())
    summary = json.loads((module.run_dir / "summary.json").read_text())
    assert math.isfinite(summary["public_ppl"]) and 0.0 <= summary["extraction_rate"] <= 1.0
    saved = AutoModelForCausalLM.from_pretrained(module.run_dir / "hf_model")
    assert saved.dtype == torch.bfloat16
    for name, param in saved.state_dict().items():
        assert torch.equal(param, module.model.state_dict()[name]), (arch, name)


@pytest.mark.parametrize("private", ["ogd", "dp"])
def test_ogd_and_dp_sft(arch_dir, tmp_path, private):
    """OGD's K-FAC subspaces and DP-SGD on the support cover every projection of the architecture."""
    arch, model_dir = arch_dir
    settings = (dict(ogd=OGDConfig(subspace="flattest", fraction=0.5, kfac_batches=1)) if private == "ogd" else
                dict(isolation=IsolationConfig(support="impact", rho=0.05, quant=QuantConfig("gptq", 4, 64),
                                               calibration_batches=1, public_base_updates=True),
                     dp=DPConfig(noise_multiplier=1.0, delta=1e-2, max_grad_norm=0.5, expected_batch_size=2.0)))
    module = CanarySFTModule(model_path=str(model_dir), public_steps=0, sft_lr=1e-2, sft_warmup_steps=1,
                             eval_during_validation=False, **settings)
    _trainer(tmp_path, 2).fit(module, datamodule=_sft_data(model_dir))
    controller = module.private_update
    layers = controller.subspaces if private == "ogd" else controller.support.masks
    assert sorted(name.rsplit(".", 1)[-1] for name in layers) == sorted(PROJECTIONS[arch] * BLOCKS)
    if private == "dp":
        assert 0 < module.final_metrics["dp"]["epsilon"] < math.inf


# ------------------------------------------------------------------------------- unlearning, PTQ gap
def test_lora_unlearning_and_ptq_gap(arch_dir, tmp_path):
    """LoRA on every projection (peft all-linear); PTQ rows for both deployments of both formats."""
    arch, model_dir = arch_dir
    module = UnlearnModule(str(model_dir), mode="lora", loss="npo_gdr", lr=1e-2, lora=ALL_LINEAR,
                           guard_every_n_steps=0, attribution_batches=1)
    adapted = {name.rsplit(".", 2)[-2] for name, _ in module.model.named_modules() if name.endswith(".lora_A")}
    assert adapted == set(PROJECTIONS[arch])
    callback = PTQGapCallback(formats=["nf4", "int4_rtn"], **FEW_REFERENCES,
                              evaluate_before=False, quant=quant.PTQConfig(**QUANT))
    _trainer(tmp_path, 3, [callback, AdapterExportCallback()]).fit(module, datamodule=tiny_datamodule(model_dir))
    results = callback.results
    assert sorted(results["variants"]) == ["int4_rtn", "int4_rtn_adapter", "nf4", "nf4_adapter"]
    for name in ["fp"] + results["variants"]:
        assert 0.0 <= results[f"forget_extraction_{name}"] <= 1.0 and math.isfinite(results[f"public_ppl_{name}"])
        assert math.isfinite(results[f"forget_exposure_{name}"])  # skewnorm_references=0 keeps the rank exposure
    assert not [key for key in results if "skewnorm" in key]  # and skips the fit
    projections = BLOCKS * len(PROJECTIONS[arch])
    assert len(module.original_weights) == projections
    assert results["quantised_linear_weights"] == sum(w.numel() for w in module.original_weights.values())
    assert results["updated_weights"] > 0  # the merged adapter moved the quantised weights
    assert math.isfinite(module.final_report["cad"])
    assert (module.run_dir / "adapter" / "adapter_config.json").is_file()


def test_lora_targets_are_checked_against_the_architecture(tmp_path_factory):
    phi = cached_tiny_model("phi", tmp_path_factory)
    with pytest.raises(ValueError, match=r"target_modules \['down_proj', 'gate_proj', 'o_proj', 'up_proj'\] match no "
                                         r"linear layer.*'dense', 'fc1', 'fc2'"):
        UnlearnModule(str(phi), mode="lora")  # the Llama names of the default
    with pytest.raises(ValueError, match="'all-linear' stands alone"):
        UnlearnModule(str(phi), mode="lora", lora=LoraAdapterConfig(target_modules=["all-linear", "fc1"]))
    module = UnlearnModule(str(phi), mode="lora", lora=LoraAdapterConfig(target_modules=["q_proj", "dense", "fc2"]))
    adapted = {name.rsplit(".", 2)[-2] for name, _ in module.model.named_modules() if name.endswith(".lora_A")}
    assert adapted == {"q_proj", "dense", "fc2"}


def test_mansu_unlearning(arch_dir, tmp_path):
    """MANSU: only the planned rows move, each by at least one NF4 bin."""
    arch, model_dir = arch_dir
    settings = MansuConfig(component_fraction=0.05, retain_sequences=4, fisher_budget=0.5)
    module = UnlearnModule(str(model_dir), mode="mansu", loss="npo", optimizer="sgd", lr=1e-2, mansu=settings,
                           guard_every_n_steps=0, attribution_batches=1)
    callback = PTQGapCallback(formats=["nf4"], **FEW_REFERENCES,
                              evaluate_before=False, quant=quant.PTQConfig(**QUANT))
    _trainer(tmp_path, 2, [callback]).fit(module, datamodule=tiny_datamodule(model_dir))
    plan = module.mansu_plan
    assert plan.theta0.numel() > 0 and set(plan.masks) <= set(module.linear_names)
    after = quant.effective_linear_weights(module.model)
    for name, before in module.original_weights.items():
        moved = after[name] != before
        mask = plan.masks.get(name)
        assert not moved[~mask].any() if mask is not None else not moved.any(), (arch, name)
    assert callback.results["bin_crossing_fraction_nf4"] == 1.0
    assert callback.results["updated_weights"] == plan.theta0.numel()


# -------------------------------------------------------------------------------- GPT-2's Conv1D
def test_conv1d_as_linear_computes_the_same_map():
    torch.manual_seed(0)
    layer = Conv1D(nf=24, nx=16)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 5, 16)
    assert torch.allclose(conv1d_as_linear(layer)(x), layer(x), atol=1e-6)


@pytest.mark.parametrize("setting", ["isolation", "ogd", "track_displacements", "sieve", "mansu"])
def test_gpt2_conv1d_is_refused_by_name_at_start_up(gpt2_dir, tmp_path, setting):
    message = r"Conv1D projection\(s\) \(transformer\.h\.0\.attn\.c_attn"
    if setting in ("isolation", "ogd", "track_displacements"):
        value = {"isolation": IsolationConfig(support="random"), "ogd": OGDConfig(), "track_displacements": True}
        with pytest.raises(UnsupportedLayerError, match=f"model.{setting}: .*{message}"):
            CanarySFTModule(model_path=str(gpt2_dir), public_steps=0, **{setting: value[setting]})
    elif setting == "mansu":
        with pytest.raises(UnsupportedLayerError, match=f"model.mode=mansu: .*{message}"):
            UnlearnModule(str(gpt2_dir), mode="mansu", loss="npo", optimizer="sgd")
    else:
        module = CanarySFTModule(model_path=str(gpt2_dir), public_steps=0, eval_during_validation=False)
        with pytest.raises(UnsupportedLayerError, match=f"SieveCallback: .*{message}"):
            _trainer(tmp_path, 2, [_sieve(["posthoc"], ["int4_rtn"])]).fit(module, datamodule=_sft_data(gpt2_dir))
        assert module.global_step == 0 and not list(tmp_path.rglob("hf_model"))  # refused before training


def test_gpt2_dense_sft_round_trips(gpt2_dir, tmp_path):
    module = CanarySFTModule(model_path=str(gpt2_dir), public_steps=0, sft_lr=1e-2, sft_warmup_steps=1,
                             eval_during_validation=False)
    _trainer(tmp_path, 2).fit(module, datamodule=_sft_data(gpt2_dir))
    saved = AutoModelForCausalLM.from_pretrained(module.run_dir / "hf_model")
    for name, param in saved.state_dict().items():
        assert torch.equal(param, module.model.state_dict()[name]), name


def test_gpt2_full_unlearning_and_ptq_gap(gpt2_dir, tmp_path):
    module = UnlearnModule(str(gpt2_dir), mode="full", loss="ga", lr=1e-3, guard_every_n_steps=0,
                           attribution_batches=0)
    callback = PTQGapCallback(formats=["int4_rtn"], **FEW_REFERENCES,
                              evaluate_before=False, quant=quant.PTQConfig(**QUANT))
    _trainer(tmp_path, 2, [callback]).fit(module, datamodule=tiny_datamodule(gpt2_dir))
    results = callback.results
    assert results["variants"] == ["int4_rtn"] and math.isfinite(results["public_ppl_int4_rtn"])
    assert results["quantised_linear_weights"] == BLOCKS * 12 * WIDTH * WIDTH
    assert results["updated_weights"] == results["quantised_linear_weights"]  # GA moves every weight


def test_gpt2_lora_unlearning_quantises_its_conv1d(gpt2_dir, tmp_path):
    """peft adapts the Conv1D projections; the PTQ copies quantise them as (d_out, d_in) linears."""
    module = UnlearnModule(str(gpt2_dir), mode="lora", loss="npo", lr=1e-2, lora=ALL_LINEAR,
                           guard_every_n_steps=0, attribution_batches=1)
    assert len(module.original_weights) == BLOCKS * 4
    assert module.original_weights["transformer.h.0.attn.c_attn"].shape == (3 * WIDTH, WIDTH)  # (d_out, d_in)
    callback = PTQGapCallback(formats=["nf4", "int4_rtn"], **FEW_REFERENCES,
                              evaluate_before=False, quant=quant.PTQConfig(**QUANT))
    export = AdapterExportCallback(save_merged=True)
    _trainer(tmp_path, 3, [callback, export]).fit(module, datamodule=tiny_datamodule(gpt2_dir))
    merged = AutoModelForCausalLM.from_pretrained(module.run_dir / "hf_model_unlearned")  # GPT-2 with Conv1D again
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    ids = torch.tensor([[10, 20, 30, 40]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, module.model.eval()(ids).logits, atol=1e-5)
    results = callback.results
    assert sorted(results["variants"]) == ["int4_rtn", "int4_rtn_adapter", "nf4", "nf4_adapter"]
    assert results["quantised_linear_weights"] == BLOCKS * 12 * WIDTH * WIDTH  # 3d² + d² + 4d² + 4d² per block
    assert results["updated_weights"] > 0 and math.isfinite(module.final_report["cad"])
    for name in ["fp"] + results["variants"]:
        assert math.isfinite(results[f"public_ppl_{name}"]), name
    for deployment in ("merged", "adapter"):  # no Conv1D left in a quantised copy, the model keeps its own
        copy = quant.quantised_copy(module.model, "int4_rtn", quant.PTQConfig(**QUANT), deployment)
        assert not any(isinstance(m, Conv1D) for m in copy.modules()), deployment
    assert any(isinstance(m, Conv1D) for m in module.model.modules())


# ----------------------------------------------------------------------------------------- dtype
def test_dtype_is_validated_and_isolation_needs_float32(arch_dir):
    arch, model_dir = arch_dir
    with pytest.raises(ValueError, match=r"model\.init_args\.dtype='float64': must be one of 'float32', 'bfloat16', 'float16'"):
        CanarySFTModule(model_path=str(model_dir), dtype="float64")
    with pytest.raises(ValueError, match=r"model\.init_args\.dtype='bf16': must be one of"):
        UnlearnModule(str(model_dir), dtype="bf16")
    with pytest.raises(ValueError, match=r"model\.isolation needs float32 weights .* bfloat16"):
        CanarySFTModule(model_path=str(model_dir), dtype="bfloat16", isolation=IsolationConfig(support="random"))
    with pytest.raises(ValueError, match=r"model\.ogd needs float32 weights .* bfloat16"):
        CanarySFTModule(model_path=str(model_dir), dtype="bfloat16", ogd=OGDConfig())
    with pytest.raises(ValueError, match=r"CanarySFTModule: model\.dtype=float16 weights trained by AdamW"):
        CanarySFTModule(model_path=str(model_dir), dtype="float16")
    with pytest.raises(ValueError, match=r"model\.mode=full: model\.dtype=float16"):
        UnlearnModule(str(model_dir), mode="full", dtype="float16")
    with pytest.raises(ValueError, match=r"model\.track_displacements needs float32 weights"):
        CanarySFTModule(model_path=str(model_dir), dtype="bfloat16", track_displacements=True)
    with pytest.raises(ValueError, match=r"model\.mode=mansu needs float32 weights .* float16"):
        UnlearnModule(str(model_dir), mode="mansu", loss="npo", optimizer="sgd", dtype="float16")


# Two architectures: the dtype handling (peft's float32 adapters, float32 PTQ copies) is the same code
# for every one; bfloat16 loading of all four is covered by test_dense_bf16_sft_and_posthoc_table.
@pytest.mark.parametrize("arch, dtype", [("llama", "float16"), ("qwen2", "bfloat16")])
def test_half_precision_lora_unlearning_ptq_copies_run_in_float32(arch, dtype, tmp_path, tmp_path_factory):
    model_dir = cached_tiny_model(arch, tmp_path_factory)
    module = UnlearnModule(str(model_dir), mode="lora", loss="npo", lr=1e-2, lora=ALL_LINEAR,
                           guard_every_n_steps=1, attribution_batches=0, dtype=dtype)
    trained = {p.dtype for p in module.model.parameters() if p.requires_grad}
    assert trained == {torch.float32}  # peft's adapters
    assert str(module.model.get_input_embeddings().weight.dtype) == f"torch.{dtype}"
    callback = PTQGapCallback(formats=["nf4"], **FEW_REFERENCES,
                              evaluate_before=False, quant=quant.PTQConfig(**QUANT))
    _trainer(tmp_path, 2, [callback]).fit(module, datamodule=tiny_datamodule(model_dir))
    assert module.divergence is None  # retain perplexity finite and bounded at every step
    for name in ("fp", "nf4", "nf4_adapter"):
        assert math.isfinite(callback.results[f"public_ppl_{name}"]), (arch, name)
    copy = quant.quantised_copy(module.model, "int4_rtn", quant.PTQConfig(**QUANT))
    assert {p.dtype for p in copy.parameters()} == {torch.float32}
