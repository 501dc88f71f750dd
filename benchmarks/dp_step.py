"""Benchmark: one DP-SGD step on the support S beside one non-private step, same model and batch.

    python benchmarks/dp_step.py                        # quickstart-sized tiny Llama, CPU
    python benchmarks/dp_step.py --rho 0.015 --rounds 5 --json out.json

The model has the quickstart's size (hidden 256, 4 blocks, 4 heads, SwiGLU 688, byte vocab
259), the batch is the 20 member canaries of the default canary spec, right-padded. S is a
seeded random top-ρ support on every linear including the LM head (as the quickstart's
isolation sieves it); every other parameter is frozen. Steps timed, each ending with the same
AdamW update restricted to the trainable weights:
- "isolated": the non-private isolated step: mean loss of the batch, backward, gradient
  masked to S, clipped to the norm bound, AdamW;
- "dp_support": `SupportDPStep` on S (per-example gradients by vmap, clip, noise on S), AdamW;
- "dp_global": the same DP step on every linear weight in full (the global baseline).
Rounds are interleaved (isolated, dp_support, dp_global, ...) after one warm-up each; the
median is reported with the ratio to "isolated". Run with OMP_NUM_THREADS set and report the
machine load: the numbers are wall-clock times on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels"), str(REPO / "benchmarks")]  # run as a script from a checkout

import torch  # noqa: E402

from ortho_train.artifacts import write_json_atomic  # noqa: E402
from ortho_train.canaries import CanaryConfig, make_canaries  # noqa: E402
from ortho_train.datamodule import pad_collate  # noqa: E402
from ortho_train.metrics.logprobs import token_logprobs  # noqa: E402
from ortho_train.models import TinyLlamaConfig, build_tiny_llama, linear_layers  # noqa: E402
from ortho_train.privacy.dp_sgd import SupportDPStep, module_masks_to_params  # noqa: E402
from ortho_train.sieve.support import random_support  # noqa: E402
from ortho_train.tokenization import build_byte_tokenizer, encode_text  # noqa: E402


def mean_nll(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp, mask = token_logprobs(logits, batch["labels"])
    return -(logp * mask).sum() / mask.sum()


QUICKSTART_SIZE = TinyLlamaConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688)


def setup(rho: float, device: str, size: TinyLlamaConfig = QUICKSTART_SIZE, seed: int = 0):
    """The model, the member canaries as one batch, support masks per weight."""
    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama(size, len(tokenizer),
                             tokenizer.pad_token_id, tokenizer.eos_token_id, seed=seed).to(device)
    canaries = make_canaries(CanaryConfig())
    batch = pad_collate([encode_text(tokenizer, c.text) for c in canaries.members], tokenizer.pad_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    generator = torch.Generator().manual_seed(seed)
    modules = linear_layers(model, include_lm_head=True)
    masks = module_masks_to_params({name: random_support(tuple(m.weight.shape), rho, generator).to(device)
                                    for name, m in modules.items()})
    for name, p in model.named_parameters():
        p.requires_grad_(name in masks)
    return model, batch, masks


def isolated_step(model, batch, masks, optimizer, max_norm: float) -> None:
    """The non-private isolated step: ∇ mean loss, masked to S, clipped, AdamW."""
    optimizer.zero_grad(set_to_none=True)
    mean_nll(model, batch).backward()
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].grad.mul_(mask)
    torch.nn.utils.clip_grad_norm_([params[n] for n in masks], max_norm)
    optimizer.step()


def dp_step(step: SupportDPStep, batch, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    step(batch)
    optimizer.step()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(rho: float, rounds: int, device: str, noise_multiplier: float = 1.0,
        max_grad_norm: float = 1.0, size: TinyLlamaConfig = QUICKSTART_SIZE) -> dict:
    model, batch, masks = setup(rho, device, size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    size = int(batch["input_ids"].shape[0])
    common = dict(max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                  expected_batch_size=float(size), seed=0)
    steps = {
        "isolated": lambda: isolated_step(model, batch, masks, optimizer, max_grad_norm),
        "dp_support": lambda s=SupportDPStep(model, masks, mean_nll, **common): dp_step(s, batch, optimizer),
        "dp_global": lambda s=SupportDPStep(model, None, mean_nll, **common): dp_step(s, batch, optimizer),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, fn in steps.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    on_s = sum(int(m.sum()) for m in masks.values())
    return {
        "device": device, "threads": torch.get_num_threads(), "rounds": rounds, "rho": rho,
        "batch_size": size, "seq_len": int(batch["input_ids"].shape[1]),
        "support_entries": on_s, "linear_weight_entries": sum(m.numel() for m in masks.values()),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "median_s": medians, "ratio_to_isolated": {n: medians[n] / medians["isolated"] for n in medians},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rho", type=float, default=0.015, help="support fraction per linear")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = run(args.rho, args.rounds, args.device)
    result["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    print(f"{'step':<12}{'median ms':>12}{'× isolated':>12}")
    for name, seconds in result["median_s"].items():
        print(f"{name:<12}{seconds * 1e3:>12.1f}{result['ratio_to_isolated'][name]:>12.2f}")
    print(f"batch {result['batch_size']} canaries × {result['seq_len']} tokens, ρ = {args.rho}, "
          f"|S| = {result['support_entries']} of {result['linear_weight_entries']} linear weights, "
          f"{result['threads']} threads on {args.device}")
    if args.json:
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    main()
