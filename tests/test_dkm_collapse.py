"""repair_collapsed_centroids: coremltools' palett_cluster_tol rule (non-unique centroids),
vectorized and without host reads, against a direct port of coremltools' per-partition loop."""

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_palettize.palettizers._collapse import repair_collapsed_centroids

# small tensors: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _coremltools(centroids, tol):
    """coremltools' FakePalettize loop (training forward, under no_grad), one partition at a
    time, on a copy of a [G, K, d] tensor."""
    out = centroids.clone()
    k = out.shape[1]
    for g in range(out.shape[0]):
        c_i = out[g]
        cur_clusters, cur_inverse, cur_counts = torch.unique(
            c_i.float(), dim=0, return_inverse=True, return_counts=True
        )
        cur_n_clusters = len(cur_clusters)
        if cur_n_clusters < k * (1 - tol):
            for j, count in enumerate(cur_counts):
                if count > 1:
                    new_centroid = 0.5 * (cur_clusters[j] + cur_clusters[(j + 1) % cur_n_clusters])
                    c_i[cur_inverse.tolist().index(j)] = new_centroid
    return out


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int64)


def _same_bits(a, b):
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _group(gen, k, d, kind):
    """One [K, d] group. kind: 'one' (a single distinct value), 'dups' (a few distinct rows
    repeated), 'ties' (rows from a tiny value set: many equal columns, lexicographic ties),
    'top' (the largest value duplicated: the midpoint wraps to the smallest), 'unique'."""
    if kind == "unique":
        return torch.randn(k, d, generator=gen)
    if kind == "one":
        return torch.randn(1, d, generator=gen).expand(k, d).clone()
    if kind == "ties":
        vals = torch.tensor([-1.5, 0.25, 2.0])
        return vals[torch.randint(0, 3, (k, d), generator=gen)]
    n_pool = int(torch.randint(1, max(2, k // 2) + 1, (1,), generator=gen))
    pool = torch.randn(n_pool, d, generator=gen)
    rows = pool[torch.randint(0, n_pool, (k,), generator=gen)]
    if kind == "top":
        top = max(range(n_pool), key=lambda i: pool[i].tolist())  # lexicographic max
        idx = torch.randperm(k, generator=gen)[:2]
        rows[idx] = pool[top]
    return rows


KINDS = ("one", "dups", "ties", "top", "unique")
TOLS = (0.0, 0.3, 0.5, 0.99)


def _tensor(gen, g, k, d, kinds=KINDS):
    picks = torch.randint(0, len(kinds), (g,), generator=gen).tolist()
    return torch.stack([_group(gen, k, d, kinds[p]) for p in picks])


@pytest.mark.parametrize("d", [1, 2, 4])
@pytest.mark.parametrize("k", [2, 4, 16])
@pytest.mark.parametrize("tol", TOLS)
def test_matches_coremltools_loop(d, k, tol):
    gen = torch.Generator().manual_seed(1000 * d + 10 * k + int(100 * tol))
    tensors = [_tensor(gen, g, k, d) for g in (1, 3, 7, 12)]
    expected = [_coremltools(t, tol) for t in tensors]
    repair_collapsed_centroids(tensors, tol)
    for got, want in zip(tensors, expected):
        assert _same_bits(got, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [1, 2, 4])
def test_each_kind_of_group(kind, d):
    gen = torch.Generator().manual_seed(len(kind) * 7 + d)
    for k in (2, 4, 16):
        for tol in TOLS:
            t = _tensor(gen, 9, k, d, kinds=(kind,))
            want = _coremltools(t, tol)
            repair_collapsed_centroids([t], tol)
            assert _same_bits(t, want), (kind, k, d, tol)


def test_hand_cases():
    def run(rows, tol=0.0):
        t = torch.tensor(rows, dtype=torch.float32).reshape(1, len(rows), -1)
        want = _coremltools(t, tol)
        repair_collapsed_centroids([t], tol)
        assert _same_bits(t, want)
        return t.reshape(len(rows), -1).tolist()

    # the first copy (lowest index) moves half-way to the next larger distinct value
    assert run([0.0, 1.0, 1.0, 3.0]) == [[0.0], [2.0], [1.0], [3.0]]
    # duplicated largest value: the midpoint wraps around to the smallest
    assert run([3.0, 1.0, 3.0, 3.0]) == [[2.0], [1.0], [3.0], [3.0]]
    # several duplicated values, each moved from the values before the update
    assert run([5.0, 1.0, 5.0, 1.0]) == [[3.0], [3.0], [5.0], [1.0]]
    # a single distinct value: nothing changes
    assert run([2.5, 2.5, 2.5, 2.5]) == [[2.5]] * 4
    # d = 2: lexicographic order of rows ([1, 9] < [2, 0]), first copy of [1, 9] moves
    assert run([[2.0, 0.0], [1.0, 9.0], [1.0, 9.0], [4.0, 4.0]]) == [
        [2.0, 0.0],
        [1.5, 4.5],
        [1.0, 9.0],
        [4.0, 4.0],
    ]
    # threshold: n < K * (1 - tol), strict. K = 4, n = 3 distinct
    moved = [[0.0], [2.0], [1.0], [3.0]]
    assert run([0.0, 1.0, 1.0, 3.0], tol=0.2) == moved  # 3 < 3.2
    assert run([0.0, 1.0, 1.0, 3.0], tol=0.25) == [[0.0], [1.0], [1.0], [3.0]]  # 3 < 3.0: no
    assert run([0.0, 1.0, 1.0, 3.0], tol=0.3) == [[0.0], [1.0], [1.0], [3.0]]


def test_threshold_float_rounding_like_python():
    # K * (1 - tol) in Python floats: 10 * (1 - 0.7) = 3.0000000000000004 > 3, so n = 3 moves
    # (0.7 in binary), while 16 * (1 - 0.8125) = 3.0 exactly does not
    for k, tol, n_distinct in [(10, 0.7, 3), (16, 0.8125, 3), (16, 0.5, 7), (16, 0.5, 8)]:
        rows = torch.cat([torch.arange(n_distinct - 1.0), torch.full((k - n_distinct + 1,), 50.0)])
        t = rows[torch.randperm(k, generator=torch.Generator().manual_seed(k))].view(1, k, 1)
        want = _coremltools(t, tol)
        before = t.clone()
        repair_collapsed_centroids([t], tol)
        assert _same_bits(t, want)
        assert torch.equal(t, before) == (not n_distinct < k * (1 - tol))


def test_unique_groups_and_high_tol_are_bit_identical():
    gen = torch.Generator().manual_seed(3)
    fresh = [torch.randn(g, 16, d, generator=gen) for g, d in [(4, 1), (2, 2), (5, 4)]]
    # no duplicates at all
    before = [t.clone() for t in fresh]
    repair_collapsed_centroids(fresh, 0.0)
    assert all(_same_bits(a, b) for a, b in zip(fresh, before))
    # duplicates, but tol too high to act (16 * (1 - 0.99) = 0.16)
    dup = [_tensor(gen, 6, 16, d, kinds=("dups", "top")) for d in (1, 2)]
    before = [t.clone() for t in dup]
    repair_collapsed_centroids(dup, 0.99)
    assert all(_same_bits(a, b) for a, b in zip(dup, before))
    # in one call with a tensor that does change, the others keep their bits
    gen = torch.Generator().manual_seed(4)
    mixed = [torch.randn(3, 16, 1, generator=gen), _tensor(gen, 3, 16, 1, kinds=("dups",))]
    before = [t.clone() for t in mixed]
    repair_collapsed_centroids(mixed, 0.0)
    assert _same_bits(mixed[0], before[0])
    assert not torch.equal(mixed[1], before[1])


def test_mixed_shapes_and_per_tensor_tol_in_one_call():
    gen = torch.Generator().manual_seed(11)
    shapes = [(2, 16, 1), (5, 4, 1), (1, 16, 1), (3, 4, 2), (4, 16, 4), (6, 2, 1), (2, 4, 2)]
    tols = [0.0, 0.3, 0.5, 0.99, 0.0, 0.3, 0.5]
    tensors = [_tensor(gen, g, k, d) for g, k, d in shapes]
    expected = [_coremltools(t, tol) for t, tol in zip(tensors, tols)]
    repair_collapsed_centroids(tensors, tols)
    for got, want in zip(tensors, expected):
        assert _same_bits(got, want)
    # same (K, d), different tol in one batch
    tensors = [_tensor(gen, 4, 16, 1, kinds=("dups", "top")) for _ in range(6)]
    tols = [0.0, 0.5, 0.3, 0.99, 0.0, 0.9]
    expected = [_coremltools(t, tol) for t, tol in zip(tensors, tols)]
    repair_collapsed_centroids(tensors, tols)
    for got, want in zip(tensors, expected):
        assert _same_bits(got, want)


def test_in_place_on_module_buffers_under_no_grad():
    gen = torch.Generator().manual_seed(5)
    mod = nn.Module()
    for i, (g, k, d) in enumerate([(3, 16, 1), (2, 4, 2), (1, 16, 1)]):
        mod.register_buffer(f"c{i}", _tensor(gen, g, k, d, kinds=("dups", "top")))
    bufs = list(mod.buffers())
    ptrs = [b.data_ptr() for b in bufs]
    expected = [_coremltools(b, 0.0) for b in bufs]
    with torch.no_grad():
        repair_collapsed_centroids(bufs, 0.0)
    assert [b.data_ptr() for b in mod.buffers()] == ptrs
    assert all(a is b for a, b in zip(mod.buffers(), bufs))
    for got, want in zip(mod.buffers(), expected):
        assert _same_bits(got, want)


def test_parameters_and_non_contiguous_views():
    gen = torch.Generator().manual_seed(6)
    p = nn.Parameter(_tensor(gen, 4, 16, 1, kinds=("dups",)))
    want = _coremltools(p.detach(), 0.0)
    repair_collapsed_centroids([p], 0.0)  # no torch.no_grad() around it: it takes care
    assert p.requires_grad and _same_bits(p.detach(), want)
    # a strided view ([G, K, d] out of a [K, G, d] buffer) is written through
    base = _tensor(gen, 5, 16, 2, kinds=("dups", "ties")).transpose(0, 1).contiguous()
    v = base.transpose(0, 1)  # [5, 16, 2], not contiguous
    assert not v.is_contiguous()
    want = _coremltools(v, 0.0)
    assert not torch.equal(want, v)  # something to write
    repair_collapsed_centroids([v, _tensor(gen, 2, 16, 2)], 0.0)
    assert v.data_ptr() == base.data_ptr()
    assert _same_bits(base.transpose(0, 1).contiguous(), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes(dtype):
    gen = torch.Generator().manual_seed(7)
    tensors = [_tensor(gen, 5, k, d).to(dtype) for k, d in [(16, 1), (4, 2)]]
    expected = [_coremltools(t, 0.0) for t in tensors]
    repair_collapsed_centroids(tensors, 0.0)
    for got, want in zip(tensors, expected):
        assert got.dtype == dtype
        assert torch.equal(got, want)


def test_signed_zeros_count_as_equal_and_keep_their_bits():
    # -0.0 == 0.0 (as in torch.unique): one value with 3 copies; the first copy moves
    t = torch.tensor([[[0.0], [-0.0], [1.0], [-0.0]]])
    repair_collapsed_centroids([t], 0.0)
    assert t.flatten().tolist() == [0.5, 0.0, 1.0, 0.0]
    assert torch.signbit(t.flatten()).tolist() == [False, True, False, True]
    # a single distinct value: unchanged, signs included
    t = torch.tensor([[[-0.0], [0.0], [0.0], [-0.0]]])
    repair_collapsed_centroids([t], 0.0)
    assert torch.signbit(t.flatten()).tolist() == [True, False, False, True]


def test_nan_is_never_a_duplicate():
    nan = float("nan")
    t = torch.tensor([[[nan], [1.0], [nan], [0.0], [0.0], [nan], [2.0], [3.0]]])
    repair_collapsed_centroids([t], 0.0)
    got = t.flatten()
    assert torch.isnan(got[[0, 2, 5]]).all()  # NaNs stay
    assert got[[1, 4, 6, 7]].tolist() == [1.0, 0.0, 2.0, 3.0]
    assert got[3].item() == 0.5  # the first 0.0 moves half-way to 1.0


def test_empty_and_trivial_inputs():
    repair_collapsed_centroids([], 0.0)
    repair_collapsed_centroids([], [])
    e = torch.empty(0, 16, 1)
    one = torch.ones(3, 1, 1)  # K = 1: nothing to spread
    repair_collapsed_centroids([e, one], [0.0, 0.0])
    assert e.shape == (0, 16, 1) and torch.equal(one, torch.ones(3, 1, 1))


def test_errors():
    c = torch.zeros(1, 4, 1)
    with pytest.raises(ValueError, match=">= 0"):
        repair_collapsed_centroids([c], -0.1)
    with pytest.raises(ValueError, match=">= 0"):
        repair_collapsed_centroids([c], math.nan)
    with pytest.raises(ValueError, match="tol values"):
        repair_collapsed_centroids([c, c], [0.0])
    with pytest.raises(ValueError, match=r"\[G, K, d\]"):
        repair_collapsed_centroids([torch.zeros(4, 1)], 0.0)
    with pytest.raises(TypeError, match="float"):
        repair_collapsed_centroids([torch.zeros(1, 4, 1, dtype=torch.int32)], 0.0)
    with pytest.raises(TypeError, match="tensors"):
        repair_collapsed_centroids([[0.0, 1.0]], 0.0)
    with pytest.raises(TypeError, match="tol"):
        repair_collapsed_centroids([c], "0.1")


class _Ops(TorchDispatchMode):
    """Counts the aten ops, and fails on those that read device memory back to the host."""

    READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.unique", "aten._unique")

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        assert not name.startswith(self.READS), f"host read: {name}"
        self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_no_host_reads(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    tensors = [_tensor(gen, g, k, d) for g, k, d in [(3, 16, 1), (2, 4, 2), (4, 16, 4)]]
    tensors += [_tensor(gen, 2, 16, 1) for _ in range(3)]
    tols = [0.0, 0.3, 0.0, 0.5, 0.0, 0.0]  # two thresholds in the (16, 1) batch: a row tensor
    expected = [_coremltools(t, tol) for t, tol in zip(tensors, tols)]

    def fail(*args, **kwargs):
        raise AssertionError("host read")

    for name in ("item", "tolist", "__bool__", "nonzero", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, fail)
    monkeypatch.setattr(torch, "nonzero", fail)
    monkeypatch.setattr(torch, "unique", fail)
    with _Ops():
        repair_collapsed_centroids(tensors, tols)
    monkeypatch.undo()
    for got, want in zip(tensors, expected):
        assert _same_bits(got, want)


def _count_ops(tensors, tol=0.0):
    with _Ops() as mode:
        repair_collapsed_centroids(tensors, tol)
    return mode.ops


@pytest.mark.parametrize("k,d", [(16, 1), (4, 2), (16, 4)])
def test_op_count_does_not_grow_with_the_number_of_tensors(k, d):
    few = _count_ops([torch.zeros(1, k, d) for _ in range(2)])
    many = _count_ops([torch.zeros(1, k, d) for _ in range(85)])
    assert few == many
    # mixed tols in the batch: the same ops plus the row thresholds (made on the host)
    mixed = _count_ops([torch.zeros(3, k, d) for _ in range(85)], [0.0, 0.5] * 42 + [0.0])
    assert len(mixed) <= len(many) + 2
    # views (no kernel) aside, about 20 ops per batch for d == 1, 3 more per extra column
    views = ("aten.view", "aten.slice", "aten.select", "aten.unsqueeze", "aten.expand")
    compute = [op for op in many if not op.startswith(views + ("aten.split",))]
    assert len(compute) <= 20 + 3 * (d - 1), compute


def test_dkm_applies_the_rule_at_prepare_and_at_every_step():
    # wiring: DKMPalettizer repairs the initial centroids (milestone 0) and the centroids after
    # each step() by palett_cluster_tol, as coremltools does before each training forward
    from lightning_palettize import DKMPalettizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():  # 3 distinct values for 8 centroids: the exact k-means repeats some
        model[0].weight.copy_(torch.randint(-1, 2, (8, 8)) * 0.5)

    def prepared(tol):
        cfg = {"n_bits": 3, "weight_threshold": 0, "palett_cluster_tol": tol}
        pal = DKMPalettizer(model, {"global_config": cfg})
        return pal, pal.prepare()

    _, tolerant = prepared(0.9)  # 3 >= 8 * 0.1: left as the k-means gave them
    initial = tolerant[0].weight_dkm.centroids.clone()
    assert len(torch.unique(initial)) == 3
    pal, strict = prepared(0.0)
    cent = strict[0].weight_dkm.centroids
    assert _same_bits(cent, _coremltools(initial, 0.0))
    assert not _same_bits(cent, initial)
    with torch.no_grad():
        cent.copy_(initial)  # collapsed again: the next step() repairs them
    pal.step()
    assert _same_bits(cent, _coremltools(initial, 0.0))


def test_a_plan_runs_the_rule_again_on_the_same_buffers():
    from lightning_palettize.palettizers._collapse import plan_repair

    gen = torch.Generator().manual_seed(3)
    tensors = [_tensor(gen, 3, 8, 1), _tensor(gen, 2, 8, 2), _tensor(gen, 4, 4, 1)]
    want = [t.clone() for t in tensors]
    plan = plan_repair(tensors, [0.0, 0.3, 0.0])
    for _ in range(3):  # the rule moves one duplicate per value per call: several calls differ
        for w, tol in zip(want, [0.0, 0.3, 0.0]):
            w.copy_(_coremltools(w, tol))
        plan.run()
        assert all(_same_bits(t, w) for t, w in zip(tensors, want))


def test_dkm_steps_reuse_one_repair_plan(monkeypatch):
    from lightning_palettize import DKMPalettizer
    from lightning_palettize.palettizers import _collapse, dkm

    calls = []
    real = _collapse.plan_repair
    monkeypatch.setattr(dkm, "plan_repair", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(dkm, "_REPAIR_PLAN", [None, None])
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    pal = DKMPalettizer(model, {"global_config": {"n_bits": 2, "weight_threshold": 0}})
    pal.prepare(inplace=True)
    for _ in range(3):
        model(torch.randn(2, 16)).sum().backward()
        pal.step()
    assert len(calls) == 1  # prepare's; the steps run the same plan
    fp = model[0].weight_dkm
    collapsed = torch.zeros_like(fp.centroids)
    collapsed[0, :, 0] = torch.tensor([0.0, 1.0, 1.0, 3.0])
    fp._buffers["centroids"] = collapsed  # a new buffer object: a new plan that repairs it
    pal.step()
    assert len(calls) == 2
    assert fp.centroids.flatten().tolist() == [0.0, 2.0, 1.0, 3.0]
