"""The registry of unlearning update modes (`UnlearnModule(mode=…)`); see `update_mode.py`."""
from __future__ import annotations

from ortho_train.settings import check_choices
from ortho_train.unlearning.lora import LoraUpdate
from ortho_train.unlearning.mansu_mode import MansuUpdate
from ortho_train.unlearning.update_mode import UpdateMode

UPDATE_MODES: dict[str, type[UpdateMode]] = {"lora": LoraUpdate, "full": UpdateMode, "mansu": MansuUpdate}


def build_update_mode(name: str, settings_by_argument: dict) -> UpdateMode:
    """The mode `name`, given its settings from `settings_by_argument[mode.settings_argument]`."""
    check_choices("model.init_args", mode=(name, UPDATE_MODES))  # an open registry: str, not a Literal
    mode = UPDATE_MODES[name]
    return mode(settings_by_argument.get(mode.settings_argument))
