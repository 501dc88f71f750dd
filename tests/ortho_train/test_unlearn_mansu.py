"""MANSU pieces: attribution (against finite differences), CAD, null-space projection,
magnitude floor, diagonal-Fisher bound and pruning, and a plan on a tiny model."""
import pytest
import torch

from ortho_train import quantisation as quant
from ortho_train.models import load_causal_lm
from ortho_train.unlearning import attribution, mansu
from ortho_train.unlearning.common import sequence_nll
from ortho_train.unlearning.mansu_setup import build_mansu_plan
from tests.ortho_train.unlearn_helpers import cached_tiny_canary_model, single_thread, tiny_datamodule  # noqa: F401


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return cached_tiny_canary_model(tmp_path_factory)


def test_attribution_is_the_first_order_ablation_effect(model_dir):
    model = load_causal_lm(model_dir)
    batch = next(iter(tiny_datamodule(model_dir).forget_dataloader(shuffle=False)))
    name, unit = "model.layers.1.mlp.down_proj", 5
    scores = attribution.unit_attribution(model, [batch], sequence_nll, [name])
    module = model.get_submodule(name)

    def losses(scale):
        handle = module.register_forward_hook(lambda m, a, out: out * torch.where(
            torch.arange(out.shape[-1]) == unit, scale, 1.0))
        try:
            with torch.no_grad():
                return sequence_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"]).double()
        finally:
            handle.remove()

    eps = 1e-2  # dL_s/dε for y_j ← (1 − ε)·y_j, central difference
    derivative = (losses(1 - eps) - losses(1 + eps)) / (2 * eps)
    assert scores[name][unit].item() == pytest.approx(derivative.abs().mean().item(), rel=2e-2)


def test_select_components_and_cad_golden():
    forget = {"a": torch.tensor([8.0, 1.0, 1.0]), "b": torch.tensor([0.0, 0.0])}
    retain = {"a": torch.tensor([1.0, 1.0, 1.0]), "b": torch.tensor([1.0, 1.0])}
    masks = attribution.select_components(forget, retain, fraction=0.4)  # k = 2, only one positive
    assert masks["a"].tolist() == [True, False, False] and masks["b"].tolist() == [False, False]
    assert attribution.attribution_divergence(forget, forget) == 0.0
    moved = {"a": torch.tensor([0.0, 0.0, 0.0]), "b": torch.tensor([5.0, 5.0])}
    assert attribution.attribution_divergence(forget, moved) == pytest.approx(1.0)
    assert attribution.selected_attribution_retained(forget, moved, masks) == 0.0


def test_projection_removes_the_retain_span():
    g = torch.randn(5, 40)
    basis = mansu.orthonormal_basis(torch.cat([g, g[:2] * 3]))  # duplicates add no rank
    assert basis.shape == (40, 5)
    v = mansu.project_out(torch.randn(40), basis)
    assert (g @ v).abs().max() < 1e-4
    torch.testing.assert_close(mansu.project_out(v, basis), v)


def test_floor_bound_and_prune_golden():
    floor = torch.tensor([1.0, 1.0, 2.0])
    delta = mansu.apply_floor(torch.tensor([0.5, -3.0, 0.0]), floor, fallback=torch.tensor([0.0, 0.0, -1.0]))
    assert delta.tolist() == [1.0, -3.0, -2.0]
    fisher = torch.tensor([1.0, 1.0, 0.0])
    # damage ½(1 + 9) = 5 > 2: the excess (2 on entry 1) shrinks until ½(1 + (1 + 2s)²) = 2 → s = (√3 − 1)/2
    bounded = mansu.fisher_bound(delta, floor, fisher, budget=2.0)
    assert mansu.predicted_damage(bounded, fisher) == pytest.approx(2.0)
    assert bounded[1].item() == pytest.approx(-(1 + (3**0.5 - 1)))
    assert bounded[0].item() == 1.0 and bounded[2].item() == -2.0  # at the floor already / no Fisher cost
    keep = mansu.fisher_prune(torch.tensor([1.0, 2.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 3.0, 0.0]), allowance=1.0)
    assert keep.tolist() == [True, False, False, True]  # damages ½, 2, 1.5, 0: keep 0 then ½


def test_constrain_floors_every_masked_entry_and_nothing_else():
    torch.manual_seed(0)
    weight = torch.randn(4, 64)
    mask = torch.zeros(4, 64, dtype=torch.bool)
    mask[1] = True
    floor = 1.1 * quant.bin_width(weight, "nf4")[mask]
    retain_grad = torch.randn(3, 64)
    plan = mansu.MansuPlan(names=["w"], masks={"w": mask}, theta0=weight[mask].clone(), floor=floor,
                           fisher=torch.zeros(64), basis=mansu.orthonormal_basis(retain_grad), budget=1.0)
    params = {"w": weight.clone()}
    before = plan.gather(params)
    params["w"] += 1e-3 * torch.randn(4, 64) * mask  # an optimiser step on masked gradients (as the module does)
    plan.constrain_(params, before)
    delta = params["w"] - weight
    assert torch.equal(delta[~mask], torch.zeros_like(delta[~mask]))
    assert (delta[mask].abs() >= floor - 1e-7).all()
    q0, q1 = quant.fake_quantise(weight, "nf4", quant.PTQConfig()), quant.fake_quantise(params["w"], "nf4", quant.PTQConfig())
    assert (q1[mask] != q0[mask]).float().mean() > 0.9  # the floor moves quantised values


def test_plan_on_tiny_model_respects_budget_and_selection(model_dir):
    model = load_causal_lm(model_dir)
    dm = tiny_datamodule(model_dir)
    forget = list(dm.forget_dataloader(shuffle=False))
    retain = [next(iter(dm.public_train_dataloader())) for _ in range(2)]
    names = list(quant.effective_linear_weights(model))
    params = {n: lin.weight for n, lin in quant.quantisable_linears(model).items()}
    for p in params.values():
        p.requires_grad_(True)
    scores = attribution.unit_attribution(model, forget, sequence_nll, names)
    settings = mansu.MansuConfig(component_fraction=0.05, retain_sequences=6, fisher_budget=0.01)
    plan = build_mansu_plan(model, forget, retain, scores, settings, names, params)
    info = plan.info
    total_units = sum(p.shape[0] for p in params.values())
    assert 0 < info["components_selected"] <= round(0.05 * total_units)
    assert info["floor_damage"] <= 0.5 * 0.01 + 1e-9
    assert plan.basis.shape[1] <= 6 and info["retain_sequences"] == 6
    assert info["updated_weights"] == plan.theta0.numel() <= info["candidate_weights"]
    for name, mask in plan.masks.items():  # masks only cover selected rows
        assert not mask[~info["row_masks"][name]].any()
