"""The fused Triton kernels of the scalar engine (lightning_palettize/_dkm_triton.py): the same
per-group iterations, early stopping, output and backward as the compiled CPU loop
(_dkm_cpu.fwd_loop / bwd_loop) and the torch code. On CUDA the compiled kernels; without a GPU
(CI) the device layout on the CPU with the kernels in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 there)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_soft_kmeans import (
    _HostReads,
    assert_close,
    fp16_ste,
    make_data,
    run_batch,
)

from lightning_palettize import DKMPalettizer
from lightning_palettize import soft_kmeans as sk

triton = pytest.importorskip("triton")
needs_c = pytest.mark.skipif(sk._dkm_cpu is None, reason="compiled CPU kernels not built")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def kernels():
    """lightning_palettize._dkm_triton, where its kernels can run: CUDA, or the interpreter."""
    if DEV.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and Triton's interpreter is off")
    mod = sk._triton()
    if mod is None:
        pytest.skip("lightning_palettize._dkm_triton does not import")
    return mod


class _Launches:
    """Counts the calls of the module's fwd_loop / bwd_loop."""

    def __init__(self, mod, monkeypatch):
        self.fwd = self.bwd = 0
        fwd, bwd = mod.fwd_loop, mod.bwd_loop

        def counted_fwd(*a, **k):
            self.fwd += 1
            return fwd(*a, **k)

        def counted_bwd(*a, **k):
            self.bwd += 1
            return bwd(*a, **k)

        monkeypatch.setattr(mod, "fwd_loop", counted_fwd)
        monkeypatch.setattr(mod, "bwd_loop", counted_bwd)


@pytest.fixture
def triton_layout(kernels, monkeypatch):
    """The device layout with the Triton kernels on DEV (on the CPU: the layout a GPU gets);
    returns their launch counter. The torch code is this layout with ``_TRITON_DEVICES``
    emptied."""
    if DEV.type == "cpu":
        monkeypatch.setattr(sk, "_sync_free", lambda device: True)
        monkeypatch.setattr(sk, "_host_layout", lambda device: False)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    monkeypatch.setattr(sk, "_TRITON_DEVICES", frozenset({DEV.type}))
    return _Launches(kernels, monkeypatch)


@pytest.mark.parametrize("failing", ["fwd_loop", "bwd_loop"])
def test_a_kernel_that_fails_to_build_falls_back_to_the_torch_code(
    failing, kernels, triton_layout, monkeypatch
):
    # a Triton that cannot build a kernel here: one warning, then the torch code (for the
    # backward, from the kernel forward's iterations), the same results; later calls skip
    # the kernels
    monkeypatch.setattr(sk, "_triton_kernels", kernels)  # (restored after the test)

    def broken(*a, **k):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(kernels, failing, broken)
    xs, cs = small_batch()
    ws = weights(xs)
    kw = dict(method="table", max_iter=8, epsilon=1e-7)
    with pytest.warns(RuntimeWarning, match="Triton DKM kernels failed.*PTX assembly failed"):
        got = run_batch(xs, cs, ws, **kw)
    assert sk._triton() is None
    # the forward kernels ran (every segment) when it is the backward that fails
    assert (triton_layout.fwd > 0) == (failing == "bwd_loop")
    monkeypatch.setattr(sk, "_TRITON_DEVICES", frozenset())
    want = run_batch(xs, cs, ws, **kw)
    for a, b in zip(got, want):
        assert_close(a[0], b[0], 1e-5, 1e-6)
        assert_close(a[1], b[1], 1e-5, 1e-5)
        assert_close(a[2], b[2], 1e-4, 1e-5)


def small_batch():
    """batch_inputs' kinds at sizes the interpreter runs quickly: table tensors (G = 1 and 2),
    exact ones, widths in several device segments."""
    shapes = [(1, 6000, True), (2, 3000, True), (1, 900, False), (3, 300, False), (1, 40, False)]
    xs, cs = [], []
    for i, (g, n, exact16) in enumerate(shapes):
        x, c0 = make_data(g, n, 1, seed=60 + i, fp16_exact=exact16, zeros=0.05)
        xs.append(x.to(DEV))
        cs.append(c0.to(DEV))
    return xs, cs


def weights(xs, ones: bool = False):
    """The output weights of run_batch's loss, one per tensor."""
    return [
        torch.ones_like(x)
        if ones
        else torch.randn(x.shape, generator=torch.Generator().manual_seed(i)).to(DEV)
        for i, x in enumerate(xs)
    ]


VARIANTS = {
    "dkm": {},
    "enforce_zero": dict(enforce_zero=True),
    "clamp": dict(clamp_attention=True, tau=1e-3),
    "prune": dict(prune_threshold=2e-5),
    "early_stop": dict(max_iter=8, epsilon=1e-7),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_triton_kernels_equal_the_torch_code(variant, triton_layout, monkeypatch):
    # outputs, centroids and gradients of every tensor as the device layout's torch code gives
    # them, from one fwd_loop and one bwd_loop launch per segment
    kw = VARIANTS[variant]
    xs, cs = small_batch()
    ws = weights(xs)
    got = run_batch(xs, cs, ws, method="table", **kw)
    assert triton_layout.fwd > 0 and triton_layout.bwd == triton_layout.fwd
    monkeypatch.setattr(sk, "_TRITON_DEVICES", frozenset())
    want = run_batch(xs, cs, ws, method="table", **kw)
    for a, b in zip(got, want):
        assert_close(a[0], b[0], 1e-5, 1e-6)
        assert_close(a[1], b[1], 1e-5, 1e-5)
        assert_close(a[2], b[2], 1e-4, 1e-5)


def test_split_rows_in_the_engine_equal_one_program_per_row(kernels, triton_layout, monkeypatch):
    # the batch through soft_kmeans_batch with its longer code rows split over programs
    # (_SPLIT_CODES 1,024: rows of 1,025+ codes split, shorter ones not): the outputs,
    # centroids and gradients of one program per row, early stopping per group included
    xs, cs = small_batch()
    ws = weights(xs)
    kw = dict(method="table", max_iter=8, epsilon=1e-7)
    want = run_batch(xs, cs, ws, **kw)
    split = []
    fwd_loop = kernels.fwd_loop

    def spy(v, *args):
        split.append(kernels._split(v.shape[1]))
        return fwd_loop(v, *args)

    monkeypatch.setattr(kernels, "fwd_loop", spy)
    monkeypatch.setattr(kernels, "_SPLIT_CODES", 1024)
    got = run_batch(xs, cs, ws, **kw)
    assert 1024 in split, split  # (the premise: some segment was split)
    for a, b in zip(got, want):
        assert_close(a[0], b[0], 1e-6, 1e-7)
        assert_close(a[1], b[1], 1e-6, 1e-6)
        assert_close(a[2], b[2], 1e-5, 1e-6)


@pytest.mark.parametrize("kw", [dict(mode="hard"), dict(mode="gsm"), dict(lut_fn=fp16_ste)])
def test_configurations_outside_the_kernels_run_the_torch_code(kw, triton_layout, monkeypatch):
    # modes with other attention (one-hot, Gumbel noise) and LUT functions: the torch code
    xs, cs = small_batch()
    ws = weights(xs, ones=True)

    def go():
        gen = torch.Generator(DEV).manual_seed(0) if kw.get("mode") == "gsm" else None
        return run_batch(xs, cs, ws, generator=gen, **kw)

    got = go()
    assert triton_layout.fwd == triton_layout.bwd == 0
    monkeypatch.setattr(sk, "_TRITON_DEVICES", frozenset())
    want = go()
    for a, b in zip(got, want):
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def _segment(
    seed: int, cfg: sk._Cfg, scale: float = 1.0, g: int = 4, u: int = 700, ragged: bool = True
):
    """A segment as the engine builds it: per-row code values (sorted) and masses, ragged
    rows (zero mass past each row's codes) unless ``ragged`` is False, k-means++-like
    centroids; rows 0 and 2 start at their converged centroids, so the early-stopping test
    stops them before the others."""
    gen = torch.Generator().manual_seed(seed)
    v = (0.02 * scale * torch.randn(g, u, generator=gen)).sort(1).values
    v[:, u // 3 : u // 3 + 5] = 0.0  # codes that are exact zeros
    m = torch.randint(1, 50, (g, u), generator=gen).float()
    if ragged:
        m[1, u // 2 :] = 0.0
    c = v[:, torch.linspace(5, u - 5, 16).long()].clone()
    cfg = dataclasses.replace(cfg, max_iter=30, epsilon=-1.0)
    for row in (0, 2):  # 30 iterations in: moves below float32 precision
        rows = slice(row, row + 1)
        c[row] = sk._scalar_forward(v[rows], m[rows], c[rows], cfg, False)[1][0]
    return v, m, c


def _cfg(**kw) -> sk._Cfg:
    base = dict(
        tau=2e-7,  # the data's squared centroid gaps are ~1e-5
        max_iter=6,
        epsilon=1e-5,  # rows 0 and 2 move their inertia by < 1e-6, the others by > 3e-4
        mode="dkm",
        enforce_zero=False,
        prune_threshold=0.0,
        zero_threshold=1e-7,
        lut_fn=None,
        clamp_attention=False,
    )
    base.update(kw)
    return sk._Cfg(**base)


# kernel configurations on _segment's data: (the _cfg changes, whether its rows stop apart)
_CASES = {
    "dkm": ({}, True),
    "enforce_zero": (dict(enforce_zero=True), False),
    "prune": (dict(enforce_zero=True, prune_threshold=1e-6), True),
    "clamp": (dict(clamp_attention=True), True),
    "no_stop": (dict(epsilon=-1.0), False),
    # slot 0 of a non-zero code (D = 1 / zero_threshold) keeps some attention: the
    # exact-zero rule's softmax-gradient mask matters
    "exact_zero_soft": (dict(enforce_zero=True, zero_threshold=0.5, tau=0.5, scale=50.0), False),
}


@needs_c
@pytest.mark.parametrize("kw, apart", list(_CASES.values()), ids=list(_CASES))
def test_triton_loop_equals_the_compiled_cpu_loop_group_by_group(kw, apart, kernels, monkeypatch):
    # per group the iterations it ran (early stopping on the float32 inertia test), the
    # centroids before / after its last one, each code's output and its backward (h, r): what
    # _dkm_cpu.fwd_loop / bwd_loop give, which stop all groups together and track the rest
    monkeypatch.setattr(sk, "_C_CODES", "always")
    kw = dict(kw)
    scale = kw.pop("scale", 1.0)
    cfg = _cfg(**kw)
    # clamped attention on a ragged row is ill-conditioned: the centroids over its zero-mass
    # codes hold only the floor's mass (zero_threshold x the row's), and a rounding difference
    # grows ~10x per iteration (the torch code and the C loop end 4e-4 apart on the CPU; an
    # H200's exp2 and fused multiply-adds, up to 2.4% of a centroid): that case runs unragged
    v, m, c = _segment(3, cfg, scale, ragged=not cfg.clamp_attention)
    gsum = torch.randn(v.shape, generator=torch.Generator().manual_seed(9))
    y_c, last_c, st = sk._scalar_forward(v, m, c, cfg, sync_free=False)
    assert st["path"] == "c"
    h_c, r_c = sk._scalar_backward(st, gsum, cfg)
    n_run = len(st["hist"])
    it_c = st["last_it"] if st["last_it"] is not None else torch.full((v.shape[0],), n_run - 1)

    monkeypatch.setattr(sk, "_TRITON_DEVICES", frozenset({DEV.type}))
    y_t, last_t, st_t = sk._scalar_forward(v.to(DEV), m.to(DEV), c.to(DEV), cfg, sync_free=True)
    assert st_t["path"] == "triton"
    h_t, r_t = (t.cpu() for t in sk._scalar_backward(st_t, gsum.to(DEV), cfg))
    st_t = {key: val.cpu() for key, val in st_t.items() if isinstance(val, torch.Tensor)}
    y_t, last_t = y_t.cpu(), last_t.cpu()
    assert torch.equal(st_t["last_it"], it_c.long())
    if apart:
        assert len(set(it_c.tolist())) > 1, it_c  # the premise: groups stop apart
    assert_close(st_t["prev_c"], st["prev_c"], 1e-6, 1e-6)
    assert_close(last_t, last_c, 1e-6, 1e-6)
    assert_close(y_t, y_c, 1e-6, 1e-6)
    assert_close(h_t, h_c, 1e-4, 1e-5)
    assert_close(r_t, r_c, 1e-4, 1e-5)
    # the per-iteration history backward reads: a group's iterations up to its last one
    for g, t_last in enumerate(it_c.tolist()):
        for t in range(t_last + 1):
            assert_close(st_t["c_hist"][t, g], st["c_hist"][t, g], 1e-6, 1e-6)


@pytest.mark.parametrize("kw, apart", list(_CASES.values()), ids=list(_CASES))
def test_rows_split_over_programs_equal_one_program_per_row(kw, apart, kernels, monkeypatch):
    # _SPLIT_CODES: each row's 700 codes in chunks of 256 (the last one short, the backward's
    # 512-code tiles masked to the chunk), one program per chunk and a launch per pass, the
    # row's sums added from the chunks' partials: the same iterations per row (rows 0 and 2
    # stop early), history, output and backward as one program walking the whole row
    kw = dict(kw)
    scale = kw.pop("scale", 1.0)
    cfg = _cfg(**kw)
    v, m, c = _segment(3, cfg, scale, ragged=not cfg.clamp_attention)
    gsum = torch.randn(v.shape, generator=torch.Generator().manual_seed(9))
    ct = sk._c_cfg(cfg, c.shape[1])

    def run(split: int) -> list[torch.Tensor]:
        monkeypatch.setattr(kernels, "_SPLIT_CODES", split)
        assert kernels._split(v.shape[1]) == split
        vd, md = v.to(DEV), m.to(DEV)
        out = kernels.fwd_loop(vd, md, c.to(DEV), ct, cfg.max_iter, cfg.epsilon, cfg.enforce_zero)
        y, prev_c, last_c, last_it, c_hist, raw_hist, mass_hist = out
        state = dict(v=vd, m=md, c_hist=c_hist, raw_hist=raw_hist, mass_hist=mass_hist,
                     last_it=last_it, prev_c=prev_c, last_c=last_c)  # fmt: skip
        h, r = kernels.bwd_loop(state, gsum.to(DEV), ct, 2.0 / cfg.tau, cfg.enforce_zero)
        return [t.cpu() for t in (last_it, y, prev_c, last_c, c_hist, raw_hist, mass_hist, h, r)]

    one, split = run(0), run(256)
    assert torch.equal(split[0], one[0])
    if apart:
        assert len(set(one[0].tolist())) > 1, one[0]  # the premise: rows stop apart
    for got, want in zip(split[1:7], one[1:7]):  # (sums in another order: float64 rounding)
        assert_close(got, want, 1e-6, 1e-7)
    assert_close(split[7], one[7], 1e-5, 1e-6)
    assert_close(split[8], one[8], 1e-5, 1e-6)


def test_triton_layout_reads_the_host_once(triton_layout):
    # the kernels stop early per group on the device: the batch's one read stays the only one
    xs, cs = small_batch()
    leaves = [x.clone().requires_grad_() for x in xs]
    with _HostReads() as mode:
        res = sk.soft_kmeans_batch(leaves, cs, method="table", max_iter=5, epsilon=1e-6)
        torch.autograd.backward([o for o, _ in res], [torch.ones_like(o) for o, _ in res])
    assert triton_layout.fwd > 0
    assert mode.count == 1, mode.count


@pytest.mark.parametrize("variant", ["dkm", "enforce_zero", "prune", "early_stop"])
def test_full_code_tables_equal_the_compacted_ones_without_a_host_read(
    variant, triton_layout, monkeypatch
):
    # every group's table as all 65,536 codes (absent ones with count 0): the outputs,
    # centroids and gradients of the compacted tables, and the batch reads nothing back. The
    # per-code passes in torch ops here (the interpreter would take minutes on 8 full rows;
    # the next test runs the kernels on one)
    monkeypatch.setattr(sk, "_TRITON_DEVICES", frozenset())
    kw = VARIANTS[variant]
    xs, cs = small_batch()
    ws = weights(xs)

    def go(full: bool):
        monkeypatch.setattr(sk, "_full_tables", lambda *args: full)
        with _HostReads() as mode:
            res = run_batch(xs, cs, ws, method="table", **kw)
        return res, mode.count

    compact, reads = go(False)
    assert reads == 1
    full, reads = go(True)
    assert reads == 0
    for a, b in zip(full, compact):  # sums over other lengths: rounding only
        assert_close(a[0], b[0], 1e-5, 1e-6)
        assert_close(a[1], b[1], 1e-5, 1e-5)
        assert_close(a[2], b[2], 1e-4, 1e-5)


def test_full_code_tables_in_the_kernels_hold_absent_codes_at_zero(triton_layout, monkeypatch):
    # a weight with more elements than codes takes the full tables when the kernels run its
    # per-code passes; its absent codes (the fp16 infinities and NaNs among them) enter the
    # kernels as value 0, count 0, and the result is the torch code's on compacted tables
    seen = {}
    code_tables = sk._code_tables

    def spy(counts, scale, device, full=False):
        out = code_tables(counts, scale, device, full)
        seen["full"], seen["values"], seen["mass"] = full, out[1], out[2]
        return out

    x, c0 = make_data(1, 270000, 1, seed=5)  # (65,536 codes <= a quarter of its weights)
    ws = weights([x])
    with monkeypatch.context() as mp:
        mp.setattr(sk, "_code_tables", spy)
        with _HostReads() as mode:
            (got,) = run_batch([x.to(DEV)], [c0.to(DEV)], ws, method="table", max_iter=2)
    assert seen["full"] and mode.count == 0 and triton_layout.fwd == 1
    values, mass = seen["values"], seen["mass"]
    assert values.shape == mass.shape == (1, 1 << 16)
    assert torch.isfinite(values).all() and (values[mass == 0] == 0).all()
    assert int(mass.sum()) == 270000
    monkeypatch.setattr(sk, "_TRITON_DEVICES", frozenset())  # the torch code: compacted
    (want,) = run_batch([x.to(DEV)], [c0.to(DEV)], ws, method="table", max_iter=2)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-4, 1e-5)


def train():
    """A DKM run (prepare, 4 steps with an optimizer, finalize) of a small MLP on DEV: the
    losses and the palettized weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    ).to(DEV)
    cfg = {"global_config": {"n_bits": 3, "weight_threshold": 0, "milestone": 1}}
    pal = DKMPalettizer(model, cfg)
    model = pal.prepare()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(32, 96, generator=torch.Generator().manual_seed(1)).to(DEV)
    yt = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2)).to(DEV)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), yt)
        loss.backward()
        opt.step()
        pal.step()
        losses.append(loss.item())
    final = pal.finalize()
    return losses, [final[i].weight.detach() for i in (0, 2)]


def same_training(got, want, tol: float) -> None:
    """Two train() runs: losses within ``tol`` (relative), palettized weights of at most 8
    values within 10 x tol relative, tol absolute."""
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(want[0]), rtol=tol, atol=0)
    for a, b in zip(got[1], want[1], strict=True):
        assert a.unique().numel() <= 8
        assert_close(a, b, 10 * tol, tol)


def test_dkm_training_with_triton_kernels_equals_the_torch_code(triton_layout, monkeypatch):
    # a DKM run (prepare, steps with an optimizer, finalize) through the kernels: the losses
    # and the palettized weights of the torch code's run
    monkeypatch.setattr(sk, "_TABLE_MIN_GROUP", {"cpu": 1, "cuda": 1})  # the table engine here
    got = train()
    assert triton_layout.fwd >= 3 and triton_layout.bwd >= 3
    monkeypatch.setattr(sk, "_TRITON_DEVICES", frozenset())
    same_training(got, train(), 1e-5)


@pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None, reason="no CUDA backend in Triton"
)
def test_kernels_compile_for_cuda_without_a_gpu():
    # the interpreter runs the kernels' Python; this builds them as a GPU would (Triton's CUDA
    # passes and ptxas, for sm_90), in a process without TRITON_INTERPRET
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    script = Path(__file__).with_name("_triton_aot.py")
    res = subprocess.run(
        [sys.executable, str(script), "90"], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("_fwd_loop", "_bwd_loop", "_fwd_pass", "_bwd_pass"):
        assert res.stdout.count(f"ok {name}") == 3, res.stdout
    assert res.stdout.count("ok _elems") == 8, res.stdout


# -- the element passes in Triton (_dkm_triton.elems) --------------------------------------------


@pytest.fixture
def elem_layout(kernels, monkeypatch):
    """The device layout with the Triton element passes on DEV and the per-code passes in
    torch ops (quick in the interpreter); returns the list of passes run (their op codes).
    The torch element passes are this layout with ``_TRITON_ELEM_DEVICES`` emptied."""
    if DEV.type == "cpu":
        monkeypatch.setattr(sk, "_sync_free", lambda device: True)
        monkeypatch.setattr(sk, "_host_layout", lambda device: False)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    monkeypatch.setattr(sk, "_TRITON_DEVICES", frozenset())
    monkeypatch.setattr(sk, "_TRITON_ELEM_DEVICES", frozenset({DEV.type}))
    ran: list[int] = []
    elems = kernels.elems

    def counted(op, *a, **k):
        ran.append(op)
        return elems(op, *a, **k)

    monkeypatch.setattr(kernels, "elems", counted)
    return ran


def _same_results(got, want, exact: bool = True) -> None:
    """Outputs and centroids: equal (the same codes, tables and gathers); gradients: equal up
    to the order of the per-code sums (atomic adds) and one rounding of g * h + r."""
    for a, b in zip(got, want, strict=True):
        if exact:
            assert torch.equal(a[0], b[0])
            assert torch.equal(a[1], b[1])
        else:
            assert_close(a[0], b[0], 1e-6, 1e-7)
            assert_close(a[1], b[1], 1e-6, 1e-7)
        if a[2] is None or b[2] is None:
            assert a[2] is None and b[2] is None
        else:
            assert_close(a[2], b[2], 1e-5, 1e-6)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("variant", ["dkm", "enforce_zero", "prune", "early_stop"])
def test_element_kernels_equal_the_torch_element_passes(variant, full, elem_layout, monkeypatch):
    # every element pass of a batch (tables of G = 1, 2, 3 groups, exact tensors beside them)
    # in one launch each, no bins: the torch passes' outputs, centroids and gradients
    monkeypatch.setattr(sk, "_full_tables", lambda *args: full)
    kw = dict(method="table", **VARIANTS[variant])
    xs, cs = small_batch()
    ws = weights(xs)
    got = run_batch(xs, cs, ws, **kw)
    assert elem_layout == [0, 1, 2, 3]  # HIST, GATHER; SCATTER, GRAD
    monkeypatch.setattr(sk, "_TRITON_ELEM_DEVICES", frozenset())
    want = run_batch(xs, cs, ws, **kw)
    assert elem_layout == [0, 1, 2, 3]
    _same_results(got, want)


def test_element_kernels_skip_the_tensors_without_a_gradient(elem_layout, monkeypatch):
    # inputs that need no gradient get none and take no part in the backward passes (their
    # table rows of h and r are never written or read)
    monkeypatch.setattr(sk, "_full_tables", lambda *args: True)
    xs, cs = small_batch()
    ws = weights(xs)

    def go():
        leaves = [x.detach().clone().requires_grad_(i % 2 == 0) for i, x in enumerate(xs)]
        res = sk.soft_kmeans_batch(leaves, cs, method="table")
        loss = sum([(o * w).sum() for (o, _), w in zip(res, ws)])
        want = [x for x in leaves if x.requires_grad]
        grads = iter(torch.autograd.grad(loss, want))
        return [
            (o.detach(), c, next(grads) if x.requires_grad else None)
            for (o, c), x in zip(res, leaves)
        ]

    got = go()
    monkeypatch.setattr(sk, "_TRITON_ELEM_DEVICES", frozenset())
    _same_results(got, go())


def _tricky_weights() -> list[torch.Tensor]:
    """Weights whose codes are easy to get wrong: zeros of both signs, values below fp16's
    smallest subnormal after scaling, subnormal ties, round-half-even ties in several binades,
    the largest magnitude, and groups of another scale in the same tensor."""
    s = 2.0**14  # the scale of a group whose max |x| is 1.0 (soft_kmeans._group_scales)
    special = [0.0, -0.0, 1.0, -1.0, 3 * 2.0**-40, -(2.0**-41), 2.0**-38, 1.5 * 2.0**-38]
    special += [2.5 * 2.0**-38, (1024 + 0.5) / s, (1025 + 0.5) / s, -(2048 + 1.0) / s]
    special += [(16384 + 8.0) / s, (4096 + 2.0) / s, -(512 + 0.25) / s, 1e-30]
    gen = torch.Generator().manual_seed(9)
    a = torch.tensor(special + (0.3 * torch.randn(200, generator=gen)).clamp(-1, 1).tolist())
    b = torch.cat([a, a * 2.0**-9]).view(2, -1)  # two groups: scales 2^14 and 2^23
    c = torch.tensor(special[:8] * 3).view(3, 8) * torch.tensor([[1.0], [2.0**-5], [2.0**6]])
    return [a.view(1, -1), b.contiguous(), c.contiguous()]


@pytest.mark.parametrize("keep_zeros", [False, True])
def test_element_kernel_codes_equal_the_torch_codes(keep_zeros, kernels):
    # the four passes on hand-picked values against the torch code's bins (_encode_many):
    # histogram, gather through a table, per-code gradient sums, gathered gradient
    flats = [f.to(DEV) for f in _tricky_weights()]
    cfg = sk._Cfg(1e-4, 1, 0.0, "dkm", keep_zeros, 0.0, 1e-7, None, False)
    bins, scale, *_ = sk._encode_many([f.cpu() for f in flats], cfg, torch.device("cpu"))
    rows = sum([f.shape[0] for f in flats])
    size = rows * sk._STRIDE
    items, trow, start = [], 0, 0
    for f in flats:
        items.append(sk._ScalarItem("table", f.shape[0], f.shape[1], 0, trow, start))
        trow, start = trow + f.shape[0], start + f.numel()
    plan = sk._ElemPlan(flats, items, sk._group_scales(flats, DEV))
    assert torch.equal(plan.scale.cpu(), scale)
    counts = torch.zeros(size, dtype=torch.int32, device=DEV)
    assert plan.launch(sk._HIST, counts, keep_zeros)
    assert torch.equal(counts.cpu().long(), torch.bincount(bins.long(), minlength=size))
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(size, generator=gen)
    y = torch.empty(start, device=DEV)
    assert plan.launch(sk._GATHER, table.to(DEV), keep_zeros, out=y)
    assert torch.equal(y.cpu(), table[bins.long()])
    g = torch.randn(start, generator=gen)
    grads = [p.to(DEV) for p in g.split([f.numel() for f in flats])]
    total = torch.zeros(size, device=DEV)
    assert plan.launch(sk._SCATTER, total, keep_zeros, grads=grads)
    want = torch.zeros(size).index_add_(0, bins.long(), g)
    assert_close(total.cpu(), want, 1e-6, 1e-6)
    hr = torch.randn(size, 2, generator=gen)
    out = torch.empty(start, device=DEV)
    assert plan.launch(sk._GRAD, hr.to(DEV), keep_zeros, grads=grads, out=out)
    assert_close(out.cpu(), g * hr[bins.long(), 0] + hr[bins.long(), 1], 1e-6, 1e-6)


@pytest.mark.parametrize("failing", [0, 1, 2, 3])
def test_an_element_kernel_that_fails_to_build_falls_back_to_the_torch_passes(
    failing, kernels, elem_layout, monkeypatch
):
    # a pass whose kernel cannot build: one warning, the torch passes from there on (the
    # bins recomputed from the weights when the pass is not the first), the same results
    monkeypatch.setattr(sk, "_triton_kernels", kernels)  # (restored after the test)
    monkeypatch.setattr(sk, "_full_tables", lambda *args: True)
    elems = kernels.elems

    def breaks(op, *a, **k):
        if op == failing:
            raise RuntimeError("PTX assembly failed")
        return elems(op, *a, **k)

    monkeypatch.setattr(kernels, "elems", breaks)
    xs, cs = small_batch()
    ws = weights(xs)
    with pytest.warns(RuntimeWarning, match="Triton DKM kernels failed in an element pass"):
        got = run_batch(xs, cs, ws, method="table")
    assert sk._triton() is None
    monkeypatch.setattr(sk, "_TRITON_ELEM_DEVICES", frozenset())
    _same_results(got, run_batch(xs, cs, ws, method="table"))


@pytest.mark.parametrize("n_chunks", [1, 2])
def test_dkm_training_with_element_kernels_equals_the_torch_passes(
    elem_layout, monkeypatch, n_chunks
):
    # DKM steps (an optimizer moving the weights, so codes and tables change) and finalize:
    # the torch element passes' losses and palettized weights (in one round; with 2 chunks
    # each layer is a round of its own: dkm._ROUND_CHUNKS)
    from lightning_palettize.palettizers import dkm

    monkeypatch.setattr(sk, "_TABLE_MIN_GROUP", {"cpu": 1, "cuda": 1})
    monkeypatch.setattr(dkm, "_ROUND_CHUNKS", {DEV.type: n_chunks})
    got = train()
    assert elem_layout.count(0) >= 3 * n_chunks and elem_layout.count(3) >= 3 * n_chunks
    monkeypatch.setattr(sk, "_TRITON_ELEM_DEVICES", frozenset())
    monkeypatch.setattr(dkm, "_ROUND_CHUNKS", {})
    same_training(got, train(), 1e-6)


def test_element_kernels_inside_a_cuda_graph_capture_copy_no_address_table(
    elem_layout, monkeypatch
):
    # in someone else's capture (a whole training step in a CUDA graph) no host-to-device copy
    # may run: the soft weights are gathered into one stacked tensor (their addresses computed
    # on the device) and the backward takes the torch passes (the gradients' addresses would
    # need a copy); the results are the torch passes'
    monkeypatch.setattr(sk, "_full_tables", lambda *args: True)
    xs, cs = small_batch()
    ws = weights(xs)
    copies = []
    monkeypatch.setattr(sk, "_address_table", lambda *a: copies.append(a))
    monkeypatch.setattr(sk, "_capturing", lambda device: True)
    got = run_batch(xs, cs, ws, method="table")
    assert elem_layout == [0, 1] and copies == []
    monkeypatch.setattr(sk, "_TRITON_ELEM_DEVICES", frozenset())
    _same_results(got, run_batch(xs, cs, ws, method="table"))
