"""OGD-projected canary SFT: the private displacement stays out of S_gen, α = 0 never sees a canary."""
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from ortho_callbacks.sieve import SieveCallback
from ortho_train.datamodule import CanaryDataModule
from ortho_train.kfac import component_in
from ortho_train.models import TinyLlamaConfig, build_tiny_llama
from ortho_train.ogd import OGDConfig, SubspaceDelta
from ortho_train.private_update import OGDController, SubspaceStreams
from ortho_train.sft_module import CanarySFTModule
from ortho_train.sieve.isolation import IsolationConfig
from ortho_train.measurement.kill_switch import TableConfig
from tests.script_loader import load_script

TINY = TinyLlamaConfig(32, 2, 2, 64)


def _fit(tmp, canary_seed=0, ogd=None, callbacks=()):
    torch.manual_seed(0)
    module = CanarySFTModule(tiny_llama=TINY, public_steps=3, lr=1e-2, sft_lr=2e-2, warmup_steps=1,
                             sft_warmup_steps=1, eval_during_validation=False, weight_decay=0.1,
                             ogd=ogd or OGDConfig(subspace="flattest", fraction=0.5, kfac_batches=2))
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, deterministic=True,
                        callbacks=list(callbacks))
    dm = CanaryDataModule(canary_secrets="seed", seq_len=64, batch_size=2, canary_batch_size=2, val_windows=2, secret_length=4,
                          num_member_canaries=3, num_holdout_canaries=4, num_reference_secrets=50,
                          canary_seed=canary_seed)
    trainer.fit(module, datamodule=dm)
    return module


@pytest.fixture(scope="module")
def ogd_fit(tmp_path_factory):
    table = SieveCallback(table=TableConfig(variants=["ogd"], references=["fp32", "pre_sft"], alphas=[0.0, 1.0],
                                            metrics=["extraction", "ppl"]), calibration_batches=1)
    return _fit(tmp_path_factory.mktemp("ogd"), callbacks=[table])


@torch.no_grad()
def test_private_displacement_has_no_component_in_s_gen_under_adamw(ogd_fit):
    controller = ogd_fit.private_update
    assert isinstance(controller, OGDController)
    for name, (dw, _) in controller.delta.items():
        sub = controller.subspaces[name]
        assert dw.norm() > 0, name  # the canaries did move the private stream
        inside = component_in(dw.double(), sub.basis, sub.mask).norm() / dw.double().norm()
        assert inside <= 1e-5, f"{name}: {float(inside):.2e} of ΔW_priv lies in S_gen"
        # (without projecting the applied step, AdamW puts ~40% of ΔW_priv back into S_gen here)
        assert sub.mask.float().mean() == pytest.approx(0.5, abs=0.01)
        w_pub, _ = controller.public[name]
        assert torch.equal(ogd_fit.model.get_submodule(name).weight, w_pub + dw), name  # W = W_pub + ΔW
    assert ogd_fit.final_metrics["ogd"]["private_in_subspace_max"] <= 1e-5


def test_alpha_zero_weights_are_bit_identical_across_two_secret_sets(tmp_path):
    # Both runs execute the same operations in the same order on the same public batches;
    # only the canary half differs, so any bit of difference at α = 0 is a leak.
    a, b = _fit(tmp_path / "a", canary_seed=1), _fit(tmp_path / "b", canary_seed=2)
    assert a.probe.members.texts != b.probe.members.texts
    with a.private_update.alpha_zero() as model_a:
        zero_a = {k: v.clone() for k, v in model_a.state_dict().items()}
    with b.private_update.alpha_zero() as model_b:
        zero_b = {k: v.clone() for k, v in model_b.state_dict().items()}
    for key, value in zero_a.items():
        assert torch.equal(value, zero_b[key]), key
    moved = sum(int(not torch.equal(v, a.pre_canary_state_dict[k])) for k, v in zero_a.items())
    assert moved >= 0.9 * len(zero_a)  # the public path did train during the canary phase
    full_a, full_b = a.model.state_dict(), b.model.state_dict()
    assert any(not torch.equal(full_a[k], full_b[k]) for k in full_a)  # α = 1 holds the secrets


def test_private_sees_public_changes_only_the_private_stream(tmp_path):
    # The public path's updates never read ΔW_priv, so which loss ΔW_priv descends cannot
    # change a bit of the α = 0 weights; it must change ΔW_priv (the public NLL at α = 1
    # now pulls on it too), and the projection must still hold.
    spec = dict(subspace="sharpest", fraction=0.5, kfac_batches=2)
    plain = _fit(tmp_path / "plain", ogd=OGDConfig(**spec))
    joint = _fit(tmp_path / "joint", ogd=OGDConfig(**spec, private_sees_public=True))
    for name, (w_pub, _) in plain.private_update.public.items():
        assert torch.equal(w_pub, joint.private_update.public[name][0]), name
    changed = [not torch.equal(plain.private_update.delta[n][0], joint.private_update.delta[n][0])
               for n in plain.private_update.delta]
    assert sum(changed) >= 0.9 * len(changed)
    assert joint.final_metrics["ogd"]["private_sees_public"] is True
    assert joint.final_metrics["ogd"]["private_in_subspace_max"] <= 1e-5
    # the α = 1 public pass on the first window of the two (private_public_fraction=0.5): again
    # only ΔW_priv moves, and differently from the pass over the whole batch
    half = _fit(tmp_path / "half", ogd=OGDConfig(**spec, private_sees_public=True, private_public_fraction=0.5))
    for name, (w_pub, _) in plain.private_update.public.items():
        assert torch.equal(w_pub, half.private_update.public[name][0]), name
        assert not torch.equal(half.private_update.delta[name][0], joint.private_update.delta[name][0]), name
    assert half.final_metrics["ogd"]["private_in_subspace_max"] <= 1e-5


@pytest.fixture(scope="module")
def parameter_basis_fit(tmp_path_factory):
    spec = dict(subspace="sharpest", fraction=0.5, kfac_batches=2, private_sees_public=True)
    return _fit(tmp_path_factory.mktemp("parameter"), ogd=OGDConfig(**spec))


@pytest.mark.parametrize("basis", ["eigenbasis", "parameter_step"])
def test_other_private_bases_keep_the_displacement_off_s_gen(tmp_path, parameter_basis_fit, basis):
    # eigenbasis: AdamW on the eigen-coefficients; S_gen coordinates get zero gradients, so zero
    # moments, and (decoupled decay keeps 0 at 0) stay exactly zero; ΔW_priv = U_G C U_Aᵀ.
    # parameter_step: the raw gradient enters AdamW, only the applied step is projected.
    # The public path never reads ΔW_priv: its weights are the parameter basis run's bit for bit.
    param = parameter_basis_fit
    spec = dict(subspace="sharpest", fraction=0.5, kfac_batches=2, private_sees_public=True)
    other = _fit(tmp_path / basis, ogd=OGDConfig(**spec, private_basis=basis))
    controller = other.private_update
    for name, (dw, _) in controller.delta.items():
        sub = controller.subspaces[name]
        assert dw.norm() > 0, name
        inside = component_in(dw.double(), sub.basis, sub.mask).norm() / dw.double().norm()
        assert inside <= 1e-5, f"{name}: {float(inside):.2e} of ΔW_priv lies in S_gen"
        assert torch.equal(other.model.get_submodule(name).weight, controller.public[name][0] + dw), name
        assert torch.equal(controller.public[name][0], param.private_update.public[name][0]), name
        assert not torch.equal(dw, param.private_update.delta[name][0])  # a different optimiser
        if basis == "eigenbasis":
            c = controller.stream.coefficients[name]
            assert torch.count_nonzero(c[sub.mask]) == 0 and c.norm() > 0, name
    summary = other.final_metrics["ogd"]
    assert summary["private_basis"] == basis and summary["private_in_subspace_max"] <= 1e-5
    restored = OGDController(controller.config)
    restored.setup(other)
    restored.load_state_dict(controller.state_dict())
    for name, (dw, _) in controller.delta.items():
        assert torch.equal(restored.delta[name][0], dw), name


def test_an_unknown_private_basis_fails_naming_the_setting():
    with pytest.raises(ValueError, match="ogd.private_basis='diagonal': must be one of 'parameter', 'parameter_step', 'eigenbasis'"):
        OGDConfig(private_basis="diagonal")


@torch.no_grad()
def test_streams_rebuild_alpha_one_and_report_bits(ogd_fit):
    streams = ogd_fit.private_streams()
    assert isinstance(streams, SubspaceStreams) and streams.variant == "ogd"
    controller = ogd_fit.private_update
    for name, (weight, _) in streams.weights_at(1.0).items():
        trained = ogd_fit.model.get_submodule(name).weight
        err = (weight - trained).abs().max() / controller.delta[name][0].abs().max()
        assert err < 2e-3, f"{name}: fp16 coefficients rebuild ΔW to {float(err):.1e}"
        assert torch.equal(streams.weights_at(0.0)[name][0], controller.public[name][0])
    bits = streams.bits_per_weight()
    assert bits["free_fraction"] == pytest.approx(0.5, abs=0.01)
    assert bits["coefficients"] == pytest.approx(16 * bits["free_fraction"])
    d = next(iter(streams.private.values()))
    assert isinstance(d, SubspaceDelta) and d.coefficients.dtype == torch.float16


def test_bad_ogd_settings_fail_at_start_up_naming_the_setting():
    with pytest.raises(ValueError, match="ogd.subspace='widest': must be one of"):
        OGDConfig(subspace="widest")
    with pytest.raises(ValueError, match="ogd.fraction must lie"):
        OGDConfig(fraction=1.0)
    with pytest.raises(ValueError, match="ogd.k=5000 is beyond layer"):
        CanarySFTModule(tiny_llama=TINY, ogd=OGDConfig(k=5000))  # 32×32 and 32×64 linears
    with pytest.raises(ValueError, match="ogd.k=65 is beyond layer"):
        CanarySFTModule(tiny_llama=TINY, ogd=OGDConfig(subspace="input_flattest", k=65))
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"ogd.private_public_fraction must lie in \(0, 1\]"):
            OGDConfig(private_sees_public=True, private_public_fraction=fraction)
    with pytest.raises(ValueError, match=r"ogd.private_public_fraction=0.5 < 1 needs ogd.private_sees_public=true"):
        OGDConfig(private_public_fraction=0.5)
    with pytest.raises(ValueError, match="isolation and ogd are mutually exclusive"):
        CanarySFTModule(tiny_llama=TINY, isolation=IsolationConfig(), ogd=OGDConfig())


def test_sieve_table_has_the_ogd_alpha_rows(ogd_fit):
    rows = json.loads((ogd_fit.run_dir / "sieve_table.json").read_text())
    assert [(r["variant"], r["alpha"]) for r in rows] == [("fp32", None), ("pre_sft", None),
                                                          ("ogd", 0.0), ("ogd", 1.0)]
    by = {(r["variant"], r["alpha"]): r for r in rows}
    bits = ogd_fit.private_streams().bits_per_weight()
    assert by[("ogd", 0.0)]["bits_per_weight"] == 32.0 and by[("ogd", 0.0)]["ortho_density"] == 0.0
    assert by[("ogd", 1.0)]["bits_per_weight"] == pytest.approx(32 + bits["coefficients"] + bits["basis"])
    assert by[("ogd", 1.0)]["public_ppl"] == pytest.approx(by[("fp32", None)]["public_ppl"], rel=1e-3)
    assert by[("ogd", 0.0)]["public_ppl"] != by[("ogd", 1.0)]["public_ppl"]
    assert "ogd: S_gen = flattest" in (ogd_fit.run_dir / "sieve_table.md").read_text()


def test_checkpoint_state_round_trip(ogd_fit):
    controller = ogd_fit.private_update
    restored = OGDController(controller.config)
    restored.setup(ogd_fit)
    restored.load_state_dict(controller.state_dict())
    for name, (dw, _) in controller.delta.items():
        assert torch.equal(restored.delta[name][0], dw) and torch.equal(restored.public[name][0],
                                                                         controller.public[name][0])
        assert torch.equal(restored.subspaces[name].mask, controller.subspaces[name].mask)
    assert restored.optimizer.state_dict()["state"].keys() == controller.optimizer.state_dict()["state"].keys()


def test_bench_prints_dense_and_ogd_steps_side_by_side(tmp_path, capsys):
    bench = load_script("ogd_step")

    result = bench.main(["--hidden", "16", "--blocks", "1", "--intermediate", "24", "--batch-size", "2",
                         "--seq-len", "16", "--canary-batch-size", "2", "--canary-len", "8", "--steps", "2",
                         "--kfac-batches", "2", "--json", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    assert "dense SFT step" in out and "OGD step" in out and "K-FAC refresh" in out
    assert result["ratio"] == pytest.approx(result["ogd_step_s"] / result["dense_step_s"])
    assert json.loads((tmp_path / "bench.json").read_text())["kfac_refresh_s"] > 0


def test_the_configs_documented_commands_give_valid_ogd_settings():
    """configs/ogd_sft.yaml's commented overrides (e.g. the paper's method) must start."""
    text = (Path(__file__).resolve().parents[2] / "configs/ogd_sft.yaml").read_text()
    shipped = yaml.safe_load(text)["model"]["init_args"]["ogd"]
    commands = [line for line in text.splitlines() if line.startswith("#") and "--model.init_args.ogd." in line]
    assert commands
    for line in commands:
        overrides = {k: yaml.safe_load(v) for k, v in re.findall(r"--model\.init_args\.ogd\.(\w+)=(\S+)", line)}
        OGDConfig(**(shipped | overrides))


def test_public_pass_at_alpha_one_is_estimated_from_the_first_windows():
    """f < 1: the first ⌈f·B⌉ windows' NLL, scaled to the whole batch's label tokens; f = 1 (or a
    fraction that rounds up to every window): the whole batch's summed NLL itself."""
    bench = load_script("ogd_step")
    BenchHost, _batch = bench.BenchHost, bench._batch

    generator = torch.Generator().manual_seed(0)
    public = _batch(4, 12, generator)  # (4, 12) windows
    public["labels"] = public["labels"].clone()
    public["labels"][0, :5] = -100  # unequal label counts: the weighting must use the real ones
    model = build_tiny_llama(TINY, 259, pad_token_id=0, eos_token_id=1)
    host = BenchHost(model, [public])
    full, tokens = host.nll_sum(public)
    first, first_tokens = host.nll_sum({k: v[:2] for k, v in public.items()})  # (2, 12)
    for fraction, expected in ((0.5, first * (tokens / first_tokens)), (0.9, full), (1.0, full)):
        controller = OGDController(OGDConfig(private_sees_public=True, private_public_fraction=fraction))
        controller.host = host
        assert torch.equal(controller._public_nll_at_one(public, tokens), expected), fraction
    assert not torch.allclose(first * (tokens / first_tokens), full)  # the subset is an estimate
