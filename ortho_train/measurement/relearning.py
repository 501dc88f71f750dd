"""The relearning attack on an unlearned model, in full precision and in 4 bits (no Lightning).

Relearning is the strongest known attack on unlearning ("Unlearning or Obfuscating? Jogging the
Memory of Unlearned LLMs via Benign Relearning", Hu et al., 2024; "Eight Methods to Evaluate Robust
Unlearning in LLMs", Lynch et al., 2024): fine-tune the unlearned model for a few steps on data an
attacker can get, then measure the forgotten knowledge again. Knowledge that returns after a few
steps, faster than in a model that never unlearned it or never held it, was hidden, not removed.

`RelearningTable.run()`:
1. split (`split_forget`): the forget canaries are permuted by a generator seeded with `seed`; the
   attacker gets k = round(relearn_fraction · n) of them (clipped to [1, n − 1]), the rest are measured;
2. for each model (`unlearned`: the run's model with any LoRA adapter merged; then each reference,
   e.g. `start`, the model unlearning began from) and each condition, a float32 *copy* is
   fine-tuned with AdamW (lr, no weight decay) on the token-mean NLL
   L = −(1/|M|) Σ_{(b,t)∈M} log p(x_{b,t+1} | x_{b,≤t}) of its batches:
   - `public`: public training windows (benign relearning: no forget data at all);
   - `forget`: the relearn part's canaries, every token labelled (the attacker knows them whole);
   the batches come from a generator seeded with `seed`, so every model sees the same ones;
3. after each count in `steps` (cumulative; 0 = not fine-tuned, the same model for every condition,
   measured once and reported under each) the copy is measured in full precision (`fp`) and in
   each 4-bit format the PTQ gap measures (`quantised_copy` of the relearned copy: a plain model,
   so each format is one deployment, merge-then-quantise; there is no adapter left to keep apart);
4. measured, on the held-out (measured) forget canaries only: `extraction` (greedy decoding from
   the prefix, exact match of the whole secret), `symbol_accuracy`, and `nll_mean`, the mean over
   canaries of the secret's NLL Σ_{t∈secret} −ln p(s_t | prefix, s_<t) in nats.

One copy exists at a time (plus the quantised copy being measured). Each copy's segment prints a
`[relearning …]` line with its seconds and peak RSS (`ortho_train.progress_lines.phase`), and every
row records `seconds` (quantising and measuring it) and `peak_rss_mib`.

`relearning.json` (written by `RelearningCallback`; numbers and indices only, never canary text):

    {"schema": 1,
     "config": {"steps", "lr", "batch_size", "seed", "relearn_fraction", "conditions", "references"},
     "split": {"forget_canaries": n, "relearn": [positions in the forget set], "measured": [...]},
     "models": {"unlearned": "<what it is>", "start": "<path>", ...},   # in row order
     "deployments": ["fp", "nf4", ...],
     "quantisation": {"<format>": PTQConfig.describe(format)},
     "rows": [{"model", "condition", "steps", "deployment",
               "extraction", "symbol_accuracy", "nll_mean",           # over the measured canaries
               "train_loss",                                           # last relearning step's L (None at 0)
               "seconds", "peak_rss_mib"}, ...],                       # model × condition × steps × deployment
     "notes": [...], "seconds": <total>,
     "skipped": {"<reference>": "<why it was not relearnt>"}}               # added by RelearningCallback
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ortho_train.evaluation import extraction_metrics
from ortho_train.measurement.formatting import format_value, markdown_table
from ortho_train.measurement.progress import peak_rss_mib
from ortho_train.measurement.relearning_config import RelearningConfig, split_forget
from ortho_train.metrics import label_logprobs
from ortho_train.models import eval_mode
from ortho_train.progress_lines import phase
from ortho_train.quantisation import PTQConfig, quantised_copy
from ortho_train.token_datasets import TokenisedCanaries, answer_collate, pad_collate, subset_canaries

__all__ = ["RelearningConfig", "RelearningTable", "ROW_KEYS", "secret_nll", "split_forget", "to_markdown"]

ROW_KEYS = ("model", "condition", "steps", "deployment", "extraction", "symbol_accuracy", "nll_mean",
            "train_loss", "seconds", "peak_rss_mib")
Batches = Iterator[dict[str, torch.Tensor]]


@torch.no_grad()
def secret_nll(model: nn.Module, canaries: TokenisedCanaries, pad_token_id: int, batch_size: int = 64) -> torch.Tensor:
    """Σ_{t∈secret} −ln p(s_t | prefix, s_<t) of every canary (nats, float64, CPU): shape (n,)."""
    device = next(model.parameters()).device
    items = [(full, len(prefix), len(prefix) + len(secret))
             for prefix, secret, full in zip(canaries.prefix_ids, canaries.secret_ids, canaries.full_ids)]
    nlls = []
    with eval_mode(model):
        for start in range(0, len(items), batch_size):
            batch = answer_collate(items[start:start + batch_size], pad_token_id)  # labels: the secret only
            ids, labels, mask = (batch[k].to(device) for k in ("input_ids", "labels", "attention_mask"))
            logp, _ = label_logprobs(model, ids, labels, mask)  # (B, T-1), 0 where unscored
            nlls.append(-logp.double().sum(dim=-1).cpu())
    return torch.cat(nlls)


def _cycle(loader: DataLoader) -> Batches:
    while True:
        yield from loader


def canary_batches(canaries: TokenisedCanaries, batch_size: int, pad_token_id: int, seed: int) -> Batches:
    """Endless batches of whole canaries (every token labelled), reshuffled each pass."""
    loader = DataLoader(canaries.full_ids, batch_size=min(batch_size, len(canaries)), shuffle=True,
                        drop_last=True, generator=torch.Generator().manual_seed(seed),
                        collate_fn=lambda rows: pad_collate(rows, pad_token_id))
    return _cycle(loader)


def window_batches(windows: Dataset, batch_size: int, seed: int) -> Batches:
    """Endless batches of public windows, reshuffled each pass."""
    loader = DataLoader(windows, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    return _cycle(loader)


def relearn(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Batches, steps: int) -> float | None:
    """`steps` optimiser steps on the token-mean NLL of `batches`; the last step's loss (None: no step)."""
    device, loss = next(model.parameters()).device, None
    model.train()
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            logp, mask = label_logprobs(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
            loss = -logp.sum() / mask.sum()  # token-mean NLL over the labelled tokens
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    return None if loss is None else loss.item()


class RelearningTable:
    """Relearn copies of each model and measure them (see the module docstring).

    Args:
        config: the attack's settings.
        models: name → a callable returning a fresh trainable float32 copy of that model (called
            once per condition; the first entry is the unlearned model). No model passed in is modified.
        forget: the forget canaries (split here into the relearn and measured parts).
        public_windows: the public training windows (`condition: public`).
        pad_token_id: the tokenizer's pad id.
        formats: 4-bit deployment formats (`quantisation.deployment_formats()`), with `settings`.
    """

    def __init__(self, config: RelearningConfig, models: dict[str, Callable[[], nn.Module]],
                 forget: TokenisedCanaries, public_windows: Dataset, pad_token_id: int,
                 formats: list[str], settings: PTQConfig):
        self.config, self.models, self.formats, self.settings = config, models, list(formats), settings
        self.relearn_part, self.measured_part = split_forget(len(forget), config.relearn_fraction, config.seed)
        self.relearn_canaries = subset_canaries(forget, self.relearn_part)
        self.measured_canaries = subset_canaries(forget, self.measured_part)
        self.public_windows, self.pad_token_id = public_windows, pad_token_id
        self.rows: list[dict] = []
        self.seconds = 0.0

    @property
    def deployments(self) -> list[str]:
        return ["fp", *self.formats]

    def copies(self) -> int:
        """Measured copies: per model, step 0 once and every other count once per condition."""
        nonzero = sum(1 for s in self.config.steps if s > 0)
        return len(self.models) * ((0 in self.config.steps) + nonzero * len(self.config.conditions))

    def batches(self, condition: str) -> Batches:
        c = self.config
        if condition == "public":
            return window_batches(self.public_windows, c.batch_size, c.seed)
        return canary_batches(self.relearn_canaries, c.batch_size, self.pad_token_id, c.seed)

    def measure(self, model: nn.Module) -> dict[str, float]:
        found = extraction_metrics(model, self.measured_canaries)
        return {"extraction": found["extraction_rate"], "symbol_accuracy": found["symbol_accuracy"],
                "nll_mean": secret_nll(model, self.measured_canaries, self.pad_token_id).mean().item()}

    def measure_deployments(self, model: nn.Module) -> list[dict]:
        """One row part per deployment: fp, then each format's quantised copy (built, measured, dropped)."""
        parts = []
        for deployment in self.deployments:
            start = time.perf_counter()
            copy_ = model if deployment == "fp" else quantised_copy(model, deployment, self.settings)
            found = self.measure(copy_)
            del copy_
            parts.append({"deployment": deployment, **found,
                          "seconds": round(time.perf_counter() - start, 2), "peak_rss_mib": peak_rss_mib()})
        return parts

    def _record(self, name: str, conditions: list[str], steps: int, loss: float | None, parts: list[dict]) -> None:
        for condition in conditions:
            for part in parts:
                self.rows.append({"model": name, "condition": condition, "steps": steps,
                                  "deployment": part["deployment"], "extraction": part["extraction"],
                                  "symbol_accuracy": part["symbol_accuracy"], "nll_mean": part["nll_mean"],
                                  "train_loss": loss, "seconds": part["seconds"],
                                  "peak_rss_mib": part["peak_rss_mib"]})

    def _relearn_model(self, name: str, load: Callable[[], nn.Module], counter: list[int]) -> None:
        c, total = self.config, self.copies()
        for index, condition in enumerate(c.conditions):
            model = load().float().requires_grad_(True)
            optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.0)
            batches, done = self.batches(condition), 0
            for steps in c.steps:
                if steps == 0 and index > 0:
                    continue  # the untouched model: measured once, under the first condition
                counter[0] += 1
                what = "all conditions" if steps == 0 else condition
                with phase(f"relearning {counter[0]}/{total}: {name}, {what}, {steps} steps"):
                    loss = relearn(model, optimizer, batches, steps - done)
                    done = steps
                    parts = self.measure_deployments(model)
                self._record(name, list(c.conditions) if steps == 0 else [condition], steps, loss, parts)
            del model, optimizer

    def run(self) -> list[dict]:
        """Every row (model × condition × steps × deployment, in that nesting order)."""
        start, counter = time.perf_counter(), [0]
        with torch.random.fork_rng():  # the attack draws nothing from the global generators, and shifts none
            for name, load in self.models.items():
                self._relearn_model(name, load, counter)
        self.rows.sort(key=lambda r: (list(self.models).index(r["model"]), self.config.conditions.index(r["condition"]),
                                      r["steps"], self.deployments.index(r["deployment"])))
        self.seconds = time.perf_counter() - start
        return self.rows

    def notes(self) -> list[str]:
        c = self.config
        return [f"forget set split with seed {c.seed}: the attacker fine-tunes on {len(self.relearn_part)} "
                f"canaries, the table measures the other {len(self.measured_part)} (extraction: greedy, exact "
                f"secret; NLL: Σ −ln p over the secret's tokens, nats, mean over canaries)",
                f"relearning: AdamW lr {c.lr:g}, {c.batch_size} sequences per step, token-mean NLL; 'public': "
                "public training windows only; 'forget': the relearn canaries, every token labelled",
                "each model is a float32 copy (LoRA merged); 4-bit rows quantise the relearned copy "
                f"({', '.join(self.formats)}; merge-then-quantise); step 0 is the model before relearning, "
                "the same for every condition",
                f"relearning took {self.seconds:.0f} s"]

    def payload(self, models: dict[str, str], quantisation: dict) -> dict:
        """The `relearning.json` document (schema in the module docstring)."""
        return {"schema": 1, "config": self.config.describe(),
                "split": {"forget_canaries": len(self.relearn_part) + len(self.measured_part),
                          "relearn": self.relearn_part, "measured": self.measured_part},
                "models": models, "deployments": self.deployments, "quantisation": quantisation,
                "rows": self.rows, "notes": self.notes(), "seconds": self.seconds}


def to_markdown(rows: list[dict], notes: list[str] = ()) -> str:
    head = "| model | condition | steps | deployment | extraction (held-out forget) | mean NLL (nats) |"
    cells = [[r["model"], r["condition"], str(r["steps"]), r["deployment"], format_value(r["extraction"], 2),
              format_value(r["nll_mean"], 2)] for r in rows]
    return markdown_table(head, cells, notes)
