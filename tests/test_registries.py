"""`ortho_train.registry.Registry`: the one shape of every name → entry table, and each Literal a
config signature uses agrees with the registry it selects from."""
import importlib
import typing

import pytest

from ortho_train.registry import REQUIRED, Registry
from ortho_train.settings import SettingError, choice_rule, choices

# module -> its registries (every table a config or a newcomer selects from by name)
REGISTRIES = {
    "ortho_train.quantisation.registry": ["FORMATS"],
    "ortho_train.unlearning.objective": ["LOSSES", "FORGET_TERMS", "RETAIN_TERMS"],
    "ortho_train.unlearning.modes": ["UPDATE_MODES"],
    "ortho_train.unlearning.optimizers": ["OPTIMIZERS"],
    "ortho_train.private_update.controller": ["CONTROLLERS"],
    "ortho_train.sieve.support": ["SUPPORTS"],
    "ortho_train.ogd.private_stream": ["PRIVATE_BASES"],
    "ortho_train.kfac.subspace": ["SUBSPACES"],
    "ortho_train.export": ["EXPORTERS"],
    "ortho_train.export.gguf_architectures": ["GGUF_ARCHITECTURES"],
}


def test_add_get_names_iteration_and_metadata():
    reg = Registry("colour", setting="model.init_args.colour", meta={"hex": REQUIRED, "warm": False})

    @reg.register("red", hex="f00", warm=True)
    def red():
        return "red"

    reg.add("blue", "the blue entry", hex="00f")
    assert red() == "red" and reg.get("red") is red and reg["blue"] == "the blue entry"
    assert reg.names() == ("red", "blue") == tuple(reg) and len(reg) == 2 and "blue" in reg
    assert reg.meta("blue") == {"hex": "00f", "warm": False} and reg.meta("red")["warm"] is True
    assert reg.get("green", None) is None
    assert choices(reg) == ("red", "blue") and not choice_rule("colour", "green", reg)[2]


def test_unknown_name_names_the_setting_and_every_choice():
    reg = Registry("colour", setting="model.init_args.colour")
    reg.add("red", 1)
    reg.add("blue", 2)
    with pytest.raises(SettingError, match=r"^model\.init_args\.colour='green': must be one of 'red', 'blue' "
                                           r"\(a registered colour\)$"):
        reg.get("green")
    with pytest.raises(ValueError, match=r"^data\.colour='green'"):
        reg.get("green", setting="data.colour")


def test_duplicates_and_bad_metadata_are_refused():
    reg = Registry("colour", meta={"hex": REQUIRED})
    reg.add("red", 1, hex="f00")
    with pytest.raises(ValueError, match="a colour named 'red' is registered already"):
        reg.add("red", 2, hex="f00")
    with pytest.raises(TypeError, match=r"registry metadata \['hex'\] must be given"):
        reg.add("blue", 2)
    with pytest.raises(TypeError, match=r"unknown registry metadata \['shade'\]"):
        reg.add("blue", 2, hex="00f", shade=1)
    assert reg.names() == ("red",)


def test_name_attribute_and_item_syntax_for_tests():
    reg = Registry("mode", name_attribute="name")

    @reg.register("fast")
    class Fast:
        pass

    assert Fast.name == "fast"
    reg["slow"] = type("Slow", (), {})  # what monkeypatch.setitem does; `del` undoes it
    assert reg["slow"].name == "slow"
    del reg["slow"]
    assert reg.names() == ("fast",)


@pytest.mark.parametrize("module, names", REGISTRIES.items())
def test_every_table_is_a_registry(module, names):
    loaded = importlib.import_module(module)
    for name in names:
        assert isinstance(getattr(loaded, name), Registry), f"{module}.{name} is not a Registry"


def test_every_registry_with_a_literal_has_exactly_its_names():
    for module in REGISTRIES:
        importlib.import_module(module)
    with_literal = [reg for reg in Registry.every() if reg.literal is not None]
    assert {reg.kind for reg in with_literal} >= {"protected subspace", "optimizer"}
    for reg in with_literal:
        assert reg.names() == typing.get_args(reg.literal), (reg.kind, reg.names(), reg.literal)
