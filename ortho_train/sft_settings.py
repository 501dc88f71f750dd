"""Start-up checks of `CanarySFTModule`'s settings: its own (at construction) and the run
lengths they must fit (at fit start, once the trainer and data module are known)."""
from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from ortho_train.settings import check_settings, is_finite

MODEL = "model.init_args"  # where a module's settings sit in a config


def check_sft_settings(hp: Any) -> None:
    """Refuse, naming the setting, a value the module would fail on later or run with silently."""
    public_steps = hp.public_steps
    canary_phase_public_windows = hp.canary_phase_public_windows
    lr = hp.lr
    sft_lr = hp.sft_lr
    warmup_steps = hp.warmup_steps
    sft_warmup_steps = hp.sft_warmup_steps
    min_lr_ratio = hp.min_lr_ratio
    weight_decay = hp.weight_decay
    betas = hp.betas
    val_exposure_references = hp.val_exposure_references
    check_settings(MODEL, [
        ("public_steps", public_steps, public_steps >= 0, "must be ≥ 0 (0: no public phase)"),
        ("canary_phase_public_windows", canary_phase_public_windows,
         canary_phase_public_windows is None or canary_phase_public_windows >= 1,
         "must be ≥ 1 (or null: the whole public batch)"),
        *((name, value, is_finite(value) and value > 0, "learning rates must be > 0")
          for name, value in (("lr", lr), ("sft_lr", sft_lr))),
        *((name, value, value >= 0, "must be ≥ 0") for name, value in
          (("warmup_steps", warmup_steps), ("sft_warmup_steps", sft_warmup_steps))),
        ("warmup_steps", warmup_steps, public_steps == 0 or warmup_steps <= public_steps,
         f"longer than the public phase ({MODEL}.public_steps={public_steps}): the public model "
         "would be trained at a fraction of model.init_args.lr only"),
        ("min_lr_ratio", min_lr_ratio, is_finite(min_lr_ratio) and 0 <= min_lr_ratio <= 1,
         "the cosine floor is a fraction of the peak rate, in [0, 1] (below 0 the rate turns "
         "negative: gradient ascent)"),
        ("weight_decay", weight_decay, is_finite(weight_decay) and weight_decay >= 0,
         "must be ≥ 0 (a negative decay inflates the weights)"),
        ("betas", list(betas), len(betas) == 2 and all(is_finite(b) and 0 <= b < 1 for b in betas),
         "AdamW needs two betas in [0, 1)"),
        ("val_exposure_references", val_exposure_references, val_exposure_references >= 1,
         "must be ≥ 1 (reference secrets ranked at each validation)"),
    ])


def check_phase_lengths(hp: Any, total: int | None, batch_size: int) -> None:
    """`trainer.max_steps` must leave a canary phase; a canary step uses at most the windows of a
    public batch; a canary warm-up longer than the phase is worth a warning."""
    if total is None or total <= hp.public_steps:
        raise ValueError(f"trainer.max_steps ({total}) must exceed model.public_steps "
                         f"({hp.public_steps}): the canary phase would be empty")
    windows = hp.canary_phase_public_windows
    if windows is not None and windows > batch_size:
        raise ValueError(f"model.canary_phase_public_windows ({windows}) exceeds data.batch_size "
                         f"({batch_size}): a step can only use the windows its batch holds")
    canary_steps = total - hp.public_steps
    if hp.sft_warmup_steps > canary_steps:  # a warning: short test runs keep the default warm-up
        rank_zero_warn(f"{MODEL}.sft_warmup_steps={hp.sft_warmup_steps} is longer than the canary "
                       f"phase (trainer.max_steps - {MODEL}.public_steps = {canary_steps} steps): the canaries "
                       f"are trained at a fraction of {MODEL}.sft_lr only")
