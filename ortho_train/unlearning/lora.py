"""peft LoRA adapters for `UnlearnModule` (mode 'lora'): their settings, the wrapping and the mode.

The update of an adapted linear is ΔW = (alpha / rank) · B A with A (rank, d_in), B (d_out, rank);
the base weights stay frozen.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D

from ortho_train.unlearning.update_mode import UpdateMode

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_LINEAR = "all-linear"  # peft: every linear / Conv1D projection but the output layer, any architecture


@dataclass
class LoraAdapterConfig:
    """peft LoRA adapters.

    Args:
        rank: adapter rank r.
        alpha: scaling numerator (the update is alpha/r · B A).
        target_modules: linear names (last dotted component) that get an adapter: Llama, Qwen2 and
            Mistral name them as the default does; Phi uses q_proj, k_proj, v_proj, dense, fc1,
            fc2; GPT-2 c_attn, c_proj, c_fc (Conv1D). `["all-linear"]` lets peft take every
            linear projection of any architecture except the output layer.
        dropout: dropout on the adapter input.
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEARS))
    dropout: float = 0.0


def wrap_lora(model: nn.Module, settings: LoraAdapterConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    linears = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    wanted = list(settings.target_modules)
    if wanted == [ALL_LINEAR]:
        targets = ALL_LINEAR  # peft's own selection: a string, not a list of names
    elif ALL_LINEAR in wanted:
        raise ValueError(f"model.lora.target_modules {wanted}: {ALL_LINEAR!r} stands alone ([{ALL_LINEAR!r}]), "
                         "not beside layer names")
    else:
        missing = sorted(set(wanted) - linears)
        if not wanted or missing:
            raise ValueError(f"model.lora.target_modules {missing or wanted} match no linear layer of the model; "
                             f"its linear layers are named {sorted(linears)} (or use [{ALL_LINEAR!r}] alone)")
        targets = wanted
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=targets,
                        lora_dropout=settings.dropout, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class LoraUpdate(UpdateMode):
    """peft LoRA adapters on `settings.target_modules`, the base frozen (quantisation-robust LoRA
    unlearning). float16 and bfloat16 bases are fine: peft keeps the adapters in float32."""

    name = "lora"
    settings_class = LoraAdapterConfig
    settings_argument = "lora"

    def __init__(self, settings: LoraAdapterConfig | None = None):
        super().__init__(settings)

    def check_settings(self, weight_decay: float, dtype) -> None:
        pass

    def prepare(self, model: nn.Module) -> nn.Module:
        return wrap_lora(model, self.settings)

    def summary(self) -> dict:
        return asdict(self.settings)
