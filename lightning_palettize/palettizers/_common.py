"""Pieces shared by the palettizers: supported modules, one weight -> Palette, Core ML
metadata, and the all-or-nothing write-back of a whole model."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_palettize._progress import Progress
from lightning_palettize.kmeans import kmeans_many
from lightning_palettize.palette import Layout, Palette, channel_scale, quantize_lut
from lightning_palettize.report import PalettizationReport, ReportRow
from lightning_palettize.selection import WeightSelection, select_weights

__all__ = [
    "KMEANS_SUPPORTED",
    "COREML_PREFIX",
    "METADATA_VERSION_KEY",
    "PalettizedWeight",
    "copy_model",
    "layout_for",
    "ClusterSpec",
    "palettize_weight",
    "palettize_many",
    "scaled_groups",
    "build_palette",
    "check_coreml_options",
    "check_materialized",
    "attach_coreml_metadata",
    "remove_coreml_metadata",
    "strip_coreml_metadata",
    "set_metadata_version",
    "compress_model",
]

_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

#: Modules (and their subclasses) the k-means palettizers handle, with their weights.
#: ``MultiheadAttention.out_proj`` is an ``nn.Linear`` subclass and is visited on its own.
KMEANS_SUPPORTED: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("weight",),
    nn.Conv1d: ("weight",),
    nn.Conv2d: ("weight",),
    nn.Conv3d: ("weight",),
    nn.ConvTranspose1d: ("weight",),
    nn.ConvTranspose2d: ("weight",),
    nn.Embedding: ("weight",),
    nn.MultiheadAttention: _MHA_WEIGHTS,
}

COREML_PREFIX = "_COREML_"
METADATA_VERSION_KEY = f"{COREML_PREFIX}/metadata_version"

_LUT_QDTYPES = {"int8": torch.int8, "i8": torch.int8, "uint8": torch.uint8, "u8": torch.uint8}


@dataclass
class PalettizedWeight:
    """A weight's palette and where it goes (internal to one compress call)."""

    selection: WeightSelection
    palette: Palette
    rel_error: float | None  # None: measured while the weight is written back
    lut_dtype: str
    outliers: Tensor | None = None  # bool mask of weights kept exact (SKM)


# attribute values a copy may share: immutable, and deepcopy returns them as they are
_SHARED_TYPES = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)


def _plain_module_class(cls: type) -> bool:
    """Whether deepcopy would reconstruct ``cls`` generically (no own copy/pickle protocol)."""
    return (
        cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and getattr(cls, "__deepcopy__", None) is None
        and not hasattr(cls, "__slots__")
    )


def copy_model(model: nn.Module, memo: dict | None = None) -> nn.Module:
    """``copy.deepcopy(model)``, the same result about 3x faster on small models.

    Modules whose class keeps the default pickling protocol are rebuilt as deepcopy's generic
    path rebuilds them (``__getstate__``, each value copied, ``__setstate__``), sharing the
    immutable values and re-creating empty hook tables without the generic machinery; tensors,
    parameters and every other value go through ``copy.deepcopy`` with the shared ``memo``
    (tied weights and shared submodules stay shared), and any other module class is handed to
    ``copy.deepcopy`` whole.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> twin = copy_model(net)
        >>> twin[0].weight is net[0].weight, torch.equal(twin[0].weight, net[0].weight)
        (False, True)
    """
    memo = {} if memo is None else memo
    done = memo.get(id(model))
    if done is not None:
        return done
    cls = type(model)
    source = model.__getstate__() if _plain_module_class(cls) else None
    if type(source) is not dict:  # an own copy/pickle protocol: deepcopy's business
        return copy.deepcopy(model, memo)
    new = cls.__new__(cls)
    memo[id(model)] = new
    state = {}
    for key, value in source.items():
        kind = type(value)
        if kind in _SHARED_TYPES or (
            kind is tuple and all(type(v) in _SHARED_TYPES for v in value)
        ):
            state[key] = value
        elif key == "_modules" and kind is dict:
            state[key] = {
                name: None if child is None else copy_model(child, memo)
                for name, child in value.items()
            }
        elif kind in (dict, OrderedDict) and not value:
            state[key] = kind()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)
    return new


def layout_for(weight: Tensor, cfg: object, name: str) -> Layout:
    """The LUT layout a module config asks for, validated against the weight's shape.

    Raises:
        ValueError: naming the weight when group_size / cluster_dim do not divide its axis.
    """
    layout = Layout(
        tuple(weight.shape),
        cfg.granularity,
        cfg.group_size,
        cfg.channel_axis,
        cfg.cluster_dim or 1,
    )
    layout.validate(name)
    return layout


@dataclass(frozen=True)
class ClusterSpec:
    """One weight to cluster (see :func:`palettize_weight` for the fields)."""

    weight: Tensor
    layout: Layout
    n_bits: int
    per_channel_scale: str | None = None
    lut_dtype: str | None = None
    importance: Tensor | None = None
    exact: bool = False


@torch.no_grad()
def palettize_weight(
    weight: Tensor,
    layout: Layout,
    n_bits: int,
    *,
    per_channel_scale: str | None = None,
    lut_dtype: str | None = None,
    importance: Tensor | None = None,
    exact: bool = False,
    seed: int = 0,
) -> Palette:
    """Cluster one weight into a :class:`Palette` (exact 1-D k-means, or vectors).

    Args:
        weight: the dense weight (any float dtype, any device).
        layout: its LUT layout (see :func:`layout_for`).
        n_bits: index width.
        per_channel_scale: ``None``, ``"abs"`` (max |w| per output channel, as coremltools PTP)
            or ``"min_max"``; the weight is divided by it before clustering.
        lut_dtype: ``None`` / ``"int8"`` / ``"uint8"``: quantize each LUT (8-bit symmetric).
        importance: optional per-element non-negative weights of the k-means objective (SKM's
            Fisher information); summed over a vector's elements for ``cluster_dim > 1``.
        exact: cluster every distinct fp32 value instead of 16-bit codes.
        seed: seed of vector k-means.

    Returns:
        The palette; ``palette.dequantize()`` is the palettized weight.
    """
    spec = ClusterSpec(weight, layout, n_bits, per_channel_scale, lut_dtype, importance, exact)
    return palettize_many([spec], seed=seed)[0]


@torch.no_grad()
def palettize_many(specs: Sequence[ClusterSpec], *, seed: int = 0) -> list[Palette]:
    """:func:`palettize_weight` of several weights, clustered together by
    :func:`~lightning_palettize.kmeans.kmeans_many` (one compiled call for the 1-D CPU ones).

    Args:
        specs: one :class:`ClusterSpec` per weight (exact and fast-mode specs may be mixed).
        seed: seed of vector k-means.

    Returns:
        One palette per spec, in order; each equal to ``palettize_weight`` of that spec.

    Raises:
        ValueError: from the k-means (e.g. NaN or Inf in a weight); nothing is returned then.
    """
    inputs = []
    for spec in specs:
        x, scale = scaled_groups(spec.weight, spec.layout, spec.per_channel_scale)
        imp = None
        if spec.importance is not None:
            imp = spec.layout.to_groups(spec.importance.to(x.device, torch.float32)).sum(dim=-1)
        inputs.append((x, scale, imp))
    results: list = [None] * len(specs)
    for exact in (False, True):
        idx = [i for i, spec in enumerate(specs) if spec.exact == exact]
        if not idx:
            continue
        found = kmeans_many(
            [inputs[i][0] for i in idx],
            [1 << specs[i].n_bits for i in idx],
            [inputs[i][2] for i in idx],
            exact=exact,
            seed=seed,
        )
        for i, r in zip(idx, found):
            results[i] = r
    return [
        build_palette(s.weight, s.layout, s.n_bits, r.centroids, r.labels, inp[1], s.lut_dtype)
        for s, r, inp in zip(specs, results, inputs)
    ]


def scaled_groups(
    weight: Tensor, layout: Layout, per_channel_scale: str | None
) -> tuple[Tensor, Tensor | None]:
    """``(x[G, N, d], scale)``: the weight divided by its per-channel scale (if any), grouped."""
    w = weight.detach()
    scale = None
    if per_channel_scale is not None:
        scale = channel_scale(w, per_channel_scale)
        w = w.float() / scale
    return layout.to_groups(w), scale


def build_palette(
    weight: Tensor,
    layout: Layout,
    n_bits: int,
    centroids: Tensor,
    labels: Tensor,
    scale: Tensor | None,
    lut_dtype: str | None,
) -> Palette:
    """The :class:`Palette` of clustered ``weight``: centroids ``[G, K, d]`` become the LUT
    (8-bit quantized when ``lut_dtype`` is ``"int8"``/``"uint8"``), labels the indices.

    For a half-precision weight (float16 / bfloat16) a float LUT is rounded to the weight's
    dtype (and held in float32, as :class:`Palette` and the ``_COREML_`` lut buffer want): its
    entries are then exactly the values the dense weight holds, and
    :func:`~lightning_palettize.export.save_palettized` stores the LUT losslessly at 2 bytes an
    entry. Without a per-channel scale the dense weight is unchanged by this (it is the LUT
    rounded to its dtype either way); with one, each element is ``scale * lut`` rounded once
    more, as Core ML's float16 program computes it from its float16 LUT. Quantized LUTs are
    left as they are (their entries are ``code * quantization_scale`` in float32).
    """
    lut = centroids.float()
    qdtype = qscale = zero_point = None
    if lut_dtype is not None:
        qdtype = _LUT_QDTYPES[lut_dtype]
        lut, qscale, zero_point = quantize_lut(lut, qdtype)
    elif weight.dtype.is_floating_point and weight.dtype.itemsize < lut.dtype.itemsize:
        lut = lut.to(weight.dtype).float()
    return Palette(
        layout,
        n_bits,
        lut.contiguous(),
        labels.to(torch.uint8),
        scale=scale,
        lut_qdtype=qdtype,
        lut_qscale=qscale,
        lut_zero_point=zero_point,
        dtype=weight.dtype,
    )


def check_coreml_options(sel: WeightSelection) -> None:
    """Raise, before anything is computed or written, for a module config whose palette
    :meth:`Palette.coreml_metadata` would refuse: a per-channel scale with a quantized LUT
    (the coremltools converter rejects that joint compression)."""
    cfg = sel.config
    lut = getattr(cfg, "lut_dtype", None)
    if getattr(cfg, "enable_per_channel_scale", False) and (
        lut in (torch.int8, torch.uint8) or (isinstance(lut, str) and lut in _LUT_QDTYPES)
    ):
        raise ValueError(
            f"{sel.qualified_name}: enable_per_channel_scale=True with lut_dtype={lut!r}: Core ML "
            "conversion cannot combine a per-channel scale with a quantized LUT (coremltools' "
            "converter rejects the joint compression); accepted: enable_per_channel_scale=False, "
            "or a float lut_dtype"
        )


def check_materialized(sel: WeightSelection, weight: Tensor) -> None:
    """Raise, naming the weight, when it has no values yet (meta device: the k-means needs
    them)."""
    if weight.is_meta:
        raise ValueError(
            f"{sel.qualified_name} {tuple(weight.shape)}: the weight is on the meta device; "
            "palettization clusters its values: load or initialize the weights first "
            "(e.g. model.to_empty(device=...) and then load_state_dict)"
        )


def attach_coreml_metadata(
    module: nn.Module,
    param_name: str,
    palette: Palette,
    metadata: Mapping[str, Tensor] | None = None,
) -> None:
    """Register the ``_COREML_/<param>/<field>`` buffers coremltools' converter reads
    (``metadata``: ``palette.coreml_metadata()`` computed beforehand), in place of every field
    an earlier palettization of the parameter left (e.g. its ``palettization_scale``)."""
    metadata = palette.coreml_metadata() if metadata is None else metadata
    remove_coreml_metadata(module, param_name)
    for field, value in metadata.items():
        module.register_buffer(f"{COREML_PREFIX}/{param_name}/{field}", value.cpu())


def remove_coreml_metadata(module: nn.Module, param_name: str) -> None:
    """Remove the ``_COREML_/<param_name>/<field>`` buffers of one parameter of ``module`` (in
    place); the root's ``_COREML_/metadata_version`` and other parameters' fields stay."""
    prefix = f"{COREML_PREFIX}/{param_name}/"
    for name in [n for n in module._buffers if n.startswith(prefix)]:
        del module._buffers[name]


def set_metadata_version(model: nn.Module) -> None:
    model.register_buffer(METADATA_VERSION_KEY, torch.tensor(1, dtype=torch.int64))


def strip_coreml_metadata(model: nn.Module) -> nn.Module:
    """Remove every ``_COREML_`` buffer (in place) so the state_dict loads strictly into a
    freshly built, never-palettized model. The palettized weights are kept.

    Returns:
        ``model`` itself.
    """
    for module in model.modules():
        for name in [n for n in module._buffers if n.startswith(COREML_PREFIX)]:
            del module._buffers[name]
    return model


#: (selection, its live weight, its layout): what a plan turns into a PalettizedWeight
PlanItem = tuple[WeightSelection, Tensor, Layout]
#: Elements of the weights a ``plan_many`` call gets at most (unless one weight is larger).
PLAN_BATCH_ELEMS = 1 << 22


def compress_model(
    model: nn.Module,
    config: object,
    *,
    inplace: bool,
    plan: Callable[[WeightSelection, Tensor, Layout], PalettizedWeight] | None = None,
    plan_many: Callable[[list[PlanItem]], list[PalettizedWeight]] | None = None,
    supported: Mapping[type[nn.Module], Sequence[str]] = KMEANS_SUPPORTED,
    progress: bool = True,
    desc: str = "palettizing",
) -> tuple[nn.Module, PalettizationReport]:
    """Palettize every selected weight of ``model``, all or nothing.

    Phase 1 validates every layout, then clusters every weight without touching the model.
    Phase 2 writes dense palettized weights and metadata. An error in phase 1 leaves the
    model exactly as it was.

    Args:
        model: the model (copied first unless ``inplace``).
        config: a top-level config resolved per module by :func:`select_weights`.
        inplace: mutate ``model`` instead of a deep copy.
        plan: turns one selected weight into a :class:`PalettizedWeight`.
        plan_many: instead of ``plan``, turns a list of them into theirs at once (weights go in
            batches of about ``PLAN_BATCH_ELEMS`` elements, so progress still moves on big
            models).
        supported: module types and their weights.
        progress: show progress over weights.
        desc: progress label.

    Returns:
        ``(palettized model, report)``.
    """
    if (plan is None) == (plan_many is None):
        raise TypeError("compress_model: pass exactly one of plan and plan_many")
    selections = select_weights(model, config, supported)
    layouts = []
    for sel in selections:
        check_coreml_options(sel)
        weight = getattr(sel.module, sel.param_name)
        check_materialized(sel, weight)
        if weight.is_floating_point() and not bool(torch.isfinite(weight).all()):
            raise ValueError(
                f"{sel.qualified_name} {tuple(weight.shape)}: contains NaN or Inf values; "
                "cannot cluster them"
            )
        layouts.append(layout_for(weight, sel.config, sel.qualified_name))
    results: list[PalettizedWeight] = []
    with Progress(len(selections), desc, "weight", enabled=progress) as bar:
        batch: list[PlanItem] = []
        size = 0
        for i, (sel, layout) in enumerate(zip(selections, layouts)):
            weight = getattr(sel.module, sel.param_name)
            if plan_many is None:
                results.append(plan(sel, weight, layout))
                bar.update()
                continue
            batch.append((sel, weight, layout))
            size += weight.numel()
            if size >= PLAN_BATCH_ELEMS or i == len(selections) - 1:
                results += plan_many(batch)
                bar.update(len(batch))
                batch, size = [], 0

    # the Core ML metadata too before anything is written (it validates the palette)
    metas = [res.palette.coreml_metadata() for res in results]
    target = model if inplace else copy_model(model)
    # Map each selection's module to its counterpart in the target.
    modules = dict(target.named_modules(remove_duplicate=False))
    rows = []
    with torch.no_grad():
        for res, meta in zip(results, metas):
            sel = res.selection
            module = modules[sel.module_name] if sel.module_name else target
            param = getattr(module, sel.param_name)
            original = param.detach().clone() if res.outliers is not None else None
            if param.device == res.palette.lut.device:
                measured = res.palette.write_into(param.data)
            else:
                measured = res.palette.relative_error(param.data.to(res.palette.lut.device))
                param.data.copy_(res.palette.dequantize().to(param.device))
            rel_error = measured if res.rel_error is None else res.rel_error
            n_out = 0
            if res.outliers is not None:
                param.data[res.outliers] = original[res.outliers]
                n_out = int(res.outliers.sum())
            attach_coreml_metadata(module, sel.param_name, res.palette, meta)
            layout = res.palette.layout
            rows.append(
                ReportRow(
                    name=sel.qualified_name,
                    n_bits=res.palette.n_bits,
                    cluster_dim=layout.cluster_dim,
                    num_luts=layout.num_groups,
                    num_params=param.numel(),
                    rel_error=rel_error,
                    bytes_before=res.palette.dense_nbytes(),
                    bytes_after=res.palette.nbytes() + _outlier_bytes(n_out, param),
                    lut_dtype=res.lut_dtype,
                    outliers=n_out,
                )
            )
        if results:
            set_metadata_version(target)
    return target, PalettizationReport(rows)


def _outlier_bytes(n: int, param: Tensor) -> int:
    # sparse storage: int32 flat index + value per outlier
    return n * (4 + param.element_size())
