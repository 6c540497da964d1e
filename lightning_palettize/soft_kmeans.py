"""Differentiable k-means (DKM) on plain tensors: soft clustering with gradients to the weights.

The math is coremltools' ``FakePalettize`` training forward (per LUT group g, x [G, N, d],
centroids C [G, K, d]), repeated up to ``max_iter`` times:

    D_ij = ||x_i - C_j||^2                       (a sum of squares; no cdist sqrt round trip)
    D_i0 -= prune_threshold                      if prune_threshold > 0
    D_i0  = 1 / zero_threshold  for x_i != 0     elif enforce_zero (only exact zeros reach slot 0)
    A     = softmax(-D / tau_eff)                mode "dkm"  (tau_eff = max(tau, zero_threshold))
            softmax(-D / tau_eff + Gumbel)       mode "gsm"
            one_hot(argmin_j D_ij)               mode "hard" (no gradient through A)
    C_j   = sum_i A_ij x_i / sum_i A_ij          (a column that sums to 0 keeps its centroid)
    C     = lut_fn(C); C_0 = 0 if enforce_zero
    stop once |inertia_t - inertia_{t-1}| <= epsilon, inertia = sum_i min_j D_ij (per group)

and returns x_hat_i = sum_j A_ij C_j (last attention, last centroids). Gradients flow through
the whole unrolled computation; nothing is straight-through.

Three methods, none keeping an N x K tensor alive for backward:

* "table" (d == 1): A depends on x_i only through its value, so all k-means work runs once per
  distinct 16-bit code (fp16 after a power-of-two rescale of the group) and is gathered back.
  Equal to the dense math up to rounding x to 11 significant bits (exact for fp16 / bf16).
* "grid" (d == 1, mode "dkm" without the exact-zero rule): the same, with the group's values
  on a grid of H nodes from min to max instead of codes. Each element adds 1 - t of its mass
  to the node below it and t to the one above (t its position between them: the group's mass
  and mean are kept exactly), the k-means runs on the H nodes, and the soft weight, like the
  gradient's per-element factors, is the linear interpolation of the nodes' values at x. The
  output is smooth in x, so the error is second order in the spacing, which is set from the
  centroids and tau (``_GRID_CELL_LOGIT``, ``_GRID_SOFT_CELLS``): measured within ~1e-3 of
  the widest centroid gap against the dense math (the table's rounding gives ~2e-3 on generic
  fp32 weights at tau 1e-4). Where tau is small against the centroid gaps the output is flat
  away from the midpoints between neighbouring centroids: the range is cut into equal cells
  and a cell gets the fine spacing only near a midpoint, coarser by e^(L / 2) at L logits from
  it (every derivative of the attention decays as e^-L), one node beyond the transition zone.
  Per tensor: 128 cells, or 512 where they save over 10% of the nodes, or one uniform cell
  where its extra nodes cost less than its cheaper element passes save. The zones come from
  the incoming centroids with a margin; forward checks every iteration's centroids against
  the grid and, when a transition left its zone, runs that tensor again on a grid that covers
  it (then on the other engines). Costs O(N) per element pass and O(H K) per iteration, H a
  few hundred to a few thousand: per_grouped_channel LUT groups of thousands of weights no
  longer pay K exponentials per weight and iteration.
* "dense" (exact): the same math per element.

For d == 1 (modes "dkm" and "hard") all three run on the *scalar engine*: per-code tables (one
code per element for "dense", one per node for "grid") laid out [G, K, U] (rows padded with
zero mass to the longest; the compiled kernels stop at each row's own length), any number of
tensors stacked into one autograd node (:func:`soft_kmeans_batch`), an analytic backward that
is O(U K) per iteration and O(N) per element (one weighted bincount and two gathers), the
attention of the output iteration kept from forward when it is small and recomputed otherwise.
New centroids are computed as c + sum A m (x - c) / sum A m (centered: nearly correctly
rounded, so stacking or chunking does not move them), and the inertia is the float32
rounding of its float64 sum.
For d > 1 and for mode "gsm" (its noise layout is documented per tensor) the engines run
tensor by tensor: "dense" chunked over N with custom autograd Functions that recompute each
chunk's attention in backward (extra memory O(chunk x K) + O(N x d) + O(iterations x K x d)),
"table" with its small per-code graph recomputed inside backward.

On the CPU the scalar engine's passes run in the compiled kernels of ``_dkm_cpu`` (optional;
without it, or with ``_USE_C = False``, the torch code below runs): per element, the 16-bit
codes are recomputed from x in each pass (a histogram, the output gather, the gradient's
bincount and gather) instead of being stored; per code (mode "dkm" without the exact-zero rule
or the attention clamp, on AVX2/FMA CPUs) one fused loop per iteration computes distances,
softmax and sums in registers, the logit gaps taken as (c_m - c_k)((v - c_k) + (v - c_m))
against the nearest centroid m (accurate where two centroids compete, even when the logits
reach 1e4) and the sums accumulated in float64; with sharp attention a span of 32 codes skips
the centroids whose attention there is below e^-24 (``_WINDOW_LOGIT``). The weight's
gradient is written into the storage of the soft weight's incoming gradient when nothing else
can observe that one (_overwritable; else it is allocated), and a soft weight reuses the
storage of the previous step's incoming gradient once nothing else holds it (_OutputCache):
the backward then adds no weight-sized tensor to what plain training holds at its peak.

Host syncs: on the CPU, early stopping reads back one flag per iteration (free there) and
stops when every group has; on other devices every iteration runs and a group that stopped
keeps its state (torch.where), the same result without a sync. The table sizes of a call are
read back once.
"""

from __future__ import annotations

import itertools
import math
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_palettize import kmeans as _km

__all__ = ["RoundGraphs", "hard_assign", "soft_kmeans", "soft_kmeans_batch"]

_MODES = ("dkm", "gsm", "hard")
_METHODS = ("auto", "dense", "table", "grid")
_NCODES = 1 << 16
# One spare bin per group: the padding slots of the per-code tables read from / write to it.
_STRIDE = _NCODES + 1
# A group is rescaled so that max|x| lands in [2^14, 2^15): inside fp16's normal range, no overflow.
_TOP_EXPONENT = 15
# Elements of one [G, rows, K, d] chunk of the dense engine (per device type; tests shrink it).
_CHUNK_ELEMS = {"cpu": 1 << 18, "cuda": 1 << 25}
_DEFAULT_CHUNK_ELEMS = 1 << 22
# "auto" picks the table engine from this many elements per group (it pays for 65536 bins per
# group, and many distinct values make its per-code tables nearly as big as the dense work).
# Measured fwd+bwd at K=16 (bench/soft_kmeans_micro.py --sweep): on 1 CPU thread the table is
# 2.6x faster at 65536 per group and slower at 64 groups x 16384; on an H200 both are launch
# bound (~5-7 ms) below ~1M elements, so the GPU keeps the dense engine's fewer kernels there.
_TABLE_MIN_GROUP = {"cpu": 1 << 16}
_DEFAULT_TABLE_MIN_GROUP = 1 << 18

# The scalar engine (d == 1): elements of one [G, K, rows] chunk (one chunk is the fast path:
# the last iteration and the output then share their attention), and how many elements of
# attention it may keep from forward for backward instead of recomputing them.
_SCALAR_CHUNK_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 24}
_DEFAULT_SCALAR_CHUNK_ELEMS = 1 << 24
_KEEP_ATTENTION_ELEMS = {"cpu": 1 << 19, "cuda": 1 << 23}
_DEFAULT_KEEP_ATTENTION_ELEMS = 1 << 22

# CPU elements per chunk when writing the codes through scratch buffers
_CODE_CHUNK = 1 << 18
# Largest CPU scratch buffer (elements) the engine keeps between calls
_WORKSPACE_MAX_ELEMS = 1 << 22

_LOG2E = 1.4426950408889634

try:  # fused CPU kernels (lightning_palettize/_dkm_cpu.c); the torch code below is the fallback
    from lightning_palettize import _dkm_cpu
except ImportError:  # pragma: no cover - an install without the compiled extension
    _dkm_cpu = None
# Tests switch the compiled kernels off to compare them with the torch code.
_USE_C = True
# The per-code passes run compiled where the AVX2 kernels cover the configuration ("auto":
# mode "dkm" without prune pull, exact-zero rule or attention clamp, on an AVX2/FMA CPU; the
# portable C kernels are slower than torch's vectorised ops there), "always" (tests), "never".
_C_CODES = "auto"
# Without lut_fn the compiled per-code path runs its whole iteration loop (and its backward)
# in one call each (_dkm_cpu.fwd_loop / bwd_loop: the same float32 steps as the Python loop,
# tested equal); False: the Python loop around the single-iteration kernels (tests).
_C_LOOP = True
# The devices whose scalar engine runs its per-code passes in the fused Triton kernels
# (lightning_palettize/_dkm_triton.py: the iterations and the output in one launch per
# segment, the backward in another), when Triton imports; mode "dkm" without lut_fn. Tests
# add "cpu" to run them in Triton's interpreter (TRITON_INTERPRET=1).
_TRITON_DEVICES = frozenset({"cuda"})
# Device types whose rounds RoundGraphs captures in a graph and replays (the tests put "cpu"
# here with an emulated graph). DKMPalettizer uses graphs only with dkm._ROUND_GRAPHS.
_GRAPH_DEVICES = frozenset({"cuda"})
# Device types whose scalar engine runs its element passes (codes, histogram, soft weight
# gather, gradient sums and gather) in the Triton element kernels (_dkm_triton.elems: one
# launch per pass for every table tensor of a round, codes recomputed from the weights, no
# per-element bins kept). Empty by default: not yet timed on a GPU (bench/dkm_gpu.py variant
# "elems" turns it on for "cuda"); tests add "cpu" to run them in Triton's interpreter.
_TRITON_ELEM_DEVICES: frozenset[str] = frozenset()
_triton_kernels = None  # the module, once imported; False: Triton is not installed


def _triton() -> object | None:
    """lightning_palettize._dkm_triton, imported on first use (None without Triton)."""
    global _triton_kernels
    if _triton_kernels is None:
        try:
            from lightning_palettize import _dkm_triton
        except ImportError:
            _dkm_triton = False
        _triton_kernels = _dkm_triton
    return _triton_kernels or None


_code_values_cache: dict[torch.device, Tensor] = {}
_all_codes_cache: dict[torch.device, Tensor] = {}


@dataclass(frozen=True)
class _Cfg:
    tau: float  # effective temperature, max(tau, zero_threshold)
    max_iter: int
    epsilon: float
    mode: str
    enforce_zero: bool
    prune_threshold: float
    zero_threshold: float
    lut_fn: Callable[[Tensor], Tensor] | None
    clamp_attention: bool

    @property
    def keep_zeros(self) -> bool:
        # coremltools' "keep_sparsity": with enforce_zero and no prune pull, slot 0 is exact zeros
        return self.enforce_zero and self.prune_threshold == 0


# ---------------------------------------------------------------------------------------------
# shared math


def _pairwise(x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
    """(x_i - c_j) and D_ij = ||x_i - c_j||^2 for x [G, n, d], c [G, K, d].

    The difference is [G, n, K] when d == 1 (the common case, no trailing unit axis). Vectors
    get None: D is summed over the d coordinates one [G, n, K] plane at a time (exact, as the
    difference form; no [G, n, K, d] tensor), and :func:`_pairwise_grad` works from x and c.
    """
    if x.shape[-1] == 1:
        diff = x - c.transpose(1, 2)
        return diff, diff * diff
    ct = c.transpose(1, 2)  # [G, d, K]
    dist = (x[..., 0:1] - ct[:, 0:1]).square_()
    for t in range(1, x.shape[-1]):
        # square, then add (no fused multiply-add: the same roundings as the difference form)
        dist += (x[..., t : t + 1] - ct[:, t : t + 1]).square_()
    return None, dist


def _adjust(dist: Tensor, x: Tensor, cfg: _Cfg) -> Tensor:
    """Apply the prune pull / exact-zero rule to column 0 of ``dist`` in place."""
    if cfg.prune_threshold > 0:
        dist[..., 0] -= cfg.prune_threshold
    elif cfg.keep_zeros:
        nonzero = x.ne(0).any(-1)
        dist[..., 0] = torch.where(nonzero, 1.0 / cfg.zero_threshold, dist[..., 0])
    return dist


def _gumbel(u: Tensor) -> Tensor:
    """Gumbel(0, 1) noise from uniforms in [0, 1): -log(-log(u))."""
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))


def _attend(dist: Tensor, cfg: _Cfg, u: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Attention A from adjusted distances; also the pre-clamp softmax P (None in hard mode)."""
    if cfg.mode == "hard":
        idx = dist.argmin(-1, keepdim=True)
        return torch.zeros_like(dist).scatter_(-1, idx, 1.0), None
    logits = dist.mul_(-1.0 / cfg.tau)  # dist is not needed after this
    if u is not None:
        logits += _gumbel(u)
    probs = torch.softmax(logits, -1)
    if cfg.clamp_attention and cfg.mode == "dkm":
        return probs.clamp_min(cfg.zero_threshold), probs
    return probs, probs


def _logit_grad(grad_a: Tensor, probs: Tensor, x: Tensor, cfg: _Cfg) -> Tensor:
    """d loss / d logits from d loss / d A (consumes ``grad_a``): the softmax backward.

    d D = d logits * (-1 / tau); callers apply that factor after reducing (see _pairwise_grad).
    """
    if cfg.clamp_attention and cfg.mode == "dkm":
        grad_a = grad_a * (probs >= cfg.zero_threshold)
    grad_a -= (grad_a * probs).sum(-1, keepdim=True)
    grad_a *= probs
    if cfg.keep_zeros:
        # D_i0 is a constant for non-zero x_i, so nothing flows through it
        grad_a[..., 0] *= x.eq(0).all(-1)
    return grad_a


def _pairwise_grad(
    grad_logits: Tensor, diff: Tensor | None, cfg: _Cfg, x: Tensor, c: Tensor
) -> tuple[Tensor, Tensor]:
    """Backward of logits = -||x - c||^2 / tau as (d x [G, n, d], d c [G, K, d]).

    With e = d logits: d x_i = -2/tau sum_j e_ij (x_i - c_j) and d c_j = 2/tau sum_i e_ij
    (x_i - c_j). Scalars use ``diff``; vectors (``diff`` None) the same sums as matrix products,
    x_i sum_j e_ij - (e C)_i and c_j sum_i e_ij - (e^T x)_j (signs folded in).
    """
    two = -2.0 / cfg.tau
    if diff is not None:
        e = grad_logits.mul_(diff)
        return two * e.sum(-1, keepdim=True), -two * e.sum(1).unsqueeze(-1)
    e = grad_logits
    gx = torch.baddbmm(x * e.sum(-1, keepdim=True), e, c, alpha=-1.0).mul_(two)
    gc = torch.baddbmm(c * e.sum(1).unsqueeze(-1), e.transpose(1, 2), x, alpha=-1.0)
    return gx, gc.mul_(two)


def _filled(mass: Tensor) -> Tensor:
    """The columns that are not empty: mass at least the smallest normal float. The compiled
    kernels flush smaller attention to zero, and dividing by a subnormal mass overflows (NaN
    gradients through sums / mass^2). Every centroid update and its backward use this rule."""
    return mass >= torch.finfo(mass.dtype).tiny


def _update(sums: Tensor, mass: Tensor, c: Tensor, cfg: _Cfg) -> Tensor:
    """New centroids sums / mass; an empty column (:func:`_filled`) keeps its centroid; then
    lut_fn, zero slot."""
    filled = _filled(mass)
    safe = torch.where(filled, mass, torch.ones_like(mass))
    new = torch.where(filled.unsqueeze(-1), sums / safe.unsqueeze(-1), c)
    if cfg.lut_fn is not None:
        quantized = cfg.lut_fn(new)
        if not isinstance(quantized, Tensor) or quantized.shape != new.shape:
            got = getattr(quantized, "shape", type(quantized).__name__)
            raise ValueError(
                f"soft_kmeans: lut_fn must return a tensor of shape {tuple(new.shape)}, got {got}"
            )
        new = quantized.to(new.dtype)
    if cfg.enforce_zero:
        slot0 = torch.arange(new.shape[1], device=new.device).eq(0).view(1, -1, 1)
        new = torch.where(slot0, torch.zeros_like(new), new)
    return new


# stats(C, t, need_inertia) -> (sum_i A_ij x_i [G, K, d], sum_i A_ij [G, K], inertia [G] or
# None, extra): extra is anything per group (tensors with leading G, or None) to carry out
Stats = Callable[[Tensor, int, bool], tuple[Tensor, Tensor, Tensor | None, object]]


def _pick(keep: Tensor, new, old):
    """Per group (keep [G]): new where keep, else old, through tuples; None passes."""
    if old is None:
        return new
    if isinstance(new, tuple):
        return tuple(_pick(keep, a, b) for a, b in zip(new, old))
    if new is None:
        return None
    return torch.where(keep.view((-1,) + (1,) * (new.dim() - 1)), new, old)


def _iterate(stats: Stats, c0: Tensor, cfg: _Cfg, schedule: list[Tensor | None] | None = None):
    """Run the k-means iterations with per-group early stopping.

    ``stats`` computes the attention from centroids C at iteration t and its sums (see Stats).
    Returns (P, F, schedule, extra): P are the centroids the last attention of each group was
    computed from, F that group's last updated centroids, schedule[t] the groups still running
    at iteration t (None: all), extra the stats' extra of each group's last iteration.
    Passing ``schedule`` replays it instead of testing convergence (used by recomputation).
    """
    c = prev_c = last_c = c0
    extra = None
    active: Tensor | None = None
    prev_inertia: Tensor | None = None
    ran: list[Tensor | None] = []
    n_iter = cfg.max_iter if schedule is None else len(schedule)
    for t in range(n_iter):
        act = active if schedule is None else schedule[t]
        test = schedule is None and cfg.epsilon >= 0 and t + 1 < n_iter
        sums, mass, inertia, new_extra = stats(c, t, test)
        new = _update(sums, mass, c, cfg)
        if act is None:
            prev_c, last_c, extra = c, new, new_extra
        else:
            prev_c, last_c = _pick(act, c, prev_c), _pick(act, new, last_c)
            extra = _pick(act, new_extra, extra)
        c = last_c
        ran.append(act)
        if not test:
            continue
        active, done = _next_active(inertia, prev_inertia, act, cfg.epsilon, _sync_free(c0.device))
        if done:
            break
        prev_inertia = inertia
    return prev_c, last_c, ran, extra


def _last_iteration(schedule: list[Tensor | None], g: int, device: torch.device) -> Tensor:
    """Per group, the index of the last iteration it ran."""
    last = torch.zeros(g, dtype=torch.long, device=device)
    for t, act in enumerate(schedule):
        last = torch.full_like(last, t) if act is None else torch.where(act, t, last)
    return last


def _replay(state: Tensor, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.set_state(state)
    return gen


def _sync_free(device: torch.device) -> bool:
    """Whether early stopping must avoid host reads (every device but the CPU)."""
    return device.type != "cpu"


def _sync_free_scatters(device: torch.device) -> bool:
    """Whether the code tables are built with scatters that read nothing back to the host
    (index_add_ and a cumsum scatter): off the CPU, whose bincount and nonzero are the faster
    ones there, and outside torch's deterministic mode, which keeps bincount / nonzero /
    index_put_ (deterministic on every device)."""
    return not _host_layout(device) and not torch.are_deterministic_algorithms_enabled()


def _host_layout(device: torch.device) -> bool:
    """The CPU's way of running the scalar engine: one segment per tensor (no padding),
    cache-sized chunks through reused scratch buffers (no page faults on fresh blocks).
    Elsewhere: segments of tensors of similar table widths, the element passes of consecutive
    one-group table tensors run over their concatenation (_stacks), and whole-tensor ops
    (fewest kernel launches)."""
    return device.type == "cpu"


def _c_kernels(device: torch.device) -> bool:
    """Whether the compiled CPU kernels (``_dkm_cpu``) run the scalar engine's passes."""
    return _USE_C and _dkm_cpu is not None and device.type == "cpu" and _host_layout(device)


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


# ---------------------------------------------------------------------------------------------
# dense engine


def _chunk_rows(g: int, k: int, d: int, device: torch.device, noisy: bool) -> int:
    """Rows per chunk; with Gumbel noise (whose draws follow the chunks) thread-independent."""
    elems = _CHUNK_ELEMS.get(device.type, _DEFAULT_CHUNK_ELEMS)
    if device.type == "cpu" and not noisy:
        # ~256K elements per thread: small chunks stay in cache, but every op is an OpenMP
        # barrier, which costs milliseconds on a loaded box
        elems *= torch.get_num_threads()
    return max(1, elems // (g * k * d))


def _chunks(n: int, rows: int):
    return ((a, min(n, a + rows)) for a in range(0, n, rows))


def _vec_rows(x: Tensor, cfg: _Cfg, noisy: bool, *centroids: Tensor) -> bool:
    """Whether the compiled per-row kernels (``_dkm_cpu.vec_fwd`` / ``vec_bwd``) run the dense
    engine: CPU float32 vectors (1 < d <= 64) and centroids in mode "dkm", K <= 256."""
    return (
        _c_kernels(x.device)
        and 1 < x.shape[-1] <= 64  # VEC_MAXD of _dkm_cpu.c
        and cfg.mode == "dkm"
        and not noisy
        and x.dtype == torch.float32
        and all(c.shape[1] <= 256 and c.dtype == torch.float32 for c in centroids)
        # the kernels take tau and zero_threshold as float32
        and min(cfg.tau, cfg.zero_threshold) >= torch.finfo(torch.float32).tiny
    )


# below this much work (rows x K x d per call) the vector kernels run on one thread
_VEC_SPLIT_WORK = 1 << 16
_VEC_ROWS_ALIGN = 256  # a row split keeps the kernels' float32 flush blocks (VR x VEC_FLUSH)


def _vec_call(fn, mode: int, x: Tensor, c: Tensor, cfg: _Cfg, tail) -> None:
    """``fn(mode, x, c, G, n, d, K, <cfg>, *tail)``: a ``_dkm_cpu.vec_fwd`` / ``vec_bwd`` call
    (see _dkm_cpu.c), on two threads when torch has two (``torch.get_num_threads()``) and the
    call is large enough: the groups in two halves, or one group's rows (at a multiple of 256
    rows, so the kernel's float32 partial sums are the same) with the second half's float64
    accumulators apart and added after. ``tail``: the pointer arguments after the config, each
    ``(tensor or None, kind)``: "group" ([G, ...], read), "row" ([G, n, d], read or written)
    or "acc" ([G, ...] float64, accumulated)."""
    g, n, d = x.shape
    k = c.shape[1]
    conf = (
        cfg.tau,
        cfg.prune_threshold,
        cfg.zero_threshold,
        int(cfg.keep_zeros),
        int(cfg.clamp_attention),
    )

    def at(t: Tensor | None, elems: int) -> int:
        return 0 if t is None else t.data_ptr() + elems * t.element_size()

    def part(g0: int, g1: int, r0: int, r1: int, accs: dict[int, Tensor]):
        ptrs = []
        for i, (t, kind) in enumerate(tail):
            t = accs.get(i, t)
            if t is None:
                ptrs.append(0)
            elif kind == "row":
                ptrs.append(at(t, g0 * n * d + r0 * d))
            else:
                ptrs.append(at(t, g0 * (t.numel() // max(g, 1))))
        return lambda: fn(
            mode,
            at(x, g0 * n * d + r0 * d),
            at(c, g0 * k * d),
            g1 - g0,
            r1 - r0,
            d,
            k,
            *conf,
            *ptrs,
        )

    split = torch.get_num_threads() >= 2 and _km._NCPU >= 2 and g * n * k * d >= _VEC_SPLIT_WORK
    if split and g >= 2:
        cut = g // 2
        _km._in_parallel(part(0, cut, 0, n, {}), part(cut, g, 0, n, {}))
    elif split and n >= 2 * _VEC_ROWS_ALIGN:
        cut = n // 2 // _VEC_ROWS_ALIGN * _VEC_ROWS_ALIGN
        second = {
            i: torch.zeros_like(t)
            for i, (t, kind) in enumerate(tail)
            if kind == "acc" and t is not None
        }
        _km._in_parallel(part(0, 1, 0, cut, {}), part(0, 1, cut, n, second))
        for i, t in second.items():
            tail[i][0].add_(t)
    else:
        part(0, g, 0, n, {})()


class _DenseStats(torch.autograd.Function):
    """(sum_i A_ij x_i, sum_i A_ij, inertia) for A = attention(x, C), chunked over N.

    Saves only x and C; backward recomputes each chunk's attention. Gumbel noise (mode "gsm")
    is drawn per chunk as torch.rand(G, rows, K) from ``gen``; backward replays it from ``state``.
    """

    @staticmethod
    def forward(ctx, x, c, cfg, gen, state, need_inertia):
        g, n, d = x.shape
        k = c.shape[1]
        rows = _chunk_rows(g, k, d, x.device, gen is not None)
        if _vec_rows(x, cfg, gen is not None, c):
            x, c = x.contiguous(), c.contiguous()
            sums64, mass64 = (
                x.new_zeros(g, k, d, dtype=torch.float64),
                x.new_zeros(g, k, dtype=torch.float64),
            )
            inertia64 = x.new_zeros(g, dtype=torch.float64)
            _vec_call(
                _dkm_cpu.vec_fwd,
                0,
                x,
                c,
                cfg,
                [
                    (None, "group"),
                    (sums64, "acc"),
                    (mass64, "acc"),
                    (inertia64 if need_inertia else None, "acc"),
                ],
            )
            ctx.save_for_backward(x, c)
            ctx.cfg, ctx.state, ctx.rows = cfg, state, rows
            inertia = inertia64.float()
            ctx.mark_non_differentiable(inertia)
            return sums64.float(), mass64.float(), inertia
        sums = x.new_zeros(g, k, d)
        mass = x.new_zeros(g, k)
        inertia = x.new_zeros(g)
        with _no_autocast(x.device):
            for a, b in _chunks(n, rows):
                xc = x[:, a:b]
                _, dist = _pairwise(xc, c)
                _adjust(dist, xc, cfg)
                if need_inertia:
                    inertia += dist.amin(-1).sum(1)
                u = None
                if gen is not None:
                    u = torch.rand(g, b - a, k, generator=gen, device=x.device)
                att, _ = _attend(dist, cfg, u)
                sums.baddbmm_(att.transpose(1, 2), xc)
                mass += att.sum(1)
        ctx.save_for_backward(x, c)
        ctx.cfg, ctx.state, ctx.rows = cfg, state, rows
        ctx.mark_non_differentiable(inertia)
        return sums, mass, inertia

    @staticmethod
    def backward(ctx, grad_sums, grad_mass, _grad_inertia):
        x, c = ctx.saved_tensors
        cfg = ctx.cfg
        g, n, d = x.shape
        k = c.shape[1]
        need_x, need_c = ctx.needs_input_grad[:2]
        if grad_sums is None:
            grad_sums = c.new_zeros(g, k, d)
        if grad_mass is None:
            grad_mass = c.new_zeros(g, k)
        if _vec_rows(x, cfg, ctx.state is not None, c):
            gx = torch.empty_like(x) if need_x else None
            gc64 = c.new_zeros(g, k, d, dtype=torch.float64)
            gs, gm = grad_sums.float().contiguous(), grad_mass.float().contiguous()
            _vec_call(
                _dkm_cpu.vec_bwd,
                0,
                x,
                c,
                cfg,
                [
                    (None, "group"),
                    (gs, "group"),
                    (gm, "group"),
                    (gx, "row"),
                    (gc64, "acc"),
                    (None, "acc"),
                ],
            )
            return gx, (gc64.float() if need_c else None), None, None, None, None
        gx = torch.zeros_like(x) if need_x else None
        gc = torch.zeros_like(c)
        gen = _replay(ctx.state, x.device) if ctx.state is not None else None
        with _no_autocast(x.device):
            for a, b in _chunks(n, ctx.rows):
                xc = x[:, a:b]
                diff, dist = _pairwise(xc, c)
                _adjust(dist, xc, cfg)
                u = None
                if gen is not None:
                    u = torch.rand(g, b - a, k, generator=gen, device=x.device)
                att, probs = _attend(dist, cfg, u)
                if need_x:
                    gx[:, a:b] = torch.bmm(att, grad_sums)
                if probs is None:
                    continue
                grad_a = torch.baddbmm(grad_mass.unsqueeze(1), xc, grad_sums.transpose(1, 2))
                gxc, gcc = _pairwise_grad(_logit_grad(grad_a, probs, xc, cfg), diff, cfg, xc, c)
                if need_x:
                    gx[:, a:b] += gxc
                gc += gcc
        return gx, (gc if need_c else None), None, None, None, None


class _DenseOutput(torch.autograd.Function):
    """x_hat = attention(x, P) @ F, chunked over N; backward recomputes the attention.

    ``noise`` (mode "gsm") is (generator state at the start of each iteration, last iteration
    of each group): each group's output reuses the noise of its last iteration.
    """

    @staticmethod
    def forward(ctx, x, prev_c, last_c, cfg, noise):
        g, n, d = x.shape
        k = prev_c.shape[1]
        rows = _chunk_rows(g, k, d, x.device, noise is not None)
        if _vec_rows(x, cfg, noise is not None, prev_c, last_c):
            x, prev_c, last_c = x.contiguous(), prev_c.contiguous(), last_c.contiguous()
            out = torch.empty_like(x)  # C order, as the kernel writes it (x may be a view)
            _vec_call(
                _dkm_cpu.vec_fwd,
                1,
                x,
                prev_c,
                cfg,
                [(last_c, "group"), (out, "row"), (None, "acc"), (None, "acc")],
            )
            ctx.save_for_backward(x, prev_c, last_c)
            ctx.cfg, ctx.noise, ctx.rows = cfg, noise, rows
            return out
        out = torch.empty_like(x)
        with _no_autocast(x.device):
            draws = _GroupNoise(noise, g, k, x.device)
            for a, b in _chunks(n, rows):
                xc = x[:, a:b]
                _, dist = _pairwise(xc, prev_c)
                _adjust(dist, xc, cfg)
                att, _ = _attend(dist, cfg, draws.next(b - a))
                out[:, a:b] = torch.bmm(att, last_c)
        ctx.save_for_backward(x, prev_c, last_c)
        ctx.cfg, ctx.noise, ctx.rows = cfg, noise, rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, prev_c, last_c = ctx.saved_tensors
        cfg = ctx.cfg
        g, n, d = x.shape
        k = prev_c.shape[1]
        need_x, need_p, need_f = ctx.needs_input_grad[:3]
        if _vec_rows(x, cfg, ctx.noise is not None, prev_c, last_c):
            gx = torch.empty_like(x) if need_x else None
            gp64 = prev_c.new_zeros(g, k, d, dtype=torch.float64)
            gf64 = torch.zeros_like(gp64)
            go = grad_out.float().contiguous()
            _vec_call(
                _dkm_cpu.vec_bwd,
                1,
                x,
                prev_c,
                cfg,
                [
                    (last_c, "group"),
                    (go, "row"),
                    (None, "group"),
                    (gx, "row"),
                    (gp64, "acc"),
                    (gf64, "acc"),
                ],
            )
            gp, gf = gp64.float(), gf64.float()
            return gx, (gp if need_p else None), (gf if need_f else None), None, None
        gx = torch.zeros_like(x) if need_x else None
        gp = torch.zeros_like(prev_c)
        gf = torch.zeros_like(last_c)
        with _no_autocast(x.device):
            draws = _GroupNoise(ctx.noise, g, k, x.device)
            for a, b in _chunks(n, ctx.rows):
                xc = x[:, a:b]
                go = grad_out[:, a:b].float()
                diff, dist = _pairwise(xc, prev_c)
                _adjust(dist, xc, cfg)
                att, probs = _attend(dist, cfg, draws.next(b - a))
                gf.baddbmm_(att.transpose(1, 2), go)
                if probs is None:
                    continue
                grad_a = torch.bmm(go, last_c.transpose(1, 2))
                gxc, gpc = _pairwise_grad(
                    _logit_grad(grad_a, probs, xc, cfg), diff, cfg, xc, prev_c
                )
                if need_x:
                    gx[:, a:b] = gxc
                gp += gpc
        return gx, (gp if need_p else None), (gf if need_f else None), None, None


class _GroupNoise:
    """Replays, chunk by chunk, each group's noise from the iteration its output comes from."""

    def __init__(self, noise: tuple[list[Tensor], list[int]] | None, g, k, device):
        self.g, self.k, self.device = g, k, device
        self.streams: list[tuple[Tensor | None, torch.Generator]] = []
        if noise is None:
            return
        states, last = noise
        for t in sorted(set(last)):
            mask = None
            if len(set(last)) > 1:
                mask = torch.tensor(last, device=device).eq(t).view(g, 1, 1)
            self.streams.append((mask, _replay(states[t], device)))

    def next(self, rows: int) -> Tensor | None:
        u = None
        for mask, gen in self.streams:
            draw = torch.rand(self.g, rows, self.k, generator=gen, device=self.device)
            u = draw if mask is None or u is None else torch.where(mask, draw, u)
        return u


def _soft_kmeans_dense(
    x: Tensor, c0: Tensor, cfg: _Cfg, gen: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    xf = x.float()
    g = x.shape[0]
    states: list[Tensor] = []

    def stats(c: Tensor, t: int, need_inertia: bool):
        state = None
        if gen is not None:
            state = gen.get_state()
            states.append(state)
        sums, mass, inertia = _DenseStats.apply(xf, c, cfg, gen, state, need_inertia)
        return sums, mass, inertia, None

    prev_c, last_c, schedule, _ = _iterate(stats, c0, cfg)
    noise = None
    if gen is not None:
        noise = (states, _last_iteration(schedule, g, c0.device).tolist())
    out = _DenseOutput.apply(xf, prev_c, last_c, cfg, noise)
    return out.to(x.dtype), last_c.detach()


# ---------------------------------------------------------------------------------------------
# table engine (d == 1)


def _all_codes(device: torch.device) -> Tensor:
    """0 .. 65535 (int64) on ``device``, cached: the codes of a full table row."""
    codes = _all_codes_cache.get(device)
    if codes is None:
        codes = _all_codes_cache[device] = torch.arange(_NCODES, device=device)
    return codes


def _code_values(device: torch.device) -> Tensor:
    """Value of each 16-bit code (fp16 bit pattern + 2^15, as int), plus 0 for the spare bin."""
    table = _code_values_cache.get(device)
    if table is None:
        bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
        values = bits.view(torch.float16).float()
        table = torch.cat([values, values.new_zeros(1)]).to(device)
        _code_values_cache[device] = table
    return table


def _encode(x: Tensor, cfg: _Cfg) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bin every element by its 16-bit code.

    Returns the per-element bin id [G*N] int32 (g * 65537 + code), the distinct codes of each
    group [G, U] in ascending order of value (padded with the spare bin 65536), their values
    [G, U] in x's units, and their counts [G, U] (0 for padding).
    """
    g = x.shape[0]
    flat = x.detach().reshape(g, -1)
    amax = flat.abs().amax(1).float()
    _, exponent = torch.frexp(amax)
    # a power of two: exact, and max|x| lands in [2^14, 2^15) where fp16 keeps 11 bits
    scale = torch.ldexp(torch.ones_like(amax), (_TOP_EXPONENT - exponent).clamp(-126, 126))
    scaled = flat.float() * scale.unsqueeze(1)
    half = scaled.half()
    if cfg.keep_zeros:
        # a tiny non-zero weight must not round into the exact-zero code
        tiny = (scaled.sign() * 2.0**-24).half()
        half = torch.where(half.eq(0) & scaled.ne(0), tiny, half)
    # the signed bit pattern + 2^15 is a bijection onto 0..65535 (value order is restored on
    # the small per-code table below, not per element)
    bins = half.view(torch.int16).to(torch.int32)
    if g == 1:
        bins += 1 << 15
    else:
        bins += torch.arange(g, dtype=torch.int32, device=x.device).unsqueeze(1) * _STRIDE + (
            1 << 15
        )
    bins = bins.view(-1)
    counts = torch.bincount(bins, minlength=g * _STRIDE).view(g, _STRIDE)
    present = counts[:, :_NCODES] > 0
    u = int(present.sum(1).max())
    if g == 1:
        codes = present[0].nonzero().view(1, -1)
    else:
        slot = present.cumsum(1) - 1
        gi, ki = present.nonzero(as_tuple=True)
        codes = torch.full((g, u), _NCODES, dtype=torch.long, device=x.device)
        codes[gi, slot[gi, ki]] = ki
    values = _code_values(x.device)[codes]
    # ascending by value, padding last (its value is irrelevant, its count 0)
    key = torch.where(codes == _NCODES, torch.inf, values)
    order = key.argsort(dim=1, stable=True)
    codes, values = codes.gather(1, order), values.gather(1, order)
    mass = counts.gather(1, codes).float()
    return bins, codes, values / scale.unsqueeze(1), mass


def _table_stats(v, mass, c, cfg, u, need_inertia):
    """Centroid sums over codes weighted by their counts; extra = (attention, softmax)."""
    _, dist = _pairwise(v.unsqueeze(-1), c)
    _adjust(dist, v.unsqueeze(-1), cfg)
    inertia = (dist.amin(-1) * mass).sum(1) if need_inertia else None
    att, probs = _attend(dist, cfg, u)
    both = torch.bmm(torch.stack([mass * v, mass], 1), att)  # [G, 2, K]
    return both[:, 0].unsqueeze(-1), both[:, 1], inertia, (att, probs)


def _table_slope(v, prev_c, last_c, probs, cfg):
    """h_u = sum_j C_j dA_uj / dv_u with the centroids held fixed (analytic).

    A = softmax(a), a_j = -(v - c_j)^2 / tau, so dA_j/dv = A_j (da_j/dv - sum_k A_k da_k/dv)
    and da_j/dv = -2 (v - c_j) / tau (0 for the pinned zero slot, x 0 where A is clamped).
    """
    if probs is None:  # hard: A is piecewise constant
        return torch.zeros_like(v)
    x = v.unsqueeze(-1)
    diff, _ = _pairwise(x, prev_c)
    # _logit_grad maps d/dA (here C_j) to d/da; a_j depends on v through -2 (v - c_j) / tau
    grad_a = _logit_grad(last_c.transpose(1, 2).expand_as(probs).clone(), probs, x, cfg)
    return (-2.0 / cfg.tau) * (grad_a * diff).sum(-1)


def _weighted_bincount(bins: Tensor, weights: Tensor, size: int) -> Tensor:
    if bins.is_cuda and torch.are_deterministic_algorithms_enabled():
        out = weights.new_zeros(size)
        return out.index_put_((bins.long(),), weights, accumulate=True)
    return torch.bincount(bins, weights=weights, minlength=size)


class _TableKMeans(torch.autograd.Function):
    """The whole soft k-means on per-code tables; backward is O(N) per element.

    grad x_i = g_i h[u_i] + r[u_i], h the slope of the element's own final attention with the
    centroids fixed, r = (dL/dv_u - gsum_u h_u) / n_u its share of the gradient through the
    centroids, where L = sum_u gsum_u y_u(v) is differentiated by autograd over the small
    per-code graph, recomputed here rather than saved.
    """

    @staticmethod
    def forward(ctx, x, c0, cfg, gen):
        g = x.shape[0]
        k = c0.shape[1]
        with torch.no_grad(), _no_autocast(x.device):
            bins, codes, v, mass = _encode(x, cfg)
            states: list[Tensor] = []

            def stats(c: Tensor, t: int, need_inertia: bool):
                u = None
                if gen is not None:
                    states.append(gen.get_state())
                    u = torch.rand(g, v.shape[1], k, generator=gen, device=x.device)
                return _table_stats(v, mass, c, cfg, u, need_inertia)

            _, last_c, schedule, (att, _) = _iterate(stats, c0, cfg)
            y = torch.bmm(att, last_c).squeeze(-1)
            out = _scatter_codes(y, codes).index_select(0, bins).view_as(x).to(x.dtype)
        ran = torch.stack(
            [torch.ones(g, dtype=torch.bool, device=x.device) if a is None else a for a in schedule]
        )
        ctx.save_for_backward(bins, codes, v, mass, c0, ran, *states)
        ctx.cfg, ctx.all_ran = cfg, [a is None for a in schedule]
        ctx.mark_non_differentiable(last_c)
        return out, last_c

    @staticmethod
    def backward(ctx, grad_out, _grad_c):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        bins, codes, v, mass, c0, ran, *states = ctx.saved_tensors
        cfg = ctx.cfg
        g, u = v.shape
        k = c0.shape[1]
        device = v.device
        with _no_autocast(device):
            go = grad_out.reshape(-1).float()
            gsum = _weighted_bincount(bins, go, g * _STRIDE).view(g, _STRIDE).gather(1, codes)
            noises = [
                torch.rand(g, u, k, generator=_replay(s, device), device=device) for s in states
            ]
            with torch.enable_grad():
                vg = v.detach().requires_grad_()
                prev_c, last_c, _, (att, probs) = _iterate(
                    lambda c, t, _: _table_stats(
                        vg, mass, c, cfg, noises[t] if noises else None, False
                    ),
                    c0,
                    cfg,
                    schedule=[None if every else a for every, a in zip(ctx.all_ran, ran)],
                )
                y = torch.bmm(att, last_c).squeeze(-1)
                total = torch.zeros_like(v)
                if y.requires_grad:  # not when lut_fn cuts the centroids off in hard mode
                    (total,) = torch.autograd.grad((gsum * y).sum(), vg)
            probs = None if probs is None else probs.detach()
            slope = _table_slope(v, prev_c.detach(), last_c.detach(), probs, cfg)
            share = (total - gsum * slope) / mass.clamp_min(1)
            h = _scatter_codes(slope, codes).index_select(0, bins)
            r = _scatter_codes(share, codes).index_select(0, bins)
            grad_x = torch.addcmul(r, go, h).view(grad_out.shape).to(grad_out.dtype)
        return grad_x, None, None, None


def _scatter_codes(per_code: Tensor, codes: Tensor) -> Tensor:
    """Per-code values [G, U] into the flat per-bin table [G * 65537] (padding -> spare bin)."""
    g = per_code.shape[0]
    full = per_code.new_zeros(g, _STRIDE)
    return full.scatter_(1, codes, per_code).view(-1)


# ---------------------------------------------------------------------------------------------
# scalar engine (d == 1, modes "dkm" and "hard"): many tensors, one autograd node
#
# Every tensor of a call becomes rows of per-"code" tables: a "table" item has one code per
# distinct 16-bit value of each group (the value's count as its mass), an "exact" item one code
# per element (mass 1, x itself as the value, no rounding). The k-means runs on the tables laid
# out [G, K, U] (K-major: every reduction over K is a strided, vectorised pass), in "segments"
# of stacked rows (_plan_segments): one per tensor on the CPU (no padding: there the cost is in
# the passes), as few as possible elsewhere (rows padded to the segment's widest table: there
# the cost is in the kernel launches).
#
# Backward is analytic, O(K U) per iteration and O(N) per element: for code u with value v_u,
# mass m_u and incoming gradient sum gsum_u (a weighted bincount of the elements' gradients),
# grad x_i = g_i h_u + r_u, where h_u = dy_u/dv_u with the centroids held fixed and r_u is the
# gradient through the centroid updates per unit mass (_scalar_backward_step). The softmax
# backward is taken row by row, so a saturated (one-hot) row contributes exactly nothing.
# CPU temporaries live in per-thread scratch buffers: fresh multi-megabyte blocks would be
# page-faulted in on every step.


def _scalar_rows(g: int, k: int, device: torch.device) -> int:
    elems = _SCALAR_CHUNK_ELEMS.get(device.type, _DEFAULT_SCALAR_CHUNK_ELEMS)
    return max(1, elems // (g * k))


def _keep_budget(device: torch.device) -> int:
    return _KEEP_ATTENTION_ELEMS.get(device.type, _DEFAULT_KEEP_ATTENTION_ELEMS)


class _Workspace(threading.local):
    """Per-thread scratch buffers for CPU temporaries that never leave a function.

    Fresh multi-megabyte allocations cost page faults on every call on the CPU (the allocator
    hands large blocks back to the OS); a chunk-sized scratch stays in cache and is reused.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, slot: str, numel: int, dtype: torch.dtype) -> Tensor:
        buf = self.buffers.get((slot, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            self.buffers[(slot, dtype)] = buf
        return buf[:numel]


_workspace = _Workspace()


class _OutputCache(threading.local):
    """CPU storages handed from one step's backward to the next step's forward.

    Each step hands autograd a fresh multi-megabyte soft weight per tensor; glibc returns such
    blocks to the OS and every step page-faults them back in, which costs about as much as the
    compiled pass that fills them. Backward leaves the incoming gradient's storage here (the
    soft weight's size; autograd frees it right after, or it now holds the weight's ``.grad``
    when that was written in place), and the next forward takes it back for its soft weight
    if nothing else references it any more (its use count is down to this slot's own
    reference, e.g. after ``zero_grad(set_to_none=True)``); otherwise the forward allocates.
    A slot is emptied when taken, so nothing is held across the step: the peak memory is that
    of fresh allocations.
    """

    MIN_ELEMS = 1 << 18

    def __init__(self) -> None:
        self.slots: dict[tuple, torch.UntypedStorage] = {}

    def take(self, key: tuple, shape: tuple[int, ...], device: torch.device) -> Tensor:
        st = self.slots.pop(key, None)
        numel = math.prod(shape)
        if (
            st is not None
            and device.type == "cpu"
            and st.nbytes() == 4 * numel
            and torch._C._storage_Use_Count(st._cdata) == 1
        ):
            return torch.empty(0).set_(st, 0, shape)
        return torch.empty(shape, device=device)

    def give(self, key: tuple, t: Tensor) -> None:
        """Offer ``t``'s storage (a float32 tensor that is about to be dropped) to ``key``."""
        if (
            _HAS_USE_COUNT
            and t.device.type == "cpu"
            and t.dtype == torch.float32
            and t.numel() >= self.MIN_ELEMS
            and t.is_contiguous()
            and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == 4 * t.numel()
        ):
            self.slots[key] = t.untyped_storage()


_HAS_USE_COUNT = hasattr(torch._C, "_storage_Use_Count")
# Keep each weight gradient's storage for the next step's (no page faults on a fresh block,
# but it is then held through the next forward and the layers' backward: +1x the weights at
# the peak). Off: the peak memory of fresh allocations. (Unused when the gradient is written
# into the incoming one, _GRAD_IN_PLACE.)
_KEEP_GRAD_STORAGE = False
_outputs = _OutputCache()

# Write the weight's gradient into the storage of the soft weight's incoming gradient when
# nothing else can observe it (_grad_refs / _overwritable): the backward then allocates no
# weight-sized tensor (without it, both are alive at the peak: +1x the weights). Tests switch
# it off to compare.
_GRAD_IN_PLACE = True


def _grad_refs(grads: tuple) -> list[tuple[int, ...] | None]:
    """Per incoming gradient, who holds it: (references to its Python object, owners of its
    TensorImpl, owners of its storage, and for a view the same two counts of its base, else
    (0, 0)); None for a gradient that is not a plain CPU tensor.

    Must be the first thing a ``backward(ctx, *grads)`` does with ``grads`` (every other
    reference it makes would count). The numbers that mean "only autograd's call holds it" are
    measured once by :func:`_grad_baseline` through the same call path. Anything else that
    holds the gradient shows up here: a tensor hook (or multi-grad hook) that kept it holds
    the Python object; a node post-hook (the engine keeps the inputs for it), the capture of
    ``torch.autograd.grad(..., inputs=[soft weight])`` or another node's input buffer that
    received the same tensor (an add's backward passes one gradient to both operands) own the
    TensorImpl; any other view or ``.detach()`` of it (e.g. a parameter's ``.grad`` that stole
    it) owns the storage. A view (the gradient of a reshaped or transposed soft weight, e.g.
    through ``F.linear``) also owns its base, whose own holders are counted likewise. (A
    TensorImpl's count is read through ``_storage_Use_Count``: TensorImpl and StorageImpl are
    both an ``intrusive_ptr_target`` at offset 0; _grad_baseline checks that it behaves.)
    """
    use = torch._C._storage_Use_Count
    out: list[tuple[int, ...] | None] = []
    for g in grads:
        if type(g) is not Tensor or g.layout != torch.strided or g.device.type != "cpu":
            out.append(None)
            continue
        st = g.untyped_storage()
        refs = (sys.getrefcount(g), use(g._cdata), use(st._cdata))
        base = g._base
        if base is None:
            out.append((*refs, 0, 0))
        else:
            out.append((*refs, sys.getrefcount(base), use(base._cdata)))
        del st, base
    return out


class _GradProbe(torch.autograd.Function):
    """Records _grad_refs as _ScalarKMeans.backward sees them (same signature, same path)."""

    seen: list = []

    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        c = x.new_zeros(1)
        ctx.mark_non_differentiable(c)
        return x * 1.0, c

    @staticmethod
    def backward(ctx, *grads):
        _GradProbe.seen.append(_grad_refs(grads))
        return grads[0]


def _probe_refs(view: bool, hook=None, post_hook: bool = False):
    """_grad_refs of the probe's incoming gradient: a fresh product, or a view of one."""
    _GradProbe.seen.clear()
    with torch.enable_grad(), _no_autocast(torch.device("cpu")):
        x = torch.zeros(8, requires_grad=True)
        y, _ = _GradProbe.apply(x)
        if hook is not None:
            y.register_hook(hook)
        if post_hook:
            y.grad_fn.register_hook(lambda grad_in, grad_out: None)
        (y.view(2, 4) if view else y).mul(2.0).sum().backward()
    seen = _GradProbe.seen[0][0] if _GradProbe.seen else None
    _GradProbe.seen.clear()
    return seen


_grad_base: list = []  # [baselines or None], measured once


def _grad_baseline() -> dict[bool, tuple[int, ...]] | None:
    """_grad_refs of a gradient that only autograd's call holds, for a plain tensor (key
    False) and a view (key True); None: never overwrite.

    Measured on a probe node and validated: a tensor hook that keeps the gradient and a node
    post-hook must each change the numbers, and a second measurement must repeat them (else
    they do not mean what _grad_refs assumes on this torch build).
    """
    if _grad_base:
        return _grad_base[0]
    if _unusual_context():
        return None  # measured later, in a plain context (modes may hold references)
    base: dict[bool, tuple[int, ...]] | None = None
    if _HAS_USE_COUNT:
        try:
            base = {}
            for view in (False, True):
                kept: list[Tensor] = []
                ref = _probe_refs(view)
                if (
                    ref is None
                    or (ref[3] != 0) != view
                    or _probe_refs(view, hook=kept.append) == ref
                    or _probe_refs(view, post_hook=True) == ref
                    or _probe_refs(view) != ref
                ):
                    base = None
                    break
                base[view] = ref
        except Exception:  # pragma: no cover - an autograd without these internals
            base = None
    _grad_base.append(base)
    return base


def _unusual_context() -> bool:
    """Inference mode, or a Python dispatch / function mode active (they may wrap or keep
    the probe's tensors): no baseline is measured then."""
    try:
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    except ImportError:  # pragma: no cover - a torch without them: never measured
        return True
    return (
        torch.is_inference_mode_enabled()
        or bool(_get_current_dispatch_mode_stack())
        or bool(_get_current_function_mode_stack())
    )


def _overwritable(g: Tensor | None, refs, base) -> bool:
    """Whether the backward may write the weight's gradient into ``g``'s storage: ``refs``
    (its _grad_refs) equal the baseline (nothing but this call holds the tensor, its base, its
    storage or their Python objects), and it is a plain float32 CPU tensor that covers its
    whole storage, outside double backward."""
    return (
        base is not None
        and g is not None
        and refs is not None
        and refs == base.get(g._is_view())
        and weakref.getweakrefcount(g) == 0
        and not torch.is_grad_enabled()
        and not g.requires_grad
        and g.dtype == torch.float32
        and not g.is_inference()
        and g.is_contiguous()
        and g.storage_offset() == 0
        and g.untyped_storage().nbytes() == 4 * g.numel()
    )


def _group_absmax(flat: Tensor) -> Tensor:
    """max |x| per row of a [G, N] tensor, float32 [G], without an |x| temporary."""
    if flat.shape[0] == 1:
        lo, hi = torch.aminmax(flat)  # one pass (with a dim it is a slow loop on the CPU)
        return torch.maximum(hi, lo.neg()).float().view(1)
    return torch.maximum(flat.amax(1), flat.amin(1).neg()).float()


def _keep_tiny(half: Tensor, f: Tensor) -> Tensor:
    """A tiny non-zero weight must not round into the exact-zero code (enforce_zero)."""
    tiny = (f.sign() * 2.0**-24).half()
    return torch.where(half.eq(0) & f.ne(0), tiny, half)


# The device layout's element passes run over runs of consecutive table tensors at once (one
# concatenated pass instead of a few launches per tensor), each run at most this many elements
# (the run's temporaries: ~14 bytes per element while its codes are written). The batched
# paths take all / any / sum / max of list comprehensions over their tensors, not of
# generators: one call each where a generator resumes once per tensor (the GPU step is
# host-bound).
_STACK_ELEMS = 1 << 26


def _stacks(shapes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Consecutive runs [a, b) of [G, N] tensors of one LUT group each and at most
    _STACK_ELEMS elements together; any other tensor is a run of its own."""
    runs: list[tuple[int, int]] = []
    a, total = 0, 0
    for i, (g, n) in enumerate(shapes):
        if i > a and (g > 1 or shapes[a][0] > 1 or total + n > _STACK_ELEMS):
            runs.append((a, i))
            a, total = i, 0
        total += g * n
    if shapes:
        runs.append((a, len(shapes)))
    return runs


def _write_codes_stacked(
    dst: Tensor, flats: list[Tensor], scale: Tensor, offset: Tensor, cfg: _Cfg
) -> None:
    """:func:`_write_codes` of several [1, n_l] tensors at once: their elements concatenated
    (along dim 1: no reshape per tensor), each tensor's scale and offset gathered per element
    by the element's tensor index in the run: a few ops per run instead of a slice and an
    expand per tensor.

    The index is a cumulative sum of ones at the tensors' starts (int32, 4 bytes per element,
    nothing read back), made once for both gathers. Not ``repeat_interleave``: CUDA's gives
    each repeat count to one warp, which writes its 1-2M entries 32 at a time (2 ms a call
    for a run of the 134M LLaMA's weights on an H200, 8 ms of device time per step, in
    bench/results/gpu_h200/prof_auto.txt); the sum is a parallel scan."""
    device, n = dst.device, dst.numel()
    x = torch.cat(flats, 1).view(-1)
    if x.dtype != torch.float32:
        x = x.float()
    starts = list(itertools.accumulate([f.shape[1] for f in flats[:-1]]))
    ids = torch.zeros(n, dtype=torch.int32, device=device)
    # index_add_, not index_fill_: an empty tensor's start is its successor's (two ones there)
    ids.index_add_(
        0, _index_tensor(starts, device), _index_tensor([1] * len(starts), device, torch.int32)
    )
    ids = ids.cumsum_(0)
    half = torch.empty(n, dtype=torch.float16, device=device)
    torch.mul(x, scale.float().view(-1)[ids], out=half)
    if cfg.keep_zeros:
        half = _keep_tiny(half, x)
    del x
    torch.add(half.view(torch.int16), offset.view(-1)[ids], out=dst)


def _write_codes(dst: Tensor, f: Tensor, scale: Tensor, offset: Tensor | int, cfg: _Cfg) -> None:
    """dst[i] (int32) = fp16 bit pattern of f[i] * scale + offset, for one [s, n] tensor."""
    s, n = f.shape
    if not _host_layout(f.device):
        # two kernels: CUDA casts inside the kernel (the CPU would add temporaries and copies)
        half = torch.empty((s, n), dtype=torch.float16, device=f.device)
        torch.mul(f, scale.view(s, 1).to(torch.float32), out=half)
        if cfg.keep_zeros:
            half = _keep_tiny(half, f)
        torch.add(half.view(torch.int16), offset, out=dst.view(s, n))
        return
    if s > 1 or cfg.keep_zeros:
        half = (f.float() * scale.view(s, 1)).half()
        if cfg.keep_zeros:
            half = _keep_tiny(half, f)
        out = dst.view(s, n)
        out.copy_(half.view(torch.int16))
        out.add_(offset)
        return
    # CPU, one group: in cache-sized chunks through scratch buffers (no large temporaries)
    flat = f.view(-1)
    step = _CODE_CHUNK
    buf = _workspace.get("code_f32", min(step, n), torch.float32)
    half = _workspace.get("code_f16", min(step, n), torch.float16)
    sc = float(scale)
    for a in range(0, n, step):
        b = min(n, a + step)
        if flat.dtype == torch.float32:
            torch.mul(flat[a:b], sc, out=buf[: b - a])
        else:  # exactly f.float() * scale
            buf[: b - a].copy_(flat[a:b]).mul_(sc)
        half[: b - a].copy_(buf[: b - a])
        out = dst[a:b]
        out.copy_(half[: b - a].view(torch.int16))
        out.add_(offset)


def _group_scales(flats: list[Tensor], device: torch.device) -> Tensor:
    """The code scale of every LUT group of the [G_l, N_l] tensors, stacked [sum G_l]: a power
    of two, exact, that puts the group's max |x| in [2^14, 2^15), where fp16 keeps 11 bits."""
    sizes = [f.shape[0] for f in flats]
    if not _host_layout(device) and all([s == 1 for s in sizes]) and len(flats) > 1:
        # one launch for all the per-tensor maxima (a slow loop on the CPU)
        amax = torch.stack(torch._foreach_norm(flats, float("inf"))).float().view(-1)
    elif len(flats) == 1:
        amax = _group_absmax(flats[0])
    else:
        amax = torch.cat([_group_absmax(f) for f in flats])
    _, exponent = torch.frexp(amax)
    return torch.ldexp(torch.ones_like(amax), (_TOP_EXPONENT - exponent).clamp(-126, 126))


def _encode_many(
    flats: list[Tensor],
    cfg: _Cfg,
    device: torch.device,
    c_codes: bool = False,
    full: bool = False,
):
    """Bin every element of every [G_l, N_l] tensor by its 16-bit code, all groups stacked.

    Returns (bins [sum G_l N_l] int32 with g * 65537 + code over the stacked groups (None
    with ``c_codes``: the compiled kernels recompute the codes from x and the scales), the
    power-of-two scale of each group [G] float32, codes
    [G, U] of each group's distinct codes (ascending code order) padded with the spare bin
    65536, their values [G, U] in x's units, their counts [G, U] float32 (0 for padding),
    the number of distinct codes per group (a list: the batch's one host read), U). With
    ``full`` (the device layout only) every group's table is all 65,536 codes, absent ones
    with count 0 and value 0, and nothing is read from the device (see _full_tables).
    """
    sizes = [f.shape[0] for f in flats]
    g = sum(sizes)
    scale = _group_scales(flats, device)
    if c_codes:
        # one compiled pass per tensor: codes computed on the fly into the histogram, none
        # stored (the element passes recompute them from x)
        scale = scale.float().contiguous()
        counts = torch.zeros(g * _STRIDE, dtype=torch.int32, device=device)
        row = 0
        for f, s in zip(flats, sizes):
            _dkm_cpu.hist(
                f.data_ptr(),
                s,
                f.shape[1],
                scale[row:].data_ptr(),
                int(cfg.keep_zeros),
                counts[row * _STRIDE :].data_ptr(),
            )
            row += s
        per_group = _dkm_cpu.present(counts.data_ptr(), g)
        u = max(per_group)
        codes = torch.empty(g, u, dtype=torch.long)
        mass = torch.empty(g, u)
        _dkm_cpu.compact(counts.data_ptr(), g, u, codes.data_ptr(), mass.data_ptr())
        values = _code_values(device)[codes] / scale.unsqueeze(1)
        return None, scale, codes, values, mass, per_group, u
    bins = torch.empty(sum([f.numel() for f in flats]), dtype=torch.int32, device=device)
    start = row = 0
    offsets = None
    if _host_layout(device):
        runs = [(i, i + 1) for i in range(len(flats))]
    else:  # runs of tensors coded together, in a few launches per run
        runs = _stacks([tuple(f.shape) for f in flats])
    for a, b in runs:
        s = sum(sizes[a:b])
        n = sum([f.numel() for f in flats[a:b]])
        if s == 1 and _host_layout(device):
            offset: Tensor | int = row * _STRIDE + (1 << 15)
        else:  # a [s, 1] int32 tensor: int16 codes + offset promote to int32 in one kernel
            if offsets is None:
                offsets = torch.arange(g, dtype=torch.int32, device=device)
                offsets = offsets.mul_(_STRIDE).add_(1 << 15).unsqueeze(1)
            offset = offsets[row : row + s]
        if b - a == 1:
            _write_codes(bins[start : start + n], flats[a], scale[row : row + s], offset, cfg)
        else:
            _write_codes_stacked(
                bins[start : start + n], flats[a:b], scale[row : row + s], offset, cfg
            )
        start += n
        row += s
    if not _sync_free_scatters(device):
        counts = torch.bincount(bins, minlength=g * _STRIDE)
    else:  # CUDA's bincount reads the max back (a sync); an index_add_ of ones does not
        counts = torch.zeros(g * _STRIDE, dtype=torch.int64, device=device)
        counts.index_add_(0, bins, counts.new_ones(1).expand(bins.numel()))
    return (bins, scale, *_code_tables(counts.view(g, _STRIDE), scale, device, full))


def _full_tables(device: torch.device, k: int, cfg: _Cfg, n_groups: int, n_elems: int) -> bool:
    """Whether a batch's code tables are all 65,536 codes of every group rather than each
    group's distinct codes: without that compaction the table sizes are known on the host, so
    the round reads nothing back from the device. (The compaction's read waits for the encode
    and histogram kernels, the histogram's index_add_ alone 1.6 ms in the H100 profile of the
    134M LLaMA, while a host-bound step has launches to queue.) Taken where the fused kernels
    run the per-code passes (no [G, U, K] temporaries), the scatters read nothing back, and
    the full tables hold at most ``_FULL_TABLES_FILL`` entries per weight of the batch
    (per-tensor LUTs of large weights: the 134M LLaMA's 85 groups make 5.6M entries for its
    134M weights)."""
    return (
        n_groups * _NCODES <= _FULL_TABLES_FILL * n_elems
        and _sync_free_scatters(device)
        and _triton_codes(cfg, k, device)
    )


# A round's table tensors live through its backward (values, counts, output, gradient sums,
# slopes: ~24 bytes per entry, some freed early), so full tables are kept to a quarter of an
# entry per weight: under ~6 bytes per weight beyond the compacted ones, against the 4-byte
# code and 4-byte soft weight each weight has anyway. (The bench's width-64 stand-in for the
# 134M LLaMA lifts it: its small weights would keep the compaction the 134M model skips.)
_FULL_TABLES_FILL = 0.25


def _code_tables(counts: Tensor, scale: Tensor, device: torch.device, full: bool = False):
    """(codes, values, mass, per_group, U) from the per-group code histogram [G, 65537]
    (``full``: every code, see _encode_many)."""
    g = counts.shape[0]
    if full:
        codes = _all_codes(device).expand(g, -1)
        mass = counts[:, :_NCODES].float()
        # absent codes get value 0 (their own may be inf or NaN, and their count 0 times that
        # is NaN in the weighted sums); a present NaN or inf keeps its value, as when compacted
        values = _code_values(device)[:_NCODES] / scale.unsqueeze(1)
        values = values.masked_fill_(mass == 0, 0.0)
        return codes, values, mass, [_NCODES] * g, _NCODES
    present = counts[:, :_NCODES] > 0
    if g == 1:
        codes = present.view(-1).nonzero().view(1, -1)
        per_group = [codes.shape[1]]
        u = codes.shape[1]
    else:
        n_present = torch.count_nonzero(present, dim=1)
        per_group = n_present.tolist()  # the table sizes: the one host read of a batch
        u = max(per_group)
        if _host_layout(device) and g <= 8:
            codes = torch.full((g, u), _NCODES, dtype=torch.long, device=device)
            for i in range(g):
                row = present[i].nonzero().view(-1)
                codes[i, : row.numel()] = row
        elif not _sync_free_scatters(device):
            gi, ci = present.nonzero(as_tuple=True)
            first = torch.cumsum(n_present, 0) - n_present
            slot = torch.arange(gi.numel(), device=device) - first[gi]
            codes = torch.full((g, u), _NCODES, dtype=torch.long, device=device)
            codes[gi, slot] = ci
        else:  # each present code to its rank in its row; no host read for nonzero's size
            slot = torch.cumsum(present, 1).sub_(1).masked_fill_(~present, u)
            codes = torch.full((g, u + 1), _NCODES, dtype=torch.long, device=device)
            every = _all_codes(device).expand(g, -1)
            codes = codes.scatter_(1, slot, every)[:, :u].contiguous()
    mass = counts.gather(1, codes).float()
    values = _code_values(device)[codes] / scale.unsqueeze(1)
    return codes, values, mass, per_group, u


# ---------------------------------------------------------------------------------------------
# grid tensors of the scalar engine: each LUT group's elements on a grid of H nodes


# The grid spacing h: the interpolated output's error grows with h^2 times its curvature,
# which has two regimes. Sharp attention (tau small against the centroid gaps): the logit gap
# of two neighbouring centroids, 2 h |c_b - c_a| / tau, changes by at most _GRID_CELL_LOGIT
# across a cell. Soft attention (many centroids share each weight): h is at most
# sqrt(tau / 2) / _GRID_SOFT_CELLS, the softmax's width over the squared distances. Measured
# against the dense engine with these values: max output error ~1e-3 x the widest centroid gap
# (the table engine's is ~2e-3), gradients within ~1e-3 (norm; up to 2.6e-3 at tau 1e-3 with
# 20 iterations, where the node count now meets the rule exactly: 136 nodes, 28 cells per
# sqrt(tau / 2) would give 1.3e-3 with 184).
_GRID_CELL_LOGIT = 0.25
_GRID_SOFT_CELLS = 20.0
# The soft rule is for centroids that share a weight beyond its two nearest: at the midpoint of
# a pair a third centroid's attention is e^(-2 gap^2 / tau) of theirs, so the soft spacing is
# relaxed by e^(gap^2 / tau - _GRID_SOFT_FADE) once gap > sqrt(_GRID_SOFT_FADE tau) (the
# sharp rule alone from gap ~ 2 sqrt(tau): 1.3x fewer nodes on MiniLM's central centroids).
_GRID_SOFT_FADE = 2.25
# Where two neighbouring centroids' logit gap exceeds _GRID_SATURATION the attention is one-hot
# to e^-16 (1e-7) and the output flat: the grid needs its fine spacing only inside these
# transition zones, and within a zone only near the midpoint: L logits from it every
# derivative of the attention decays as e^-L, so the same interpolation error allows the
# spacing h e^((L - _GRID_GRADE_LOGIT) / 2) (the sigmoid's second derivative peaks at 0.096,
# which e^-L reaches at L = 2.3). A group's range is cut into _GRID_CELLS equal cells, each
# with the finest spacing that a zone asks at the cell's nearest point (one node where no zone
# meets it). The grid is built from the incoming centroids with L counted _GRID_SPEC_MARGIN
# logits closer to the midpoints; forward then checks every iteration's centroids against the
# grid (no margin) and rebuilds it when a transition moved further or a cell's spacing is more
# than _GRID_CHECK_SLACK times what they ask (the base spacing follows the centroid gaps,
# which every iteration changes a little: without slack, 2/3 of the MiniLM group_size 16
# grids were rebuilt for one node in one cell).
_GRID_SATURATION = 16.0
_GRID_GRADE_LOGIT = 3.0
_GRID_SPEC_MARGIN = 6.0
_GRID_CHECK_SLACK = 1.15
_GRID_CELLS = 128
# ... or _GRID_FINE_SPLIT times as many where that needs 1 / _GRID_COARSE_SLACK of the nodes
# (narrow zones: MiniLM's sharp transitions; measured 10-20% faster steps there), or one
# uniform cell where its extra nodes cost less than its element passes save: measured on this
# CPU, a uniform cell's element pass takes 0.72 ns per weight against 1.25 ns with cells (4
# passes per call), and a node ~25 ns per centroid per call (the iterations forward and
# backward), so one node x centroid is worth _GRID_NODE_COST weights
_GRID_FINE_SPLIT = 4
_GRID_COARSE_SLACK = 1.1
_GRID_NODE_COST = 12.0
_GRID_MAX_NODES = 1 << 16
# "auto" takes the grid (CPU) for float32 groups of at least _GRID_AUTO_MIN_GROUP elements when
# the tensor's groups need at most 1 / _GRID_AUTO_FRACTION of its elements as nodes in all
# (each group at most its own elements and _GRID_MAX_NODES; see _scalar_kind). Smaller
# groups cost little either way and keep the exact engine; fp16 / bf16 weights keep the table,
# which is exact for them. Measured in one process against the table: 5-20% faster per step
# on the bench MLP, MiniLM and 4096x4096 per tensor, 2.4-3.5x with group_size 16.
_GRID_AUTO_FRACTION = 2
_GRID_AUTO_MIN_GROUP = 4096
# Other device types (than the CPU's host layout) on which "auto" takes the grid too.
_GRID_AUTO_DEVICES: frozenset[str] = frozenset()


@dataclass
class _GridSpec:
    """A tensor's grid (see the grid kernels of ``_dkm_cpu``): per group, C equal cells from
    lo (C = fc.shape[1]: 1, _GRID_CELLS or _GRID_CELLS * _GRID_FINE_SPLIT), cell c with fc[c]
    nodes numbered from off[c], then one last node at the group's max: lens nodes in all;
    ``nodes`` is the widest group's count (others padded)."""

    lo: Tensor  # [G] float32
    inv_w: Tensor  # [G] float32: cells / span (0: a constant group)
    span: Tensor  # [G] float32
    fc: Tensor  # [G, C] float32
    off: Tensor  # [G, C] int32
    lens: Tensor  # [G] int32: each group's nodes
    nodes: int
    # set by forward: None when every iteration's centroids were resolved, else the counts
    # per cell they need (the rebuild takes the larger of both)
    missing: Tensor | None = None
    cap: int = _GRID_MAX_NODES  # most nodes a rebuild may use per group
    total_cap: int | None = None  # most nodes a rebuild may use over all groups (None: any)
    fallback: str = "exact"  # the kind that runs when no grid fits

    def values(self, use_c: bool = False) -> Tensor:
        """The nodes' values [G, nodes] (float32; compiled with ``use_c``)."""
        g, cells = self.fc.shape
        if use_c:
            out = torch.empty(g, self.nodes)
            grid = (self.lo.data_ptr(), self.inv_w.data_ptr(), cells, self.fc.data_ptr())
            span = self.span.float().contiguous()
            _dkm_cpu.grid(3, 0, g, 0, *grid, self.off.data_ptr(), self.nodes, span.data_ptr(),
                          0, 0, out.data_ptr())  # fmt: skip
            return out
        if cells == 1:  # one uniform cell: lo + k span / fc (the padding nodes past the max)
            k = torch.arange(self.nodes, device=self.lo.device, dtype=torch.float32)
            pos = torch.minimum(k.unsqueeze(0), self.fc) / self.fc
            return torch.addcmul(self.lo.unsqueeze(1), pos, self.span.unsqueeze(1))
        k = torch.arange(self.nodes, device=self.lo.device).expand(g, -1).contiguous()
        off = self.off.long()
        cell = (torch.searchsorted(off, k, right=True) - 1).clamp_(0, cells - 1)
        pos = cell + (k - off.gather(1, cell)) / self.fc.gather(1, cell)
        total = off[:, -1:] + self.fc[:, -1:].long()
        pos = torch.where(k >= total, float(cells), pos)
        return torch.addcmul(self.lo.unsqueeze(1), pos, (self.span / cells).unsqueeze(1)).float()


def _grid_counts(
    lo, span, c: Tensor, cfg: _Cfg, margin: float, cells: int, out=None, whole=True, floor=1.0
):
    """Nodes per cell [G, C] (float32) that centroids c [G, K] need (module notes), L counted
    ``margin`` logits closer to the midpoints, combined by maximum into ``out`` (default: ones);
    outside the zones' cores only where above ``floor``; the fractional count when not ``whole``
    (compiled on the CPU; the torch code elsewhere)."""
    g, k = c.shape
    soft = math.sqrt(cfg.tau / 2) / _GRID_SOFT_CELLS
    cs = c.float().sort(1).values.contiguous()
    if out is None:
        out = torch.ones(g, cells, device=c.device)
    if _c_kernels(c.device):
        lo, span = lo.float().contiguous(), span.float().contiguous()
        _dkm_cpu.grid_counts(
            lo.data_ptr(), span.data_ptr(), cs.data_ptr(), g, k, cells, cfg.tau,
            _GRID_CELL_LOGIT, soft, _GRID_SOFT_FADE, _GRID_SATURATION, margin, _GRID_GRADE_LOGIT,
            cfg.prune_threshold, float(_GRID_MAX_NODES), whole, floor, out.data_ptr(),
        )  # fmt: skip
        return out
    if k < 2:
        return out
    lo, span = lo.double().unsqueeze(1), span.double().unsqueeze(1)
    width = span / cells
    cs = cs.double()
    gap = (cs[:, 1:] - cs[:, :-1]).clamp_min(1e-30)
    mid = (cs[:, 1:] + cs[:, :-1]) / 2
    fade = torch.exp((gap * gap / cfg.tau - _GRID_SOFT_FADE).clamp_min(0))
    h = torch.minimum(_GRID_CELL_LOGIT * cfg.tau / (2 * gap), soft * fade)
    half = ((_GRID_SATURATION + margin) * cfg.tau + cfg.prune_threshold) / (2 * gap)
    half = torch.minimum(half, span)
    core = ((_GRID_GRADE_LOGIT + margin) * cfg.tau + cfg.prune_threshold) / (2 * gap)
    core = torch.minimum(core, half)
    idx = torch.arange(cells, device=c.device, dtype=torch.float64).view(1, -1, 1)

    def cells_within(d):  # [G, C, K - 1]: the cells meeting mid +- d
        first = ((mid - d - lo) / width).floor().unsqueeze(1)
        return (idx >= first) & (idx <= ((mid + d - lo) / width).floor().unsqueeze(1))

    cell_lo = lo.unsqueeze(1) + idx * width.unsqueeze(1)
    mid3 = mid.unsqueeze(1)
    dist = torch.maximum(cell_lo - mid3, mid3 - (cell_lo + width.unsqueeze(1))).clamp_min(0)
    logit = (2 * gap.unsqueeze(1) * dist - cfg.prune_threshold) / cfg.tau - margin
    grade = torch.exp(0.5 * (logit - _GRID_GRADE_LOGIT)).clamp_min(1)
    in_core = cells_within(core)
    grade = torch.where(in_core, 1.0, grade)
    inside = cells_within(half)
    need = width.unsqueeze(1) / torch.where(inside, h.unsqueeze(1) * grade, math.inf)
    need = torch.where((need > floor) | (in_core & inside), need.ceil() if whole else need, 0.0)
    need = need.clamp_(max=_GRID_MAX_NODES).amax(2)
    need = torch.where(width > 0, need, 0.0).float()
    return torch.maximum(out, need, out=out)


def _grid_from_counts(
    lo, span, counts: Tensor, max_nodes: int, max_total: int | None = None
) -> _GridSpec | None:
    """The grid with ``counts`` [G, C] nodes per cell, or None beyond ``max_nodes`` in a group
    or ``max_total`` over all groups (the caps its rebuilds keep)."""
    total = counts.sum(1, dtype=torch.float64) + 1
    need, whole = (float(t) for t in torch.stack((total.amax(), total.sum())))  # one host read
    if not need <= max_nodes or (max_total is not None and not whole <= max_total):
        return None
    nodes = max(8, -(-int(need) // 8) * 8)
    if nodes > max_nodes:
        nodes = int(need)
    cells = counts.shape[1]
    inv_w = torch.where(span > 0, cells / span.clamp_min(1e-38), 0.0)
    off = (counts.cumsum(1) - counts).to(torch.int32).contiguous()
    fc = counts.float().contiguous()
    lens = total.to(torch.int32)
    inv_w = inv_w.float().contiguous()
    return _GridSpec(lo.contiguous(), inv_w, span, fc, off, lens, nodes, None, max_nodes, max_total)


def _grid_rule(cfg: _Cfg, margin: float) -> tuple:
    """The compiled counts' rule constants (``_dkm_cpu.grid_spec`` / ``grid_check``)."""
    soft = math.sqrt(cfg.tau / 2) / _GRID_SOFT_CELLS
    return (cfg.tau, _GRID_CELL_LOGIT, soft, _GRID_SOFT_FADE, _GRID_SATURATION, margin,
            _GRID_GRADE_LOGIT, cfg.prune_threshold, float(_GRID_MAX_NODES))  # fmt: skip


def _grid_spec(
    flat: Tensor, c0: Tensor, cfg: _Cfg, max_nodes: int, max_total: int | None = None
) -> _GridSpec | None:
    """The grid of a [G, N] tensor with centroids c0 [G, K], or None when a group needs more
    than ``max_nodes`` nodes, all groups more than ``max_total``, or a group holds a
    non-finite value (one compiled call on the CPU for float32 contiguous weights)."""
    g, k = c0.shape
    if _c_kernels(flat.device) and flat.dtype == torch.float32 and flat.is_contiguous():
        fine = _GRID_CELLS * _GRID_FINE_SPLIT
        lo, span, inv_w = (torch.empty(g) for _ in range(3))
        fc, off = torch.empty(g * fine), torch.empty(g * fine, dtype=torch.int32)
        lens = torch.empty(g, dtype=torch.int32)
        c = c0.float().contiguous()
        raw, srt = _tmp("grid_raw", (g * fine,), flat.device), _tmp("grid_c", (g * k,), flat.device)
        got = _dkm_cpu.grid_spec(
            flat.data_ptr(), g, flat.shape[1], c.data_ptr(), k, _grid_rule(cfg, _GRID_SPEC_MARGIN),
            _GRID_CELLS, _GRID_FINE_SPLIT, _GRID_COARSE_SLACK, _GRID_NODE_COST, max_nodes,
            -1 if max_total is None else max_total, lo.data_ptr(), span.data_ptr(),
            inv_w.data_ptr(), fc.data_ptr(), off.data_ptr(), lens.data_ptr(), raw.data_ptr(),
            srt.data_ptr(),
        )  # fmt: skip
        if not got:  # None: a non-finite value; False: beyond the caps
            return None
        cells, nodes = got
        fc, off = fc[: g * cells].view(g, cells), off[: g * cells].view(g, cells)
        return _GridSpec(lo, inv_w, span, fc, off, lens, nodes, None, max_nodes, max_total)
    if flat.shape[0] == 1:
        lo, hi = (t.view(1) for t in torch.aminmax(flat))
    else:
        lo, hi = flat.amin(1), flat.amax(1)
    lo, hi = lo.float(), hi.float()
    span = hi - lo
    if not bool(torch.isfinite(span).all()):
        return None
    fine = _GRID_CELLS * _GRID_FINE_SPLIT
    raw = lo.new_zeros(lo.shape[0], fine)
    # (fractional counts under 1 / _GRID_FINE_SPLIT outside the cores change no layout's
    # nodes: left out)
    raw = _grid_counts(
        lo, span, c0, cfg, _GRID_SPEC_MARGIN, fine, raw, whole=False, floor=1 / _GRID_FINE_SPLIT
    )
    # the same spacings on three layouts: _GRID_CELLS cells (each as fine as its finest part),
    # fine cells, one uniform cell
    coarse = raw.view(-1, _GRID_CELLS, _GRID_FINE_SPLIT).amax(2) * _GRID_FINE_SPLIT
    uniform = raw.amax(1, keepdim=True) * fine
    coarse, raw, uniform = (t.ceil_().clamp_(1, _GRID_MAX_NODES) for t in (coarse, raw, uniform))
    n_raw, n_coarse, n_uniform = (float(t.sum(dtype=torch.float64)) for t in (raw, coarse, uniform))
    counts, n_counts = coarse, n_coarse
    if n_raw * _GRID_COARSE_SLACK < n_coarse:
        counts, n_counts = raw, n_raw
    # one uniform cell where its extra nodes cost less than its cheaper element passes save
    if (n_uniform - n_counts) * k * _GRID_NODE_COST <= flat.numel():
        counts = uniform
    return _grid_from_counts(lo, span, counts, max_nodes, max_total)


def _grid_check(spec: _GridSpec, centroids: list[Tensor], cfg: _Cfg) -> None:
    """Record in ``spec.missing`` what the centroids of the iterations needed beyond it."""
    if not centroids:
        return
    g, cells = spec.fc.shape
    if _c_kernels(spec.lo.device) and len(centroids) <= 64:
        k = centroids[0].shape[1]
        cents = [c.float().contiguous() for c in centroids]
        need = torch.empty(g, cells)
        over = _dkm_cpu.grid_check(
            spec.lo.data_ptr(), spec.span.data_ptr(), spec.fc.data_ptr(), g, cells,
            tuple(c.data_ptr() for c in cents), k, _grid_rule(cfg, 0.0), _GRID_CHECK_SLACK,
            need.data_ptr(), _tmp("grid_c", (g * k,), spec.lo.device).data_ptr(),
        )  # fmt: skip
        if over:
            spec.missing = need
        return
    need = None
    for c in centroids:
        need = _grid_counts(spec.lo, spec.span, c, cfg, 0.0, cells, need, False)
    if bool((need > spec.fc * _GRID_CHECK_SLACK).any()):
        spec.missing = need.ceil_()


def _grid_rebuilt(spec: _GridSpec) -> _GridSpec | None:
    """The grid with the nodes ``spec.missing`` asked for, within the spec's caps (or None)."""
    counts = torch.maximum(spec.fc, spec.missing)
    new = _grid_from_counts(spec.lo, spec.span, counts, spec.cap, spec.total_cap)
    if new is not None:
        new.fallback = spec.fallback
    return new


def _grid_cells(flat: Tensor, spec: _GridSpec) -> tuple[Tensor, Tensor]:
    """Per element, its node j (int64, [G, N]) and its weight t on node j + 1 (float32)."""
    cells = spec.fc.shape[1]
    p = (flat.float() - spec.lo.unsqueeze(1)) * spec.inv_w.unsqueeze(1)
    p = p.clamp_(0, cells)
    c = p.floor().clamp_(max=cells - 1)
    ci = c.long()
    f_c = spec.fc.gather(1, ci)
    f = (p - c).mul_(f_c)
    i = torch.minimum(f.floor(), f_c - 1)
    t = (f - i).clamp_(max=1)
    return spec.off.long().gather(1, ci) + i.long(), t


def _grid_kernel(op: int, flat: Tensor, spec: _GridSpec, a=None, b=None, ld=0, out=None, c=None):
    """One compiled grid pass (``_dkm_cpu.grid``) over the float32 contiguous [G, N] ``flat``."""
    g, n = flat.shape
    grid = (spec.lo.data_ptr(), spec.inv_w.data_ptr(), spec.fc.shape[1])
    grid += (spec.fc.data_ptr(), spec.off.data_ptr(), spec.nodes)
    _dkm_cpu.grid(op, flat.data_ptr(), g, n, *grid, _ptr(a), _ptr(b), ld, _ptr(out), _ptr(c))


def _grid_splat(flat: Tensor, spec: _GridSpec, w: Tensor | None, use_c: bool) -> Tensor:
    """[G, H] float32: the sum over elements of w (1 - t) on node j and w t on node j + 1."""
    g, n = flat.shape
    if use_c:  # (the node sums in float64, rounded once into the float32 rows)
        out = torch.empty(g, spec.nodes, device=flat.device)
        _grid_kernel(0, flat, spec, w, out=out)
        return out
    acc = torch.zeros(g, spec.nodes, dtype=torch.float64, device=flat.device)
    j, t = _grid_cells(flat, spec)
    a = 1.0 if w is None else w.view(g, n).float()
    acc.scatter_add_(1, j, (a * (1.0 - t)).double())
    acc.scatter_add_(1, j + 1, (a * t).double())
    return acc.float()


def _grid_lerp(flat: Tensor, spec: _GridSpec, table: Tensor, use_c: bool, out=None) -> Tensor:
    """[G, N] float32: the table [G, >= H] interpolated at each element."""
    if use_c:
        table = table if table.stride(1) == 1 else table.contiguous()
        out = torch.empty(flat.shape, device=flat.device) if out is None else out
        _grid_kernel(1, flat, spec, table, ld=table.stride(0), out=out)
        return out
    j, t = _grid_cells(flat, spec)
    a = table.gather(1, j)
    return a.add_(t * (table.gather(1, j + 1) - a))


def _grid_grad(flat, spec, g_in: Tensor, h: Tensor, r: Tensor, use_c: bool, out=None) -> Tensor:
    """g lerp(h) + lerp(r) per element ([G, N]; ``out`` may be ``g_in``'s storage)."""
    if use_c:  # (the kernel pairs h and r per row: one load per element)
        if h.stride(1) != 1 or r.stride() != h.stride():
            h, r = h.contiguous(), r.contiguous()
        out = torch.empty(flat.shape, device=flat.device) if out is None else out
        _grid_kernel(2, flat, spec, g_in, h, h.stride(0), out, r)
        return out
    g, n = flat.shape
    return _grid_lerp(flat, spec, r, False).addcmul_(
        g_in.view(g, n), _grid_lerp(flat, spec, h, False)
    )


@dataclass
class _ScalarItem:
    kind: str  # "table", "exact" or "grid"
    g: int
    n: int
    row: int  # first row among all items (centroid order)
    trow: int  # first row among the table items (bins / codes order)
    start: int  # first element in the stacked bins (table items)
    seg: int = 0  # segment index
    srow: int = 0  # first row in its segment
    u: int = 0  # codes used by this item (<= the segment's width)
    spec: _GridSpec | None = None  # "grid": its grid
    flat: Tensor | None = None  # "grid": x as [G, N] (forward only)
    c_grid: bool = False  # "grid": its element passes run compiled


# segment planning: a device segment's rows are padded to its widest table; a new segment
# starts below this fraction of that width (padding costs at most 1/_SEGMENT_FILL)
_SEGMENT_FILL = 2 / 3
# CPU: tensors whose whole table has at most this many [K x U] elements share one segment
_TINY_TABLE = 1 << 16


def _plan_segments(items: list[_ScalarItem], k: int, host: bool) -> list[list[int]]:
    """Which tensors iterate together (indices into ``items``).

    On the CPU the cost is in the passes, so each tensor gets its own segment (no padding),
    except tiny ones, which share one (fewer ops). Elsewhere the cost is in the launches: one
    segment, unless the table widths differ enough that padding would cost more.
    """
    order = sorted(range(len(items)), key=lambda i: -items[i].u)
    if host:
        tiny = [i for i in order if items[i].g * items[i].u * k <= _TINY_TABLE]
        return [[i] for i in order if i not in tiny] + ([tiny] if tiny else [])
    segments: list[list[int]] = []
    for i in order:
        if segments and items[i].u >= _SEGMENT_FILL * items[segments[-1][0]].u:
            segments[-1].append(i)
        else:
            segments.append([i])
    # keep the stacked-in-order fast path when everything fits one segment
    if len(segments) == 1:
        segments[0].sort()
    return segments


class _Saved:
    """Collects tensors for save_for_backward and hands back their positions."""

    def __init__(self) -> None:
        self.tensors: list[Tensor | None] = []

    def __call__(self, t: Tensor | None) -> int:
        self.tensors.append(t)
        return len(self.tensors) - 1


def _tmp(slot: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """A float32 chunk temporary: reused scratch on the CPU (see _Workspace), else fresh.

    The caller owns the slot until its next use of the same slot name.
    """
    numel = math.prod(shape)
    if not _host_layout(device) or numel > _WORKSPACE_MAX_ELEMS:
        return torch.empty(shape, device=device)
    return _workspace.get(slot, numel, torch.float32).view(shape)


def _scalar_dist(v: Tensor, c: Tensor, cfg: _Cfg, keep_diff: bool) -> tuple[Tensor | None, Tensor]:
    """(v - c) [G, K, U] (if asked) and the adjusted squared distances D [G, K, U].

    Both live in scratch slots ("diff", "dist") until the next call.
    """
    shape = (v.shape[0], c.shape[1], v.shape[1])
    diff = None
    if keep_diff:
        diff = torch.sub(v.unsqueeze(1), c.unsqueeze(2), out=_tmp("diff", shape, v.device))
        dist = torch.mul(diff, diff, out=_tmp("dist", shape, v.device))
    else:
        dist = torch.sub(v.unsqueeze(1), c.unsqueeze(2), out=_tmp("dist", shape, v.device))
        dist.square_()
    if cfg.prune_threshold > 0:
        dist[:, 0] -= cfg.prune_threshold
    elif cfg.keep_zeros:
        dist[:, 0] = torch.where(v.ne(0), 1.0 / cfg.zero_threshold, dist[:, 0])
    return diff, dist


def _scalar_probs(dist: Tensor, cfg: _Cfg, slot: str | None, dmin: Tensor | None = None) -> Tensor:
    """P from adjusted distances (consumes ``dist``): softmax over K, or one-hot (hard).

    Written to scratch ``slot``, or to a fresh tensor when ``slot`` is None (kept). The
    softmax is taken in base 2 on logits -D log2(e) / tau (the same single rounding as
    -D / tau; exp2 is several times cheaper than exp on the CPU), its row maximum being
    ``dmin`` [G, U] (min_k D, when the caller has it) times that factor, exactly.
    """
    out = torch.empty_like(dist) if slot is None else _tmp(slot, dist.shape, dist.device)
    if cfg.mode == "hard":
        idx = dist.argmin(1, keepdim=True)
        return out.zero_().scatter_(1, idx, 1.0)
    factor = -_LOG2E / cfg.tau
    logits = dist.mul_(factor)
    top = logits.amax(1, keepdim=True) if dmin is None else (dmin * factor).unsqueeze(1)
    torch.exp2(logits.sub_(top), out=out)
    return out.div_(out.sum(1, keepdim=True))


def _scalar_att(probs: Tensor, cfg: _Cfg) -> Tensor:
    if cfg.clamp_attention and cfg.mode == "dkm":
        return probs.clamp_min(cfg.zero_threshold)
    return probs


def _scalar_update(sm: Tensor, c: Tensor, cfg: _Cfg) -> tuple[Tensor, Tensor, Tensor]:
    """(raw, mass, new): raw = c + centered sums / mass (= sums / mass; a column with mass 0
    keeps c), new = raw after lut_fn and the zero slot."""
    mass = sm[:, 1]
    # an empty column (_filled) keeps c (its 0 / 0 is discarded by the select)
    raw = torch.where(_filled(mass), c + sm[:, 0] / mass, c)
    new = raw
    if cfg.lut_fn is not None:
        quantized = cfg.lut_fn(raw.unsqueeze(-1))
        if not isinstance(quantized, Tensor) or quantized.shape != raw.unsqueeze(-1).shape:
            got = getattr(quantized, "shape", type(quantized).__name__)
            raise ValueError(
                f"soft_kmeans: lut_fn must return a tensor of shape "
                f"{tuple(raw.unsqueeze(-1).shape)}, got {got}"
            )
        new = quantized.detach().to(raw.dtype).squeeze(-1)
    if cfg.enforce_zero:
        new = new.clone()
        new[:, 0] = 0.0
    return raw, mass, new


def _lut_vjp(cfg: _Cfg, raw: Tensor, grad: Tensor) -> Tensor:
    """d loss / d raw from d loss / d lut_fn(raw) (identity for straight-through LUTs)."""
    fn = cfg.lut_fn
    if fn is None or getattr(fn, "straight_through", False):
        return grad
    with torch.enable_grad():
        r = raw.detach().unsqueeze(-1).requires_grad_()
        out = fn(r)
        if not out.requires_grad:
            return torch.zeros_like(grad)
        (g,) = torch.autograd.grad(out, r, grad.unsqueeze(-1).to(out.dtype), allow_unused=True)
    return torch.zeros_like(grad) if g is None else g.squeeze(-1).to(grad.dtype)


def _track_last(t, act, c, new, prev_c, last_c, last_it):
    """After iteration t (c -> new) ran on the groups ``act`` (None: all): per group, the
    centroids before and after the last iteration it ran (prev_c, last_c) and that iteration
    (last_it; None: the last one, for every group)."""
    if act is None:
        return c, new, None
    keep = act.unsqueeze(1)
    prev_c, last_c = torch.where(keep, c, prev_c), torch.where(keep, new, last_c)
    base = torch.full(act.shape, t - 1, dtype=torch.long, device=act.device)
    return prev_c, last_c, torch.where(act, t, base if last_it is None else last_it)


def _next_active(inertia, prev_inertia, act, epsilon: float, sync_free: bool):
    """(the groups that run the next iteration, None: all; whether none does) after an
    iteration on the groups ``act`` with this inertia [G] (the previous one ``prev_inertia``).
    The loop only ends early without ``sync_free`` (a host read)."""
    if prev_inertia is None:
        return act, False
    # absolute threshold on a sum over N, like coremltools (it rarely fires for big N)
    running = (inertia - prev_inertia).abs() > epsilon
    active = running if act is None else act & running
    if not sync_free:
        n_active = int(active.sum())  # a host read: free on the CPU
        if n_active == 0:
            return active, True
        if n_active == active.shape[0]:
            return None, False
    return active, False


def _scalar_iterations(c: Tensor, cfg: _Cfg, sync_free: bool, step):
    """The scalar engine's iterations from centroids c [G, K], with per-group early stopping.

    ``step(t, c, act, test)`` computes iteration t's sums [G, 2, K] from the (contiguous)
    centroids c on the groups ``act`` (None: all), the inertia [G] float64 when ``test`` (else
    None) and what its history entry keeps for backward (or None). Returns (hist, prev_c,
    last_c, last_it): per iteration (c, raw, mass, act, kept), and per group the centroids
    before and after its last iteration and that iteration (see _track_last).
    """
    hist: list[tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]] = []
    prev_c = last_c = c = c.contiguous()
    last_it: Tensor | None = None  # per group, the last iteration run (None: the last one)
    active: Tensor | None = None
    prev_inertia: Tensor | None = None
    for t in range(cfg.max_iter):
        act = active
        test = cfg.epsilon >= 0 and t + 1 < cfg.max_iter
        sm, inertia, kept = step(t, c, act, test)
        raw, mass, new = _scalar_update(sm, c, cfg)
        hist.append((c, raw, mass, act, kept))
        prev_c, last_c, last_it = _track_last(t, act, c, new, prev_c, last_c, last_it)
        c = last_c.contiguous()
        if not test:
            continue
        inertia = inertia.float()
        active, done = _next_active(inertia, prev_inertia, act, cfg.epsilon, sync_free)
        if done:
            break
        prev_inertia = inertia
    return hist, prev_c, last_c, last_it


def _row_lens(it: _ScalarItem, per_group: list[int] | None) -> Tensor:
    """int32 [G]: the codes (table), nodes (grid) or elements (dense) of each of its groups."""
    if it.kind == "table":
        return torch.tensor(per_group[it.trow : it.trow + it.g], dtype=torch.int32)
    if it.kind == "grid":
        return it.spec.lens
    return torch.full((it.g,), it.n, dtype=torch.int32)


def _scalar_forward(v: Tensor, m: Tensor, c: Tensor, cfg: _Cfg, sync_free: bool, lens=None):
    """The iterations on one segment: values v and masses m [G, U], centroids c [G, K]; lens
    (int32 [G] or None): the codes of each row, zero mass past them (the compiled kernels skip
    those; the torch code runs them, adding zeros).

    Returns (y [G, U] per-code output, final centroids [G, K], state for backward).
    Early stopping is per group: on the CPU the loop ends once every group has stopped (one
    host read per iteration, free there); with ``sync_free`` every iteration runs and a group
    that stopped keeps its state through torch.where (the same result, no host sync).
    """
    if _triton_codes(cfg, c.shape[1], v.device):
        done = _scalar_forward_triton(v, m, c, cfg)
        if done is not None:
            return done
    if _c_codes(cfg, c.shape[1], v.device):
        return _scalar_forward_c(v, m, c, cfg, sync_free, lens)
    g, u = v.shape
    k = c.shape[1]
    chunks = list(_chunks(u, _scalar_rows(g, k, v.device)))
    single = len(chunks) == 1
    budget = _keep_budget(v.device)
    keep_all = single and cfg.max_iter * g * k * u <= budget
    keep_out = single and g * k * u <= budget
    p_out: Tensor | None = None  # the attention of each group's last iteration (one chunk)

    def step(t: int, c: Tensor, act: Tensor | None, test: bool):
        nonlocal p_out
        # centered sums: sum_u A_ju m_u (v_u - c_j) and sum_u A_ju m_u, so that the new
        # centroid c_j + sums / mass is accurate to float32 rounding of the *step*, not of the sum
        sm = v.new_zeros(g, 2, k)
        # the inertia is the float32 rounding of its exact value (summed in float64): it does
        # not depend on chunking, batching or the device, and it stops changing once the
        # centroids have converged to float32 precision
        inertia = v.new_zeros(g, dtype=torch.float64) if test else None
        probs = v
        # P of this iteration: kept for backward, or alternating scratch (the previous one
        # may still be the output's attention of a group that stopped)
        slot = None if keep_all else ("p0", "p1")[t % 2]
        for a, b in chunks:
            diff, dist = _scalar_dist(v[:, a:b], c, cfg, keep_diff=True)
            dmin = None
            if inertia is not None:
                dmin = dist.amin(1)
                inertia += torch.sum(dmin.double() * m[:, a:b], 1)
            probs = _scalar_probs(dist, cfg, slot, dmin)
            att = _scalar_att(probs, cfg)
            mc = m[:, a:b].unsqueeze(2)
            sm[:, 0] += torch.bmm(diff.mul_(att), mc).view(g, k)
            sm[:, 1] += torch.bmm(att, mc).view(g, k)
        if single:
            p_out = probs if act is None else torch.where(act.view(g, 1, 1), probs, p_out)
        return sm, inertia, probs if keep_all else None

    hist, prev_c, last_c, last_it = _scalar_iterations(c, cfg, sync_free, step)
    y = v.new_empty(g, u)
    for a, b in chunks:
        probs = p_out
        if probs is None:
            _, dist = _scalar_dist(v[:, a:b], prev_c, cfg, keep_diff=False)
            probs = _scalar_probs(dist, cfg, "p0")
        torch.bmm(last_c.unsqueeze(1), _scalar_att(probs, cfg), out=y[:, a:b].unsqueeze(1))
    if not keep_out:
        p_out = None
    elif not keep_all and p_out is not None and p_out.data_ptr() in _scratch_ptrs(p_out):
        p_out = p_out.clone()  # out of the scratch slot: backward needs it
    state = dict(v=v, m=m, hist=hist, prev_c=prev_c, last_c=last_c, last_it=last_it, p_out=p_out)
    return y, last_c, state


def _scratch_ptrs(t: Tensor) -> set[int]:
    if not _host_layout(t.device):
        return set()
    return {b.data_ptr() for b in _workspace.buffers.values()}


def _scalar_softmax_back(grad: Tensor, probs: Tensor, v: Tensor, cfg: _Cfg, slot: str) -> Tensor:
    """d loss / d logits from d loss / d A (consumes ``grad``), per [G, K, U] chunk."""
    if cfg.clamp_attention and cfg.mode == "dkm":
        grad = grad.mul_(probs >= cfg.zero_threshold)  # coremltools' clamp
    out = _tmp(slot, probs.shape, probs.device)
    torch._softmax_backward_data(grad, probs, 1, probs.dtype, grad_input=out)
    if cfg.keep_zeros:
        out[:, 0] *= v.eq(0)  # slot 0's logit is a constant for non-zero v
    return out


def _scalar_backward_step(v, m, gsum, probs, diff, cfg, s_hat, raw, out_c):
    """One chunk of one iteration's backward, for the attention A = att(P) of centroids c.

    d loss / d A[j, u] = m_u s_hat_j (v_u - raw_j) (the centroid update raw = sum A m v /
    sum A m; zero rows for groups not updated) + gsum_u out_c_j (the output y = A . out_c,
    when ``out_c`` is given). The logits are -(v - c)^2 / tau: d/dv = -two (v - c) = -d/dc.
    The softmax backward is taken row by row (exact where the attention saturates).
    Returns (r: gradient to v_u per unit mass through the update, h: the output's slope
    dy_u/dv_u or None, d c through the update or None, d c through the output or None).
    """
    g = v.shape[0]
    two = 2.0 / cfg.tau
    r = dc = None
    if s_hat is not None:
        att = _scalar_att(probs, cfg)
        r = torch.bmm(s_hat.unsqueeze(1), att).view(g, -1)  # the direct term d S_j / d v_u
    if cfg.mode == "hard":  # A is piecewise constant
        return r, None, None, None
    if s_hat is not None:
        # s_hat_j (v_u - raw_j) in one pass (the row-wise softmax backward below cancels the
        # rounding of a saturated row exactly)
        grad = torch.addcmul(
            (s_hat * raw).neg_().unsqueeze(2),
            v.unsqueeze(1),
            s_hat.unsqueeze(2),
            out=_tmp("dist", probs.shape, v.device),  # free again once P is known
        )
        e = _scalar_softmax_back(grad, probs, v, cfg, "p1").mul_(diff)
        r.sub_(e.sum(1), alpha=two)
        dc = torch.bmm(e, m.unsqueeze(2)).view(g, -1).mul_(two)
    if out_c is None:
        return r, None, dc, None
    if cfg.clamp_attention and cfg.mode == "dkm":
        grad = _tmp("dist", probs.shape, v.device).copy_(out_c.unsqueeze(2).expand_as(probs))
        e = _scalar_softmax_back(grad, probs, v, cfg, "p1")
    else:  # softmax backward of a row-constant gradient: P (L - sum_k P_k L_k)
        y = torch.bmm(out_c.unsqueeze(1), probs)
        e = torch.sub(out_c.unsqueeze(2), y, out=_tmp("p1", probs.shape, v.device)).mul_(probs)
        if cfg.keep_zeros:
            e[:, 0] *= v.eq(0)
    e.mul_(diff)
    h = e.sum(1).mul_(-two)
    dc_out = torch.bmm(e, gsum.unsqueeze(2)).view(g, -1).mul_(two)
    return r, h, dc, dc_out


def _ends_at(last_it: Tensor | None, t: int, n_run: int):
    """Groups whose output comes from iteration t: None (all), False (none) or a [G, 1] mask."""
    if last_it is None:
        return None if t == n_run - 1 else False
    return last_it.eq(t).unsqueeze(1)


def _add_at(base: Tensor, extra: Tensor | None, mask) -> Tensor:
    """base + extra in the groups of ``mask`` (an _ends_at answer)."""
    if extra is None or mask is False:
        return base
    return base + (extra if mask is None else extra * mask)


def _update_vjp(cfg: _Cfg, raw: Tensor, mass: Tensor, act, grad_new: Tensor, zeros_k: Tensor):
    """Back through one iteration's update (new = lut_fn(c + sums / mass), the zero slot; an
    empty column keeps c): d loss / d new -> (s_hat, d loss / d sums per unit of mass, 0 in
    the groups that did not run; grad_in, the part that reaches c directly)."""
    if cfg.enforce_zero:
        grad_new = grad_new.clone()
        grad_new[:, 0] = 0.0
    grad_raw = _lut_vjp(cfg, raw, grad_new)
    filled = _filled(mass)
    s_hat = torch.where(filled, grad_raw / torch.where(filled, mass, 1.0), zeros_k)
    if act is not None:
        s_hat = s_hat * act.unsqueeze(1)
    return s_hat, torch.where(filled, zeros_k, grad_raw)


def _scalar_backward(state: dict, gsum: Tensor, cfg: _Cfg) -> tuple[Tensor, Tensor]:
    """Per-code (h, r) of one segment: grad x_i = g_i h[u_i] + r[u_i]."""
    if state.get("path") == "c":
        return _scalar_backward_c(state, gsum, cfg)
    if state.get("path") == "triton":
        return _scalar_backward_triton(state, gsum, cfg)
    v, m, hist = state["v"], state["m"], state["hist"]
    prev_c, last_c, last_it, p_out = (state[k] for k in ("prev_c", "last_c", "last_it", "p_out"))
    g, u = v.shape
    k = prev_c.shape[1]
    n_run = len(hist)
    chunks = list(_chunks(u, _scalar_rows(g, k, v.device)))
    merged = len(chunks) == 1
    h = v.new_zeros(g, u)
    r = v.new_zeros(g, u)
    zeros_k = v.new_zeros(g, k)
    hard = cfg.mode == "hard"

    def probs_at(c, a, b, saved):
        if saved is not None:  # only (v - c) is needed
            shape = (g, k, b - a)
            return torch.sub(
                v[:, a:b].unsqueeze(1), c.unsqueeze(2), out=_tmp("diff", shape, v.device)
            ), saved
        diff, dist = _scalar_dist(v[:, a:b], c, cfg, keep_diff=not hard)
        return diff, _scalar_probs(dist, cfg, "p0")

    def d_output_c(probs, a, b):
        att = _scalar_att(probs, cfg)
        return torch.bmm(gsum[:, a:b].unsqueeze(1), att.transpose(1, 2)).view(g, k)

    d_last = d_prev = None  # d loss / d (the output's centroids), per group
    if not merged:
        # the output alone first: d loss / d last_c is needed before undoing the last iteration
        d_last, d_prev = zeros_k.clone(), zeros_k.clone()
        for a, b in chunks:
            diff, probs = probs_at(prev_c, a, b, None)
            d_last += d_output_c(probs, a, b)
            _, hh, _, dco = _scalar_backward_step(
                v[:, a:b], m[:, a:b], gsum[:, a:b], probs, diff, cfg, None, None, last_c
            )
            if hh is not None:
                h[:, a:b] = hh
                d_prev += dco
    grad_c = zeros_k  # d loss / d (centroids after the iteration being undone)
    for t in reversed(range(n_run)):
        c, raw, mass, act, saved = hist[t]
        ends = _ends_at(last_it, t, n_run)
        grad_new = grad_c if act is None else grad_c * act.unsqueeze(1)
        with_out = merged and t == n_run - 1
        if with_out:
            # the output's attention: this iteration's for every group still running (prev_c
            # == c for them); the others only contribute through the output here
            diff, probs = probs_at(prev_c, 0, u, p_out)
            d_last = d_output_c(probs, 0, u)
        grad_new = _add_at(grad_new, d_last, ends)
        s_hat, grad_in = _update_vjp(cfg, raw, mass, act, grad_new, zeros_k)
        if with_out:
            rr, hh, dc, d_prev = _scalar_backward_step(
                v, m, gsum, probs, diff, cfg, s_hat, raw, last_c
            )
            r += rr
            if hh is not None:
                h = hh
            if dc is not None:
                grad_in = grad_in + dc
        else:
            for a, b in chunks:
                diff, probs = probs_at(c, a, b, saved)
                rr, _, dc, _ = _scalar_backward_step(
                    v[:, a:b], m[:, a:b], gsum[:, a:b], probs, diff, cfg, s_hat, raw, None
                )
                r[:, a:b] += rr
                if dc is not None:
                    grad_in = grad_in + dc
        grad_in = _add_at(grad_in, d_prev, ends)
        grad_c = grad_in if act is None else torch.where(act.unsqueeze(1), grad_in, grad_c)
    return h, r


# ---------------------------------------------------------------------------------------------
# the scalar engine's per-code passes in the compiled CPU kernels (mode "dkm")
#
# The same iterations and the same backward as _scalar_forward / _scalar_backward, each pass a
# single fused loop over the codes in tiles (distances, softmax, sums or the softmax backward in
# registers), the attention recomputed from the centroids wherever it is needed instead of
# being stored (an exp2 per entry is cheaper than writing and reading it back).


# The AVX2 per-code kernels skip, per span of 32 codes, the centroids whose attention there is
# below e^-_WINDOW_LOGIT (4e-11) against both the span's nearest centroid and the centroid's
# own largest anywhere in its group (see window_at in _dkm_cpu.c): with sharp attention a code
# sees its few nearest centroids, and the others' terms would not change the float32 sums they
# enter (measured: equal to ~1e-8 relative). Switched on when some group's centroids spread
# over more than 2 sqrt(_WINDOW_LOGIT tau), i.e. when a span can skip any: MiniLM with
# group_size 16 at 4 bits, per-node kernels 29% faster in its step (2.7-2.9x in isolation;
# 0 switches it off).
_WINDOW_LOGIT = 24.0


def _max_spread(c: Tensor) -> float:
    """The largest max - min over the rows of c [G, K] (NaN for a non-finite entry)."""
    if _c_kernels(c.device):
        c = c.float().contiguous()
        return _dkm_cpu.max_spread(c.data_ptr(), *c.shape)
    return float((c.amax(1) - c.amin(1)).amax())


def _c_cfg(cfg: _Cfg, k: int, c: Tensor | None = None) -> tuple:
    """The kernels' cfg tuple; with centroids c [G, K], the window where it can skip (above)."""
    clamp = cfg.clamp_attention and cfg.mode == "dkm"
    win = _WINDOW_LOGIT * cfg.tau
    if c is None or k < 2 or win <= 0 or not _max_spread(c) ** 2 > 4 * win:
        win = 0.0
    return (
        k,
        -_LOG2E / cfg.tau,
        cfg.prune_threshold,
        int(cfg.keep_zeros),
        1.0 / cfg.zero_threshold,
        int(clamp),
        cfg.zero_threshold,
        win,
    )


def _c_codes(cfg: _Cfg, k: int, device: torch.device) -> bool:
    """Whether the scalar engine's per-code passes run in the compiled kernels."""
    if cfg.mode != "dkm" or _C_CODES == "never" or not _c_kernels(device) or k > 256:
        return False
    return _C_CODES == "always" or _dkm_cpu.simd(_c_cfg(cfg, k))


def _triton_codes(cfg: _Cfg, k: int, device: torch.device) -> bool:
    """Whether the scalar engine's per-code passes run in the fused Triton kernels."""
    if device.type not in _TRITON_DEVICES or cfg.mode != "dkm" or cfg.lut_fn is not None:
        return False
    return k <= 256 and _triton() is not None


def _triton_elems(device: torch.device, flats: list[Tensor]) -> bool:
    """Whether the element passes of these table tensors run in the Triton element kernels:
    on a device in _TRITON_ELEM_DEVICES with the device layout and scatters outside torch's
    deterministic mode (the kernels add with atomics), contiguous float32 weights."""
    if device.type not in _TRITON_ELEM_DEVICES or not _sync_free_scatters(device):
        return False
    if _triton() is None:
        return False
    return all([f.dtype == torch.float32 and f.is_contiguous() for f in flats])


_HIST, _GATHER, _SCATTER, _GRAD = range(4)  # the element passes (_dkm_triton.elems' ops)


def _address_table(ptrs: list[int], device: torch.device) -> Tensor:
    """The addresses as an int64 tensor on ``device`` (an asynchronous copy: no wait for the
    device's queue; not inside a CUDA graph capture)."""
    return torch.tensor(ptrs, dtype=torch.int64).to(device, non_blocking=True)


class _ElemPlan:
    """The Triton element passes' view of a round's table tensors (see _dkm_triton.elems):
    each tensor's (elements, elements per group, first table row, first element in the
    round's stacked outputs), its address table, and the per-row scales."""

    def __init__(self, flats: list[Tensor], items: list[_ScalarItem], scale: Tensor) -> None:
        self.flats, self.items = flats, items
        self.scale = scale.float().contiguous()

    def launch(
        self, op: int, table: Tensor, keep_zeros: bool, live=None, grads=None, out=None
    ) -> bool:
        """Run pass ``op`` over the tensors (only those with ``live[i]``, if given; ``grads``:
        each tensor's incoming gradient, float32 and contiguous; ``out``: where the results
        go, one contiguous float32 tensor per tensor the pass runs over, or one tensor with
        every table tensor's results stacked, each at its start). False if the kernel fails
        to build (see _triton_failed): the caller runs the torch passes, with :meth:`bins`."""
        mod = _triton()
        if mod is None:
            return False
        device = table.device
        pick = [i for i in range(len(self.flats)) if live is None or live[i]]
        spec = [
            (self.flats[i].numel(), self.items[i].n, self.items[i].trow, self.items[i].start)
            for i in pick
        ]
        plan = mod.elem_plan(spec, device)
        xp = _index_tensor([self.flats[i].data_ptr() for i in pick], device)
        gp = outp = None
        if grads is not None:
            gp = _address_table([grads[i].data_ptr() for i in pick], device)
        if isinstance(out, Tensor):  # (computed on the device: no copy, a graph can hold it)
            outp = plan[1][:, 3].mul(out.element_size()).add_(out.data_ptr())
        elif out is not None:
            outp = _address_table([o.data_ptr() for o in out], device)
        try:
            mod.elems(op, plan, xp, self.scale, table, keep_zeros, gp=gp, outp=outp)
        except Exception as err:  # as in _scalar_forward_triton
            _triton_failed("an element pass", err)
            return False
        return True

    def code_tables(self, keep_zeros: bool, full: bool) -> tuple | None:
        """The histogram pass, then _code_tables' (codes, values, mass, per_group, U); None
        if the kernel fails to build."""
        rows, device = self.scale.numel(), self.scale.device
        counts = torch.zeros(rows * _STRIDE, dtype=torch.int32, device=device)
        if not self.launch(_HIST, counts, keep_zeros):
            return None
        return _code_tables(counts.view(rows, _STRIDE), self.scale, device, full)

    def grad_sums(self, codes: Tensor, keep_zeros: bool, live, grads) -> Tensor | None:
        """gsum [rows, U] (as _code_grad_sums) from one pass; None if the kernel fails."""
        rows = self.scale.numel()
        total = torch.zeros(rows * _STRIDE, device=self.scale.device)
        if not self.launch(_SCATTER, total, keep_zeros, live=live, grads=grads):
            return None
        return total.view(rows, _STRIDE).gather(1, codes)

    def grads(self, hr: Tensor, keep_zeros: bool, live, grads) -> Tensor | None:
        """Every (live) tensor's gradient g * h + r from the (h, r) pairs ``hr``, stacked at
        its start (see _split_tables); None if the kernel fails."""
        out = torch.empty(sum([f.numel() for f in self.flats]), device=self.scale.device)
        if not self.launch(_GRAD, hr, keep_zeros, live=live, grads=grads, out=out):
            return None
        return out

    def bins(self, cfg: _Cfg) -> Tensor:
        """Every element's bin, as the torch passes read them (_encode_many)."""
        return _encode_many(self.flats, cfg, self.scale.device, False, True)[0]


def _capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is being captured in a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _triton_failed(where: str, err: Exception) -> None:
    """Switch the Triton kernels off for this process (a Triton that cannot build them
    here): warn once; the torch code runs instead."""
    global _triton_kernels
    if isinstance(err, torch.cuda.OutOfMemoryError):
        raise err
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise err  # a launch a CUDA graph capture refused: RoundGraphs runs the round eagerly
    _triton_kernels = False
    warnings.warn(
        f"lightning_palettize: the fused Triton DKM kernels failed in {where} "
        f"({type(err).__name__}: {err}); the soft k-means runs in torch ops from now on",
        RuntimeWarning,
        stacklevel=3,
    )


def _scalar_forward_triton(v: Tensor, m: Tensor, c: Tensor, cfg: _Cfg):
    """_scalar_forward in the fused Triton kernels: one launch for every iteration of every
    group and the output; early stopping per group in the kernel (no host read). None if the
    kernels fail to build (see _triton_failed)."""
    v, m = v.float().contiguous(), m.float().contiguous()
    try:
        y, prev_c, last_c, last_it, c_hist, raw_hist, mass_hist = _triton().fwd_loop(
            v, m, c, _c_cfg(cfg, c.shape[1]), cfg.max_iter, cfg.epsilon, cfg.enforce_zero
        )
    except Exception as err:  # any build failure: the torch code instead
        _triton_failed("forward", err)
        return None
    state = dict(
        v=v,
        m=m,
        hist=[(c_hist[t],) for t in range(cfg.max_iter)],
        prev_c=prev_c,
        last_c=last_c,
        last_it=last_it,
        c_hist=c_hist,
        raw_hist=raw_hist,
        mass_hist=mass_hist,
        path="triton",
    )
    return y, last_c, state


def _scalar_backward_triton(state: dict, gsum: Tensor, cfg: _Cfg) -> tuple[Tensor, Tensor]:
    """_scalar_backward of _scalar_forward_triton's segment, in one launch; if the backward
    kernel fails to build, the torch code's backward of the same iterations (each group ran
    iterations 0 .. last_it)."""
    k = state["prev_c"].shape[1]
    mod = _triton()
    if mod is not None:
        try:
            return mod.bwd_loop(state, gsum, _c_cfg(cfg, k), 2.0 / cfg.tau, cfg.enforce_zero)
        except Exception as err:  # as in _scalar_forward_triton
            _triton_failed("backward", err)
    last_it = state["last_it"]
    hist = [
        (state["c_hist"][t], state["raw_hist"][t], state["mass_hist"][t], last_it >= t, None)
        for t in range(state["c_hist"].shape[0])
    ]
    torch_state = dict(state, hist=hist, p_out=None, path="torch")
    return _scalar_backward(torch_state, gsum, cfg)


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _c_iterations(v: Tensor, m: Tensor, c: Tensor, cfg: _Cfg, ct: tuple, p_keep, lens):
    """_scalar_iterations in one compiled call (``_dkm_cpu.fwd_loop``; no lut_fn).

    Returns (hist, prev_c, last_c, last_it, loop): the first four as _scalar_iterations returns
    them (hist's tensors are views of per-iteration arrays), and ``loop``, those arrays by name
    (c_hist, raw_hist, sm_hist, act_hist), which ``_dkm_cpu.bwd_loop`` reads in backward.
    """
    g, u = v.shape
    k, n_it = c.shape[1], cfg.max_iter
    c_hist = v.new_empty(n_it, g, k)
    c_hist[0] = c
    sm_hist, raw_hist = v.new_empty(n_it, g, 2, k), v.new_empty(n_it, g, k)
    act_hist = torch.empty(n_it, g, dtype=torch.uint8)
    last_it = torch.empty(g, dtype=torch.int64)
    prev_c, last_c = v.new_empty(g, k), v.new_empty(g, k)
    n_run, partial = _dkm_cpu.fwd_loop(
        v.data_ptr(), m.data_ptr(), c_hist.data_ptr(), g, u, ct, n_it, cfg.epsilon,
        cfg.enforce_zero, sm_hist.data_ptr(), raw_hist.data_ptr(), act_hist.data_ptr(),
        last_it.data_ptr(), prev_c.data_ptr(), last_c.data_ptr(), _ptr(p_keep), _ptr(lens),
    )  # fmt: skip
    acts = [None if partial < 0 or t < partial else act_hist[t].bool() for t in range(n_run)]
    hist = [(c_hist[t], raw_hist[t], sm_hist[t, :, 1], acts[t], None) for t in range(n_run)]
    loop = dict(c_hist=c_hist, raw_hist=raw_hist, sm_hist=sm_hist, act_hist=act_hist)
    return hist, prev_c, last_c, (last_it if partial >= 0 else None), loop


def _scalar_forward_c(v: Tensor, m: Tensor, c: Tensor, cfg: _Cfg, sync_free: bool, lens=None):
    """_scalar_forward through the compiled kernels (CPU, mode "dkm"); nothing N x K is kept."""
    v, m = v.float().contiguous(), m.float().contiguous()
    g, u = v.shape
    k = c.shape[1]
    ct = _c_cfg(cfg, k, c)
    # the AVX2 kernels keep the last iteration's attention in blocks of 8 codes (written by
    # the iteration that can only be the last, max_iter - 1): the output's and backward's last
    # step's, when every group ran that iteration
    p_keep = None
    if _dkm_cpu.simd(ct) and g * k * 8 * ((u + 7) // 8) <= _keep_budget(v.device):
        p_keep = v.new_empty(g * k * 8 * ((u + 7) // 8))

    def step(t: int, c: Tensor, act: Tensor | None, test: bool):
        sm = v.new_zeros(g, 2, k)
        inertia = v.new_zeros(g, dtype=torch.float64) if test else None
        _dkm_cpu.fwd_stats(
            v.data_ptr(),
            m.data_ptr(),
            c.data_ptr(),
            g,
            u,
            ct,
            sm.data_ptr(),
            _ptr(inertia),
            _ptr(p_keep) if t == cfg.max_iter - 1 else 0,
            _ptr(lens),
        )
        return sm, inertia, None

    loop = {}
    if _C_LOOP and cfg.lut_fn is None and not sync_free:
        hist, prev_c, last_c, last_it, loop = _c_iterations(v, m, c, cfg, ct, p_keep, lens)
    else:
        hist, prev_c, last_c, last_it = _scalar_iterations(c, cfg, sync_free, step)
    prev_c, last_c = prev_c.contiguous(), last_c.contiguous()
    if len(hist) < cfg.max_iter or hist[-1][3] is not None:
        p_keep = None  # the loop stopped early, or some groups' output is an earlier iteration's
    y = v.new_empty(g, u)
    _dkm_cpu.out_y(
        v.data_ptr(),
        prev_c.data_ptr(),
        last_c.data_ptr(),
        g,
        u,
        ct,
        y.data_ptr(),
        _ptr(p_keep),
        _ptr(lens),
    )
    state = dict(
        v=v,
        m=m,
        hist=hist,
        prev_c=prev_c,
        last_c=last_c,
        last_it=last_it,
        p_out=p_keep,
        lens=lens,
        path="c",
        **loop,
    )
    return y, last_c, state


def _scalar_backward_c(state: dict, gsum: Tensor, cfg: _Cfg) -> tuple[Tensor, Tensor]:
    """_scalar_backward through the compiled kernels (the one-chunk schedule)."""
    v, m, hist = state["v"], state["m"], state["hist"]
    prev_c, last_c, last_it = state["prev_c"], state["last_c"], state["last_it"]
    p_out = state["p_out"]  # the attention of prev_c, blocked (AVX2 kernels), or None
    lens = _ptr(state.get("lens"))
    g, u = v.shape
    k = prev_c.shape[1]
    ct = _c_cfg(cfg, k, prev_c)
    two = 2.0 / cfg.tau
    gsum = gsum.float().contiguous()
    n_run = len(hist)
    h = v.new_zeros(g, u)
    r = v.new_zeros(g, u)
    if state.get("c_hist") is not None:  # the forward ran fwd_loop: its backward in one call
        partial = next((t for t, entry in enumerate(hist) if entry[3] is not None), -1)
        _dkm_cpu.bwd_loop(
            v.data_ptr(), m.data_ptr(), gsum.data_ptr(), g, u, ct, two, n_run, partial,
            cfg.enforce_zero, state["c_hist"].data_ptr(), state["raw_hist"].data_ptr(),
            state["sm_hist"].data_ptr(), state["act_hist"].data_ptr(), _ptr(last_it),
            prev_c.data_ptr(), last_c.data_ptr(), _ptr(p_out), lens, h.data_ptr(), r.data_ptr(),
        )  # fmt: skip
        return h, r
    zeros_k = v.new_zeros(g, k)

    d_last = d_prev = None
    grad_c = zeros_k
    for t in reversed(range(n_run)):
        c, raw, mass, act, _ = hist[t]
        ends = _ends_at(last_it, t, n_run)
        grad_new = grad_c if act is None else grad_c * act.unsqueeze(1)
        with_out = t == n_run - 1
        if with_out:
            # d loss / d (the output's centroids): sum_u gsum_u A_uk, A from prev_c
            d_last = v.new_empty(g, k)
            _dkm_cpu.att_t(
                v.data_ptr(),
                gsum.data_ptr(),
                prev_c.data_ptr(),
                g,
                u,
                ct,
                d_last.data_ptr(),
                _ptr(p_out),
                lens,
            )
            c = prev_c
        grad_new = _add_at(grad_new, d_last, ends)
        s_hat, grad_in = _update_vjp(cfg, raw, mass, act, grad_new, zeros_k)
        s_hat = s_hat.float().contiguous()
        raw_c = raw.float().contiguous()
        dc = v.new_empty(g, k)
        dco = v.new_empty(g, k) if with_out else None
        _dkm_cpu.bwd_step(
            v.data_ptr(),
            m.data_ptr(),
            gsum.data_ptr() if with_out else 0,
            c.contiguous().data_ptr(),
            g,
            u,
            ct,
            two,
            s_hat.data_ptr(),
            raw_c.data_ptr(),
            last_c.data_ptr() if with_out else 0,
            r.data_ptr(),
            h.data_ptr(),
            dc.data_ptr(),
            _ptr(dco),
            _ptr(p_out) if with_out else 0,
            lens,
        )
        grad_in = grad_in + dc
        if with_out:
            d_prev = dco
        grad_in = _add_at(grad_in, d_prev, ends)
        grad_c = grad_in if act is None else torch.where(act.unsqueeze(1), grad_in, grad_c)
    return h, r


# Row-index tensors of the device layout's segments, by content: a model's rounds stack the
# same tensors every step, so the host-to-device copy of each index runs once (a pageable copy
# costs ~0.2 ms of host time on a GPU machine). Read-only for their users.
_INDEX_CACHE: dict[tuple, Tensor] = {}
_INDEX_CACHE_MAX = 64


def _index_tensor(idx: list[int], device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    """``torch.tensor(idx, dtype=dtype)`` on ``device``, cached by content."""
    key = (str(device), dtype, tuple(idx))
    hit = _INDEX_CACHE.get(key)
    if hit is None:
        if len(_INDEX_CACHE) >= _INDEX_CACHE_MAX:
            _INDEX_CACHE.clear()
        hit = _INDEX_CACHE[key] = torch.tensor(idx, dtype=dtype).to(device, non_blocking=True)
    return hit


def _table_runs(items) -> list[tuple[list[int], int, int]]:
    """The table items (indices into ``items``) in the runs of :func:`_stacks`, each with its
    range of the stacked element codes (``bins``)."""
    tab = [i for i, it in enumerate(items) if it.kind == "table"]
    runs = []
    for a, b in _stacks([(items[i].g, items[i].n) for i in tab]):
        members = tab[a:b]
        last = items[members[-1]]
        runs.append((members, items[members[0]].start, last.start + last.g * last.n))
    return runs


def _run_pieces(items, live: list[bool] | None, gather) -> dict[int, Tensor]:
    """Per table item of a run of several (all of them in ``live``, if given), its piece of
    ``gather(members, lo, hi)``, the run's [elements] result (one op for the run)."""
    pieces: dict[int, Tensor] = {}
    for members, lo, hi in _table_runs(items):
        if len(members) > 1 and (live is None or all([live[i] for i in members])):
            sizes = [items[i].g * items[i].n for i in members]
            pieces.update(zip(members, gather(members, lo, hi).split(sizes)))
    return pieces


def _split_tables(items, live: list[bool] | None, stacked: Tensor) -> dict[int, Tensor]:
    """Per table item (in ``live``, if given), its piece of ``stacked``, the [elements] result
    of every table item at its start."""
    return {
        i: stacked[it.start : it.start + it.g * it.n]
        for i, it in enumerate(items)
        if it.kind == "table" and (live is None or live[i])
    }


def _gather_tables(items, eplan, y_full: Tensor, bins: Tensor | None, cfg: _Cfg):
    """Every table item's soft weight [G * N] from the per-code outputs ``y_full`` (device
    layout): one Triton element pass (``eplan``), else one gather per run of tensors and per
    other tensor through the bins. Returns (item index -> soft weight, bins, eplan): a kernel
    that fails to build leaves eplan None and the bins computed."""
    device = y_full.device
    tables = [i for i, it in enumerate(items) if it.kind == "table"]
    if eplan is not None:
        if _capturing(device):  # stacked, their addresses computed on the device
            total = sum([items[i].g * items[i].n for i in tables])
            dst = y_full.new_empty(total)
            ys = list(_split_tables(items, None, dst).values())
        else:  # each in its own memory, freed once its module is done with it
            ys = dst = [y_full.new_empty(items[i].g * items[i].n) for i in tables]
        if eplan.launch(_GATHER, y_full, cfg.keep_zeros, out=dst):
            return dict(zip(tables, ys)), bins, eplan
        bins, eplan = eplan.bins(cfg), None
    got = _run_pieces(items, None, lambda run, lo, hi: y_full.index_select(0, bins[lo:hi]))
    for i in tables:
        if i not in got:
            it = items[i]
            got[i] = y_full.index_select(0, bins[it.start : it.start + it.g * it.n])
    return got, bins, eplan


def _gather_grads(items, live, h_full, r_full, bins: Tensor, flat_g: list) -> dict[int, Tensor]:
    """Every live table item's gradient g * h[bins] + r[bins] (device layout): one gather per
    run of tensors (their gradients concatenated) and per other tensor."""
    got = _run_pieces(
        items,
        live,
        lambda run, lo, hi: _gather_grad(
            h_full, r_full, bins[lo:hi], _cat([flat_g[i] for i in run])
        ),
    )
    for i, it in enumerate(items):
        if it.kind == "table" and live[i] and i not in got:
            sl = bins[it.start : it.start + it.g * it.n]
            got[i] = _gather_grad(h_full, r_full, sl, flat_g[i])
    return got


def _deferred_outputs(outs: list, fields: _Fields, saved: list) -> list[Tensor]:
    """``outs`` of a ``defer`` forward with its table tensors' soft weights gathered now (in
    fresh memory, outside any graph)."""
    eplan, y_full = fields.gather
    got, _, _ = _gather_tables(fields.items, eplan, y_full, saved[fields.i_bins], fields.cfg)
    return [
        _as(got[i].view(shape), dtype) if out is None else out
        for i, (out, (shape, dtype)) in enumerate(zip(outs, fields.kinds_dtypes))
    ]


def _code_grad_sums(items, live, flat_g, bins, codes, n_tab) -> Tensor:
    """gsum [G_tab, U]: per code, the sum of its elements' incoming gradients."""
    device = bins.device
    if _host_layout(device):
        # weighted bincounts, one per tensor (the fastest scatter on the CPU)
        parts = []
        for i, it in enumerate(items):
            if it.kind != "table":
                continue
            lo, hi = it.trow * _STRIDE, (it.trow + it.g) * _STRIDE
            if live[i]:
                sl = bins[it.start : it.start + it.g * it.n]
                parts.append(torch.bincount(sl, weights=flat_g[i], minlength=hi)[lo:hi])
            else:
                parts.append(codes.new_zeros(hi - lo, dtype=torch.float32))
        total = parts[0] if len(parts) == 1 else torch.cat(parts)
    else:
        # index_add_ into one table: no host read (CUDA's bincount reads its max back), one
        # call per run of tensors (their gradients concatenated)
        total = torch.zeros(n_tab * _STRIDE, device=device)
        deterministic = not _sync_free_scatters(device)
        for members, lo, hi in _table_runs(items):
            if all([live[i] for i in members]):
                parts = [(bins[lo:hi], _cat([flat_g[i] for i in members]))]
            else:
                parts = [
                    (bins[items[i].start : items[i].start + items[i].g * items[i].n], flat_g[i])
                    for i in members
                    if live[i]
                ]
            for sl, gr in parts:
                if deterministic:
                    total.index_put_((sl.long(),), gr, accumulate=True)
                else:
                    total.index_add_(0, sl, gr)
    return total.view(n_tab, _STRIDE).gather(1, codes)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without a dispatcher call when it is already that dtype (the scalar
    engine does this per tensor and direction: host time on a GPU)."""
    return t if t.dtype == dtype else t.to(dtype)


def _cat(ts: list[Tensor]) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def _put_codes(table: Tensor, codes: Tensor, values: Tensor, u: int, c_elems: bool) -> None:
    """table[g, codes[g, i]] = values[g, i] for i < u: the per-code values into a [G, 65537]
    table (a float32 view with unit or pair stride: the compiled pass on the CPU)."""
    step = table.stride(1)
    plain = table.dtype != torch.float32 or step > 2 or table.stride(0) != _STRIDE * step
    plain = plain or values.dtype != torch.float32 or values.stride(1) != 1
    if not c_elems or plain or codes.dtype != torch.int64 or codes.stride(1) != 1:
        table.scatter_(1, codes[:, :u], values[:, :u])
        return
    lane = (table.data_ptr() - table.untyped_storage().data_ptr()) // 4 % step
    base = table.data_ptr() - 4 * lane
    args = (base, step, lane, codes.data_ptr(), codes.stride(0), values.data_ptr())
    _dkm_cpu.put(*args, values.stride(0), codes.shape[0], u)


def _put_segment_codes(
    table: Tensor, codes: Tensor, ys: list, seg_trows: list[Tensor | None]
) -> None:
    """table[trows[r], codes[trows[r], j]] = y[r, j] for each segment of table tensors only
    (``seg_trows[s]`` its table rows, ``ys[s]`` its per-code values; padding columns write
    the spare bin, which no element reads)."""
    for y, trows in zip(ys, seg_trows):
        if trows is None or y is None:
            continue
        width = y.shape[1]
        idx = codes[:, :width].index_select(0, trows).add_(trows.unsqueeze(1) * table.shape[1])
        table.view(-1).index_put_((idx.view(-1),), y.reshape(-1))


def _gather_grad(h_full: Tensor, r_full: Tensor, bins: Tensor, g: Tensor) -> Tensor:
    """g * h[bins] + r[bins] (the per-element gradient), without a full-size temporary."""
    out = r_full.index_select(0, bins)
    if not _host_layout(bins.device):
        return out.addcmul_(g, h_full.index_select(0, bins))
    step = _CODE_CHUNK
    n = bins.numel()
    tmp = _workspace.get("grad_h", min(step, n), torch.float32)
    for a in range(0, n, step):
        b = min(n, a + step)
        torch.index_select(h_full, 0, bins[a:b], out=tmp[: b - a])
        out[a:b].addcmul_(g[a:b], tmp[: b - a])
    return out


def _grad_buffer(ctx, refs, grads, flat_g, i: int, key: tuple) -> Tensor:
    """Where a compiled pass writes input i's gradient: into the incoming gradient itself when
    nothing else can observe it (the kernels read each element's g before writing its result
    in the same place), else a fresh (or the cached) buffer."""
    if (
        refs is not None
        and _overwritable(grads[i], refs[i], ctx.grad_base)
        and flat_g[i].data_ptr() == grads[i].data_ptr()
    ):
        return flat_g[i]
    grad = _outputs.take(key, (flat_g[i].numel(),), grads[i].device)
    if _KEEP_GRAD_STORAGE:
        _outputs.give(key, grad)
    return grad


class RoundGraphs:
    """CUDA graphs of a batch's soft k-means forward, replayed while its inputs stay put.

    :func:`soft_kmeans_batch` launches ~300 ops per round of the 134M LLaMA's weights, each a
    few microseconds of Python and dispatch. With full code tables (the device layout, see
    _full_tables) a round reads nothing back and its shapes follow from the tensors' shapes
    alone, so its forward is captured once in a CUDA graph and each later round with the same
    tensors (same storage, shape and dtype, same configuration) is one copy of the centroids
    and one graph launch; the soft weights are then gathered from the graph's per-code outputs
    into fresh memory (one pass with the Triton element kernels, else a gather per run of
    tensors), so the graph keeps no weight-sized tensor between steps. Pass one instance to
    every call of a training loop; any other round (grid or dense engines, compacted tables,
    a stream that is being captured) runs eagerly. :class:`DKMPalettizer` uses one only with
    ``palettizers.dkm._ROUND_GRAPHS`` (off: on an H200 it saved ~3 ms of host time per LLaMA
    step but no measurable step time, measured when the graph still held the soft weights;
    README, GPU benchmark).

    Replays write into the same memory: the centroids a replay returned, and the state its
    backward reads, are overwritten by the next replay. A call therefore replays only once
    every tensor the previous replay returned from the graph's memory has been freed and its
    backward has run (or its autograd graph was freed); otherwise it runs eagerly. A second
    backward through a replayed round (``retain_graph=True``) after a later replay raises an
    error instead of using overwritten state.

    The first call with given tensors runs eagerly (it compiles the kernels and fills the
    caches a capture must not allocate), the second captures and replays, the later ones
    replay. A capture that fails (e.g. a ``lut_fn`` that reads a value back) warns once and
    that batch runs eagerly from then on. At most ``max_graphs`` graphs are kept, each with
    its memory pool (the per-code outputs, the new centroids and the state the backward
    needs): a DKM round makes one batch per configuration, so keep it above the number of
    configurations.

    Args:
        max_graphs: graphs kept (least recently used dropped first), >= 1.

    Raises:
        ValueError: if ``max_graphs`` is not an int >= 1.

    Example:
        >>> import torch
        >>> from lightning_palettize.soft_kmeans import RoundGraphs, soft_kmeans_batch
        >>> graphs = RoundGraphs()  # one per training loop; CPU rounds run eagerly
        >>> w = (0.02 * torch.randn(64, 32)).requires_grad_()
        >>> c = torch.linspace(-0.05, 0.05, 16).view(1, 16, 1)
        >>> (y, c_new), = soft_kmeans_batch([w], [c], groups=[1], graphs=graphs)
        >>> y.shape, graphs.replays
        (torch.Size([64, 32]), 0)
    """

    def __init__(self, max_graphs: int = 8) -> None:
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"RoundGraphs: max_graphs must be an int >= 1, got {max_graphs!r}")
        self.max_graphs = max_graphs
        self._entries: dict[tuple, _GraphEntry] = {}  # (insertion order: least recent first)
        self._seen: set[tuple] = set()  # batches run once eagerly, to capture at the next call
        self._failed: set[tuple] = set()
        self.captures = 0
        self.replays = 0

    def __getstate__(self) -> dict:
        return {"max_graphs": self.max_graphs}  # graphs are device state: a copy starts empty

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_graphs"])

    def clear(self) -> None:
        """Drop every graph and its memory."""
        self._entries.clear()
        self._seen.clear()
        self._failed.clear()

    def run(self, ctx, cfg: _Cfg, kinds: tuple, gs: tuple, c0: Tensor, xs: tuple):
        """_ScalarKMeans.forward's result from a graph (captured now if due), or None: the
        caller runs the forward eagerly."""
        device = c0.device
        if device.type not in _GRAPH_DEVICES:
            return None
        if not all([k == "table" for k in kinds]):  # (a _GridSpec is not "table")
            return None
        if not _full_tables(device, c0.shape[1], cfg, c0.shape[0], sum([x.numel() for x in xs])):
            return None  # compacted tables: their sizes are read back each round
        if _capturing(device):
            return None  # inside someone else's capture: theirs records the eager ops
        key = (
            device,
            cfg,
            kinds,
            gs,
            c0.dtype,
            tuple([(x.data_ptr(), x.shape, x.dtype) for x in xs]),
        )
        entry = self._entries.get(key)
        if entry is None:
            if key in self._failed:
                return None
            if key not in self._seen:
                if len(self._seen) >= 16:
                    self._seen.clear()
                self._seen.add(key)
                return None  # eager once: compiles kernels, fills caches
            self._seen.discard(key)
            entry = self._capture(key, cfg, kinds, gs, c0, xs)
            if entry is None:
                return None
        elif not entry.free():
            return None
        else:
            entry.c0.copy_(c0)
            entry.graph.replay()
            del self._entries[key]
            self._entries[key] = entry  # most recently used last
        self.replays += 1
        return entry.hand_out(ctx)

    def _capture(self, key: tuple, cfg, kinds, gs, c0: Tensor, xs) -> _GraphEntry | None:
        device = c0.device
        static_c0 = c0.clone()
        # cached tensors the graph reads: kept alive with it (a cache may drop its entries)
        keep = [
            *_INDEX_CACHE.values(),
            _all_codes_cache.get(device),
            _code_values_cache.get(device),
        ]
        if _triton_kernels:  # the element passes' launch plans
            keep.extend([t for plan in _triton_kernels._plans.values() for t in plan])
        graph = _new_graph(device)
        try:
            result = graph.capture(
                lambda: _scalar_kmeans_forward(cfg, kinds, gs, static_c0, xs, defer=True)
            )
            graph.replay()  # (capturing ran nothing)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:
            self._failed.add(key)
            warnings.warn(
                f"lightning_palettize: capturing a soft k-means round in a {device.type} graph "
                f"failed ({type(err).__name__}: {err}); this batch of {len(xs)} tensors runs "
                "eagerly",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        entry = _GraphEntry(graph, static_c0, result, keep)
        while len(self._entries) >= self.max_graphs:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = entry
        self.captures += 1
        return entry


class _GraphEntry:
    """One captured round: its graph, static input centroids, outputs and saved state."""

    def __init__(self, graph, c0: Tensor, result: tuple, keep: list) -> None:
        self.graph, self.c0, self.keep = graph, c0, keep
        self.outs, self.new_c, self.fields, self.saved = result
        self.generation = 0
        self.handed: list[weakref.ref] = []  # the tensors the last replay returned
        self.ctx_ref: weakref.ref | None = None  # its autograd node, while a backward may come
        self.backward_ran = False

    def free(self) -> bool:
        """Whether nothing of the last replay's results can still be read."""
        if any([r() is not None for r in self.handed]):
            return False
        ref = self.ctx_ref
        return ref is None or self.backward_ran or ref() is None

    def hand_out(self, ctx) -> tuple:
        """The replayed results for ``ctx``: fresh tensors over the graph's memory."""
        self.generation += 1
        outs = [None if o is None else o.detach() for o in self.outs]
        new_c = self.new_c.detach()
        # (only the graph's memory: the soft weights gathered after it are fresh tensors)
        self.handed = [weakref.ref(t) for t in outs if t is not None]
        self.handed.append(weakref.ref(new_c))
        if self.fields.gather is not None:
            outs = _deferred_outputs(outs, self.fields, self.saved)
        self.backward_ran = False
        self.ctx_ref = weakref.ref(ctx) if any(ctx.needs_input_grad) else None
        fields = _Fields()
        fields.__dict__.update(self.fields.__dict__)
        fields.graph = (self, self.generation)
        return outs, new_c, fields, self.saved

    def check(self, generation: int) -> None:
        if generation != self.generation:
            raise RuntimeError(
                "lightning_palettize: backward through a soft k-means round whose CUDA graph "
                "was replayed since (a second backward with retain_graph=True after a later "
                "forward): its saved state is overwritten. Run that loop without graphs "
                "(soft_kmeans_batch(graphs=None); DKMPalettizer: leave lightning_palettize."
                "palettizers.dkm._ROUND_GRAPHS False, its default)"
            )

    def release(self, generation: int) -> None:
        if generation == self.generation:
            self.backward_ran = True


class _CudaGraph:
    """torch.cuda.CUDAGraph behind RoundGraphs' two calls (tests emulate it on the CPU)."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], Any]) -> Any:
        # (thread_local: a DataLoader's pin-memory thread may call CUDA meanwhile)
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


def _new_graph(device: torch.device) -> _CudaGraph:
    return _CudaGraph()


class _Fields:
    """The attributes a round's forward leaves for its backward (set on ctx)."""


def _scalar_kmeans_forward(
    cfg, kinds, gs, c0: Tensor, xs, defer: bool = False
) -> tuple[list[Tensor | None], Tensor, _Fields, list]:
    """The computation of :class:`_ScalarKMeans`'s forward: (outputs, new centroids, the
    attributes its backward reads, the tensors it saves). Apart from ``_Fields``, the same
    Python state whatever the values (a round on full code tables reads nothing back), so a
    CUDA graph of it replays (see RoundGraphs).

    ``defer`` (the device layout): the table tensors' outputs are left out (None) and
    gathered afterwards by :func:`_deferred_outputs`, from the per-code outputs the fields
    keep (``gather``): a graph of the round then holds no soft weight in its memory."""
    device = c0.device
    sync_free = _sync_free(device)
    items: list[_ScalarItem] = []
    flats = []
    row = trow = start = 0
    for x, kind, g in zip(xs, kinds, gs):
        n = x.numel() // g
        # (forward runs without grad mode: a reshape has no autograd history, no detach)
        if isinstance(kind, _GridSpec):
            flat = x.reshape(g, n)
            c_grid = _c_kernels(device) and flat.dtype == torch.float32
            c_grid = c_grid and flat.is_contiguous()
            items.append(_ScalarItem("grid", g, n, row, trow, start, spec=kind, flat=flat))
            items[-1].c_grid = c_grid
            row += g
            continue
        items.append(_ScalarItem(kind, g, n, row, trow, start))
        row += g
        if kind == "table":
            flats.append(x.reshape(g, n))
            trow += g
            start += g * n
    n_tab = trow
    bins = codes = values = mass = scale = None
    per_group: list[int] | None = None
    u_tab = 0
    # the compiled element passes: float32, contiguous weights (x is then saved for
    # backward, usually a view of the parameter, instead of an int32 code per element)
    c_elems = bool(flats) and _c_kernels(device)
    c_elems = c_elems and all(
        f.dtype == torch.float32 and f.is_contiguous() and f.shape[1] < 1 << 31 for f in flats
    )
    # the Triton element passes (see _ElemPlan): as the compiled ones, no bins
    eplan: _ElemPlan | None = None
    full = bool(flats) and _full_tables(device, c0.shape[1], cfg, n_tab, start)
    if flats and not c_elems and _triton_elems(device, flats):
        eplan = _ElemPlan(
            flats, [it for it in items if it.kind == "table"], _group_scales(flats, device)
        )
        tabs = eplan.code_tables(cfg.keep_zeros, full)
        if tabs is None:
            eplan = None
        else:
            scale = eplan.scale
            codes, values, mass, per_group, u_tab = tabs
    if flats and eplan is None:
        bins, scale, codes, values, mass, per_group, u_tab = _encode_many(
            flats, cfg, device, c_elems, full
        )

    grid_mass = {}
    for i, it in enumerate(items):
        if it.kind == "table":
            it.u = max(per_group[it.trow : it.trow + it.g])
        elif it.kind == "grid":
            it.u = it.spec.nodes
            grid_mass[i] = _grid_splat(it.flat, it.spec, None, it.c_grid)
        else:
            it.u = it.n
    segments = []  # (row index or slice, v, m, direct: v/m are the stacked code tables)
    seg_trows: list[Tensor | None] = []  # a segment of table tensors only: their table rows
    c_rows = _c_kernels(device)  # each row's length, for the compiled per-code kernels only
    for s_i, members in enumerate(_plan_segments(items, c0.shape[1], _host_layout(device))):
        width = max([items[i].u for i in members])
        every_table = all([items[i].kind == "table" for i in members])
        trows: Tensor | None = None
        if len(members) == len(items) and every_table and width == u_tab:
            # every tensor is a table one, in order: the code tables as they are
            v, m, direct = values, mass, True
            rows: slice | Tensor = slice(0, row)
            lens = torch.tensor(per_group, dtype=torch.int32) if c_rows else None
            for it in items:
                it.seg, it.srow = s_i, it.row
        elif len(members) == 1:
            it = items[members[0]]
            if it.kind == "table":
                sl = slice(it.trow, it.trow + it.g)
                v, m = values[sl, : it.u], mass[sl, : it.u]
            elif it.kind == "grid":
                v, m = it.spec.values(it.c_grid), grid_mass[members[0]]
            else:
                v = xs[members[0]].detach().reshape(it.g, it.n).float()
                m = torch.ones_like(v)
            rows, direct = slice(it.row, it.row + it.g), False
            it.seg, it.srow = s_i, 0
            lens = _row_lens(it, per_group) if c_rows else None
        else:
            # several tensors, each at its row offset in the segment
            idx, tidx, r0 = [], [], 0
            for i in members:
                it = items[i]
                it.seg, it.srow = s_i, r0
                idx.extend(range(it.row, it.row + it.g))
                tidx.extend(range(it.trow, it.trow + it.g))
                r0 += it.g
            rows = _index_tensor(idx, device)
            if every_table:
                # their rows of the stacked code tables (each row padded with the spare
                # code up to the table width): one gather each
                trows = _index_tensor(tidx, device)
                v = values[:, :width].index_select(0, trows)
                m = mass[:, :width].index_select(0, trows)
            else:
                v = c0.new_zeros(r0, width)
                m = c0.new_zeros(r0, width)
                for i in members:
                    it = items[i]
                    dst = slice(it.srow, it.srow + it.g)
                    if it.kind == "table":
                        sl = slice(it.trow, it.trow + it.g)
                        v[dst, : it.u] = values[sl, : it.u]
                        m[dst, : it.u] = mass[sl, : it.u]
                    elif it.kind == "grid":
                        v[dst, : it.u] = it.spec.values(it.c_grid)
                        m[dst, : it.u] = grid_mass[i]
                    else:
                        v[dst, : it.n] = xs[i].detach().reshape(it.g, it.n)
                        m[dst, : it.n] = 1.0
            direct = False
            lens = None
            if c_rows:
                lens = torch.cat([_row_lens(items[i], per_group) for i in members])
        segments.append((rows, v, m, direct, lens))
        seg_trows.append(trows)

    saved = _Saved()
    new_c = torch.empty_like(c0)
    ys, seg_state = [], []
    seg_path: list[str] = []  # per segment, the code that ran it (see _scalar_backward)
    seg_cents: list[list[Tensor]] = []  # per segment, each iteration's centroids
    for rows, v, m, _, lens in segments:
        if isinstance(rows, slice):
            y, last, state = _scalar_forward(v, m, c0[rows], cfg, sync_free, lens)
            new_c[rows] = last
        else:
            c_seg = c0.index_select(0, rows)
            y, last, state = _scalar_forward(v, m, c_seg, cfg, sync_free, lens)
            new_c.index_copy_(0, rows, last)
        ys.append(y)
        seg_cents.append([entry[0] for entry in state["hist"]])
        seg_path.append(state.pop("path", "torch"))
        hist = [tuple(saved(a) for a in entry) for entry in state.pop("hist")]
        seg_state.append(({key: saved(val) for key, val in state.items()}, hist))

    for it in items:
        if it.kind == "grid":  # did every iteration's transitions stay on fine cells?
            # (not the first's: it starts from the centroids the grid was built for, with
            # _GRID_SPEC_MARGIN logits to spare, or a rebuild's larger counts)
            cents = [c[it.srow : it.srow + it.g] for c in seg_cents[it.seg][1:]]
            _grid_check(it.spec, cents, cfg)
    outs = []
    y_full = None
    if n_tab:
        # the compiled gathers read only the codes present (all written below)
        gathered = c_elems or eplan is not None
        y_full = c0.new_empty(n_tab * _STRIDE) if gathered else c0.new_zeros(n_tab * _STRIDE)
        table = y_full.view(n_tab, _STRIDE)
        if segments[0][3]:  # one stacked segment of every table
            _put_codes(table, codes, ys[0], codes.shape[1], c_elems)
        else:
            _put_segment_codes(table, codes, ys, seg_trows)
            for it in items:
                if it.kind == "table" and seg_trows[it.seg] is None:
                    sl = slice(it.trow, it.trow + it.g)
                    seg_y = ys[it.seg][it.srow : it.srow + it.g]
                    _put_codes(table[sl], codes[sl], seg_y, it.u, c_elems)
    stacked = {}  # item index -> its soft weight (device layout: every table tensor's)
    device_tables = bool(n_tab) and not c_elems and not _host_layout(device)
    defer = defer and device_tables
    if device_tables and not defer:
        stacked, bins, eplan = _gather_tables(items, eplan, y_full, bins, cfg)
    t_i = 0
    for i_x, (x, it) in enumerate(zip(xs, items)):
        if i_x in stacked:
            flat = stacked.pop(i_x)
        elif it.kind == "table" and defer:
            outs.append(None)  # (_deferred_outputs)
            continue
        elif it.kind == "table" and c_elems:
            flat = _outputs.take(("y", t_i, it.n), (it.g, it.n), device)
            _dkm_cpu.gather(
                flats[t_i].data_ptr(),
                it.g,
                it.n,
                scale[it.trow :].data_ptr(),
                int(cfg.keep_zeros),
                y_full[it.trow * _STRIDE :].data_ptr(),
                flat.data_ptr(),
            )
        elif it.kind == "table":
            flat = y_full.index_select(0, bins[it.start : it.start + it.g * it.n])
        elif it.kind == "grid" and it.spec.missing is not None:
            # the call reruns this tensor on a rebuilt grid and drops this output: not computed
            outs.append(x.new_empty(0))
            continue
        elif it.kind == "grid":
            table = ys[it.seg][it.srow : it.srow + it.g, : it.u]
            buf = _outputs.take(("gy", it.row, it.n), (it.g, it.n), device) if it.c_grid else None
            flat = _grid_lerp(it.flat, it.spec, table, it.c_grid, buf)
        else:
            flat = ys[it.seg][it.srow : it.srow + it.g, : it.n]
        outs.append(_as(flat.reshape(x.shape), x.dtype))
        t_i += it.kind == "table"
    ctx = _Fields()
    ctx.cfg, ctx.items, ctx.seg_state, ctx.n_tab = cfg, items, seg_state, n_tab
    ctx.seg_path = seg_path
    ctx.seg_trows = seg_trows
    ctx.direct = segments[0][3]
    ctx.kinds_dtypes = [(x.shape, x.dtype) for x in xs]
    ctx.i_bins, ctx.i_codes = saved(bins), saved(codes)
    ctx.c_elems = c_elems
    ctx.t_elems = eplan is not None
    ctx.gather = (eplan, y_full) if defer else None
    # the baseline for writing each weight's gradient into its incoming one (measured once)
    ctx.grad_base = None
    c_any = c_elems or any([it.c_grid for it in items])
    if c_any and _GRAD_IN_PLACE and any(x.requires_grad for x in xs):
        ctx.grad_base = _grad_baseline()
    ctx.i_grid = {}
    for i, it in enumerate(items):
        if it.kind == "grid":
            ctx.i_grid[i] = saved(it.flat)
            it.flat = None  # the saved tensor is backward's copy
    if c_elems or eplan is not None:
        ctx.i_scale = saved(scale)
        ctx.i_flats = [saved(f) for f in flats]
    return outs, new_c, ctx, saved.tensors


class _ScalarKMeans(torch.autograd.Function):
    """Soft k-means of many [G, N, 1] tensors (one config) in one node; see the section notes.

    ``gs`` holds each input's G: an input may have any shape whose C order is its [G, N]
    groups (a contiguous weight given as it is: no view node per weight in the graph), and
    each output has its input's shape."""

    @staticmethod
    def forward(ctx, cfg, kinds, gs, c0, graphs, *xs):
        run = None
        if graphs is not None:
            run = graphs.run(ctx, cfg, kinds, gs, c0, xs)
        if run is None:
            run = _scalar_kmeans_forward(cfg, kinds, gs, c0, xs)
        outs, new_c, fields, saved = run
        ctx.__dict__.update(fields.__dict__)
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(new_c)
        ctx.set_materialize_grads(False)
        return (*outs, new_c)

    @staticmethod
    def backward(ctx, *grads):
        # before anything else references the gradients (see _grad_refs)
        refs = _grad_refs(grads) if ctx.grad_base is not None else None
        graph = ctx.__dict__.get("graph")
        if graph is not None:  # a replayed CUDA graph's saved tensors: still this forward's?
            graph[0].check(graph[1])
        try:
            return _ScalarKMeans._backward(ctx, refs, grads)
        finally:
            if graph is not None:
                graph[0].release(graph[1])

    @staticmethod
    def _backward(ctx, refs, grads):
        cfg, items, n_tab = ctx.cfg, ctx.items, ctx.n_tab
        tensors = ctx.saved_tensors
        need = ctx.needs_input_grad[5:]
        grads = grads[: len(items)]
        live = [need[i] and grads[i] is not None for i in range(len(items))]
        result: list[Tensor | None] = [None] * len(items)
        if not any(live):
            return (None, None, None, None, None, *result)
        bins, codes = tensors[ctx.i_bins], tensors[ctx.i_codes]
        device = tensors[ctx.seg_state[0][0]["v"]].device
        with _no_autocast(device):
            c_elems, t_elems = ctx.c_elems, ctx.t_elems
            flat_g = [
                _as(grads[i].reshape(-1), torch.float32) if live[i] else None
                for i in range(len(items))
            ]
            for i, it in enumerate(items):
                # the compiled element passes read rows (reshape keeps an expanded gradient a
                # stride-0 view)
                if live[i] and (it.c_grid or ((c_elems or t_elems) and it.kind == "table")):
                    flat_g[i] = flat_g[i].contiguous()
            gsum_tab = None
            eplan = t_live = t_grads = None
            if c_elems or t_elems:
                scale = tensors[ctx.i_scale]
                xflat = [tensors[j] for j in ctx.i_flats]
                t_of = {}  # item index -> its x among the table tensors
                for i, it in enumerate(items):
                    if it.kind == "table":
                        t_of[i] = len(t_of)
            if t_elems:
                eplan = _ElemPlan(xflat, [items[i] for i in t_of], scale)
                if _capturing(device):  # (the gradients' address tables need a copy)
                    bins, eplan = eplan.bins(cfg), None
                t_live = [live[i] for i in t_of]
                t_grads = [flat_g[i] for i in t_of]
            if n_tab and any(live[i] for i, it in enumerate(items) if it.kind == "table"):
                if eplan is not None:
                    gsum_tab = eplan.grad_sums(codes, cfg.keep_zeros, t_live, t_grads)
                    if gsum_tab is None:
                        bins, eplan = eplan.bins(cfg), None
                if c_elems:
                    # only the codes present are accumulated into and read back
                    acc = torch.empty(n_tab * _STRIDE, dtype=torch.float64, device=device)
                    _dkm_cpu.put(
                        acc.data_ptr(),
                        1,
                        0,
                        codes.data_ptr(),
                        codes.shape[1],
                        0,
                        0,
                        n_tab,
                        codes.shape[1],
                    )
                    for i, it in enumerate(items):
                        if it.kind == "table" and live[i]:
                            _dkm_cpu.scatter(
                                xflat[t_of[i]].data_ptr(),
                                it.g,
                                it.n,
                                scale[it.trow :].data_ptr(),
                                int(cfg.keep_zeros),
                                flat_g[i].data_ptr(),
                                acc[it.trow * _STRIDE :].data_ptr(),
                            )
                    gsum_tab = acc.view(n_tab, _STRIDE).gather(1, codes).float()
                elif gsum_tab is None:
                    gsum_tab = _code_grad_sums(items, live, flat_g, bins, codes, n_tab)
            gflat = {i: tensors[j] for i, j in ctx.i_grid.items()}
            gsum_grid = {}
            for i in gflat:
                if live[i]:
                    gsum_grid[i] = _grid_splat(gflat[i], items[i].spec, flat_g[i], items[i].c_grid)
            hr = []
            for s, (st_idx, hist_idx) in enumerate(ctx.seg_state):
                seg_items = [(i, it) for i, it in enumerate(items) if it.seg == s]
                if not any(live[i] for i, _ in seg_items):
                    hr.append(None)
                    continue
                state = {key: tensors[idx] for key, idx in st_idx.items()}
                state["hist"] = [tuple(tensors[j] for j in entry) for entry in hist_idx]
                state["path"] = ctx.seg_path[s]
                v = state["v"]
                if len(seg_items) == 1 and v.shape[1] == seg_items[0][1].u:
                    i, it = seg_items[0]  # the segment is this tensor's rows: no copy
                    if it.kind == "table":
                        gsum = gsum_tab[it.trow : it.trow + it.g, : it.u]
                    elif it.kind == "grid":
                        gsum = gsum_grid[i]
                    else:
                        gsum = flat_g[i].view(it.g, it.n)
                elif ctx.direct:
                    gsum = gsum_tab  # every tensor's tables, stacked in order
                elif ctx.seg_trows[s] is not None:  # table tensors only: their rows
                    gsum = gsum_tab[:, : v.shape[1]].index_select(0, ctx.seg_trows[s])
                else:
                    gsum = v.new_zeros(v.shape)
                    for i, it in seg_items:
                        if not live[i]:
                            continue
                        dst = gsum[it.srow : it.srow + it.g]
                        if it.kind == "table":
                            dst[:, : it.u] = gsum_tab[it.trow : it.trow + it.g, : it.u]
                        elif it.kind == "grid":
                            dst[:, : it.u] = gsum_grid[i]
                        else:
                            dst[:, : it.n] = flat_g[i].view(it.g, it.n)
                hr.append(_scalar_backward(state, gsum, cfg))
            h_full = r_full = hr_full = None
            if n_tab and (c_elems or t_elems):
                # (h, r) side by side, one cache line per code, for the compiled gradient pass
                hr_full = codes.new_empty((n_tab, _STRIDE, 2), dtype=torch.float32)
                if c_elems and not all(live[i] for i, it in enumerate(items) if it.kind == "table"):
                    hr_full.zero_()  # (rows of tensors without a gradient are never read)
                h_tab, r_tab = hr_full[..., 0], hr_full[..., 1]
            elif n_tab:
                h_full = codes.new_zeros(n_tab * _STRIDE, dtype=torch.float32)
                r_full = torch.zeros_like(h_full)
                h_tab, r_tab = h_full.view(n_tab, _STRIDE), r_full.view(n_tab, _STRIDE)
            if n_tab:
                if ctx.direct:
                    _put_codes(h_tab, codes, hr[0][0], codes.shape[1], c_elems)
                    _put_codes(r_tab, codes, hr[0][1], codes.shape[1], c_elems)
                else:
                    _put_segment_codes(h_tab, codes, [t and t[0] for t in hr], ctx.seg_trows)
                    _put_segment_codes(r_tab, codes, [t and t[1] for t in hr], ctx.seg_trows)
                    for i, it in enumerate(items):
                        if it.kind != "table" or not live[i] or ctx.seg_trows[it.seg] is not None:
                            continue
                        sl = slice(it.trow, it.trow + it.g)
                        hs, rs = (t[it.srow : it.srow + it.g] for t in hr[it.seg])
                        _put_codes(h_tab[sl], codes[sl], hs, it.u, c_elems)
                        _put_codes(r_tab[sl], codes[sl], rs, it.u, c_elems)
            stacked = {}  # item index -> its gradient, gathered with its run's (device layout)
            if eplan is not None and any(t_live):  # every table tensor's gradient in one pass
                g_all = eplan.grads(hr_full, cfg.keep_zeros, t_live, t_grads)
                if g_all is None:
                    bins, eplan = eplan.bins(cfg), None
                else:
                    stacked = _split_tables(items, live, g_all)
            if hr_full is not None and not c_elems and eplan is None:
                # (the element kernels failed to build: the torch passes read h and r apart)
                h_full, r_full = hr_full[..., 0].reshape(-1), hr_full[..., 1].reshape(-1)
            if eplan is None and n_tab and not c_elems and not _host_layout(device):
                stacked = _gather_grads(items, live, h_full, r_full, bins, flat_g)
            for i, it in enumerate(items):
                if not live[i]:
                    continue
                shape, dtype = ctx.kinds_dtypes[i]
                if it.kind == "grid":
                    hs, rs = (t[it.srow : it.srow + it.g, : it.u] for t in hr[it.seg])
                    grad = None
                    if it.c_grid:
                        grad = _grad_buffer(ctx, refs, grads, flat_g, i, ("ggrad", it.row, it.n))
                        _outputs.give(("gy", it.row, it.n), grads[i])
                    grad = _grid_grad(gflat[i], it.spec, flat_g[i], hs, rs, it.c_grid, grad)
                elif it.kind == "table" and c_elems:
                    grad = _grad_buffer(ctx, refs, grads, flat_g, i, ("grad", t_of[i], it.n))
                    # the soft weight's gradient becomes the next step's soft weight
                    _outputs.give(("y", t_of[i], it.n), grads[i])
                    _dkm_cpu.grad(
                        xflat[t_of[i]].data_ptr(),
                        it.g,
                        it.n,
                        scale[it.trow :].data_ptr(),
                        int(cfg.keep_zeros),
                        flat_g[i].data_ptr(),
                        hr_full[it.trow :].data_ptr(),
                        grad.data_ptr(),
                    )
                elif i in stacked:
                    grad = stacked.pop(i)
                elif it.kind == "table":
                    sl = bins[it.start : it.start + it.g * it.n]
                    grad = _gather_grad(h_full, r_full, sl, flat_g[i])
                else:
                    hs, rs = (t[it.srow : it.srow + it.g, : it.n] for t in hr[it.seg])
                    grad = torch.addcmul(rs, flat_g[i].view(it.g, it.n), hs)
                result[i] = _as(grad.reshape(shape), dtype)
        return (None, None, None, None, None, *result)


# ---------------------------------------------------------------------------------------------
# public API


def _check_tensors(fn: str, x: Tensor, centroids: Tensor) -> None:
    for name, t in (("x", x), ("centroids", centroids)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3 or not t.is_floating_point():
            raise ValueError(
                f"{fn}: {name} must be a 3-D floating tensor, got shape {tuple(t.shape)} "
                f"dtype {t.dtype}"
            )
    g, n, d = x.shape
    if n == 0 or g == 0 or d == 0:
        raise ValueError(f"{fn}: x must have G, N, d >= 1, got shape {tuple(x.shape)}")
    if centroids.shape[0] != g or centroids.shape[2] != d or centroids.shape[1] < 1:
        raise ValueError(
            f"{fn}: centroids must have shape [G={g}, K>=1, d={d}] to match x "
            f"{tuple(x.shape)}, got {tuple(centroids.shape)}"
        )
    if centroids.device != x.device:
        raise ValueError(
            f"{fn}: centroids must be on x's device {x.device}, got {centroids.device}"
        )


def _check_number(fn: str, name: str, value: object, low: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    bad = value <= low if strict else value < low
    if bad or value != value or value == float("inf"):
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"{fn}: {name} must be a finite number {bound}, got {value}")
    return value


def _check_threshold_args(fn: str, prune_threshold, enforce_zero, zero_threshold):
    prune = _check_number(fn, "prune_threshold", prune_threshold, 0.0, strict=False)
    zero = _check_number(fn, "zero_threshold", zero_threshold, 0.0, strict=True)
    if not isinstance(enforce_zero, bool):
        raise TypeError(f"{fn}: enforce_zero must be a bool, got {enforce_zero!r}")
    return prune, zero


@torch.compiler.disable
def soft_kmeans(
    x: Tensor,
    centroids: Tensor,
    *,
    tau: float = 1e-4,
    max_iter: int = 3,
    epsilon: float = 1e-4,
    mode: str = "dkm",
    enforce_zero: bool = False,
    prune_threshold: float = 0.0,
    zero_threshold: float = 1e-7,
    lut_fn: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    method: str = "auto",
    clamp_attention: bool = False,
) -> tuple[Tensor, Tensor]:
    """Soft-cluster each LUT group of ``x`` around its centroids, differentiably (DKM).

    Runs up to ``max_iter`` soft k-means iterations per group (module docstring has the
    math) and returns the soft-palettized tensor, with gradients to ``x`` through the whole
    unrolled computation, plus the updated centroids for the caller to keep as state.

    ``zero_threshold`` and ``tau``: coremltools' notes (section 1.3) say the softmax uses
    "tau = palett_tau, clamped from below at zero_threshold"; read as written, the
    temperature used is ``max(tau, zero_threshold)`` (a no-op for any realistic tau). The
    coremltools 9.0 source instead clamps the attention itself,
    ``softmax(-D / tau).clamp(min=zero_threshold)`` (mode "dkm"); ``clamp_attention=True``
    reproduces that. Every attention entry is then >= zero_threshold, so no column is ever
    empty and a centroid far from all points drifts toward the group mean.

    Early stopping is per group and absolute, like coremltools: a group stops after
    iteration t >= 2 once |inertia_t - inertia_{t-1}| <= epsilon, with inertia the sum over
    the group of min_j D_ij (adjusted D; the float32 rounding of its exact sum). On the CPU
    the iterations end once every group has stopped (one host read per iteration); on other
    devices every iteration runs and a stopped group keeps its state: the same result, no
    host sync.

    Gumbel noise (mode "gsm", temperature 1 on logits -D / tau) comes from ``generator``
    (default: the device's default generator) as uniforms u, noise = -log(-log(u)):

    * dense: per iteration, per chunk of rows [a, b), ``torch.rand(G, b - a, K)``, with
      chunks of 2^18 (CPU) / 2^25 (CUDA) // (G * K * d) rows; one ``torch.rand(G, N, K)``
      per iteration when the whole group fits one chunk.
    * table: per iteration ``torch.rand(G, U, K)``, one draw per *distinct code*, where U is
      the largest number of distinct fp16 codes in a group and code u of a group is its u-th
      smallest distinct value; all elements with the same code share the noise.

    The table engine works on x rounded to 11 significant bits (fp16 after a power-of-two
    rescale per group; exact for fp16 / bf16 weights), the inertia for early stopping
    included; the grid engine interpolates between grid nodes (module docstring), its inertia
    is that of the nodes. Gradients are first order: the backward is not itself
    differentiable.

    Args:
        x: [G, N, d] float weights (already divided by any per-channel scale). Any float
            dtype; the k-means runs in float32, with autocast disabled.
        centroids: [G, K, d] initial centroids (state; never receives gradient; copied, so
            it may be overwritten in place right after the call).
        tau: softmax temperature on squared distances (absolute, not scale-aware), > 0.
        max_iter: k-means iterations, >= 1.
        epsilon: absolute inertia change that stops a group early; negative disables
            early stopping (and its host syncs).
        mode: "dkm" (softmax), "gsm" (Gumbel-softmax) or "hard" (one-hot argmin; gradient
            reaches x only through the centroid means).
        enforce_zero: pin centroid 0 to exactly 0 after each update; with
            ``prune_threshold == 0`` only exact zeros of x may use it. Pass ``centroids``
            with slot 0 already 0.
        prune_threshold: >= 0; if > 0, subtracted from every distance to centroid 0.
        zero_threshold: > 0; see above.
        lut_fn: optional differentiable map applied to the [G, K, d] float32 centroids after
            each update (e.g. a straight-through LUT quantizer). May be called again in
            backward; must be deterministic.
        generator: torch.Generator on x's device for mode "gsm".
        method: "table" (d == 1; O(N) memory), "grid" (d == 1, mode "dkm" without the
            exact-zero rule; O(N) memory; up to 65,536 nodes, a tensor with a non-finite
            value runs "dense"), "dense" (exact, any d) or "auto": on the CPU, grid for
            float32 groups of at least 4,096 elements when it needs at most half of them
            (and 65,536) as nodes; else table when d == 1 and a group has at least 65,536
            (CPU) / 262,144 (other devices) elements, where it is measured faster; else
            dense.
        clamp_attention: clamp the "dkm" attention from below at ``zero_threshold`` as the
            coremltools 9.0 code does (see above).

    Returns:
        (x_hat, new_centroids): x_hat has x's shape and dtype; new_centroids is [G, K, d]
        float32, detached.

    Raises:
        ValueError: a shape, value or option is out of range (the message names it).
        TypeError: an argument has the wrong type.

    Example:
        >>> import torch
        >>> from lightning_palettize.soft_kmeans import soft_kmeans
        >>> w = (0.02 * torch.randn(1, 4096, 1)).requires_grad_()
        >>> c = torch.quantile(w.detach().view(-1), torch.linspace(0, 1, 16)).view(1, 16, 1)
        >>> w_hat, c = soft_kmeans(w, c)
        >>> w_hat.pow(2).sum().backward()
        >>> w_hat.shape, c.shape, w.grad.shape
        (torch.Size([1, 4096, 1]), torch.Size([1, 16, 1]), torch.Size([1, 4096, 1]))
    """
    fn = "soft_kmeans"
    _check_tensors(fn, x, centroids)
    cfg, gen, method = _make_cfg(
        fn,
        x.device,
        tau,
        max_iter,
        epsilon,
        mode,
        enforce_zero,
        prune_threshold,
        zero_threshold,
        lut_fn,
        generator,
        method,
        clamp_attention,
    )
    return _run_many([x], [centroids], cfg, gen, method)[0]


def _make_cfg(
    fn,
    device,
    tau,
    max_iter,
    epsilon,
    mode,
    enforce_zero,
    prune_threshold,
    zero_threshold,
    lut_fn,
    generator,
    method,
    clamp_attention,
) -> tuple[_Cfg, torch.Generator | None, str]:
    tau = _check_number(fn, "tau", tau, 0.0, strict=True)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{fn}: max_iter must be an int >= 1, got {max_iter!r}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or epsilon != epsilon:
        raise ValueError(f"{fn}: epsilon must be a number (negative disables), got {epsilon!r}")
    if mode not in _MODES:
        raise ValueError(f"{fn}: mode must be one of {_MODES}, got {mode!r}")
    if method not in _METHODS:
        raise ValueError(f"{fn}: method must be one of {_METHODS}, got {method!r}")
    prune, zero = _check_threshold_args(fn, prune_threshold, enforce_zero, zero_threshold)
    if lut_fn is not None and not callable(lut_fn):
        raise TypeError(f"{fn}: lut_fn must be callable or None, got {type(lut_fn).__name__}")
    if not isinstance(clamp_attention, bool):
        raise TypeError(f"{fn}: clamp_attention must be a bool, got {clamp_attention!r}")
    gen = None
    if mode == "gsm":
        gen = generator if generator is not None else _default_generator(device)
        if not isinstance(gen, torch.Generator):
            raise TypeError(f"{fn}: generator must be a torch.Generator, got {type(gen).__name__}")
        if gen.device.type != device.type or (
            device.index is not None and gen.device.index not in (None, device.index)
        ):
            raise ValueError(f"{fn}: generator is on {gen.device}, x on {device}")
    cfg = _Cfg(
        tau=max(tau, zero),
        max_iter=max_iter,
        epsilon=float(epsilon),
        mode=mode,
        enforce_zero=enforce_zero,
        prune_threshold=prune,
        zero_threshold=zero,
        lut_fn=lut_fn,
        clamp_attention=clamp_attention,
    )
    return cfg, gen, method


def _grid_allowed(cfg: _Cfg) -> bool:
    """The grid needs an output that is smooth in x: softmax attention, no exact-zero rule."""
    return cfg.mode == "dkm" and not cfg.keep_zeros


def _resolve_method(
    shape: tuple[int, int, int], device: torch.device, method: str, fn: str, cfg: _Cfg
) -> str:
    """The engine of a [G, N, d] input (``shape``) on ``device``."""
    g, n, d = shape
    if method in ("table", "grid") and d != 1:
        raise ValueError(f"{fn}: method={method!r} needs d == 1 (scalar clusters), got d={d}")
    if method == "grid" and not _grid_allowed(cfg):
        raise ValueError(
            f"{fn}: method='grid' needs mode='dkm' without the exact-zero rule (enforce_zero "
            f"with prune_threshold=0), got mode={cfg.mode!r}, enforce_zero={cfg.enforce_zero}, "
            f"prune_threshold={cfg.prune_threshold}"
        )
    if method == "auto":
        use_table = d == 1 and n >= _TABLE_MIN_GROUP.get(device.type, _DEFAULT_TABLE_MIN_GROUP)
        return "table" if use_table else "dense"
    return method


def _scalar_kind(
    x: Tensor, centroids: Tensor, resolved: str, asked: str, cfg: _Cfg, g: int | None = None
):
    """The scalar engine's kind for x ([G, N, 1], or any contiguous shape holding ``g`` groups
    of consecutive elements): "table", "exact" or its _GridSpec.

    "auto" takes the grid on the CPU for float32 groups of at least 4,096 elements when the
    groups need at most half of their elements as nodes in all, each group at most its own
    element count (and 65,536): the per-node kernels skip each group's padding, so a few
    heavy-tailed groups (a far outlier's narrow transition inside a wide cell) cost their own
    nodes, not the whole tensor's move to the per-element engine; the padded node tables are
    never larger than the elements. Method "grid" takes it up to 65,536 nodes per group.
    Otherwise (and for a group holding a non-finite value) the code engine runs where "auto"
    resolved to it, else the element engine.
    """
    g = x.shape[0] if g is None else g
    n = x.numel() // g
    fallback = "table" if resolved == "table" else "exact"
    here = _host_layout(x.device) or x.device.type in _GRID_AUTO_DEVICES
    auto = asked == "auto" and here and n >= _GRID_AUTO_MIN_GROUP
    auto = auto and x.dtype == torch.float32
    if asked == "grid" or (auto and _grid_allowed(cfg)):
        cap, total = _GRID_MAX_NODES, None
        if asked != "grid":
            cap, total = min(_GRID_MAX_NODES, n), g * n // _GRID_AUTO_FRACTION
        c0 = centroids.detach().reshape(g, -1).float()
        spec = _grid_spec(x.detach().reshape(g, n), c0, cfg, cap, total)
        if spec is not None:
            spec.fallback = fallback
            return spec
    return fallback


def _run_many(xs, centroids, cfg, gen, method, fn="soft_kmeans", groups=None, graphs=None):
    """The soft k-means of every (x, centroids): the scalar ones of one device and centroid
    count in one node.

    With ``groups`` (scalar clusters, no generator), xs[i] is a contiguous tensor of any shape
    holding groups[i] LUT groups of consecutive elements, as ``x.view(G, -1, 1)``, and its
    output has xs[i]'s shape: the node then takes and returns the weights as they are, with no
    view node per weight on either side of it (``soft_kmeans_batch(groups=...)``).
    """
    # the k-means runs in float32 and the compiled kernels read the centroids as float32
    # (a model cast to half after prepare once handed them fp16 buffers)
    centroids = [c if c.dtype == torch.float32 else c.float() for c in centroids]
    if groups is None:
        gs = [x.shape[0] for x in xs]
        shapes = [tuple(x.shape) for x in xs]
    else:
        gs = list(groups)
        shapes = [(g, x.numel() // g, 1) for x, g in zip(xs, gs)]
    methods = [_resolve_method(sh, x.device, method, fn, cfg) for sh, x in zip(shapes, xs)]
    results: list[tuple[Tensor, Tensor] | None] = [None] * len(xs)
    # one node per device and centroid count K (the stacked tables iterate K centroids a row)
    scalar: dict[tuple[torch.device, int], list[int]] = {}
    for i, x in enumerate(xs):
        if shapes[i][2] == 1 and gen is None:
            scalar.setdefault((x.device, centroids[i].shape[1]), []).append(i)
    for (device, k), idx in scalar.items():
        kinds = {i: _scalar_kind(xs[i], centroids[i], methods[i], method, cfg, gs[i]) for i in idx}
        todo, attempt = idx, 0
        while todo:
            # private copies (callers may write the returned centroids into their state in
            # place): the [G, K, 1] centroids stacked in one op, not a detach and a reshape each
            with torch.no_grad():
                c0 = torch.cat([centroids[i] for i in todo]).view(-1, k).float()
            with _no_autocast(device):
                *outs, new_c = _ScalarKMeans.apply(
                    cfg,
                    tuple([kinds[i] for i in todo]),
                    tuple([gs[i] for i in todo]),
                    c0,
                    graphs,
                    *[xs[i] for i in todo],
                )
            # the new centroids split back in one op (not a slice and a view each)
            cents = new_c.view(-1, k, 1).split([gs[i] for i in todo])
            retry = []
            for i, out, cent in zip(todo, outs, cents):
                kind = kinds[i]
                if isinstance(kind, _GridSpec) and kind.missing is not None:
                    # a transition moved off the grid's fine cells: once more on a grid
                    # covering it, then on the other engines (this result is discarded)
                    new = _grid_rebuilt(kind) if attempt == 0 else None
                    kinds[i] = new if new is not None else kind.fallback
                    retry.append(i)
                else:
                    results[i] = (out, cent)
            todo, attempt = retry, attempt + 1
    for i, x in enumerate(xs):
        if results[i] is not None:
            continue
        c0 = centroids[i].detach().to(torch.float32, copy=True)
        with _no_autocast(x.device):
            if methods[i] == "table":
                out, new_c = _TableKMeans.apply(x, c0, cfg, gen)
                results[i] = (out, new_c.detach())
            else:
                results[i] = _soft_kmeans_dense(x, c0, cfg, gen)
    return results


@torch.compiler.disable
def soft_kmeans_batch(
    xs: list[Tensor],
    centroids: list[Tensor],
    *,
    tau: float = 1e-4,
    max_iter: int = 3,
    epsilon: float = 1e-4,
    mode: str = "dkm",
    enforce_zero: bool = False,
    prune_threshold: float = 0.0,
    zero_threshold: float = 1e-7,
    lut_fn: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    method: str = "auto",
    clamp_attention: bool = False,
    groups: list[int] | None = None,
    graphs: RoundGraphs | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`soft_kmeans` of several tensors with one configuration, in few kernels.

    Equal, up to float rounding, to ``[soft_kmeans(x, c, **kw) for x, c in zip(xs,
    centroids)]`` (each tensor keeps its own engine choice and its own early stopping per
    group), but the scalar (d == 1) tensors of one device and centroid count K go through one
    autograd node: the per-code tables of all of them are stacked and iterated together, their
    backward runs as one (tensors with different K: one node per K). Mode "gsm" and d > 1 run
    tensor by tensor (the noise is drawn per tensor as documented in :func:`soft_kmeans`).
    ``lut_fn`` is applied to the stacked [sum G, K, d] centroids, so it must act per LUT group
    (as a LUT quantizer does).

    The backward of the shared node runs once every output's gradient is known: the inputs'
    gradients arrive together, at the end of the backward pass.

    Args:
        xs: [G, N, d] tensors; with ``groups``, contiguous tensors of any shape.
        centroids: [G, K, d] per input.
        groups: each input's G, for inputs given as they are: xs[i] then stands for
            ``xs[i].view(G, -1, 1)`` (its LUT groups are runs of consecutive elements, e.g. a
            weight's whole output channels) and its output has xs[i]'s shape. The node then
            takes and returns the weights with no view node per weight in the graph (two
            fewer autograd nodes per weight; DKM's host-bound GPU step). Scalar clusters
            (centroids [G, K, 1]) and no Gumbel noise (mode "gsm") only.
        tau, max_iter, epsilon, mode, enforce_zero, prune_threshold, zero_threshold, lut_fn,
            generator, method, clamp_attention: as :func:`soft_kmeans`.
        graphs: a :class:`RoundGraphs` kept across the calls of a training loop: on CUDA a
            batch that reads nothing back (full code tables) is captured once and replayed
            (the returned centroids are then the graph's memory, overwritten by its next
            replay, which waits until they are freed; the soft weights are gathered into
            fresh memory after each replay). None: always eager.

    Returns:
        one (x_hat, new_centroids) per input, as :func:`soft_kmeans` returns them.

    Raises:
        TypeError, ValueError: on inputs :func:`soft_kmeans` rejects, or outside the
            ``groups`` contract above.

    Example:
        >>> import torch
        >>> from lightning_palettize.soft_kmeans import soft_kmeans_batch
        >>> w1 = (0.02 * torch.randn(64, 32)).requires_grad_()  # 2 LUT groups of 32 rows
        >>> w2 = (0.02 * torch.randn(16, 8)).requires_grad_()  # 1 LUT group
        >>> def start(w, g):  # 16 centroids per group from the quantiles
        ...     q = torch.quantile(w.detach().view(g, -1), torch.linspace(0, 1, 16), dim=1)
        ...     return q.T.unsqueeze(-1).contiguous()
        >>> (h1, c1), (h2, c2) = soft_kmeans_batch(
        ...     [w1, w2], [start(w1, 2), start(w2, 1)], groups=[2, 1])
        >>> (h1.sum() + h2.sum()).backward()
        >>> h1.shape, c1.shape, h1.grad_fn is h2.grad_fn  # one node, outputs in w's shapes
        (torch.Size([64, 32]), torch.Size([2, 16, 1]), True)
        >>> w1.grad.shape
        torch.Size([64, 32])
    """
    fn = "soft_kmeans_batch"
    if not isinstance(xs, (list, tuple)) or not isinstance(centroids, (list, tuple)):
        raise TypeError(f"{fn}: xs and centroids must be lists of tensors")
    if len(xs) != len(centroids):
        raise ValueError(f"{fn}: got {len(xs)} tensors and {len(centroids)} centroid tensors")
    if not xs:
        return []
    if groups is None:
        for x, c in zip(xs, centroids):
            _check_tensors(fn, x, c)
    else:
        _check_grouped(fn, xs, centroids, groups, mode, generator)
    cfg, gen, method = _make_cfg(
        fn,
        xs[0].device,
        tau,
        max_iter,
        epsilon,
        mode,
        enforce_zero,
        prune_threshold,
        zero_threshold,
        lut_fn,
        generator,
        method,
        clamp_attention,
    )
    if graphs is not None and not isinstance(graphs, RoundGraphs):
        raise TypeError(f"{fn}: graphs must be a RoundGraphs or None, got {type(graphs).__name__}")
    return _run_many(list(xs), list(centroids), cfg, gen, method, fn, groups, graphs)


def _check_grouped(fn: str, xs, centroids, groups, mode, generator) -> None:
    if not isinstance(groups, (list, tuple)) or len(groups) != len(xs):
        raise ValueError(f"{fn}: groups must be a list of one int per tensor, got {groups!r}")
    if mode == "gsm" or generator is not None:
        raise ValueError(f"{fn}: groups takes no Gumbel noise (mode 'gsm' or a generator)")
    for i, (x, c, g) in enumerate(zip(xs, centroids, groups)):
        if not isinstance(x, Tensor) or not x.is_floating_point() or not x.is_contiguous():
            raise ValueError(f"{fn}: with groups, xs[{i}] must be a contiguous floating tensor")
        if isinstance(g, bool) or not isinstance(g, int) or g < 1 or x.numel() % g or not x.numel():
            raise ValueError(
                f"{fn}: groups[{i}] must be an int >= 1 dividing xs[{i}].numel() = "
                f"{x.numel()} (> 0), got {g!r}"
            )
        # (as _check_tensors of x.view(g, -1, 1), without making the view)
        ok = isinstance(c, Tensor) and c.dim() == 3 and c.is_floating_point()
        if not ok or c.shape[0] != g or c.shape[1] < 1 or c.shape[2] != 1:
            got = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(f"{fn}: centroids[{i}] must be a floating [G={g}, K>=1, 1] tensor "
                             f"for groups[{i}] = {g}, got {got}")  # fmt: skip
        if c.device != x.device:
            raise ValueError(f"{fn}: centroids must be on x's device {x.device}, got {c.device}")


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator


@torch.compiler.disable
def hard_assign(
    x: Tensor,
    centroids: Tensor,
    prune_threshold: float = 0.0,
    enforce_zero: bool = False,
    zero_threshold: float = 1e-7,
) -> Tensor:
    """Label each vector with its nearest centroid (eval / finalize path), chunked over N.

    label_i = argmin_j D_ij with D adjusted as in :func:`soft_kmeans` (prune pull on
    centroid 0; with ``enforce_zero`` and no prune pull, only exact zeros may take slot 0).
    Memory is O(chunk x K); no gradient.

    Args:
        x: [G, N, d] float weights.
        centroids: [G, K, d] centroids.
        prune_threshold: >= 0, subtracted from every distance to centroid 0.
        enforce_zero: reserve slot 0 for exact zeros (when ``prune_threshold == 0``).
        zero_threshold: > 0; non-zero x get distance 1 / zero_threshold to slot 0.

    Returns:
        labels [G, N] int64.

    Raises:
        ValueError, TypeError: as :func:`soft_kmeans`.

    Example:
        >>> import torch
        >>> from lightning_palettize.soft_kmeans import hard_assign
        >>> hard_assign(torch.tensor([[[0.1], [0.9]]]), torch.tensor([[[0.0], [1.0]]]))
        tensor([[0, 1]])
    """
    fn = "hard_assign"
    _check_tensors(fn, x, centroids)
    prune, zero = _check_threshold_args(fn, prune_threshold, enforce_zero, zero_threshold)
    cfg = _Cfg(
        tau=1.0,
        max_iter=1,
        epsilon=-1.0,
        mode="hard",
        enforce_zero=enforce_zero,
        prune_threshold=prune,
        zero_threshold=zero,
        lut_fn=None,
        clamp_attention=False,
    )
    g, n, d = x.shape
    k = centroids.shape[1]
    labels = torch.empty(g, n, dtype=torch.long, device=x.device)
    with torch.no_grad(), _no_autocast(x.device):
        xf = x.detach().float()
        c = centroids.detach().float()
        for a, b in _chunks(n, _chunk_rows(g, k, d, x.device, False)):
            xc = xf[:, a:b]
            _, dist = _pairwise(xc, c)
            labels[:, a:b] = _adjust(dist, xc, cfg).argmin(-1)
    return labels
