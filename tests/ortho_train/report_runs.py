"""Small real runs of the shipped DP, OGD and unlearning configs, for the report's acceptance test.

Each config is the shipped YAML with the toy's sizes: a 2-layer Llama (hidden 64, so NF4 blocks of
64 fit), `configs/tiny.yaml`'s data settings with more holdout canaries (the ROC curves need some),
short training and small tables. A tiny dense canary fine-tune comes first: its `hf_model` is the
model the unlearning run forgets, its `hf_model_pre_canary` the public model the DP and OGD runs
start from (as `runs/quickstart/latest/...` is for the shipped configs).

    python -m tests.ortho_train.report_runs OUT_DIR   # the four runs, then one report each
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from tests.in_process import fit_in_this_process

REPO = Path(__file__).resolve().parents[2]
WIDE = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}
DATA = {"num_member_canaries": 8, "num_holdout_canaries": 48, "canary_batch_size": 4}
EXPOSURE = {"exposure_references": 50, "exposure_canaries": 4}


def _config(name: str, root: Path, steps: int) -> dict:
    """configs/<name>.yaml with the toy's data settings, `steps` steps, its logs under root/runs."""
    config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    data = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())["data"]
    config["data"] = {**data, **DATA, "canary_key_file": str(root / "canary.key")}
    config["trainer"].update(max_steps=steps, log_every_n_steps=2, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(root / "runs"))
    for logger in config["trainer"]["logger"]:
        logger["init_args"]["save_dir"] = str(root / "runs")
    return config


def _callback(config: dict, suffix: str) -> dict:
    return next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(suffix))


def _write(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def dense_config(root: Path) -> Path:
    """configs/tiny.yaml on the wide toy: 20 public steps, 180 canary steps (enough to memorise)."""
    config = _config("tiny", root, 200)
    config["model"]["init_args"].update(tiny_llama=WIDE, public_steps=20, sft_lr=1e-2, val_exposure_references=20)
    config["trainer"].update(val_check_interval=100)
    return _write(config, root / "dense.yaml")


def dp_config(root: Path, public_model: Path) -> Path:
    """configs/dp_dual.yaml, 30 steps, two σ per post-hoc family."""
    config = _config("dp_dual", root, 30)
    table = _callback(config, "DPTableCallback")["init_args"]["table"]
    table.update(posthoc_sigmas=[0.01, 0.1], stochastic_sigmas=[1.0], group_size=32, **EXPOSURE)
    _callback(config, "DPTableCallback")["init_args"]["calibration_batches"] = 2
    init = config["model"]["init_args"]
    init.update(model_path=str(public_model))
    init["isolation"].update(rho=0.05, quant={"method": "gptq", "bits": 4, "group_size": 32})
    init["dp"].update(expected_batch_size=4)
    return _write(config, root / "dp.yaml")


def ogd_config(root: Path, public_model: Path) -> Path:
    """configs/ogd_sft.yaml, 80 steps, small kill-switch and separation tables."""
    config = _config("ogd_sft", root, 80)
    _callback(config, "SieveCallback")["init_args"]["table"].update(alphas=[0.0, 0.5, 1.0], **EXPOSURE)
    _callback(config, "SieveCallback")["init_args"]["calibration_batches"] = 2
    _callback(config, "SeparationTableCallback")["init_args"]["table"].update(barrier_batches=2, **EXPOSURE)
    init = config["model"]["init_args"]
    init.update(model_path=str(public_model), sft_lr=1e-2)
    init["ogd"].update(kfac_batches=2)
    return _write(config, root / "ogd.yaml")


def unlearn_config(root: Path, memorised_model: Path) -> Path:
    """configs/unlearn_lora_npo_gdr.yaml, 12 steps, a PTQ gap every 4 steps."""
    config = _config("unlearn_lora_npo_gdr", root, 12)
    config["data"].update(train_split="unlearn", forget_members=None, forget_target="secret")
    ptq = _callback(config, "PTQGapCallback")["init_args"]
    ptq.update(every_n_steps=4, exposure_references=50, final_exposure_references=50, skewnorm_references=50,
               fail_on_gap=False)
    init = config["model"]["init_args"]
    init.update(model_path=str(memorised_model), lr=5e-3, guard_every_n_steps=4, guard_windows=4,
                max_retain_ppl_factor=3.0)
    init["lora"].update(rank=4, alpha=8)
    return _write(config, root / "unlearn.yaml")


def latest(root: Path, name: str) -> Path:
    """The newest run directory root/runs/<name>/version_N."""
    versions = sorted((root / "runs" / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return versions[-1]


def toy_runs(root: Path) -> dict[str, Path]:
    """The dense, DP, OGD and unlearning runs under `root` (each writes its own report.html)."""
    fit_in_this_process(root, "--config", str(dense_config(root)))
    dense = latest(root, "tiny")
    fit_in_this_process(root, "--config", str(dp_config(root, dense / "hf_model_pre_canary")))
    fit_in_this_process(root, "--config", str(ogd_config(root, dense / "hf_model_pre_canary")))
    fit_in_this_process(root, "--config", str(unlearn_config(root, dense / "hf_model")))
    return {"dense": dense, "dp": latest(root, "dp_dual"), "ogd": latest(root, "ogd_sft"),
            "unlearn": latest(root, "unlearn_lora_npo_gdr")}


if __name__ == "__main__":
    for name, run in toy_runs(Path(sys.argv[1]).resolve()).items():
        print(f"{name}: {run / 'report.html'}")
