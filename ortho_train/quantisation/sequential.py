"""True-sequential quantisation of a whole model: each layer's Hessian from inputs that went
through the already-quantised layers before it.

"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" (Frantar
et al.), its experimental setup: the model is quantised block by block, each Transformer block on the
outputs of the blocks quantised before it; the paper's reference code (`--true-sequential`)
also orders the linears inside a block, q/k/v → o → gate/up → down, each group's Hessian
taken after the groups before it were quantised. This module does both:

    for block i:                                  # inputs X_i = outputs of quantised blocks < i
        for group in block i (call order):        # linears reading one and the same input
            H_l = 2/N Σ_t x_t x_tᵀ  over X_i      # with the earlier groups of block i quantised
            W_l ← quantise(l, W_l, H_l)
        X_{i+1} = block_i(X_i)                    # the quantised block

Groups are found, not named: one forward of the block records its linears in call order and
merges consecutive ones whose input is the same tensor (Llama/Gemma: [q, k, v], [o],
[gate, up], [down]). Linears outside the blocks (an untied LM head) come last, their Hessians
from the fully quantised model. The non-sequential path (`ortho_train.curvature.collect_hessians`,
all Hessians from the float model in one pass) is what a model of one block whose linears all
read the block's input reduces to.

Memory: the block inputs of the calibration batches (N tokens × d_model, the model's dtype) for
one block at a time, the Hessians of one group, the float weights of one block beside their
quantised replacements (a block's float weights are put back once its outputs are computed; with
layers outside the blocks, every quantised weight stays until the end), and the blocks' call
arguments per batch (masks and position embeddings, computed once by the model and shared by
every block). The model's weights are restored when the walk ends (also on an error): `quantise`
records what it needs.
"""
from __future__ import annotations

from itertools import islice
from typing import Callable, Iterable

import torch
from torch import nn

from ortho_kernels import QuantisedBase
from ortho_train.curvature import HessianCollector, collect_hessians
from ortho_train.models import eval_mode
from ortho_train.quantisation.spec import QuantConfig, quantise_weight

LayerQuantiser = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
"""(name, float32 weight (N, K), Hessian (K, K)) -> the float weight (N, K) the layer holds for the
rest of the walk (the dequantised base; the sieve: base + ortho, its α = 1 weight)."""


class _Stop(Exception):
    """Raised by a hook to end a forward once what it needs has been seen."""


class _BatchState:
    """One calibration batch on its way through the blocks: the current block's input and the
    call arguments of every block (as the model passed them)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask  # (B, T) tokens that count
        self.hidden: torch.Tensor | None = None  # (B, T, d) input of the current block
        self.calls: list[tuple[tuple, dict]] = []  # per block: (positional args after hidden, kwargs)


def decoder_blocks(model: nn.Module, modules: dict[str, nn.Module]) -> tuple[str, nn.ModuleList]:
    """The `nn.ModuleList` holding the most of `modules` (a Llama's `model.layers`), with its name."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name:
            count = sum(1 for n in modules if n.startswith(name + "."))
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise ValueError("true_sequential needs a model whose linears sit in a list of blocks "
                         "(an nn.ModuleList such as model.layers); none holds any of the layers to quantise")
    return best


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _block_output(out) -> torch.Tensor:
    """A decoder block returns its hidden states, or a tuple that starts with them."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_block(block: nn.Module, state: _BatchState, index: int):
    rest, kwargs = state.calls[index]
    if "hidden_states" in kwargs:
        return block(*rest, **{**kwargs, "hidden_states": state.hidden})
    return block(state.hidden, *rest, **kwargs)


def _capture(model: nn.Module, blocks: nn.ModuleList, batches: list[dict]) -> list[_BatchState]:
    """One float forward per batch, stopped after the last block: block 0's input and every
    block's call arguments."""
    device = next(model.parameters()).device
    no_cache = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    states: list[_BatchState] = []

    def recorder(index: int):
        def hook(module, args, kwargs):
            state = states[-1]
            if index == 0:
                state.hidden = _hidden_of(args, kwargs)
            kw = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
            state.calls.append((tuple(args[1:]), kw))
        return hook

    def stop(module, args, output):
        raise _Stop

    handles = [b.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[len(blocks) - 1].register_forward_hook(stop))
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            states.append(_BatchState(mask))
            try:
                model(input_ids=ids, attention_mask=mask, **no_cache)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return states


def _groups(block: nn.Module, names: list[str], modules: dict[str, nn.Module], state: _BatchState,
            index: int) -> list[list[str]]:
    """The block's linears in call order, consecutive ones reading the same input tensor merged."""
    order: list[tuple[str, torch.Tensor]] = []

    def recorder(name: str):
        def hook(module, args):
            if all(name != n for n, _ in order):  # a layer called twice keeps its first place
                order.append((name, args[0]))
        return hook

    handles = [modules[n].register_forward_pre_hook(recorder(n)) for n in names]
    try:
        _run_block(block, state, index)
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(names) - {n for n, _ in order})
    if missing:
        raise ValueError(f"true_sequential: layers {missing} are not called by their block's forward")
    groups: list[list[str]] = []
    for i, (name, x) in enumerate(order):
        if i and x is order[i - 1][1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _group_hessians(block: nn.Module, group: list[str], modules: dict[str, nn.Module],
                    states: list[_BatchState], index: int) -> dict[str, torch.Tensor]:
    """Hessians of `group` over every batch, each forward stopped after the group's last layer."""
    def stop(module, args, output):
        raise _Stop

    layers = {n: modules[n] for n in group}
    handle = layers[group[-1]].register_forward_hook(stop)
    try:
        with HessianCollector(block, layers) as collector:
            for state in states:
                collector.token_mask = state.mask
                try:
                    _run_block(block, state, index)
                except _Stop:
                    pass
            return collector.hessians()
    finally:
        handle.remove()


def _replace(layer: nn.Module, name: str, quantise: LayerQuantiser, hessian: torch.Tensor,
             saved: dict[str, torch.Tensor]) -> None:
    saved[name] = layer.weight.data
    new = quantise(name, layer.weight.detach().float(), hessian)
    layer.weight.data = new.to(device=layer.weight.device, dtype=layer.weight.dtype)


@torch.no_grad()
def quantise_true_sequential(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                             quantise: LayerQuantiser, modules: dict[str, nn.Module],
                             max_batches: int | None = None) -> None:
    """Call `quantise(name, W, H)` for every layer of `modules`, true-sequentially (module docstring).

    `batches`: dicts with `input_ids` (B, T) and optionally `attention_mask` (B, T) (pads are not
    counted), at most `max_batches` of them. The model is unchanged on return.
    """
    batches = list(islice(batches, max_batches))
    if not batches:
        raise ValueError("no calibration batches: the calibration DataLoader is empty")
    prefix, blocks = decoder_blocks(model, modules)
    outside = {n: m for n, m in modules.items() if not n.startswith(prefix + ".")}
    saved: dict[str, torch.Tensor] = {}
    try:
        with eval_mode(model):
            states = _capture(model, blocks, batches)
            for index, block in enumerate(blocks):
                names = [n for n in modules if n.startswith(f"{prefix}.{index}.")]
                if names:
                    for group in _groups(block, names, modules, states[0], index):
                        hessians = _group_hessians(block, group, modules, states, index)
                        for name in group:
                            _replace(modules[name], name, quantise, hessians[name], saved)
                for state in states:
                    state.hidden = _block_output(_run_block(block, state, index))
                if not outside:  # the walk never runs this block again: one block's weights held twice
                    for name in names:
                        modules[name].weight.data = saved.pop(name)
            del states
            if outside:  # e.g. an untied LM head: from the fully quantised model
                hessians = collect_hessians(model, batches, outside)
                for name, layer in outside.items():
                    _replace(layer, name, quantise, hessians[name], saved)
    finally:
        for name, weight in saved.items():
            modules[name].weight.data = weight


def quantise_layers(model: nn.Module, modules: dict[str, nn.Module], spec: QuantConfig,
                    calibration: Iterable[dict[str, torch.Tensor]] | None = None,
                    hessians: dict[str, torch.Tensor] | None = None,
                    max_batches: int | None = None) -> dict[str, QuantisedBase]:
    """The base stream of every layer of `modules` under `spec`, by name (the model is unchanged).

    `spec.true_sequential`: walked true-sequentially over `calibration` (given `hessians` are
    refused: they come from the float model). Otherwise each layer from its Hessian in
    `hessians`, or collected from the float model over `calibration` where the method needs one.
    """
    if spec.true_sequential:
        if calibration is None or hessians is not None:
            raise ValueError("quant.true_sequential=True takes calibration batches and collects each Hessian "
                             "after the layers before it are quantised; Hessians of the float model were "
                             f"given instead (calibration={calibration is not None}, hessians={hessians is not None})")
        bases: dict[str, QuantisedBase] = {}

        def record(name: str, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            bases[name] = quantise_weight(w, spec, h)
            return bases[name].dequantise()

        quantise_true_sequential(model, calibration, record, modules, max_batches)
        return {name: bases[name] for name in modules}
    if hessians is None and spec.quantiser.needs_hessian and calibration is not None:
        hessians = collect_hessians(model, calibration, modules, max_batches)
    return {name: quantise_weight(m.weight.detach().float(), spec, None if hessians is None else hessians.get(name))
            for name, m in modules.items()}
