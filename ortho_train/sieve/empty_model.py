"""A Hugging Face model skeleton whose parameters take no memory, to load a sieved model into.

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)   # parameters on "meta", buffers real

Every `nn.Parameter` registered inside the block is moved to the meta device as it is
registered (the fresh tensor is dropped before anything writes it, so it never becomes
resident), while buffers are built as each architecture's `__init__` builds them: RoPE
tables and Gemma's embedding scale are real and correct, which keeps the loader
architecture-agnostic. The loaded tensors then replace the meta ones with
`load_state_dict(..., assign=True)` (the pattern of accelerate's
`init_empty_weights(include_buffers=False)`). The patch is process-wide while the block
runs: do not build other modules on another thread meanwhile.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def parameters_on_meta():
    """Register parameters on the meta device (module docstring); buffers stay where built."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_causal_lm(model_config: dict) -> nn.Module:
    """`AutoModelForCausalLM.from_config` of a saved config dict, parameters on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(model_config)
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config)


def materialise_empty(model: nn.Module) -> list[str]:
    """Give every zero-element meta tensor a real empty one (an α = 0 layer's ortho buffers);
    returns the names of the tensors still on meta (nothing loaded them)."""
    left = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != "meta":
            continue
        if tensor.numel():
            left.append(name)
            continue
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        empty = torch.empty(tensor.shape, dtype=tensor.dtype)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(empty, requires_grad=tensor.requires_grad)
        else:
            module._buffers[leaf] = empty
    return left
