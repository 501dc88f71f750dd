"""Isolation by construction: supports fixed before SFT, nothing moves off S, α=0 is Q(W_pre)."""
import lightning as L
import pytest
import torch

from ortho_train.datamodule import CanaryDataModule, pad_collate
from ortho_train.models import TinyLlamaConfig, build_tiny_llama, linear_layers
from ortho_train.ortho_linear import set_alpha
from ortho_train.quantisation import QuantConfig, quantise_layers
from ortho_train.sft_module import CanarySFTModule
from ortho_train.sieve import SieveConfig, build_dual_stream_model, sieve_model
from ortho_train.sieve.core import SievedLayer
from ortho_train.sieve.isolation import IsolationConfig, build_isolation
from ortho_kernels import OrthoStream


def _datamodule():
    dm = CanaryDataModule(canary_secrets="seed", seq_len=64, batch_size=2, canary_batch_size=2, val_windows=2, secret_length=4,
                          num_member_canaries=3, num_holdout_canaries=4, num_reference_secrets=50)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def isolated_fit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iso")
    module = CanarySFTModule(
        tiny_llama=TinyLlamaConfig(32, 2, 2, 64), public_steps=3, lr=1e-2, sft_lr=2e-2, warmup_steps=1,
        sft_warmup_steps=1, eval_during_validation=False, weight_decay=0.1,
        isolation=IsolationConfig(support="saliency_canary", rho=0.05, quant=QuantConfig("gptq", 4, 32),
                                  calibration_batches=2),
    )
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0)
    dm = _datamodule()
    trainer.fit(module, datamodule=dm)
    return module, dm


def test_no_weight_moves_off_the_support(isolated_fit):
    module, _ = isolated_fit
    support = module.private_update.support
    pre = module.pre_canary_state_dict
    moved_on_s = 0
    for name, weight in support.weights(module.model).items():
        mask = support.masks[name]
        assert torch.equal(weight.detach()[~mask], support.frozen[name][~mask]), name  # bit-identical
        assert torch.equal(support.frozen[name], support.bases[name].dequantise())  # train_on_base
        moved_on_s += int((weight.detach()[mask] != pre[f"{name}.weight"][mask]).sum())
    assert moved_on_s > 0.5 * sum(int(m.sum()) for m in support.masks.values())
    sieved = {f"{n}.weight" for n in support.masks}
    for key, value in module.model.state_dict().items():
        if key not in sieved:  # embeddings, norms, LM head: frozen
            assert torch.equal(value, pre[key]), key
    assert module.final_metrics["isolation"]["off_support_max_drift"] == 0.0
    assert module.final_metrics["isolation"]["density"] == pytest.approx(0.05, abs=0.002)


@torch.no_grad()
def test_alpha_zero_is_the_quantised_public_model_and_alpha_one_the_trained_one(isolated_fit):
    module, dm = isolated_fit
    support = module.private_update.support
    trained = module.model.eval()
    layers = sieve_model(trained, "isolated", SieveConfig(), supports=support.masks, bases=support.bases)
    dual = build_dual_stream_model(trained, layers)
    pre = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), len(dm.tokenizer), 0, 1)
    pre.load_state_dict(module.pre_canary_state_dict)
    public_int4 = build_dual_stream_model(pre, {n: SievedLayer(b, OrthoStream.empty(b.shape), {})
                                                for n, b in support.bases.items()}).eval()
    ids = pad_collate(dm.probe.members.full_ids, 0)["input_ids"]
    set_alpha(dual, 0.0)
    assert torch.equal(dual(ids).logits, public_int4(ids).logits)
    set_alpha(dual, 1.0)
    assert (dual(ids).logits - trained(ids).logits).abs().max() < 2e-3  # fp16 ortho values


def test_every_support_choice_is_exact_top_rho_and_they_differ():
    torch.manual_seed(0)
    dm = _datamodule()
    model = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), len(dm.tokenizer), 0, 1)
    public = lambda: dm.public_train_dataloader()  # noqa: E731
    canary = lambda: [pad_collate(dm.probe.members.full_ids, 0)]  # noqa: E731

    def loss(m, batch):
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss

    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {}
    for support in ("impact", "saliency_public", "saliency_canary", "random"):
        cfg = IsolationConfig(support=support, rho=0.05, quant=QuantConfig("rtn", 4, 32), calibration_batches=2)
        iso = build_isolation(model, cfg, public, canary, loss)
        for name, mask in iso.masks.items():
            assert int(mask.sum()) == int(torch.tensor(0.05 * mask.numel()).ceil()), (support, name)
        masks[support] = torch.cat([m.flatten() for m in iso.masks.values()])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])  # building supports does not touch the model
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            overlap = (masks[a] & masks[b]).sum() / masks[a].sum()
            assert overlap < 0.9, f"{a} and {b} pick nearly the same support ({overlap:.2f})"
    assert set(iso.masks) == set(linear_layers(model))


def test_true_sequential_isolation_bases_are_the_walk_over_the_public_batches():
    torch.manual_seed(0)
    dm = _datamodule()
    model = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), len(dm.tokenizer), 0, 1)
    public = lambda: dm.public_train_dataloader()  # noqa: E731
    spec = QuantConfig("gptq", 4, 32, true_sequential=True)
    cfg = IsolationConfig(support="random", rho=0.05, quant=spec, calibration_batches=2)
    with torch.random.fork_rng():  # the same two batches the isolation draws
        batches = [b for _, b in zip(range(2), public())]
    iso = build_isolation(model, cfg, public, lambda: [], lambda m, b: None)
    expected = quantise_layers(model, linear_layers(model), spec, batches)
    for name, base in iso.bases.items():
        assert torch.equal(base.qweight, expected[name].qweight), name
    flat = quantise_layers(model, linear_layers(model), QuantConfig("gptq", 4, 32), batches)
    assert not torch.equal(iso.bases["model.layers.1.mlp.down_proj"].qweight,
                           flat["model.layers.1.mlp.down_proj"].qweight)


def test_bad_isolation_settings():
    with pytest.raises(ValueError, match="support"):
        IsolationConfig(support="oracle")
    with pytest.raises(ValueError, match="rho"):
        IsolationConfig(rho=0.0)
    with pytest.raises(ValueError, match="public_lr must be positive"):
        IsolationConfig(public_base_updates=True, public_lr=0.0)
    with pytest.raises(ValueError, match="public_updates_fraction must lie"):
        IsolationConfig(public_base_updates=True, public_updates_fraction=0.0)
    with pytest.raises(ValueError, match="need public_base_updates"):
        IsolationConfig(public_lr=1e-3)  # would silently do nothing


def _public_update_fit(tmp, canary_seed, public_lr=None, fraction=1.0, support="impact", dsm=None,
                      support_objective="batch"):
    torch.manual_seed(0)
    module = CanarySFTModule(
        tiny_llama=TinyLlamaConfig(32, 2, 2, 64), public_steps=3, lr=1e-2, sft_lr=2e-2, warmup_steps=1,
        sft_warmup_steps=1, eval_during_validation=False, weight_decay=0.1,
        isolation=IsolationConfig(support=support, rho=0.05, quant=QuantConfig("gptq", 4, 32),
                                  calibration_batches=2, public_base_updates=True, public_lr=public_lr,
                                  public_updates_fraction=fraction, dsm=dsm,
                                  support_objective=support_objective),
    )
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, deterministic=True)
    dm = CanaryDataModule(canary_secrets="seed", seq_len=64, batch_size=2, canary_batch_size=2, val_windows=2, secret_length=4,
                          num_member_canaries=3, num_holdout_canaries=4, num_reference_secrets=50,
                          canary_seed=canary_seed)
    trainer.fit(module, datamodule=dm)
    return module


@torch.no_grad()
def _alpha_zero_state(module):
    with module.private_update.support.alpha_zero(module.model):
        return {k: v.clone() for k, v in module.model.state_dict().items()}


@pytest.mark.parametrize("support_objective", ["batch", "canaries", "canaries_kl"])
def test_public_base_updates_train_the_base_without_seeing_canaries(tmp_path, support_objective):
    a = _public_update_fit(tmp_path / "a", canary_seed=1, support_objective=support_objective)
    b = _public_update_fit(tmp_path / "b", canary_seed=2, support_objective=support_objective)
    assert a.probe.members.texts != b.probe.members.texts
    zero_a, zero_b = _alpha_zero_state(a), _alpha_zero_state(b)
    moved = 0
    for key, value in zero_a.items():  # the α = 0 weights: bit-identical across the two secrets
        assert torch.equal(value, zero_b[key]), key
        moved += int((value != a.pre_canary_state_dict[key]).any())
    assert moved >= 0.9 * len(zero_a)  # ... and they did train (norms, embeddings, off S)
    on_s = [(w.detach()[m] != b.model.get_submodule(n).weight.detach()[m]).any()
            for n, w, m in ((n, w, a.private_update.support.masks[n])
                            for n, w in a.private_update.support.weights(a.model).items())]
    assert any(on_s)  # the entries on S did see the secrets
    streams = a.private_streams()
    assert not streams.bases_are_pre and streams.rho == 0.05
    for name, base in streams.bases.items():  # re-quantised from the public-trained weights
        assert not torch.equal(base.qweight, a.private_update.support.bases[name].qweight), name
    assert a.final_metrics["isolation"]["public_base_updates"] is True


def test_canaries_objective_trains_the_support_on_the_canary_loss_alone(tmp_path):
    """support_objective 'canaries': backward runs on the canaries' mean NLL, S's gradient is
    ∇ of that NLL on S (no public term), and train/loss is the token-weighted mix."""
    module = _public_update_fit(tmp_path, canary_seed=1, support_objective="canaries", fraction=0.5)
    controller, model = module.private_update, module.model
    loaders = module.trainer.datamodule.train_dataloader()
    batch = {"public": next(iter(loaders["public"])), "canary": next(iter(loaders["canary"]))}
    parts = controller.training_loss(batch)
    canary_nll, canary_tokens = module.nll_sum(batch["canary"])
    public_nll, public_tokens = module.nll_sum(batch["public"])
    assert torch.allclose(parts.loss, canary_nll / canary_tokens)
    assert torch.allclose(parts.canary, canary_nll / canary_tokens)
    mixed = (public_nll + canary_nll) / (public_tokens + canary_tokens)  # the base is frozen here
    assert torch.allclose(parts.logged, mixed, rtol=1e-5)
    params = dict(model.named_parameters())
    support = controller.support
    name = next(iter(support.masks))
    weight = params[name + ".weight"]
    (expected,) = torch.autograd.grad(canary_nll / canary_tokens, [weight])
    model.zero_grad()
    parts.loss.backward()
    mask = support.masks[name]
    assert torch.allclose(weight.grad[mask], expected[mask], rtol=1e-5, atol=1e-8)


def test_bad_support_objective():
    with pytest.raises(ValueError, match="support_objective"):
        IsolationConfig(support_objective="public")
    with pytest.raises(ValueError, match="public_kl_weight needs support_objective: canaries_kl"):
        IsolationConfig(public_kl_weight=0.5)
    with pytest.raises(ValueError, match="public_kl_weight must be positive"):
        IsolationConfig(support_objective="canaries_kl", public_kl_weight=0.0)


def test_kl_from_reference_hand_value():
    from ortho_train.private_update.public_kl import kl_from_reference
    p = torch.tensor([[0.5, 0.5], [0.25, 0.75]]).log()
    q = torch.tensor([[0.9, 0.1], [0.25, 0.75]]).log()
    # row 0: 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.51083; row 1: 0
    assert kl_from_reference(p, q).item() == pytest.approx(0.51083 / 2, abs=1e-5)
    assert kl_from_reference(q, q).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_canaries_kl_objective_is_canary_nll_plus_kl_to_alpha_zero(tmp_path, fraction):
    """support_objective 'canaries_kl': loss = NLL_canaries + λ·KL(α = 0 ‖ α = 1) on the public
    batch, with α = 0 from the public-update pass (fraction 1.0) or a no-grad pass once the
    base is frozen (0.5); the KL is 0 where S holds its public values."""
    import torch.nn.functional as F
    module = _public_update_fit(tmp_path, canary_seed=1, support_objective="canaries_kl", fraction=fraction)
    controller, model = module.private_update, module.model
    loaders = module.trainer.datamodule.train_dataloader()
    batch = {"public": next(iter(loaders["public"])), "canary": next(iter(loaders["canary"]))}
    model.zero_grad()
    parts = controller.training_loss(batch)
    controller._public_grads = None
    canary_nll, canary_tokens = module.nll_sum(batch["canary"])
    public = batch["public"]
    keep = public["labels"][:, 1:] != -100  # (B, T-1)

    def logp_rows():
        logits = model(input_ids=public["input_ids"], attention_mask=public["attention_mask"]).logits
        return logits[:, :-1][keep].log_softmax(-1)  # (B, T-1, V) -> (M, V)

    with torch.no_grad(), controller.support.alpha_zero(model):
        reference = logp_rows()
    with torch.no_grad():
        full = logp_rows()
    kl = F.kl_div(full, reference, log_target=True, reduction="sum") / keep.sum()
    assert kl > 1e-6  # the trained S moved the public distributions, a little (the anchor holds them)
    assert parts.loss.item() == pytest.approx((canary_nll / canary_tokens + kl).item(), rel=1e-4)
    public_nll = -full.gather(1, public["labels"][:, 1:][keep][:, None]).sum()
    mixed = (public_nll + canary_nll) / (keep.sum() + canary_tokens)  # the full model's NLL
    assert parts.logged.item() == pytest.approx(mixed.item(), rel=1e-4)
    with controller.support.alpha_zero(model):  # at S = public values the anchor is 0
        controller._targets.refresh(model, public)
        zero, _ = controller._targets.kl(model, public)
    assert zero.item() == pytest.approx(0.0, abs=1e-6)


def test_dsm_support_fit_keeps_alpha_zero_independent_of_the_secrets(tmp_path):
    from ortho_train.sieve.dsm import DSMConfig

    a = _public_update_fit(tmp_path / "a", canary_seed=1, support="dsm", dsm=DSMConfig(probes=2))
    b = _public_update_fit(tmp_path / "b", canary_seed=2, support="dsm", dsm=DSMConfig(probes=2))
    assert a.probe.members.texts != b.probe.members.texts
    for name, mask in a.private_update.support.masks.items():  # S from public text: the same S
        assert torch.equal(mask, b.private_update.support.masks[name]), name
    zero_a, zero_b = _alpha_zero_state(a), _alpha_zero_state(b)
    for key, value in zero_a.items():  # the α = 0 weights: bit-identical across the two secrets
        assert torch.equal(value, zero_b[key]), key
    support = a.private_update.support
    assert any((w.detach()[support.masks[n]] != b.model.get_submodule(n).weight.detach()[support.masks[n]]).any()
               for n, w in support.weights(a.model).items())  # S did train on the secrets
    summary = a.final_metrics["isolation"]
    assert summary["support"] == "dsm" and "public" in summary["support_sees"]
    assert summary["density"] == pytest.approx(0.05, abs=0.002)


def test_split_clipping_bounds_public_and_private_parts_separately():
    from ortho_train.sieve.public_updates import clip_split_

    w, other = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(3))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0] = True
    w.grad = torch.where(mask, 100.0, 0.01)  # private part huge, public part small
    other.grad = torch.full((3,), 0.01)
    public_before = w.grad[~mask].clone()
    clip_split_([w, other], {id(w): mask}, max_norm=1.0)
    assert w.grad[mask].norm() == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(w.grad[~mask], public_before)  # the canaries' norm does not shrink it
    assert torch.equal(other.grad, torch.full((3,), 0.01))


def test_public_lr_scales_the_update_off_the_support_only(tmp_path):
    full = _public_update_fit(tmp_path / "full", canary_seed=1)
    slow = _public_update_fit(tmp_path / "slow", canary_seed=1, public_lr=2e-5)  # 1/1000 of sft_lr
    support = full.private_update.support
    for name in support.masks:
        mask = support.masks[name]
        start = support.frozen[name]  # the off-S weights at the switch (train_on_base)
        moved_full = (full.model.get_submodule(name).weight.detach() - start)[~mask].abs().max()
        moved_slow = (slow.model.get_submodule(name).weight.detach() - start)[~mask].abs().max()
        assert moved_slow < 0.01 * moved_full, name  # off S: ~1000x smaller steps
        on_s_full = full.model.get_submodule(name).weight.detach()[mask]
        on_s_slow = slow.model.get_submodule(name).weight.detach()[mask]
        assert (on_s_slow - full.pre_canary_state_dict[f"{name}.weight"][mask]).abs().max() > 1e-3
        assert on_s_full.shape == on_s_slow.shape


@torch.no_grad()
def test_public_updates_fraction_freezes_a_requantised_base_for_the_tail(tmp_path):
    module = _public_update_fit(tmp_path, canary_seed=1, fraction=0.5)  # 5 canary steps: 3 + 2
    support = module.private_update.support
    streams = module.private_streams()
    bases = streams.bases
    assert not streams.bases_are_pre and bases is support.bases
    for name, weight in support.weights(module.model).items():
        mask = support.masks[name]
        assert torch.equal(weight[~mask], bases[name].dequantise()[~mask]), name  # on the grid
    assert module.final_metrics["isolation"]["off_support_max_drift"] == 0.0
    pre = module.pre_canary_state_dict
    moved = [not torch.equal(v, pre[k]) for k, v in module.model.state_dict().items()
             if k.endswith("norm.weight")]
    assert all(moved)  # the norms trained on public text before the freeze
