"""ΔW_priv while it trains: which coordinates the private AdamW works in.

Both keep every protected linear's private displacement out of S_gen; they differ in the
coordinates AdamW's per-coordinate scaling acts in, and so in cost and trajectory.

- `parameter` (`ParameterBasisStream`): AdamW on ΔW in the weight's own coordinates. The
  gradient is projected before the step, g ← g − P_S(g), and because Adam's scaling moves a
  projected gradient back into S, the applied step is projected again:
  ΔW ← ΔW₀ + project_out(ΔW − ΔW₀). Two projections per step, each 4 matrix products
  (C = U_Gᵀ X U_A and back).
- `parameter_step` (`StepProjectedStream`): as `parameter`, but only the applied step is
  projected (the raw gradient enters Adam's moments): one projection per step.
- `eigenbasis` (`EigenbasisStream`): AdamW on the coefficients C = U_Gᵀ ΔW U_A in the layer's
  Kronecker eigenbasis, where S_gen is a set of coordinates (the mask M). The gradient enters
  as M̄ ⊙ (U_Gᵀ g U_A) (M̄ = not M), so the S_gen coefficients have zero gradient, zero Adam
  moments and zero value (decoupled weight decay keeps 0 at 0): the applied step never enters
  S_gen, with no second projection. ΔW = U_G C U_Aᵀ is rebuilt after each step. Two rotations
  per step instead of four; Adam's scaling is then per eigen-direction (as in eigenvalue-
  corrected K-FAC), a different optimiser from `parameter`, not a faster implementation of it.
  With a bias, the joined [W, b] coefficients share the weights' decay.

A newcomer adds a basis with one class (here or in its own file) and its `@PRIVATE_BASES.register` line.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ortho_train.kfac import join_bias, project_update_, split_bias
from ortho_train.ogd.subspaces import ProtectedSubspace
from ortho_train.registry import Registry

Pair = tuple[Tensor, "Tensor | None"]  # (weight, bias or None) of one linear

# an open registry: `ogd.private_basis` is a str, not a Literal
PRIVATE_BASES: Registry[type["PrivateStream"]] = Registry("private basis", setting="ogd.private_basis",
                                                          name_attribute="name")
register_basis = PRIVATE_BASES.register


class PrivateStream:
    """ΔW_priv of the protected linears, its AdamW, and the projection that keeps it off S_gen.

    Interface used by `OGDController`: `delta` (name → dense (ΔW, Δb)), `parameters()` (what
    the private optimiser steps and the clip reads), `set_gradients` (after backward), `step`
    (the private optimiser's step at a learning rate), `state_dict` / `load_state_dict`.
    """

    name = ""

    def __init__(self, subspaces: dict[str, ProtectedSubspace], shapes: dict[str, Pair],
                 lr: float, betas: tuple[float, float], weight_decay: float):
        self.subspaces = subspaces
        self.delta: dict[str, Pair] = {}
        self._init(shapes)
        self.optimizer = torch.optim.AdamW(self._groups(weight_decay), lr=lr, betas=tuple(betas))

    def _init(self, shapes: dict[str, Pair]) -> None:
        raise NotImplementedError

    def _groups(self, weight_decay: float) -> list[dict]:
        raise NotImplementedError

    def parameters(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def set_gradients(self, grads: dict[str, Pair]) -> None:
        """The private gradient of every protected linear (its full (g_W, g_b) at α = 1)."""
        raise NotImplementedError

    def step(self, lr: float) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


@register_basis("parameter")
class ParameterBasisStream(PrivateStream):
    """AdamW on ΔW itself; gradient and applied step both projected off S_gen."""

    def _init(self, shapes: dict[str, Pair]) -> None:
        self.delta = {n: (nn.Parameter(torch.zeros_like(w)), None if b is None else nn.Parameter(torch.zeros_like(b)))
                      for n, (w, b) in shapes.items()}

    def _groups(self, weight_decay: float) -> list[dict]:
        groups = [{"params": [w for w, _ in self.delta.values()], "weight_decay": weight_decay}]
        biases = [b for _, b in self.delta.values() if b is not None]
        if biases:
            groups.append({"params": biases, "weight_decay": 0.0})
        return groups

    def set_gradients(self, grads: dict[str, Pair]) -> None:
        for name, (grad_w, grad_b) in grads.items():
            dw, db = self.delta[name]
            dw.grad, projected_b = self.subspaces[name].project_out(grad_w, grad_b)
            if db is not None:
                db.grad = projected_b

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self._set_lr(lr)
        before = {n: (w.detach().clone(), None if b is None else b.detach().clone()) for n, (w, b) in self.delta.items()}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for name, (dw, db) in self.delta.items():
            sub, (w0, b0) = self.subspaces[name], before[name]
            project_update_(dw.data, w0, sub.fast, sub.mask, bias=None if db is None else db.data, bias_before=b0)

    def state_dict(self) -> dict:
        return {"delta": {n: tuple(None if t is None else t.detach() for t in pair) for n, pair in self.delta.items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for name, pair in state["delta"].items():
            for param, value in zip(self.delta[name], pair):
                if param is not None:
                    param.data.copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])


@register_basis("parameter_step")
class StepProjectedStream(ParameterBasisStream):
    """AdamW on ΔW itself; only the applied step is projected off S_gen.

    The raw private gradient (S_gen component included) enters Adam's moments; the step they
    produce is projected, ΔW ← ΔW₀ + project_out(ΔW − ΔW₀), so the displacement stays out of
    S_gen exactly as with `parameter`, at one projection per step instead of two. The moments
    (and the private clip's norm) then also see the S_gen part of the gradient, so the steps
    differ from `parameter`'s.
    """

    def set_gradients(self, grads: dict[str, Pair]) -> None:
        for name, (grad_w, grad_b) in grads.items():
            dw, db = self.delta[name]
            dw.grad = grad_w  # the module's .grad is replaced by g_pub next, so no copy is needed
            if db is not None:
                db.grad = grad_b


@register_basis("eigenbasis")
class EigenbasisStream(PrivateStream):
    """AdamW on the eigen-coefficients C (d_out, d_in'), the S_gen ones held at zero."""

    def _init(self, shapes: dict[str, Pair]) -> None:
        self.coefficients = {n: nn.Parameter(torch.zeros(sub.mask.shape, dtype=shapes[n][0].dtype,
                                                         device=shapes[n][0].device))
                             for n, sub in self.subspaces.items()}
        self.free = {n: ~sub.mask for n, sub in self.subspaces.items()}  # (d_out, d_in') bool
        self.delta = {n: (torch.zeros_like(w), None if b is None else torch.zeros_like(b)) for n, (w, b) in shapes.items()}

    def _groups(self, weight_decay: float) -> list[dict]:
        return [{"params": list(self.coefficients.values()), "weight_decay": weight_decay}]

    def set_gradients(self, grads: dict[str, Pair]) -> None:
        for name, (grad_w, grad_b) in grads.items():
            basis = self.subspaces[name].fast
            c = basis.coefficients(join_bias(grad_w, grad_b))  # (d_out, d_in') float32
            self.coefficients[name].grad = c.mul_(self.free[name])

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self._set_lr(lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._rebuild()

    @torch.no_grad()
    def _rebuild(self) -> None:
        """ΔW = U_G C U_Aᵀ for every layer (the model's α = 1 weights read it)."""
        for name, c in self.coefficients.items():
            sub = self.subspaces[name]
            dense = sub.fast.from_coefficients(c.detach()).to(c.dtype)  # (d_out, d_in')
            dw, db = split_bias(dense, sub.basis.has_bias)
            self.delta[name][0].copy_(dw)
            if db is not None:
                self.delta[name][1].copy_(db)

    def state_dict(self) -> dict:
        return {"coefficients": {n: c.detach() for n, c in self.coefficients.items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state["coefficients"].items():
            self.coefficients[name].data.copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self._rebuild()


def make_private_stream(basis: str, subspaces: dict[str, ProtectedSubspace], shapes: dict[str, Pair],
                        lr: float, betas: tuple[float, float], weight_decay: float) -> PrivateStream:
    return PRIVATE_BASES.get(basis)(subspaces, shapes, lr, betas, weight_decay)
