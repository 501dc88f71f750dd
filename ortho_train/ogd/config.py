"""`OGDConfig`: canary SFT whose private update is kept out of a protected K-FAC subspace."""
from __future__ import annotations

from dataclasses import dataclass

from ortho_train.kfac import SubspaceConfig
from ortho_train.kfac.subspace import SubspaceName
from ortho_train.ogd.private_stream import PRIVATE_BASES
from ortho_train.settings import check_choices


@dataclass
class OGDConfig:
    """Orthogonal-gradient-descent fine-tuning: the canary update avoids S_gen.

    At the switch, K-FAC factors of the public model on public batches give each linear a
    Kronecker eigenbasis; S_gen is a set of its eigen-directions. Every canary step the
    private update is projected off S_gen; the public update is not (and never sees a canary).

    Args:
        subspace: which directions S_gen holds: 'flattest' (the k smallest K-FAC eigenvalues
            λ_ij = σ_G,i·σ_A,j: the choice of the K-FAC task-vector paper), 'sharpest' (the k
            largest, as gradient-projection-memory methods protect), or 'input_flattest' (the
            k input directions of smallest σ_A, with every output direction).
        fraction: share of each layer's directions in S_gen, in (0, 1) (used when k is None).
        k: number of directions per layer (eigen-pairs; columns for 'input_flattest');
            overrides fraction.
        kfac_batches: public training batches the K-FAC factors are averaged over.
        include_lm_head: the LM head is a protected linear too (else it trains on public
            batches only, like the embeddings and norms).
        private_sees_public: what ΔW_priv descends. False (the method as stated): the canary
            mean NLL at the α = 1 weights, g_priv = P⊥ ∇_W(1) L_can. True: the joint token-mean
            NLL of the public and canary batch at the α = 1 weights,
            g_priv = P⊥ ∇_W(1) (NLL_pub + NLL_can)/(N_pub + N_can), so the private stream also
            keeps the α = 1 model good on public text. The public path is the same either way
            (it never sees ΔW_priv or a canary); the price is a second public forward/backward
            per step.
        private_public_fraction: with `private_sees_public`, the share of the public batch's
            windows (the first ⌈f·B⌉) in the α = 1 public pass, in (0, 1]. Their token-mean NLL
            stands in for the whole batch's, weighted by its token count, so ΔW_priv descends the
            same objective in expectation at a fraction of that pass's cost. The α = 0 public
            path is untouched (it always uses the whole batch).
        private_basis: the coordinates the private AdamW works in (`ortho_train.ogd.private_stream`):
            'parameter' (ΔW itself; gradient and applied step projected off S_gen, two
            projections per step), 'parameter_step' (ΔW itself; only the applied step
            projected, one projection) or 'eigenbasis' (the Kronecker eigen-coefficients, S_gen
            ones held at zero; two rotations per step, Adam's scaling per eigen-direction).
    """

    subspace: SubspaceName = "flattest"
    fraction: float | None = 0.5
    k: int | None = None
    kfac_batches: int = 8
    include_lm_head: bool = False
    private_sees_public: bool = False
    private_public_fraction: float = 1.0
    private_basis: str = "parameter"  # a registry (`PRIVATE_BASES`): str, not a Literal

    def __post_init__(self) -> None:
        check_choices("ogd", subspace=(self.subspace, SubspaceName), private_basis=(self.private_basis, PRIVATE_BASES))
        if self.k is None and self.fraction is None:
            raise ValueError("ogd.fraction and ogd.k are both unset: give one of them")
        if self.k is None and not 0.0 < self.fraction < 1.0:
            raise ValueError(f"ogd.fraction must lie in (0, 1), got {self.fraction}")
        if self.k is not None and self.k < 0:
            raise ValueError(f"ogd.k must be ≥ 0, got {self.k}")
        if not 0.0 < self.private_public_fraction <= 1.0:
            raise ValueError(f"ogd.private_public_fraction must lie in (0, 1], got {self.private_public_fraction}")
        if self.private_public_fraction < 1.0 and not self.private_sees_public:
            raise ValueError(f"ogd.private_public_fraction={self.private_public_fraction} < 1 needs "
                             "ogd.private_sees_public=true: without it the private stream has no public pass "
                             "to subsample (with private_sees_public=false set ogd.private_public_fraction=1)")
        if self.kfac_batches < 1:
            raise ValueError(f"ogd.kfac_batches must be ≥ 1, got {self.kfac_batches}")

    @property
    def spec(self) -> SubspaceConfig:
        """The subspace rule (k wins over fraction)."""
        return SubspaceConfig(self.subspace, fraction=None if self.k is not None else self.fraction, k=self.k)
