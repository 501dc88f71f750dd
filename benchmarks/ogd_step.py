"""Benchmark: one OGD-projected canary SFT step beside one dense SFT step of the same batch.

    OMP_NUM_THREADS=2 python benchmarks/ogd_step.py            # the quickstart's Llama
    python benchmarks/ogd_step.py --steps 10 --subspace sharpest --json out.json
    python benchmarks/ogd_step.py --subspace sharpest --private-sees-public
    python benchmarks/ogd_step.py --subspace sharpest --private-sees-public --private-public-fraction 0.5
    python benchmarks/ogd_step.py --subspace sharpest --private-sees-public --private-basis eigenbasis

Both modes run through their private-update controller, driven in the order Lightning calls
the module's hooks (before_step, training_loss, backward, after_backward, clip, the optimiser
step, after_step), on the quickstart's model size (`TinyLlamaConfig` defaults, byte
vocabulary, randomly initialised: timings do not depend on the weights) and batch shape
(`--batch-size` public windows of `--seq-len` tokens + `--canary-batch-size` canaries of
`--canary-len` tokens). Steps alternate dense / OGD on the same batch, so load changes hit
both alike; medians are reported, with their ratio, and the K-FAC refresh (factors over
`--kfac-batches` public batches + eigendecompositions + masks) the OGD switch costs once.
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels"), str(REPO / "benchmarks")]  # run as a script from a checkout

import torch  # noqa: E402

from ortho_train.artifacts import write_json_atomic  # noqa: E402
from ortho_train.metrics import token_logprobs  # noqa: E402
from ortho_train.models import TinyLlamaConfig, build_tiny_llama  # noqa: E402
from ortho_train.ogd import OGDConfig  # noqa: E402
from ortho_train.ogd.private_stream import PRIVATE_BASES  # noqa: E402
from ortho_train.private_update.controller import DenseController, PrivateUpdateController  # noqa: E402
from ortho_train.private_update.ogd import OGDController  # noqa: E402

VOCAB = 259  # byte tokenizer: 256 bytes + pad/eos/unk


class BenchHost:
    """The part of `CanarySFTModule` a controller uses (`SFTHost`), without Lightning."""

    def __init__(self, model, public_batches: list[dict], lr: float = 1e-3):
        self.model = model
        self.hparams = SimpleNamespace(public_steps=0, sft_lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
        self.trainer = SimpleNamespace(
            global_step=0, world_size=1, accumulate_grad_batches=1, optimizers=[self.optimizer],
            strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),  # one process
            datamodule=SimpleNamespace(public_train_dataloader=lambda: iter(public_batches)))
        self.in_canary_phase = True
        self.probe = None

    def nll_sum(self, batch):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp, mask = token_logprobs(logits, batch["labels"])
        return -(logp * mask).sum(), mask.sum()

    def batch_nll(self, batch):
        nll, tokens = self.nll_sum(batch)
        return nll / tokens

    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, float(gradient_clip_val))

    def info(self, message: str) -> None:
        print(message)


def _batch(rows: int, length: int, generator: torch.Generator) -> dict:
    ids = torch.randint(3, VOCAB, (rows, length), generator=generator)  # (B, T)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def step(controller: PrivateUpdateController, host: BenchHost, batch: dict, clip: float = 1.0) -> float:
    """One training step in Lightning's hook order; returns its wall time in seconds."""
    start = time.perf_counter()
    controller.before_step()
    host.optimizer.zero_grad(set_to_none=True)
    controller.training_loss(batch).loss.backward()
    controller.after_backward()
    controller.clip(host.optimizer, clip, "norm")
    host.optimizer.step()
    controller.after_step()
    return time.perf_counter() - start


def _setup(controller: PrivateUpdateController, config: TinyLlamaConfig, publics: list[dict]):
    host = BenchHost(build_tiny_llama(config, VOCAB, pad_token_id=0, eos_token_id=1), publics)
    controller.setup(host)
    start = time.perf_counter()
    controller.enter_canary_phase()
    return host, time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--canary-batch-size", type=int, default=20)
    parser.add_argument("--canary-len", type=int, default=40)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode (after one warm-up)")
    parser.add_argument("--subspace", default="flattest")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--kfac-batches", type=int, default=8)
    parser.add_argument("--private-sees-public", action="store_true",
                        help="ΔW_priv descends the joint public + canary NLL at α = 1 (a second public pass)")
    parser.add_argument("--private-public-fraction", type=float, default=1.0,
                        help="share of the public windows in the α = 1 public pass (ogd.private_public_fraction)")
    parser.add_argument("--private-basis", default="parameter", choices=sorted(PRIVATE_BASES),
                        help="coordinates of the private AdamW (ortho_train.ogd.private_stream)")
    parser.add_argument("--hidden", type=int, default=TinyLlamaConfig.hidden_size)
    parser.add_argument("--blocks", type=int, default=TinyLlamaConfig.num_layers)
    parser.add_argument("--intermediate", type=int, default=TinyLlamaConfig.intermediate_size)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    config = TinyLlamaConfig(hidden_size=args.hidden, num_layers=args.blocks, intermediate_size=args.intermediate)
    generator = torch.Generator().manual_seed(0)
    publics = [_batch(args.batch_size, args.seq_len, generator) for _ in range(args.kfac_batches)]
    batch = {"public": publics[0], "canary": _batch(args.canary_batch_size, args.canary_len, generator)}
    dense = DenseController()
    dense_host, _ = _setup(dense, config, publics)
    ogd = OGDController(OGDConfig(subspace=args.subspace, fraction=args.fraction, kfac_batches=args.kfac_batches,
                                  private_sees_public=args.private_sees_public,
                                  private_public_fraction=args.private_public_fraction,
                                  private_basis=args.private_basis))
    ogd_host, kfac_s = _setup(ogd, config, publics)
    times = {"dense": [], "ogd": []}
    for i in range(args.steps + 1):  # interleaved; the first step of each is a warm-up
        for name, controller, host in (("dense", dense, dense_host), ("ogd", ogd, ogd_host)):
            seconds = step(controller, host, batch)
            if i:
                times[name].append(seconds)
    dense_s, ogd_s = statistics.median(times["dense"]), statistics.median(times["ogd"])
    print(f"threads {torch.get_num_threads()}, public {args.batch_size}×{args.seq_len} + canary "
          f"{args.canary_batch_size}×{args.canary_len} tokens, median of {args.steps} steps")
    print(f"{'dense SFT step':>24s} {'OGD step':>12s} {'ratio':>7s}")
    print(f"{dense_s * 1e3:21.1f} ms {ogd_s * 1e3:9.1f} ms {ogd_s / dense_s:6.2f}×")
    print(f"K-FAC refresh at the switch ({args.kfac_batches} public batches, eigh, S_gen masks "
          f"'{args.subspace}' {args.fraction}): {kfac_s * 1e3:.0f} ms, once")
    result = {"args": vars(args), "threads": torch.get_num_threads(), "dense_step_s": dense_s,
              "ogd_step_s": ogd_s, "ratio": ogd_s / dense_s, "kfac_refresh_s": kfac_s,
              "dense_steps_s": times["dense"], "ogd_steps_s": times["ogd"]}
    if args.json:
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    main()
