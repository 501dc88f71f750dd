"""Learning-rate schedules (factors of the peak rate for `torch.optim.lr_scheduler.LambdaLR`)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine to `min_ratio`:
    (step + 1)/warmup for step < warmup, else min_ratio + (1 − min_ratio)·½(1 + cos(π·p)) with
    p = (step − warmup)/(total − warmup) capped at 1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
