"""Clustering kernels on plain tensors: exact weighted 1-D k-means and vector k-means.

Both work on LUT groups batched in one tensor, ``x[G, N]`` (scalars) or ``x[G, N, d]`` (vectors),
and know nothing about modules.

1-D k-means is solved exactly. Optimal 1-D clusters are contiguous runs of the sorted values, so
a dynamic program over the *distinct* values (with their counts or summed importances as
weights) finds the global optimum; it runs in the compiled ``_kmeans1d`` extension in
O(K m log m) for m distinct values. Two ways to get the distinct values:

* ``exact=True``: every distinct input value is a bin. The result is the global optimum for the
  values and weights given.
* ``exact=False`` (default, fast): values are binned by their 16-bit float code. fp16 and bf16
  weights have at most 65,536 codes, so the bins are their exact values. fp32 weights are first
  scaled per group by a power of two (exact) so that the group's largest magnitude sits at the
  top of the fp16 range, which keeps 11 significant bits for every weight down to 2^-29 of the
  largest: small weights keep full relative precision (coremltools' decimal rounding does
  not). Values sharing a code share a cluster, which costs a second-order amount of error
  (the bench and tests measure it well below 0.1% of the exact optimum). Groups with over
  2,048 distinct codes are first solved over coarse blocks of codes, then every boundary is
  re-solved exactly over the full codes within a window around it until none sits on a
  window edge: the windowed optimum, equal to the global one in the tests (fp16/bf16 groups
  against exact mode) and within 3e-4 of it on every bench layer.

On CPU tensors both modes run per LUT group in one compiled call (``_kmeans1d.codes`` /
``_kmeans1d.exact``: histogram or radix sort, DP, centroids, labels; groups split over two
threads); elsewhere the torch program below builds the bins and only the DP runs in C. Tests
check that the two give the same result.

Vectors (``cluster_dim > 1``) use weighted k-means++ seeding and Lloyd's iterations, restarted
``n_init`` times with the best inertia kept per group. Every restart draws its seeds from one
set of uniforms generated from ``seed``, so all devices seed alike. On CPU tensors the compiled
``_kmeansvec`` kernel runs them: Hamerly's bounds skip every vector that cannot change cluster
(the same assignments as plain Lloyd), the centroid sums and the inertia are updated
incrementally, and the restarts are split over two threads. On the MLP's 1024x1024 layer it is
about 6x faster than the torch program below (bench/vectors.py), which other devices run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

try:
    from lightning_palettize import _kmeans1d
except ImportError as err:  # pragma: no cover - only on a broken install
    raise ImportError(
        "lightning_palettize._kmeans1d (the compiled 1-D k-means kernel) is missing: reinstall the "
        "package with `pip install -e .` or `pip install lightning-palettize` (needs a C compiler "
        "when installing from source)"
    ) from err
try:
    from lightning_palettize import _kmeansvec
except ImportError as err:  # pragma: no cover - only on a broken install
    raise ImportError(
        "lightning_palettize._kmeansvec (the compiled vector k-means kernel) is missing: reinstall "
        "the package with `pip install -e .` (needs a C compiler when installing from source)"
    ) from err

__all__ = ["KMeansResult", "kmeans_1d", "kmeans_vectors", "kmeans", "kmeans_many"]

_NCODES = 65536
# Elements handled per step: bounds the temporaries (~14 bytes per element) to a few MB, so
# compress stays within ~2x the dense bytes of the weights it palettizes.
_CHUNK = 1 << 16
# Groups whose 65,536-code tables are held at once (int64 counts: 512 KiB per group).
_TABLE_GROUPS = 4
# Elements of the groups clustered together in fast mode (bounds the per-bin arrays).
_BATCH = 1 << 18
# In fast mode a cluster must span at least this many codes unless its codes are single values.
_MIN_BINS_PER_CLUSTER = 32


@dataclass
class KMeansResult:
    """Centroids and assignments for G LUT groups.

    Attributes:
        centroids: ``[G, K]`` (1-D) or ``[G, K, d]`` float32. In 1-D the centroids of a group are
            sorted ascending; a slot no value is assigned to (a group with fewer than K distinct
            values, or zero weights that leave nothing to split) repeats the centroid before it,
            so with fewer than K distinct values the tail repeats the largest centroid.
        labels: ``[G, N]`` uint8 (K <= 256) or int64 index of each value's centroid.
        inertia: ``[G]`` float64 weighted squared error of each group, as the solver measured
            it (on the bins it clustered).
    """

    centroids: Tensor
    labels: Tensor
    inertia: Tensor


def _label_dtype(k: int) -> torch.dtype:
    return torch.uint8 if k <= 256 else torch.int64


def _check_input(x: Tensor, k: int, weights: Tensor | None, ndim: int, values: bool = True) -> None:
    """Shapes, k and weights; with ``values`` also that x is finite (the fused CPU kernel
    checks that itself)."""
    if not isinstance(x, Tensor) or x.dim() != ndim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected a tensor of rank {ndim}, got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if x.shape[1] == 0:
        raise ValueError("x: groups are empty (N == 0)")
    # One reduction instead of a weight-sized bool mask: NaN and Inf propagate into the sum
    # (the full check runs only if the sum is not finite, e.g. after an fp32 overflow).
    if values:
        total = x.sum(dtype=torch.float32)
        if not bool(torch.isfinite(total)) and not bool(torch.isfinite(x).all()):
            _non_finite()
    if weights is not None:
        if tuple(weights.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"weights: expected shape {tuple(x.shape[:2])} (one per value or vector), "
                f"got {tuple(weights.shape)}"
            )
        # the compiled kernels read them in float32: finite there too
        if not bool(torch.isfinite(weights.float()).all()) or bool((weights < 0).any()):
            raise ValueError("weights: must be finite (in float32) and non-negative")


def _non_finite():
    raise ValueError("x: contains NaN or Inf values; cannot cluster them")


# --------------------------------------------------------------------------------------------
# 1-D: binning
# --------------------------------------------------------------------------------------------


@dataclass
class _Bins:
    """Distinct values of each group in ascending order, CSR layout over groups."""

    offsets: np.ndarray  # int64 [G+1]
    value: Tensor  # float64 [T] representative value of each bin
    weight: Tensor  # float64 [T] summed weight (count when unweighted)
    wsum: Tensor  # float64 [T] summed weight * value
    wsq: Tensor  # float64 [T] summed weight * value^2
    count: Tensor  # float64 [T] number of elements


def _pow2_scale(x: Tensor) -> Tensor:
    """Per-group power of two that maps each group's max |x| into [2^14, 2^15)."""
    amax = x.abs().amax(dim=1).double()
    e = torch.where(
        amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-300))), torch.zeros_like(amax)
    )
    return torch.exp2(14.0 - e)


def _raw_codes(x: Tensor, scale: Tensor | None) -> Tensor:
    """The 16-bit float bit pattern (int32 in 0..65535) of every element of x[g, n]: fp16/bf16
    inputs as they are, fp32 after the exact power-of-two scaling of its group."""
    if x.dtype in (torch.float16, torch.bfloat16):
        h = x
    else:
        h = (x.float() * scale.float().unsqueeze(1)).half()
    return h.view(torch.int16).int() & 0xFFFF


def _order_key(raw: Tensor) -> Tensor:
    """Order-preserving key of raw 16-bit patterns: sign bit flipped for positives, all bits
    flipped for negatives (applied to the few distinct codes, not to every element)."""
    return torch.where(raw >= 0x8000, raw ^ 0xFFFF, raw ^ 0x8000)


def _group_chunks(g_total: int, n: int):
    """(g0, g1, [(n0, n1), ...]): a few groups at a time, elements in ~_CHUNK pieces."""
    gc = max(1, min(_TABLE_GROUPS, _CHUNK // max(n, 1)))
    for g0 in range(0, g_total, gc):
        g1 = min(g_total, g0 + gc)
        nc = max(1, _CHUNK // (g1 - g0))
        yield g0, g1, [(n0, min(n, n0 + nc)) for n0 in range(0, n, nc)]


def _code_bins(
    x: Tensor, weights: Tensor | None
) -> tuple[_Bins, Tensor | None, Tensor, Tensor | None]:
    """Histogram of 16-bit codes per group. Returns bins (ascending values per group), the fp32
    scale (or None), the global raw key (group * 65536 + bit pattern) of every bin, and for
    small groups each element's bin index (else None: look codes up in a table)."""
    g_total, n = x.shape
    device = x.device
    scale = None if x.dtype in (torch.float16, torch.bfloat16) else _pow2_scale(x)
    inverse = None
    if n * 4 < _NCODES:
        # Small groups: sorting the few codes beats 65,536-entry tables per group.
        base = (torch.arange(g_total, device=device, dtype=torch.int64) * _NCODES).unsqueeze(1)
        key = (_raw_codes(x, scale) + base).reshape(-1)
        graw, inverse, cnt = torch.unique(key, return_inverse=True, return_counts=True)
        counts = [cnt.double()]
        if weights is None:
            wsums = counts
        else:
            wsums = [
                torch.bincount(inverse, weights=weights.reshape(-1).double(), minlength=len(graw))
            ]
        raws = [graw]
    else:
        raws, counts, wsums = [], [], []
        for g0, g1, steps in _group_chunks(g_total, n):
            base = (torch.arange(g1 - g0, device=device, dtype=torch.int32) * _NCODES).unsqueeze(1)
            cnt = torch.zeros((g1 - g0) * _NCODES, dtype=torch.int64, device=device)
            wsum = None if weights is None else torch.zeros_like(cnt, dtype=torch.float64)
            for n0, n1 in steps:
                xs = x[g0:g1, n0:n1]
                key = (_raw_codes(xs, None if scale is None else scale[g0:g1]) + base).reshape(-1)
                cnt += torch.bincount(key, minlength=cnt.numel())
                if wsum is not None:
                    w = weights[g0:g1, n0:n1].reshape(-1).double()
                    wsum += torch.bincount(key, weights=w, minlength=cnt.numel())
            present = cnt.nonzero().squeeze(1)
            raws.append(present + g0 * _NCODES)
            counts.append(cnt[present].double())
            wsums.append(counts[-1] if wsum is None else wsum[present])
    graw = torch.cat(raws)  # group * 65536 + raw pattern, in raw order
    gid = graw // _NCODES
    raw = graw % _NCODES
    # Present codes come per group in ascending bit pattern: positives ascending, then negatives
    # with growing magnitude. Value order is the negatives reversed, then the positives.
    lengths = torch.bincount(gid, minlength=g_total)
    npos = torch.bincount(gid[raw < 0x8000], minlength=g_total)
    start = torch.cumsum(lengths, 0) - lengths
    local = torch.arange(len(graw), device=device) - start[gid]
    p, q = npos[gid], (lengths - npos)[gid]
    target = start[gid] + torch.where(local < p, q + local, p + q - 1 - local)
    order = torch.empty_like(target)
    order[target] = torch.arange(len(target), device=device)
    graw, gid, raw = graw[order], gid[order], raw[order]
    if inverse is not None:
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=device)
        inverse = rank[inverse]
    count, w = torch.cat(counts)[order], torch.cat(wsums)[order]
    half = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float16
    value = raw.to(torch.int32).to(torch.int16).view(half).double()
    if scale is not None:
        value = value / scale[gid]
    offsets = np.zeros(g_total + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(torch.bincount(gid, minlength=g_total).cpu().numpy())
    bins = _Bins(offsets, value, w, w * value, w * value * value, count)
    return bins, scale, graw, inverse


def _exact_bins(x: Tensor, weights: Tensor | None) -> tuple[_Bins, Tensor]:
    """Every distinct value of each group is a bin (sort based). Returns bins and the sorted
    distinct values used as label boundaries."""
    g_total, n = x.shape
    xs, perm = torch.sort(x.double(), dim=1)
    start = torch.ones_like(xs, dtype=torch.bool)
    start[:, 1:] = xs[:, 1:] != xs[:, :-1]
    bin_id = torch.cumsum(start.reshape(-1), 0) - 1
    nbins = int(bin_id[-1]) + 1
    w = torch.ones_like(xs) if weights is None else torch.gather(weights.double(), 1, perm)
    flat_x, flat_w = xs.reshape(-1), w.reshape(-1)
    count = torch.bincount(bin_id, minlength=nbins).double()
    wsum = torch.bincount(bin_id, weights=flat_w, minlength=nbins)
    wx = torch.bincount(bin_id, weights=flat_w * flat_x, minlength=nbins)
    wxx = torch.bincount(bin_id, weights=flat_w * flat_x * flat_x, minlength=nbins)
    value = flat_x[start.reshape(-1)]
    offsets = np.zeros(g_total + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(start.sum(dim=1).cpu().numpy())
    return _Bins(offsets, value, wsum, wx, wxx, count), value


def _solve_bins(
    bins: _Bins, k: int, keys: Tensor | None = None, shift: int = 0
) -> tuple[np.ndarray, Tensor, Tensor, Tensor]:
    """Run the DP. Returns cluster starts [G, k+1] (bin index, CSR-local), centroids [G, k]
    (float64), inertia [G] and the element count of each cluster [G, k]."""
    g_total = len(bins.offsets) - 1
    gid = torch.repeat_interleave(
        torch.arange(g_total), torch.from_numpy(np.diff(bins.offsets))
    ).to(bins.value.device)
    # Centre each group on its weighted mean so the prefix sums in the DP do not cancel.
    wtot = torch.zeros(g_total, dtype=torch.float64, device=gid.device).index_add_(
        0, gid, bins.weight
    )
    mu = torch.zeros_like(wtot).index_add_(0, gid, bins.wsum) / wtot.clamp_min(1e-300)
    m = mu[gid]
    s1 = bins.wsum - bins.weight * m
    s2 = (bins.wsq - 2 * m * bins.wsum + bins.weight * m * m).clamp_min(0)
    w_np = bins.weight.cpu().numpy().astype(np.float64, copy=False)
    s1_np = np.ascontiguousarray(s1.cpu().numpy())
    s2_np = np.ascontiguousarray(s2.cpu().numpy())
    out = np.zeros(g_total * (k + 1), dtype=np.int64)
    if keys is None:
        key_np = np.zeros(len(w_np), dtype=np.int32)
    else:
        key_np = np.ascontiguousarray(keys.cpu().numpy().astype(np.int32, copy=False))
    args = (np.ascontiguousarray(w_np), s1_np, s2_np, key_np, bins.offsets, k, out)
    _on_two_threads(lambda g0, g1: _kmeans1d.solve(*args, g0, g1, shift), np.diff(bins.offsets))
    starts = out.reshape(g_total, k + 1)

    # Cluster sums from per-group prefix sums over the bins.
    dev = bins.value.device
    base = torch.from_numpy(bins.offsets[:-1]).to(dev).unsqueeze(1)
    idx = base + torch.from_numpy(starts).to(dev)  # [G, k+1] global bin index

    def seg(v: Tensor) -> Tensor:
        p = torch.cat([v.new_zeros(1), torch.cumsum(v, 0)])
        return p[idx[:, 1:]] - p[idx[:, :-1]]

    sw, sx, sxx = seg(bins.weight), seg(bins.wsum), seg(bins.wsq)
    sc, sv = seg(bins.count), seg(bins.value * bins.count)
    nonempty = sc > 0
    # Each cluster from its own bins: weighted mean, or the plain mean of a weightless one.
    cent = torch.where(sw > 0, sx / sw.clamp_min(1e-300), sv / sc.clamp_min(1))
    inertia = torch.where(nonempty, (sxx - 2 * cent * sx + cent * cent * sw).clamp_min(0), 0)
    # Empty slots (anywhere: with weightless bins the DP may leave some between real clusters)
    # repeat the nearest real centroid before them, as clusters_from_prefix in _kmeans1d.c
    # does; the first cluster always holds a bin. Keeps each LUT sorted.
    slot = torch.arange(k, device=dev).unsqueeze(0)
    src = torch.where(nonempty, slot, 0).cummax(dim=1).values
    cent = torch.gather(cent, 1, src)
    return starts, cent, inertia.sum(dim=1), sc


def kmeans_1d(
    x: Tensor, k: int, weights: Tensor | None = None, *, exact: bool = False
) -> KMeansResult:
    """Globally optimal weighted 1-D k-means for each of G groups.

    Args:
        x: ``[G, N]`` values (fp32, fp16, bf16 or fp64; any device). Must be finite.
        k: number of centroids per group (``2 ** n_bits``).
        weights: optional ``[G, N]`` non-negative importance per value (e.g. Fisher information);
            ``None`` means every value counts once.
        exact: cluster every distinct value (exact optimum for the given values) instead of their
            16-bit codes (see the module docstring; exact already for fp16/bf16 input).

    Returns:
        A :class:`KMeansResult` with sorted centroids ``[G, k]``, uint8 labels ``[G, N]`` and the
        per-group weighted inertia.

    Raises:
        ValueError: on a wrong shape, non-finite values or negative weights.

    Example:
        >>> r = kmeans_1d(torch.tensor([[0.0, 0.125, 1.0, 1.125]]), 2)
        >>> r.centroids
        tensor([[0.0625, 1.0625]])
    """
    fused = not exact and _fused_ok(x, k)
    _check_input(x, k, weights, 2, values=not fused)
    if fused:
        return _kmeans_1d_codes_cpu([x], [k], [weights])[0]
    g_total, n = x.shape
    device = x.device
    if g_total == 0:  # no LUT group (a layer without output channels)
        return KMeansResult(
            torch.empty(0, k, device=device),
            torch.empty(0, n, dtype=_label_dtype(k), device=device),
            torch.empty(0, dtype=torch.float64, device=device),
        )
    if exact or x.dtype == torch.float64:
        return _kmeans_1d_exact(x, k, weights)
    labels = torch.empty((g_total, n), dtype=_label_dtype(k), device=device)
    # Groups are solved a batch at a time so the per-bin arrays stay small.
    gb = max(1, _BATCH // n)
    cent = torch.empty(g_total, k, dtype=torch.float32, device=device)
    inertia = torch.empty(g_total, dtype=torch.float64, device=device)
    for g0 in range(0, g_total, gb):
        g1 = min(g_total, g0 + gb)
        w = None if weights is None else weights[g0:g1]
        r = _kmeans_1d_codes(x[g0:g1], k, w, labels[g0:g1])
        cent[g0:g1], inertia[g0:g1] = r.centroids, r.inertia
    return KMeansResult(cent, labels, inertia)


def _kmeans_1d_codes(x: Tensor, k: int, weights: Tensor | None, labels: Tensor) -> KMeansResult:
    """Fast mode on a batch of groups; writes ``labels`` in place."""
    g_total, n = x.shape
    device = x.device
    bins, scale, gkey, inverse = _code_bins(x, weights)
    # the coarse level (see coarse_id in _kmeans1d.c): blocks of 2**shift codes in the top
    # three binades, coarser further down; one shift for the batch, from its largest group
    shift = _kmeans1d.coarse_shift(int(np.diff(bins.offsets).max()) if g_total else 0, k)
    starts, cent, inertia, count = _solve_bins(bins, k, _order_key(gkey % _NCODES), shift)
    # Label of each present code = its cluster. Global bin index of every cluster start after
    # the first is sorted across groups, so one searchsorted counts the starts at or before each
    # bin (minus those of earlier groups).
    gid = gkey // _NCODES
    gstart = (torch.from_numpy(starts[:, 1:k] + bins.offsets[:-1, None]).to(device)).reshape(-1)
    pos = torch.arange(len(gkey), device=device)
    lab_of_bin = torch.searchsorted(gstart, pos, right=True) - gid * (k - 1)
    lab_of_bin = lab_of_bin.to(labels.dtype)
    if inverse is not None:
        labels.copy_(lab_of_bin[inverse].view(g_total, n))
    for g0, g1, steps in _group_chunks(g_total, n) if inverse is None else ():
        # code -> label table of these groups only (absent codes are never looked up)
        table = torch.zeros((g1 - g0) * _NCODES, dtype=labels.dtype, device=device)
        b0, b1 = int(bins.offsets[g0]), int(bins.offsets[g1])
        table[gkey[b0:b1] - g0 * _NCODES] = lab_of_bin[b0:b1]
        base = (torch.arange(g1 - g0, device=device, dtype=torch.int32) * _NCODES).unsqueeze(1)
        for n0, n1 in steps:
            xs = x[g0:g1, n0:n1]
            key = _raw_codes(xs, None if scale is None else scale[g0:g1]) + base
            labels[g0:g1, n0:n1] = table.index_select(0, key.reshape(-1)).view(key.shape)
    result = KMeansResult(cent.float(), labels, inertia)
    if scale is not None:
        # fp32 only: a cluster spanning few codes that hold several elements each is too coarsely
        # resolved by the codes (e.g. 8 bits on a narrow mode); redo such groups exactly.
        nb = torch.from_numpy(np.diff(starts, axis=1)).to(device)
        _redo_exact(result, x, k, weights, ((nb < _MIN_BINS_PER_CLUSTER) & (count > 2 * nb)).any(1))
    return result


_pool: tuple[int, ThreadPoolExecutor] | None = None
_NCPU = os.cpu_count() or 1


def _in_parallel(first: Callable[[], None], second: Callable[[], None]) -> None:
    """Run ``second`` on a persistent worker thread while ``first`` runs here; both are kernel
    calls that release the GIL. Returns when both are done (an error of either is raised). The
    worker is re-created after a fork (a forked child has no threads)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="lp-kmeans"))
    other = _pool[1].submit(second)
    try:
        first()
    finally:
        other.result()


def _on_two_threads(solve, work: np.ndarray) -> None:
    """``solve(g0, g1)`` (a kernel call that releases the GIL) over the groups, ``work[g]``
    elements or bins each: in two halves of equal work (:func:`_in_parallel`), or in one call
    when there is little work (under 8,192), one group holds over 2/3 of it (a split would gain
    under 1.5x and touch the worker's own ~1 MB workspace) or there is one CPU."""
    g_total, total = len(work), int(work.sum())
    if g_total < 2 or total < 8192 or _NCPU == 1 or 3 * int(work.max()) > 2 * total:
        solve(0, g_total)
        return
    cut = min(max(int(np.searchsorted(np.cumsum(work), total / 2)) + 1, 1), g_total - 1)
    _in_parallel(lambda: solve(0, cut), lambda: solve(cut, g_total))


def _redo_exact(
    result: KMeansResult, x: Tensor, k: int, weights: Tensor | None, redo: Tensor
) -> None:
    """Re-solve the groups flagged in ``redo`` [G] bool with the exact DP, in place."""
    if bool(redo.any()):
        idx = redo.nonzero().squeeze(1)
        sub = _kmeans_1d_exact(x[idx], k, None if weights is None else weights[idx])
        result.centroids[idx] = sub.centroids
        result.labels[idx] = sub.labels
        result.inertia[idx] = sub.inertia


# The CPU runs fast mode in one compiled pass per group (``_kmeans1d.codes``); the torch
# program above is the same computation for other devices (and what tests compare it with).
_FUSED_CPU = True
_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # _kmeans1d.c's IN_*


def _fused_ok(x: Tensor, k: int) -> bool:
    return (
        _FUSED_CPU
        and isinstance(x, Tensor)
        and x.device.type == "cpu"
        and x.dtype in _KINDS
        and isinstance(k, int)
        and k <= 256
    )


def _kmeans_1d_codes_cpu(
    xs: list[Tensor], ks: list[int], weights: list[Tensor | None]
) -> list[KMeansResult]:
    """Fast mode on CPU tensors ``x[G, N]``: the same bins, DP and labels as
    :func:`_kmeans_1d_codes`, every LUT group of every tensor in one compiled call (split over
    two threads by size); NaN and Inf are found by the kernel."""
    keep, rows, outs = [], [], []
    for x, k, w in zip(xs, ks, weights):
        g_total, n = x.shape
        xin = x.contiguous()
        win = None if w is None else w.to(torch.float32).contiguous()
        labels = torch.empty(g_total, n, dtype=torch.uint8)
        cent = torch.empty(g_total, k, dtype=torch.float32)
        keep += [xin, win]
        outs.append((labels, cent))
        # one job row per LUT group (see py_codes in _kmeans1d.c): addresses into the tensors
        xp, step, kind = xin.data_ptr(), n * xin.element_size(), _KINDS[x.dtype]
        wp, lp, cp = 0 if win is None else win.data_ptr(), labels.data_ptr(), cent.data_ptr()
        rows += [
            (xp + q * step, kind, wp and wp + q * n * 4, n, k, lp + q * n, cp + q * k * 4)
            for q in range(g_total)
        ]
    jobs = np.array(rows, dtype=np.int64).reshape(-1, 7)
    inertia = torch.empty(len(jobs), dtype=torch.float64)
    flag = np.zeros(len(jobs), dtype=np.uint8)
    args = (jobs, inertia.numpy(), flag)
    _on_two_threads(lambda g0, g1: _kmeans1d.codes(*args, g0, g1), jobs[:, 3])
    if len(flag) and flag.max() == 2:
        _non_finite()
    results, g0 = [], 0
    for x, k, w, (labels, cent) in zip(xs, ks, weights, outs):
        g1 = g0 + x.shape[0]
        result = KMeansResult(cent, labels, inertia[g0:g1])
        if flag[g0:g1].any():
            # too coarsely resolved by the codes (see _kmeans_1d_codes), or fp32 values so small
            # that their power-of-two scale leaves the float range: those groups exactly
            _redo_exact(result, x, k, w, torch.from_numpy(flag[g0:g1] == 1))
        results.append(result)
        g0 = g1
    return results


def _kmeans_1d_exact(x: Tensor, k: int, weights: Tensor | None) -> KMeansResult:
    g_total, n = x.shape
    device = x.device
    if _fused_ok(x, k):  # float32 holds fp16/bf16 values exactly
        xin = x.detach().to(torch.float32).contiguous()
        w = None if weights is None else weights.detach().to(torch.float32).contiguous().numpy()
        labels = torch.empty((g_total, n), dtype=torch.uint8)
        cent = torch.empty(g_total, k, dtype=torch.float32)
        inertia = torch.empty(g_total, dtype=torch.float64)
        args = (xin.numpy(), w, k, labels.numpy(), cent.numpy(), inertia.numpy())
        _on_two_threads(lambda g0, g1: _kmeans1d.exact(*args, g0, g1), np.full(g_total, n))
        return KMeansResult(cent, labels, inertia)
    labels = torch.empty((g_total, n), dtype=_label_dtype(k), device=device)
    bins, value = _exact_bins(x, weights)
    starts, cent, inertia, _ = _solve_bins(bins, k)
    # Label = number of cluster starts (after the first) whose value is <= x.
    sent = torch.cat([value, value.new_full((1,), math.inf)])
    base = torch.from_numpy(bins.offsets[:-1]).to(device).unsqueeze(1)
    lengths = torch.from_numpy(np.diff(bins.offsets)).to(device).unsqueeze(1)
    sidx = torch.from_numpy(starts[:, 1:k]).to(device)
    bound = torch.where(sidx < lengths, sent[(base + sidx).clamp_max(len(value))], math.inf)
    xd = x.double()
    step = max(1, _CHUNK // n)
    for g0 in range(0, g_total, step):
        lab = torch.searchsorted(
            bound[g0 : g0 + step].contiguous(), xd[g0 : g0 + step].contiguous(), right=True
        )
        labels[g0 : g0 + step] = lab.to(labels.dtype)
    return KMeansResult(cent.float(), labels, inertia)


# --------------------------------------------------------------------------------------------
# Vectors
# --------------------------------------------------------------------------------------------


def _sq_dist_argmin(x: Tensor, c: Tensor, chunk: int = 1 << 16) -> tuple[Tensor, Tensor]:
    """Nearest centroid and its squared distance for x[G, N, d], c[G, K, d], chunked over N."""
    g_total, n, _ = x.shape
    labels = torch.empty(g_total, n, dtype=torch.int64, device=x.device)
    dmin = torch.empty(g_total, n, dtype=x.dtype, device=x.device)
    ct = c.transpose(1, 2)
    c2 = (c * c).sum(-1).unsqueeze(1)  # [G, 1, K]
    for n0 in range(0, n, chunk):
        xs = x[:, n0 : n0 + chunk]
        # |x|^2 does not change the argmin: add it to the minimum only.
        scores = torch.baddbmm(c2, xs, ct, alpha=-2.0)
        v, i = scores.min(dim=2)
        labels[:, n0 : n0 + chunk] = i
        dmin[:, n0 : n0 + chunk] = (v + (xs * xs).sum(-1)).clamp_min(0)
    return labels, dmin


def _draw(p: Tensor, u: Tensor) -> Tensor:
    """Per group, the index where the running sum of ``p[G, N]`` (float64) first exceeds
    ``u[G]`` times its total; uniform over N where the total is zero (_kmeansvec.c's draw)."""
    n = p.shape[1]
    cum = torch.cumsum(p, dim=1)
    total = cum[:, -1]
    hit = torch.searchsorted(cum, (u * total).unsqueeze(1), right=True).squeeze(1)
    # rounding can leave the target at the total: the last vector with p > 0
    last = (n - 1 - torch.flip(p > 0, [1]).int().argmax(dim=1)).clamp_min(0)
    hit = torch.minimum(hit, last)
    flat = (u * n).long().clamp_max(n - 1)
    return torch.where(total > 0, hit, flat)


def _kmeanspp(x: Tensor, k: int, w: Tensor, u: Tensor) -> Tensor:
    """D^2-weighted k-means++ seeding, batched over groups; ``u[G, k]`` float64 uniforms pick
    the centroids (the first by ``w`` alone), as the compiled kernel does."""
    g_total, n, d = x.shape
    rows = torch.arange(g_total, device=x.device)
    u = u.to(x.device)
    cent = [x[rows, _draw(w.double(), u[:, 0])]]
    dmin = ((x - cent[0].unsqueeze(1)) ** 2).sum(-1)
    for t in range(1, k):
        c = x[rows, _draw((w * dmin).double(), u[:, t])]
        cent.append(c)
        dmin = torch.minimum(dmin, ((x - c.unsqueeze(1)) ** 2).sum(-1))
    return torch.stack(cent, dim=1)


def _lloyd(
    x: Tensor, c: Tensor, w: Tensor, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, Tensor]:
    g_total, n, d = x.shape
    k = c.shape[1]
    offs = (torch.arange(g_total, device=x.device) * k).unsqueeze(1)
    wx = (x * w.unsqueeze(-1)).reshape(-1, d)
    labels, dmin = _sq_dist_argmin(x, c)
    inertia = (dmin * w).sum()
    for _ in range(max_iter):
        flat = (labels + offs).reshape(-1)
        wsum = torch.zeros(g_total * k, dtype=x.dtype, device=x.device)
        wsum.index_add_(0, flat, w.reshape(-1))
        xsum = torch.zeros(g_total * k, d, dtype=x.dtype, device=x.device).index_add_(0, flat, wx)
        wsum, xsum = wsum.view(g_total, k), xsum.view(g_total, k, d)
        c = torch.where(wsum.unsqueeze(-1) > 0, xsum / wsum.clamp_min(1e-300).unsqueeze(-1), c)
        # Empty-cluster repair: the r-th empty centroid moves onto the r-th worst-served point
        # (served before this update) if that point was served at a positive distance.
        empty = wsum <= 0
        repaired = False
        if bool(empty.any()):
            top = torch.topk(dmin * w, min(k, n), dim=1)  # [G, m]
            rank = torch.cumsum(empty.long(), dim=1) - 1
            rank_ok = rank < top.indices.shape[1]
            rank = rank.clamp(0, top.indices.shape[1] - 1)
            move = empty & rank_ok & (torch.gather(top.values, 1, rank) > 0)
            pick = torch.gather(top.indices, 1, rank)
            repl = torch.gather(x, 1, pick.unsqueeze(-1).expand(-1, -1, d))
            c = torch.where(move.unsqueeze(-1), repl, c)
            repaired = bool(move.any())
        labels, dmin = _sq_dist_argmin(x, c)
        new = (dmin * w).sum()
        # Lloyd never increases the inertia; stop once it no longer improves meaningfully.
        if not repaired and float(inertia - new) <= tol * float(inertia):
            break
        inertia = new
    return c, labels, (dmin * w).sum(dim=1)


def kmeans_vectors(
    x: Tensor,
    k: int,
    weights: Tensor | None = None,
    *,
    seed: int = 0,
    n_init: int = 3,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> KMeansResult:
    """Weighted k-means of d-dimensional vectors: k-means++ seeding, Lloyd, empty-cluster repair.

    Deterministic for a given seed. The best of ``n_init`` seedings is kept per group.

    Args:
        x: ``[G, N, d]`` vectors (computation in float32, or float64 if given).
        k: number of centroids per group.
        weights: optional ``[G, N]`` non-negative importance per vector.
        seed: seed of the k-means++ sampling.
        n_init: number of seedings (at least: small problems, whose ``G * N * k * d`` is under
            ``2^20 / n_init``, get more, up to 16 or that budget); each group keeps its
            lowest-inertia run.
        max_iter: Lloyd iterations per run.
        tol: stop when an iteration lowers the inertia by less than this fraction.

    Returns:
        A :class:`KMeansResult` with centroids ``[G, k, d]``.

    Raises:
        ValueError: on a wrong shape, non-finite values, negative weights or bad arguments.
    """
    _check_input(x, k, weights, 3)
    if x.shape[0] == 0 or x.shape[2] == 0:
        raise ValueError(f"x: expected [G, N, d] with G >= 1 and d >= 1, got {tuple(x.shape)}")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be >= 1, got {n_init}, {max_iter}")
    g_total, n, d = x.shape
    # Small problems have many local optima and restarts cost next to nothing there: as many
    # as fit the budget, up to _MAX_RESTARTS (a 1024 x 1024 weight keeps n_init).
    n_init = max(n_init, min(_MAX_RESTARTS, _RESTART_BUDGET // (g_total * n * k * d)))
    # every restart's seeding draws from these, on every device (job g*n_init + r)
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(g_total, n_init, k, generator=gen, dtype=torch.float64)
    if _VECTORS_CPU and x.device.type == "cpu" and x.dtype != torch.float64 and k <= 256:
        return _kmeans_vectors_cpu(x, k, weights, u, max_iter, tol)
    xf = x if x.dtype == torch.float64 else x.float()
    w = torch.ones(xf.shape[:2], dtype=xf.dtype, device=x.device) if weights is None else weights
    w = w.to(xf.dtype)
    best = None
    for r in range(n_init):
        c0 = _kmeanspp(xf, k, w, u[:, r])
        c, labels, inertia = _lloyd(xf, c0, w, max_iter, tol)
        if best is None:
            best = [c, labels, inertia]
        else:
            better = inertia < best[2]
            best[0] = torch.where(better[:, None, None], c, best[0])
            best[1] = torch.where(better[:, None], labels, best[1])
            best[2] = torch.where(better, inertia, best[2])
    c, labels, inertia = best
    return KMeansResult(c.float(), labels.to(_label_dtype(k)), inertia.double())


# Restarts of small problems: n_init at least, more while restarts * G * N * K * d stays under
# the budget (~10 ms of Lloyd on this machine's CPU), at most _MAX_RESTARTS.
_RESTART_BUDGET = 1 << 20
_MAX_RESTARTS = 16

# float32 (and fp16/bf16) CPU vectors run in the compiled kernel (``_kmeansvec.run``): the same
# seeding and iterations as the torch program above, with Hamerly's bounds skipping the vectors
# that cannot change cluster. Tests compare the two.
_VECTORS_CPU = True


def _kmeans_vectors_cpu(
    x: Tensor, k: int, weights: Tensor | None, u: Tensor, max_iter: int, tol: float
) -> KMeansResult:
    g_total, n, d = x.shape
    n_init = u.shape[1]
    xin = x.detach().to(torch.float32).contiguous()
    win = None if weights is None else weights.detach().to(torch.float32).contiguous().numpy()
    # two result slots, one per thread: a group whose restarts are split keeps the better one
    cent = torch.empty(2, g_total, k, d, dtype=torch.float32)
    labels = torch.empty(2, g_total, n, dtype=torch.uint8)
    # -1: a slot no job of the group wrote (each call's first job of a group always writes)
    inertia = torch.full((2, g_total), -1.0, dtype=torch.float64)
    args = (xin.numpy(), win, u.contiguous().numpy(), d, k, n_init, max_iter, tol)

    def solve(j0: int, j1: int) -> None:
        s = 0 if j0 == 0 else 1
        _kmeansvec.run(*args, cent[s].numpy(), labels[s].numpy(), inertia[s].numpy(), j0, j1)

    _on_two_threads(solve, np.full(g_total * n_init, n * k * d))
    # ties keep slot 0 (the earlier restarts)
    written = inertia != -1.0
    better = written[1] & (~written[0] | (inertia[1] < inertia[0]))
    return KMeansResult(
        torch.where(better[:, None, None], cent[1], cent[0]),
        torch.where(better[:, None], labels[1], labels[0]),
        torch.where(better, inertia[1], inertia[0]),
    )


def kmeans(
    x: Tensor,
    k: int,
    weights: Tensor | None = None,
    *,
    exact: bool = False,
    seed: int = 0,
) -> KMeansResult:
    """Cluster ``x[G, N, d]``: the exact 1-D solver when ``d == 1``, vector k-means otherwise.

    Returns centroids shaped ``[G, k, d]`` in both cases.
    """
    return kmeans_many([x], [k], [weights], exact=exact, seed=seed)[0]


def kmeans_many(
    xs: Sequence[Tensor],
    ks: Sequence[int],
    weights: Sequence[Tensor | None] | None = None,
    *,
    exact: bool = False,
    seed: int = 0,
) -> list[KMeansResult]:
    """:func:`kmeans` of several tensors: ``kmeans(xs[i], ks[i], weights[i])`` for each i.

    1-D fast-mode CPU tensors (float32, float16, bfloat16; K <= 256) are clustered together in
    one compiled call whose LUT groups are split over two threads, so a model with many small
    layers pays the per-call and thread hand-off costs once, not per layer. The results are the
    same as one :func:`kmeans` call per tensor.

    Args:
        xs: tensors ``x[G_i, N_i, d_i]``.
        ks: number of centroids of each.
        weights: optional ``[G_i, N_i]`` importances of each (``None`` entries allowed).
        exact, seed: as for :func:`kmeans`.

    Returns:
        One :class:`KMeansResult` per tensor, in order.

    Raises:
        ValueError: on a wrong shape, non-finite values, negative weights or bad arguments.

    Example:
        >>> a, b = torch.randn(2, 64, 1), torch.randn(1, 32, 1)
        >>> [r.centroids.shape for r in kmeans_many([a, b], [4, 2])]
        [torch.Size([2, 4, 1]), torch.Size([1, 2, 1])]
    """
    if len(ks) != len(xs) or (weights is not None and len(weights) != len(xs)):
        raise ValueError(f"xs, ks and weights: expected one per tensor, got {len(xs)}, {len(ks)}")
    ws = [None] * len(xs) if weights is None else list(weights)
    for x in xs:
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected [G, N, d], got shape {shape}")
    out: list[KMeansResult | None] = [None] * len(xs)
    fused = [i for i, x in enumerate(xs) if x.shape[2] == 1 and not exact and _fused_ok(x, ks[i])]
    for i in fused:
        _check_input(xs[i][..., 0], ks[i], ws[i], 2, values=False)
    if fused:
        res = _kmeans_1d_codes_cpu(
            [xs[i][..., 0] for i in fused], [ks[i] for i in fused], [ws[i] for i in fused]
        )
        for i, r in zip(fused, res):
            out[i] = KMeansResult(r.centroids.unsqueeze(-1), r.labels, r.inertia)
    for i, x in enumerate(xs):
        if out[i] is not None:
            continue
        if x.shape[2] == 1:
            r = kmeans_1d(x[..., 0], ks[i], ws[i], exact=exact)
            out[i] = KMeansResult(r.centroids.unsqueeze(-1), r.labels, r.inertia)
        else:
            out[i] = kmeans_vectors(x, ks[i], ws[i], seed=seed)
    return out
