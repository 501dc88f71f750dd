"""AdapterExportCallback: the adapter round-trips through plain peft, the merged model through
plain transformers, and the metrics card states method, losses, quantisation and the PTQ gap."""
import json

import lightning as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ortho_callbacks.adapter_export import AdapterExportCallback
from ortho_callbacks.ptq_gap import PTQGapCallback
from ortho_train.unlearn_module import LoraAdapterConfig, UnlearnModule
from tests.ortho_train.unlearn_helpers import (  # noqa: F401
    cached_tiny_canary_model,
    one_thread,
    single_thread,
    tiny_datamodule,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return cached_tiny_canary_model(tmp_path_factory)


def _fit(module, model_dir, run_dir, callbacks, steps=3):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=run_dir, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, datamodule=tiny_datamodule(model_dir))


@pytest.fixture(scope="module")
def lora_run(model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora_export")
    module = UnlearnModule(str(model_dir), mode="lora", loss="npo_gdr", lr=1e-2,
                           lora=LoraAdapterConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                           guard_every_n_steps=0, attribution_batches=0)
    ptq_callback = PTQGapCallback(formats=["nf4"], exposure_references=20, final_exposure_references=20,
                                  evaluate_before=False)
    with one_thread():  # module-scoped: set up before the autouse function fixture
        _fit(module, model_dir, run_dir, [ptq_callback, AdapterExportCallback(save_merged=True)])
    return module, run_dir


def test_adapter_loads_with_plain_peft_into_a_fresh_base(lora_run, model_dir):
    module, run_dir = lora_run
    ids = torch.randint(3, 259, (2, 21), generator=torch.Generator().manual_seed(1))
    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    loaded = PeftModel.from_pretrained(fresh, run_dir / "adapter").eval()
    with torch.no_grad():
        expected = module.model.eval()(ids).logits
        assert torch.equal(loaded(ids).logits, expected)
        assert not torch.equal(AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits, expected)  # it did change
        merged = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model_unlearned")
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_adapter_names_its_base_by_an_absolute_path_that_loads_from_anywhere(model_dir, tmp_path, monkeypatch):
    """A run started with a relative `model_path` (as the shipped configs are) exports an adapter
    whose `base_model_name_or_path` is absolute: `AutoPeftModelForCausalLM` loads it elsewhere."""
    from pathlib import Path

    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(model_dir.parent)
    module = UnlearnModule(model_dir.name, mode="lora", loss="npo_gdr",
                           lora=LoraAdapterConfig(rank=4, alpha=8, target_modules=["q_proj"]),
                           guard_every_n_steps=0, attribution_batches=0)
    module.model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == model_dir.resolve()
    monkeypatch.chdir(tmp_path)  # elsewhere: a relative base path would be read as a hub id
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", local_files_only=True).eval()
    ids = torch.randint(3, 259, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, module.model.eval()(ids).logits)


def test_metrics_card_states_method_losses_quantisation_and_gap(lora_run):
    module, run_dir = lora_run
    card = json.loads((run_dir / "metrics_card.json").read_text())
    gap = json.loads((run_dir / "ptq_gap.json").read_text())
    assert card["status"] == "ok" and card["failure"] is None
    assert card["method"]["mode"] == "lora" and card["method"]["loss"] == "npo_gdr"
    assert card["method"]["lora"]["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert card["quantisation"]["nf4"] == {"format": "nf4", "library": "bitsandbytes", "blocksize": 64,
                                           "double_quant": False, "compute_dtype": "float32",
                                           "skip_modules": ["lm_head"], "cpu_kernel": "portable"}
    rows = {row["metric"]: row for row in card["ptq_table"]}
    assert rows["forget_extraction"]["nf4"] == gap["forget_extraction_nf4"]
    assert rows["forget_extraction"]["gap_nf4_adapter"] == gap["ptq_gap_extraction_nf4_adapter"]
    assert rows["public_ppl"]["fp"] == gap["public_ppl_fp"]
    assert card["training"]["steps"] == 3
    markdown = (run_dir / "metrics_card.md").read_text()
    assert "lora / npo_gdr" in markdown and "| model | forget_extraction |" in markdown
    assert "| nf4_adapter (after) |" in markdown and "| fp (after) |" in markdown


def test_full_run_without_ptq_exports_the_model_and_says_so(model_dir, tmp_path):
    module = UnlearnModule(str(model_dir), mode="full", loss="ga", lr=1e-4, guard_every_n_steps=0,
                           attribution_batches=0)
    _fit(module, model_dir, tmp_path, [AdapterExportCallback()], steps=1)
    assert not (tmp_path / "adapter").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_model_unlearned")
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert "PTQ gap not measured" in (tmp_path / "metrics_card.md").read_text()


def test_a_failing_export_leaves_no_partial_artifact_set(model_dir, tmp_path, monkeypatch):
    """The merged model fails after the adapter was saved: neither lands, no temporary is left."""
    from types import SimpleNamespace

    import ortho_callbacks.adapter_export
    from ortho_train.unlearning.lora import LoraAdapterConfig, wrap_lora as _wrap_lora

    model = _wrap_lora(AutoModelForCausalLM.from_pretrained(model_dir), LoraAdapterConfig(rank=2))
    module = SimpleNamespace(model=model, tokenizer=None, run_dir=tmp_path)
    monkeypatch.setattr(ortho_callbacks.adapter_export, "merged_copy", lambda m: (_ for _ in ()).throw(PermissionError("not writable")))
    with pytest.raises(PermissionError):
        AdapterExportCallback(save_merged=True).export_models(module)
    assert list(tmp_path.iterdir()) == []
