"""The private-update seam: the registry picks one controller from the module's config."""
import pytest

from ortho_train.models import TinyLlamaConfig
from ortho_train.private_update import CONTROLLERS, DenseController, IsolationController, build_controller
from ortho_train.sft_module import CanarySFTModule
from ortho_train.sieve.isolation import IsolationConfig


def test_registry_picks_the_configured_controller():
    assert isinstance(build_controller(isolation=None), DenseController)
    controller = build_controller(isolation=IsolationConfig(rho=0.1))
    assert isinstance(controller, IsolationController) and controller.config.rho == 0.1
    assert {"dense", "isolation"} <= set(CONTROLLERS)


def test_registry_refuses_unknown_and_mistyped_settings():
    with pytest.raises(ValueError, match="no private-update controller named \\['magic'\\]"):
        build_controller(magic=object())
    with pytest.raises(TypeError, match="isolation must be IsolationConfig"):
        build_controller(isolation={"rho": 0.1})


def test_module_delegates_to_its_controller():
    module = CanarySFTModule(tiny_llama=TinyLlamaConfig(16, 1, 2, 32))
    assert isinstance(module.private_update, DenseController) and module.private_streams() is None
    assert module.private_update.summary() is None and module.private_update.state_dict() == {}
    module = CanarySFTModule(tiny_llama=TinyLlamaConfig(16, 1, 2, 32), isolation=IsolationConfig())
    assert isinstance(module.private_update, IsolationController)
    assert module.private_update.host is module
    assert module.private_streams() is None  # no support before the switch
