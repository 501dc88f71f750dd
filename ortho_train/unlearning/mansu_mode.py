"""The MANSU update mode: only the weight rows of the forget-specific components train, and every
applied update is projected off the retain-gradient span, bounded by the diagonal Fisher and
floored at one quantisation bin per weight (MANSU; maths in `mansu.py`, plan in `mansu_setup.py`).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Mapping, Sequence

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ortho_train.model_support import require_float32, require_linear_only
from ortho_train.quantisation import quantisable_linears
from ortho_train.unlearning import attribution
from ortho_train.unlearning.mansu import MansuConfig, MansuPlan
from ortho_train.unlearning.mansu_setup import build_mansu_plan
from ortho_train.unlearning.update_mode import Batches, UpdateMode


def _weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The (d_out, d_in) weights of the model's quantisable linears, by module name."""
    return {name: linear.weight for name, linear in quantisable_linears(model).items()}


class MansuUpdate(UpdateMode):
    """Row masks over nn.Linear weights, bin floors on the stored values (needs float32 weights)."""

    name = "mansu"
    settings_class = MansuConfig
    settings_argument = "mansu"
    needs_start_attribution = True

    def __init__(self, settings: MansuConfig | None = None):
        super().__init__(settings)
        self.plan: MansuPlan | None = None
        self._before: Tensor | None = None  # the planned entries before the current step

    def check_settings(self, weight_decay: float, dtype) -> None:
        if weight_decay:
            raise ValueError("mode 'mansu' needs weight_decay=0: decay would move weights outside the plan")

    def check_model(self, model: nn.Module) -> None:
        require_linear_only(model, "model.mode=mansu")
        require_float32(model, "model.mode=mansu")

    def prepare(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        for weight in _weights(model).values():
            weight.requires_grad_(True)
        return model

    def summary(self) -> dict:
        return asdict(self.settings)

    def retain_batches_wanted(self, batch_size: int) -> int:
        return max(self.settings.attribution_batches, -(-self.settings.retain_sequences // batch_size))

    def start(self, forget: Batches, retain: Batches, forget_scores: Mapping[str, Tensor] | None,
              names: Sequence[str], broadcast: Callable[[Any], Any]) -> None:
        model = self.host.model
        plan = build_mansu_plan(model, forget, retain, forget_scores, self.settings, names, _weights(model))
        self.plan = broadcast(plan)  # one plan on every rank
        rank_zero_info(f"MANSU plan: {self.plan.info}")

    def trainable_count(self) -> int:
        return int(self.plan.theta0.numel()) if self.plan is not None else super().trainable_count()

    def after_backward(self) -> None:
        """Only the planned entries may move: the other gradients are zeroed before clipping."""
        params = _weights(self.host.model)
        for name, param in params.items():  # only the planned entries may move
            if param.grad is not None:
                mask = self.plan.masks.get(name)
                param.grad.mul_(mask.to(param.grad) if mask is not None else 0.0)
        self._before = self.plan.gather(params)

    def after_step(self) -> dict[str, float]:
        if self._before is None:  # the step was skipped
            return {}
        found = self.plan.constrain_(_weights(self.host.model), self._before)
        self._before = None
        return {"mansu/predicted_retain_damage": found["damage"], "mansu/min_floor_ratio": found["min_floor_ratio"]}

    def report(self, forget_scores_before: Mapping[str, Tensor] | None,
               forget_scores_after: Mapping[str, Tensor] | None) -> dict:
        report = {"mansu": {k: v for k, v in self.plan.info.items() if k != "row_masks"}}
        if forget_scores_before is not None and forget_scores_after is not None:
            report["selected_attribution_retained"] = attribution.selected_attribution_retained(
                forget_scores_before, forget_scores_after, self.plan.info["row_masks"])
        return report

    def state_dict(self) -> dict:
        return {"plan": None if self.plan is None else vars(self.plan)}

    def load_state_dict(self, state: dict) -> None:
        self.plan = None if state.get("plan") is None else MansuPlan(**state["plan"])
