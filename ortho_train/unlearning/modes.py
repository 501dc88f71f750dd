"""The registry of unlearning update modes (`UnlearnModule(mode=…)`); see `update_mode.py`."""
from __future__ import annotations

from typing import Any, Mapping

from ortho_train.registry import Registry
from ortho_train.unlearning.lora import LoraUpdate
from ortho_train.unlearning.mansu_mode import MansuUpdate
from ortho_train.unlearning.update_mode import UpdateMode

# an open registry (a new mode is one file and one line here): `mode` is a str, not a Literal
UPDATE_MODES: Registry[type[UpdateMode]] = Registry("unlearning update mode", setting="model.init_args.mode",
                                                    name_attribute="name")
UPDATE_MODES.add("lora", LoraUpdate)
UPDATE_MODES.add("full", UpdateMode)
UPDATE_MODES.add("mansu", MansuUpdate)


def build_update_mode(mode: "str | UpdateMode", settings_by_argument: Mapping[str, Any]) -> UpdateMode:
    """The update mode a config chose: `mode` is a registered name (its settings, if it has any, from
    `settings_by_argument[cls.settings_argument]`, else its defaults) or an `UpdateMode` built with its
    settings (a config's `class_path` / `init_args`), whose class must be registered."""
    if isinstance(mode, UpdateMode):
        if UPDATE_MODES.get(mode.name, None) is not type(mode):
            raise ValueError(f"model.init_args.mode: {type(mode).__name__} is not a registered update mode "
                             f"(add it with UPDATE_MODES.add(name, {type(mode).__name__}))")
        return mode
    cls = UPDATE_MODES.get(mode)
    return cls(settings_by_argument.get(cls.settings_argument) if cls.settings_argument else None)
