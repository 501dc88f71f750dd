"""Gradient × activation attribution of a behaviour to linear output units, and CAD.

Attribution patching (Nanda 2023; Syed, Rager, Conmy 2023, "Attribution Patching Outperforms
Automated Circuit Discovery") estimates the effect of zero-ablating a unit by a first-order
Taylor step. A *component* here is one output unit j of one linear layer m (one row of its
weight). For a per-sequence loss L_s, its attribution on data D is

    A_m[j](D) = mean_{s∈D} | Σ_t y_{s,t,j} · ∂L_s/∂y_{s,t,j} |,     y = the linear's output,

i.e. the predicted loss change when unit j is ablated on sequence s, in absolute value. Scores
on the forget set (secret NLL) and the retain set (public-text NLL) are turned into shares
Â = A / Σ A over all units, so forget and retain are comparable whatever their lengths.

Circuit attribution divergence (MANSU), our definition: the total-variation distance
between the forget-set attribution shares before and after unlearning,
``CAD = ½ Σ_{m,j} |Â_before − Â_after| ∈ [0, 1]`` — 0 when the model still routes the forget
behaviour through the same units in the same proportions (suppression downstream), larger
when the structure that carried it changed (erasure). We also report how much of the
attribution share on the selected components remains, ``Â_after(S)/Â_before(S)``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ortho_train.model_support import plain_name
from ortho_train.models import eval_mode, requires_grad_as

SequenceLoss = Callable[[Tensor, Tensor], Tensor]  # (logits (B,T,V), labels (B,T)) -> (B,) losses


def component_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """The outermost module at each plain linear name (a peft LoRA wrapper if there is one)."""
    wanted, found = set(names), {}
    for name, module in model.named_modules():
        key = plain_name(name)
        if key in wanted and key not in found:
            found[key] = module
    missing = wanted - found.keys()
    if missing:
        raise ValueError(f"attribution: modules not found in the model: {sorted(missing)[:5]}")
    return found


@contextmanager
def _capture_outputs(modules: Mapping[str, nn.Module]):
    outputs: dict[str, Tensor] = {}

    def hook(name):
        def record(module, args, output):
            output.retain_grad()
            outputs[name] = output
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def unit_attribution(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], loss_fn: SequenceLoss,
                     names: Iterable[str]) -> dict[str, Tensor]:
    """``A_m[j]`` (see module docstring) for the linears `names`, averaged over all sequences.

    `batches` hold `input_ids`, `attention_mask`, `labels`; `loss_fn` returns per-sequence
    losses (B,). The model's parameters receive no gradient (they are restored untouched).
    """
    modules = component_modules(model, names)
    device = next(model.parameters()).device
    totals = {name: None for name in modules}
    count = 0
    with eval_mode(model), requires_grad_as(model.parameters(), False):
        for batch in batches:
            with _capture_outputs(modules) as outputs, torch.enable_grad():
                embeds = model.get_input_embeddings()(batch["input_ids"].to(device)).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(device)).logits
                losses = loss_fn(logits, batch["labels"].to(device))  # (B,)
                losses.sum().backward()  # sequences are independent: ∂(Σ_s L_s)/∂y_s = ∂L_s/∂y_s
                for name, y in outputs.items():
                    grad = y.grad if y.grad is not None else torch.zeros_like(y)  # unit unused by the loss
                    per_seq = (y.detach() * grad).sum(dim=1).abs()  # (B, T, d_out) -> (B, d_out)
                    summed = per_seq.sum(dim=0).double().cpu()
                    totals[name] = summed if totals[name] is None else totals[name] + summed
            count += losses.shape[0]
    if count == 0:
        raise ValueError("attribution: no batches")
    return {name: (total / count).float() for name, total in totals.items()}


def attribution_shares(scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Â = A / Σ_{all units} A."""
    total = sum(float(s.sum()) for s in scores.values())
    if total <= 0:
        raise ValueError("attribution scores are all zero")
    return {name: s / total for name, s in scores.items()}


def select_components(forget: Mapping[str, Tensor], retain: Mapping[str, Tensor],
                      fraction: float) -> dict[str, Tensor]:
    """Units most specific to the forget behaviour: top ⌈fraction·#units⌉ of ``Â_F − Â_R`` (> 0 only).

    Returns a boolean mask (d_out,) per linear.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"component fraction must be in (0, 1], got {fraction}")
    f_share, r_share = attribution_shares(forget), attribution_shares(retain)
    names = list(forget)
    specificity = torch.cat([f_share[n] - r_share[n] for n in names])  # (total units,)
    k = max(1, round(fraction * specificity.numel()))
    top = torch.topk(specificity, k).indices
    top = top[specificity[top] > 0]
    chosen = torch.zeros_like(specificity, dtype=torch.bool)
    chosen[top] = True
    masks, start = {}, 0
    for name in names:
        size = forget[name].numel()
        masks[name] = chosen[start:start + size].clone()
        start += size
    return masks


def attribution_divergence(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> float:
    """CAD = total-variation distance ½ Σ |Â_before − Â_after| over all units."""
    b, a = attribution_shares(before), attribution_shares(after)
    return 0.5 * sum(float((b[n] - a[n]).abs().sum()) for n in b)


def selected_attribution_retained(before: Mapping[str, Tensor], after: Mapping[str, Tensor],
                                  masks: Mapping[str, Tensor]) -> float:
    """``Σ_S Â_after / Σ_S Â_before``: how much of its share of the forget attribution the selected
    set S keeps (shares, because the raw scores scale with the forget loss, which unlearning raises)."""
    b, a = attribution_shares(before), attribution_shares(after)
    num = sum(float(a[n][m].sum()) for n, m in masks.items())
    den = sum(float(b[n][m].sum()) for n, m in masks.items())
    return num / den if den > 0 else float("nan")
