"""The scalar engine's per-code passes as two fused Triton kernels (mode "dkm", CUDA).

On a GPU the torch code of ``soft_kmeans._scalar_forward`` / ``_scalar_backward`` issues ~45
small kernels per iteration and segment (distances, softmax, sums, update, early-stop state)
and as many again per iteration in backward: a DKM step on a large model is bound by the host
launching them, not by the GPU running them. Here every group (a row of a segment's code tables)
is one program that runs all of its iterations and then its output (``fwd_loop``), and one that
runs the whole backward (``bwd_loop``): two launches per segment and step. The math is the
compiled CPU kernels' (``_dkm_cpu.c``: ``tile_probs``, ``fwd_stats_body``, ``out_y_body``,
``att_t_body``, ``bwd_step_body``, ``py_fwd_loop``, ``py_bwd_loop``), sums in float64, early
stopping per group on the same float32 inertia test, so each group's result is the one the
CPU's loop gives it. Nothing N x K is stored: the attention is recomputed from the centroids in
every pass (an exp2 per entry costs less than writing and reading it).

Triton is optional (it comes with CUDA builds of torch). ``TRITON_INTERPRET=1`` runs the same
kernels on CPU tensors (numpy), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Launch settings per kernel: (warps per program, (code, centroid) entries per tile, sums per
# tile slot in float64 registers reduced once per pass (True) or reduced across the program at
# every tile (False), software-pipelining stages of the tile loops). A program walks its row's
# codes one tile after another, and on an H200 each tile costs a roughly fixed ~3.8 us however
# large (bench/dkm_kernels.py on the 134M LLaMA's 85 rows of 65,536 codes: 8 warps, 4,096
# entries: forward 3.9 ms, backward 5.1 ms; 2,048 entries: 4.3 / 9.6 ms; 1,024 at 4 warps
# 7.7 / 15.1 ms), so fewer, larger tiles with more warps pay: the settings below measured
# forward 2.97 ms and backward 3.83 ms there (bench/results/gpu_h200/dkm_kernels.json). Their
# register use stays within 128 a thread without spills (ptxas -v for sm_90); more entries a
# thread spill (16 warps x 8,192 entries with register sums: 216 bytes in the backward).
_LAUNCH = {"fwd": (16, 4096, True, 1), "bwd": (16, 8192, False, 1)}


@triton.jit
def _probs(v, c, kidx, kmask, factor, prune, zinv, PRUNE: tl.constexpr, KZ: tl.constexpr):
    """(P [BU, KP], min_k D [BU], v - c [BU, KP]) of a tile of codes v [BU] for centroids
    c [KP] (tile_probs: the logit of k taken relative to the nearest centroid m as
    (c_m - c_k) ((v - c_k) + (v - c_m)), exact where two centroids compete). P is 0 on the
    padding slots (kmask False)."""
    diff = v[:, None] - c[None, :]
    d = diff * diff
    k0 = (kidx == 0)[None, :]
    if PRUNE:
        d = tl.where(k0, d - prune, d)
    if KZ:  # slot 0 of a non-zero code: D replaced by 1 / zero_threshold
        rep = k0 & (v != 0.0)[:, None]
        d = tl.where(rep, zinv, d)
    d = tl.where(kmask[None, :], d, float("inf"))
    dmin = tl.min(d, axis=1)
    near = tl.argmin(d, axis=1, tie_break_left=True)
    at_near = kidx[None, :] == near[:, None]
    cm = tl.sum(tl.where(at_near, c[None, :], 0.0), axis=1)
    bm = tl.sum(tl.where(at_near, diff, 0.0), axis=1)
    gap = (cm[:, None] - c[None, :]) * (diff + bm[:, None])
    if PRUNE:
        adj = tl.where(k0, -prune, 0.0)
        am = tl.sum(tl.where(at_near, adj, 0.0), axis=1)
        gap = gap + (adj - am[:, None])
    if KZ:  # an entry whose D was replaced outright: D_k - D_m as computed
        rep_m = tl.sum(tl.where(at_near & rep, 1.0, 0.0), axis=1)
        direct = (rep_m[:, None] + tl.where(rep, 1.0, 0.0)) != 0.0
        gap = tl.where(direct, d - dmin[:, None], gap)
    e = tl.exp2(gap * factor)
    e = tl.where(kmask[None, :], e, 0.0)
    inv = 1.0 / tl.sum(e, axis=1)
    return e * inv[:, None], dmin, diff


@triton.jit
def _tile(
    v_ptr, w_ptr, row, a, U, c, kidx, kmask, factor, prune, zinv, zt,
    BU: tl.constexpr, PRUNE: tl.constexpr, KZ: tl.constexpr, CLAMP: tl.constexpr,
):  # fmt: skip
    """Codes a .. a + BU of a row: (offsets, in-row mask, values, the per-code weights w (mass
    or gradient sums; 0 past the row), P, the attention (clamped at zero_threshold when asked;
    0 on padding slots), min_k D, v - c)."""
    offs = a + tl.arange(0, BU)
    um = offs < U
    vv = tl.load(v_ptr + row + offs, mask=um, other=0.0)
    ww = tl.load(w_ptr + row + offs, mask=um, other=0.0)
    p, dmin, diff = _probs(vv, c, kidx, kmask, factor, prune, zinv, PRUNE, KZ)
    att = p
    if CLAMP:
        att = tl.where(p < zt, zt, p)
    att = tl.where(kmask[None, :], att, 0.0)
    return offs, um, vv, ww, p, att, dmin, diff


# -- the passes over a row's codes lo .. hi (a whole row, or a chunk of it when split) --------


@triton.jit
def _fwd_sums(
    v_ptr, m_ptr, row, lo, hi, c, kidx, kmask, factor, prune, zinv, zt,
    KP: tl.constexpr, BU: tl.constexpr, PRUNE: tl.constexpr, KZ: tl.constexpr,
    CLAMP: tl.constexpr, TEST: tl.constexpr, ACC: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """One iteration's sums over codes lo .. hi for centroids c: sum_u A m (v - c), sum_u A m
    [KP] float64, and the inertia's terms per tile slot [BU] float64 (with TEST)."""
    s0 = tl.zeros([KP], dtype=tl.float64)
    s1 = tl.zeros([KP], dtype=tl.float64)
    if ACC:  # per tile slot, reduced after the pass
        a0 = tl.zeros([BU, KP], dtype=tl.float64)
        a1 = tl.zeros([BU, KP], dtype=tl.float64)
    inertia = tl.zeros([BU], dtype=tl.float64)
    for a in tl.range(lo, hi, BU, num_stages=STAGES):
        _, _, _, mm, _, att, dmin, diff = _tile(
            v_ptr, m_ptr, row, a, hi, c, kidx, kmask, factor, prune, zinv, zt,
            BU, PRUNE, KZ, CLAMP,
        )  # fmt: skip
        w = att * mm[:, None]
        if ACC:
            a0 += (w * diff).to(tl.float64)
            a1 += w.to(tl.float64)
        else:
            s0 += tl.sum((w * diff).to(tl.float64), axis=0)
            s1 += tl.sum(w.to(tl.float64), axis=0)
        if TEST:
            inertia += dmin.to(tl.float64) * mm.to(tl.float64)
    if ACC:
        s0 = tl.sum(a0, axis=0)
        s1 = tl.sum(a1, axis=0)
    return s0, s1, inertia


@triton.jit
def _fwd_step(c, s0, s1, inertia, t, T, eps, active, prev_in, kidx, EZ: tl.constexpr,
              TEST: tl.constexpr):  # fmt: skip
    """Iteration t's centroid update from its sums and the early-stopping test on its float32
    inertia (the sum of ``inertia``): (new centroids, prev_c = c, last_c = new, last_it = t,
    raw update, masses, active, prev_in)."""
    mass = s1.to(tl.float32)
    # a column under the smallest normal float32 is empty (as soft_kmeans._update)
    filled = mass >= 1.1754943508222875e-38
    raw = tl.where(filled, c + s0.to(tl.float32) / tl.where(filled, mass, 1.0), c)
    new = raw
    if EZ:
        new = tl.where(kidx == 0, 0.0, raw)
    if TEST:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if t + 1 < T:  # (the inertia reduced only where it is tested, as before the fold)
            cur = tl.sum(inertia, axis=0).to(tl.float32)
            if t > 0:
                active = (tl.abs(cur - prev_in) > eps).to(tl.int32)
            prev_in = cur
    last_it = t + tl.zeros([], dtype=tl.int32)  # (a tensor in the interpreter too)
    return new, c, new, last_it, raw, mass, active, prev_in


@triton.jit
def _fwd_out(
    v_ptr, y_ptr, row, lo, hi, prev_c, last_c, kidx, kmask, factor, prune, zinv, zt,
    BU: tl.constexpr, PRUNE: tl.constexpr, KZ: tl.constexpr, CLAMP: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """The output over codes lo .. hi: attention of prev_c, values last_c."""
    for a in tl.range(lo, hi, BU, num_stages=STAGES):
        offs, um, _, _, _, att, _, _ = _tile(
            v_ptr, v_ptr, row, a, hi, prev_c, kidx, kmask, factor, prune, zinv, zt,
            BU, PRUNE, KZ, CLAMP,
        )  # fmt: skip
        tl.store(y_ptr + row + offs, tl.sum(att * last_c[None, :], axis=1), mask=um)


@triton.jit
def _bwd_last(
    v_ptr, gs_ptr, row, lo, hi, prev_c, kidx, kmask, factor, prune, zinv, zt,
    KP: tl.constexpr, BU: tl.constexpr, PRUNE: tl.constexpr, KZ: tl.constexpr,
    CLAMP: tl.constexpr, ACC: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """d loss / d (the output's centroids) over codes lo .. hi: sum_u gsum_u A_uk, A from
    prev_c [KP] float64."""
    d_last = tl.zeros([KP], dtype=tl.float64)
    if ACC:  # (as in _fwd_sums)
        a_last = tl.zeros([BU, KP], dtype=tl.float64)
    for a in tl.range(lo, hi, BU, num_stages=STAGES):
        _, _, _, gg, _, att, _, _ = _tile(
            v_ptr, gs_ptr, row, a, hi, prev_c, kidx, kmask, factor, prune, zinv, zt,
            BU, PRUNE, KZ, CLAMP,
        )  # fmt: skip
        if ACC:
            a_last += (att * gg[:, None]).to(tl.float64)
        else:
            d_last += tl.sum((att * gg[:, None]).to(tl.float64), axis=0)
    if ACC:
        d_last = tl.sum(a_last, axis=0)
    return d_last


@triton.jit
def _bwd_state(
    c_hist, raw_hist, mass_hist, t, G, g, K, kidx, kmask, prev_c, with_out, grad_c,
    EZ: tl.constexpr,
):  # fmt: skip
    """Iteration t's centroids (prev_c for the output's iteration) and raw update from the
    forward's history, and (s_hat, g_in): the gradient grad_c of its new centroids through the
    update's division by the mass, and the part that passes straight to its input centroids."""
    c = tl.load(c_hist + (t * G + g) * K + kidx, mask=kmask, other=0.0)
    c = tl.where(with_out, prev_c, c)
    raw = tl.load(raw_hist + (t * G + g) * K + kidx, mask=kmask, other=0.0)
    mass = tl.load(mass_hist + (t * G + g) * K + kidx, mask=kmask, other=0.0)
    gn = grad_c
    if EZ:
        gn = tl.where(kidx == 0, 0.0, gn)
    filled = mass >= 1.1754943508222875e-38  # as the forward update
    s_hat = tl.where(filled, gn / tl.where(filled, mass, 1.0), 0.0)
    g_in = tl.where(filled, 0.0, gn)
    return c, raw, s_hat, g_in


@triton.jit
def _bwd_sweep(
    v_ptr, m_ptr, gs_ptr, h_ptr, r_ptr, row, lo, hi, c, s_hat, raw, last_c, with_out,
    kidx, kmask, factor, prune, zinv, zt, two,
    KP: tl.constexpr, BU: tl.constexpr, PRUNE: tl.constexpr, KZ: tl.constexpr,
    CLAMP: tl.constexpr, ACC: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """One iteration's backward over codes lo .. hi: adds each code's r, writes its h (the
    output's iteration, ``with_out``), returns the sums for the centroid gradient (acc, acc_o)
    [KP] float64."""
    srk = s_hat * raw
    acc = tl.zeros([KP], dtype=tl.float64)
    acc_o = tl.zeros([KP], dtype=tl.float64)
    if ACC:
        b_acc = tl.zeros([BU, KP], dtype=tl.float64)
        b_out = tl.zeros([BU, KP], dtype=tl.float64)
    for a in tl.range(lo, hi, BU, num_stages=STAGES):
        offs, um, vv, mm, p, att, _, diff = _tile(
            v_ptr, m_ptr, row, a, hi, c, kidx, kmask, factor, prune, zinv, zt,
            BU, PRUNE, KZ, CLAMP,
        )  # fmt: skip
        keep0 = tl.full([BU, KP], 1.0, tl.float32)
        if KZ:  # slot 0's logit is a constant for a non-zero code
            keep0 = tl.where((kidx == 0)[None, :] & (vv != 0.0)[:, None], 0.0, 1.0)
        gr = vv[:, None] * s_hat[None, :] - srk[None, :]
        if CLAMP:
            gr = tl.where(p < zt, 0.0, gr)
        direct = tl.sum(s_hat[None, :] * att, axis=1)
        dot = tl.sum(gr * p, axis=1)
        e = p * (gr - dot[:, None]) * keep0 * diff
        if ACC:
            b_acc += (e * mm[:, None]).to(tl.float64)
        else:
            acc += tl.sum((e * mm[:, None]).to(tl.float64), axis=0)
        r_old = tl.load(r_ptr + row + offs, mask=um, other=0.0)
        tl.store(r_ptr + row + offs, r_old + (direct - two * tl.sum(e, axis=1)), mask=um)
        if with_out:
            gg = tl.load(gs_ptr + row + offs, mask=um, other=0.0)
            lk = tl.broadcast_to(last_c[None, :], [BU, KP])
            if CLAMP:
                lk = tl.where(p < zt, 0.0, lk)
            dot_o = tl.sum(lk * p, axis=1)
            e_o = p * (lk - dot_o[:, None]) * keep0 * diff
            if ACC:
                b_out += (e_o * gg[:, None]).to(tl.float64)
            else:
                acc_o += tl.sum((e_o * gg[:, None]).to(tl.float64), axis=0)
            tl.store(h_ptr + row + offs, -two * tl.sum(e_o, axis=1), mask=um)
    if ACC:
        acc = tl.sum(b_acc, axis=0)
        if with_out:
            acc_o = tl.sum(b_out, axis=0)
    return acc, acc_o


@triton.jit
def _bwd_next(g_in, acc, acc_o, two, with_out):
    """The gradient of the previous iteration's centroids (the input of this one)."""
    grad_c = g_in + (two * acc).to(tl.float32)
    if with_out:
        grad_c = grad_c + (two * acc_o).to(tl.float32)
    return grad_c


# -- one program per row ------------------------------------------------------------------------


@triton.jit
def _fwd_loop(
    v_ptr, m_ptr, c0_ptr, c_hist, raw_hist, mass_hist, last_it_ptr, prev_c_ptr, last_c_ptr,
    y_ptr, G, U, K, T, factor, prune, zinv, zt, eps,
    KP: tl.constexpr, BU: tl.constexpr, PRUNE: tl.constexpr, KZ: tl.constexpr,
    CLAMP: tl.constexpr, EZ: tl.constexpr, TEST: tl.constexpr, ACC: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)
    kidx = tl.arange(0, KP)
    kmask = kidx < K
    c = tl.load(c0_ptr + g * K + kidx, mask=kmask, other=0.0)
    # prev_c and last_c start as copies, not as c itself: Triton's front end leaves a name out
    # of a loop's carried values when the body assigns it the object it held before the loop,
    # and `prev_c = c` below would be that object (c's first value) in its trial pass, so the
    # compiled kernel stored the initial centroids as prev_c (the interpreter does not do this)
    prev_c = c + 0.0
    last_c = c + 0.0
    active = 1
    last_it = 0
    prev_in = 0.0
    row = g * U
    for t in range(0, T):
        tl.store(c_hist + (t * G + g) * K + kidx, c, mask=kmask)
        raw = c
        mass = tl.zeros([KP], dtype=tl.float32)
        if active != 0:
            s0, s1, inertia = _fwd_sums(
                v_ptr, m_ptr, row, 0, U, c, kidx, kmask, factor, prune, zinv, zt,
                KP, BU, PRUNE, KZ, CLAMP, TEST, ACC, STAGES,
            )  # fmt: skip
            c, prev_c, last_c, last_it, raw, mass, active, prev_in = _fwd_step(
                c, s0, s1, inertia, t, T, eps, active, prev_in, kidx, EZ, TEST
            )
        tl.store(raw_hist + (t * G + g) * K + kidx, raw, mask=kmask)
        tl.store(mass_hist + (t * G + g) * K + kidx, mass, mask=kmask)
    tl.store(last_it_ptr + g, last_it.to(tl.int64))
    tl.store(prev_c_ptr + g * K + kidx, prev_c, mask=kmask)
    tl.store(last_c_ptr + g * K + kidx, last_c, mask=kmask)
    _fwd_out(
        v_ptr, y_ptr, row, 0, U, prev_c, last_c, kidx, kmask, factor, prune, zinv, zt,
        BU, PRUNE, KZ, CLAMP, STAGES,
    )  # fmt: skip


@triton.jit
def _bwd_loop(
    v_ptr, m_ptr, gs_ptr, c_hist, raw_hist, mass_hist, last_it_ptr, prev_c_ptr, last_c_ptr,
    h_ptr, r_ptr, G, U, K, factor, prune, zinv, zt, two,
    KP: tl.constexpr, BU: tl.constexpr, PRUNE: tl.constexpr, KZ: tl.constexpr,
    CLAMP: tl.constexpr, EZ: tl.constexpr, ACC: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)
    kidx = tl.arange(0, KP)
    kmask = kidx < K
    row = g * U
    n = tl.load(last_it_ptr + g).to(tl.int32)
    prev_c = tl.load(prev_c_ptr + g * K + kidx, mask=kmask, other=0.0)
    last_c = tl.load(last_c_ptr + g * K + kidx, mask=kmask, other=0.0)
    d_last = _bwd_last(
        v_ptr, gs_ptr, row, 0, U, prev_c, kidx, kmask, factor, prune, zinv, zt,
        KP, BU, PRUNE, KZ, CLAMP, ACC, STAGES,
    )  # fmt: skip
    grad_c = d_last.to(tl.float32)  # the last iteration's d loss / d new
    for i in range(0, n + 1):
        t = n - i
        with_out = i == 0
        c, raw, s_hat, g_in = _bwd_state(
            c_hist, raw_hist, mass_hist, t, G, g, K, kidx, kmask, prev_c, with_out, grad_c, EZ
        )
        acc, acc_o = _bwd_sweep(
            v_ptr, m_ptr, gs_ptr, h_ptr, r_ptr, row, 0, U, c, s_hat, raw, last_c, with_out,
            kidx, kmask, factor, prune, zinv, zt, two,
            KP, BU, PRUNE, KZ, CLAMP, ACC, STAGES,
        )  # fmt: skip
        grad_c = _bwd_next(g_in, acc, acc_o, two, with_out)


# -- split rows: a row's codes over several programs ------------------------------------------
# One program per row walks 65,536 codes per pass at ~3.8 us a tile: with 85 rows on 132 SMs
# the kernels are latency-bound. Split, each row's codes are cut in chunks of _SPLIT_CODES, one
# program per (row, chunk), one launch per pass: a program writes its chunk's float64 partial
# sums, and the next launch's programs each add up the row's partials (in chunk order, so all
# of a row's programs get the same centroids) and replay the per-row recurrence (centroid
# update, early stopping; in backward the centroid gradient) from them. 0: off.
_SPLIT_CODES = 0


@triton.jit
def _replay_fwd(
    part, part_in, c0_ptr, c_hist, raw_hist, mass_hist, g, G, P, K, T, t_end, eps, sel,
    kidx, kmask, KP: tl.constexpr, EZ: tl.constexpr, TEST: tl.constexpr,
):  # fmt: skip
    """_fwd_loop's iteration state after iterations 0 .. t_end - 1 from their partial sums
    (part [T, G, P, 2, KP], part_in [T, G, P] float64): (c, prev_c, last_c, last_it, active).
    With ``sel`` == 0 (an integer) also write those iterations' c_hist / raw_hist / mass_hist
    entries."""
    store = kmask & (tl.zeros([KP], tl.int64) + sel == 0)  # (a vector: the interpreter's
    # scalar-and-vector & gives ints, which it refuses as a mask)
    c = tl.load(c0_ptr + g * K + kidx, mask=kmask, other=0.0)
    prev_c = c + 0.0  # (copies: see _fwd_loop)
    last_c = c + 0.0
    active = 1
    last_it = 0
    prev_in = 0.0
    for t in range(0, t_end):
        tl.store(c_hist + (t * G + g) * K + kidx, c, mask=store)
        raw = c
        mass = tl.zeros([KP], dtype=tl.float32)
        if active != 0:
            s0 = tl.zeros([KP], dtype=tl.float64)
            s1 = tl.zeros([KP], dtype=tl.float64)
            inertia = tl.zeros([1], dtype=tl.float64)
            for q in range(0, P):
                base = ((t * G + g) * P + q).to(tl.int64)
                s0 += tl.load(part + base * 2 * KP + kidx)
                s1 += tl.load(part + base * 2 * KP + KP + kidx)
                if TEST:
                    inertia += tl.load(part_in + base + tl.arange(0, 1))
            c, prev_c, last_c, last_it, raw, mass, active, prev_in = _fwd_step(
                c, s0, s1, inertia, t, T, eps, active, prev_in, kidx, EZ, TEST
            )
        tl.store(raw_hist + (t * G + g) * K + kidx, raw, mask=store)
        tl.store(mass_hist + (t * G + g) * K + kidx, mass, mask=store)
    return c, prev_c, last_c, last_it, active


@triton.jit
def _chunk(K, U, CH, KP: tl.constexpr):
    """This program's row g and chunk p, the centroid slots and their mask, the row's offset
    and the chunk's codes lo .. hi."""
    g = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    kidx = tl.arange(0, KP)
    lo = p * CH
    return g, p, kidx, kidx < K, g * U, lo, tl.minimum(lo + CH, U)


@triton.jit
def _fwd_pass(
    v_ptr, m_ptr, c0_ptr, c_hist, raw_hist, mass_hist, last_it_ptr, prev_c_ptr, last_c_ptr,
    y_ptr, part, part_in, G, U, K, T, P, CH, t_now, factor, prune, zinv, zt, eps,
    KP: tl.constexpr, BU: tl.constexpr, PRUNE: tl.constexpr, KZ: tl.constexpr,
    CLAMP: tl.constexpr, EZ: tl.constexpr, TEST: tl.constexpr, ACC: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """Iteration t_now (< T) of every row on chunk p of its codes: the chunk's partial sums; or,
    with t_now == T, the output on the chunk (and, chunk 0, the row's state and history)."""
    g, p, kidx, kmask, row, lo, hi = _chunk(K, U, CH, KP)
    # (the history is written by chunk 0 of the output launch: p + T - t_now == 0)
    c, prev_c, last_c, last_it, active = _replay_fwd(
        part, part_in, c0_ptr, c_hist, raw_hist, mass_hist, g, G, P, K, T, t_now, eps,
        p + (T - t_now), kidx, kmask, KP, EZ, TEST,
    )  # fmt: skip
    if t_now == T:
        if p == 0:
            tl.store(last_it_ptr + g, last_it.to(tl.int64))
            tl.store(prev_c_ptr + g * K + kidx, prev_c, mask=kmask)
            tl.store(last_c_ptr + g * K + kidx, last_c, mask=kmask)
        _fwd_out(
            v_ptr, y_ptr, row, lo, hi, prev_c, last_c, kidx, kmask, factor, prune, zinv, zt,
            BU, PRUNE, KZ, CLAMP, STAGES,
        )  # fmt: skip
    elif active != 0:
        s0, s1, inertia = _fwd_sums(
            v_ptr, m_ptr, row, lo, hi, c, kidx, kmask, factor, prune, zinv, zt,
            KP, BU, PRUNE, KZ, CLAMP, TEST, ACC, STAGES,
        )  # fmt: skip
        base = (t_now * G + g) * P + p
        tl.store(part + base * 2 * KP + kidx, s0)
        tl.store(part + base * 2 * KP + KP + kidx, s1)
        tl.store(
            part_in + base + tl.arange(0, 1), tl.sum(inertia, axis=0) + tl.zeros([1], tl.float64)
        )


@triton.jit
def _bwd_pass(
    v_ptr, m_ptr, gs_ptr, c_hist, raw_hist, mass_hist, last_it_ptr, prev_c_ptr, last_c_ptr,
    h_ptr, r_ptr, part, G, U, K, T, P, CH, i_now, factor, prune, zinv, zt, two,
    KP: tl.constexpr, BU: tl.constexpr, PRUNE: tl.constexpr, KZ: tl.constexpr,
    CLAMP: tl.constexpr, EZ: tl.constexpr, ACC: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Pass i_now of _bwd_loop on chunk p of each row: i_now == -1 the output's centroid
    gradient (partials in slot 0 of part [T + 2, G, P, KP]), i_now = i >= 0 the backward of
    iteration last_it - i (partials in slot i + 1; the output term of pass 0 in slot T + 1),
    writing the chunk's r (and h in pass 0). grad_c replayed from the earlier passes' partials."""
    g, p, kidx, kmask, row, lo, hi = _chunk(K, U, CH, KP)
    n = tl.load(last_it_ptr + g).to(tl.int32)
    prev_c = tl.load(prev_c_ptr + g * K + kidx, mask=kmask, other=0.0)
    last_c = tl.load(last_c_ptr + g * K + kidx, mask=kmask, other=0.0)
    if i_now < 0:
        d_last = _bwd_last(
            v_ptr, gs_ptr, row, lo, hi, prev_c, kidx, kmask, factor, prune, zinv, zt,
            KP, BU, PRUNE, KZ, CLAMP, ACC, STAGES,
        )  # fmt: skip
        tl.store(part + (g * P + p) * KP + kidx, d_last)
    elif i_now <= n:
        d_last = tl.zeros([KP], dtype=tl.float64)
        for q in range(0, P):
            d_last += tl.load(part + (g * P + q) * KP + kidx)
        grad_c = d_last.to(tl.float32)
        for i in range(0, i_now + 1):  # the passes before i_now replayed, then i_now itself
            t = n - i
            with_out = i == 0
            c, raw, s_hat, g_in = _bwd_state(
                c_hist, raw_hist, mass_hist, t, G, g, K, kidx, kmask, prev_c, with_out, grad_c, EZ
            )
            acc = tl.zeros([KP], dtype=tl.float64)
            acc_o = tl.zeros([KP], dtype=tl.float64)
            if i < i_now:
                for q in range(0, P):
                    acc += tl.load(part + (((i + 1) * G + g) * P + q) * KP + kidx)
                    if with_out:
                        acc_o += tl.load(part + (((T + 1) * G + g) * P + q) * KP + kidx)
            else:
                acc, acc_o = _bwd_sweep(
                    v_ptr, m_ptr, gs_ptr, h_ptr, r_ptr, row, lo, hi, c, s_hat, raw, last_c,
                    with_out, kidx, kmask, factor, prune, zinv, zt, two,
                    KP, BU, PRUNE, KZ, CLAMP, ACC, STAGES,
                )  # fmt: skip
                tl.store(part + (((i + 1) * G + g) * P + p) * KP + kidx, acc)
                if with_out:
                    tl.store(part + (((T + 1) * G + g) * P + p) * KP + kidx, acc_o)
            grad_c = _bwd_next(g_in, acc, acc_o, two, with_out)


def _split(u: int) -> int:
    """Codes per program for rows of u codes (0: one program per row)."""
    return _SPLIT_CODES if 0 < _SPLIT_CODES < u else 0


def _shapes(k: int, tile: int) -> tuple[int, int]:
    kp = max(2, triton.next_power_of_2(k))
    return kp, max(16, tile // kp)


def _launch_args(ct: tuple, enforce_zero: bool, kernel: str) -> tuple[int, tuple, dict]:
    """(K, the kernels' run-time scalars (factor, prune, zinv, zt), the compile-time arguments
    of ``kernel`` ("fwd" / "bwd": its _LAUNCH settings)) from the compiled kernels' cfg tuple
    (soft_kmeans._c_cfg)."""
    k, factor, prune, keep_zeros, zinv, clamp, zt, _ = ct
    warps, tile, acc, stages = _LAUNCH[kernel]
    kp, bu = _shapes(k, tile)
    consts = dict(
        KP=kp, BU=bu, PRUNE=prune > 0, KZ=bool(keep_zeros) and not prune > 0,
        CLAMP=bool(clamp), EZ=bool(enforce_zero), ACC=acc, STAGES=stages, num_warps=warps,
    )  # fmt: skip
    return k, (factor, prune, zinv, zt), consts


def fwd_loop(v: Tensor, m: Tensor, c: Tensor, ct: tuple, max_iter: int, epsilon: float,
             enforce_zero: bool):  # fmt: skip
    """All iterations and the output of one segment: v, m [G, U] float32 (contiguous), centroids
    c [G, K]; ``ct`` the compiled kernels' cfg tuple (soft_kmeans._c_cfg).

    Returns (y [G, U], prev_c, last_c [G, K], last_it int64 [G], c_hist, raw_hist, mass_hist
    [max_iter, G, K]): per group the centroids before and after its last iteration, that
    iteration, and each iteration's centroids, raw update and masses (a group's entries past
    its last iteration are its final centroids and zero masses)."""
    k, scalars, consts = _launch_args(ct, enforce_zero, "fwd")
    g, u = v.shape
    c = c.float().contiguous()
    c_hist, raw_hist, mass_hist = (v.new_empty(max_iter, g, k) for _ in range(3))
    prev_c, last_c = v.new_empty(g, k), v.new_empty(g, k)
    last_it = torch.empty(g, dtype=torch.int64, device=v.device)
    y = v.new_empty(g, u)
    ch = _split(u)
    if ch:
        pn = triton.cdiv(u, ch)
        part = torch.empty(max_iter, g, pn, 2, consts["KP"], dtype=torch.float64, device=v.device)
        part_in = torch.empty(max_iter, g, pn, dtype=torch.float64, device=v.device)
        for t in range(max_iter + 1):  # the iterations, then the output
            _fwd_pass[(g, pn)](
                v, m, c, c_hist, raw_hist, mass_hist, last_it, prev_c, last_c, y, part, part_in,
                g, u, k, max_iter, pn, ch, t, *scalars, epsilon,
                TEST=epsilon >= 0 and max_iter > 1, **consts,
            )  # fmt: skip
        return y, prev_c, last_c, last_it, c_hist, raw_hist, mass_hist
    _fwd_loop[(g,)](
        v, m, c, c_hist, raw_hist, mass_hist, last_it, prev_c, last_c, y,
        g, u, k, max_iter, *scalars, epsilon,
        TEST=epsilon >= 0 and max_iter > 1, **consts,
    )  # fmt: skip
    return y, prev_c, last_c, last_it, c_hist, raw_hist, mass_hist


def bwd_loop(state: dict, gsum: Tensor, ct: tuple, two: float, enforce_zero: bool):
    """Backward through ``fwd_loop``'s iterations (``state``: its arrays by name, v and m):
    per code (h, r) [G, U] with grad x_i = gsum-weighted slope h[u_i] g_i + r[u_i]."""
    k, scalars, consts = _launch_args(ct, enforce_zero, "bwd")
    v, m = state["v"], state["m"]
    g, u = v.shape
    gsum = gsum.float().contiguous()
    h, r = v.new_zeros(g, u), v.new_zeros(g, u)
    ch = _split(u)
    if ch:
        pn = triton.cdiv(u, ch)
        t_max = state["c_hist"].shape[0]
        part = torch.empty(t_max + 2, g, pn, consts["KP"], dtype=torch.float64, device=v.device)
        for i in range(-1, t_max):  # the output's centroid gradient, then each iteration's
            _bwd_pass[(g, pn)](
                v, m, gsum, state["c_hist"], state["raw_hist"], state["mass_hist"],
                state["last_it"], state["prev_c"], state["last_c"], h, r, part,
                g, u, k, t_max, pn, ch, i, *scalars, two, **consts,
            )  # fmt: skip
        return h, r
    _bwd_loop[(g,)](
        v, m, gsum, state["c_hist"], state["raw_hist"], state["mass_hist"], state["last_it"],
        state["prev_c"], state["last_c"], h, r, g, u, k, *scalars, two, **consts,
    )  # fmt: skip
    return h, r


# -- element passes -------------------------------------------------------------------------------
# The per-element side of a round (soft_kmeans._scalar_kmeans_forward / _ScalarKMeans.backward on
# the device layout): every element's 16-bit code, the codes' histogram, the soft weight
# gathered from the per-code table, the per-code sums of the incoming gradient and the
# gradient gathered back. The torch code writes each element's bin (an int32 per weight, kept
# for backward), concatenates the tensors of a run into one (a copy of every weight, and of
# every gradient twice), and gathers through the bins: ~15 launches and ~9 bytes of traffic a
# weight per pass. Here each pass is one launch over every tensor of the round, reading the
# weights where they are (a table of their addresses) and recomputing each code from the
# weight and its group's scale, as the compiled CPU passes do (_dkm_cpu.c: hist, gather,
# scatter, grad).

_ELEM_BLOCK = 4096  # elements per program
_ELEM_WARPS = 8
# the passes (OP): HIST 0, GATHER 1, SCATTER 2, GRAD 3 (soft_kmeans._HIST ...)
_STRIDE = (1 << 16) + 1  # a table row: 65,536 codes and the spare bin (soft_kmeans._STRIDE)


@triton.jit
def _elems(
    blocks, info, xp, gp, scale, table, outp,
    OP: tl.constexpr, KZ: tl.constexpr, BLOCK: tl.constexpr, STRIDE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(blocks + 2 * pid).to(tl.int64)  # the tensor
    b = tl.load(blocks + 2 * pid + 1).to(tl.int64)  # its block
    n = tl.load(info + 4 * t)  # its elements
    per = tl.load(info + 4 * t + 1)  # elements per LUT group
    row0 = tl.load(info + 4 * t + 2)  # its first group's table row
    x_ptr = tl.load(xp + t).to(tl.pointer_type(tl.float32))
    offs = b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if per >= n:  # one LUT group (a per-tensor LUT): one row, one scale, no division
        row = tl.zeros([BLOCK], dtype=tl.int64) + row0
        s = tl.zeros([BLOCK], dtype=tl.float32) + tl.load(scale + row0)
    else:
        row = row0 + offs // per
        s = tl.load(scale + row, mask=mask, other=1.0)
    # the fp16 bit pattern of x * scale (round to nearest even, as torch's cast), + 2^15
    half = (x * s).to(tl.float16)
    bits = half.to(tl.int16, bitcast=True).to(tl.int32)
    if KZ:  # a tiny non-zero weight takes the smallest subnormal of its sign, not zero
        tiny = tl.where(x > 0, 1, -32767)
        bits = tl.where((half == 0) & (x != 0), tiny, bits)
    idx = row * STRIDE + (bits + 32768).to(tl.int64)
    if OP == 0:
        tl.atomic_add(table + idx, 1, mask=mask, sem="relaxed")
    elif OP == 1:
        y = tl.load(table + idx, mask=mask, other=0.0)
        o_ptr = tl.load(outp + t).to(tl.pointer_type(tl.float32))
        tl.store(o_ptr + offs, y, mask=mask)
    else:
        g_ptr = tl.load(gp + t).to(tl.pointer_type(tl.float32))
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        if OP == 2:
            tl.atomic_add(table + idx, g, mask=mask, sem="relaxed")
        else:  # table: (h, r) per code side by side
            h = tl.load(table + 2 * idx, mask=mask, other=0.0)
            r = tl.load(table + 2 * idx + 1, mask=mask, other=0.0)
            o_ptr = tl.load(outp + t).to(tl.pointer_type(tl.float32))
            tl.store(o_ptr + offs, g * h + r, mask=mask)


_plans: dict[tuple, tuple[Tensor, Tensor]] = {}
_PLANS_MAX = 16


def elem_plan(
    tensors: list[tuple[int, int, int, int]], device: torch.device
) -> tuple[Tensor, Tensor]:
    """The launch plan of an element pass over ``tensors`` (per tensor: elements, elements
    per LUT group, first table row, first element among the plan's tensors stacked), cached:
    (blocks [P, 2] int32: each program's tensor and block, info [T, 4] int64)."""
    key = (device, tuple(tensors))
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= _PLANS_MAX:
            _plans.clear()
        info = torch.tensor(tensors, dtype=torch.int64).view(-1, 4)
        nb = (info[:, 0] + _ELEM_BLOCK - 1) // _ELEM_BLOCK
        item = torch.repeat_interleave(torch.arange(len(tensors)), nb)
        first = torch.cumsum(nb, 0) - nb
        block = torch.arange(item.numel()) - first[item]
        blocks = torch.stack([item, block], 1).to(torch.int32)
        plan = _plans[key] = (blocks.to(device), info.to(device))
    return plan


def elems(
    kind: int,
    plan: tuple[Tensor, Tensor],
    xp: Tensor,
    scale: Tensor,
    table: Tensor,
    keep_zeros: bool,
    gp: Tensor | None = None,
    outp: Tensor | None = None,
) -> None:
    """One element pass over the plan's tensors (``kind``: 0 HIST, 1 GATHER, 2 SCATTER,
    3 GRAD).

    Args:
        plan: :func:`elem_plan` of the tensors.
        xp: int64 [T], each tensor's address (contiguous float32 weights, C order = its
            [G, N] LUT groups).
        scale: float32 [rows], each table row's scale (soft_kmeans._group_scales).
        table: [rows * 65537]: HIST int32 counts (added to), GATHER float32 per-code values,
            SCATTER float32 per-code sums (added to), GRAD float32 (h, r) pairs
            ([rows * 65537, 2]).
        keep_zeros: a non-zero weight never takes the zero code (enforce_zero).
        gp: int64 [T], each tensor's incoming gradient's address (SCATTER, GRAD).
        outp: int64 [T], the address each tensor's result goes to (contiguous float32;
            GATHER: its soft weight, GRAD: its gradient).
    """
    blocks, info = plan
    if blocks.shape[0] == 0:
        return
    gp = xp if gp is None else gp
    outp = xp if outp is None else outp
    _elems[(blocks.shape[0],)](
        blocks, info, xp, gp, scale, table, outp,
        OP=kind, KZ=bool(keep_zeros), BLOCK=_ELEM_BLOCK, STRIDE=_STRIDE, num_warps=_ELEM_WARPS,
    )  # fmt: skip
