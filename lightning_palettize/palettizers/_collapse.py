"""Repair of collapsed (non-unique) DKM centroids: coremltools' ``palett_cluster_tol`` rule.

coremltools' DKM (``coremltools.optimize.torch.palettization.FakePalettize``, training forward,
under ``no_grad``) looks at every LUT partition's centroids ``C`` ([K, d]) after each k-means
update::

    clusters, inverse, counts = torch.unique(C.float(), dim=0, return_inverse=True,
                                             return_counts=True)
    n = len(clusters)
    if n < K * (1 - palett_cluster_tol):
        for j, count in enumerate(counts):
            if count > 1:
                C[inverse.tolist().index(j)] = 0.5 * (clusters[j] + clusters[(j + 1) % n])

That loop reads the device back to the host several times per partition. This module applies
the same rule to whole batches of centroid buffers with vectorized torch ops and no
device-to-host read, in a fixed number of op launches per (device, dtype, K, d) batch, whatever
the number of tensors and groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

__all__ = ["repair_collapsed_centroids", "plan_repair", "RepairPlan"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def repair_collapsed_centroids(
    centroids: Sequence[Tensor], tol: float | Sequence[float] = 0.0
) -> None:
    """Spread apart duplicated centroids, in place: coremltools' ``palett_cluster_tol`` rule.

    Every LUT group (row ``g`` of a ``[G, K, d]`` buffer: K centroids of dimension d) is handled
    on its own. Let ``n`` be the number of distinct centroids of the group (rows compared for
    exact equality, as ``torch.unique(dim=0)`` does) and ``U_0 < ... < U_{n-1}`` those distinct
    values in lexicographic order. If ``n < K * (1 - tol)`` (strict, evaluated in Python floats
    as coremltools does), then for every value ``U_j`` held by more than one centroid, the
    first of those centroids (the lowest index) is moved to the midpoint
    ``0.5 * (U_j + U_{(j + 1) % n})`` of it and the next larger distinct value (the largest
    wraps around to the smallest); all midpoints are computed from the values before the
    update. The other copies, and every centroid of a group that needs no change, keep their
    exact bits. A group with a single distinct value is left as it is (its "midpoint" is the
    value itself). This mirrors ``FakePalettize``'s loop in coremltools (option
    ``palett_cluster_tol``) bit for bit, up to the caveats below.

    It reads nothing back from the device (no ``.item()``, ``.tolist()``, ``nonzero``, data
    dependent shapes), so it can run every training step on a GPU without stalling the host.
    Tensors sharing (device, dtype, K, d) are concatenated and handled together, so the number
    of ops launched depends on the number of such batches only (about 20 per batch for d == 1,
    plus 3 per extra column for d > 1), not on the number of tensors or groups (different tol
    values within a batch add one non-blocking host-to-device copy of the per-group
    thresholds, from pinned memory on CUDA). It runs under ``torch.no_grad()`` itself, so
    parameters that require grad may be passed too.

    Caveats (where ``torch.unique`` leaves the result unspecified):

    * NaN: like ``torch.unique``, a NaN is never equal to anything, so it never has copies
      and is never moved; but ``torch.unique`` gives no consistent order with NaNs, while here
      NaNs sort after +inf (``torch.sort``'s order), which decides which value is the "next
      larger" one of the largest finite duplicated value.
    * Signed zeros: -0.0 and 0.0 are equal (as in ``torch.unique``); the value of a group of
      equal centroids used in the midpoint is the bits of its first (lowest index) centroid,
      whereas ``torch.unique`` returns one of them unspecified (in practice also the first).
    * Computation happens in float32 like coremltools' ``C.float()``: float16 / bfloat16
      buffers behave exactly as coremltools; float64 buffers are compared after rounding to
      float32 (as coremltools does) and moved centroids get float32 midpoints.

    Args:
        centroids: the centroid buffers, each a floating-point tensor of shape ``[G, K, d]``
            (G LUT groups, K = 2**n_bits centroids, d = cluster_dim). Updated in place (their
            storage is kept). Empty tensors and K == 1 are left alone.
        tol: ``palett_cluster_tol``: one float >= 0 for all tensors, or one per tensor. 0.0
            repairs any group with a duplicate; a group is repaired only while it has fewer
            than ``K * (1 - tol)`` distinct centroids, so ``tol >= 1 - 1/K`` never repairs.

    Raises:
        TypeError: an entry of ``centroids`` is not a tensor, or not of a floating dtype
            (float16, bfloat16, float32, float64); or ``tol`` is not a real number / sequence.
        ValueError: an entry of ``centroids`` is not 3-D; ``tol`` is a sequence whose length
            differs from ``len(centroids)``; a tol is negative or NaN.

    Example:
        >>> c = torch.tensor([[[0.0], [1.0], [1.0], [3.0]]])  # G=1, K=4, d=1
        >>> repair_collapsed_centroids([c], tol=0.0)  # 3 distinct < 4: the first 1.0 moves
        >>> c.flatten().tolist()
        [0.0, 2.0, 1.0, 3.0]
    """
    plan_repair(centroids, tol).run()


class RepairPlan:
    """:func:`repair_collapsed_centroids` with its per-tensor checks and batching done once:
    ``run()`` applies the rule to the same buffers again (a training loop's step), paying only
    the per-batch ops. Build it with :func:`plan_repair`; valid while the buffers are the same
    tensor objects (in-place updates are fine)."""

    def __init__(self, batches: list[tuple[list[Tensor], int | Tensor, int, int]]) -> None:
        self.batches = batches

    def run(self) -> None:
        with torch.no_grad():
            for tensors, limits, k, d in self.batches:
                _repair_batch(tensors, limits, k, d)


def plan_repair(centroids: Sequence[Tensor], tol: float | Sequence[float] = 0.0) -> RepairPlan:
    """Check and batch the arguments of :func:`repair_collapsed_centroids` once (same
    arguments and errors); ``plan_repair(c, tol).run()`` is ``repair_collapsed_centroids(c,
    tol)``."""
    tensors = list(centroids)
    tols = _check(tensors, tol)
    batches: dict[tuple, list[tuple[Tensor, int]]] = {}
    for c, t in zip(tensors, tols):
        _, k, _ = c.shape
        limit = k * (1.0 - t)  # coremltools: n < K * (1 - tol), in Python floats
        if c.numel() == 0 or not limit > 1.0:
            continue  # a group always has n >= 1 distinct values: nothing can change
        # for an integer n: n < limit  <=>  n < ceil(limit)
        batches.setdefault((c.device, c.dtype, k, c.shape[2]), []).append((c, math.ceil(limit)))
    plan = []
    for (_, _, k, d), items in batches.items():
        tensors = [c for c, _ in items]
        plan.append((tensors, _row_limits(tensors, [m for _, m in items]), k, d))
    return RepairPlan(plan)


def _check(tensors: list[Tensor], tol: float | Sequence[float]) -> list[float]:
    for c in tensors:
        if not isinstance(c, Tensor):
            raise TypeError(f"centroids must be tensors, got {type(c).__name__}")
        if c.dim() != 3:
            raise ValueError(f"centroids must have shape [G, K, d], got {tuple(c.shape)}")
        if c.dtype not in _DTYPES:
            raise TypeError(f"centroids must be float16/bfloat16/float32/float64, got {c.dtype}")
    if isinstance(tol, Real) and not isinstance(tol, bool):
        tols = [float(tol)] * len(tensors)
    elif isinstance(tol, Sequence) and not isinstance(tol, str):
        if len(tol) != len(tensors):
            raise ValueError(f"got {len(tol)} tol values for {len(tensors)} centroid tensors")
        if not all(isinstance(t, Real) and not isinstance(t, bool) for t in tol):
            raise TypeError("tol must hold real numbers")
        tols = [float(t) for t in tol]
    else:
        raise TypeError(f"tol must be a float or a sequence of floats, got {type(tol).__name__}")
    for t in tols:
        if not t >= 0.0:  # also NaN
            raise ValueError(f"tol (palett_cluster_tol) must be >= 0, got {t}")
    return tols


def _row_limits(tensors: list[Tensor], limits: list[int]) -> int | Tensor:
    """The threshold m of each group's `n < m` test: a Python int when all tensors share it,
    else an int64 column [N, 1] copied to the device without waiting on it."""
    if all(m == limits[0] for m in limits):
        return limits[0]
    rows = [m for c, m in zip(tensors, limits) for _ in range(c.shape[0])]
    host = torch.tensor(rows, dtype=torch.int64).unsqueeze(1)
    device = tensors[0].device
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()  # a non-blocking copy needs pinned memory to stay async
    return host.to(device, non_blocking=True)


def _repair_batch(tensors: list[Tensor], limits: int | Tensor, k: int, d: int) -> None:
    """All tensors share device, dtype, K and d; ``limits``: the `n < m` threshold of every
    group (see _row_limits)."""
    x = torch.cat(tensors) if len(tensors) > 1 else tensors[0]  # [N, K, d]
    n_rows = x.shape[0]
    xf = x.float()  # coremltools compares C.float(); a no-op for float32
    # Order each group's centroids lexicographically, ties (equal rows) by index, as
    # torch.unique(dim=0) + "first occurrence" do. Keys get -0.0 -> +0.0 (x + 0.0) so that a
    # radix sort (CUDA) also takes the two zeros as equal and keeps their index order.
    keys = xf + 0.0
    if d == 1:
        perm = keys.reshape(n_rows, k).sort(dim=1, stable=True).indices  # [N, K]
        s = xf.reshape(n_rows, k).gather(1, perm)  # original bits, sorted
    else:
        perm = keys[:, :, d - 1].sort(dim=1, stable=True).indices
        for col in range(d - 2, -1, -1):  # LSD: stable sorts from the last column to the first
            order = keys[:, :, col].gather(1, perm).sort(dim=1, stable=True).indices
            perm = perm.gather(1, order)
        perm_rows = perm.unsqueeze(2).expand(n_rows, k, d)
        s = xf.gather(1, perm_rows)  # [N, K, d], original bits
    # starts[:, i] (i < K): sorted row i begins a run of equal rows; starts[:, K] = True closes
    # the last run
    starts = torch.ones(n_rows, k + 1, dtype=torch.bool, device=x.device)
    if d == 1:
        torch.ne(s[:, 1:], s[:, :-1], out=starts[:, 1:k])
    else:
        torch.any(s[:, 1:] != s[:, :-1], dim=2, out=starts[:, 1:k])
    # a duplicated value's first copy: a run start whose next row is no run start
    dup_first = starts[:, :k] > starts[:, 1:]
    run_id = starts[:, :k].cumsum(1)  # 1-based index j + 1 of each row's distinct value
    n_distinct = run_id[:, k - 1 :]  # [N, 1]
    # start of the next run: the first position with a larger run id; K (the end) wraps to 0
    nxt = torch.searchsorted(run_id, run_id, right=True).remainder_(k)
    if d == 1:
        neighbour = s.gather(1, nxt)
    else:
        neighbour = s.gather(1, nxt.unsqueeze(2).expand(n_rows, k, d))
    midpoint = 0.5 * (s + neighbour)  # coremltools' float32 0.5 * (U_j + U_{j+1})
    move = dup_first & (n_distinct < limits)
    if d > 1:
        move = move.unsqueeze(2)
    moved_sorted = torch.where(move, midpoint, s)
    if d == 1:
        out = torch.empty_like(s).scatter_(1, perm, moved_sorted).view(n_rows, k, 1)
    else:
        out = torch.empty_like(s).scatter_(1, perm_rows, moved_sorted)
    if x.dtype != torch.float32:
        # unmoved entries keep their exact bits (float64 -> float32 -> float64 would not)
        moved = torch.zeros_like(move).scatter_(1, perm if d == 1 else perm.unsqueeze(2), move)
        out = torch.where(moved.view(n_rows, k, -1), out.to(x.dtype), x)
    if len(tensors) == 1:
        tensors[0].copy_(out)
    else:
        torch._foreach_copy_(tensors, list(out.split([c.shape[0] for c in tensors])))
