"""K-FAC factors (hooks, EMA, masks, bias column), the Kronecker eigenbasis and projections."""
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ortho_train.kfac import (
    SUBSPACES,
    KFACCollector,
    KroneckerEigenbasis,
    SubspaceConfig,
    collect_kfac,
    component_in,
    join_bias,
    project_out,
    project_update_,
    split_bias,
)
from ortho_train.kfac.factors import KFACFactors
from ortho_train.metrics import token_logprobs
from ortho_train.models import TinyLlamaConfig, build_tiny_llama
from tests.script_loader import load_script

D_IN, HIDDEN, CLASSES = 5, 7, 4


class Toy(nn.Module):
    """Linear (bias) → tanh → causal running mean over tokens → Linear (no bias): (B, T, C).

    The running mean mixes tokens, so a layer's output gradient at token t collects the
    losses of later tokens, as in a causal LM; right padding cannot reach real tokens.
    """

    def __init__(self, use_checkpoint: bool | None = None):
        super().__init__()
        self.inp = nn.Linear(D_IN, HIDDEN)
        self.out = nn.Linear(HIDDEN, CLASSES, bias=False)
        self.use_checkpoint = use_checkpoint  # None: off, else use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint is None:
            h = torch.tanh(self.inp(x))
        else:
            h = checkpoint(lambda t: torch.tanh(self.inp(t)), x, use_reentrant=self.use_checkpoint)
        steps = torch.arange(1, x.shape[1] + 1, dtype=h.dtype)[:, None]  # (T, 1)
        return self.out(h.cumsum(1) / steps)  # (B, T, C)


def _toy(seed=0, dtype=torch.float64, **kw) -> Toy:
    torch.manual_seed(seed)
    return Toy(**kw).to(dtype)


def _batches(sizes, t=6, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(b, t, D_IN, generator=g, dtype=dtype),
             "y": torch.randint(0, CLASSES, (b, t), generator=g)} for b in sizes]


def _ce_sum(model, batch):
    """(Σ CE over the unmasked tokens, their number)."""
    logits = model(batch["x"])  # (B, T, C)
    mask = batch.get("attention_mask", torch.ones_like(batch["y"])).bool()
    ce = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), reduction="none")  # (B*T,)
    return ce[mask.flatten()].sum(), mask.sum()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_factors_match_curvlinops_empirical_kfac_expand():
    """curvlinops' K-FAC with fisher_type='empirical' (real labels), kfac_approx='expand' (tokens
    are independent rows) and a mean-reduced CrossEntropyLoss: A = Σ a aᵀ/(N·T) and
    G = Σ (b·T·g)(b·T·g)ᵀ/(N·T) per batch of b sequences, the same convention as ours.
    separate_weight_and_bias=False appends its ones column last, as we do."""
    curvlinops = pytest.importorskip(
        "curvlinops", reason="optional reference (see pyproject); the brute-force test below still runs")
    model = _toy()
    batches = _batches([3, 2])

    class ClassesFirst(nn.Module):  # CrossEntropyLoss wants (B, C, T)
        def __init__(self, toy):
            super().__init__()
            self.toy = toy

        def forward(self, x):
            return self.toy(x).transpose(1, 2)  # (B, C, T)

    wrapped = ClassesFirst(model)
    reference = curvlinops.KFACLinearOperator(
        wrapped, nn.CrossEntropyLoss(), list(model.parameters()), [(b["x"], b["y"]) for b in batches],
        fisher_type="empirical", kfac_approx="expand", separate_weight_and_bias=False,
        check_deterministic=False)
    reference.compute_kronecker_factors()
    ours = collect_kfac(model, batches, _ce_sum)
    for name in ("inp", "out"):
        # The factors are private attributes of curvlinops 3.0 (read-only here).
        a_ref = reference._input_covariances[f"toy.{name}"]
        g_ref = reference._gradient_covariances[f"toy.{name}"]
        assert _rel(ours[name].A, a_ref) < 1e-4, f"{name}: A differs"
        assert _rel(ours[name].G, g_ref) < 1e-4, f"{name}: G differs"
    assert ours["inp"].has_bias and ours["inp"].A.shape == (D_IN + 1, D_IN + 1)


def _brute_force(model: Toy, xs, ys):
    """Per sequence, unpadded: A, G of model.inp from hand-written forward and autograd."""
    a_sum, g_sum, n = 0.0, 0.0, 0
    for x, y in zip(xs, ys):  # x (T_i, D_IN) unpadded
        x = x[None]  # (1, T_i, D_IN)
        s = (x @ model.inp.weight.T + model.inp.bias).detach().requires_grad_(True)  # (1, T_i, H)
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
        logits = model.out(torch.tanh(s).cumsum(1) / steps)  # (1, T_i, C)
        loss_sum = F.cross_entropy(logits[0], y, reduction="sum")
        (g,) = torch.autograd.grad(loss_sum, s)
        a = torch.cat([x[0], torch.ones(x.shape[1], 1, dtype=x.dtype)], 1)  # (T_i, D_IN+1)
        a_sum, g_sum, n = a_sum + a.T @ a, g_sum + g[0].T @ g[0], n + x.shape[1]
    return a_sum / n, g_sum / n


def test_padded_tokens_change_nothing_against_brute_force():
    model = _toy()
    lengths = [6, 3, 4]
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(t, D_IN, generator=g, dtype=torch.float64) for t in lengths]
    ys = [torch.randint(0, CLASSES, (t,), generator=g) for t in lengths]
    x = torch.full((3, 6, D_IN), 1e3, dtype=torch.float64)  # pads hold garbage
    y = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    for i, t in enumerate(lengths):
        x[i, :t], y[i, :t], mask[i, :t] = xs[i], ys[i], True
    ours = collect_kfac(model, [{"x": x, "y": y, "attention_mask": mask}], _ce_sum)["inp"]
    a_ref, g_ref = _brute_force(model, xs, ys)
    assert _rel(ours.A, a_ref) < 1e-10, "A over real tokens"  # float64, same sums reordered
    assert _rel(ours.G, g_ref) < 1e-10, "G: per-token gradient of the summed loss"


def _lm_nll(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp, scored = token_logprobs(logits, batch["input_ids"], attention_mask=batch["attention_mask"])
    return -logp.sum(), scored.sum()


def test_tiny_llama_pads_change_nothing():
    """A right-padded batch gives the factors of its sequences collected one by one."""
    model = build_tiny_llama(TinyLlamaConfig(32, 2, 2, 64), 40, 0, 1)
    g = torch.Generator().manual_seed(3)
    long, short = torch.randint(2, 40, (1, 12), generator=g), torch.randint(2, 40, (1, 8), generator=g)
    padded = torch.cat([long, torch.cat([short, torch.randint(2, 40, (1, 4), generator=g)], 1)])  # (2, 12)
    mask = torch.ones_like(padded)
    mask[1, 8:] = 0
    together = collect_kfac(model, [{"input_ids": padded, "attention_mask": mask}], _lm_nll)
    apart = collect_kfac(model, [{"input_ids": s, "attention_mask": torch.ones_like(s)}
                                 for s in (long, short)], _lm_nll)
    assert set(together) == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"}
    for name, f in together.items():
        # float32 model: the masked and unmasked attention paths round differently.
        assert _rel(f.A, apart[name].A) < 1e-4, f"{name}: A"
        assert _rel(f.G, apart[name].G) < 1e-4, f"{name}: G"
    assert not any(p.grad is not None for p in model.parameters()), "collect_kfac touched .grad"


def _train_batch(collector, model, batch, loss_scale=1.0):
    total, terms = _ce_sum(model, batch)
    collector.set_num_loss_terms(int(terms))
    (loss_scale * total / terms).backward()


def test_ema_starts_from_first_batch_and_steps_once_per_optimiser_step():
    model = _toy()
    batches = _batches([2, 3, 2, 1])
    single = [collect_kfac(model, [b], _ce_sum) for b in batches]
    pair = collect_kfac(model, batches[2:], _ce_sum)  # token-weighted plain average
    collector = KFACCollector(model, ema=0.9)
    with collector:
        for batch in batches[:2]:
            _train_batch(collector, model, batch)
            assert collector.step() == 2
        for batch in batches[2:]:  # two micro-batches, one optimiser step
            _train_batch(collector, model, batch)
        assert collector.step() == 2
        assert collector.step() == 0, "nothing new: no update"
    factors = collector.factors()
    for name, f in factors.items():
        expected = single[0][name].A
        for new in (single[1][name].A, pair[name].A):
            expected = 0.9 * expected + 0.1 * new
        assert f.num_updates == 3
        assert _rel(f.A, expected) < 1e-12, f"{name}: EMA of A"  # float64, a few adds reordered
    expected_g = 0.81 * single[0]["out"].G + 0.09 * single[1]["out"].G + 0.1 * pair["out"].G
    assert _rel(factors["out"].G, expected_g) < 1e-12
    restored = KFACCollector(model)
    restored.load_state_dict(collector.state_dict())
    assert restored.ema == 0.9
    assert all(torch.equal(restored.factors()[n].G, f.G) and restored.factors()[n].num_updates == 3
               for n, f in factors.items())


def test_grad_scale_is_divided_out_and_no_grad_forwards_count_nothing():
    model = _toy()
    batch = _batches([3])[0]
    reference = collect_kfac(model, [batch], _ce_sum)
    collector = KFACCollector(model, ema=0.5, grad_scale=1024.0)
    with collector:
        with torch.no_grad():
            model(batch["x"] * 5)  # a validation pass: must not count
        _train_batch(collector, model, batch, loss_scale=1024.0)
        collector.step()
    for name, f in collector.factors().items():
        assert _rel(f.G, reference[name].G) < 1e-12 and _rel(f.A, reference[name].A) < 1e-12


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_counts_each_token_once(reentrant):
    batch = _batches([3])[0]
    batch["x"].requires_grad_(True)  # reentrant checkpoints give no gradients otherwise
    plain = collect_kfac(_toy(), [batch], _ce_sum)
    checkpointed = collect_kfac(_toy(use_checkpoint=reentrant), [batch], _ce_sum)
    for name in plain:
        assert _rel(checkpointed[name].A, plain[name].A) < 1e-12
        assert _rel(checkpointed[name].G, plain[name].G) < 1e-12


def test_bias_column_is_last_and_errors_name_the_setting():
    model = _toy()
    batch = _batches([4])[0]
    a = collect_kfac(model, [batch], _ce_sum)["inp"].A
    rows = batch["x"].reshape(-1, D_IN)  # (B*T, D_IN)
    assert abs(a[-1, -1].item() - 1.0) < 1e-12
    assert _rel(a[:-1, -1], rows.mean(0)) < 1e-12
    with pytest.raises(ValueError, match="ema"):
        KFACCollector(model, ema=1.0)
    with pytest.raises(ValueError, match="no K-FAC statistics"):
        KFACCollector(model).factors()
    collector = KFACCollector(model)
    collector.set_token_mask(torch.ones(2, 2))
    with collector, pytest.raises(ValueError, match="token mask"):
        model(batch["x"])


# ---------------------------------------------------------------------- eigenbasis
def _random_factors(d_out=6, d_in=4, bias=True, seed=0) -> KFACFactors:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, d_in + bias, generator=g, dtype=torch.float64)  # rank 3: clamped zeros
    b = torch.randn(d_out, d_out, generator=g, dtype=torch.float64)
    return KFACFactors(a.T @ a, b @ b.T + 0.1 * torch.eye(d_out, dtype=torch.float64), 1, bias)


def test_eigenbasis_diagonalises_the_kronecker_product():
    f = _random_factors()
    basis = KroneckerEigenbasis.from_factors(f)
    assert basis.shape == (6, 5) and (basis.S_A >= 0).all() and (basis.S_G > 0).all()
    lam = basis.eigenvalues()
    assert lam.shape == (6, 5) and lam.dtype == torch.float64
    d_w = torch.randn(6, 4, dtype=torch.float64)
    d_b = torch.randn(6, dtype=torch.float64)
    aug = join_bias(d_w, d_b)
    c = basis.coefficients(aug)
    quad = torch.trace(aug.T @ f.G @ aug @ f.A)  # vec(ΔW)ᵀ (A ⊗ G) vec(ΔW)
    assert abs(quad - (lam * c**2).sum()) / quad < 1e-10
    back_w, back_b = split_bias(basis.from_coefficients(c), True)
    assert _rel(back_w, d_w) < 1e-12 and _rel(back_b, d_b) < 1e-12
    with pytest.raises(ValueError, match="join_bias"):
        basis.coefficients(d_w)


@pytest.mark.parametrize("name", sorted(SUBSPACES))
def test_projection_is_idempotent_and_orthogonal(name):
    basis = KroneckerEigenbasis.from_factors(_random_factors())
    mask = SubspaceConfig(name, fraction=0.4).mask(basis)
    x, y = torch.randn(2, 6, 5, dtype=torch.float64)
    out = project_out(x, basis, mask)
    inside = component_in(y, basis, mask)
    # float64: each projection is four products of 6×6 / 5×5 orthogonal matrices
    assert _rel(project_out(out, basis, mask), out) < 1e-10, "idempotent"
    assert _rel(component_in(inside, basis, mask), inside) < 1e-10, "idempotent (inside)"
    assert abs((out * inside).sum()) / (out.norm() * inside.norm()) < 1e-10, "orthogonal"
    assert _rel(out + component_in(x, basis, mask), x) < 1e-10, "complementary"
    assert component_in(out, basis, mask).norm() / x.norm() < 1e-10


def test_masks_pick_the_right_directions_and_bad_settings_fail():
    basis = KroneckerEigenbasis.from_factors(_random_factors())
    lam = basis.eigenvalues()
    flat, sharp = SUBSPACES["flattest"](basis, k=7), SUBSPACES["sharpest"](basis, k=7)
    assert flat.sum() == 7 and lam[flat].max() <= lam[~flat].min()
    assert sharp.sum() == 7 and lam[sharp].min() >= lam[~sharp].max()
    cols = SUBSPACES["input_flattest"](basis, fraction=0.4)  # round(0.4·5) = 2 columns
    assert cols.all(0).sum() == 2 and (cols.any(0) == cols.all(0)).all()
    assert basis.S_A[cols[0]].max() <= basis.S_A[~cols[0]].min()
    with pytest.raises(ValueError, match="subspace.name='flatest': must be one of"):
        SubspaceConfig("flatest", fraction=0.5)
    with pytest.raises(ValueError, match="fraction must be in"):
        SubspaceConfig("flattest", fraction=1.0)
    with pytest.raises(ValueError, match="exactly one of k and fraction"):
        SubspaceConfig("sharpest", fraction=0.5, k=3)
    with pytest.raises(ValueError, match="k=31 is beyond the layer's 30 directions for layer 'q'"):
        SubspaceConfig("flattest", k=31).mask(basis, "q")
    with pytest.raises(ValueError, match="k=6 is beyond the layer's 5 directions"):
        SubspaceConfig("input_flattest", k=6).mask(basis)


def test_adamw_displacement_stays_out_of_s_gen_when_the_applied_step_is_projected():
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)  # float32, as in training
    basis = KroneckerEigenbasis.from_factors(_random_factors(6, 8, seed=1))
    mask = SubspaceConfig("flattest", fraction=0.5).mask(basis)
    start = [p.detach().clone() for p in (layer.weight, layer.bias)]
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    x, target = torch.randn(64, 8), torch.randn(64, 6)
    for _ in range(30):
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        g_aug = project_out(join_bias(layer.weight.grad, layer.bias.grad), basis, mask)
        layer.weight.grad, layer.bias.grad = split_bias(g_aug, True)  # projected gradient …
        before = [p.detach().clone() for p in (layer.weight, layer.bias)]
        opt.step()
        leaked = join_bias(layer.weight - before[0], layer.bias - before[1]).detach()
        project_update_(layer.weight, before[0], basis, mask, layer.bias, before[1])
    # … is not enough under Adam's per-coordinate scaling (the last raw step leaked):
    assert component_in(leaked, basis, mask).norm() / leaked.norm() > 1e-2
    disp = join_bias(layer.weight.detach() - start[0], layer.bias.detach() - start[1])
    assert disp.norm() > 0.1, "the layer did train"
    rel = (component_in(disp, basis, mask).norm() / disp.norm()).item()
    assert rel <= 1e-5, f"displacement in S_gen: relative norm {rel:.2e}"  # float32 writes: ~1e-7


def test_bench_reports_collection_eigh_and_projection_per_layer(tmp_path):
    bench = load_script("kfac_collect")

    out = tmp_path / "bench.json"
    summary = bench.main(["--hidden", "16", "--blocks", "1", "--intermediate", "24", "--batch-size", "2",
                          "--seq-len", "8", "--rounds", "1", "--json", str(out)])
    assert [r["layer"].rsplit(".", 1)[-1] for r in summary["layers"]] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert all(r[k] > 0 for r in summary["layers"] for k in ("gram_s", "eigh_s", "project_s", "project32_s"))
    assert abs(summary["overhead"] - (summary["fwd_bwd_kfac_s"] / summary["fwd_bwd_s"] - 1)) < 1e-12
    assert json.loads(out.read_text())["totals"] == summary["totals"]
