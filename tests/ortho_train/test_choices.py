"""Closed choices are `Literal` types in the constructor signatures (jsonargparse refuses other
values and `--help` lists them); plain Python construction is checked once, by
`ortho_train.settings.check_choices`, from the same Literal."""
import contextlib
import io
import typing

import pytest

from ortho_train.settings import SettingError, check_choices, choice_rule, choices


def test_choices_of_a_literal_an_optional_literal_and_a_registry():
    assert choices(typing.Literal["a", "b"]) == ("a", "b")
    assert choices(typing.Optional[typing.Literal[2, 3]]) == (2, 3)
    assert choices({"x": 1, "y": 2}) == ("x", "y")
    assert choice_rule("s", None, typing.Optional[typing.Literal["a"]])[2]
    assert not choice_rule("s", None, typing.Literal["a"])[2]


def test_check_choices_names_every_bad_setting_and_its_values():
    with pytest.raises(SettingError, match=r"^data\.x='c': must be one of 'a', 'b'; data\.y=5: must be one of 2, 3$"):
        check_choices("data", x=("c", typing.Literal["a", "b"]), y=(5, typing.Literal[2, 3]), z=("a", ("a",)))


def test_each_literal_matches_the_table_it_selects_from():
    from ortho_train.kfac.subspace import SUBSPACES, SubspaceName
    from ortho_train.models import DTYPES, DtypeName
    from ortho_train.unlearning.optimizers import OPTIMIZERS, OptimizerName

    for literal, table in ((SubspaceName, SUBSPACES), (DtypeName, DTYPES), (OptimizerName, OPTIMIZERS)):
        assert choices(literal) == tuple(table)


def _annotation(cls, name):
    return typing.get_type_hints(cls.__init__)[name]


@pytest.mark.parametrize("owner, setting", [
    ("ortho_train.datamodule.CanaryDataModule", "forget_target"),
    ("ortho_train.datamodule.CanaryDataModule", "train_split"),
    ("ortho_train.datamodule.CanaryDataModule", "canary_secrets"),
    ("ortho_train.sft_module.CanarySFTModule", "dtype"),
    ("ortho_train.unlearn_module.UnlearnModule", "dtype"),
    ("ortho_train.unlearn_module.UnlearnModule", "optimizer"),
    ("ortho_train.privacy.DPConfig", "scope"),
    ("ortho_train.privacy.DPConfig", "accountant"),
    ("ortho_train.ogd.OGDConfig", "subspace"),
    ("ortho_train.kfac.SubspaceConfig", "name"),
    ("ortho_train.sieve.core.SieveConfig", "selection"),
    ("ortho_train.quantisation.PTQConfig", "compute_dtype"),
    ("ortho_train.quantisation.PTQConfig", "cpu_kernel"),
])
def test_closed_choices_are_literal_in_the_signature(owner, setting):
    import importlib

    module, _, name = owner.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert typing.get_origin(_annotation(cls, setting)) is typing.Literal


def test_plain_python_construction_is_checked_by_the_same_helper():
    from ortho_train.datamodule import CanaryDataModule
    from ortho_train.privacy import DPConfig
    from ortho_train.quantisation import PTQConfig

    with pytest.raises(SettingError, match=r"^data\.forget_target='bogus': must be one of 'secret', 'secret_suffix', 'full'"):
        CanaryDataModule(canary_secrets="seed", forget_target="bogus")
    with pytest.raises(SettingError, match=r"^data\.train_split='test': must be one of 'sft', 'unlearn'"):
        CanaryDataModule(canary_secrets="seed", train_split="test")
    with pytest.raises(SettingError, match=r"^data\.canary_secrets='maybe': must be one of 'key_file', 'seed'"):
        CanaryDataModule(canary_secrets="maybe")
    with pytest.raises(SettingError, match=r"dp\.accountant='gdp': must be one of 'rdp', 'prv'"):
        DPConfig(noise_multiplier=1.0, expected_batch_size=2, accountant="gdp")
    with pytest.raises(SettingError, match=r"^quant\.cpu_kernel='fast': must be one of 'portable', 'native'"):
        PTQConfig(cpu_kernel="fast")


def test_help_lists_the_choices():
    from train import cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    assert "--data.forget_target {secret,secret_suffix,full}" in out.getvalue()
    assert "--data.train_split {sft,unlearn}" in out.getvalue()
