"""Post-hoc Gaussian weight noise, global vs dual: the dual-stream (LibOrtho) paper's
"dual differential privacy" experiment as it states it.

For each sieved linear with trained weight W (N, K) and ortho support S (the entries the ortho
stream holds), with a noise scale σ (a multiple of the layer's weight RMS):

    s       = σ · RMS(W),   RMS(W) = sqrt(mean_ij W_ij²)
    global: W' = W + s·Z                 every entry of every sieved weight
    dual:   W' = W + s·(Z ⊙ S)           the ortho values only; the base (α = 0) is untouched

Z ~ N(0, 1) entrywise. The two modes draw the *same* Z (same seed, layers in name order), so
dual's noise is exactly global's restricted to S: at a given σ the comparison differs only in
where the noise lands. The paper's claim to test is err_public(global) / err_public(dual) > 1.1.

This is a noise scale, not a privacy guarantee: no ε is, or can be, reported for it. Adding
noise to trained weights bounds nothing unless the weights' sensitivity to one training
example is bounded, and non-convex training bounds no such thing. The guarantee-carrying
form is DP-SGD on the support (`ortho_train.privacy.dp_sgd`).
"""
from __future__ import annotations

import torch
from torch import nn

MODES = ("global", "dual")


def layer_rms(weight: torch.Tensor) -> float:
    """sqrt(mean W²) of a whole weight."""
    return float(weight.detach().double().square().mean().sqrt())


def posthoc_noise(weight: torch.Tensor, sigma: float, mode: str, ortho_mask: torch.Tensor | None,
                  generator: torch.Generator) -> torch.Tensor:
    """W + σ·RMS(W)·Z on every entry ('global') or on the ortho mask only ('dual'); a new tensor."""
    if mode not in MODES:
        raise ValueError(f"post-hoc noise mode must be one of {MODES}, got {mode!r}")
    if not sigma >= 0:
        raise ValueError(f"post-hoc noise sigma must be ≥ 0, got {sigma}")
    if ortho_mask is None and mode == "dual":
        raise ValueError("dual post-hoc noise needs the ortho mask of the layer")
    if ortho_mask is not None and (ortho_mask.shape != weight.shape or ortho_mask.dtype != torch.bool):
        raise ValueError(f"ortho mask must be bool {tuple(weight.shape)}, got {ortho_mask.dtype} "
                         f"{tuple(ortho_mask.shape)}")
    scale = sigma * layer_rms(weight)
    z = torch.randn(weight.shape, generator=generator, dtype=torch.float32,
                    device=generator.device).to(weight.device)  # drawn in both modes alike
    noisy = weight.detach().float() + scale * z
    if mode == "dual":
        noisy = torch.where(ortho_mask.to(weight.device), noisy, weight.detach().float())
    return noisy.to(weight.dtype)


@torch.no_grad()
def apply_posthoc_noise_(model: nn.Module, ortho_masks: dict[str, torch.Tensor], sigma: float,
                         mode: str, seed: int = 0) -> dict[str, float]:
    """Noise the weights of the linears named in `ortho_masks` (module name -> S) in place.

    The model should hold the α = 1 weights W = dequant(base) + ortho of the sieved layers.
    Returns the absolute noise std s = σ·RMS(W) per layer (RMS before the noise).
    """
    generator = torch.Generator().manual_seed(seed)
    scales = {}
    for name in sorted(ortho_masks):
        module = model.get_submodule(name)
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise ValueError(f"post-hoc noise: {name!r} has no weight tensor")
        weight = module.weight
        scales[name] = sigma * layer_rms(weight)
        weight.copy_(posthoc_noise(weight, sigma, mode, ortho_masks[name], generator))
    return scales
