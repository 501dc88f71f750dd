"""Public and private displacements of a fine-tune, ΔW_pub and ΔW_priv, per linear weight.

For a fine-tune from W_pre (the public model) to W_ft, a displacement split gives, per
tracked weight, W_ft − W_pre = ΔW_pub + ΔW_priv, and the entanglement ratio of the two
(`ortho_train.separation.geometry.entanglement`) says how separate they are.

* OGD-projected SFT keeps them apart by construction: ΔW_pub = W_public_path − W_pre and
  ΔW_priv is the private stream (its controller reports them; no tracker needed).
* Dense SFT takes one AdamW step on the gradient of the whole batch. Its gradient is a sum
  of two separable parts, g = g_pub + g_priv, with g_priv = ∇(canary NLL sum) / T and
  g_pub = g − g_priv (T: all label tokens of the step; the loss is a token mean). The step
  is not linear in g, so `AdamWDisplacementTracker` attributes it by this rule:

      clipping:   r = g_clipped / g (elementwise; 1 where g = 0), both parts scaled by r
      moments:    m_x ← β1·m_x + (1 − β1)·r·g_x          (x ∈ {pub, priv}; m_pub + m_priv = m)
      step:       D = √(v / (1 − β2^t)) + ε             (AdamW's own v, shared by both parts)
                  ΔW_priv ← (1 − lr·λ)·ΔW_priv − lr/(1 − β1^t) · m_priv / D
                  ΔW_pub  ← (1 − lr·λ)·ΔW_pub − lr·λ·W_pre − lr/(1 − β1^t) · m_pub / D

  AdamW's step is W ← (1 − lr·λ)·W − lr/(1 − β1^t) · m / D, linear in m once D is fixed, so
  the two updates sum to the applied one exactly (up to float round-off): ΔW_pub + ΔW_priv
  = W_ft − W_pre. What it measures: each part's share of Adam's first moment, normalised by
  the *joint* second moment (the canaries still shape D, and so the size of the public
  update), and weight decay of W_pre counted as public. It is an attribution, not a
  counterfactual: ΔW_pub is not the displacement of a run without canaries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from ortho_train.separation.geometry import Entanglement, entanglement


@dataclass
class Displacements:
    """ΔW_pub and ΔW_priv per state-dict key (`<linear>.weight`, float64, on CPU).

    Args:
        public, private: key -> displacement (same keys, same shapes).
        rule: how they were obtained (one line, for the table's notes).
    """

    public: dict[str, Tensor]
    private: dict[str, Tensor]
    rule: str

    def entanglement(self) -> Entanglement:
        """η = |⟨ΔW_pub, ΔW_priv⟩| / (‖ΔW_pub‖·‖ΔW_priv‖) per key and over all keys."""
        return entanglement(self.public, self.private)


class AdamWDisplacementTracker:
    """Splits each applied AdamW step of dense SFT into public and private parts (module docstring).

    Use per step: `private_gradients(grads)` once g_priv is computed, `total_gradients()` after
    backward (before clipping), `after_step(optimizer)` after the optimiser's step.

    Args:
        layers: name -> `nn.Linear` whose weights are tracked.
        pre_state: the state dict at the start of the fine-tune (W_pre).
    """

    RULE = ("dense AdamW: each step's first moment split into its public and canary gradient parts, "
            "normalised by the joint second moment; ΔW_pub + ΔW_priv = W_ft − W_pre")

    def __init__(self, layers: Mapping[str, nn.Linear], pre_state: Mapping[str, Tensor]):
        self.weights = {f"{name}.weight": layer.weight for name, layer in layers.items()}
        self.pre = {k: pre_state[k].detach().double().cpu() for k in self.weights}
        self.public = {k: torch.zeros_like(w) for k, w in self.pre.items()}
        self.private = {k: torch.zeros_like(w) for k, w in self.pre.items()}
        self._moments = {k: (torch.zeros_like(w), torch.zeros_like(w)) for k, w in self.pre.items()}
        self._private_grad: dict[str, Tensor] | None = None
        self._total_grad: dict[str, Tensor] | None = None

    def parameters(self) -> list[nn.Parameter]:
        return list(self.weights.values())

    def private_gradients(self, grads: list[Tensor | None]) -> None:
        """g_priv of this step, in the order of `parameters()` (None: no gradient)."""
        self._private_grad = {k: torch.zeros_like(self.pre[k]) if g is None else g.detach().double().cpu()
                              for k, g in zip(self.weights, grads)}

    def total_gradients(self) -> None:
        """g of this step from `.grad`, after backward and before clipping."""
        self._total_grad = {k: torch.zeros_like(self.pre[k]) if w.grad is None else w.grad.detach().double().cpu()
                            for k, w in self.weights.items()}

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Attribute the step just applied: reads the clipped `.grad` and AdamW's v, step count
        and hyper-parameters."""
        if self._private_grad is None or self._total_grad is None:
            return
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for key, weight in self.weights.items():
            group, state = groups[id(weight)], optimizer.state[weight]
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("track_displacements supports AdamW without amsgrad or maximize")
            lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
            t = float(state["step"])
            denom = (state["exp_avg_sq"].double().cpu() / (1 - beta2**t)).sqrt() + eps  # AdamW's D
            g, clipped = self._total_grad[key], weight.grad.detach().double().cpu()
            ratio = torch.where(g != 0, clipped / torch.where(g != 0, g, 1.0), 1.0)  # r
            g_priv = self._private_grad[key]
            m_pub, m_priv = self._moments[key]
            m_priv.mul_(beta1).add_(ratio * g_priv, alpha=1 - beta1)
            m_pub.mul_(beta1).add_(ratio * (g - g_priv), alpha=1 - beta1)
            step = lr / (1 - beta1**t)
            self.private[key].mul_(1 - lr * wd).sub_(step * m_priv / denom)
            self.public[key].mul_(1 - lr * wd).sub_(lr * wd * self.pre[key] + step * m_pub / denom)
        self._private_grad = self._total_grad = None

    def state_dict(self) -> dict:
        """ΔW_pub, ΔW_priv and the split first moments so far (for a checkpoint)."""
        return {"public": self.public, "private": self.private, "moments": self._moments}

    def load_state_dict(self, state: dict) -> None:
        self.public = {k: v.clone() for k, v in state["public"].items()}
        self.private = {k: v.clone() for k, v in state["private"].items()}
        self._moments = {k: (a.clone(), b.clone()) for k, (a, b) in state["moments"].items()}

    def displacements(self) -> Displacements:
        return Displacements({k: v.clone() for k, v in self.public.items()},
                             {k: v.clone() for k, v in self.private.items()}, self.RULE)
