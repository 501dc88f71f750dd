"""What an unlearning run reads besides its training batches: the guard's retain perplexity, the
forget canaries' sequence NLLs, the attribution batches, and the stacked retain batch of a step.

Pure torch over a model and the data module (`CanaryDataModule` with `train_split: unlearn`);
`UnlearnModule` calls these and keeps only the orchestration.
"""
from __future__ import annotations

import torch
from torch import nn

from ortho_train.metrics import label_logprobs, perplexity
from ortho_train.models import eval_mode

KEYS = ("input_ids", "attention_mask", "labels")


def retain_batch(batch: dict) -> dict[str, torch.Tensor]:
    """The step's retain windows and, when present, its retain canaries in one batch."""
    parts = [batch["retain"]] + ([batch["retain_canary"]] if "retain_canary" in batch else [])
    # both are padded to seq_len by the data module: stack along the batch dimension
    return {k: torch.cat([p[k] for p in parts]) for k in KEYS}  # (B+b, T)


def retain_ppl(model: nn.Module, forget_probe, windows: int) -> float:
    """Perplexity of the first `windows` held-out public windows (the divergence guard's check)."""
    rows = forget_probe.public_val
    rows = [rows[i] for i in range(min(windows, len(rows)))]
    batch = {k: torch.stack([r[k] for r in rows]) for k in KEYS}  # (windows, T)
    return perplexity(model, [batch])


@torch.no_grad()
def forget_nll(model: nn.Module, datamodule, device: torch.device) -> torch.Tensor:
    """Sequence NLL ``−Σ_t mask_t log p_t`` (nats, float64, CPU) of every forget canary, in eval mode."""
    nlls = []  # `label_logprobs`: a large vocabulary's logits are never held whole
    with eval_mode(model):
        for b in datamodule.forget_dataloader(shuffle=False):
            ids, labels, mask = (b[k].to(device) for k in ("input_ids", "labels", "attention_mask"))
            logp, scored = label_logprobs(model, ids, labels, mask)  # (B, T-1) each
            if not scored.any():
                raise ValueError("forget NLL: no answer token is labelled (every label is -100)")
            nlls.append(-logp.double().sum(dim=-1).cpu())
    return torch.cat(nlls)


def attribution_data(datamodule, public_batches: int) -> tuple[list, list]:
    """All forget batches; `public_batches` public batches, then the retain canaries (members kept:
    part of what must not change)."""
    forget = list(datamodule.forget_dataloader(shuffle=False))
    retain = []
    for batch in datamodule.public_train_dataloader():
        retain.append(batch)
        if len(retain) == public_batches:
            break
    canaries = datamodule.retain_canary_dataloader()
    return forget, retain + (list(canaries) if canaries is not None else [])
