"""Constrained private training: one controller object per way of updating on the canaries.

    from ortho_train.private_update import build_controller
    controller = build_controller(isolation=IsolationConfig(...))   # or none: dense SFT

Importing this package registers every controller (`CONTROLLERS`).
"""
from ortho_train.private_update.controller import (
    CONTROLLERS,
    DenseController,
    PrivateUpdateController,
    SFTHost,
    TrainingLoss,
    build_controller,
    register,
)
from ortho_train.private_update.isolation import IsolationController
from ortho_train.private_update.dp import DPIsolationController
from ortho_train.private_update.ogd import OGDController
from ortho_train.private_streams import PrivateStreams, SubspaceStreams, SupportStreams

__all__ = [
    "CONTROLLERS", "DPIsolationController", "DenseController", "IsolationController", "OGDController", "PrivateStreams",
    "PrivateUpdateController", "SFTHost", "SubspaceStreams", "SupportStreams", "TrainingLoss", "build_controller", "register",
]
