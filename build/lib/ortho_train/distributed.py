"""What the training modules need of a multi-process (DDP) run, checked and done in one place.

Supported: one process, or Lightning's DDP (`--trainer.strategy=ddp --trainer.devices=N`, gloo
on CPU). Every rank holds the whole model; Lightning wraps the module in
`DistributedDataParallel` after `LightningModule.setup` and DDP averages the gradients of the
backward over the ranks (bucketed all-reduce). The modules keep every rank's weights identical:

- `refuse_sharded_strategy`: FSDP, DeepSpeed and the model-parallel strategies shard the
  parameters, but the modules read, mask, snapshot, evaluate and save `self.model` whole; they
  are refused at start-up, naming the setting.
- `allow_parameters_frozen_later`: isolated SFT freezes parameters at the canary switch, after
  DDP wrapped the model; DDP must then detect unused parameters (a frozen parameter is left out
  of the all-reduce and keeps `grad = None`, as in one process).
- `average_gradients_`: gradients a controller computes itself (`torch.autograd.grad`, outside
  DDP's backward) are averaged over the ranks like DDP averages the backward's.
- `broadcast_from_zero`: what a setup step draws from data or RNG (a support, a K-FAC subspace,
  a re-quantised base, a MANSU plan) is taken from rank zero, so every rank applies the same.
"""
from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

SUPPORTED = ("SingleDeviceStrategy", "DDPStrategy")


def refuse_sharded_strategy(trainer: Any, owner: str) -> None:
    """Raise if `trainer.strategy` is neither one device nor DDP (FSDP, DeepSpeed, model parallel)."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return
    raise ValueError(
        f"trainer.strategy={type(strategy).__name__} is not supported by {owner}: it shards the "
        "parameters, but the model is masked, snapshotted, evaluated and saved whole on every rank; "
        "use --trainer.strategy=ddp (or one device)"
    )


def allow_parameters_frozen_later(trainer: Any, setting: str) -> None:
    """Make Lightning's DDP wrap the model with `find_unused_parameters=True` (before it wraps).

    Call from `LightningModule.setup`. Refuses an explicit `find_unused_parameters=False`
    (e.g. `--trainer.strategy=ddp_find_unused_parameters_false`), naming `setting`.
    """
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy):  # one process under DDP wraps the model too
        return
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if kwargs is None:
        raise RuntimeError("this Lightning version's DDPStrategy keeps no DDP keyword arguments: "
                           f"{setting} cannot enable find_unused_parameters")
    if kwargs.get("find_unused_parameters") is False:
        raise ValueError(
            f"{setting} freezes parameters during the fit, after DDP wrapped the model, so DDP must "
            "detect unused parameters: use --trainer.strategy=ddp, not find_unused_parameters=False"
        )
    kwargs["find_unused_parameters"] = True


def world_size() -> int:
    """Processes of the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def average_gradients_(grads: list[torch.Tensor | None]) -> None:
    """Replace each tensor of `grads` (None skipped) by its mean over the ranks, in place.

    One all-reduce of the concatenation (the same tensors on every rank, in the same order:
    the model's parameters). A no-op in one process.
    """
    ranks = world_size()
    present = [g for g in grads if g is not None]
    if ranks < 2 or not present:
        return
    flat = torch.cat([g.reshape(-1) for g in present])  # (Σ numel,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ranks
    offset = 0
    for g in present:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_from_zero(strategy: Any, obj: T) -> T:
    """Rank zero's `obj` on every rank (`strategy.broadcast`; the object itself in one process)."""
    return obj if world_size() < 2 else strategy.broadcast(obj, src=0)
