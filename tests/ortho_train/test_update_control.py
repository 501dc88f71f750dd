"""The one update-control interface: SFT controllers and unlearning modes are both `UpdateControl`s,
and an unlearning mode is chosen by name or built with its settings (a config's class_path)."""
import pytest
from jsonargparse import ArgumentParser

from ortho_train.private_update import CONTROLLERS
from ortho_train.unlearning.lora import LoraAdapterConfig, LoraUpdate
from ortho_train.unlearning.modes import UPDATE_MODES, build_update_mode
from ortho_train.unlearning.update_mode import UpdateMode
from ortho_train.update_control import UpdateControl, UpdateControlHooks

HOOKS = ("setup", "trainable_parameters", "training_loss", "after_backward", "clip", "before_step", "after_step",
         "state_dict", "load_state_dict", "summary", "summary_entries")


def test_both_families_implement_one_interface():
    for family in (*CONTROLLERS.values(), *UPDATE_MODES.values()):
        assert issubclass(family, UpdateControl), family
        for hook in HOOKS:
            assert callable(getattr(family, hook)), (family, hook)
    from ortho_train.sft_module import CanarySFTModule
    from ortho_train.unlearn_module import UnlearnModule

    for module in (CanarySFTModule, UnlearnModule):  # the Lightning hooks come from one mixin
        for hook in ("on_after_backward", "configure_gradient_clipping", "optimizer_step"):
            assert getattr(module, hook) is getattr(UpdateControlHooks, hook), (module, hook)


def test_a_mode_by_name_takes_its_settings_argument_or_defaults():
    mode = build_update_mode("lora", {"lora": LoraAdapterConfig(rank=2), "mansu": None})
    assert isinstance(mode, LoraUpdate) and mode.settings.rank == 2 and mode.summary_entries()["lora"]["rank"] == 2
    assert build_update_mode("lora", {}).settings == LoraAdapterConfig()
    assert build_update_mode("full", {}).summary_entries() == {}
    with pytest.raises(ValueError, match=r"model\.init_args\.mode='partial': must be one of 'lora', 'full', 'mansu'"):
        build_update_mode("partial", {})


class _Unregistered(UpdateMode):
    name = "unregistered"


def test_a_mode_built_with_its_settings_needs_only_its_registry_line(monkeypatch):
    built = LoraUpdate(LoraAdapterConfig(rank=3))
    assert build_update_mode(built, {"lora": LoraAdapterConfig(rank=9)}) is built  # its own settings win
    with pytest.raises(ValueError, match="_Unregistered is not a registered update mode"):
        build_update_mode(_Unregistered(), {})
    monkeypatch.setitem(UPDATE_MODES, "unregistered", _Unregistered)
    assert build_update_mode(_Unregistered(), {}).name == "unregistered"


def test_a_config_gives_a_mode_by_name_or_by_class_path():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--mode", type=str | UpdateMode, default="lora")
    assert parser.parse_args(["--mode=mansu"]).mode == "mansu"
    cfg = parser.parse_args(['--mode={"class_path": "ortho_train.unlearning.lora.LoraUpdate", '
                             '"init_args": {"settings": {"rank": 4}}}'])
    mode = parser.instantiate_classes(cfg).mode
    assert isinstance(mode, LoraUpdate) and mode.settings == LoraAdapterConfig(rank=4)
