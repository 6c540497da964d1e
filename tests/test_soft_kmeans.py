"""soft_kmeans / hard_assign against a naive dense reference that follows the math literally."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_palettize import soft_kmeans as sk
from lightning_palettize.soft_kmeans import hard_assign, soft_kmeans

K = 16


# ---------------------------------------------------------------------------------------------
# the naive reference: full N x K tensors, plain autograd


def reference(
    x,
    c0,
    *,
    tau=1e-4,
    max_iter=3,
    epsilon=1e-4,
    mode="dkm",
    enforce_zero=False,
    prune_threshold=0.0,
    zero_threshold=1e-7,
    lut_fn=None,
    noise=None,
    clamp_attention=False,
):
    """x_hat and new centroids; ``noise(t)`` gives the uniforms [G, N, K] of iteration t."""
    xf = x.float()
    g, _, _ = xf.shape
    tau_eff = max(tau, zero_threshold)
    c = prev_c = last_c = c0.float()
    att_last = None
    active = torch.ones(g, dtype=torch.bool, device=x.device)
    prev_inertia = None
    for t in range(max_iter):
        dist = ((xf[:, :, None, :] - c[:, None, :, :]) ** 2).sum(-1)
        if prune_threshold > 0:
            dist = torch.cat([dist[..., :1] - prune_threshold, dist[..., 1:]], -1)
        elif enforce_zero:
            nonzero = (xf != 0).any(-1, keepdim=True)
            d0 = torch.where(
                nonzero, torch.full_like(dist[..., :1], 1 / zero_threshold), dist[..., :1]
            )
            dist = torch.cat([d0, dist[..., 1:]], -1)
        if mode == "hard":
            att = F.one_hot(dist.argmin(-1), c.shape[1]).float()
        else:
            logits = -dist / tau_eff
            if mode == "gsm":
                u = noise(t).clamp_min(torch.finfo(torch.float32).tiny)
                logits = logits - torch.log(-torch.log(u))
            att = torch.softmax(logits, -1)
            if clamp_attention and mode == "dkm":
                att = att.clamp(min=zero_threshold)
        mass = att.sum(1)
        sums = att.transpose(1, 2) @ xf
        safe = torch.where(mass > 0, mass, torch.ones_like(mass))
        new = torch.where(mass[..., None] > 0, sums / safe[..., None], c)
        if lut_fn is not None:
            new = lut_fn(new)
        if enforce_zero:
            new = torch.cat([torch.zeros_like(new[:, :1]), new[:, 1:]], 1)
        inertia = dist.min(-1).values.sum(1)
        keep = active.view(g, 1, 1)
        prev_c, last_c = torch.where(keep, c, prev_c), torch.where(keep, new, last_c)
        att_last = att if att_last is None else torch.where(keep, att, att_last)
        c = last_c
        if prev_inertia is not None:
            active = active & ((inertia - prev_inertia).abs() > epsilon)
        prev_inertia = inertia
        if not active.any():
            break
    return (att_last @ last_c).to(x.dtype), last_c.detach()


def fp16_ste(c):
    """A straight-through fp16 LUT quantizer."""
    return c + (c.half().float() - c).detach()


# ---------------------------------------------------------------------------------------------
# data


def make_data(g, n, d, *, seed=0, std=0.02, zeros=0.0, fp16_exact=False, enforce_zero=False):
    gen = torch.Generator().manual_seed(seed)
    x = std * torch.randn(g, n, d, generator=gen)
    if zeros:
        x[torch.rand(g, n, 1, generator=gen).expand(g, n, d) < zeros] = 0.0
    if fp16_exact:
        x = x.half().float()
    if d == 1:
        q = torch.linspace(0.02, 0.98, K)
        c0 = torch.quantile(x.view(g, n), q, dim=1).T.unsqueeze(-1).contiguous()
    else:
        idx = torch.randperm(n, generator=gen)[:K]
        c0 = x[:, idx].clone()
    if enforce_zero:
        c0[:, 0] = 0.0
    return x, c0


def run(fn, x, c0, w, **kw):
    """x_hat, new centroids and d(sum w * x_hat)/dx."""
    xr = x.detach().clone().requires_grad_()
    out, c = fn(xr, c0, **kw)
    (grad,) = torch.autograd.grad((out.float() * w).sum(), xr)
    return out.detach(), c, grad


def assert_close(actual, expected, rtol, atol_frac):
    atol = atol_frac * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def assert_nontrivial(grad, w):
    # tau is scaled to the data, so the gradient is a sizeable fraction of the plain one (w)
    assert grad.norm() > 0.02 * w.norm(), (grad.norm(), w.norm())


# small tensors: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small_chunks(monkeypatch):
    """Force the dense engine through many chunks."""
    monkeypatch.setitem(sk._CHUNK_ELEMS, "cpu", 4096)


needs_c_early = pytest.mark.skipif(
    sk._dkm_cpu is None, reason="compiled _dkm_cpu extension missing"
)


def table_noise(x, gen):
    """Per-element view of the table engine's per-code noise (see soft_kmeans docstring):
    per iteration torch.rand(G, U, K), row u of a group for its u-th smallest distinct value."""
    g = x.shape[0]
    inverse = [torch.unique(x[i].view(-1), return_inverse=True)[1] for i in range(g)]
    u = max(int(inv.max()) + 1 for inv in inverse)

    def noise(t):
        table = torch.rand(g, u, K, generator=gen, device=x.device)
        return torch.stack([table[i, inverse[i]] for i in range(g)])

    return noise


# ---------------------------------------------------------------------------------------------
# dense engine == reference


@pytest.mark.parametrize("g,d", [(1, 1), (4, 1), (1, 2), (4, 2)])
@pytest.mark.parametrize("mode", ["dkm", "hard", "gsm"])
@pytest.mark.parametrize("tau", [1e-4, 1e-3])
def test_dense_matches_reference(g, d, mode, tau, small_chunks, monkeypatch):
    if mode == "gsm":
        # one chunk per iteration, so the noise is one torch.rand(G, N, K) like the reference's
        monkeypatch.setitem(sk._CHUNK_ELEMS, "cpu", 1 << 20)
    x, c0 = make_data(g, 300, d, seed=g + 10 * d)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    kw = dict(tau=tau, mode=mode)
    ref_gen, gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noise = lambda t: torch.rand(g, 300, K, generator=ref_gen)
    want = run(reference, x, c0, w, noise=noise, **kw)
    got = run(soft_kmeans, x, c0, w, method="dense", generator=gen, **kw)
    assert_close(got[0], want[0], 1e-4, 1e-5)
    assert_close(got[1], want[1], 1e-4, 1e-5)
    assert_close(got[2], want[2], 1e-4, 1e-4)
    assert_nontrivial(got[2], w)


def test_dense_gsm_noise_is_drawn_per_chunk_and_replayed_in_backward(small_chunks):
    g, n, d = 2, 300, 1
    rows = sk._CHUNK_ELEMS["cpu"] // (g * K * d)  # thread-independent when noise is drawn
    x, c0 = make_data(g, n, d, seed=21)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    ref_gen = torch.Generator().manual_seed(4)

    def noise(t):
        return torch.cat(
            [torch.rand(g, min(rows, n - a), K, generator=ref_gen) for a in range(0, n, rows)], 1
        )

    want = run(reference, x, c0, w, mode="gsm", noise=noise)
    gen = torch.Generator().manual_seed(4)
    got = run(soft_kmeans, x, c0, w, mode="gsm", method="dense", generator=gen)
    assert rows < n
    for a, b in zip(got, want):
        assert_close(a, b, 1e-4, 1e-4)


VARIANTS = {
    "enforce_zero": dict(enforce_zero=True),
    "enforce_zero+prune": dict(enforce_zero=True, prune_threshold=2e-5),
    "prune": dict(prune_threshold=2e-5),
    "lut_fn": dict(lut_fn=fp16_ste),
    "clamp_attention": dict(clamp_attention=True, tau=1e-3),
    "no_early_stop": dict(epsilon=-1.0, max_iter=4),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("d", [1, 2])
def test_dense_variants_match_reference(variant, d, small_chunks):
    kw = VARIANTS[variant]
    ez = kw.get("enforce_zero", False)
    x, c0 = make_data(4, 300, d, seed=3, zeros=0.1 if ez else 0.0, enforce_zero=ez)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    want = run(reference, x, c0, w, **kw)
    got = run(soft_kmeans, x, c0, w, method="dense", **kw)
    assert_close(got[0], want[0], 1e-4, 1e-5)
    assert_close(got[1], want[1], 1e-4, 1e-5)
    assert_close(got[2], want[2], 1e-4, 1e-4)
    assert_nontrivial(got[2], w)
    if ez:
        assert (got[1][:, 0] == 0).all()
        if "prune_threshold" not in kw:  # exact zeros stay exact zeros and nothing else joins
            labels = hard_assign(x, got[1], enforce_zero=True)
            assert torch.equal(labels == 0, (x == 0).all(-1))


# ---------------------------------------------------------------------------------------------
# table engine == reference


@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("mode", ["dkm", "hard", "gsm"])
@pytest.mark.parametrize("tau", [1e-4, 1e-3])
def test_table_matches_reference_on_fp16_values(g, mode, tau):
    # exactly fp16-representable weights: the table engine computes the same numbers
    x, c0 = make_data(g, 2000, 1, seed=7 + g, fp16_exact=True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ref_gen, gen = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    kw = dict(tau=tau, mode=mode)
    want = run(reference, x, c0, w, noise=table_noise(x, ref_gen), **kw)
    got = run(soft_kmeans, x, c0, w, method="table", generator=gen, **kw)
    assert_close(got[0], want[0], 1e-4, 1e-5)
    assert_close(got[1], want[1], 1e-4, 1e-5)
    assert_close(got[2], want[2], 1e-3, 1e-4)
    assert_nontrivial(got[2], w)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_table_variants_match_reference(variant):
    kw = VARIANTS[variant]
    ez = kw.get("enforce_zero", False)
    x, c0 = make_data(
        4, 2000, 1, seed=4, zeros=0.1 if ez else 0.0, fp16_exact=True, enforce_zero=ez
    )
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    want = run(reference, x, c0, w, **kw)
    got = run(soft_kmeans, x, c0, w, method="table", **kw)
    # with an fp16 LUT, a centroid whose sum lands on a rounding midpoint (one does here) may
    # round one ulp apart: summation order differs between per-code and per-element sums
    slack = 50 if variant == "lut_fn" else 1
    assert_close(got[0], want[0], 1e-4, slack * 1e-5)
    assert_close(got[1], want[1], 1e-4, slack * 1e-5)
    assert_close(got[2], want[2], 1e-3, slack * 1e-4)
    assert_nontrivial(got[2], w)


@pytest.mark.parametrize("tau", [1e-4, 1e-3])
def test_table_close_to_reference_on_generic_fp32(tau):
    # generic fp32 weights are rounded to 11 significant bits: close, not equal
    x, c0 = make_data(2, 5000, 1, seed=11)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    want = run(reference, x, c0, w, tau=tau, epsilon=-1.0)
    got = run(soft_kmeans, x, c0, w, tau=tau, epsilon=-1.0, method="table")
    assert_close(got[0], want[0], 1e-2, 1e-3)
    assert_close(got[1], want[1], 1e-2, 1e-3)
    cos = F.cosine_similarity(got[2].view(-1), want[2].view(-1), dim=0)
    assert cos > 0.999, cos
    assert (got[2].norm() / want[2].norm() - 1).abs() < 0.02


# ---------------------------------------------------------------------------------------------
# grid engine == reference, up to its linear interpolation

GRID_VARIANTS = [
    "plain",
    "prune",
    "lut_fn",
    "clamp_attention",
    "enforce_zero+prune",
    "no_early_stop",
]


def grid_errors(got, want, c0):
    """(max output error, max centroid error) in widest initial centroid gaps, gradient error
    relative to the gradient's norm."""
    gap = c0.sort(1).values.diff(dim=1).amax().item()
    out = (got[0] - want[0]).abs().max().item() / gap
    cent = (got[1] - want[1]).abs().max().item() / gap
    grad = ((got[2] - want[2]).norm() / want[2].norm()).item()
    return out, cent, grad


@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("tau", [1e-4, 1e-3])
@pytest.mark.parametrize("variant", GRID_VARIANTS)
def test_grid_close_to_reference(g, tau, variant):
    # generic fp32 weights, both temperature regimes of the node spacing rule
    kw = {"tau": tau, "epsilon": -1.0, **({} if variant == "plain" else VARIANTS[variant])}
    ez = kw.get("enforce_zero", False)
    x, c0 = make_data(g, 6000, 1, seed=21 + g, enforce_zero=ez)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    want = run(reference, x, c0, w, **kw)
    got = run(soft_kmeans, x, c0, w, method="grid", **kw)
    out, cent, grad = grid_errors(got, want, c0)
    # measured: <= 8.4e-4 / 1.1e-3 / 2.6e-3 over these cases (the gradient's worst: tau 1e-3,
    # 20 iterations)
    assert out < 2e-3 and cent < 3e-3 and grad < 3e-3, (out, cent, grad)
    assert_nontrivial(got[2], w)
    if ez:
        assert (got[1][:, 0] == 0).all()


def test_grid_soft_rule_fades_for_separated_centroids(monkeypatch):
    # centroid gaps ~2.3 sqrt(tau): two centroids share each weight, the sharp rule alone sets
    # the spacing (fewer nodes than with the soft rule) and the error stays at its level
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(2, 8000, 1, generator=gen) * 0.05
    q = torch.linspace(0.02, 0.98, 8)
    c0 = torch.quantile(x[..., 0], q, dim=1).T.unsqueeze(-1).contiguous()
    w = torch.randn(x.shape, generator=gen)
    want = run(reference, x, c0, w, epsilon=-1.0)
    nodes = []
    for fade in (math.inf, sk._GRID_SOFT_FADE):
        monkeypatch.setattr(sk, "_GRID_SOFT_FADE", fade)
        nodes.append(sk._grid_spec(x.view(2, -1), c0.view(2, -1), _grid_cfg(), 1 << 16).nodes)
        got = run(soft_kmeans, x, c0, w, epsilon=-1.0, method="grid")
        out, cent, grad = grid_errors(got, want, c0)
        assert out < 2e-3 and cent < 3e-3 and grad < 3e-3, (fade, out, cent, grad)
    assert nodes[1] < 0.9 * nodes[0], nodes


def test_grid_takes_fine_cells_for_narrow_zones(monkeypatch):
    # heavy-tailed groups with sharp attention: the transition zones are narrow against the
    # range, 4x finer cells need fewer nodes than 128 cells; the result stays as accurate
    gen = torch.Generator().manual_seed(44)
    u = torch.rand(2, 6144, 1, generator=gen).clamp_min(0.05)
    x = torch.randn(2, 6144, 1, generator=gen) * 0.04 / u.sqrt()
    q = torch.linspace(0.01, 0.99, 16)
    c0 = torch.quantile(x[..., 0], q, dim=1).T.unsqueeze(-1).contiguous()
    w = torch.randn(x.shape, generator=gen)
    kw = dict(tau=3e-5, epsilon=-1.0)
    spec = sk._grid_spec(x.view(2, -1), c0.view(2, -1), _grid_cfg(3e-5), 1 << 16)
    assert spec.fc.shape[1] == sk._GRID_CELLS * sk._GRID_FINE_SPLIT
    monkeypatch.setattr(sk, "_GRID_FINE_SPLIT", 1)
    coarse = sk._grid_spec(x.view(2, -1), c0.view(2, -1), _grid_cfg(3e-5), 1 << 16)
    monkeypatch.undo()
    assert coarse.fc.shape[1] == sk._GRID_CELLS and spec.nodes * 1.1 < coarse.nodes
    want = run(reference, x, c0, w, **kw)
    got = run(soft_kmeans, x, c0, w, method="grid", **kw)
    out, cent, grad = grid_errors(got, want, c0)
    assert out < 2e-3 and cent < 3e-3 and grad < 3e-3, (out, cent, grad)


def test_grid_beats_the_table_on_generic_fp32_at_the_default_tau():
    # the table engine rounds x to 11 significant bits; the grid interpolates a smooth output
    x, c0 = make_data(2, 8000, 1, seed=31)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    want = run(reference, x, c0, w, epsilon=-1.0)
    grid = grid_errors(run(soft_kmeans, x, c0, w, epsilon=-1.0, method="grid"), want, c0)
    table = grid_errors(run(soft_kmeans, x, c0, w, epsilon=-1.0, method="table"), want, c0)
    assert grid[0] < table[0] / 2, (grid, table)
    assert grid[2] < table[2], (grid, table)


def test_grid_error_is_second_order_in_the_spacing(monkeypatch):
    # on one uniform cell (no transition zones), halving the spacing divides the
    # interpolation error by about 4
    x, c0 = make_data(1, 20000, 1, seed=33)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    want = run(reference, x, c0, w, epsilon=-1.0)
    errs = []
    monkeypatch.setattr(sk, "_GRID_CELLS", 1)
    monkeypatch.setattr(sk, "_GRID_SOFT_CELLS", 1.0)  # the sharp rule sets the spacing
    for cell in (1.0, 0.5):
        monkeypatch.setattr(sk, "_GRID_CELL_LOGIT", cell)
        errs.append(grid_errors(run(soft_kmeans, x, c0, w, epsilon=-1.0, method="grid"), want, c0))
    assert 2.5 < errs[0][0] / errs[1][0] < 6, errs
    assert 2.5 < errs[0][2] / errs[1][2] < 6, errs


def _grid_cfg(tau=1e-4):
    return sk._make_cfg(
        "t", torch.device("cpu"), tau, 3, 1e-4, "dkm", False, 0.0, 1e-7, None, None, "grid", False
    )[0]


@pytest.mark.parametrize("tau", [1e-6, 1e-4, 1e-3])
def test_grid_layout(tau):
    x, c0 = make_data(3, 5000, 1, seed=34)
    flat, c = x.view(3, -1), c0.view(3, -1)
    cfg = _grid_cfg(tau)
    spec = sk._grid_spec(flat, c, cfg, 1 << 16)
    lo, hi = flat.amin(1), flat.amax(1)
    total = (spec.fc.sum(1) + 1).long()
    v = spec.values()
    for g in range(3):
        real = v[g, : total[g]]
        assert real[0] == lo[g] and torch.allclose(real[-1], hi[g])
        assert (real.diff() > 0).all()
    # every cell that a transition zone of the centroids meets has its zone's spacing, graded
    # by the logits from the cell's nearest point to the midpoint (less the spec's margin)
    cells = spec.fc.shape[1]  # 128 or 512, or 1 where one uniform cell costs few more nodes
    assert cells in (1, sk._GRID_CELLS, sk._GRID_CELLS * sk._GRID_FINE_SPLIT)
    width = (hi - lo) / cells
    cs = c.sort(1).values
    gap, mid = cs.diff(dim=1), (cs[:, 1:] + cs[:, :-1]) / 2
    fade = torch.exp((gap**2 / tau - sk._GRID_SOFT_FADE).clamp_min(0))
    h = torch.minimum(
        sk._GRID_CELL_LOGIT * tau / (2 * gap), (tau / 2) ** 0.5 / sk._GRID_SOFT_CELLS * fade
    )
    margin = sk._GRID_SPEC_MARGIN
    half = (sk._GRID_SATURATION + margin) * tau / (2 * gap)

    def cell(v, g):
        return int(((v - lo[g]) / width[g]).floor().clamp(0, cells - 1))

    for g in range(3):
        for k in range(gap.shape[1]):
            a, b = cell(mid[g, k] - half[g, k], g), cell(mid[g, k] + half[g, k], g)
            for i in range(a, b + 1):
                left = lo[g] + i * width[g]
                dist = max(0.0, float(left - mid[g, k]), float(mid[g, k] - left - width[g]))
                logit = 2 * float(gap[g, k]) * dist / tau - margin
                allowed = h[g, k] * max(1.0, math.exp((logit - sk._GRID_GRADE_LOGIT) / 2))
                assert width[g] / spec.fc[g, i] <= allowed * (1 + 1e-5), (g, k, i)
            # the cell holding the midpoint has the base spacing
            assert width[g] / spec.fc[g, cell(mid[g, k], g)] <= h[g, k] * (1 + 1e-5)
    # the nodes' own values interpolate to x itself (kernel and node layout agree)
    for use_c in (False, True) if sk._dkm_cpu is not None else (False,):
        back = sk._grid_lerp(flat.contiguous(), spec, v, use_c)
        assert_close(back, flat, 1e-5, 1e-6)
        # the compiled node values are the torch ones (padding nodes: the max)
        assert_close(spec.values(use_c), v, 1e-6, 1e-7)
    if tau == 1e-6:  # sharp: fine cells only around the transitions
        assert cells > 1
        uniform = ((hi - lo) * 2 * gap.amax(1) / (tau * sk._GRID_CELL_LOGIT)).amax()
        assert spec.nodes < uniform / 4, (spec.nodes, uniform)


@needs_c_early
def test_grid_counts_compiled_equal_torch(monkeypatch):
    gen = torch.Generator().manual_seed(38)
    lo = torch.tensor([-0.1, 0.0, -1.0, 0.3])
    span = torch.tensor([0.2, 0.0, 2.0, 0.05])  # (a constant group)
    c = torch.randn(4, 8, generator=gen) * torch.tensor([[0.05], [0.01], [0.5], [0.01]])
    c[2, 3] = c[2, 4]  # duplicate centroids
    for tau, prune, margin in ((1e-4, 0.0, 8.0), (1e-6, 1e-3, 0.0), (1e-2, 0.0, 6.0)):
        cfg = sk._Cfg(**{**_grid_cfg(tau).__dict__, "prune_threshold": prune})
        got = sk._grid_counts(lo, span, c, cfg, margin, 64)
        kw = dict(whole=False, floor=0.25)
        raw = sk._grid_counts(lo, span, c, cfg, margin, 64, torch.zeros(4, 64), **kw)
        monkeypatch.setattr(sk, "_USE_C", False)
        want = sk._grid_counts(lo, span, c, cfg, margin, 64)
        want_raw = sk._grid_counts(lo, span, c, cfg, margin, 64, torch.zeros(4, 64), **kw)
        monkeypatch.undo()
        assert torch.equal(got, want), (tau, (got - want).abs().max())
        assert (got[1] == 1).all() and got.max() > 1
        # the fractional counts (above the floor outside the zones' cores): the same, and
        # their ceiling where > 1
        assert_close(raw, want_raw, 1e-6, 0)
        assert (raw[1] == 0).all() and (raw == 0).any()
        assert torch.equal(torch.where(raw > 1, raw.ceil(), 1.0), got)


def test_grid_refuses_too_many_nodes_and_non_finite_values():
    x, c0 = make_data(3, 5000, 1, seed=34)
    flat, c = x.view(3, -1), c0.view(3, -1)
    spec = sk._grid_spec(flat, c, _grid_cfg(), 1 << 16)
    assert sk._grid_spec(flat, c, _grid_cfg(), spec.nodes - 8) is None
    bad = flat.clone()
    bad[1, 7] = float("inf")
    assert sk._grid_spec(bad, c, _grid_cfg(), 1 << 16) is None
    bad[1, 7] = float("nan")
    assert sk._grid_spec(bad, c, _grid_cfg(), 1 << 16) is None
    huge = flat.clone()
    huge[2, :2] = torch.tensor([-3e38, 3e38])  # finite values whose span overflows
    assert sk._grid_spec(huge, c, _grid_cfg(), 1 << 16) is None


@needs_c_early
@pytest.mark.parametrize("portable", [False, True])
def test_compiled_row_range_equals_torch(portable):
    gen = torch.Generator().manual_seed(40)
    try:
        sk._dkm_cpu.portable(portable)
        for g, n in ((64, 8192), (3, 13), (1, 7), (5, 1)):
            x = torch.randn(g, n, generator=gen)
            lo, hi = torch.empty(g), torch.empty(g)
            assert sk._dkm_cpu.row_range(x.data_ptr(), g, n, lo.data_ptr(), hi.data_ptr())
            assert torch.equal(lo, x.amin(1)) and torch.equal(hi, x.amax(1))
            for bad in (float("inf"), float("-inf"), float("nan")):
                y = x.clone()
                y[-1, -1] = bad  # (the scalar tail when n % 8, a vector lane otherwise)
                assert not sk._dkm_cpu.row_range(y.data_ptr(), g, n, lo.data_ptr(), hi.data_ptr())
                assert math.isnan(sk._max_spread(y))
            # the window's switch: the widest row's spread, as torch computes it
            assert sk._max_spread(x) == float((x.amax(1) - x.amin(1)).amax())
            assert sk._max_spread(x.t()) == float((x.t().amax(1) - x.t().amin(1)).amax())
    finally:
        sk._dkm_cpu.portable(False)


def _heavy_groups(heavy: list[int], outlier=2.0, g=8, n=4096, k=16):
    """[G, N, 1] weights ~ N(0, 0.05) and quantile centroids; each group in ``heavy`` holds one
    far weight with its own centroid: a sharp transition inside a wide cell, which needs most
    of the group's elements as nodes (the MiniLM feed-forward case)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(g, n, generator=gen) * 0.05
    c = torch.quantile(x, torch.linspace(0.02, 0.98, k - 1), dim=1).T
    c = torch.cat([c, torch.full((g, 1), 0.5)], 1)
    x[heavy, 0] = outlier
    c[heavy, -1] = outlier
    return x.unsqueeze(2), c.contiguous().unsqueeze(2)


def test_auto_grid_caps_the_tensors_nodes_not_its_widest_group():
    cfg = _grid_cfg()
    x, c0 = _heavy_groups([0])
    g, n = x.shape[0], x.shape[1]
    kind = sk._scalar_kind(x, c0, "dense", "auto", cfg)
    assert isinstance(kind, sk._GridSpec)
    # group 0 needs more than half its elements (the per-group rule used to send the whole
    # tensor to the per-element engine), the tensor far less than half of all of them
    assert kind.lens[0] > n // 2 and int(kind.lens.sum()) <= g * n // 2, kind.lens
    assert kind.nodes <= n  # padded node tables no larger than the elements
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    got = run(soft_kmeans, x, c0, w, tau=1e-4)
    want = run(soft_kmeans, x, c0, w, tau=1e-4, method="dense")
    out, cent, grad = grid_errors(got, want, c0)
    assert out < 2e-3 and cent < 3e-3 and grad < 3e-3, (out, cent, grad)
    # every group heavy: more nodes than half the elements in all, the element engine
    x, c0 = _heavy_groups(list(range(8)), outlier=4.0)
    assert sk._scalar_kind(x, c0, "dense", "auto", cfg) == "exact"
    # method="grid" takes it anyway (up to 65,536 nodes per group)
    assert isinstance(sk._scalar_kind(x, c0, "grid", "grid", cfg), sk._GridSpec)


def _spec_fields(spec):
    if spec is None:
        return None
    names = ("lo", "inv_w", "span", "fc", "off", "lens")
    return {n: getattr(spec, n) for n in names} | {"nodes": spec.nodes, "cells": spec.fc.shape[1]}


@needs_c_early
def test_grid_spec_and_check_compiled_equal_torch(monkeypatch):
    # the one compiled call (ranges, counts, layout choice, tables) against the torch steps
    x, c0 = make_data(3, 5000, 1, seed=34)
    flat, c = x.view(3, -1), c0.view(3, -1)
    flat[2] = 0.25  # a constant group
    hx, hc = _heavy_groups([0, 3], outlier=4.0)
    cases = [(flat, c, tau, (1 << 16, None)) for tau in (1e-6, 1e-5, 1e-4, 1e-3)]
    cases += [(flat[:1], c[:1], 1e-4, (1 << 16, None))]  # one group
    cases += [(hx.view(8, -1), hc.view(8, -1), 1e-4, caps) for caps in ((1 << 16, None),
              (4096, 8 * 4096 // 2), (1 << 16, 100), (20, None))]  # fmt: skip
    bad = flat.clone()
    bad[1, 3] = float("nan")
    cases += [(bad, c, 1e-4, (1 << 16, None))]
    cells_seen = set()
    for f, cc, tau, caps in cases:
        cfg = _grid_cfg(tau)
        got = sk._grid_spec(f, cc, cfg, *caps)
        monkeypatch.setattr(sk, "_USE_C", False)
        want = sk._grid_spec(f, cc, cfg, *caps)
        monkeypatch.undo()
        g_f, w_f = _spec_fields(got), _spec_fields(want)
        assert (g_f is None) == (w_f is None), (tau, caps)
        if g_f is None:
            continue
        cells_seen.add(g_f["cells"])
        for name, value in w_f.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(g_f[name], value.to(g_f[name].dtype)), (tau, caps, name)
            else:
                assert g_f[name] == value, (tau, caps, name)
        # the centroids the grid was built for never need more than it has (forward skips
        # checking the first iteration, which starts from them)
        for use_c in (True, False):
            monkeypatch.setattr(sk, "_USE_C", use_c)
            for spec in (got, want):
                spec.missing = None
                sk._grid_check(spec, [cc], cfg)
                assert spec.missing is None, (tau, caps, use_c)
            monkeypatch.undo()
        # the iterations' centroids: moved away from the spec's, so that some cells need more
        for shift in (0.0, 0.02):
            cents = [cc + shift * (i + 1) for i in range(3)]
            got.missing = want.missing = None
            sk._grid_check(got, cents, cfg)
            monkeypatch.setattr(sk, "_USE_C", False)
            sk._grid_check(want, cents, cfg)
            monkeypatch.undo()
            assert (got.missing is None) == (want.missing is None), (tau, shift)
            if got.missing is not None:
                assert torch.equal(got.missing, want.missing), (tau, shift)
    # every layout came up: one uniform cell, the coarse cells and the fine ones
    assert cells_seen == {1, sk._GRID_CELLS, sk._GRID_CELLS * sk._GRID_FINE_SPLIT}, cells_seen


def test_grid_rebuilt_when_a_transition_leaves_its_zone(monkeypatch):
    # centroids that start far from where the iterations take them: the first grid misses
    # the moved transitions, forward reports it and the call reruns on a grid covering them
    gen = torch.Generator().manual_seed(37)
    x = torch.cat([0.01 * torch.randn(1, 4000, 1, generator=gen) + m for m in (-0.3, 0.0, 0.3)], 1)
    c0 = torch.tensor([[[-0.2], [0.05], [0.2]]])
    w = torch.randn(x.shape, generator=gen)
    specs = []
    rebuilt = sk._grid_rebuilt
    monkeypatch.setattr(sk, "_grid_rebuilt", lambda *a: specs.append(rebuilt(*a)) or specs[-1])
    kw = dict(tau=1e-5, epsilon=-1.0)
    got = run(soft_kmeans, x, c0, w, method="grid", **kw)
    assert specs and specs[0] is not None and specs[0].missing is None
    want = run(reference, x, c0, w, **kw)
    out, cent, grad = grid_errors(got, want, c0)
    assert out < 2e-3 and cent < 3e-3 and grad < 3e-3, (out, cent, grad)


@needs_c_early
@pytest.mark.parametrize("tau", [1e-4, 1e-6])  # one uniform cell; 128 cells
def test_grid_compiled_passes_equal_the_torch_ones(monkeypatch, c_kernels, tau):
    x, c0 = make_data(3, 9000, 1, seed=35)
    x[1, :] = 0.01  # a constant group: every element on node 0
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    got = run(soft_kmeans, x, c0, w, method="grid", tau=tau)
    monkeypatch.setattr(sk, "_USE_C", False)
    want = run(soft_kmeans, x, c0, w, method="grid", tau=tau)
    assert_close(got[0], want[0], 1e-5, 1e-6)
    assert_close(got[1], want[1], 1e-5, 1e-6)
    # at tau 1e-6 the gradient reaches ~100 (2 Var / tau) from float32 differences of
    # centroids: rounding apart by ~1e-4 relative
    assert_close(got[2], want[2], 1e-4, 1e-4)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[2]).all()


def test_grid_on_bf16_weights_runs_the_torch_passes_with_the_same_result():
    # bf16 weights take the torch element passes; their fp32 copy the compiled ones
    x, c0 = make_data(2, 8000, 1, seed=39)
    xb = x.bfloat16()
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    got = run(soft_kmeans, xb, c0, w, method="grid")
    want = run(soft_kmeans, xb.float(), c0, w, method="grid")
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    assert_close(got[0].float(), want[0].bfloat16().float(), 1e-2, 1e-3)
    assert_close(got[1], want[1], 1e-5, 1e-6)
    assert_close(got[2].float(), want[2], 1e-2, 1e-2)


def test_grid_constant_group_is_exact():
    x = torch.full((1, 5000, 1), 0.25)
    c0 = torch.tensor([[[0.1], [0.3]]])
    w = torch.ones_like(x)
    want = run(reference, x, c0, w)
    got = run(soft_kmeans, x, c0, w, method="grid")
    assert_close(got[0], want[0], 1e-6, 1e-7)
    assert_close(got[1], want[1], 1e-6, 1e-7)


def test_grid_argument_errors_and_fallback():
    x, c0 = make_data(1, 5000, 1, seed=36)
    with pytest.raises(ValueError, match="method='grid' needs mode='dkm'.*mode='hard'"):
        soft_kmeans(x, c0, method="grid", mode="hard")
    with pytest.raises(ValueError, match="exact-zero rule.*enforce_zero=True"):
        soft_kmeans(
            x, c0.clone().index_fill_(1, torch.tensor([0]), 0.0), method="grid", enforce_zero=True
        )
    x2, c2 = make_data(1, 500, 2, seed=36)
    with pytest.raises(ValueError, match="method='grid' needs d == 1.*d=2"):
        soft_kmeans(x2, c2, method="grid")
    # a non-finite value: the group runs on the exact engine instead
    bad = x.clone()
    bad[0, 3] = float("nan")
    a, b = soft_kmeans(bad, c0, method="grid")[0], soft_kmeans(bad, c0, method="dense")[0]
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(), b.nan_to_num())


# ---------------------------------------------------------------------------------------------
# iteration semantics


class CountingLut:
    def __init__(self):
        self.calls = 0

    def __call__(self, c):
        self.calls += 1
        return c


@pytest.mark.parametrize("method", ["dense", "table"])
def test_early_stopping_by_absolute_inertia_change(method):
    # tight, well separated clusters with centroids at their means: inertia is flat
    g = torch.Generator().manual_seed(0)
    centers = torch.linspace(-0.1, 0.1, K)
    x = (
        centers[torch.randint(0, K, (1, 4000), generator=g)]
        + 1e-4 * torch.randn(1, 4000, generator=g)
    ).unsqueeze(-1)
    x = x.half().float()
    c0 = centers.view(1, K, 1).clone()
    for eps, expected in [(1.0, 2), (-1.0, 5), (0.0, None)]:
        lut = CountingLut()
        with torch.no_grad():
            soft_kmeans(x, c0, max_iter=5, epsilon=eps, lut_fn=lut, method=method)
        if expected is not None:
            assert lut.calls == expected, (eps, lut.calls)
        else:
            assert 2 <= lut.calls <= 5


@pytest.mark.parametrize("method", ["dense", "table"])
def test_groups_stop_independently_like_separate_calls(method):
    x, c0, w = two_speed_groups()
    kw = dict(max_iter=4, epsilon=1e-3, tau=1e-4, method=method)
    both = run(soft_kmeans, x, c0, w, **kw)
    for i in range(2):
        one = run(soft_kmeans, x[i : i + 1], c0[i : i + 1], w[i : i + 1], **kw)
        for a, b in zip(one, both):
            assert_close(a, b[i : i + 1], 1e-4, 1e-4)  # chunking and sum order differ
    lut = CountingLut()
    with torch.no_grad():
        soft_kmeans(x[:1], c0[:1], lut_fn=lut, **kw)
    assert lut.calls == 2  # group 0 alone stops at the first check
    lut = CountingLut()
    with torch.no_grad():
        soft_kmeans(x[1:], c0[1:], lut_fn=lut, **kw)
    assert lut.calls > 2  # group 1 keeps going
    want = run(reference, x, c0, w, **{k: v for k, v in kw.items() if k != "method"})
    assert_close(both[2], want[2], 1e-3, 1e-4)


def two_speed_groups():
    """Group 0 is converged from the start (tight clusters at its centroids), group 1 not."""
    g = torch.Generator().manual_seed(1)
    centers = torch.linspace(-0.5, 0.5, K)
    pick = torch.randint(0, K, (3000,), generator=g)
    tight = centers[pick] + 1e-4 * torch.randn(3000, generator=g)
    loose = 0.05 * torch.randn(3000, generator=g)
    x = torch.stack([tight, loose]).unsqueeze(-1).half().float()
    c0 = torch.stack([centers, torch.linspace(-0.1, 0.1, K)]).unsqueeze(-1)
    return x, c0, torch.randn(x.shape, generator=g)


@pytest.mark.parametrize("method", ["dense", "table"])
def test_gsm_noise_follows_each_groups_last_iteration(method):
    # the output of a group that stopped early must reuse the noise of its own last iteration
    x, c0, w = two_speed_groups()
    kw = dict(max_iter=4, epsilon=1e-3, tau=1e-4, mode="gsm")
    ref_gen, gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    if method == "dense":
        noise = lambda t: torch.rand(2, 3000, K, generator=ref_gen)
    else:
        noise = table_noise(x, ref_gen)
    want = run(reference, x, c0, w, noise=noise, **kw)
    got = run(soft_kmeans, x, c0, w, method=method, generator=gen, **kw)
    assert_close(got[0], want[0], 1e-4, 1e-5)
    assert_close(got[1], want[1], 1e-4, 1e-5)
    assert_close(got[2], want[2], 1e-3, 1e-4)
    calls = []
    for i in range(2):  # the premise: the groups stop at different iterations
        lut = CountingLut()
        soft_kmeans(x[i : i + 1], c0[i : i + 1], lut_fn=lut, method=method, **kw)
        calls.append(lut.calls)
    assert calls == [2, 4]


@pytest.mark.parametrize("method", ["dense", "table"])
@pytest.mark.parametrize("mode", ["dkm", "hard"])
def test_empty_column_keeps_its_centroid(method, mode):
    x, c0 = make_data(1, 1000, 1, seed=2, fp16_exact=True)
    c0[0, 5, 0] = 3.0  # far from every weight: its attention column is exactly 0
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    got = run(soft_kmeans, x, c0, w, method=method, mode=mode)
    want = run(reference, x, c0, w, mode=mode)
    assert got[1][0, 5, 0] == 3.0
    assert all(torch.isfinite(t).all() for t in got)
    assert_close(got[2], want[2], 1e-3, 1e-4)


def test_clamp_attention_never_leaves_a_column_empty():
    # coremltools 9.0 clamps A at zero_threshold: a far centroid is pulled to the group mean
    x, c0 = make_data(1, 1000, 1, seed=2)
    c0[0, 5, 0] = 3.0
    _, c = soft_kmeans(x, c0, clamp_attention=True, method="dense")
    assert c[0, 5, 0].abs() < 0.1


# ---------------------------------------------------------------------------------------------
# dtypes, autocast, compile, devices


@pytest.mark.parametrize("method", ["dense", "table"])
def test_bf16_autocast_is_ignored_inside(method):
    x, c0 = make_data(2, 1000, 1, seed=3)
    w = torch.randn(x.shape)
    plain = run(soft_kmeans, x, c0, w, method=method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = run(soft_kmeans, x, c0, w, method=method)
    assert under[0].dtype == torch.float32 and under[2].dtype == torch.float32
    for a, b in zip(under, plain):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", ["dense", "table"])
def test_bf16_weights_keep_their_dtype(method):
    x, c0 = make_data(2, 1000, 1, seed=4)
    xb = x.bfloat16()
    w = torch.randn(x.shape)
    out, c, grad = run(soft_kmeans, xb, c0, w, method=method, tau=1e-3)
    assert out.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16 and c.dtype == torch.float32
    want = run(reference, xb.float(), c0, w, tau=1e-3)
    assert_close(out.float(), want[0], 1e-2, 1e-2)
    assert_close(c, want[1], 1e-4, 1e-5)  # bf16 values are exact table codes
    assert_close(grad.float(), want[2], 2e-2, 1e-2)


@pytest.mark.parametrize("method", ["dense", "table"])
def test_torch_compile_eager_backend(method):
    x, c0 = make_data(1, 1000, 1, seed=5)
    w = torch.randn(x.shape)

    def loss(xr):
        out, _ = soft_kmeans(xr * 1.0, c0, method=method)
        return (out * w).sum()

    compiled = torch.compile(loss, backend="eager")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = loss(xa), compiled(xb)
    la.backward()
    lb.backward()
    torch.testing.assert_close(lb, la)
    torch.testing.assert_close(xb.grad, xa.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["dense", "table"])
@pytest.mark.parametrize("mode", ["dkm", "hard", "gsm"])
def test_cuda_matches_reference(method, mode):
    x, c0 = make_data(4, 3000, 1, seed=6, fp16_exact=True)
    x, c0 = x.cuda(), c0.cuda()
    w = torch.randn(x.shape, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ref_gen = torch.Generator(device="cuda").manual_seed(0)
    noise = lambda t: torch.rand(4, 3000, K, generator=ref_gen, device="cuda")
    if method == "table":
        noise = table_noise(x, ref_gen)
    want = run(reference, x, c0, w, mode=mode, noise=noise)
    got = run(soft_kmeans, x, c0, w, mode=mode, method=method, generator=gen)
    assert_close(got[0], want[0], 1e-4, 1e-5)
    assert_close(got[2], want[2], 1e-3, 1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        under = run(soft_kmeans, x, c0, w, method=method)
    assert under[0].dtype == torch.float32


@pytest.mark.parametrize("method", ["dense", "table"])
def test_centroids_can_be_updated_in_place_before_backward(method):
    # the palettizer stores the new centroids into its state between forward and backward
    x, c0 = make_data(1, 1000, 1, seed=3)
    w = torch.randn(x.shape)
    want = run(soft_kmeans, x, c0.clone(), w, method=method)
    xr = x.clone().requires_grad_()
    state = c0.clone()
    out, new = soft_kmeans(xr, state, method=method)
    state.copy_(new)
    (grad,) = torch.autograd.grad((out * w).sum(), xr)
    torch.testing.assert_close(grad, want[2])


def test_gsm_is_reproducible_from_the_generator():
    x, c0 = make_data(1, 500, 1, seed=8)
    outs = [
        soft_kmeans(x, c0, mode="gsm", generator=torch.Generator().manual_seed(s))[0]
        for s in (1, 1, 2)
    ]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


# ---------------------------------------------------------------------------------------------
# memory


def saved_bytes(fn):
    """Bytes autograd keeps for backward, counted once per storage."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_table_saves_o_n_for_backward():
    n = 1 << 18
    x, c0 = make_data(1, n, 1, seed=9)
    x.requires_grad_()
    tables = 4 * 8 * (sk._NCODES + 1) + (1 << 16)  # per-code tables and small state
    table = saved_bytes(lambda: soft_kmeans(x, c0, method="table"))
    assert table < 4 * n * 4 + tables, table
    assert table >= 4 * n  # the int32 code of every element
    naive = saved_bytes(lambda: reference(x[:, : n // 8], c0))
    assert naive > (n // 8) * K * 4, naive


def test_auto_engine_choice():
    small, c0 = make_data(1, sk._GRID_AUTO_MIN_GROUP - 1, 1, seed=1)
    mid, c1 = make_data(2, sk._GRID_AUTO_MIN_GROUP, 1, seed=1)
    large, c2 = make_data(1, sk._TABLE_MIN_GROUP["cpu"], 1, seed=1)
    cases = [
        (small, c0, {}, "dense"),  # small groups: the exact engine
        (mid, c1, {}, "grid"),  # mid-sized ones: the grid where it needs few enough nodes
        (large, c2, {}, "grid"),
        (large.bfloat16(), c2, {}, "table"),  # fp16 / bf16: the table, exact for them
        (large * 8, c2 * 8, {"tau": 1e-9}, "table"),  # the grid would need too many nodes
        (mid, c1, {"tau": 1e-9}, "dense"),  # near-hard attention: too many nodes
        (mid, c1, {"mode": "hard"}, "dense"),  # a step function: never interpolated
    ]
    for x, c, kw, method in cases:
        auto, forced = soft_kmeans(x, c, **kw)[0], soft_kmeans(x, c, method=method, **kw)[0]
        assert torch.equal(auto, forced), (x.shape, kw, method)
    kw = {"enforce_zero": True}  # the exact-zero rule: a jump at 0
    zc1 = c1.clone()
    zc1[:, 0] = 0.0
    assert torch.equal(
        soft_kmeans(mid, zc1, **kw)[0], soft_kmeans(mid, zc1, method="dense", **kw)[0]
    )


def test_dense_saves_only_the_weights(small_chunks):
    n, d = 20000, 2
    x, c0 = make_data(1, n, d, seed=10)
    x.requires_grad_()
    dense = saved_bytes(lambda: soft_kmeans(x, c0, method="dense", epsilon=-1.0))
    assert dense < n * d * 4 + 4096, dense


# ---------------------------------------------------------------------------------------------
# hard assignment


@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize(
    "kw", [{}, {"prune_threshold": 1e-3}, {"enforce_zero": True}], ids=["plain", "prune", "zero"]
)
def test_hard_assign_is_the_adjusted_argmin(d, kw, small_chunks):
    x, c0 = make_data(3, 777, d, seed=12, zeros=0.1, enforce_zero=True)
    labels = hard_assign(x, c0, **kw)
    dist = ((x[:, :, None] - c0[:, None]) ** 2).sum(-1)
    if kw.get("prune_threshold"):
        dist[..., 0] -= kw["prune_threshold"]
    elif kw.get("enforce_zero"):
        dist[..., 0] = torch.where((x != 0).any(-1), 1e7, dist[..., 0])
    assert labels.dtype == torch.int64 and labels.shape == (3, 777)
    assert torch.equal(labels, dist.argmin(-1))


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"tau": 0.0}, "tau"),
        ({"max_iter": 0}, "max_iter"),
        ({"mode": "topk"}, "mode"),
        ({"method": "fast"}, "method"),
        ({"prune_threshold": -1.0}, "prune_threshold"),
        ({"zero_threshold": 0.0}, "zero_threshold"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"lut_fn": lambda c: c[:, :2]}, "lut_fn"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kw, match):
    x, c0 = make_data(1, 50, 1)
    with pytest.raises(ValueError, match=match):
        soft_kmeans(x, c0, **kw)


def test_bad_shapes_raise_value_error():
    x, c0 = make_data(2, 50, 2)
    with pytest.raises(ValueError, match="centroids"):
        soft_kmeans(x, c0[:1])
    with pytest.raises(ValueError, match="x"):
        soft_kmeans(x[0], c0)
    with pytest.raises(ValueError, match="table"):
        soft_kmeans(x, c0, method="table")
    with pytest.raises(ValueError, match="centroids"):
        hard_assign(x, c0[..., :1])
    with pytest.raises(TypeError, match="lut_fn"):
        soft_kmeans(x, c0, lut_fn=3)


# ---------------------------------------------------------------------------------------------
# batching, layouts, sync-free early stopping


@pytest.fixture
def device_layout(monkeypatch):
    """Run the engine the way it runs on a GPU (one stacked segment per width bucket, no host
    reads for early stopping, no CPU scratch buffers), here on the CPU."""
    monkeypatch.setattr(sk, "_sync_free", lambda device: True)
    monkeypatch.setattr(sk, "_host_layout", lambda device: False)
    # (a Trainer(deterministic=True) elsewhere in the session leaves torch's deterministic
    # mode on, which takes the device layout's deterministic kernels)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)


def batch_inputs():
    """Tensors of every kind: table ones (fp16-exact, G = 1 and 2), exact ones (G = 1 and 3),
    tiny ones, widths far enough apart to need several device segments."""
    shapes = [
        (1, 70000, True),
        (2, 66000, True),
        (1, 3000, False),
        (3, 500, False),
        (1, 200, False),
        (1, 1000, False),
    ]
    xs, cs = [], []
    for i, (g, n, exact16) in enumerate(shapes):
        x, c0 = make_data(g, n, 1, seed=40 + i, fp16_exact=exact16, zeros=0.05, enforce_zero=True)
        xs.append(x)
        cs.append(c0)
    return xs, cs


BATCH_VARIANTS = {
    "dkm": {},
    "hard": dict(mode="hard"),
    "prune+lut": dict(prune_threshold=2e-5, lut_fn=fp16_ste),
    "enforce_zero": dict(enforce_zero=True),
    "clamp": dict(clamp_attention=True, tau=1e-3),
}


def run_batch(xs, cs, ws, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    res = sk.soft_kmeans_batch(leaves, cs, **kw)
    grads = torch.autograd.grad([(o.float() * w).sum() for (o, _), w in zip(res, ws)], leaves)
    return [(o.detach(), c, g) for (o, c), g in zip(res, grads)]


@pytest.mark.parametrize("layout", ["host", "device"])
@pytest.mark.parametrize("variant", list(BATCH_VARIANTS))
def test_batch_equals_tensor_by_tensor(layout, variant, request):
    kw = BATCH_VARIANTS[variant]
    xs, cs = batch_inputs()
    ws = [
        torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i, x in enumerate(xs)
    ]
    if layout == "device":
        request.getfixturevalue("device_layout")
    # both in one layout: the layouts' sums differ in rounding, which the fp16 LUT of
    # "prune+lut" can turn into a one-step jump of a centroid
    one = [run(soft_kmeans, x, c, w, **kw) for x, c, w in zip(xs, cs, ws)]
    both = run_batch(xs, cs, ws, **kw)
    for a, b in zip(both, one):  # float rounding only (sums over other lengths and orders)
        assert_close(a[0], b[0], 1e-5, 1e-6)
        assert_close(a[1], b[1], 1e-5, 1e-5)
        assert_close(a[2], b[2], 1e-4, 1e-5)


@pytest.mark.parametrize("stack_elems", [1 << 26, 130000, 1])
@pytest.mark.parametrize("variant", ["dkm", "enforce_zero"])
@pytest.mark.parametrize("frozen", [None, 3])
@pytest.mark.parametrize("deterministic", [False, True])
def test_device_layout_stacked_table_passes_equal_tensor_by_tensor(
    stack_elems, variant, frozen, deterministic, device_layout, monkeypatch
):
    # the device layout codes, gathers and scatters runs of one-group table tensors at once
    # (and iterates same-width table tensors in one segment): the same results as one by one,
    # also with several runs (a run per tensor at 1), mixed dtypes, multi-group tensors
    # between runs, and an input without gradient
    monkeypatch.setattr(sk, "_STACK_ELEMS", stack_elems)
    # (deterministic: bincount, nonzero and index_put_ instead of the sync-free index_add_ and
    # scatter_)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    kw = BATCH_VARIANTS[variant]
    shapes = [(1, 70000), (1, 50000), (2, 66000), (1, 90000), (1, 40000), (3, 30000), (1, 9000)]
    xs, cs = [], []
    for i, (g, n) in enumerate(shapes):
        x, c0 = make_data(g, n, 1, seed=60 + i, fp16_exact=True, zeros=0.02)
        xs.append(x.bfloat16() if i == 4 else x)
        cs.append(c0)
    ws = [
        torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i, x in enumerate(xs)
    ]
    want = [run(soft_kmeans, x, c, w, method="table", **kw) for x, c, w in zip(xs, cs, ws)]
    leaves = [x.detach().clone().requires_grad_(i != frozen) for i, x in enumerate(xs)]
    res = sk.soft_kmeans_batch(leaves, cs, method="table", **kw)
    live = [i for i in range(len(xs)) if i != frozen]
    grads = torch.autograd.grad(
        [(res[i][0].float() * ws[i]).sum() for i in live], [leaves[i] for i in live]
    )
    for i, (out, c) in enumerate(res):
        assert out.dtype == xs[i].dtype
        assert_close(out.float(), want[i][0].float(), 1e-5, 1e-6)
        assert_close(c, want[i][1], 1e-5, 1e-5)
    for i, g in zip(live, grads):
        assert_close(g.float(), want[i][2].float(), 1e-4, 1e-5)


def test_batch_keeps_each_tensors_engine_and_dtype():
    xs, cs = batch_inputs()
    xs[2] = xs[2].bfloat16()
    x_grid, c_grid = make_data(2, 8000, 1, seed=47)
    xs.append(x_grid)
    cs.append(c_grid)
    res = sk.soft_kmeans_batch(xs, cs, method="auto")
    for x, (out, c) in zip(xs, res):
        assert out.shape == x.shape and out.dtype == x.dtype and c.dtype == torch.float32
    # exact tensors are not rounded to 11 significant bits like the tables
    assert_close(res[3][0], soft_kmeans(xs[3], cs[3], method="dense")[0], 1e-5, 1e-6)
    assert_close(res[0][0], soft_kmeans(xs[0], cs[0], method="grid")[0], 1e-5, 1e-6)
    assert_close(res[-1][0], soft_kmeans(x_grid, c_grid, method="grid")[0], 1e-5, 1e-6)
    assert not torch.equal(res[-1][0], soft_kmeans(x_grid, c_grid, method="dense")[0])
    # mode "hard": no grid, the 70,000-element tensor on the table, the 8,000 one exact
    res_hard = sk.soft_kmeans_batch(xs, cs, method="auto", mode="hard")
    hard = [("table", 0, xs[0], cs[0]), ("dense", -1, x_grid, c_grid)]
    for method, i, x, c in hard:
        want = soft_kmeans(x, c, method=method, mode="hard")[0]
        assert_close(res_hard[i][0], want, 1e-5, 1e-6)


@pytest.mark.parametrize("layout", ["host", "device"])
def test_batch_of_different_centroid_counts_runs_one_node_per_count(layout, request):
    # tensors with 4, 16 and 4 centroids in one call: each equals its own soft k-means, the
    # two with K = 4 share a node, and the centroids returned are private [G, K, 1] copies
    if layout == "device":
        request.getfixturevalue("device_layout")
    specs = [(1, 5000, 4, 80), (2, 3000, 16, 81), (1, 7000, 4, 82)]
    xs, cs, ws = [], [], []
    for g, n, k, seed in specs:
        gen = torch.Generator().manual_seed(seed)
        x = (0.02 * torch.randn(g, n, 1, generator=gen)).half().float()
        q = torch.linspace(0.02, 0.98, k)
        xs.append(x)
        cs.append(torch.quantile(x.view(g, n), q, dim=1).T.unsqueeze(-1).contiguous())
        ws.append(torch.randn(x.shape, generator=gen))
    before = [c.clone() for c in cs]
    want = [run(soft_kmeans, x, c, w) for x, c, w in zip(xs, cs, ws)]
    got = run_batch(xs, cs, ws)
    for (out, c, g), (w_out, w_c, w_g), c_in in zip(got, want, cs):
        assert c.shape == c_in.shape
        assert_close(out, w_out, 1e-5, 1e-6)
        assert_close(c, w_c, 1e-5, 1e-5)
        assert_close(g, w_g, 1e-4, 1e-5)
    leaves = [x.clone().requires_grad_() for x in xs]
    res = sk.soft_kmeans_batch(leaves, cs)
    nodes = [out.grad_fn for out, _ in res]
    assert nodes[0] is nodes[2] and nodes[1] is not nodes[0]
    for _, c in res:
        c.fill_(7.0)
    for c, b in zip(cs, before):
        assert torch.equal(c, b)


@pytest.mark.parametrize("method", ["auto", "grid"])
def test_batch_with_grid_tensors_matches_one_by_one(method):
    # grid, table and exact tensors in one node (auto: the sharp tau keeps the big one on the
    # table), their segments shared or not
    xs, cs = batch_inputs()
    w = [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i, x in enumerate(xs)]
    for kw in ({}, {"tau": 1e-6}):
        ws = [x.clone().requires_grad_() for x in xs]
        res = sk.soft_kmeans_batch(ws, cs, method=method, **kw)
        sum((o * g).sum() for (o, _), g in zip(res, w)).backward()
        for x, c, g, wt, (out, cent) in zip(xs, cs, w, ws, res):
            want = run(soft_kmeans, x, c, g, method=method, **kw)
            assert_close(out.detach(), want[0], 1e-5, 1e-6)
            assert_close(cent, want[1], 1e-5, 1e-6)
            assert_close(wt.grad, want[2], 1e-4, 1e-5)


def test_batch_gsm_and_vectors_run_one_by_one():
    x1, c1 = make_data(2, 300, 1, seed=1)
    x2, c2 = make_data(2, 300, 2, seed=2)
    kw = dict(mode="gsm")
    res = sk.soft_kmeans_batch([x1, x2], [c1, c2], generator=torch.Generator().manual_seed(3), **kw)
    gen = torch.Generator().manual_seed(3)
    want = [soft_kmeans(x, c, generator=gen, **kw) for x, c in [(x1, c1), (x2, c2)]]
    for (a, ca), (b, cb) in zip(res, want):
        assert torch.equal(a, b) and torch.equal(ca, cb)


def test_batch_argument_errors():
    x, c0 = make_data(1, 50, 1)
    with pytest.raises(ValueError, match="2 tensors and 1 centroid"):
        sk.soft_kmeans_batch([x, x], [c0])
    with pytest.raises(TypeError, match="lists"):
        sk.soft_kmeans_batch(x, c0)
    with pytest.raises(ValueError, match="centroids"):
        sk.soft_kmeans_batch([x], [c0[:, :, :0]])
    assert sk.soft_kmeans_batch([], []) == []


@pytest.mark.parametrize("method", ["dense", "table"])
def test_sync_free_early_stop_gives_the_same_results(method, monkeypatch):
    # elsewhere than the CPU every iteration runs and a stopped group keeps its state
    x, c0, w = two_speed_groups()
    kw = dict(max_iter=4, epsilon=1e-3, tau=1e-4, method=method)
    host = run(soft_kmeans, x, c0, w, **kw)
    monkeypatch.setattr(sk, "_sync_free", lambda device: True)
    free = run(soft_kmeans, x, c0, w, **kw)
    for a, b in zip(free, host):
        assert_close(a, b, 1e-6, 1e-7)
    lut = CountingLut()
    with torch.no_grad():
        soft_kmeans(x[:1], c0[:1], lut_fn=lut, **kw)
    assert lut.calls == 4  # group 0 stops at the first check, yet every iteration runs


@pytest.mark.parametrize("method", ["dense", "table"])
@pytest.mark.parametrize("variant", ["dkm", "hard", "clamp", "enforce_zero"])
def test_scalar_engine_chunked_and_recomputing_matches_reference(method, variant, monkeypatch):
    # many chunks (separate output pass) and no attention kept for backward (recomputed)
    monkeypatch.setitem(sk._SCALAR_CHUNK_ELEMS, "cpu", 4096)
    monkeypatch.setitem(sk._KEEP_ATTENTION_ELEMS, "cpu", 0)
    kw = {
        "dkm": {},
        "hard": dict(mode="hard"),
        "clamp": dict(clamp_attention=True, tau=1e-3),
        "enforce_zero": dict(enforce_zero=True),
    }[variant]
    x, c0 = make_data(2, 1500, 1, seed=8, fp16_exact=True, zeros=0.05, enforce_zero=True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    want = run(reference, x, c0, w, **kw)
    got = run(soft_kmeans, x, c0, w, method=method, **kw)
    assert_close(got[0], want[0], 1e-4, 1e-5)
    assert_close(got[1], want[1], 1e-4, 1e-5)
    assert_close(got[2], want[2], 1e-3, 1e-4)


def _reference64(x, c0, **kw):
    """The naive reference in float64 (the truth the float32 engines approximate)."""
    xf, c = x.double(), c0.double()
    tau = kw.get("tau", 1e-4)
    for _ in range(kw.get("max_iter", 3)):
        dist = (xf - c.transpose(1, 2)) ** 2
        att = torch.softmax(-dist / tau, -1)
        mass = att.sum(1)
        c = torch.where(mass[..., None] > 0, (att.transpose(1, 2) @ xf) / mass[..., None], c)
    return att @ c, c


def test_gradient_is_accurate_where_the_attention_saturates():
    # x ~ 1 with tau = 1e-4: logits reach 1e4 and the attention is nearly one-hot; the row-wise
    # softmax backward and the centered centroid sums keep float32 close to the float64 truth
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 1536, 1, generator=g) * 2 - 1).half().float()
    c0 = torch.tensor([-0.7861, -0.2493, 0.2972, 0.8090]).view(1, 4, 1)
    w = torch.randn(x.shape, generator=g)
    x64 = x.double().requires_grad_()
    out64, _ = _reference64(x64, c0)
    (g64,) = torch.autograd.grad((out64 * w.double()).sum(), x64)
    for method in ("dense", "table"):
        _, _, grad = run(soft_kmeans, x, c0, w, epsilon=-1.0, method=method)
        err = ((grad.double() - g64).norm() / g64.norm()).item()
        assert err < 2e-4, (method, err)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that read device memory back to the host (a sync on a GPU): the ones
    that dispatch, and Tensor.tolist / Tensor.item (which on a CPU tensor do not)."""

    READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.bincount")

    def __init__(self):
        super().__init__()
        self.count = 0
        self._saved = {}

    def __enter__(self):
        for name in ("tolist", "item"):
            orig = self._saved[name] = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=orig, **k):
                self.count += 1
                with torch.utils._python_dispatch._disable_current_modes():
                    return _orig(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.READS):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_auto_takes_the_grid_on_devices_listed_in_grid_auto_devices(device_layout, monkeypatch):
    # off the CPU's host layout "auto" keeps the table / dense engines unless the device type
    # is listed (bench/dkm_gpu.py's "grid" variant); listed, it gives what method="grid" gives
    mid, c1 = make_data(2, sk._GRID_AUTO_MIN_GROUP, 1, seed=1)
    w = torch.randn(mid.shape, generator=torch.Generator().manual_seed(3))
    dense = run(soft_kmeans, mid, c1, w, method="dense")
    assert all(torch.equal(a, b) for a, b in zip(run(soft_kmeans, mid, c1, w), dense))
    monkeypatch.setattr(sk, "_GRID_AUTO_DEVICES", frozenset({"cpu"}))
    auto = run(soft_kmeans, mid, c1, w)
    grid = run(soft_kmeans, mid, c1, w, method="grid")
    assert all(torch.equal(a, b) for a, b in zip(auto, grid))
    assert not torch.equal(auto[0], dense[0])
    assert_close(auto[0], dense[0], 1e-4, 2e-3)


def test_device_layout_reads_the_host_a_fixed_number_of_times(device_layout):
    xs, cs = batch_inputs()
    reads = []
    for n in (2, len(xs)):
        leaves = [x.clone().requires_grad_() for x in xs[:n]]
        with _HostReads() as mode:
            res = sk.soft_kmeans_batch(leaves, cs[:n], max_iter=5, epsilon=1e-6)
            torch.autograd.backward([o for o, _ in res], [torch.ones_like(o) for o, _ in res])
        reads.append(mode.count)
    # the table sizes of the batch (one tolist), not per tensor nor per iteration
    assert reads[0] == reads[1] == 1, reads


# ---------------------------------------------------------------------------------------------
# the compiled CPU kernels (lightning_palettize/_dkm_cpu.c) against the torch code

needs_c = needs_c_early


@pytest.fixture(params=["simd", "portable"])
def c_kernels(request):
    """The compiled kernels as the CPU runs them, or forced to their portable C versions."""
    if request.param == "portable":
        sk._dkm_cpu.portable(True)
    yield request.param
    sk._dkm_cpu.portable(False)


def _torch_and_c(monkeypatch, fn, codes="auto"):
    monkeypatch.setattr(sk, "_USE_C", False)
    want = fn()
    monkeypatch.setattr(sk, "_USE_C", True)
    monkeypatch.setattr(sk, "_C_CODES", codes)
    return want, fn()


@needs_c
@pytest.mark.parametrize("codes", ["auto", "always"])
@pytest.mark.parametrize("variant", ["dkm", "hard", "prune", "enforce_zero", "clamp"])
def test_compiled_kernels_equal_the_torch_code(monkeypatch, c_kernels, codes, variant):
    # the element passes (codes recomputed from x, never stored) and the per-code passes
    # (attention recomputed in tiles) compute what the torch code does, up to float rounding;
    # "always" also runs the portable per-code kernels for the configurations the AVX2 ones
    # leave to torch (exact-zero rule, attention clamp)
    kw = dict(BATCH_VARIANTS.get(variant, {}))
    if variant == "prune":
        kw = dict(prune_threshold=2e-5)
    xs, cs = batch_inputs()
    ws = [
        torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i, x in enumerate(xs)
    ]
    want, got = _torch_and_c(monkeypatch, lambda: run_batch(xs, cs, ws, **kw), codes)
    for a, b in zip(got, want):
        assert_close(a[0], b[0], 1e-5, 1e-5)
        assert_close(a[1], b[1], 1e-5, 1e-5)
        assert_close(a[2], b[2], 1e-3, 1e-4)


@needs_c
@pytest.mark.parametrize(
    "kw",
    [
        dict(method="table"),
        dict(method="grid"),
        dict(method="table", enforce_zero=True),
        dict(method="table", epsilon=1e-3, max_iter=8),  # groups stop at different iterations
        dict(method="grid", epsilon=-1.0, max_iter=5),  # no early-stopping test
    ],
)
def test_compiled_iteration_loop_equals_the_python_loop(monkeypatch, c_kernels, kw):
    # fwd_loop / bwd_loop (all iterations and their updates in one call each) against the
    # Python loop around the single-iteration kernels: equal, not just close
    monkeypatch.setattr(sk, "_C_CODES", "always")
    x, c0 = make_data(8, 9000 if kw["method"] == "grid" else 3000, 1, seed=9)
    x[:4] *= 0.1  # (groups whose inertia settles first)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    runs = []
    module = sk._dkm_cpu

    class Spy:  # the compiled module, with fwd_loop's answers recorded
        def __getattr__(self, name):
            return getattr(module, name)

        def fwd_loop(self, *args):
            runs.append(module.fwd_loop(*args))
            return runs[-1]

    monkeypatch.setattr(sk, "_dkm_cpu", Spy())
    got = run(soft_kmeans, x, c0, w, **kw)
    assert runs, "the compiled loop did not run"
    monkeypatch.setattr(sk, "_C_LOOP", False)
    want = run(soft_kmeans, x, c0, w, **kw)
    for a, b in zip(got, want):
        assert torch.equal(a, b), (a - b).abs().max()
    if "epsilon" in kw and kw["epsilon"] > 0:  # some groups ran fewer iterations than others
        assert any(partial >= 0 for _, partial in runs), runs


@needs_c
def test_compiled_codes_equal_the_torch_codes(c_kernels):
    # fp16 bit patterns with round-to-nearest-even, subnormals, the exact-zero rule's tiny
    # codes, in both the F16C and the portable conversion
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            0.02 * torch.randn(20011, generator=g),
            1e-9 * torch.randn(300, generator=g),
            torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0, 2.0**-24, 1.5 * 2.0**-24]),
        ]
    ).view(1, -1)
    for keep_zeros in (False, True):
        cfg = sk._Cfg(1e-4, 3, 1e-4, "dkm", keep_zeros, 0.0, 1e-7, None, False)
        bins, scale, *want = sk._encode_many([x], cfg, x.device)
        _, scale_c, *got = sk._encode_many([x], cfg, x.device, c_codes=True)
        assert torch.equal(scale.float(), scale_c)
        for a, b in zip(got, want):
            assert a == b if isinstance(a, (int, list)) else torch.equal(a, b)
        # the soft weight gathers each element's code value
        table = torch.randn(sk._STRIDE, generator=g)
        out = torch.empty_like(x)
        sk._dkm_cpu.gather(
            x.data_ptr(),
            1,
            x.shape[1],
            scale_c.data_ptr(),
            int(keep_zeros),
            table.data_ptr(),
            out.data_ptr(),
        )
        assert torch.equal(out.view(-1), table[bins])


@needs_c
def test_compiled_kernels_keep_the_saturated_centroids_accurate():
    # tau = 1e-4 on values ~ 1: the logits reach 1e4, so the logit *gaps* carry the accuracy;
    # the per-code kernels take them from (c_m - c_k)(2v - c_k - c_m) in exact differences
    # and sum in float64, landing within an ulp or two of the float64 truth
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 1536, 1, generator=g) * 2 - 1).half().float()
    c0 = torch.tensor([-0.7861, -0.2493, 0.2972, 0.8090]).view(1, 4, 1)
    _, truth = _reference64(x, c0)
    for method in ("dense", "table"):
        _, c = soft_kmeans(x, c0, epsilon=-1.0, method=method)
        err = (c.double() - truth).abs().max().item()
        assert err <= 3 * 2.0**-24, (method, err)


@needs_c
@pytest.mark.parametrize("method", ["table", "grid"])
def test_reused_output_buffers_never_overwrite_a_kept_tensor(monkeypatch, method):
    # the CPU outputs' storages are recycled only once nothing else holds them
    monkeypatch.setattr(sk._OutputCache, "MIN_ELEMS", 1)
    x, c0 = make_data(1, 70000, 1, seed=3)
    x.requires_grad_()
    out1, _ = soft_kmeans(x, c0, method=method)
    (g1,) = torch.autograd.grad(out1.sum(), x)
    keep_out, keep_g = out1.clone(), g1.clone()
    with torch.no_grad():
        x.mul_(1.5)  # a different weight: different outputs
    out2, _ = soft_kmeans(x, c0, method=method)
    (g2,) = torch.autograd.grad((out2 * 2).sum(), x)
    assert torch.equal(out1, keep_out) and torch.equal(g1, keep_g)
    assert not torch.equal(out2, out1) and not torch.equal(g2, g1)
    del out1, g1, out2, g2
    out3, _ = soft_kmeans(x, c0, method=method)  # may reuse: still a correct result
    with torch.no_grad():
        x.div_(1.5)
    monkeypatch.setattr(sk, "_USE_C", False)
    out4, _ = soft_kmeans(x.detach() * 1.5, c0, method=method)
    assert_close(out3.detach(), out4, 1e-5, 1e-6)


# ---------------------------------------------------------------------------------------------
# the weight's gradient written into the soft weight's incoming gradient (CPU, compiled path)


def _soft_weight_grad(x, c0, inp, through, observe=None, method="table"):
    """(w.grad, whether it shares the incoming gradient's storage, what ``observe`` kept)."""
    w = x.clone().requires_grad_()
    out, _ = soft_kmeans(w, c0, method=method)
    ptrs = []
    out.register_hook(lambda g: ptrs.append(g.data_ptr()))  # keeps no reference: no fallback
    kept = observe(out) if observe is not None else None
    if through == "linear":  # the gradient arrives as a view of the weight-shaped mm result
        loss = F.linear(inp, out.view(256, 256)).square().sum()
    else:
        loss = (out * out).sum()
    loss.backward()
    return w.grad, ptrs[0] == w.grad.data_ptr(), kept


@needs_c
@pytest.mark.parametrize("method", ["table", "grid"])
@pytest.mark.parametrize("through", ["elementwise", "linear"])
def test_weight_gradient_in_place_is_bit_identical(monkeypatch, through, method):
    x, c0 = make_data(4, 256 * 64, 1, seed=5)
    inp = torch.randn(8, 256, generator=torch.Generator().manual_seed(6))
    got, shared, _ = _soft_weight_grad(x, c0, inp, through, method=method)
    monkeypatch.setattr(sk, "_GRAD_IN_PLACE", False)
    want, copied, _ = _soft_weight_grad(x, c0, inp, through, method=method)
    assert shared and not copied  # the in-place path ran, and the fallback did not share
    assert torch.equal(got, want)
    assert got.abs().sum() > 0


def _keep_hook(out):
    kept = []
    out.register_hook(kept.append)
    return kept


def _keep_view_hook(out):
    kept = []
    out.register_hook(lambda g: kept.append(g.view(-1)) and None)
    return kept


def _keep_post_hook(out):
    kept = []
    out.grad_fn.register_hook(lambda grad_in, grad_out: kept.append(grad_out[0]) and None)
    return kept


def _keep_multi_grad_hook(out):
    kept = []
    torch.autograd.graph.register_multi_grad_hook((out,), lambda grads: kept.append(grads[0]))
    return kept


@needs_c
@pytest.mark.parametrize(
    "observe",
    [_keep_hook, _keep_view_hook, _keep_post_hook, _keep_multi_grad_hook],
    ids=["tensor_hook", "tensor_hook_view", "node_post_hook", "multi_grad_hook"],
)
@pytest.mark.parametrize("method", ["table", "grid"])
def test_a_kept_incoming_gradient_is_never_overwritten(monkeypatch, observe, method):
    # whoever keeps the soft weight's gradient sees it unchanged: the backward then allocates
    x, c0 = make_data(1, 256 * 256, 1, seed=7)
    inp = torch.randn(8, 256, generator=torch.Generator().manual_seed(8))
    for through in ("elementwise", "linear"):
        got, shared, kept = _soft_weight_grad(x, c0, inp, through, observe, method)
        assert not shared
        w = x.clone().requires_grad_()
        out, _ = soft_kmeans(w, c0, method=method)
        soft = out.detach().requires_grad_()
        if through == "linear":
            loss = F.linear(inp, soft.view(256, 256)).square().sum()
        else:
            loss = (soft * soft).sum()
        (want_soft,) = torch.autograd.grad(loss, soft)
        assert torch.equal(kept[-1].view_as(want_soft), want_soft)
        monkeypatch.setattr(sk, "_GRAD_IN_PLACE", False)
        want, _, _ = _soft_weight_grad(x, c0, inp, through, method=method)
        monkeypatch.undo()
        assert torch.equal(got, want)


@needs_c
def test_retained_and_requested_soft_weight_gradients_are_kept():
    x, c0 = make_data(1, 256 * 256, 1, seed=9)
    m = torch.randn(x.shape, generator=torch.Generator().manual_seed(10))
    w = x.clone().requires_grad_()
    out, _ = soft_kmeans(w, c0, method="table")
    out.retain_grad()
    (out * m).sum().backward()
    assert torch.equal(out.grad, m)
    w2 = x.clone().requires_grad_()
    out2, _ = soft_kmeans(w2, c0, method="table")
    g_out, g_w = torch.autograd.grad((out2 * m).sum(), [out2, w2])  # captures out2's gradient
    assert torch.equal(g_out, m) and torch.equal(g_w, w.grad)


@needs_c
def test_a_gradient_shared_with_an_earlier_node_is_not_overwritten(monkeypatch):
    # an add's backward hands one gradient tensor to both operands; the other operand's node
    # (created earlier) runs after ours and must still read it unchanged
    x, c0 = make_data(1, 256 * 256, 1, seed=11)
    m = torch.randn(x.shape, generator=torch.Generator().manual_seed(12))

    def run():
        a = torch.ones(x.shape, requires_grad=True)
        h = a * 3.0
        w = x.clone().requires_grad_()
        out, _ = soft_kmeans(w, c0, method="table")
        ((h + out) * m).sum().backward()
        return a.grad, w.grad

    a_grad, w_grad = run()
    assert torch.equal(a_grad, 3.0 * m)
    monkeypatch.setattr(sk, "_GRAD_IN_PLACE", False)
    assert torch.equal(run()[1], w_grad)


@needs_c
@pytest.mark.parametrize("method", ["table", "grid"])
def test_soft_weight_used_twice_and_batched_tensors_get_their_gradients(monkeypatch, method):
    # one soft weight feeding two ops (autograd sums its gradients), and several tensors of one
    # batched node, one of which receives the very same gradient tensor as another
    xs = [make_data(1, 256 * 256, 1, seed=s)[0] for s in (13, 14, 15)]
    cs = [make_data(1, 256 * 256, 1, seed=s)[1] for s in (13, 14, 15)]
    inp = torch.randn(8, 256, generator=torch.Generator().manual_seed(16))

    def run():
        ws = [x.clone().requires_grad_() for x in xs]
        outs = [o for o, _ in sk.soft_kmeans_batch(ws, cs, method=method)]
        w0 = outs[0].view(256, 256)
        loss = F.linear(inp, w0).square().sum() + F.linear(inp * 2, w0.t()).sum()
        loss = loss + ((outs[1] + outs[2]) * 3.0).sum()  # one gradient tensor for both
        loss.backward()
        return [w.grad for w in ws]

    got = run()
    monkeypatch.setattr(sk, "_GRAD_IN_PLACE", False)
    want = run()
    monkeypatch.setattr(sk, "_USE_C", False)
    slow = run()
    for a, b, c in zip(got, want, slow):
        assert torch.equal(a, b)
        assert_close(a, c, 1e-4, 1e-5)


@needs_c
def test_create_graph_backward_allocates_the_weight_gradient():
    # the backward is first order: with create_graph its result stays a plain tensor, equal to
    # the ordinary one (the incoming gradient, part of the new graph, is left alone)
    x, c0 = make_data(1, 256 * 256, 1, seed=17)
    m = torch.randn(x.shape, generator=torch.Generator().manual_seed(18))
    grads = []
    for create_graph in (False, True):
        w = x.clone().requires_grad_()
        out, _ = soft_kmeans(w, c0, method="table")
        scale = torch.ones((), requires_grad=True)
        (g_w,) = torch.autograd.grad((out * m * scale).sum(), w, create_graph=create_graph)
        assert g_w.grad_fn is None
        grads.append(g_w)
    assert torch.equal(grads[0], grads[1])


def test_batch_of_a_small_table_and_an_exact_tensor_matches_one_by_one():
    # both tiny enough to share one CPU segment: the exact tensor's rows must be stacked in
    # (the code tables alone hold only the table tensor's)
    gen = torch.Generator().manual_seed(19)
    xs = [
        0.02 * torch.randn(1, 76800, 1, generator=gen),
        0.02 * torch.randn(1, 1200, 1, generator=gen),
    ]
    cs = [torch.linspace(-0.04, 0.04, 4).view(1, 4, 1)] * 2
    ws = [x.clone().requires_grad_() for x in xs]
    outs = sk.soft_kmeans_batch(ws, cs)
    sum(((o * o).sum() for o, _ in outs)).backward()
    for x, c, w, (out, cent) in zip(xs, cs, ws, outs):
        w1 = x.clone().requires_grad_()
        o1, c1 = soft_kmeans(w1, c)
        (o1 * o1).sum().backward()
        assert_close(out.detach(), o1.detach(), 1e-5, 1e-6)
        assert_close(cent, c1, 1e-5, 1e-6)
        assert_close(w.grad, w1.grad, 1e-4, 1e-5)


@needs_c
@pytest.mark.parametrize("clamp", [False, True])  # AVX2 register kernels; tiled ones
def test_per_code_kernels_skip_ragged_row_padding(c_kernels, clamp):
    # rows of different lengths padded with zero mass: with lens the kernels stop at each
    # row's end and give the same sums (bit for bit), zeros in y and h past the end
    gen = torch.Generator().manual_seed(43)
    g, u, k = 5, 203, 6
    lens = torch.tensor([203, 1, 77, 8, 150], dtype=torch.int32)
    live = torch.arange(u).unsqueeze(0) < lens.unsqueeze(1)
    v = torch.randn(g, u, generator=gen) * 0.05
    m = torch.rand(g, u, generator=gen) * live
    gsum = torch.randn(g, u, generator=gen) * live
    c = torch.randn(g, k, generator=gen).mul(0.05).sort(1).values.contiguous()
    c2 = (c + 0.001).contiguous()
    cfg = sk._make_cfg(
        "t", torch.device("cpu"), 1e-3, 3, 1e-4, "dkm", False, 0.0, 1e-7, None, None, "auto", clamp
    )[0]
    ct = sk._c_cfg(cfg, k)
    s_hat, raw = torch.randn(g, k, generator=gen), c2.clone()

    def run_all(lens_ptr):
        out = {n: torch.full(shape, 7.0) for n, shape in [("y", (g, u)), ("h", (g, u))]}
        out.update(sm=torch.zeros(g, 2, k), inertia=torch.zeros(g, dtype=torch.float64))
        out.update(att=torch.empty(g, k), r=torch.zeros(g, u), dc=torch.empty(g, k))
        out["dco"] = torch.empty(g, k)
        p = sk._ptr
        sk._dkm_cpu.fwd_stats(p(v), p(m), p(c), g, u, ct, p(out["sm"]), p(out["inertia"]), 0,
                              lens_ptr)  # fmt: skip
        sk._dkm_cpu.out_y(p(v), p(c), p(c2), g, u, ct, p(out["y"]), 0, lens_ptr)
        sk._dkm_cpu.att_t(p(v), p(gsum), p(c), g, u, ct, p(out["att"]), 0, lens_ptr)
        sk._dkm_cpu.bwd_step(p(v), p(m), p(gsum), p(c), g, u, ct, 2e3, p(s_hat), p(raw), p(c2),
                             p(out["r"]), p(out["h"]), p(out["dc"]), p(out["dco"]), 0,
                             lens_ptr)  # fmt: skip
        return out

    full, ragged = run_all(0), run_all(lens.data_ptr())
    for name in ("sm", "inertia", "att", "dc", "dco"):
        assert torch.equal(full[name], ragged[name]), name
    for name in ("y", "h", "r"):
        assert torch.equal(full[name][live], ragged[name][live]), name
    assert (ragged["y"][~live] == 0).all() and (ragged["h"][~live] == 0).all()
    assert (ragged["r"][~live] == 0).all()  # left as it was
    assert (full["y"][~live] != 0).any()  # (the full rows did compute the padding)


@needs_c
@pytest.mark.parametrize("method", ["grid", "table", "dense"])
@pytest.mark.parametrize("prune", [0.0, 1e-4])
def test_centroid_window_changes_nothing_visible(monkeypatch, method, prune):
    # sharp attention: the AVX2 kernels skip, per block, the centroids far from it; the result
    # equals the unskipped one, including a far centroid that is nearest to no weight (its
    # attention ~e^-36 everywhere: its weighted mean still moves it to the data)
    gen = torch.Generator().manual_seed(45)
    x = (torch.rand(2, 6000, 1, generator=gen) - 0.5) * 0.1
    c0 = torch.tensor([-0.03, 0.0, 0.03, 0.113]).view(1, 4, 1).repeat(2, 1, 1)
    w = torch.randn(x.shape, generator=gen)
    kw = dict(tau=1e-4, epsilon=-1.0, method=method, prune_threshold=prune)
    cfg = _grid_cfg()
    assert sk._c_cfg(cfg, 4, c0.view(2, 4))[-1] > 0  # the window is on here
    got = run(soft_kmeans, x, c0, w, **kw)
    monkeypatch.setattr(sk, "_WINDOW_LOGIT", 0.0)
    assert sk._c_cfg(cfg, 4, c0.view(2, 4))[-1] == 0
    want = run(soft_kmeans, x, c0, w, **kw)
    assert_close(got[0], want[0], 1e-6, 1e-7)
    assert_close(got[1], want[1], 1e-5, 1e-7)
    assert_close(got[2], want[2], 1e-5, 1e-6)
    assert (got[1][:, 3] < 0.06).all()  # the far centroid moved to the data's edge
    assert_nontrivial(got[2], w)


@pytest.mark.parametrize("layout", ["host", "device"])
def test_grouped_inputs_equal_their_group_views(request, layout):
    # soft_kmeans_batch(groups=...) takes weights as they are and returns outputs in their
    # shapes: the same values, centroids and gradients as the [G, N, 1] views of them
    if layout == "device":
        request.getfixturevalue("device_layout")
    gen = torch.Generator().manual_seed(31)
    shapes, gs = [(96, 80), (40, 32, 3), (64, 200)], [1, 8, 4]
    ws = [torch.randn(s, generator=gen) for s in shapes]
    cs = [torch.sort(torch.randn(g, 4, 1, generator=gen), dim=1).values for g in gs]
    kw = dict(tau=1e-3, max_iter=3, enforce_zero=True)

    def run(grouped):
        xs = [w.clone().requires_grad_() for w in ws]
        ins = xs if grouped else [x.view(g, -1, 1) for x, g in zip(xs, gs)]
        out = sk.soft_kmeans_batch(ins, cs, groups=gs if grouped else None, **kw)
        loss = sum((o.reshape(x.shape) * (i + 1)).square().sum() for i, (x, (o, _)) in
                   enumerate(zip(xs, out)))  # fmt: skip
        loss.backward()
        return out, [x.grad for x in xs]

    got, grads = run(True)
    want, want_grads = run(False)
    for (o, c), (wo, wc), w, g, wg in zip(got, want, ws, grads, want_grads):
        assert o.shape == w.shape
        assert o.grad_fn is got[0][0].grad_fn  # one node, no view node per weight
        assert torch.equal(o, wo.reshape(w.shape)) and torch.equal(c, wc)
        assert torch.equal(g, wg)


def test_grouped_inputs_outside_the_contract_are_rejected():
    w = torch.randn(8, 6)
    c = torch.zeros(2, 4, 1)
    cases = [
        (dict(groups=[5]), "groups\\[0\\] must be an int >= 1 dividing xs\\[0\\].numel\\(\\) = 48"),
        (dict(groups=[2, 2]), "one int per tensor"),
        (dict(groups=[2], mode="gsm"), "no Gumbel noise"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            sk.soft_kmeans_batch([w], [c], **kw)
    with pytest.raises(ValueError, match="contiguous"):
        sk.soft_kmeans_batch([w.t()], [c], groups=[2])
    with pytest.raises(ValueError, match="centroids\\[0\\] must be a floating \\[G=2, K>=1, 1\\]"):
        sk.soft_kmeans_batch([w], [torch.zeros(2, 4, 2)], groups=[2])


# lut_fn (an fp16 LUT) is left to test_dense_variants_match_reference: a centroid on an fp16
# rounding boundary may round either way after the two sum in different orders
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "lut_fn"] + ["plain"])
@pytest.mark.parametrize("d,k", [(2, 4), (3, 16), (4, 8), (16, 8)])
def test_vector_rows_kernel_matches_torch(variant, d, k, c_kernels, monkeypatch):
    """CPU vectors run the compiled per-row kernels (_dkm_cpu.vec_fwd / vec_bwd: with AVX2 and
    FMA, cluster_dim 2 and 4 compiled apart, or the portable build); the torch dense code they
    replace gives the same outputs, centroids and gradients."""
    if sk._dkm_cpu is None:
        pytest.skip("the compiled DKM kernels are not built")
    kw = VARIANTS.get(variant, {})
    ez = kw.get("enforce_zero", False)
    x, _ = make_data(3, 500, d, seed=5, zeros=0.1 if ez else 0.0, enforce_zero=ez)
    c0 = x[:, torch.randperm(500, generator=torch.Generator().manual_seed(7))[:k]].clone()
    if ez:
        c0[:, 0] = 0.0
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    calls = []
    real = sk._dkm_cpu

    class Counting:
        def __getattr__(self, name):
            if name.startswith("vec_"):
                calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(sk, "_dkm_cpu", Counting())
    got = run(soft_kmeans, x, c0, w, method="dense", **kw)
    assert {"vec_fwd", "vec_bwd"} <= set(calls)
    monkeypatch.setattr(sk, "_USE_C", False)
    want = run(soft_kmeans, x, c0, w, method="dense", **kw)
    assert_close(got[0], want[0], 1e-4, 1e-5)
    assert_close(got[1], want[1], 1e-4, 1e-5)
    assert_close(got[2], want[2], 1e-4, 1e-4)  # gradients: as against the reference
    assert_nontrivial(got[2], w)


def test_long_vectors_run_in_torch():
    """cluster_dim over the kernels' 64 runs the torch code (same results as the reference)."""
    x, c0 = make_data(1, 40, 65, seed=1)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    got = run(soft_kmeans, x, c0, w, method="dense")
    want = run(reference, x, c0, w)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-4, 1e-5)


def test_vector_rows_kernel_on_a_non_contiguous_view(monkeypatch):
    """x as a view with permuted strides (a per_grouped_channel layout can give one): the
    kernel's output is in x's element order."""
    base = 0.02 * torch.randn(300, 3, 2, generator=torch.Generator().manual_seed(3))
    x = base.transpose(0, 1)  # [3, 300, 2], not contiguous
    c0 = x[:, :8].clone()
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    got = run(soft_kmeans, x, c0, w, method="dense")
    want = run(soft_kmeans, x.contiguous(), c0, w, method="dense")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    monkeypatch.setattr(sk, "_USE_C", False)
    ref = run(soft_kmeans, x, c0, w, method="dense")
    assert_close(got[0], ref[0], 1e-4, 1e-5)


@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("use_c", [False, True])
def test_subnormal_cluster_mass_gives_finite_gradients(d, use_c, monkeypatch):
    """A centroid far from every value gets a subnormal attention mass: it counts as empty
    (keeps its place) on every path, and no gradient overflows to NaN (dividing by that mass
    did, on the torch paths)."""
    monkeypatch.setattr(sk, "_USE_C", use_c)
    bad = 0
    for trial in range(40):
        gen = torch.Generator().manual_seed(trial)
        x = 0.05 * torch.randn(3, 5, d, generator=gen)
        x[:, 2] = 0.0
        c = 0.05 * torch.randn(3, 4, d, generator=gen)
        w = torch.sin(torch.arange(x.numel(), dtype=torch.float32)).view_as(x)
        out, _, grad = run(soft_kmeans, x, c, w, method="dense")
        bad += int(not bool(torch.isfinite(grad).all() and torch.isfinite(out).all()))
    assert bad == 0


@pytest.mark.parametrize("groups", [1, 3])
def test_vector_rows_kernel_on_two_threads(groups, monkeypatch):
    """With two torch threads a large enough call is split: a tensor's groups in two halves,
    or one group's rows at a multiple of 256 (its second half's sums apart, added after).
    Outputs, centroids and gradients equal the one-thread run's."""
    if sk._dkm_cpu is None or sk._km._NCPU < 2:
        pytest.skip("the compiled DKM kernels are not built, or one CPU")
    x, c0 = make_data(groups, 1000, 2, seed=11)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(12))
    monkeypatch.setattr(sk, "_VEC_SPLIT_WORK", 1)
    parts = []
    real = sk._km._in_parallel

    def counting(first, second):
        parts.append(2)
        real(first, second)

    monkeypatch.setattr(sk._km, "_in_parallel", counting)
    one = run(soft_kmeans, x, c0, w, method="dense")
    assert not parts  # one thread (the one_thread fixture)
    torch.set_num_threads(2)
    try:
        two = run(soft_kmeans, x, c0, w, method="dense")
    finally:
        torch.set_num_threads(1)
    assert parts  # the kernels ran split
    for a, b in zip(two, one):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
