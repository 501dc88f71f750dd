"""train.py / LightningCLI: every shipped config parses; a tiny fit end to end (DDP on CPU: tests/test_ddp.py)."""
import json
from pathlib import Path

import pytest
import torch

from ortho_train.run_summary import SUMMARY_KEYS
from tests.secret_scan import holds_secret
from train import OrthoTrainCLI, cli_main

REPO = Path(__file__).resolve().parents[1]
# configs/real/ too; configs/data/ holds `data:` groups the configs include, not configs
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "data")


class ParseOnlyCLI(OrthoTrainCLI):
    """Parses and validates a config (class paths resolved, types checked) without building it."""

    def before_instantiate_classes(self) -> None:
        pass  # no run directory is reserved for a config that is only parsed

    def instantiate_classes(self) -> None:
        pass


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO / "configs")) for c in CONFIGS])
def test_every_shipped_config_parses(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative paths (runs/…) resolve under the test's directory
    first_line = config.read_text().splitlines()[0]
    assert first_line.startswith("#"), f"{config.name} must start with a comment giving its launch command"
    assert f"{config.relative_to(REPO)}" in config.read_text().split("\n\n")[0]
    from ortho_train.datamodule import CanaryDataModule

    ParseOnlyCLI(model_class=None, datamodule_class=CanaryDataModule, subclass_mode_model=True,
                 args=["--config", str(config)], run=False)
    assert not list(tmp_path.rglob("*"))  # parsing writes nothing


def _run_files(run_dir: Path):
    return [p for p in run_dir.rglob("*") if p.is_file() and p.suffix not in (".ckpt", ".safetensors")]


def test_tiny_fit_writes_models_summary_and_logs(tiny_run):
    cli, run_dir = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= summary.keys()
    for key in SUMMARY_KEYS:
        assert isinstance(summary[key], float), key
    assert 0.0 <= summary["extraction_rate"] <= 1.0 and 0.0 <= summary["mia_auc_loss"] <= 1.0
    from ortho_train.canaries import canary_fingerprint

    assert summary["canary_fingerprint"] == canary_fingerprint(cli.datamodule.canaries)
    assert summary["canary_settings"]["canary_seed"] == 1234
    # the public warm-up improved on the untrained model, and the pre-canary model was measured
    assert 1.0 < summary["public_ppl_before_canaries"] < 259
    for name in ("hf_model", "hf_model_pre_canary"):
        assert (run_dir / name / "model.safetensors").is_file()
        assert (run_dir / name / "tokenizer_config.json").is_file()
    assert list((run_dir / "checkpoints").glob("*.ckpt"))
    csv_header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "val/extraction_rate" in csv_header and "final/public_ppl" in csv_header
    assert list(run_dir.glob("events.out.tfevents*"))


def test_saved_models_reload_with_plain_transformers(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cli, run_dir = tiny_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf_model")
    ids = tokenizer("To be", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = cli.model.model.eval()(ids).logits
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
    pre = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model_pre_canary")
    assert not torch.equal(pre.lm_head.weight, model.lm_head.weight)  # canary phase changed it
    snapshot = cli.model.pre_canary_state_dict
    assert torch.equal(pre.lm_head.weight, snapshot["lm_head.weight"])


def test_no_canary_secret_reaches_any_log(tiny_run):
    cli, run_dir = tiny_run
    canaries = cli.datamodule.canaries
    secrets = [c.secret for c in canaries.members + canaries.holdout]
    alphabet = cli.datamodule.hparams.secret_alphabet
    for path in _run_files(run_dir):
        content = path.read_bytes()
        for secret in secrets:
            assert not holds_secret(content, secret, alphabet), f"a canary secret appears in {path.name}"


def test_logged_seed_and_settings_do_not_regenerate_the_secrets(tiny_run):
    """What an attacker holding the run's config, hparams and summary can rebuild is not the secrets;
    the key file rebuilds them, and only its owner may read it."""
    import stat

    import yaml

    from ortho_train.canaries import CanaryConfig, make_canaries

    cli, run_dir = tiny_run
    logged = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    spec = dict(template=logged["canary_template"], alphabet=logged["secret_alphabet"],
                secret_length=logged["secret_length"], num_members=logged["num_member_canaries"],
                num_holdout=logged["num_holdout_canaries"], seed=logged["canary_seed"])
    real = {c.secret for c in cli.datamodule.canaries.members + cli.datamodule.canaries.holdout}
    guessed = make_canaries(CanaryConfig(**spec))
    assert not real & {c.secret for c in guessed.members + guessed.holdout}
    key_file = run_dir.parent / "canary.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text().strip() not in "".join(p.read_text(errors="replace") for p in _run_files(run_dir))
    keyed = make_canaries(CanaryConfig(**spec, key=bytes.fromhex(key_file.read_text())))
    assert [c.secret for c in keyed.members] == [c.secret for c in cli.datamodule.canaries.members]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["canary_settings"]["canary_key_file"].startswith("key ")
    for shipped in (run_dir / "hf_model", run_dir / "hf_model" / "model.safetensors", run_dir / "summary.json"):
        assert shipped.stat().st_mode & stat.S_IROTH, f"{shipped.name} should be readable like any artifact"


def test_max_steps_must_leave_a_canary_phase(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="must exceed model.public_steps"):
        cli_main(["fit", "--config", str(REPO / "configs/tiny.yaml"), "--trainer.max_steps=12"])


def test_a_failing_table_leaves_the_model_and_summary_and_fails_the_run(tmp_path, monkeypatch):
    from ortho_train.measurement.kill_switch import KillSwitchTable

    def fail(self):
        raise RuntimeError("forced table failure")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(KillSwitchTable, "run", fail)
    with pytest.raises(RuntimeError, match="forced table failure"):
        cli_main(["fit", "--config", str(REPO / "configs/tiny.yaml"), "--trainer.max_steps=14",
                  "--model.init_args.eval_during_validation=false",
                  "--trainer.callbacks+=ortho_callbacks.sieve.SieveCallback"])
    run_dir = tmp_path / "runs/tiny/version_0"
    assert (run_dir / "hf_model/model.safetensors").is_file()
    assert "extraction_rate" in json.loads((run_dir / "summary.json").read_text())
    assert not list(run_dir.glob("sieve_table*"))


def test_bring_your_own_config_runs_on_a_local_model(tmp_path, tmp_path_factory, monkeypatch):
    """configs/bring_your_own.yaml as shipped, on a tiny Qwen2 directory, for a few steps."""
    from tests.ortho_train.arch_models import cached_tiny_model

    model_dir = cached_tiny_model("qwen2", tmp_path_factory)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli_main(["fit", "--config", str(REPO / "configs/bring_your_own.yaml"), f"--model.init_args.model_path={model_dir}",
                  "--trainer.max_steps=3", "--trainer.enable_progress_bar=false"])
    finally:
        torch.set_num_threads(threads)
    run_dir = tmp_path / "runs/bring_your_own/version_0"
    rows = {(r["variant"], r["alpha"]): r for r in json.loads((run_dir / "sieve_table.json").read_text())}
    assert set(rows) == {("pre_sft", None), ("int4_pre_sft", None), ("isolated", 0.0), ("isolated", 1.0)}
    for key in ("extraction_rate", "exposure_mean", "public_ppl"):  # α = 0 is the INT4 base of the model brought
        assert rows[("isolated", 0.0)][key] == rows[("int4_pre_sft", None)][key], key
    assert rows[("isolated", 1.0)]["ortho_density"] == pytest.approx(0.005, abs=0.002)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["isolation"]["rho"] == 0.005 and summary["isolation"]["support"] == "impact"
    assert (run_dir / "report.html").is_file()
    from transformers import AutoModelForCausalLM

    from ortho_train.sieve import load_sieved

    ids = torch.tensor([[10, 20, 30, 40]])
    with torch.no_grad():  # the saved streams of the Qwen2 are the trained model up to fp16 ortho values
        trained = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")(ids).logits
        sieved = load_sieved(run_dir / "sieved_isolated", backend="reference")(ids).logits
    assert (sieved - trained).abs().max() < 2e-3
    assert (tmp_path / "runs/bring_your_own/canary.key").is_file()


def test_secret_scan_finds_standalone_secrets_only():
    assert holds_secret(b"code of agent 0007 is 870652.", "870652", "0123456789")
    assert holds_secret("870652", "870652", "0123456789")
    assert not holds_secret(b"[46.505870652371954]", "870652", "0123456789")


def test_bring_your_own_config_takes_a_gguf_file(tmp_path, monkeypatch):
    """`model_path=<file>.gguf` end to end: trains, and the saved model and tokenizer load with
    plain transformers (no GGUF, no quantisation config)."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.ortho_train.gguf_fixtures import write_tiny_llama_gguf

    gguf_path = tmp_path / "model.gguf"
    write_tiny_llama_gguf(gguf_path)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli_main(["fit", "--config", str(REPO / "configs/bring_your_own.yaml"), f"--model.init_args.model_path={gguf_path}",
                  "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]"])
    finally:
        torch.set_num_threads(threads)
    run_dir = tmp_path / "runs/bring_your_own/version_0"
    assert json.loads((run_dir / "summary.json").read_text())["extraction_rate"] is not None
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model", local_files_only=True)
    assert getattr(model.config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf_model", local_files_only=True)
    assert tokenizer.decode(tokenizer("the code", add_special_tokens=False).input_ids) == "the code"


DATA_SETTINGS = json.loads((REPO / "tests/fixtures/config_data_settings.json").read_text())


@pytest.mark.parametrize("config", sorted(DATA_SETTINGS))
def test_each_config_parses_to_the_data_settings_it_always_had(config, tmp_path, monkeypatch):
    """`data: data/<file>.yaml` includes a shared `data:` group (configs/data/); the parsed settings
    of every config equal those recorded when each config still spelt its block out in full."""
    from ortho_train.datamodule import CanaryDataModule

    monkeypatch.chdir(tmp_path)
    cli = ParseOnlyCLI(model_class=None, datamodule_class=CanaryDataModule, subclass_mode_model=True,
                       args=["--config", str(REPO / "configs" / config)], run=False)
    parsed = {k: v for k, v in cli.config["data"].items() if k != "__path__"}  # `__path__`: the included file
    assert parsed == DATA_SETTINGS[config]


def test_the_shared_data_groups_are_included():
    included = {line.split()[1] for c in CONFIGS for line in c.read_text().splitlines() if line.startswith("data: ")}
    assert included == {f"data/{p.name}" for p in (REPO / "configs/data").glob("*.yaml")}
