"""Unlearning losses: golden values, masking of prompt and pad tokens, gradient signs."""
import math

import pytest
import torch

from ortho_train.unlearning import (
    LOSSES,
    UnlearningObjective,
    ga_loss,
    masked_kl,
    npo_loss,
    npo_loss_from_nll,
    prompt_masked_labels,
    retain_ce_loss,
    retain_kl_loss,
    sequence_nll,
)

# Position t predicts labels[:, t + 1]. Row 0: prompt token, then 3 answer tokens; row 1: one
# answer token, then padding. Scored probabilities: row 0 → 0.25, 0.3, 0.2; row 1 → 0.7.
PROBS = torch.tensor([
    [[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]],
    [[0.7, 0.2, 0.1], [0.25, 0.5, 0.25], [0.9, 0.05, 0.05], [0.4, 0.4, 0.2]],
], dtype=torch.float64)  # (B=2, T=4, V=3)
LABELS = torch.tensor([[-100, 1, 2, 0], [-100, 0, -100, -100]])
SCORED = [[0.25, 0.3, 0.2], [0.7]]


def _logits(requires_grad=False):
    logits = (PROBS.log() + torch.arange(8.0, dtype=torch.float64).reshape(2, 4, 1)).float()
    return logits.requires_grad_(requires_grad)


def test_sequence_nll_sums_answer_tokens():
    expected = torch.tensor([-sum(map(math.log, row)) for row in SCORED])
    torch.testing.assert_close(sequence_nll(_logits(), LABELS), expected)


def test_ga_golden_value_is_minus_token_mean_ce():
    tokens = [p for row in SCORED for p in row]
    expected = sum(math.log(p) for p in tokens) / len(tokens)  # −CE: 4 tokens, not 2 sequences
    assert ga_loss(_logits(), LABELS).item() == pytest.approx(expected, rel=1e-6)


def test_npo_at_reference_equals_two_over_beta_ln2():
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = -100
    for beta in (0.1, 0.5, 2.0):
        assert npo_loss(logits, labels, logits.clone(), beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    assert npo_loss(logits, labels, logits.clone()).item() == pytest.approx(13.862943611198906, rel=1e-6)


def test_npo_golden_value_uses_sequence_nll_differences():
    # −(2/β)·mean(log σ(β·1), log σ(β·4)) with β = 0.1
    value = npo_loss_from_nll(torch.tensor([2.0, 5.0]), torch.tensor([1.0, 1.0]), beta=0.1)
    assert value.item() == pytest.approx(11.574119124735237, rel=1e-6)
    # sums, not means: a uniform θ gives every answer token p = 1/3, so NLL_θ = (3 ln 3, ln 3)
    uniform = torch.zeros(2, 4, 3)
    nll_ref = [-sum(map(math.log, row)) for row in SCORED]
    diffs = [3 * math.log(3) - nll_ref[0], math.log(3) - nll_ref[1]]
    expected = -20 * sum(-math.log1p(math.exp(-0.1 * d)) for d in diffs) / 2
    assert npo_loss(uniform, LABELS, _logits(), beta=0.1).item() == pytest.approx(expected, rel=1e-5)


def test_klr_is_zero_at_reference_and_matches_golden_kl():
    logits = _logits()
    assert retain_kl_loss(logits, logits.clone(), LABELS).item() == pytest.approx(0.0, abs=1e-7)
    # θ differs from ref at two scored positions only: (row 0, t=0) and (row 1, t=0)
    theta = logits.clone()
    theta[0, 0] = torch.tensor([0.2, 0.6, 0.2]).log()
    theta[1, 0] = torch.tensor([0.25, 0.5, 0.25]).log()
    expected = (0.295064069427155 + 0.44584637246456416) / 4  # token mean over 4 scored positions
    assert masked_kl(logits, theta, LABELS).item() == pytest.approx(expected, rel=1e-5)


def test_prompt_and_pad_positions_do_not_change_any_loss():
    ref, logits = _logits(), _logits() * 1.3
    retain_labels = LABELS.clone()
    values = _all_losses(logits, ref, retain_labels)
    noisy = logits.clone()
    # positions whose next label is −100: row 0 t=3 (end), row 1 t=1..3 (pads)
    noisy[0, 3] += torch.tensor([5.0, -3.0, 1.0])
    noisy[1, 1:] += torch.randn(3, 3) * 4
    noisy_ref = ref.clone()
    noisy_ref[1, 2:] -= 7.0
    for name, value in _all_losses(noisy, noisy_ref, retain_labels).items():
        torch.testing.assert_close(value, values[name], msg=f"{name} depends on an unscored position")


def _all_losses(logits, ref, labels):
    return {name: UnlearningObjective(name, retain_weight=0.5)(logits, labels, ref, logits, labels, ref)["loss"]
            for name in LOSSES}


def _label_logit_grad(loss_fn):
    logits = _logits(requires_grad=True)
    loss_fn(logits).backward()
    rows, cols = torch.nonzero(LABELS[:, 1:] != -100, as_tuple=True)
    return logits.grad[rows, cols, LABELS[rows, cols + 1]]  # ∂L/∂(logit of the true next token)


def test_forget_losses_push_answer_probability_down():
    for name, fn in {"ga": lambda x: ga_loss(x, LABELS),
                     "npo": lambda x: npo_loss(x, LABELS, _logits() + 0.5 * torch.randn(2, 4, 3))}.items():
        grad = _label_logit_grad(fn)
        assert (grad > 0).all(), f"{name}: descending must lower every answer logit, got ∂L/∂z = {grad.tolist()}"


def test_retain_ce_pushes_answer_probability_up_and_kl_pulls_back_to_reference():
    assert (_label_logit_grad(lambda x: retain_ce_loss(x, LABELS)) < 0).all()
    ref = _logits()
    logits = (ref + 0.1 * torch.randn_like(ref)).requires_grad_(True)
    retain_kl_loss(logits, ref, LABELS).backward()
    with torch.no_grad():  # a small descent step on the KL moves θ towards the reference
        stepped = logits - 0.5 * logits.grad
        assert retain_kl_loss(stepped, ref, LABELS) < retain_kl_loss(logits, ref, LABELS)
    ref_grad = _logits(requires_grad=True)
    retain_kl_loss(ref_grad, ref, LABELS).backward()
    assert ref_grad.grad.abs().max() < 1e-6  # KL has a minimum at θ = ref


def test_npo_gradient_fades_as_the_answer_becomes_unlikely():
    nll = torch.tensor([1.0, 40.0], requires_grad=True)
    npo_loss_from_nll(nll, torch.tensor([1.0, 1.0])).backward()
    assert nll.grad[0] < 0 and nll.grad[1] < 0  # raising the NLL lowers the loss
    assert abs(nll.grad[1]) < abs(nll.grad[0]) / 10  # and matters less once it is high


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_objective_is_forget_plus_weighted_retain(name):
    """The formulas of MUSE §4 / NPO eq. (3), written out here independently of the registry."""
    ref, logits, retain = _logits(), _logits() * 0.7, _logits() * 1.2
    objective = UnlearningObjective(name, beta=0.2, retain_weight=0.5)
    parts = objective(logits, LABELS, ref, retain, LABELS, ref)
    forget = {"ga": ga_loss(logits, LABELS), "npo": npo_loss(logits, LABELS, ref, 0.2)}
    retain_terms = {"gdr": retain_ce_loss(retain, LABELS), "klr": retain_kl_loss(retain, ref, LABELS)}
    expected = {"ga": forget["ga"], "gdr": forget["ga"] + 0.5 * retain_terms["gdr"],
                "klr": forget["ga"] + 0.5 * retain_terms["klr"], "npo": forget["npo"],
                "npo_gdr": forget["npo"] + 0.5 * retain_terms["gdr"],
                "npo_klr": forget["npo"] + 0.5 * retain_terms["klr"]}[name]
    torch.testing.assert_close(parts["loss"], expected)
    assert objective.needs_reference == (name.startswith("npo") or name.endswith("klr"))


def test_a_new_loss_is_one_table_line(monkeypatch):
    from ortho_train.unlearning import objective as objective_module

    monkeypatch.setitem(objective_module.LOSSES, "npo_klr_test", ("npo", "klr"))
    ref, logits = _logits(), _logits() * 0.7
    new = UnlearningObjective("npo_klr_test")(logits, LABELS, ref, logits, LABELS, ref)["loss"]
    torch.testing.assert_close(new, UnlearningObjective("npo_klr")(logits, LABELS, ref, logits, LABELS, ref)["loss"])


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="model.init_args.loss='dpo': must be one of"):
        UnlearningObjective("dpo")
    with pytest.raises(ValueError, match="needs the reference"):
        UnlearningObjective("npo")(_logits(), LABELS)
    with pytest.raises(ValueError, match="needs a retain batch"):
        UnlearningObjective("gdr")(_logits(), LABELS)
    with pytest.raises(ValueError, match="no answer token"):
        ga_loss(_logits(), torch.full_like(LABELS, -100))
    with pytest.raises(ValueError, match="beta > 0"):
        npo_loss_from_nll(torch.ones(2), torch.ones(2), beta=0.0)


def test_prompt_masked_labels():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = prompt_masked_labels(ids, torch.tensor([2, 1]), attention)
    assert labels.tolist() == [[-100, -100, 7, 8], [-100, 6, 9, -100]]
