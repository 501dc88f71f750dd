"""Sampled extraction (extraction@k): k seeded samples from each canary prefix.

Carlini et al. 2021, "Extracting Training Data from Large Language Models", generate many samples
with top-k sampling (k = 40) rather than one greedy decode. Here a secret counts as extracted at k
when **any of k + 1 candidates** reproduces it exactly: the k samples (temperature T, top-k
filter, a seeded `torch.Generator`) **and the greedy continuation**. Including the greedy
candidate makes extraction@k ≥ greedy extraction by construction, whatever T and the seed.

One sampling step, for logits l (b, V): keep the top_k largest (top_k = 0: all), then draw
``y ~ softmax(l / T)`` over the kept tokens. Draws come from one CPU generator seeded per call, so
the same model, prefixes and settings give the same samples (on CPU; a GPU model's logits may
differ in the last bits and change a draw).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ortho_train.metrics.extraction import greedy_continuation
from ortho_train.metrics.kv_cache import cache_kwargs, last_position_kwargs, returned_cache
from ortho_train.models import eval_mode
from ortho_train.settings import check_settings


@dataclass
class SampledExtractionConfig:
    """extraction@k settings.

    Args:
        k: samples per prefix (≥ 1); the greedy continuation is one more candidate.
        temperature: sampling temperature T > 0.
        top_k: sample among the top_k most likely tokens (0: the whole vocabulary).
        seed: seed of the sampling generator.
        batch_size: prefixes sampled together (each repeated k times).
    """

    k: int = 16
    temperature: float = 1.0
    top_k: int = 40
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        check_settings("sampled_extraction", [
            ("k", self.k, self.k >= 1, "must be ≥ 1"),
            ("temperature", self.temperature, math.isfinite(self.temperature) and self.temperature > 0,
             "must be a finite number > 0 (the greedy continuation is always a candidate)"),
            ("top_k", self.top_k, self.top_k >= 0, "must be ≥ 0 (0: the whole vocabulary)"),
            ("batch_size", self.batch_size, self.batch_size >= 1, "must be ≥ 1"),
        ])

    def describe(self) -> str:
        top = "all tokens" if self.top_k == 0 else f"top-{self.top_k}"
        return f"k={self.k} samples at T={self.temperature:g}, {top}, seed {self.seed}, plus the greedy candidate"


def sample_step(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator) -> Tensor:
    """One token per row of `logits` (b, V): top-k filter, softmax(l / T), a draw from `generator` (CPU)."""
    scaled = logits.float().cpu() / temperature  # (b, V)
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]  # (b, 1)
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    probs = torch.softmax(scaled, dim=-1)  # (b, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)  # (b,)


@torch.no_grad()
def sampled_continuations(model: nn.Module, prefix_ids: Tensor, n_tokens: int, config: SampledExtractionConfig,
                          generator: torch.Generator) -> Tensor:
    """k sampled continuations of each equal-length prefix: (B, k, n_tokens) on the prefix's device."""
    if prefix_ids.ndim != 2 or n_tokens < 1:
        raise ValueError(f"prefix_ids must be (B, P) and n_tokens ≥ 1, got {tuple(prefix_ids.shape)}, {n_tokens}")
    device = next(model.parameters()).device
    chunks = []
    with eval_mode(model):
        for start in range(0, prefix_ids.shape[0], config.batch_size):
            ids = prefix_ids[start:start + config.batch_size].to(device)  # (b, P)
            ids = ids.repeat_interleave(config.k, dim=0)  # (b·k, P): sample j of prefix i at row i·k + j
            out = model(ids, use_cache=True, **last_position_kwargs(model))
            step = sample_step(out.logits[:, -1, :], config.temperature, config.top_k, generator)  # (b·k,)
            drawn = [step]
            for _ in range(n_tokens - 1):
                out = model(step.unsqueeze(-1), use_cache=True, **cache_kwargs(model, returned_cache(out)),
                            **last_position_kwargs(model))
                step = sample_step(out.logits[:, -1, :], config.temperature, config.top_k, generator)
                drawn.append(step)
            chunks.append(torch.stack(drawn, dim=1).reshape(-1, config.k, n_tokens))  # (b, k, S)
    return torch.cat(chunks, dim=0).to(prefix_ids.device)


def extracted_at_k(greedy: Tensor, samples: Tensor, secrets: Tensor) -> Tensor:
    """Per secret: does the greedy continuation (B, S) or any sample (B, k, S) equal it? bool (B,)."""
    if greedy.shape != secrets.shape or samples.shape[0] != secrets.shape[0] or samples.shape[2] != secrets.shape[1]:
        raise ValueError(f"greedy {tuple(greedy.shape)}, samples {tuple(samples.shape)} and secrets "
                         f"{tuple(secrets.shape)} must be (B, S), (B, k, S), (B, S)")
    greedy_hit = (greedy.to(secrets.device) == secrets).all(dim=1)  # (B,)
    sample_hit = (samples.to(secrets.device) == secrets.unsqueeze(1)).all(dim=2).any(dim=1)  # (B,)
    return greedy_hit | sample_hit


@torch.no_grad()
def extraction_at_k(model: nn.Module, prefix_ids: Tensor, secrets: Tensor, config: SampledExtractionConfig,
                    generator: torch.Generator) -> Tensor:
    """extraction@k of equal-length prefixes (B, P) and secrets (B, S): bool (B,) (see the module docstring)."""
    greedy = greedy_continuation(model, prefix_ids, secrets.shape[1], batch_size=256)  # (B, S)
    samples = sampled_continuations(model, prefix_ids, secrets.shape[1], config, generator)  # (B, k, S)
    return extracted_at_k(greedy.cpu(), samples.cpu(), secrets.cpu())
