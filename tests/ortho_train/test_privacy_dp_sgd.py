"""DP-SGD on a support: per-example clipping, noise std σC on S only, isolation off S, accounting."""
import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

from ortho_train.metrics.logprobs import token_logprobs
from ortho_train.models import TinyLlamaConfig, build_tiny_llama
from ortho_train.privacy import (
    DPConfig,
    PoissonCanarySampler,
    PrivacyLedger,
    SupportDPStep,
    clip_per_example,
    module_masks_to_params,
)
from ortho_train.sieve import random_support


def _mean_nll(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp, mask = token_logprobs(logits, batch["labels"])
    return -(logp * mask).sum() / mask.sum()


def _tiny(seed=0):
    model = build_tiny_llama(TinyLlamaConfig(hidden_size=32, num_layers=2, num_heads=2,
                                             intermediate_size=64), vocab_size=40, pad_token_id=0,
                             eos_token_id=1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 40, (5, 12), generator=g)  # (B, T)
    attention = torch.ones_like(ids)
    attention[2, 9:] = 0  # right padding, as the canary collate makes it
    batch = {"input_ids": ids.masked_fill(attention == 0, 0), "attention_mask": attention,
             "labels": ids.masked_fill(attention == 0, -100)}
    return model, batch


def _support(model, rho=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n]
    return module_masks_to_params({n: random_support(tuple(model.get_submodule(n).weight.shape), rho, g)
                                   for n in names})


def test_per_example_grads_match_autograd_and_every_example_is_clipped():
    model, batch = _tiny()
    masks = _support(model)
    step = SupportDPStep(model, masks, _mean_nll, max_grad_norm=0.05, noise_multiplier=1.0,
                         expected_batch_size=5.0)
    grads = step.per_example_grads(batch)
    params = dict(model.named_parameters())
    for b in range(5):  # each example on its own through ordinary autograd (sdpa attention)
        one = {k: v[b: b + 1] for k, v in batch.items()}
        ref = torch.autograd.grad(_mean_nll(model, one), [params[n] for n in masks])
        for (name, mask), r in zip(masks.items(), ref):
            err = (grads[name][b] - r[mask]).abs().max().item()
            assert err < 1e-5 * (r.abs().max().item() + 1e-8) + 1e-7, f"{name} example {b}: {err}"
    clipped, norms = clip_per_example(grads, 0.05)
    assert bool((norms > 0.05).any()), "the test needs examples above the clip norm"
    for b in range(5):
        norm = math.sqrt(sum(float(g[b].double().square().sum()) for g in clipped.values()))
        assert norm <= 0.05 * (1 + 1e-5), f"example {b} has norm {norm} > C after clipping"
        if norms[b] <= 0.05:  # below C: unchanged
            assert all(torch.equal(clipped[n][b], grads[n][b]) for n in grads)
    assert model.config._attn_implementation == "sdpa", "the step must restore the attention"


def test_noise_has_std_sigma_c_on_support_and_nothing_off_it():
    layer = nn.Linear(400, 300, bias=False)
    mask = torch.rand(300, 400, generator=torch.Generator().manual_seed(1)) < 0.5
    sigma, clip, expected = 1.3, 0.7, 4.0
    step = SupportDPStep(layer, {"weight": mask}, lambda m, b: m(b["x"]).sum(), max_grad_norm=clip,
                         noise_multiplier=sigma, expected_batch_size=expected, seed=3)
    grads, stats = step.private_gradient(None)  # empty Poisson batch: the noise alone
    assert stats.batch_size == 0 and stats.noise_std == pytest.approx(sigma * clip)
    noise = grads["weight"][mask].double() * expected  # (m,) undo the division by q·n
    m = noise.numel()
    target = sigma * clip
    assert abs(float(noise.std()) - target) < 3 * target / math.sqrt(2 * m), float(noise.std())
    assert abs(float(noise.mean())) < 3 * target / math.sqrt(m)
    assert bool((grads["weight"][~mask] == 0).all())


def test_dp_step_touches_no_weight_off_support():
    model, batch = _tiny()
    masks = _support(model, rho=0.015)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = SupportDPStep(model, masks, _mean_nll, max_grad_norm=1.0, noise_multiplier=1.0,
                         expected_batch_size=5.0)
    stats = step(batch)
    assert stats.batch_size == 5
    for name, p in model.named_parameters():
        if name in masks:
            assert bool((p.grad[~masks[name]] == 0).all()), name
            assert bool((p.grad[masks[name]] != 0).all()), name
        else:
            assert p.grad is None, f"{name} is off S but got a gradient"
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for name, p in model.named_parameters():
        off = ~masks[name] if name in masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[off], before[name][off]), f"{name} moved off S"
        if name in masks:
            assert not torch.equal(p.detach()[masks[name]], before[name][masks[name]])


def test_existing_public_grad_off_support_is_kept():
    model, batch = _tiny()
    masks = _support(model)
    name = next(iter(masks))
    public = torch.full_like(dict(model.named_parameters())[name], 0.25)
    dict(model.named_parameters())[name].grad = public.clone()
    SupportDPStep(model, masks, _mean_nll, max_grad_norm=1.0, noise_multiplier=0.5,
                  expected_batch_size=5.0)(batch)
    g = dict(model.named_parameters())[name].grad
    assert torch.equal(g[~masks[name]], public[~masks[name]])


def test_global_baseline_covers_every_trainable_weight():
    model, batch = _tiny()
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)
    step = SupportDPStep(model, None, _mean_nll, max_grad_norm=1.0, noise_multiplier=0.5,
                         expected_batch_size=5.0)
    step(batch)
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


@pytest.mark.parametrize("accountant, cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_is_opacus_accountant(accountant, cls):
    ledger = PrivacyLedger(noise_multiplier=1.1, sample_rate=0.25, delta=1e-3, accountant=accountant)
    assert ledger.epsilon() == 0.0
    ledger.step(40)
    reference = cls()
    for _ in range(40):
        reference.step(noise_multiplier=1.1, sample_rate=0.25)
    assert ledger.steps == 40
    assert ledger.epsilon() == reference.get_epsilon(delta=1e-3)


def test_target_epsilon_calibrates_sigma():
    schedule = DPConfig(target_epsilon=4.0, delta=1e-3, expected_batch_size=5).resolve(20, steps=60)
    assert schedule.sample_rate == 0.25 and schedule.expected_batch_size == 5
    ledger = schedule.ledger()
    ledger.step(60)
    assert 4.0 - 0.05 <= ledger.epsilon() <= 4.0, ledger.epsilon()


def test_poisson_sampler_is_seeded_and_allows_empty_batches():
    sampler = PoissonCanarySampler(num_members=20, sample_rate=0.05, steps=400, seed=7)
    draws = list(sampler)
    assert draws == list(sampler) and len(draws) == 400
    sizes = torch.tensor([len(d) for d in draws], dtype=torch.float64)
    assert any(len(d) == 0 for d in draws)
    assert abs(float(sizes.mean()) - 1.0) < 3 * math.sqrt(20 * 0.05 * 0.95 / 400)
    assert all(0 <= i < 20 for d in draws for i in d)


@pytest.mark.parametrize("kwargs, setting", [
    ({"target_epsilon": 0.0, "expected_batch_size": 2}, "target_epsilon"),
    ({"target_epsilon": -1.0, "expected_batch_size": 2}, "target_epsilon"),
    ({"noise_multiplier": 1.0, "delta": 1.0, "sample_rate": 0.1}, "delta"),
    ({"noise_multiplier": 1.0, "delta": 0.0, "sample_rate": 0.1}, "delta"),
    ({"noise_multiplier": 1.0, "max_grad_norm": 0.0, "sample_rate": 0.1}, "max_grad_norm"),
    ({"noise_multiplier": 1.0, "target_epsilon": 1.0, "sample_rate": 0.1}, "target_epsilon"),
    ({"sample_rate": 0.1}, "noise_multiplier"),
    ({"noise_multiplier": 1.0}, "sample_rate"),
    ({"noise_multiplier": 1.0, "sample_rate": 1.5}, "sample_rate"),
    ({"noise_multiplier": 1.0, "sample_rate": 0.1, "accountant": "gdp"}, "accountant"),
])
def test_bad_settings_fail_naming_the_setting(kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        DPConfig(**kwargs)


def test_bad_resolve_and_masks_fail_naming_the_setting():
    with pytest.raises(ValueError, match="delta"):
        DPConfig(noise_multiplier=1.0, delta=0.1, sample_rate=0.1).resolve(20, 10)
    with pytest.raises(ValueError, match="expected_batch_size"):
        DPConfig(noise_multiplier=1.0, delta=1e-3, expected_batch_size=30).resolve(20, 10)
    model, _ = _tiny()
    with pytest.raises(ValueError, match="names no parameter"):
        SupportDPStep(model, {"model.layers.0.mlp.up_proj": torch.ones(64, 32, dtype=torch.bool)},
                      _mean_nll, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=1.0)


class _Branchy(nn.Module):
    """A model whose forward branches on a tensor value: vmap cannot trace it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        y = self.linear(x)
        return y * 2 if bool(y.sum() > 0) else y


def test_validate_fails_at_start_up_on_a_model_it_cannot_wrap():
    batch = {"x": torch.randn(3, 4)}
    step = SupportDPStep(_Branchy(), None, lambda m, b: m(b["x"]).square().mean(), max_grad_norm=1.0,
                         noise_multiplier=1.0, expected_batch_size=3.0)
    with pytest.raises(ValueError, match="dp cannot compute per-example gradients"):
        step.validate(batch)
    model, tiny_batch = _tiny()
    SupportDPStep(model, _support(model), _mean_nll, max_grad_norm=1.0, noise_multiplier=1.0,
                  expected_batch_size=5.0).validate(tiny_batch)


def test_pieces_compose_into_a_private_training_loop():
    model, members = _tiny()
    masks = _support(model, rho=0.05)
    schedule = DPConfig(noise_multiplier=1.0, delta=1e-3, expected_batch_size=2.0).resolve(5, steps=6)
    step = SupportDPStep.from_schedule(model, masks, _mean_nll, schedule)
    step.validate(members)
    ledger, optimizer = schedule.ledger(), torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sizes = []
    for indices in schedule.sampler():
        batch = {k: v[indices] for k, v in members.items()} if indices else None
        optimizer.zero_grad(set_to_none=True)
        sizes.append(step(batch).batch_size)
        optimizer.step()
        ledger.step()
    assert sizes == [len(i) for i in schedule.sampler()]
    report = ledger.report()
    assert report["steps"] == 6 and report["sample_rate"] == 0.4 and 0 < report["epsilon"] < math.inf
    for name, p in model.named_parameters():
        off = ~masks[name] if name in masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[off], before[name][off]), name


def test_resumed_step_continues_the_noise_stream():
    layer = nn.Linear(8, 4, bias=False)
    kwargs = dict(max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=1.0, seed=4)
    first = SupportDPStep(layer, None, lambda m, b: m(b["x"]).sum(), **kwargs)
    first.private_gradient(None)
    state = first.state_dict()
    expected, _ = first.private_gradient(None)
    resumed = SupportDPStep(layer, None, lambda m, b: m(b["x"]).sum(), **kwargs)
    resumed.load_state_dict(state)
    got, _ = resumed.private_gradient(None)
    assert torch.equal(got["weight"], expected["weight"])
    fresh, _ = SupportDPStep(layer, None, lambda m, b: m(b["x"]).sum(), **kwargs).private_gradient(None)
    assert not torch.equal(fresh["weight"], expected["weight"])
