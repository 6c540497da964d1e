"""DKMPalettizer: train-time differentiable k-means palettization (coremltools-compatible API).

``prepare`` attaches a :class:`FakePalettize` child (``<param>_dkm``) and a forward pre-hook to
every selected module. The weight stays the very same ``Parameter`` under its own name (an
optimizer built before ``prepare`` keeps working, state_dict keys of the weights do not change);
during each forward the hook shadows it with the soft-palettized weight computed from it by
:func:`lightning_palettize.soft_kmeans.soft_kmeans`, and a forward hook removes the shadow. The
child owns only buffers (centroids, per-channel scale, step counter), so a prepared model can be
deep-copied, pickled, checkpointed and resumed. (``torch.nn.utils.parametrize`` would rename the
weight and makes modules unpicklable, which is why it is not used.) ``finalize`` hard-assigns
every weight, writes the dense palettized values back into plain parameters and attaches the
same Core ML metadata as
:class:`~lightning_palettize.PostTrainingPalettizer`.
"""

from __future__ import annotations

import copy
import functools
import sys
import weakref
from typing import IO, Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from lightning_palettize import soft_kmeans as _sk
from lightning_palettize.config import DKMPalettizerConfig, ModuleDKMPalettizerConfig, load_config
from lightning_palettize.kmeans import kmeans, kmeans_vectors
from lightning_palettize.palette import Layout, Palette, channel_scale, quantize_lut
from lightning_palettize.palettizers._collapse import plan_repair
from lightning_palettize.palettizers._common import (
    KMEANS_SUPPORTED,
    attach_coreml_metadata,
    check_coreml_options,
    check_materialized,
    layout_for,
    set_metadata_version,
)
from lightning_palettize.report import PalettizationReport, ReportRow
from lightning_palettize.selection import select_weights
from lightning_palettize.soft_kmeans import (
    RoundGraphs,
    hard_assign,
    soft_kmeans,
    soft_kmeans_batch,
)

__all__ = ["DKMPalettizer", "FakePalettize", "DKM_SUPPORTED"]

#: Modules DKM handles (and their subclasses): the k-means set plus LayerNorm's weight.
DKM_SUPPORTED: dict[type[nn.Module], tuple[str, ...]] = {
    **KMEANS_SUPPORTED,
    nn.LayerNorm: ("weight",),
}

# Options of coremltools' ModuleDKMPalettizerConfig that change the math and that we do not
# implement: any value but the default is rejected (coremltools ignores several of them).
_UNSUPPORTED = {
    "quantize_activations": "activation quantization is not part of palettization here",
    "cluster_permute": "weight permutations are not exported to Core ML",
    "palett_lambda": "coremltools 9.0 never uses it either",
    "add_extra_centroid": "it would not fit a 2**n_bits LUT",
    "percentage_palett_enable": "every LUT group is trained",
    "palett_shard": "no multi-GPU sharding of the k-means state (it is already O(N))",
    "palett_dist": "no distributed distance computation (the engine is O(N) per step)",
}
# Performance knobs whose effect our engine always has; accepted with any value (documented):
# palett_max_mem, palett_min_tsize, palett_unique, palett_batch_mode, kmeans_batch_threshold,
# kmeans_opt1d_threshold, kmeans_error_bnd.

_DEFAULTS = ModuleDKMPalettizerConfig()
# Replay each round's forward from a CUDA graph (soft_kmeans.RoundGraphs). Off: on the 134M
# LLaMA on H200s it saved ~3 ms of host time per step (cProfile) but no step time measurable
# (55.1 vs 55.2 ms; 87.3 vs 86.6 ms alternated with plain steps), and its static outputs
# (every soft weight, held between steps) raised the peak memory 0.45 GiB (1.16x plain
# instead of 1.08x). See the README's GPU section.
_ROUND_GRAPHS = False
# Per device type (absent: 1): split each round into this many chunks of consecutive members
# (in the order they joined, which prepare makes the model's module order), each computed
# when its first member is called and one autograd node of its own. One round's node runs its
# backward only after the first layer's weight gradient, so on a device all of it sits on the
# step's tail, between the last weight gradient and the optimizer; a chunk's node runs as soon
# as the gradients of its own layers are in (the engine runs ready nodes latest-created
# first), so only the first chunk's backward is left on the tail and the others fill the
# backward's idle device time. It costs each chunk the round's fixed launches. Empty (one
# round everywhere): not timed on a GPU yet (the bench's "chunk" variants set {"cuda": 4 or
# 8}); on the CPU, where nothing overlaps, one round is cheapest.
_ROUND_CHUNKS: dict[str, int] = {}


def _check_supported_options(cfg: ModuleDKMPalettizerConfig, where: str) -> None:
    for key, why in _UNSUPPORTED.items():
        value, default = getattr(cfg, key), getattr(_DEFAULTS, key)
        if value != default:
            raise ValueError(
                f"{where}: {key}={value!r} is not supported by DKMPalettizer ({why}); "
                f"accepted: {default!r}"
            )


def _check_module(module: nn.Module, where: str) -> None:
    """Reject module settings DKM's shadowed weight cannot serve."""
    if isinstance(module, nn.Embedding):
        if module.sparse:
            raise ValueError(
                f"{where}: nn.Embedding(sparse=True) is not supported by DKMPalettizer (the "
                "soft k-means needs the whole weight's dense gradient); accepted: sparse=False"
            )
        if module.max_norm is not None:
            raise ValueError(
                f"{where}: nn.Embedding(max_norm={module.max_norm!r}) is not supported by "
                "DKMPalettizer (it renormalizes the weight in place in forward, which would "
                "write into the soft-palettized weight); accepted: max_norm=None"
            )


def _ste(c: Tensor, q: Tensor) -> Tensor:
    return c + (q - c).detach()


def _lut_fn(lut_dtype: str):
    """Straight-through LUT quantizer used inside the soft k-means for lut_dtype != f32.

    It acts per LUT group (so the groups of several weights may be stacked) and its gradient
    is the identity, which ``straight_through`` tells the kernel (it then skips the VJP).
    """
    if lut_dtype == "f32":
        return None
    if lut_dtype in ("f16", "bf16"):
        dt = torch.float16 if lut_dtype == "f16" else torch.bfloat16

        def fn(c: Tensor) -> Tensor:
            return _ste(c, c.to(dt).float())

    else:
        qdtype = torch.int8 if lut_dtype == "i8" else torch.uint8

        def fn(c: Tensor) -> Tensor:
            return _ste(c, quantize_lut(c.detach(), qdtype)[0])

    fn.straight_through = True  # type: ignore[attr-defined]
    return fn


def _kmeans_kwargs(cfg: ModuleDKMPalettizerConfig) -> dict[str, Any]:
    return dict(
        tau=cfg.palett_tau,
        max_iter=cfg.kmeans_max_iter,
        epsilon=cfg.palett_epsilon,
        mode=cfg.palett_mode,
        enforce_zero=cfg.enforce_zero,
        prune_threshold=cfg.prune_threshold,
        zero_threshold=cfg.zero_threshold,
    )


def _batch_key(cfg: ModuleDKMPalettizerConfig) -> tuple:
    """Weights whose soft k-means may share one kernel call."""
    kw = _kmeans_kwargs(cfg)
    return (*kw.values(), cfg.lut_dtype, cfg.n_bits, cfg.cluster_dim)


class _Pending:
    """A soft weight computed ahead by a round, valid for exactly the state it came from."""

    __slots__ = ("weight", "key", "soft", "centroids", "token")

    def __init__(
        self, weight: Tensor, key: tuple, soft: Tensor, centroids: Tensor, token: int | None
    ) -> None:
        self.weight, self.key, self.soft, self.centroids = weight, key, soft, centroids
        self.token = token  # the round's node hook that forgets it once served (see _Served)


class _Served:
    """The soft weight a member was last served, for the state it came from (see _DKMGroup):
    held strongly for members seen called again at one weight version, else weakly.

    ``token`` names the backward hook that forgets it: a hook on the soft weight itself, or,
    for a weight-only-weakly-held result of a round, one pre-hook on the round's batched
    node for all of them (one registration per round and one call per backward, instead of
    one per weight)."""

    __slots__ = ("weight", "key", "ref", "token")

    def __init__(self, weight: Tensor, key: tuple, soft: Tensor, token: int, strong: bool):
        self.weight, self.key, self.token = weight, key, token
        self.ref = (lambda: soft) if strong else weakref.ref(soft)

    def soft(self) -> Tensor | None:
        return self.ref()


_REENTRANT_FORWARD = getattr(
    getattr(torch.utils.checkpoint, "CheckpointFunction", None), "forward", None
)
_REENTRANT_CODE = getattr(_REENTRANT_FORWARD, "__code__", None)


def _in_reentrant_checkpoint(depth: int = 64) -> bool:
    """Whether this call runs inside the forward of a reentrant activation checkpoint
    (``torch.utils.checkpoint.CheckpointFunction.forward``, within ``depth`` frames): calls
    without autograd elsewhere (a monitoring pass in training mode) keep their own semantics."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code is _REENTRANT_CODE:
            return True
        frame = frame.f_back
    return False


class _Start:
    """A member's calls without autograd at one weight version (see _DKMGroup._replay): the
    centroids the first started from, how many calls there were and how many a recomputation
    replayed, and the weight and centroid versions the last call left."""

    __slots__ = ("weight", "version", "centroids", "calls", "replayed", "left")

    def __init__(self, fp: FakePalettize, weight: Tensor) -> None:
        # (weakly: a start left behind, e.g. of a member replaced, keeps no weight alive)
        self.weight, self.version = weakref.ref(weight), (weight._version, weight.data_ptr())
        self.centroids = fp._buffers["centroids"].clone()
        self.calls, self.replayed = 1, 0
        self.left: tuple[int, int] | None = None

    def leave(self, fp: FakePalettize) -> _Start:
        """Record the centroid version a call left."""
        c = fp._buffers["centroids"]
        self.left = (c._version, c.data_ptr())
        return self

    def current(self, fp: FakePalettize, weight: Tensor) -> bool:
        """Whether nothing changed the weight or the centroids since the last call."""
        c = fp._buffers["centroids"]
        return (
            weight is self.weight()
            and (weight._version, weight.data_ptr()) == self.version
            and (c._version, c.data_ptr()) == self.left
        )

    def rerun(self, fp: FakePalettize, weight: Tensor) -> Tensor:
        """The first call again: from its starting centroids, the same soft weight (and new
        centroids)."""
        with torch.no_grad():
            fp._buffers["centroids"].copy_(self.centroids)
        return fp(weight)  # (one weight, unbatched: equal to the round's result)


class _DKMGroup:
    """Batches the soft k-means of the FakePalettize children of one model.

    Shared by the children ``prepare`` attached together; each joins when its hook first runs.
    In training mode, the first forward pre-hook that finds no result computed ahead for its
    weight starts a *round*: the soft weights of every member that is enabled, training and
    without a pending result, in one :func:`soft_kmeans_batch` call per configuration (one
    autograd node, a few dozen kernels, instead of hundreds per weight). The other members'
    results wait here; each member's own hook takes its result and writes its new centroids.
    With ``_ROUND_CHUNKS[device type]`` > 1 a round covers only the chunk of consecutive
    members (join order) of the member that starts it, so each chunk's backward runs when its
    own layers' gradients are in.

    A pending result is used at most once and only for the exact state it was computed from:
    the same weight tensor at the same version counter and storage, the same centroids and
    scale (version and storage), the same grad mode. Anything else (the optimizer stepped, a
    module run on its own, a state_dict load) starts a new round, so every call computes what
    the unbatched soft k-means of the current weight and centroids would.

    *One soft weight per weight version*: a result served with gradients on is remembered and
    served again, the same tensor, to every later call of its module while the weight,
    centroids and scale are unchanged since it was served: a module called twice in one
    forward, the two towers of a contrastive / siamese step, a layer applied at every step of
    a loop. They all use one palettized weight, as they share one weight, the centroids move
    once per weight version instead of once per call, and autograd sums the uses' gradients
    into one backward through the soft k-means (half the DKM work of a two-forward step). The
    reference is weak until the member is seen called again at one weight version, so a layer
    called once whose consumer does not keep its weight (an input without gradient) does not
    hold a weight-sized tensor through the step; such a first repeat (a view's weak
    reference dies with its Python object) computes anew, from the centroids the first call
    left, and from then on the member's soft weights are held. A served weight is forgotten
    once backward reaches it, pending results when a backward pass through a round ends (the
    graph is freed then), so gradient accumulation recomputes each micro-batch from the
    centroids the previous one left. Gumbel (gsm) weights keep computing one by one, in call
    order, so their noise stays as documented.

    Calls without autograd (a reentrant activation checkpoint's forward) record the centroids
    they started from; the region's recomputation in backward runs each call again from them
    (:meth:`_replay`), and a repeat call at one weight version runs again from the same
    centroids (the same soft weight, as served with autograd).

    Deep copies and unpickled copies get a fresh, empty group (shared by the copied members).
    """

    def __init__(self) -> None:
        self._members: dict[int, tuple[weakref.ref, weakref.ref]] = {}
        self._pending: dict[int, _Pending] = {}
        self._served: dict[int, _Served] = {}  # the soft weight each member last returned
        self._serial = 0
        self._again: set[int] = set()  # members seen called again at one weight version
        # (number of chunks, member -> its chunk) while the members are unchanged
        self._chunk_of: tuple[int, dict[int, int]] | None = None
        # CUDA graphs of the rounds' forward, when _ROUND_GRAPHS (the same weights every step)
        self._graphs = RoundGraphs()
        # member -> _Start of its last call without autograd (see _replay)
        self._starts: dict[int, _Start] = {}

    def __deepcopy__(self, memo: dict) -> _DKMGroup:
        return _DKMGroup()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def join(self, fp: FakePalettize, module: nn.Module) -> bool:
        """Register ``fp`` (attached to ``module``); True if it was not a member yet."""
        entry = self._members.get(id(fp))
        if entry is not None and entry[0]() is fp and entry[1]() is module:
            return False
        self._members[id(fp)] = (weakref.ref(fp), weakref.ref(module))
        self._chunk_of = None
        return True

    def leave(self, fp: FakePalettize) -> None:
        self._forget(id(fp))

    def _forget(self, key: int) -> None:
        """Drop a member (``id`` of its FakePalettize) and all the group holds of it."""
        self._members.pop(key, None)
        self._chunk_of = None
        self._pending.pop(key, None)
        self._served.pop(key, None)
        self._again.discard(key)
        self._starts.pop(key, None)

    def clear(self) -> None:
        self._pending.clear()
        self._served.clear()

    @staticmethod
    def _key(fp: FakePalettize, weight: Tensor) -> tuple:
        bufs = fp._buffers  # (not Module.__getattr__: this runs per weight and forward)
        c, s = bufs["centroids"], bufs["scale"]
        return (
            weight._version,
            weight.data_ptr(),
            c._version,
            c.data_ptr(),
            s._version,
            s.data_ptr(),
            torch.is_grad_enabled(),
        )

    def _valid(self, entry: _Pending | _Served, fp: FakePalettize, weight: Tensor) -> bool:
        # (callers test for None first: one Python call fewer per weight and lookup)
        return entry.weight is weight and entry.key == self._key(fp, weight)

    def soft_weight(self, fp: FakePalettize, module: nn.Module, weight: Tensor) -> Tensor:
        """The soft-palettized ``weight`` of ``fp`` (training mode, enabled)."""
        served = self._served.get(id(fp))
        if served is not None and self._valid(served, fp, weight):
            soft = served.soft()
            if soft is not None:
                return soft  # this weight version's soft weight, alive in the graph
            self._again.add(id(fp))  # called again: hold its soft weights from now on
        if self._starts:  # (a reentrant checkpoint region ran: only then does this cost anything)
            soft = self._replay(fp, weight)
            if soft is not None:
                return soft
        if not torch.is_grad_enabled() and _in_reentrant_checkpoint():
            start = self._starts.get(id(fp))
            if start is not None and not start.replayed and start.current(fp, weight):
                # called again at this state: one soft weight per weight version, as served
                # with autograd (the same values; recomputed, not held: a weight-sized tensor
                # per member would stay alive until the recomputation)
                soft = start.rerun(fp, weight)
                start.calls += 1
                start.leave(fp)
                return soft
            start = _Start(fp, weight)
            soft = self._soft_weight(fp, module, weight)
            self._starts[id(fp)] = start.leave(fp)
            return soft
        return self._soft_weight(fp, module, weight)

    def _replay(self, fp: FakePalettize, weight: Tensor) -> Tensor | None:
        """A member called with autograd after a reentrant activation checkpoint region
        (``torch.utils.checkpoint(..., use_reentrant=True)``) called it without autograd, at
        one weight version (:class:`_Start` current: nothing else changed the weight or the
        centroids since), runs again from the centroids the region's call started from: the
        same soft weight, now with its graph, and the same new centroids. Inside a backward
        pass that is the region's recomputation (each of its calls replayed once); outside,
        a call of the member after the region (a shared layer: as one served with autograd,
        one soft weight per weight version). ``None`` otherwise, dropping a start that no
        longer applies (computed as any call)."""
        start = self._starts.get(id(fp))
        if start is None or not torch.is_grad_enabled():
            return None
        if not start.current(fp, weight):
            del self._starts[id(fp)]  # (the weight or the centroids changed since)
            return None
        soft = start.rerun(fp, weight)
        if torch._C._current_graph_task_id() == -1:
            start.leave(fp)  # (not a recomputation: the region's own calls still replay)
            return soft
        start.replayed += 1
        if start.replayed == start.calls:
            del self._starts[id(fp)]
        else:
            start.leave(fp)
        return soft

    def _soft_weight(self, fp: FakePalettize, module: nn.Module, weight: Tensor) -> Tensor:
        hooks = _top_saved_tensors_hooks(False)  # (inline: this runs per weight and step)
        if hooks is not None and "_checkpoint_hook" not in getattr(hooks[0], "__qualname__", ""):
            hooks = None  # not a checkpoint region's (e.g. torch.autograd.graph.save_on_cpu)
        if hooks is None:
            soft, token = self._compute(fp, module, weight)
        else:
            # inside a non-reentrant activation-checkpoint region, whose recomputation must
            # save the same tensors as this forward: the round keeps its own saved tensors
            # (outside the region), and the soft weight is held until backward reaches it, so
            # the recomputed region is served this very tensor (same values, no new round)
            torch._C._autograd._pop_saved_tensors_default_hooks()
            try:
                soft, token = self._compute(fp, module, weight)
            finally:
                torch._C._autograd._push_saved_tensors_default_hooks(*hooks)
        if fp.cfg.palett_mode != "gsm" and soft.requires_grad:
            # kept until a backward pass reaches it (its graph is being freed then)
            strong = id(fp) in self._again or hooks is not None
            if token is None or strong:
                # a hook of its own: a held soft weight is dropped as soon as backward reaches
                # it, rather than when the round's node runs (a weight-sized tensor kept alive
                # through the rest of backward would add one weight's size to the peak memory)
                self._serial += 1
                token = self._serial
                soft.register_hook(functools.partial(self._reached, token))
            self._served[id(fp)] = _Served(weight, self._key(fp, weight), soft, token, strong)
        return soft

    def _reached(self, token: int, grads: Any) -> None:
        # (a tensor hook on a soft weight, or a pre-hook on a round's node: grads unused)
        # backward reached served soft weights (or their round's node, which runs once every
        # soft weight of the round has its gradient): no later call may reuse them
        for key in [k for k, e in self._served.items() if e.token == token]:
            del self._served[key]
        self._drop_after_backward()

    def _compute(
        self, fp: FakePalettize, module: nn.Module, weight: Tensor
    ) -> tuple[Tensor, int | None]:
        """(the soft weight, the token of its round's node hook or None)."""
        pending = self._pending.pop(id(fp), None)
        if pending is not None and self._valid(pending, fp, weight):
            # (a member's result from a round: served before the membership check, which it
            # implies; both sides are buffers without autograd history: no grad-mode switch)
            fp._buffers["centroids"].copy_(pending.centroids)
            return pending.soft, pending.token
        if self.join(fp, module):
            # joining lazily (a copied model): the members are still being discovered, so a
            # round now would miss the rest; the first forward computes weight by weight
            return fp(weight), None
        if fp.cfg.palett_mode == "gsm":
            return fp(weight), None
        return self._round(fp, module, weight)

    def _round(
        self, fp: FakePalettize, module: nn.Module, weight: Tensor
    ) -> tuple[Tensor, int | None]:
        todo: dict[tuple, list[tuple[FakePalettize, Tensor]]] = {}
        todo.setdefault((weight.device, _batch_key(fp.cfg)), []).append((fp, weight))
        n_chunks = _ROUND_CHUNKS.get(weight.device.type, 1)
        chunks = self._chunks(n_chunks) if n_chunks > 1 else None
        chunk = chunks.get(id(fp)) if chunks is not None else None
        for key, (fp_ref, mod_ref) in list(self._members.items()):
            other, mod = fp_ref(), mod_ref()
            if other is None or mod is None:
                self._forget(key)  # (a member that died: what was held of it goes too)
                continue
            if chunks is not None and chunks.get(key) != chunk:
                continue  # another chunk's round computes it when its first member is called
            if other is fp or not (other.training and other.is_enabled):
                continue
            attached = mod._modules.get(f"{other.param_name}_dkm") is other
            if other.cfg.palett_mode == "gsm" or not attached:
                continue
            w = other.live_weight(mod)[1]
            pending = self._pending.get(key)
            if pending is not None and self._valid(pending, other, w):
                continue  # still valid: computed from this very state
            served = self._served.get(key)
            if served is not None and self._valid(served, other, w) and served.soft() is not None:
                continue  # its next call reuses the soft weight it was served
            start = self._starts.get(key)
            if start is not None and start.current(other, w) and not torch.is_grad_enabled():
                continue  # a reentrant region computed it at this state: its call repeats that
            todo.setdefault((w.device, _batch_key(other.cfg)), []).append((other, w))
        mine = None
        for members in todo.values():
            first = members[0][0]
            xs, groups = _round_inputs(members)
            results = soft_kmeans_batch(
                xs,
                [m._buffers["centroids"] for m, _ in members],
                lut_fn=first._lut_fn,
                groups=groups,
                graphs=self._graphs if _ROUND_GRAPHS else None,
                **_kmeans_kwargs(first.cfg),
            )
            tokens = self._node_hooks([xhat for xhat, _ in results])
            for (m, w), x, (xhat, cent), token in zip(members, xs, results, tokens):
                soft = xhat if x is w else m._finish(xhat, w.dtype)
                if cent.requires_grad:  # (the batched node's centroids never do)
                    cent = cent.detach()
                if m is fp:
                    fp._buffers["centroids"].copy_(cent)
                    mine = (soft, token)
                else:
                    self._pending[id(m)] = _Pending(w, self._key(m, w), soft, cent, token)
        return mine  # (soft_weight drops the pending results with the kept ones)

    def _chunks(self, n_chunks: int) -> dict[int, int]:
        """Member id -> chunk index: ``n_chunks`` runs of consecutive members (join order) with
        about equal numbers of weight elements (recomputed when the members change)."""
        if self._chunk_of is None or self._chunk_of[0] != n_chunks:
            sizes = []
            for key, (fp_ref, mod_ref) in self._members.items():
                fp, mod = fp_ref(), mod_ref()
                alive = fp is not None and mod is not None
                sizes.append((key, fp.live_weight(mod)[1].numel() if alive else 0))
            total, before, chunk_of = max(1, sum(n for _, n in sizes)), 0, {}
            for key, n in sizes:
                # (a member's chunk: where its first element falls among equal shares)
                chunk_of[key] = min(n_chunks - 1, before * n_chunks // total)
                before += n
            self._chunk_of = (n_chunks, chunk_of)
        return self._chunk_of[1]

    def _node_hooks(self, outs: list[Tensor]) -> list[int | None]:
        """Per output, the token of a pre-hook on its autograd node (one per distinct node: the
        batched node of a round's scalar weights) that forgets the soft weights served from it."""
        tokens: list[int | None] = []
        seen: dict[int, int] = {}
        for out in outs:
            node = out.grad_fn
            if node is None:
                tokens.append(None)
                continue
            token = seen.get(id(node))
            if token is None:
                self._serial += 1
                token = seen[id(node)] = self._serial
                node.register_prehook(functools.partial(self._reached, token))
            tokens.append(token)
        return tokens

    def _drop_after_backward(self) -> None:
        # runs inside the backward pass: drop what is left once it has finished
        torch.autograd.Variable._execution_engine.queue_callback(self.clear)


# The innermost saved-tensor hooks (None outside any): a non-reentrant torch.utils.checkpoint
# region's pack hook is a local function of its _checkpoint_hook class
_top_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks


def _round_inputs(members: list[tuple[FakePalettize, Tensor]]):
    """(soft k-means inputs, their group counts or None) of a round's batch.

    Off the CPU (the device layout), a float32 contiguous weight whose LUT groups are runs of
    whole output channels, without a per-channel scale, goes in as it is (``groups``: the
    batched node then returns its soft weight in the weight's shape, with no view node on
    either side; two autograd nodes fewer per weight, which counts in a host-bound step). The
    others go in as their [G, N, 1] groups. On the CPU the backward writes each weight's
    gradient into the incoming one, which the view node's reshape makes a contiguous [G, N, 1]
    tensor, so every input goes in as [G, N, d] groups there.
    """
    fp, w = members[0]
    if fp.cfg.cluster_dim == 1 and not _sk._host_layout(w.device):
        xs = [w if m._as_is(w) else m._prepare_input(w) for m, w in members]
        if all([x.is_contiguous() for x in xs]):
            return xs, [m.layout.num_groups for m, _ in members]
        # (a non-contiguous group view: all as groups, keeping the views made above)
        return [m._prepare_input(w) if x is w else x for (m, w), x in zip(members, xs)], None
    return [m._prepare_input(w) for m, w in members], None


class FakePalettize(nn.Module):
    """Parametrization computing the DKM soft-palettized weight from the live weight.

    Buffers (all in the state_dict): ``centroids`` [G, K, d], ``scale`` (per-channel, or
    empty), ``enabled`` (0/1), ``steps`` (step() calls seen). Before it is enabled the weight
    passes through unchanged, so the module computes exactly what it did before ``prepare``.
    In eval mode the weight is hard-assigned to its nearest centroid.
    """

    def __init__(
        self, weight: Tensor, layout: Layout, cfg: ModuleDKMPalettizerConfig, param_name: str
    ) -> None:
        super().__init__()
        self.param_name = param_name
        self.layout = layout
        self.cfg = cfg
        self.n_bits = cfg.n_bits
        g, d, k = layout.num_groups, layout.cluster_dim, 1 << cfg.n_bits
        self.register_buffer("centroids", torch.zeros(g, k, d, device=weight.device))
        shape = (layout.shape[0],) + (1,) * (len(layout.shape) - 1)
        n_scale = shape if cfg.enable_per_channel_scale else (0,)
        self.register_buffer("scale", torch.ones(n_scale, device=weight.device))
        self.register_buffer("enabled", torch.zeros((), dtype=torch.uint8, device=weight.device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=weight.device))
        self._lut_fn = _lut_fn(cfg.lut_dtype)
        # the model's shared batcher (prepare replaces this private one)
        self._group = _DKMGroup()
        # host-side copies of the ``enabled`` / ``steps`` buffers: (buffer, version, value)
        self._enabled_seen: tuple[Tensor, int, bool] | None = (
            self.enabled,
            self.enabled._version,
            False,
        )
        self._steps_seen: tuple[Tensor, int, int] | None = (self.steps, self.steps._version, 0)

    def __getstate__(self) -> dict[str, Any]:
        # local functions do not pickle: rebuild the LUT quantizer from the config
        state = self.__dict__.copy()
        state["_lut_fn"] = None
        state["_enabled_seen"] = state["_steps_seen"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lut_fn = _lut_fn(self.cfg.lut_dtype)
        # objects pickled before these existed: a group of their own (correct, unbatched)
        if "_group" not in state:
            self._group = _DKMGroup()
        self._enabled_seen = self._steps_seen = None

    def _apply(self, fn, recurse: bool = True):
        # the k-means state stays float32 whatever the model is cast to (.half(), Lightning's
        # "16-true"): only the device follows, so no precision is lost and the kernels get
        # the float32 centroids they read
        kept = {k: b for k, b in self._buffers.items() if b is not None and b.is_floating_point()}
        out = super()._apply(fn, recurse)
        for key, old in kept.items():
            new = self._buffers[key]
            if new is not None and new.dtype != old.dtype:
                self._buffers[key] = old.to(device=new.device)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._enabled_seen = self._steps_seen = None  # re-read once from the loaded buffers

    @torch.no_grad()
    def _owner_load_pre_hook(self, module: nn.Module, state_dict, prefix: str, *args) -> None:
        """A load_state_dict pre-hook of the owning module. A state_dict without this weight's
        DKM state but with the weight itself (pretrained weights loaded after ``prepare``, a
        plain checkpoint resumed by a Trainer): centroids already started come from the loaded
        weight, as if it had been there at ``prepare``; the rest of the state stays. The state
        is put into ``state_dict``, so a strict load passes."""
        own = f"{prefix}{self.param_name}_dkm."
        if module._modules.get(f"{self.param_name}_dkm") is not self:
            return
        if any(own + name in state_dict for name in self._buffers):
            return  # a DKM state_dict: loaded as it is
        keys = [prefix + self.param_name, f"{prefix}{self.param_name}_orig"]
        weight = next((state_dict[k] for k in keys if k in state_dict), None)
        if not isinstance(weight, Tensor) or tuple(weight.shape) != self.layout.shape:
            return  # the weight is not loaded either: the state stays (strict reports it)
        if self.is_enabled:
            self.initialize(weight.to(self._buffers["centroids"].device))
            _repair_collapsed([self])
        for name, buf in self._buffers.items():
            state_dict[own + name] = buf.detach().clone()

    @property
    def is_enabled(self) -> bool:
        """Whether the weight is palettized; a host-side copy of the ``enabled`` buffer.

        Re-read from the buffer (a device-to-host copy) only after the buffer was written
        (its version counter moved, e.g. a state_dict load or a broadcast) or replaced.
        """
        buf, seen = self._buffers["enabled"], self._enabled_seen
        if seen is None or seen[0] is not buf or seen[1] != buf._version:
            seen = (buf, buf._version, bool(buf))
            self.__dict__["_enabled_seen"] = seen  # (a plain attribute: no Module.__setattr__)
        return seen[2]

    @property
    def step_count(self) -> int:
        """The ``steps`` buffer as an int (host-side copy, re-read only after it changed)."""
        buf, seen = self._buffers["steps"], self._steps_seen
        if seen is None or seen[0] is not buf or seen[1] != buf._version:
            seen = (buf, buf._version, int(buf))
            self.__dict__["_steps_seen"] = seen
        return seen[2]

    @torch.no_grad()
    def set_step_count(self, step: int) -> None:
        self.steps.fill_(step)
        self._steps_seen = (self.steps, self.steps._version, step)

    @torch.no_grad()
    def initialize(self, weight: Tensor) -> None:
        """Enable palettization: per-channel scale and centroids from the exact k-means."""
        cfg = self.cfg
        w = weight.detach().float()
        if cfg.enable_per_channel_scale:
            self.scale.copy_(channel_scale(w, cfg.per_channel_scaling_factor_scheme))
            w = w / self.scale
        x = self.layout.to_groups(w)
        if x.shape[-1] == 1:  # the exact optimum, sorted (kmeans_n_init: nothing to restart)
            cent = kmeans(x, 1 << cfg.n_bits).centroids.float()
        else:  # k-means++ restarts, the best inertia per group kept
            cent = kmeans_vectors(x, 1 << cfg.n_bits, n_init=cfg.kmeans_n_init).centroids.float()
        if cfg.enforce_zero:
            # the centroid nearest 0 moves to slot 0 and becomes exactly 0
            near = cent.norm(dim=-1).argmin(dim=1)
            rows = torch.arange(cent.shape[0], device=cent.device)
            first = cent[:, 0].clone()
            cent[rows, near] = first
            cent[:, 0] = 0.0
        if self._lut_fn is not None:
            cent = self._lut_fn(cent)
        self.centroids.copy_(cent)
        self.enabled.fill_(1)
        self._enabled_seen = (self.enabled, self.enabled._version, True)

    def _prepare_input(self, weight: Tensor) -> Tensor:
        w = weight.float() if weight.dtype != torch.float32 else weight
        if self.cfg.enable_per_channel_scale:
            w = w / self.scale
        return self.layout.to_groups(w)

    def _as_is(self, weight: Tensor) -> bool:
        """Whether ``weight`` itself is its [G, N, 1] groups in C order (see _round_inputs)."""
        lay = self.layout
        return (
            lay.channel_axis == 0
            and lay.cluster_dim == 1
            and weight.dtype == torch.float32
            and not self.cfg.enable_per_channel_scale
            and tuple(weight.shape) == lay.shape
            and weight.is_contiguous()
        )

    def _finish(self, xg: Tensor, dtype: torch.dtype) -> Tensor:
        w = self.layout.from_groups(xg)
        if self.cfg.enable_per_channel_scale:
            w = w * self.scale
        return w if w.dtype == dtype else w.to(dtype)

    def hard_labels(self, weight: Tensor) -> Tensor:
        cfg = self.cfg
        with torch.no_grad():
            return hard_assign(
                self._prepare_input(weight.detach()),
                self.centroids,
                prune_threshold=cfg.prune_threshold,
                enforce_zero=cfg.enforce_zero,
                zero_threshold=cfg.zero_threshold,
            )

    def forward(self, weight: Tensor) -> Tensor:
        if not self.is_enabled:
            return weight
        cfg = self.cfg
        if not self.training:
            labels = self.hard_labels(weight)
            hard = torch.gather(
                self.centroids, 1, labels.unsqueeze(-1).expand(-1, -1, self.centroids.shape[-1])
            )
            return self._finish(hard, weight.dtype)
        xg = self._prepare_input(weight)
        # the kernel copies the centroids it starts from: updating them in place is safe
        xhat, cent = soft_kmeans(xg, self.centroids, lut_fn=self._lut_fn, **_kmeans_kwargs(cfg))
        with torch.no_grad():
            self.centroids.copy_(cent)
        return self._finish(xhat, weight.dtype)

    def live_weight(self, module: nn.Module) -> tuple[str, Tensor]:
        """The parameter this palettizes and its current name on ``module``.

        ``<param>``, or ``<param>_orig`` while ``torch.nn.utils.prune`` (e.g. Lightning's
        ModelPruning) reparametrizes it: the palettized value then shadows ``<param>_orig`` and
        pruning's own pre-hook, registered after ours, multiplies its mask on top.
        """
        name = self.param_name
        if name not in module._parameters and f"{name}_orig" in module._parameters:
            name = f"{name}_orig"
        return name, module._parameters[name]

    # -- hooks on the owning module: shadow the parameter with its palettized value in forward
    def pre_hook(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            # traced by torch.compile: a graph break into the eager hook (it mutates host
            # state and reads table sizes). In eager mode this check is all the hook pays for
            # it: 2 Python calls, where the torch.compiler.disable wrapper costs 5 and 4
            # builtins per weight and step
            self._shadow_eagerly(module)
        else:
            self._shadow(module)

    def _shadow(self, module: nn.Module) -> None:
        """Put the palettized weight in ``module.__dict__``, where it shadows the parameter."""
        if not self.is_enabled:  # a host-side flag: no device sync per forward
            return
        name, weight = self.live_weight(module)
        if self.training:  # (as _value, inline: this runs per weight and forward)
            module.__dict__[name] = self._group.soft_weight(self, module, weight)
        else:
            module.__dict__[name] = self(weight)

    def _value(self, module: nn.Module, weight: Tensor) -> Tensor:
        """The palettized value of ``weight`` (the parameter of ``module`` this palettizes)."""
        if self.training:
            # batched with the model's other weights (see _DKMGroup)
            return self._group.soft_weight(self, module, weight)
        return self(weight)

    _shadow_eagerly = torch.compiler.disable(_shadow)

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        module.__dict__.pop(self.live_weight(module)[0], None)

    def attach(self, module: nn.Module, group: _DKMGroup | None = None) -> None:
        """Attach to ``module``; weights sharing ``group`` have their soft k-means batched."""
        if group is not None:
            self._group = group
        module.add_module(f"{self.param_name}_dkm", self)
        self._group.join(self, module)
        # first, so that a hook registered before prepare that reads the weight (pruning's
        # or spectral_norm's, recomputing it from <param>_orig) sees the palettized value
        module.register_forward_pre_hook(self.pre_hook, prepend=True)
        module.register_forward_hook(self.post_hook)
        module.register_load_state_dict_pre_hook(self._owner_load_pre_hook)

    def add_reader(
        self, module: nn.Module, reader: nn.Module, holder: nn.Module, name: str | None
    ) -> None:
        """Also palettize the weight (of ``module``) for ``reader``, a module whose forward
        reads it without calling ``module``: its forward hooks shadow ``holder.<name>`` with
        the palettized value. ``nn.MultiheadAttention`` reads ``out_proj.weight`` (holder
        ``module``, name ``None``: the weight's own); a tied weight is ``reader.<name>``
        (holder ``reader``)."""
        hooks = _ReaderHooks(self, module, holder, name)
        reader.register_forward_pre_hook(hooks.pre_hook, prepend=True)
        reader.register_forward_hook(hooks.post_hook)
        self.__dict__.setdefault("_readers", []).append(reader)

    def detach_from(self, module: nn.Module) -> None:
        for owner in [module, *self.__dict__.pop("_readers", [])]:
            for hooks in (owner._forward_pre_hooks, owner._forward_hooks):
                for key in [k for k, h in hooks.items() if _hook_owner(h) is self]:
                    del hooks[key]
        loads = module._load_state_dict_pre_hooks
        for key in [k for k, h in loads.items() if _hook_owner(getattr(h, "hook", None)) is self]:
            del loads[key]
        module.__dict__.pop(self.live_weight(module)[0], None)
        self._group.leave(self)
        delattr(module, f"{self.param_name}_dkm")

    @torch.no_grad()
    def to_palette(self, weight: Tensor) -> Palette:
        """Hard-assigned palette of the current weight (finalize / report)."""
        cfg = self.cfg
        labels = self.hard_labels(weight).to(torch.uint8)
        lut = self.centroids.float().clone()
        qdtype = qscale = zp = None
        if cfg.lut_dtype in ("i8", "u8"):
            qdtype = torch.int8 if cfg.lut_dtype == "i8" else torch.uint8
            lut, qscale, zp = quantize_lut(lut, qdtype)
        elif cfg.lut_dtype in ("f16", "bf16"):
            lut = lut.to(torch.float16 if cfg.lut_dtype == "f16" else torch.bfloat16).float()
        if qdtype is None and weight.dtype in (torch.float16, torch.bfloat16):
            # the values a half-precision weight holds (as build_palette does): the artifact
            # then stores the LUT in the weight's dtype, exactly
            lut = lut.to(weight.dtype).float()
        return Palette(
            self.layout,
            cfg.n_bits,
            lut,
            labels,
            scale=self.scale.clone() if cfg.enable_per_channel_scale else None,
            lut_qdtype=qdtype,
            lut_qscale=qscale,
            lut_zero_point=zp,
            dtype=weight.dtype,
        )


class _ReaderHooks:
    """Forward hooks on a module that reads a palettized weight it does not own (see
    :meth:`FakePalettize.add_reader`): shadow ``holder.<name>`` with the palettized value for
    the duration of the reader's forward."""

    def __init__(self, fp: FakePalettize, module: nn.Module, holder: nn.Module, name: str | None):
        self.fp, self.module, self.holder, self.name = fp, module, holder, name

    def pre_hook(self, reader: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            self._shadow_eagerly()
        else:
            self._shadow()

    def _shadow(self) -> None:
        fp = self.fp
        if not fp.is_enabled:
            return
        name, weight = fp.live_weight(self.module)
        name = name if self.name is None else self.name
        if self.holder._parameters.get(name) is weight:  # (not untied since)
            self.holder.__dict__[name] = fp._value(self.module, weight)

    _shadow_eagerly = torch.compiler.disable(_shadow)

    def post_hook(self, reader: nn.Module, args: Any, output: Any) -> None:
        name = self.fp.live_weight(self.module)[0] if self.name is None else self.name
        self.holder.__dict__.pop(name, None)


def _hook_owner(hook: Any) -> FakePalettize | None:
    """The FakePalettize a forward hook belongs to (its own or a reader's), else None."""
    owner = getattr(hook, "__self__", None)
    return owner.fp if isinstance(owner, _ReaderHooks) else owner


def _repair_collapsed(fps: list[FakePalettize]) -> None:
    """coremltools' ``palett_cluster_tol`` rule on the enabled weights' centroids: where a LUT
    group has fewer distinct centroids than ``K * (1 - tol)``, one copy of each duplicated
    centroid moves halfway to the next distinct one (coremltools applies it at every training
    forward; centroids here move once per weight version, so it runs once per ``step()`` and
    when centroids are initialized at ``prepare``). Identical centroids would otherwise get
    identical updates forever (a LayerNorm weight of ones, a weight with fewer distinct values
    than K). No host read: a fixed number of launches per (K, d) batch."""
    if not fps:
        return
    bufs = [fp._buffers["centroids"] for fp in fps]
    tols = [fp.cfg.palett_cluster_tol for fp in fps]
    key = (list(map(id, bufs)), tols)  # (the plan holds the buffers: their ids stay theirs)
    if _REPAIR_PLAN[0] != key:  # the checks and batching once per set of buffers, not per step
        _REPAIR_PLAN[:] = [key, plan_repair(bufs, tols)]
    _REPAIR_PLAN[1].run()


# the last _repair_collapsed call's (key, RepairPlan): a training loop repairs the same buffers
# every step
_REPAIR_PLAN: list[Any] = [None, None]


@torch.no_grad()
def _set_step_counts(fps: list[FakePalettize], step: int) -> None:
    """Write ``step`` into every ``steps`` buffer: one foreach add when they all hold the same
    known count (the usual step() call), else one fill per buffer."""
    known = {fp.step_count for fp in fps}
    bufs = [fp._buffers["steps"] for fp in fps]
    if len(known) == 1 and len(fps) > 1 and len({b.device for b in bufs}) == 1:
        delta = step - known.pop()
        if delta:
            torch._foreach_add_(bufs, delta)
        for fp, buf in zip(fps, bufs):
            fp.__dict__["_steps_seen"] = (buf, buf._version, step)
        return
    for fp in fps:
        fp.set_step_count(step)


def _steps_of(members: list[tuple[nn.Module, FakePalettize]]) -> int:
    """The largest step count of the (module, FakePalettize) members (0 for none)."""
    return max([fp.step_count for _, fp in members], default=0)


def _attached(model: nn.Module) -> list[tuple[nn.Module, FakePalettize]]:
    """(module, FakePalettize) for every prepared weight, in :func:`_fake_palettizers`' order
    (``named_modules``' pre-order, each module once) without the names.

    ``step()`` walks the model every step: this loop makes no Python call per module, where
    ``named_modules``' nested generators resume once per module and level (1,720 calls on the
    248-module LLaMA of bench/dkm_host_ops.py; 2.7x the time of this loop).
    """
    out = []
    seen = set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        children = []
        for child in module._modules.values():
            if isinstance(child, FakePalettize):
                out.append((module, child))
            elif child is not None:
                children.append(child)
        if children:
            children.reverse()  # popped in registration order
            stack += children
    return out


def _weight_readers(model: nn.Module, built: list[tuple[nn.Module, FakePalettize]]):
    """(fp, its module, reader, holder, name) for every module of ``model`` whose forward reads
    a prepared weight without calling the weight's module (see FakePalettize.add_reader):
    ``nn.MultiheadAttention`` (its ``out_proj.weight``) and modules sharing a tied parameter
    (select_weights lists a shared weight once, for its first module)."""
    by_module = {id(module): fp for module, fp in built}
    by_weight = {id(fp.live_weight(module)[1]): (module, fp) for module, fp in built}
    out = []
    for _, reader in model.named_modules():
        if isinstance(reader, nn.MultiheadAttention):
            fp = by_module.get(id(reader.out_proj))
            if fp is not None:
                out.append((fp, reader.out_proj, reader, reader.out_proj, None))
        for name, param in reader._parameters.items():
            module, fp = by_weight.get(id(param), (None, None))
            if fp is not None and module is not reader:
                out.append((fp, module, reader, reader, name))
    return out


def _fake_palettizers(model: nn.Module):
    """(module name, module, param name, FakePalettize) for every prepared weight."""
    for name, module in model.named_modules():
        for child in module._modules.values():
            if isinstance(child, FakePalettize):
                yield name, module, child.param_name, child


class DKMPalettizer:
    """Differentiable k-means palettization during training (DKM, Cho et al. 2022).

    Same API as ``coremltools.optimize.torch.palettization.DKMPalettizer``: ``prepare`` the
    model, train as usual calling ``step()`` after each optimizer step, then ``finalize``.
    Centroids start from the exact k-means of the weights at the milestone, so the model right
    after the milestone is as accurate as post-training palettization, and training moves on
    from there. The soft k-means costs O(N) memory and time per step (see
    :mod:`lightning_palettize.soft_kmeans`), not coremltools' several N x K tensors.

    A weight is soft-palettized once per version: every call of its module until the weight
    (or its centroids) changes gets the same soft weight, as the weight itself is shared (a
    layer called twice in one forward, the two towers of a contrastive step, a loop). The
    centroids then move once per optimizer step rather than once per call, and autograd sums
    the uses into one backward through the soft k-means. (coremltools runs the k-means again
    at every call, from the centroids the previous call left.) A module is held to this once
    it has been seen called again at one weight version (that first repeat computes anew), so
    a layer called once keeps no weight-sized tensor beyond what its consumer keeps. A
    backward pass frees that shared graph: to backward two losses built from one soft weight
    separately, pass ``retain_graph=True`` to the first, as with any shared graph; the next
    forward after a backward computes anew (gradient accumulation).

    Args:
        model: the model to palettize.
        config: a :class:`DKMPalettizerConfig`, dict, DictConfig, YAML path/stream, or ``None``
            (coremltools' defaults: 4 bits for Linear, 2 for the other supported types).

    Raises:
        ValueError: for an invalid config, or an option we do not implement set to a
            non-default value (e.g. ``quantize_activations=True``).

    Example:
        >>> import torch
        >>> from lightning_palettize import DKMPalettizer
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
        ...                             torch.nn.Linear(64, 4))
        >>> palettizer = DKMPalettizer(model, {"global_config": {"n_bits": 2,
        ...                                     "weight_threshold": 0}})
        >>> model = palettizer.prepare(inplace=True)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> for _ in range(3):
        ...     loss = model(torch.randn(8, 64)).square().mean()
        ...     opt.zero_grad(); loss.backward(); opt.step(); palettizer.step()
        >>> model = palettizer.finalize(inplace=True)
        >>> len(torch.unique(model[0].weight)) <= 4
        True
    """

    def __init__(
        self,
        model: nn.Module,
        config: DKMPalettizerConfig | dict | str | IO | Any | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self._model = model
        self._config = load_config(config, DKMPalettizerConfig)
        self._prepared: nn.Module | None = None

    @property
    def config(self) -> DKMPalettizerConfig:
        """The validated config."""
        return self._config

    def prepare(self, inplace: bool = False) -> nn.Module:
        """Attach DKM to every selected weight.

        Modules with ``milestone == 0`` start palettizing at once (centroids from the exact
        k-means of the current weights); others pass their weights through unchanged until
        ``step()`` has been called ``milestone`` times.

        Args:
            inplace: modify the model given to the constructor instead of a deep copy.

        Returns:
            The prepared model (in train mode).

        Raises:
            ValueError: naming the weight when its shape does not fit the config, for an
                unsupported option or module setting (``nn.Embedding(sparse=True)`` or
                ``max_norm``, a per-channel scale with an int8/uint8 LUT), a weight computed
                in forward by a parametrization, non-finite values, or a model already
                prepared; the model is then unchanged.
        """
        prepared = [f"{name}.{fp.param_name}" for name, _, _, fp in _fake_palettizers(self._model)]
        if prepared:
            raise ValueError(
                f"prepare: the model is already prepared for DKM ({', '.join(prepared[:3])}"
                f"{', ...' if len(prepared) > 3 else ''}); finalize it first, or prepare the "
                "original model"
            )
        selections = select_weights(
            self._model, self._config, DKM_SUPPORTED, pruned_ok=True, attention_owns_out_proj=True
        )
        plans = []
        for sel in selections:
            weight = getattr(sel.module, sel.param_name)
            where = f"{sel.qualified_name} {tuple(weight.shape)}"
            _check_supported_options(sel.config, where)
            _check_module(sel.module, where)
            check_coreml_options(sel)
            check_materialized(sel, weight)
            cfg = sel.config
            if cfg.cluster_dim > 1 and cfg.enable_per_channel_scale:
                raise ValueError(
                    f"{where}: enable_per_channel_scale=True is not supported with "
                    f"cluster_dim={cfg.cluster_dim}; accepted: False"
                )
            plans.append((sel, layout_for(weight, cfg, sel.qualified_name)))
        target = self._model if inplace else copy.deepcopy(self._model)
        modules = dict(target.named_modules(remove_duplicate=False))
        # every k-means first (it may fail on a weight, e.g. NaN), then attach: a failed
        # prepare(inplace=True) leaves the model as it was
        built = []
        for sel, layout in plans:
            module = modules[sel.module_name] if sel.module_name else target
            weight = getattr(module, sel.param_name)
            fp = FakePalettize(weight, layout, sel.config, sel.param_name)
            if sel.config.milestone == 0:
                try:
                    fp.initialize(weight)
                except (ValueError, RuntimeError) as err:
                    raise type(err)(f"{sel.qualified_name}: {err}") from err
            built.append((module, fp))
        _repair_collapsed([fp for _, fp in built if fp.is_enabled])
        group = _DKMGroup()
        for module, fp in built:
            fp.attach(module, group)
        for fp, module, reader, holder, name in _weight_readers(target, built):
            fp.add_reader(module, reader, holder, name)
        target.train()
        self._prepared = target
        return target

    def _require_prepared(self) -> nn.Module:
        if self._prepared is None:
            raise RuntimeError("DKMPalettizer: call prepare() first")
        return self._prepared

    @torch.no_grad()
    def step(self) -> None:
        """Count one optimizer step; modules reaching their milestone start palettizing."""
        members = _attached(self._require_prepared())
        self._set_step(members, _steps_of(members) + 1)

    @torch.no_grad()
    def set_step(self, step: int) -> None:
        """Set the step counter of every weight to ``step`` (e.g. a trainer's global step).

        Weights whose milestone is ``<= step`` and that are not yet palettizing start now.
        Use it instead of :meth:`step` when an external counter (restored on resume) is the
        source of truth.

        Raises:
            ValueError: if ``step`` is negative.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"set_step: step must be an int >= 0, got {step!r}")
        self._set_step(_attached(self._require_prepared()), step)

    @staticmethod
    def _set_step(members: list[tuple[nn.Module, FakePalettize]], step: int) -> list[FakePalettize]:
        """Write ``step`` into the (module, FakePalettize) members; returns the ones it started
        (their milestone reached)."""
        _set_step_counts([fp for _, fp in members], step)
        started = []
        for module, fp in members:
            if not fp.is_enabled and step >= fp.cfg.milestone:
                fp.initialize(fp.live_weight(module)[1])
                started.append(fp)
        _repair_collapsed([fp for _, fp in members if fp.is_enabled])
        return started

    @property
    def steps(self) -> int:
        """``step()`` calls so far (restored with the model's state_dict)."""
        return _steps_of(_attached(self._require_prepared()))

    def finalize(self, model: nn.Module | None = None, inplace: bool = False) -> nn.Module:
        """Turn every soft-palettized weight into a hard palette and a plain parameter.

        Each weight becomes ``scale * lut[argmin distance]`` (at most ``2**n_bits`` values or
        vectors per LUT group), gets the ``_COREML_`` metadata ``ct.convert`` reads, and the
        DKM hooks and ``<param>_dkm`` children are removed: the result is a plain torch model
        whose state_dict, apart from the ``_COREML_`` buffers (drop them with
        :func:`~lightning_palettize.strip_coreml_metadata`), loads strictly into a freshly
        built model. Weights whose milestone was never reached are left as they are.

        Args:
            model: the prepared model (default: the one ``prepare`` returned).
            inplace: modify it instead of a deep copy.

        Returns:
            The finalized model (in eval mode).
        """
        model = self._require_prepared() if model is None else model
        target = model if inplace else copy.deepcopy(model)
        any_palette = False
        # every palette and its metadata first: an error leaves an inplace model as it was
        todo = []
        for _, module, pname, fp in list(_fake_palettizers(target)):
            live = fp.live_weight(module)[1]
            palette = fp.to_palette(live) if fp.is_enabled else None
            todo.append((module, pname, fp, live, palette, palette and palette.coreml_metadata()))
        for module, pname, fp, live, palette, meta in todo:
            fp.detach_from(module)
            if palette is not None:
                with torch.no_grad():
                    palette.dequantize(out=live.data)
                attach_coreml_metadata(module, pname, palette, meta)
                any_palette = True
        if any_palette:
            set_metadata_version(target)
        if inplace and model is self._prepared:
            self._prepared = None
        return target.eval()

    def report(self) -> PalettizationReport:
        """Per-weight state: error of the hard-assigned weight against the live weight, bytes."""
        model = self._require_prepared()
        rows = []
        for name, module, pname, fp in _fake_palettizers(model):
            original = fp.live_weight(module)[1]
            qualified = f"{name}.{pname}" if name else pname
            if not fp.is_enabled:
                continue
            palette = fp.to_palette(original)
            rows.append(
                ReportRow(
                    name=qualified,
                    n_bits=fp.n_bits,
                    cluster_dim=fp.layout.cluster_dim,
                    num_luts=fp.layout.num_groups,
                    num_params=original.numel(),
                    rel_error=palette.relative_error(original),
                    bytes_before=palette.dense_nbytes(),
                    bytes_after=palette.nbytes(),
                    lut_dtype=fp.cfg.lut_dtype,
                )
            )
        return PalettizationReport(rows)


def load_prepared_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor], config: Any, strict: bool = True
) -> DKMPalettizer:
    """Re-prepare a freshly built model with ``config`` and load a mid-DKM state_dict into it.

    The way to resume a prepared (mid-training) checkpoint outside a training loop: builds
    the same DKM hooks and buffers (the centroids then come from the checkpoint) and loads the
    state.

    Returns:
        The palettizer (its ``prepare``d model is ``model`` itself).
    """
    cfg = load_config(config, DKMPalettizerConfig)
    palettizer = DKMPalettizer(model, cfg)
    palettizer.prepare(inplace=True)
    model.load_state_dict(state_dict, strict=strict)
    return palettizer
