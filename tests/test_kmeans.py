"""The clustering kernels: exact 1-D optimality, fast-mode error bound, vector k-means."""

import itertools

import numpy as np
import pytest
import torch

import lightning_palettize.kmeans as km
from lightning_palettize.kmeans import kmeans, kmeans_1d, kmeans_many, kmeans_vectors


def _brute_force(values, weights, k):
    """Minimum weighted SSE over every partition of the sorted values into contiguous runs."""
    order = np.argsort(values, kind="stable")
    x, w = np.asarray(values)[order], np.asarray(weights)[order]
    n = len(x)
    best = np.inf
    for cuts in itertools.combinations(range(1, n), min(k, n) - 1):
        bounds = [0, *cuts, n]
        cost = 0.0
        for a, b in zip(bounds[:-1], bounds[1:]):
            sw = w[a:b].sum()
            if sw > 0:
                mu = (w[a:b] * x[a:b]).sum() / sw
                cost += (w[a:b] * (x[a:b] - mu) ** 2).sum()
        best = min(best, cost)
    return best


def _quadratic_dp(values, weights, k):
    """Textbook O(k n^2) dynamic program over distinct values (independent reference)."""
    u, inv = np.unique(values, return_inverse=True)
    w = np.bincount(inv, weights=weights)
    wx = np.bincount(inv, weights=weights * values)
    wxx = np.bincount(inv, weights=weights * values * values)
    p0, p1, p2 = (np.concatenate([[0.0], np.cumsum(a)]) for a in (w, wx, wxx))
    m = len(u)

    def cost(a, b):
        s0 = p0[b] - p0[a]
        return 0.0 if s0 <= 0 else max(0.0, (p2[b] - p2[a]) - (p1[b] - p1[a]) ** 2 / s0)

    d = [cost(0, i) for i in range(m + 1)]
    for _ in range(1, min(k, m)):
        d = [min([d[j] + cost(j, i) for j in range(0, i)] or [0.0]) for i in range(m + 1)]
    return d[m]


def _sse(x, w, result):
    cent = torch.gather(result.centroids.double(), 1, result.labels.long())
    return (w * (x.double() - cent) ** 2).sum(dim=1)


@pytest.mark.parametrize("weighted", [False, True])
def test_1d_equals_brute_force_on_small_inputs(weighted):
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(1, 10, (1,), generator=gen))
        x = torch.randn(1, n, generator=gen, dtype=torch.float64)
        if trial % 4 == 0:  # ties
            x = torch.round(x * 2) / 2
        w = torch.rand(1, n, generator=gen, dtype=torch.float64) + 0.05
        w = w if weighted else torch.ones_like(w)
        for k in (1, 2, 3, 4, 6):
            r = kmeans_1d(x, k, w if weighted else None, exact=True)
            best = _brute_force(x[0].numpy(), w[0].numpy(), k)
            assert r.inertia[0].item() == pytest.approx(best, rel=1e-9, abs=1e-12)
            # the labels realise that optimum, and no label points at a padded slot
            assert _sse(x, w, r)[0].item() == pytest.approx(best, rel=1e-9, abs=1e-12)
            assert int(r.labels.max()) < min(k, len(torch.unique(x)))


def test_1d_equals_quadratic_dp_on_larger_inputs():
    rng = np.random.default_rng(1)
    for n, k in [(300, 4), (250, 16), (200, 7), (120, 2)]:
        vals = np.round(rng.standard_normal(n) * 50) / 10  # many duplicates
        w = rng.random(n) + 0.01
        ref = _quadratic_dp(vals, w, k)
        x = torch.tensor(vals).unsqueeze(0)
        r = kmeans_1d(x, k, torch.tensor(w).unsqueeze(0), exact=True)
        assert r.inertia[0].item() == pytest.approx(ref, rel=1e-9)
        assert _sse(x, torch.tensor(w).unsqueeze(0), r)[0].item() == pytest.approx(ref, rel=1e-9)


def test_1d_constant_and_fewer_distinct_values_than_k():
    x = torch.full((2, 50), 0.25)
    x[1, :25] = -1.0
    r = kmeans_1d(x, 16)
    assert r.centroids.shape == (2, 16)
    assert torch.all(r.centroids[0] == 0.25)
    assert set(r.centroids[1].tolist()) == {-1.0, 0.25}
    assert torch.equal(_sse(x, torch.ones_like(x), r), torch.zeros(2, dtype=torch.float64))
    # LUTs are sorted and the tail repeats the largest centroid
    assert torch.all(r.centroids[:, 1:] >= r.centroids[:, :-1])


def test_1d_groups_are_independent():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 400, generator=gen)
    x[3] *= 100
    batched = kmeans_1d(x, 8)
    for g in range(5):
        single = kmeans_1d(x[g : g + 1], 8)
        assert torch.equal(batched.centroids[g], single.centroids[0])
        assert torch.equal(batched.labels[g], single.labels[0])


@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform", "heavy_tail", "tiny", "bimodal"])
@pytest.mark.parametrize("groups,k", [(1, 4), (1, 16), (8, 16), (1, 256)])
def test_fast_mode_within_0_1_percent_of_exact(dist, groups, k):
    """fp32 weights binned by 16-bit code: error on the exact weights <= 1.001x the optimum."""
    gen = torch.Generator().manual_seed(3)
    n = 20000
    if dist == "normal":
        x = torch.randn(groups, n, generator=gen) * 0.02
    elif dist == "laplace":
        x = torch.distributions.Laplace(0.0, 0.05).sample((groups, n))
    elif dist == "uniform":
        x = torch.rand(groups, n, generator=gen) - 0.5
    elif dist == "heavy_tail":
        x = torch.randn(groups, n, generator=gen) ** 3
    elif dist == "tiny":
        x = torch.randn(groups, n, generator=gen) * 6e-5
    else:
        x = torch.randn(groups, n, generator=gen) * 0.01 + torch.sign(torch.randn(groups, n)) * 0.5
    fast = kmeans_1d(x, k)
    exact = kmeans_1d(x, k, exact=True)
    ones = torch.ones_like(x, dtype=torch.float64)
    ratio = _sse(x, ones, fast) / _sse(x, ones, exact)
    assert torch.all(ratio <= 1.001), ratio


def test_small_weights_keep_relative_precision():
    """coremltools' 4-decimal rounding leaves ~3 values and 90% error for |w| ~ 6e-5."""
    x = torch.randn(1, 50000, generator=torch.Generator().manual_seed(4)) * 6e-5
    r = kmeans_1d(x, 16)
    rel = (_sse(x, torch.ones_like(x, dtype=torch.float64), r) / (x.double() ** 2).sum()).item()
    assert rel < 0.02
    assert len(torch.unique(r.centroids)) == 16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_inputs_are_clustered_exactly(dtype):
    x = (torch.randn(3, 5000, generator=torch.Generator().manual_seed(5)) * 0.1).to(dtype)
    fast = kmeans_1d(x, 16)
    exact = kmeans_1d(x, 16, exact=True)
    torch.testing.assert_close(fast.inertia, exact.inertia, rtol=1e-9, atol=0)


def _fused_case(case):
    gen = torch.Generator().manual_seed(11)
    shape, k, dtype, weighted = case
    x = torch.randn(shape, generator=gen) * 0.02
    if case[0] == (3, 7):  # tiny groups, K larger than the distinct values
        x = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0]] * 3)
        x[1] = 0.0  # an all-zero group
        x[2] = 5e-39  # subnormal fp32: the exact path takes it (scale out of float range)
    if shape == (4, 9000):  # a narrow mode at 8 bits: some groups fall back to exact
        x[:2] = torch.round(x[:2] * 2000) / 2000
    w = torch.rand(shape, generator=gen) ** 4 if weighted else None
    if weighted:
        w[:, ::5] = 0.0
    return x.to(dtype), k, w


_FUSED_CASES = [
    ((64, 4096), 16, torch.float32, False),
    ((16, 3000), 4, torch.float32, True),
    ((1, 200000), 16, torch.float32, False),  # > 2,048 codes: the coarse level and windows
    ((1, 200000), 4, torch.float32, True),
    ((8, 5000), 8, torch.bfloat16, False),
    ((8, 5000), 8, torch.float16, True),
    ((4, 9000), 256, torch.float32, False),
    ((3, 7), 16, torch.float32, False),
]


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize("case", _FUSED_CASES, ids=lambda c: f"{c[0]}-k{c[1]}-{c[2]}-w{int(c[3])}")
def test_fused_cpu_kernels_equal_torch_program(monkeypatch, case, exact):
    """The compiled CPU kernels (fast mode: one code histogram per group; exact mode: a radix
    sort per group) and the torch program (used on CUDA) compute the same bins, DP, centroids
    and labels."""
    import lightning_palettize.kmeans as km

    x, k, w = _fused_case(case)
    if exact and x.shape[1] > 10000:
        x, w = x[:, :10000], None if w is None else w[:, :10000]
    fused = kmeans_1d(x, k, w, exact=exact)
    monkeypatch.setattr(km, "_FUSED_CPU", False)
    ref = kmeans_1d(x, k, w, exact=exact)
    # weighted sums add up in another order: a boundary between two bins tied to ~1e-12 may
    # fall on either side, which moves a handful of elements and changes nothing measurable
    differ = (fused.labels != ref.labels).sum().item()
    assert differ <= (x.numel() // 10000 if w is not None else 0)
    if differ == 0:
        torch.testing.assert_close(fused.centroids, ref.centroids, rtol=1e-6, atol=1e-12)
    # (the torch program expands (x - c)^2: ~1e-13 of cancellation on near-zero errors)
    torch.testing.assert_close(fused.inertia, ref.inertia, rtol=1e-9, atol=1e-11)


def test_fused_half_conversion_matches_torch():
    """float32 -> binary16 in C rounds like torch's .half(): ties, subnormals, overflow."""
    from lightning_palettize import _kmeans1d

    gen = torch.Generator().manual_seed(12)
    half = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    half = half[torch.isfinite(half)].unique()
    mid = (half[:-1] + half[1:]) / 2  # exact ties between neighbouring halves
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=gen).to(torch.int32)
    rnd = bits.view(torch.float32)
    rnd = rnd[torch.isfinite(rnd)]
    edge = torch.tensor([0.0, -0.0, 65519.0, 65520.0, 1e6, 2.0**-25, 2.0**-24 * 1.5, 2.0**-26])
    x = torch.cat([half, mid, -mid, rnd, edge, torch.randn(1 << 16, generator=gen) * 1e-6])
    out = np.empty(x.numel(), dtype=np.uint16)
    _kmeans1d.half_bits(x.contiguous().numpy(), out)
    ref = x.half().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -float("nan")])
def test_non_finite_values_are_rejected_in_every_mode(dtype, bad):
    # the fused kernel finds them itself (first or last code of a group); the other paths by a sum
    for pos in (0, 777, 4999):
        x = torch.randn(3, 5000, generator=torch.Generator().manual_seed(pos)).to(dtype)
        x[1, pos] = bad
        for exact in (False, True):
            with pytest.raises(ValueError, match="NaN or Inf"):
                kmeans_1d(x, 8, exact=exact)


def test_kmeans_many_equals_one_call_per_tensor():
    gen = torch.Generator().manual_seed(21)
    xs = [
        torch.randn(4, 3000, 1, generator=gen) * 0.02,
        (torch.randn(2, 700, 1, generator=gen)).to(torch.bfloat16),
        (torch.randn(1, 5000, 1, generator=gen) * 0.1).to(torch.float16),
        torch.randn(3, 64, 2, generator=gen),  # vectors: k-means++ and Lloyd
        torch.randn(2, 9, 1, generator=gen).double(),  # float64: the exact path
    ]
    ks = [16, 4, 256, 8, 3]
    ws = [None, torch.rand(2, 700, generator=gen), None, None, None]
    got = kmeans_many(xs, ks, ws)
    for x, k, w, r in zip(xs, ks, ws, got):
        want = kmeans(x, k, w)
        assert torch.equal(r.labels, want.labels)
        assert torch.equal(r.centroids, want.centroids)
        assert torch.equal(r.inertia, want.inertia)
    # no LUT groups at all: empty results, on either path
    for x in (torch.zeros(0, 5, 1), torch.zeros(0, 5, 1).double()):
        (r,) = kmeans_many([x], [4])
        assert r.labels.shape == (0, 5) and r.centroids.shape == (0, 4, 1)
    # all or nothing: one bad tensor fails the call
    bad = xs[2].clone()
    bad[0, 10, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        kmeans_many([xs[0], bad], [4, 4])
    with pytest.raises(ValueError, match="one per tensor"):
        kmeans_many(xs[:2], [4])
    with pytest.raises(ValueError, match=r"expected \[G, N, d\]"):
        kmeans_many([torch.zeros(3, 4)], [2])


def test_weighted_zero_weights_never_nan():
    x = torch.randn(2, 1000, generator=torch.Generator().manual_seed(6))
    w = torch.rand(2, 1000)
    w[:, ::3] = 0.0
    w[1] = 0.0  # a group with no weight at all
    for exact in (False, True):
        r = kmeans_1d(x, 8, w, exact=exact)
        assert torch.isfinite(r.centroids).all()
        assert torch.isfinite(r.inertia).all()


# The paths that run the torch program: float64 input, and (as on CUDA) fp32 without the fused
# CPU kernels, in exact and fast mode; "fused" is the compiled CPU kernel they must agree with.
_ZERO_WEIGHT_PATHS = ["float64", "torch-exact", "torch-fast", "fused-exact", "fused-fast"]


def _run_path(monkeypatch, path, x, k, w):
    import lightning_palettize.kmeans as km

    if path.startswith("torch"):
        monkeypatch.setattr(km, "_FUSED_CPU", False)
    xin = x.double() if path == "float64" else x.float()
    return kmeans_1d(xin, k, w, exact=not path.endswith("fast"))


@pytest.mark.parametrize("path", _ZERO_WEIGHT_PATHS)
def test_1d_zero_importances_equal_brute_force(monkeypatch, path):
    """Zero importances let the DP leave empty clusters between real ones; every centroid is
    still its own cluster's mean and empty slots repeat the one before (LUT stays sorted)."""
    # the reviewer's case: the empty slots sit between the two real clusters
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    w = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    r = _run_path(monkeypatch, path, x, 4, w)
    assert r.centroids.tolist() == [[0.0, 0.0, 0.0, 2.0]]
    assert _sse(x, w, r)[0].item() == 0.0
    gen = torch.Generator().manual_seed(8)
    for trial in range(60):
        n = int(torch.randint(2, 10, (1,), generator=gen))
        # multiples of 1/16 below 4: exact in fp16 codes too, so fast mode is exact; ties
        x = torch.round(torch.randn(1, n, generator=gen) * 16).clamp(-63, 63) / 16
        w = torch.rand(1, n, generator=gen) + 0.05  # float32: what the fused kernel reads
        w[torch.rand(1, n, generator=gen) < 0.5] = 0.0
        if trial % 10 == 0:
            w.zero_()
        for k in (2, 3, 4, 6, 8):
            r = _run_path(monkeypatch, path, x, k, w)
            best = _brute_force(x[0].double().numpy(), w[0].double().numpy(), k)
            assert r.inertia[0].item() == pytest.approx(best, rel=1e-9, abs=1e-12), (trial, k)
            assert _sse(x, w, r)[0].item() == pytest.approx(best, rel=1e-9, abs=1e-12), (trial, k)
            assert torch.all(r.centroids[:, 1:] >= r.centroids[:, :-1]), (trial, k)
            assert int(r.labels.max()) < k


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_torch_program_equals_fused_kernel_with_many_zero_weights(monkeypatch, exact):
    """The torch program (float64 input; fp32 on CUDA) and the compiled CPU kernel agree with
    zero importances: every weighted value gets the same centroid and the same error. (Which
    empty-cost slot a weightless value lands in is a tie either may break its own way.)"""
    import lightning_palettize.kmeans as km

    gen = torch.Generator().manual_seed(9)
    for trial in range(40):
        g, n = int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(2, 400, (1,)))
        k = (2, 4, 8, 16, 64)[trial % 5]
        x = torch.randn(g, n, generator=gen)
        if trial % 3 == 0:
            x = torch.round(x * 4) / 4  # duplicates
        w = torch.rand(g, n, generator=gen)
        w[torch.rand(g, n, generator=gen) < 0.6] = 0.0
        if trial % 7 == 0:
            w[0] = 0.0  # a group without weight
        fused = kmeans_1d(x, k, w, exact=exact)
        with monkeypatch.context() as mp:
            mp.setattr(km, "_FUSED_CPU", False)
            refs = [kmeans_1d(x, k, w, exact=exact)]
        if exact:
            refs.append(kmeans_1d(x.double(), k, w, exact=True))
        pos = w > 0
        want = torch.gather(fused.centroids, 1, fused.labels.long())[pos]
        for ref in refs:
            got = torch.gather(ref.centroids, 1, ref.labels.long())[pos]
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(_sse(x, w, ref), _sse(x, w, fused), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(ref.inertia, fused.inertia, rtol=1e-9, atol=1e-11)
            assert torch.all(ref.centroids[:, 1:] >= ref.centroids[:, :-1])


def test_weights_pull_centroids():
    x = torch.tensor([[0.0, 1.0, 2.0, 10.0]])
    heavy = torch.tensor([[1.0, 1.0, 100.0, 1.0]])
    r = kmeans_1d(x, 2, heavy, exact=True)
    # cluster {0, 1, 2} mean is pulled to ~2 by the heavy weight
    assert r.centroids[0, 0].item() == pytest.approx((0 + 1 + 200) / 102)


def test_1d_input_errors():
    with pytest.raises(ValueError, match="rank 2"):
        kmeans_1d(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        kmeans_1d(torch.tensor([[0.0, float("nan")]]), 2)
    with pytest.raises(ValueError, match="k: expected a positive int"):
        kmeans_1d(torch.zeros(1, 3), 0)
    with pytest.raises(ValueError, match="weights: expected shape"):
        kmeans_1d(torch.zeros(1, 3), 2, torch.ones(1, 4))
    with pytest.raises(ValueError, match="non-negative"):
        kmeans_1d(torch.zeros(1, 3), 2, -torch.ones(1, 3))
    with pytest.raises(TypeError, match="floating-point"):
        kmeans_1d(torch.zeros(1, 3, dtype=torch.int64), 2)


def _is_lloyd_fixed_point(x, w, r):
    d = ((x.unsqueeze(2) - r.centroids.unsqueeze(1)) ** 2).sum(-1)  # [G, N, K]
    nearest = d.min(dim=2).values
    assigned = torch.gather(d, 2, r.labels.long().unsqueeze(2)).squeeze(2)
    assert torch.allclose(assigned, nearest, rtol=1e-5, atol=1e-9)
    for g in range(x.shape[0]):
        for c in range(r.centroids.shape[1]):
            mask = r.labels[g].long() == c
            if mask.any() and w[g, mask].sum() > 0:
                mean = (x[g, mask] * w[g, mask, None]).sum(0) / w[g, mask].sum()
                torch.testing.assert_close(r.centroids[g, c], mean, rtol=1e-4, atol=1e-6)


def test_vector_kmeans_converges_and_is_deterministic():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 600, 2, generator=gen)
    w = torch.rand(3, 600, generator=gen) + 0.1
    a = kmeans_vectors(x, 8, w, seed=11)
    b = kmeans_vectors(x, 8, w, seed=11)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    _is_lloyd_fixed_point(x, w, a)
    assert a.centroids.shape == (3, 8, 2) and a.labels.dtype == torch.uint8


def test_vector_kmeans_repairs_empty_clusters():
    # 5 distinct vectors, 8 clusters: every distinct vector gets its own centroid, no NaN
    base = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [-3.0, 2.0]])
    x = base.repeat(40, 1).unsqueeze(0)
    r = kmeans_vectors(x, 8)
    assert torch.isfinite(r.centroids).all()
    assert r.inertia.item() == pytest.approx(0.0, abs=1e-9)


def test_vector_kmeans_close_to_exact_in_1d():
    """On d=1 data Lloyd with k-means++ should land near the exact optimum."""
    x = torch.randn(1, 3000, generator=torch.Generator().manual_seed(8))
    exact = kmeans_1d(x, 8, exact=True).inertia
    vec = kmeans_vectors(x.unsqueeze(-1), 8, n_init=3).inertia
    assert vec.item() <= exact.item() * 1.05


@pytest.fixture
def torch_vectors(monkeypatch):
    """Runs kmeans_vectors through its torch program (what non-CPU devices run)."""

    def run(*args, **kwargs):
        monkeypatch.setattr(km, "_VECTORS_CPU", False)
        try:
            return kmeans_vectors(*args, **kwargs)
        finally:
            monkeypatch.setattr(km, "_VECTORS_CPU", True)

    return run


def _vector_cases():
    gen = torch.Generator().manual_seed(21)
    two_clouds = torch.cat(
        [torch.randn(1, 300, 3, generator=gen) + 4, torch.randn(1, 300, 3, generator=gen)], 1
    )
    zero_w = torch.rand(2, 500, generator=gen)
    zero_w[1] = 0.0  # a group without importance: seeding falls back to uniform draws
    zero_w[0, :250] = 0.0
    return [
        # x, k, weights, n_init
        (torch.randn(3, 600, 2, generator=gen), 8, torch.rand(3, 600, generator=gen) + 0.1, 3),
        (torch.randn(2, 2000, 4, generator=gen), 16, None, 2),
        (two_clouds, 5, None, 4),
        (torch.randn(2, 500, 2, generator=gen), 4, zero_w, 3),
        (torch.randn(1, 5, 2, generator=gen).repeat(1, 40, 1), 8, None, 2),  # 5 distinct, k=8
        (torch.randn(1, 6, 3, generator=gen), 8, None, 1),  # k > N
        (torch.randn(2, 300, 1, generator=gen).half(), 4, None, 2),
    ]


@pytest.mark.parametrize("case", range(7))
def test_vector_kernel_matches_torch_program(case, torch_vectors):
    """The compiled kernel (Hamerly-accelerated Lloyd, every restart on two threads) and the torch
    program (plain Lloyd, full scans) seed alike and converge to the same clustering."""
    x, k, w, n_init = _vector_cases()[case]
    a = kmeans_vectors(x, k, w, n_init=n_init, seed=3)
    b = torch_vectors(x, k, w, n_init=n_init, seed=3)
    if case not in (4, 5):
        torch.testing.assert_close(a.centroids, b.centroids, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.labels, b.labels)
    # else: every restart reaches inertia 0 (fewer distinct vectors than k), and which of them
    # is kept depends on the torch program's float32 rounding of 0
    # the torch program measures |c|^2 - 2 x.c + |x|^2 in float32; the kernel sums exactly
    torch.testing.assert_close(a.inertia, b.inertia, rtol=1e-5, atol=1e-4)
    xd = x.double()
    chosen = torch.gather(a.centroids.double(), 1, a.labels.long().unsqueeze(-1).expand_as(xd))
    sq = ((xd - chosen) ** 2).sum(-1) * (1.0 if w is None else w.double())
    torch.testing.assert_close(a.inertia, sq.sum(1), rtol=1e-6, atol=1e-9)
    assert a.labels.dtype == b.labels.dtype == torch.uint8 and a.centroids.dtype == torch.float32


@pytest.mark.parametrize("weighted", [False, True])
def test_vector_kernel_seeding_matches_kmeanspp(weighted):
    """max_iter=0 returns the k-means++ seeds: equal to the torch seeding from the same uniforms."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 400, 3, generator=gen)
    w = torch.rand(3, 400, generator=gen) if weighted else torch.ones(3, 400)
    k = 12
    u = torch.rand(3, 1, k, generator=gen, dtype=torch.float64)
    cent = torch.empty(3, k, 3)
    labels = torch.empty(3, 400, dtype=torch.uint8)
    inertia = torch.full((3,), float("inf"), dtype=torch.float64)
    wn = w.numpy() if weighted else None
    km._kmeansvec.run(
        x.numpy(),
        wn,
        u.numpy(),
        3,
        k,
        1,
        0,
        0.0,
        cent.numpy(),
        labels.numpy(),
        inertia.numpy(),
        0,
        3,
    )
    assert torch.equal(cent, km._kmeanspp(x, k, w, u[:, 0]))
    d = ((x.unsqueeze(2) - cent.unsqueeze(1)) ** 2).sum(-1)
    assert torch.equal(labels.long(), d.argmin(dim=2))
    torch.testing.assert_close(
        inertia, (d.min(dim=2).values * w).sum(1).double(), rtol=1e-5, atol=0
    )


def test_vector_kernel_is_lloyd_at_every_iteration(torch_vectors):
    """Hamerly's bounds skip only vectors that cannot move: with the stopping rule off, after
    each iteration count every vector sits at its nearest centroid (checked in float64), and the
    run follows the torch program's plain Lloyd (which differs only in float32 near ties)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3000, 3, generator=gen)
    for iters in (1, 2, 5, 20, 60):
        a = kmeans_vectors(x, 16, n_init=1, max_iter=iters, tol=-1.0)
        d = ((x.double().unsqueeze(2) - a.centroids.double().unsqueeze(1)) ** 2).sum(-1)
        own = torch.gather(d, 2, a.labels.long().unsqueeze(2)).squeeze(2)
        assert bool((own <= d.min(dim=2).values * (1 + 1e-5) + 1e-9).all()), iters
        b = torch_vectors(x, 16, n_init=1, max_iter=iters, tol=-1.0)
        assert (a.labels == b.labels).double().mean() > 0.999, iters
        torch.testing.assert_close(a.centroids, b.centroids, rtol=1e-3, atol=1e-3)


def test_vector_restarts_keep_the_best(monkeypatch):
    """Restarts run split over two threads; each group keeps its lowest-inertia restart."""
    monkeypatch.setattr(km, "_RESTART_BUDGET", 0)  # exactly n_init restarts
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(3, 2000, 2, generator=gen)
    best = kmeans_vectors(x, 8, n_init=4, seed=1)
    u = torch.rand(3, 4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    singles = []
    for r in range(4):  # each restart alone, from the same uniforms
        cent = torch.empty(3, 8, 2)
        labels = torch.empty(3, 2000, dtype=torch.uint8)
        inertia = torch.full((3,), float("inf"), dtype=torch.float64)
        args = (x.numpy(), None, u[:, r : r + 1].contiguous().numpy(), 2, 8, 1, 100, 1e-6)
        km._kmeansvec.run(*args, cent.numpy(), labels.numpy(), inertia.numpy(), 0, 3)
        singles.append(inertia)
    assert torch.equal(best.inertia, torch.stack(singles).min(dim=0).values)


def test_small_vector_problems_get_more_restarts(monkeypatch):
    """Under the work budget, more restarts than n_init run (never a worse result); large
    problems run exactly n_init."""
    x = torch.randn(1, 200, 2, generator=torch.Generator().manual_seed(3))
    seeds = []
    real = km._kmeans_vectors_cpu
    monkeypatch.setattr(
        km,
        "_kmeans_vectors_cpu",
        lambda x, k, w, u, *a: seeds.append(u.shape[1]) or real(x, k, w, u, *a),
    )
    boosted = kmeans_vectors(x, 16, n_init=1)
    monkeypatch.setattr(km, "_RESTART_BUDGET", 0)
    plain = kmeans_vectors(x, 16, n_init=1)
    assert seeds == [km._MAX_RESTARTS, 1]
    assert boosted.inertia.item() <= plain.inertia.item()
    big = torch.randn(1, 1 << 16, 2)
    monkeypatch.setattr(km, "_RESTART_BUDGET", 1 << 20)
    kmeans_vectors(big, 16, n_init=2, max_iter=1)
    assert seeds[-1] == 2


def test_vector_kernel_rejects_inconsistent_buffers():
    x = torch.zeros(2, 10, 2)
    out = (
        torch.empty(2, 4, 2).numpy(),
        torch.empty(2, 10, dtype=torch.uint8).numpy(),
        torch.empty(2, dtype=torch.float64).numpy(),
    )
    u = torch.rand(2, 1, 4, dtype=torch.float64).numpy()
    with pytest.raises(ValueError, match="inconsistent"):
        km._kmeansvec.run(x.numpy(), None, u, 3, 4, 1, 10, 0.0, *out, 0, 2)  # wrong d
    with pytest.raises(ValueError, match="inconsistent"):
        km._kmeansvec.run(x.numpy(), None, u, 2, 4, 1, 10, 0.0, *out, 0, 3)  # job past the end


def test_dispatch_shapes():
    x = torch.randn(2, 100, 1)
    assert kmeans(x, 4).centroids.shape == (2, 4, 1)
    assert kmeans(torch.randn(2, 100, 3), 4).centroids.shape == (2, 4, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randn(4, 10000) * 0.02
    cpu = kmeans_1d(x, 16)
    gpu = kmeans_1d(x.cuda(), 16)
    torch.testing.assert_close(gpu.centroids.cpu(), cpu.centroids)
    assert torch.equal(gpu.labels.cpu(), cpu.labels)
    v = kmeans_vectors(torch.randn(2, 500, 2).cuda(), 4)
    assert v.centroids.is_cuda and torch.isfinite(v.centroids).all()


@pytest.mark.parametrize("exact", [False, True])
def test_1d_kmeans_takes_tensors_that_require_grad(exact):
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(4))
    w = torch.rand(2, 300, generator=torch.Generator().manual_seed(5))
    a = kmeans_1d(x.clone().requires_grad_(), 4, w.clone().requires_grad_(), exact=exact)
    b = kmeans_1d(x, 4, w, exact=exact)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)


def test_vector_kmeans_takes_tensors_that_require_grad():
    x = torch.randn(2, 300, 2, generator=torch.Generator().manual_seed(4))
    w = torch.rand(2, 300, generator=torch.Generator().manual_seed(5))
    a = kmeans_vectors(x.clone().requires_grad_(), 4, w.clone().requires_grad_())
    b = kmeans_vectors(x, 4, w)
    assert torch.equal(a.centroids, b.centroids) and not a.centroids.requires_grad


def test_vector_kmeans_edge_inputs():
    """Weights finite in float64 but not in float32 are refused (the kernels read float32);
    empty shapes are refused; distances that overflow float32 still give data-derived results."""
    x = torch.randn(1, 40, 2, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="finite"):
        kmeans_vectors(x, 4, torch.full((1, 40), 1e39, dtype=torch.float64))
    with pytest.raises(ValueError, match="G >= 1 and d >= 1"):
        kmeans_vectors(torch.zeros(0, 5, 2), 4)
    with pytest.raises(ValueError, match="G >= 1 and d >= 1"):
        kmeans_vectors(torch.zeros(2, 5, 0), 4)
    big = torch.randn(2, 40, 2, generator=torch.Generator().manual_seed(2)) * 1e20
    r = kmeans_vectors(big, 4)
    assert int(r.labels.max()) < 4
    # every centroid is one of the vectors or a mean of them: inside the data's box
    lo, hi = big.amin(dim=1, keepdim=True), big.amax(dim=1, keepdim=True)
    finite = torch.isfinite(r.centroids)
    assert bool(((r.centroids >= lo) & (r.centroids <= hi) | ~finite).all())
