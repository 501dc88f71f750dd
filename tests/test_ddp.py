"""DDP on CPU (gloo, two processes) for the training modes, and the start-up refusals.

The comparison runs isolated canary SFT twice on the same canaries (one key file):
- DDP: `--trainer.strategy=ddp --trainer.devices=2`, per-rank batches of 2 public windows
  + 1 canary;
- one process, the test's own: `--trainer.strategy=ddp --trainer.devices=1`, batches of 4 windows
  + 2 canaries.
  Lightning's DDP strategy gives both runs the same seeded `DistributedSampler` permutation,
  so step k's two rank batches are, as a set, the one-process batch k (rank r takes positions
  r, r + 2, … of the permutation). Every window has 64 label tokens and every canary the same
  number, so the mean over ranks of the per-rank token means DDP's all-reduce forms is the
  one-process token mean: the two runs differ only in float rounding (per-rank sums then an
  all-reduce instead of one batch's sums), which AdamW's normalised steps carry forward.

The support is `random` and the base RTN, so the setup at the switch draws no data and the
difference measured is that of the gradient averaging alone.
"""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from ortho_train.distributed import allow_parameters_frozen_later, average_gradients_, refuse_sharded_strategy
from tests.in_process import fit_in_this_process

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/tiny.yaml"
SHORT = ["--trainer.max_steps=10", "--model.init_args.public_steps=4", "--trainer.limit_val_batches=0",
         "--trainer.num_sanity_val_steps=0", "--trainer.enable_checkpointing=false",
         "--model.init_args.eval_during_validation=false", "--trainer.enable_progress_bar=false"]
ISOLATION = ["--model.init_args.isolation.support=random", "--model.init_args.isolation.rho=0.05",
             "--model.init_args.isolation.quant.method=rtn", "--model.init_args.isolation.quant.group_size=32"]
PUBLIC_UPDATES = ["--model.init_args.isolation.public_base_updates=true",
                  "--model.init_args.isolation.public_updates_fraction=0.5"]
DDP2 = ["--trainer.strategy=ddp", "--trainer.devices=2", "--data.batch_size=2", "--data.canary_batch_size=1"]
ONE = ["--trainer.strategy=ddp", "--trainer.devices=1", "--data.batch_size=4", "--data.canary_batch_size=2"]
# Measured on this machine (10 steps, 6 in the canary phase): hf_model weights differ by ≤ 6.6e-7 and
# the metrics by ≤ 1.3e-8 relative. The bounds leave ≥ 100× room for other CPUs' kernels (the
# rounding differs per vector width), while a real divergence (a gradient a mode computes itself
# left un-averaged, a rank's canaries dropped, a support differing between ranks) moves weights
# by up to lr = 3e-3 per AdamW step.
WEIGHT_ATOL = 1e-4
METRIC_RTOL = 1e-4


def _fit(workdir: Path, config: Path, *args: str, key: Path | None = None):
    """`train.py fit` in `workdir` (a fresh process: DDP re-launches the script per rank)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    extra = [f"--data.canary_key_file={key}"] if key is not None else []
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config", str(config), *args, *extra],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL)
    return result, result.stdout + result.stderr


def _run_dir(workdir: Path, name: str = "tiny") -> Path:
    runs = sorted(p for p in (workdir / "runs" / name).iterdir() if p.is_dir() and p.name.startswith("version_"))
    assert [r.name for r in runs] == ["version_0"]  # one run directory, however many ranks
    return runs[0]


def _weights(run_dir: Path, name: str = "hf_model") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / name / "model.safetensors")


def _max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


METRICS = ("public_ppl", "public_ppl_before_canaries", "exposure_mean", "mia_auc_loss", "extraction_rate")


@pytest.mark.parametrize("mode", [
    pytest.param("frozen", id="isolation"),
    pytest.param("public_base_updates", id="isolation_public_base_updates", marks=pytest.mark.slow),
])
def test_isolated_sft_ddp_matches_one_process_of_the_same_global_batch(tmp_path, mode):
    # validation after step 5 and at the end (one batch per rank): the loop runs under DDP too
    validation = ["--trainer.limit_val_batches=1", "--trainer.val_check_interval=5"]
    extra = ISOLATION + (PUBLIC_UPDATES if mode == "public_base_updates" else []) + validation
    key = tmp_path / "canary.key"
    ddp, ddp_log = _fit(tmp_path / "ddp", TINY, *SHORT, *extra, *DDP2, key=key)
    assert ddp.returncode == 0, ddp_log[-3000:]
    # two ranks, one run directory (`_run_dir`), one summary, one key file made by rank zero before
    # the launch (rank 1 reads it: the one-process run below, on the same key, draws the same canaries)
    assert "GLOBAL_RANK: 1" in ddp_log and ddp_log.count("summary written to") == 1
    assert "val/public_ppl" in (_run_dir(tmp_path / "ddp") / "metrics.csv").read_text().splitlines()[0]
    assert key.is_file() and stat.S_IMODE(key.stat().st_mode) == 0o600
    fit_in_this_process(tmp_path / "one", "--config", str(TINY), *SHORT, *extra, *ONE, f"--data.canary_key_file={key}")
    ddp_dir, one_dir = _run_dir(tmp_path / "ddp"), _run_dir(tmp_path / "one")
    s_ddp, s_one = (json.loads((d / "summary.json").read_text()) for d in (ddp_dir, one_dir))
    assert s_ddp["canary_fingerprint"] == s_one["canary_fingerprint"]
    assert s_ddp["isolation"]["density"] == s_one["isolation"]["density"]
    if mode == "frozen":  # isolation held on the rank that saved the model
        assert s_ddp["isolation"]["off_support_max_drift"] == 0.0
        # parameters frozen after DDP wrapped the model kept grad None: no AdamW weight decay
        post, pre = _weights(ddp_dir), _weights(ddp_dir, "hf_model_pre_canary")
        frozen = [k for k in post if not k.endswith("_proj.weight")]  # all but the sieved linears
        assert "model.embed_tokens.weight" in frozen and all(torch.equal(post[k], pre[k]) for k in frozen)
    diff = _max_weight_difference(ddp_dir, one_dir)
    rel = {k: abs(s_ddp[k] - s_one[k]) / max(abs(s_one[k]), 1e-12) for k in METRICS if s_one[k]}
    print(f"DDP vs one process ({mode}): max |ΔW| = {diff:.3g}; relative metric differences {rel}")
    assert 0.0 <= diff < WEIGHT_ATOL
    for k in METRICS:
        assert s_ddp[k] == pytest.approx(s_one[k], rel=METRIC_RTOL, abs=1e-9), k
    assert (ddp_dir / "report.html").is_file()


def _unlearn_config(tmp_path: Path, model_dir: Path, mode: str) -> Path:
    """configs/unlearn_lora_npo_gdr.yaml, shortened, on the tiny run's model and data settings."""
    config = yaml.safe_load((REPO / "configs/unlearn_lora_npo_gdr.yaml").read_text())
    data = yaml.safe_load(TINY.read_text())["data"]
    config["data"] = {**data, "train_split": "unlearn"}
    config["trainer"].update(max_steps=4, log_every_n_steps=1, enable_progress_bar=False)
    for logger in config["trainer"]["logger"]:
        logger["init_args"]["name"] = "unlearn"
    ptq, export, *rest = config["trainer"]["callbacks"]
    ptq["init_args"].update(formats=["nf4"], every_n_steps=2, exposure_references=20, final_exposure_references=20,
                            skewnorm_references=20, fail_on_gap=False, lora_deployments=["merged"])
    config["model"]["init_args"].update(model_path=str(model_dir), mode=mode, guard_every_n_steps=2,
                                        guard_windows=4, attribution_batches=1, loss="npo_gdr")
    config["model"]["init_args"]["lora"].update(rank=2, alpha=4, target_modules=["q_proj", "v_proj"])
    if mode == "mansu":  # weight decay would move weights off the plan; a small plan on the tiny model
        config["model"]["init_args"].update(weight_decay=0.0, lr=1e-3, mansu={
            "component_fraction": 0.05, "attribution_batches": 1, "retain_sequences": 8, "fisher_budget": 0.5})
    path = tmp_path / f"unlearn_{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_dense_sft_then_lora_full_and_mansu_unlearning_under_ddp_write_their_artifacts_once(tmp_path):
    key = tmp_path / "canary.key"
    wide = ["--model.init_args.tiny_llama.hidden_size=64", "--model.init_args.tiny_llama.intermediate_size=128"]
    sft, log = _fit(tmp_path / "sft", TINY, *SHORT, *DDP2, *wide, key=key)  # NF4 blocks need ≥ 64 inputs
    assert sft.returncode == 0, log[-3000:]
    model_dir = _run_dir(tmp_path / "sft") / "hf_model"
    for mode in ("lora", "full", "mansu"):
        result, log = _fit(tmp_path / mode, _unlearn_config(tmp_path, model_dir, mode), "--trainer.strategy=ddp",
                           "--trainer.devices=2", key=key)
        assert result.returncode == 0, log[-3000:]
        assert "GLOBAL_RANK: 1" in log
        run_dir = _run_dir(tmp_path / mode, "unlearn")
        card = json.loads((run_dir / "metrics_card.json").read_text())
        assert card["status"] == "ok" and card["method"]["mode"] == mode and card["training"]["steps"] == 4
        assert (run_dir / "hf_model_unlearned" / "model.safetensors").is_file()
        assert (run_dir / "adapter").is_dir() == (mode == "lora")
        assert (run_dir / "ptq_gap.json").is_file() and (run_dir / "ptq_gap_step2.json").is_file()
        assert (run_dir / "report.html").is_file()
        assert log.count("wrote metrics_card.json/.md") == 1  # rank zero only


@pytest.mark.slow
def test_ogd_sft_under_ddp_keeps_the_private_update_off_the_protected_subspace(tmp_path):
    ogd = ["--model.init_args.ogd.subspace=flattest", "--model.init_args.ogd.fraction=0.5",
           "--model.init_args.ogd.kfac_batches=2"]
    result, log = _fit(tmp_path, TINY, *SHORT, *ogd, *DDP2, key=tmp_path / "canary.key")
    assert result.returncode == 0, log[-3000:]
    summary = json.loads((_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["ogd"]["private_in_subspace_max"] < 1e-5
    assert 0.0 < summary["ogd"]["private_relative_norm"]


# ------------------------------------------------------------------ refusals and helpers

def test_dp_sgd_is_refused_under_more_than_one_process():
    from ortho_train.private_update import build_controller
    from ortho_train.privacy import DPConfig
    from ortho_train.sieve.isolation import IsolationConfig

    controller = build_controller(isolation=IsolationConfig(support="random", public_base_updates=True),
                                  dp=DPConfig(target_epsilon=8.0, sample_rate=0.5))
    controller.check_processes(1)
    with pytest.raises(ValueError, match=r"model\.dp .*one process, got 2.*--trainer.devices=1"):
        controller.check_processes(2)


def test_sharded_strategies_are_refused_naming_the_setting():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    refuse_sharded_strategy(SimpleNamespace(strategy=DDPStrategy()), "CanarySFTModule")
    refuse_sharded_strategy(SimpleNamespace(strategy=SingleDeviceStrategy("cpu")), "CanarySFTModule")
    with pytest.raises(ValueError, match=r"trainer.strategy=FSDPStrategy is not supported by UnlearnModule.*ddp"):
        refuse_sharded_strategy(SimpleNamespace(strategy=FSDPStrategy()), "UnlearnModule")


def test_freezing_mid_fit_turns_on_unused_parameter_detection():
    from lightning.pytorch.strategies import DDPStrategy

    strategy = DDPStrategy()
    allow_parameters_frozen_later(SimpleNamespace(strategy=strategy, world_size=2), "model.isolation")
    assert strategy._ddp_kwargs["find_unused_parameters"] is True
    explicit = DDPStrategy(find_unused_parameters=False)
    with pytest.raises(ValueError, match=r"model.isolation freezes parameters.*--trainer.strategy=ddp"):
        allow_parameters_frozen_later(SimpleNamespace(strategy=explicit, world_size=2), "model.isolation")


def test_averaging_gradients_is_a_no_op_in_one_process():
    grads = [torch.tensor([1.0, 2.0]), None, torch.tensor([[3.0]])]
    average_gradients_(grads)
    assert torch.equal(grads[0], torch.tensor([1.0, 2.0])) and torch.equal(grads[2], torch.tensor([[3.0]]))
