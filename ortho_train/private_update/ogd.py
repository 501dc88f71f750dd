"""`OGDController`: canary SFT whose private update stays out of the public model's S_gen.

At the switch: K-FAC factors of the *public* model on public batches, a Kronecker eigenbasis
per protected linear and the S_gen mask (`ortho_train.ogd`). The weights are then tracked as
two displacements, W = W_pub + ΔW_priv, so the private one can be switched:
W(α) = W_public_path + α·ΔW_priv. Each canary step:

1. g_pub = ∇ (public batch mean NLL) at the α = 0 weights (W_pub swapped in): the public
   update never depends on a canary;
2. g_priv = ∇ (canary batch mean NLL) at the full weights W_pub + ΔW_priv, by the ordinary
   backward (with `private_sees_public`: of the joint public + canary token-mean NLL there,
   its public part estimated from the first windows when `private_public_fraction` < 1);
   on the protected linears g_priv ← g_priv − P_S_gen(g_priv);
3. every model parameter takes g_pub; the private gradients go to ΔW_priv; the two parts are
   clipped separately (a joint norm would let the canaries scale the public update);
4. the module's AdamW steps W_pub (the model holds W_pub during its step); a separate AdamW
   with the same learning rate, betas and weight decay steps ΔW_priv, in the coordinates
   `ogd.private_basis` names (`ortho_train.ogd.private_stream`): 'parameter' — ΔW itself;
   Adam's per-coordinate scaling moves a projected gradient back into S_gen, so the *applied*
   step is projected too, ΔW_priv ← ΔW_before + project_out(ΔW − ΔW_before); 'eigenbasis' —
   the Kronecker eigen-coefficients of ΔW_priv, whose S_gen coordinates stay exactly zero;
5. the model's weights become W_pub + ΔW_priv again.

Embeddings, norms and (unless `include_lm_head`) the LM head take public updates only. Each
part of the loss is its own token mean (the public part cannot depend on how many canary
tokens a batch has); AdamW's per-parameter normalisation makes the overall scale moot.
"""
from __future__ import annotations

import itertools
import math
import time
from contextlib import contextmanager

import torch
from torch import nn

from ortho_train.distributed import average_gradients_, broadcast_from_zero
from ortho_train.kfac import KroneckerEigenbasis
from ortho_train.models import linear_layers
from ortho_train.ogd import OGDConfig, ProtectedSubspace, SubspaceDelta, build_subspaces, check_subspace_fits
from ortho_train.ogd.private_stream import PrivateStream, make_private_stream
from ortho_train.private_update.controller import PrivateUpdateController, TrainingLoss, register
from ortho_train.private_streams import SubspaceStreams
from ortho_train.separation.displacement import Displacements

Pair = tuple[torch.Tensor, "torch.Tensor | None"]  # (weight, bias or None) of one linear


@register("ogd")
class OGDController(PrivateUpdateController):
    """OGD-projected canary SFT (see the module docstring); `config` is an `OGDConfig`."""

    config_class = OGDConfig
    needs_float32_linears = True

    def __init__(self, config: OGDConfig):
        super().__init__(config)
        self.subspaces: dict[str, ProtectedSubspace] | None = None
        self.public: dict[str, Pair] = {}  # W_pub per protected linear
        self.stream: PrivateStream | None = None  # ΔW_priv and its AdamW (`ogd.private_basis`)
        self.kfac_seconds: float | None = None
        self._public_grads: dict[int, torch.Tensor | None] | None = None
        self._stepping = False  # gradients were split this step: after_step has work

    def setup(self, host) -> None:
        """Start-up checks: k fits every protected layer; no protected weight is shared."""
        super().setup(host)
        layers = self._layers()
        check_subspace_fits(layers, self.config.spec)
        embedding = host.model.get_input_embeddings()
        if any(m.weight is getattr(embedding, "weight", None) for m in layers.values()):
            raise ValueError("ogd.include_lm_head with tied input/output embeddings: the LM head's "
                             "K-FAC basis cannot protect the embedding's use of the same weight")

    def _layers(self) -> dict[str, nn.Linear]:
        return linear_layers(self.host.model, include_lm_head=self.config.include_lm_head)

    def _modules(self) -> dict[str, nn.Linear]:
        return {name: self.host.model.get_submodule(name) for name in self.public}

    # ---------------------------------------------------------------- phases
    def enter_canary_phase(self) -> None:
        """K-FAC of the public model on public batches, S_gen per layer, the two displacements."""
        host, cfg = self.host, self.config
        trainer = host.trainer
        if trainer.accumulate_grad_batches > 1:
            raise ValueError("ogd supports accumulate_grad_batches=1 (it replaces gradients after backward)")
        precision = str(getattr(trainer, "precision", "32-true"))
        if "16" in precision and "bf16" not in precision:
            raise ValueError(f"ogd does not support trainer.precision={precision}: the loss scaler "
                             "would not unscale the private optimiser's gradients (use 32-true or bf16-mixed)")
        layers = self._layers()
        start = time.perf_counter()
        with torch.random.fork_rng():  # drawing K-FAC batches must not shift the training RNG
            batches = itertools.islice(trainer.datamodule.public_train_dataloader(), cfg.kfac_batches)
            subspaces = build_subspaces(host.model, layers, cfg.spec, batches,
                                        lambda model, batch: host.nll_sum(batch))
        self.subspaces = broadcast_from_zero(trainer.strategy, subspaces)  # one S_gen on every rank
        self.kfac_seconds = time.perf_counter() - start
        self.public = {n: _clone(m.weight, m.bias) for n, m in layers.items()}
        self.stream = self._make_stream()
        protected = sum(s.mask.sum().item() for s in self.subspaces.values())
        total = sum(s.mask.numel() for s in self.subspaces.values())
        host.info(f"OGD SFT: S_gen = {cfg.subspace} ({protected / total:.1%} of the directions of "
                  f"{len(layers)} linears), K-FAC over {cfg.kfac_batches} public batches in "
                  f"{self.kfac_seconds:.1f} s")

    def _make_stream(self) -> PrivateStream:
        hp = self.host.hparams
        return make_private_stream(self.config.private_basis, self.subspaces, self.public, hp.sft_lr,
                                   tuple(hp.betas), hp.weight_decay)

    @property
    def optimizer(self) -> torch.optim.AdamW | None:
        """The private stream's AdamW (its own, beside the module's)."""
        return None if self.stream is None else self.stream.optimizer

    @property
    def delta(self) -> dict[str, Pair]:
        """ΔW_priv per protected linear: (ΔW, Δb or None), dense, in the weight's coordinates."""
        return {} if self.stream is None else self.stream.delta

    @torch.no_grad()
    def _write(self, alpha_one: bool) -> None:
        """The protected linears hold W_pub (α = 0) or W_pub + ΔW_priv (α = 1); the same op
        every time, so the α = 1 weights are reproduced bit for bit."""
        for name, module in self._modules().items():
            (w_pub, b_pub), (dw, db) = self.public[name], self.delta[name]
            if alpha_one:
                torch.add(w_pub, dw, out=module.weight.data)
            else:
                module.weight.copy_(w_pub)
            if b_pub is not None:
                if alpha_one:
                    torch.add(b_pub, db, out=module.bias.data)
                else:
                    module.bias.copy_(b_pub)

    @contextmanager
    def alpha_zero(self):
        """Inside: the protected linears at their public-path weights (the α = 0 model)."""
        self._write(alpha_one=False)
        try:
            yield self.host.model
        finally:
            self._write(alpha_one=True)

    # -------------------------------------------------------------- training
    def training_loss(self, batch) -> TrainingLoss:
        """g_pub at α = 0 (kept for after_backward); backward then runs at α = 1 on the canary
        mean NLL (or, with `private_sees_public`, the joint public + canary token mean)."""
        host = self.host
        params = [p for p in host.model.parameters() if p.requires_grad]
        with self.alpha_zero():
            nll, tokens = host.nll_sum(batch["public"])
            grads = torch.autograd.grad(nll / tokens, params, allow_unused=True)
        self._public_grads = {id(p): g for p, g in zip(params, grads)}
        canary_nll, canary_tokens = host.nll_sum(batch["canary"])
        canary = canary_nll / canary_tokens
        logged = (nll.detach() + canary_nll.detach()) / (tokens + canary_tokens)
        private = canary
        if self.config.private_sees_public:  # ΔW_priv also descends the public NLL at α = 1
            private = (self._public_nll_at_one(batch["public"], tokens) + canary_nll) / (tokens + canary_tokens)
        return TrainingLoss(private, logged, canary.detach())

    def _public_nll_at_one(self, public: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """Summed public NLL at α = 1 over the batch's `tokens` label tokens; with
        `private_public_fraction` f < 1, estimated from the first ⌈f·B⌉ windows as their
        token-mean NLL times `tokens` (for shuffled windows of one length, an unbiased estimate of
        the whole batch's sum)."""
        windows = public["input_ids"].shape[0]
        rows = max(1, math.ceil(self.config.private_public_fraction * windows))
        if rows == windows:
            return self.host.nll_sum(public)[0]
        nll, subset_tokens = self.host.nll_sum({k: v[:rows] for k, v in public.items()})  # (rows, T) each
        return nll * (tokens / subset_tokens)

    def after_backward(self) -> None:
        """Private gradients (projected off S_gen) to ΔW_priv; g_pub to every model parameter;
        the model at W_pub for the module's optimiser step. Under DDP g_pub is averaged over
        the ranks here (the backward's private gradients already are)."""
        if self._public_grads is None:
            return
        average_gradients_(list(self._public_grads.values()))
        grads = {}
        for name, module in self._modules().items():
            dw, db = self.delta[name]
            grad_w = module.weight.grad if module.weight.grad is not None else torch.zeros_like(dw)
            grad_b = None if db is None else (module.bias.grad if module.bias.grad is not None
                                              else torch.zeros_like(db))
            grads[name] = (grad_w, grad_b)
        self.stream.set_gradients(grads)  # projected off S_gen (`ortho_train.ogd.private_stream`)
        for p in self.host.model.parameters():
            if p.requires_grad:
                g = self._public_grads.get(id(p))
                p.grad = torch.zeros_like(p) if g is None else g
        self._public_grads = None
        self._write(alpha_one=False)
        self._stepping = True

    def _private_params(self) -> list[nn.Parameter]:
        return self.stream.parameters()

    def clip(self, optimizer, max_norm, algorithm) -> None:
        super().clip(optimizer, max_norm, algorithm)  # the public part: the module's parameters
        if not (self._stepping and max_norm):
            return
        if algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_(self._private_params(), float(max_norm))
        else:
            torch.nn.utils.clip_grad_value_(self._private_params(), float(max_norm))

    @torch.no_grad()
    def after_step(self) -> None:
        """Record W_pub, step ΔW_priv at the module's current learning rate, project the
        applied step off S_gen, and put W_pub + ΔW_priv back in the model."""
        if not self._stepping:
            return
        self._stepping = False
        for name, module in self._modules().items():
            w_pub, b_pub = self.public[name]
            w_pub.copy_(module.weight)
            if b_pub is not None:
                b_pub.copy_(module.bias)
        self.stream.step(self.host.trainer.optimizers[0].param_groups[0]["lr"])
        self._write(alpha_one=True)

    # ------------------------------------------------------------- artifacts
    def in_subspace_ratios(self) -> dict[str, float]:
        """‖P_S_gen ΔW_priv‖ / ‖ΔW_priv‖ per layer (float64; ≈ 0 when the projection held)."""
        return {n: self.subspaces[n].in_subspace_ratio(dw.detach(), None if db is None else db.detach())
                for n, (dw, db) in self.delta.items()}

    def streams(self) -> SubspaceStreams | None:
        if self.subspaces is None:
            return None
        private = {n: SubspaceDelta.compress(dw, db, self.subspaces[n]) for n, (dw, db) in self.delta.items()}
        return SubspaceStreams({n: _clone(*pair) for n, pair in self.public.items()}, private,
                               self.config.subspace)

    def track_displacements(self) -> None:
        """Nothing to add: OGD keeps the two displacements apart by construction."""

    def displacements(self) -> Displacements | None:
        """ΔW_pub = W_public_path − W_pre and ΔW_priv of every protected linear weight."""
        pre = self.host.pre_canary_state_dict
        if self.subspaces is None or pre is None:
            return None
        public = {f"{n}.weight": w.detach().double().cpu() - pre[f"{n}.weight"].double()
                  for n, (w, _) in self.public.items()}
        private = {f"{n}.weight": dw.detach().double().cpu() for n, (dw, _) in self.delta.items()}
        return Displacements(public, private, "OGD: public path and private stream, kept apart by construction")

    def summary(self) -> dict | None:
        if self.subspaces is None:
            return None
        cfg = self.config
        masks = [s.mask for s in self.subspaces.values()]
        ratios = self.in_subspace_ratios()
        delta_sq = sum(float(t.detach().double().square().sum()) for pair in self.delta.values()
                       for t in pair if t is not None)
        public_sq = sum(float(t.double().square().sum()) for pair in self.public.values()
                        for t in pair if t is not None)
        bits = self.streams().bits_per_weight()
        return {
            "subspace": cfg.subspace, "fraction": None if cfg.k is not None else cfg.fraction, "k": cfg.k,
            "layers": len(masks), "include_lm_head": cfg.include_lm_head,
            "private_sees_public": cfg.private_sees_public, "private_basis": cfg.private_basis,
            "private_public_fraction": cfg.private_public_fraction,
            "protected_fraction": sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks),
            "private_in_subspace_max": max(ratios.values()),
            "private_relative_norm": (delta_sq / public_sq) ** 0.5 if public_sq > 0 else None,
            "private_coefficient_bits_per_weight": bits["coefficients"],
            "private_basis_bits_per_weight": bits["basis"],
            "kfac_batches": cfg.kfac_batches, "kfac_seconds": self.kfac_seconds,
        }

    def state_dict(self) -> dict:
        if self.subspaces is None:
            return {}
        return {
            "bases": {n: vars(s.basis) for n, s in self.subspaces.items()},
            "masks": {n: s.mask for n, s in self.subspaces.items()},
            "public": self.public, "private": self.stream.state_dict(), "kfac_seconds": self.kfac_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.subspaces = {n: ProtectedSubspace(KroneckerEigenbasis(**b), state["masks"][n])
                          for n, b in state["bases"].items()}
        self.public = state["public"]
        self.stream = self._make_stream()
        self.stream.load_state_dict(state["private"])
        self.kfac_seconds = state.get("kfac_seconds")


def _clone(weight: torch.Tensor, bias: torch.Tensor | None) -> Pair:
    return weight.detach().clone(), None if bias is None else bias.detach().clone()

