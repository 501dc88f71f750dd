"""The optimisers an unlearning run may use (`UnlearnModule(optimizer=…)`): name → builder.

A builder takes the trainable parameters and the module's hyper-parameters (`lr`,
`weight_decay`). A new optimiser is one `OPTIMIZERS.add` line here and its name in
`OptimizerName` (a closed choice: jsonargparse lists it; a test keeps the two equal).
"""
from __future__ import annotations

from typing import Any, Callable, Literal

import torch

from ortho_train.registry import Registry

OptimizerName = Literal["adamw", "sgd"]  # the names of OPTIMIZERS
OPTIMIZERS: Registry[Callable[[list, Any], torch.optim.Optimizer]] = Registry(
    "optimizer", setting="model.init_args.optimizer", literal=OptimizerName)
OPTIMIZERS.add("adamw", lambda params, hp: torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay))
OPTIMIZERS.add("sgd", lambda params, hp: torch.optim.SGD(params, lr=hp.lr))
