"""Export a palettized model: a compact, pickle-free safetensors file, and Core ML.

A palettized model (after any palettizer) is a plain torch model whose palettized weights hold
exact LUT values, plus the ``_COREML_/<param>/<field>`` buffers that coremltools reads. Storing
it densely wastes the compression, so :func:`save_palettized` recovers each palette from the
model itself: the LUT, scale and LUT quantization come from the buffers, the layout from the LUT
shape, and the indices from an exact match of every weight element (or vector) to its group's
LUT. Elements the palette does not reproduce bit for bit (SKM's outliers, or any later edit)
are stored sparsely, so :func:`load_palettized` always restores bit-identical weights and the
``_COREML_`` buffers. The file holds safetensors tensors and a JSON header only: loading it
never unpickles anything.

File layout (safetensors metadata key ``"lightning_palettize"`` holds the JSON header):

* ``tensor/<state_dict key>``: every non-palettized tensor, stored as is (``_COREML_`` buffers
  of palettized weights are re-derived, other ``_COREML_`` buffers are kept).
* ``palette/<weight key>/indices``: packed n-bit indices (:func:`~lightning_palettize.palette.
  pack_indices`, in :meth:`Layout.to_groups` order); ``/lut``: the LUT in the weight's dtype
  when lossless, else in its buffer's dtype, or its int8 / uint8 codes for a quantized LUT
  (plus ``/lut_patch_index`` / ``/lut_patch_value`` for the rare entries a code cannot express,
  such as -0.0); ``/field/<name>``: float or large fields such as ``palettization_scale`` and
  ``quantization_scale``; ``/outlier_index`` (int32, or int64 past 2**31 elements) and
  ``/outlier_value`` for the sparse outliers. Small integer fields (``compression_type``,
  ``vector_axis``, ``zero_point``...) sit in the JSON header, which also records each weight's
  layout and dtypes and the user's metadata.

:func:`export_coreml` traces and converts with coremltools (optional extra ``coreml``) and
checks that every palettized weight became a ``constexpr_lut_to_dense`` op. It refuses what
Core ML cannot express: 5- and 7-bit palettes (3-bit before iOS18) and outliers (unless
``allow_outliers=True``), which ``save_palettized`` stores exactly.

Example:
    >>> import tempfile, os, torch
    >>> from lightning_palettize import PostTrainingPalettizer
    >>> net = lambda: torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU())
    >>> small = PostTrainingPalettizer(net(), {"global_config": {"n_bits": 4}}).compress(
    ...     progress=False)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> summary = save_palettized(small, path, metadata={"task": "demo"})
    >>> summary["weights"]["0.weight"]["bytes"]  # 2048 weights * 4 bits + 16 fp32 entries
    1088
    >>> restored = load_palettized(path, net())
    >>> torch.equal(restored[0].weight, small[0].weight)
    True
    >>> read_palettized_metadata(path)
    {'task': 'demo'}
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_palettize.palette import Layout, Palette, pack_indices, unpack_indices
from lightning_palettize.palettizers._common import COREML_PREFIX, strip_coreml_metadata

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "compact_size",
    "export_coreml",
    "load_palettized",
    "read_palettized_metadata",
    "save_palettized",
]

#: ``format`` field of the JSON header; a file without it is rejected.
FORMAT_NAME = "lightning_palettize.palettized"
#: Header version this code writes and reads.
FORMAT_VERSION = 1
_HEADER_KEY = "lightning_palettize"
_RAW = "tensor/"
_PALETTE = "palette/"
# Fields re-derived from the compact palette; any other field is stored as found.
_LUT = "lut"
_SCALE = "palettization_scale"
_VECTOR_AXIS = "vector_axis"
_QSCALE = "quantization_scale"
_ZERO_POINT = "zero_point"
_FIELD_NAME = re.compile(r"[A-Za-z0-9_]+")
# Integer fields up to this size go into the JSON header instead of the tensor section.
_JSON_FIELD_NUMEL = 16
_CHUNK = 1 << 22  # distance-matrix elements per step of the nearest-entry search
# More than this fraction of outliers in one weight means it no longer holds LUT values.
_OUTLIER_WARN_FRACTION = 0.05
_COREML_LUT_OP = "constexpr_lut_to_dense"
# Index widths Core ML's constexpr_lut_to_dense takes (coremltools 9.0: the iOS16 op wants a
# LUT of 2, 4, 16, 64 or 256 entries; the iOS18 op's indices are uint1/2/3/4/6/8).
_COREML_BITS_IOS16 = frozenset({1, 2, 4, 6, 8})
_COREML_BITS_IOS18 = frozenset({1, 2, 3, 4, 6, 8})
# A weight element farther than this many ulps from its LUT value is an outlier for Core ML.
_COREML_RTOL_ULPS = 4
_QUANTIZED_LUT_PASS = "common::canonicalize_quantized_lut_pattern"

_DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        getattr(torch, name, None)
        for name in (
            "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
            "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
        )
    )
    if isinstance(dt, torch.dtype)
}  # fmt: skip
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ----------------------------------------------------------------------------- model scanning


@dataclass
class _Fields:
    """The ``_COREML_`` buffers of one parameter, by field name, with their state_dict keys."""

    module_path: str
    param_name: str
    tensors: dict[str, Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def weight_key(self) -> str:
        return _join(self.module_path, self.param_name)


def _join(module_path: str, name: str) -> str:
    return f"{module_path}.{name}" if module_path else name


def _is_coreml_key(key: str) -> bool:
    return key.startswith(f"{COREML_PREFIX}/") or f".{COREML_PREFIX}/" in key


def _split_coreml_key(key: str) -> tuple[str, str]:
    """``"enc.fc._COREML_/weight/lut"`` -> ``("enc.fc", "_COREML_/weight/lut")``."""
    at = key.find(f"{COREML_PREFIX}/")
    return key[:at].removesuffix("."), key[at:]


def _coreml_fields(state: Mapping[str, Any]) -> dict[str, _Fields]:
    """Group the per-parameter ``_COREML_/<param>/<field>`` entries by the weight they describe."""
    out: dict[str, _Fields] = {}
    for key, value in state.items():
        if not _is_coreml_key(key):
            continue
        module_path, name = _split_coreml_key(key)
        parts = name.split("/")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            continue  # e.g. the root's _COREML_/metadata_version
        entry = out.setdefault(_join(module_path, parts[1]), _Fields(module_path, parts[1]))
        entry.tensors[parts[2]] = value
        entry.keys[parts[2]] = key
    return out


def _palettized_fields(state: Mapping[str, Any]) -> dict[str, _Fields]:
    """Weights with a ``lut`` field whose weight is in the state_dict, in state_dict order."""
    fields = _coreml_fields(state)
    return {
        key: fields[key]
        for key in state
        if key in fields and _LUT in fields[key].tensors and not _is_coreml_key(key)
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _bits(t: Tensor) -> Tensor:
    """An integer view of a float tensor, so that comparisons are bitwise (NaN, -0.0)."""
    return t.contiguous().view(_BITS_VIEW[t.element_size()])


# ----------------------------------------------------------------------------- layout recovery


def _layout_from_lut(
    name: str, shape: tuple[int, ...], lut_shape: tuple[int, ...], vector_axis: int | None
) -> tuple[Layout, int]:
    """Derive the Layout and n_bits from a Core ML LUT shape ``[b0, ..., K, d]``.

    ``b_k > 1`` marks the grouped axis; ``d`` vectors run along ``vector_axis`` (default 0, as
    the converter assumes). A LUT of rank ``weight.dim() + 1`` means ``d = 1``.

    Raises:
        ValueError: naming ``name`` when the LUT shape does not describe the weight or uses a
            layout this library cannot represent.
    """
    rank = len(shape)
    if len(lut_shape) == rank + 1:
        lut_shape = (*lut_shape, 1)
    if len(lut_shape) != rank + 2:
        raise ValueError(
            f"{name}: _COREML_ lut of shape {lut_shape} does not fit a weight of shape {shape}; "
            f"expected rank {rank + 2} ([blocks per axis..., 2**n_bits, vector length])."
        )
    blocks, k, d = lut_shape[:rank], lut_shape[-2], lut_shape[-1]
    n_bits = k.bit_length() - 1
    if k < 2 or k != 1 << n_bits or n_bits > 8:
        raise ValueError(
            f"{name}: _COREML_ lut has {k} entries; expected a power of two in 2..256."
        )
    grouped = [a for a, b in enumerate(blocks) if b != 1]
    if len(grouped) > 1:
        raise ValueError(
            f"{name}: _COREML_ lut shape {lut_shape} splits axes {grouped}; only one grouped "
            "axis is supported."
        )
    if d > 1 and vector_axis is None:
        vector_axis = 0
    if grouped:
        axis = grouped[0]
        if blocks[axis] < 1 or shape[axis] % blocks[axis]:
            raise ValueError(
                f"{name}: _COREML_ lut shape {lut_shape} has {blocks[axis]} blocks along axis "
                f"{axis}, which do not divide its {shape[axis]} channels."
            )
        if d > 1 and vector_axis != axis:
            raise ValueError(
                f"{name}: vectors along axis {vector_axis} with LUT groups along axis {axis} "
                "are not supported; group and vector axes must agree."
            )
        granularity, group_size = "per_grouped_channel", shape[axis] // blocks[axis]
    else:
        axis = vector_axis if d > 1 else 0
        granularity, group_size = "per_tensor", None
    if axis not in (0, 1):
        raise ValueError(
            f"{name}: LUT groups or vectors along axis {axis} are not supported (axis 0 or 1)."
        )
    layout = Layout(shape, granularity, group_size, axis, d)
    layout.validate(name)
    return layout, n_bits


def _layout_dict(layout: Layout) -> dict[str, Any]:
    return {
        "granularity": layout.granularity,
        "group_size": layout.group_size,
        "channel_axis": layout.channel_axis,
        "cluster_dim": layout.cluster_dim,
    }


def _dequantize(
    layout: Layout,
    n_bits: int,
    lut: Tensor,
    indices: Tensor,
    scale: Tensor | None,
    dtype: torch.dtype,
) -> Tensor:
    """``scale * lut[indices]`` rounded to ``dtype``; save and load both use exactly this."""
    g, d = layout.num_groups, layout.cluster_dim
    lut32 = lut.float().reshape(g, 1 << n_bits, d).contiguous()
    scale32 = None if scale is None else scale.float()
    return Palette(layout, n_bits, lut32, indices, scale32, dtype=dtype).dequantize()


def _nearest(x: Tensor, lut: Tensor, rtol: float) -> Tensor:
    """uint8 ``[G, N]``: each ``[G, N, d]`` vector's entry of its group's ``[G, K, d]`` LUT.

    Scalars take the nearest entry. Vectors take, among the entries matching the most elements
    (within ``rtol``, the weight dtype's rounding), the nearest: a vector with one outlier
    element keeps its entry, so only that element is stored sparsely.
    """
    g, n, d = x.shape
    k = lut.shape[1]
    out = torch.empty(g, n, dtype=torch.uint8)
    step = max(1, _CHUNK // max(1, g * k * d))
    atol = lut.abs()[:, None] * rtol + torch.finfo(torch.float32).tiny  # [G, 1, K, d]
    for start in range(0, n, step):
        xs = x[:, start : start + step]
        if d == 1:
            dist = (xs - lut.transpose(1, 2)).abs_()  # [G, n, K]
        else:
            diff = (xs[:, :, None, :] - lut[:, None, :, :]).abs_()  # [G, n, K, d]
            misses = (~(diff <= atol)).sum(-1)
            dist = diff.square_().nan_to_num_(nan=0.0, posinf=0.0).sum(-1)
            dist.masked_fill_(misses > misses.amin(-1, keepdim=True), float("inf"))
        out[:, start : start + step] = dist.argmin(-1)
    return out


# ----------------------------------------------------------------------------- encoding


@dataclass
class _Encoded:
    tensors: dict[str, Tensor]
    header: dict[str, Any]
    summary: dict[str, Any]


def _small_field(value: Tensor) -> bool:
    return not value.dtype.is_floating_point and value.numel() <= _JSON_FIELD_NUMEL


def _field_record(value: Tensor) -> dict[str, Any]:
    return {"dtype": _dtype_name(value.dtype), "shape": list(value.shape)}


def _lut_codes(fields: dict[str, Tensor], lut: Tensor) -> tuple[Tensor, Tensor] | None:
    """int8 / uint8 codes that rebuild ``lut`` from its quantization fields, and the flat
    positions the codes miss (e.g. -0.0, which a code cannot express); None when they do not fit.
    """
    qscale = fields.get(_QSCALE)
    if qscale is None or not qscale.dtype.is_floating_point:
        return None
    zero_point = fields.get(_ZERO_POINT)
    qdtype, lo, hi = (torch.int8, -128, 127) if zero_point is None else (torch.uint8, 0, 255)
    try:
        codes = torch.round(lut.double() / qscale.double())
        if zero_point is not None:
            codes = codes + zero_point.float()
        if codes.shape != lut.shape or not bool(((codes >= lo) & (codes <= hi)).all()):
            return None
        codes = codes.to(qdtype)
        rebuilt = _lut_from_codes(codes, qscale, zero_point, lut.dtype)
    except RuntimeError:  # quantization fields that do not broadcast against the LUT
        return None
    if rebuilt.shape != lut.shape:
        return None
    misses = (_bits(rebuilt) != _bits(lut)).reshape(-1).nonzero().reshape(-1)
    if misses.numel() > max(1, lut.numel() // 8):
        return None
    return codes, misses.to(torch.int32)


def _lut_from_codes(
    codes: Tensor, qscale: Tensor, zero_point: Tensor | None, dtype: torch.dtype
) -> Tensor:
    # in the scale's precision (coremltools writes float64 scales and rounds the product)
    work = torch.promote_types(qscale.dtype, torch.float32)
    q = codes.to(work) if zero_point is None else codes.to(work) - zero_point.to(work)
    return (q * qscale.to(work)).to(dtype)


@dataclass
class _Fit:
    """A palettized weight matched against its own ``_COREML_`` palette."""

    weight: Tensor  # detached, on the CPU
    values: dict[str, Tensor]  # the _COREML_ fields, on the CPU
    layout: Layout
    n_bits: int
    indices: Tensor  # uint8 [G, N], each element's (vector's) nearest entry
    outlier_index: Tensor  # flat positions the palette does not reproduce bit for bit
    outlier_rebuilt: Tensor  # what the palette gives there instead


def _fit_palette(caller: str, wkey: str, weight: Tensor, fields: _Fields) -> _Fit:
    """Recover ``wkey``'s palette (layout, n_bits, indices) and the elements it misses.

    Raises:
        ValueError: prefixed with ``caller`` and naming ``wkey`` when the ``_COREML_`` buffers
            do not describe a palette of the weight.
    """
    weight = weight.detach().cpu()
    if not weight.dtype.is_floating_point:
        raise ValueError(
            f"{caller}: {wkey} has a _COREML_ lut but dtype {weight.dtype}; only floating "
            "weights can be palettized."
        )
    values = {f: t.detach().cpu() for f, t in fields.tensors.items()}
    bad = [f for f in values if not _FIELD_NAME.fullmatch(f)]
    if bad:
        raise ValueError(f"{caller}: {wkey} has _COREML_ field names {bad} with odd characters.")
    lut_buf = values[_LUT]
    if not lut_buf.dtype.is_floating_point:
        raise ValueError(
            f"{caller}: {wkey}: _COREML_ lut has dtype {lut_buf.dtype}; expected a float."
        )
    vector_axis = values.get(_VECTOR_AXIS)
    if vector_axis is not None and vector_axis.numel() != 1:
        raise ValueError(f"{caller}: {wkey}: _COREML_ vector_axis must be a scalar.")
    layout, n_bits = _layout_from_lut(
        f"{caller}: {wkey}",
        tuple(weight.shape),
        tuple(lut_buf.shape),
        None if vector_axis is None else int(vector_axis),
    )
    scale = values.get(_SCALE)
    if scale is not None:
        want = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        if tuple(scale.shape) != want or not scale.dtype.is_floating_point:
            raise ValueError(
                f"{caller}: {wkey}: _COREML_ palettization_scale has shape "
                f"{tuple(scale.shape)} ({scale.dtype}); expected a float tensor of shape {want}."
            )

    # indices: each element / vector (in the scaled domain) to its nearest LUT entry
    g, k, d = layout.num_groups, 1 << n_bits, layout.cluster_dim
    lut32 = lut_buf.float().reshape(g, k, d)
    x = weight.float() if scale is None else weight.float() / scale.float()
    indices = _nearest(layout.to_groups(x), lut32, 2 * torch.finfo(weight.dtype).eps)
    del x
    # outliers: whatever the palette does not reproduce bit for bit
    rebuilt = _dequantize(layout, n_bits, lut_buf, indices, scale, weight.dtype)
    flat = weight.reshape(-1)
    outlier_index = (_bits(rebuilt).reshape(-1) != _bits(flat)).nonzero().reshape(-1)
    outlier_rebuilt = rebuilt.reshape(-1)[outlier_index]
    return _Fit(weight, values, layout, n_bits, indices, outlier_index, outlier_rebuilt)


def _encode_weight(
    wkey: str, weight: Tensor, fields: _Fields
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """One palettized weight -> (file tensors, header entry, summary row)."""
    fit = _fit_palette("save_palettized", wkey, weight, fields)
    weight, values, layout, n_bits = fit.weight, fit.values, fit.layout, fit.n_bits
    indices, outlier_index = fit.indices, fit.outlier_index
    lut_buf = values[_LUT]
    g, k, d = layout.num_groups, 1 << n_bits, layout.cluster_dim
    flat = weight.reshape(-1)
    n_outliers = outlier_index.numel()
    if n_outliers > _OUTLIER_WARN_FRACTION * flat.numel():
        warnings.warn(
            f"save_palettized: {n_outliers} of {flat.numel()} elements of {wkey} are not LUT "
            "values and are stored sparsely; was the model changed after palettization?",
            stacklevel=3,
        )

    prefix = f"{_PALETTE}{wkey}/"
    tensors = {f"{prefix}indices": pack_indices(indices, n_bits)}
    codes = _lut_codes(values, lut_buf)
    lut_patches = 0
    if codes is not None:
        tensors[f"{prefix}lut"], storage = codes[0].contiguous(), "codes"
        lut_patches = codes[1].numel()
        if lut_patches:
            tensors[f"{prefix}lut_patch_index"] = codes[1]
            tensors[f"{prefix}lut_patch_value"] = lut_buf.reshape(-1)[codes[1]].clone()
    else:
        narrow = lut_buf.to(weight.dtype)
        lossless = narrow.element_size() < lut_buf.element_size() and torch.equal(
            _bits(narrow.to(lut_buf.dtype)), _bits(lut_buf)
        )
        stored = narrow if lossless else lut_buf
        tensors[f"{prefix}lut"], storage = stored.contiguous(), _dtype_name(stored.dtype)
    if n_outliers:
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        tensors[f"{prefix}outlier_index"] = outlier_index.to(index_dtype)
        tensors[f"{prefix}outlier_value"] = flat[outlier_index].clone()

    records: dict[str, Any] = {}
    for name, value in values.items():
        if name == _LUT:
            continue
        record = _field_record(value)
        if _small_field(value):
            record["values"] = value.tolist()
        else:
            tensors[f"{prefix}field/{name}"] = value.contiguous()
            record["tensor"] = True
        records[name] = record
    entry = {
        "module": fields.module_path,
        "param": fields.param_name,
        "shape": list(weight.shape),
        "dtype": _dtype_name(weight.dtype),
        "n_bits": n_bits,
        "layout": _layout_dict(layout),
        "lut": {**_field_record(lut_buf), "storage": storage, "patches": lut_patches},
        "fields": records,
        "outliers": n_outliers,
    }
    lut_ideal = g * k * d * weight.element_size()
    index_bytes = -(-layout.num_groups * layout.vectors_per_group * n_bits // 8)
    row = {
        "shape": list(weight.shape),
        "dtype": _dtype_name(weight.dtype),
        "n_bits": n_bits,
        "num_luts": g,
        "cluster_dim": d,
        "outliers": n_outliers,
        "dense_bytes": _nbytes(weight),
        "ideal_bytes": index_bytes + lut_ideal,
        "bytes": sum(_nbytes(t) for t in tensors.values()),
    }
    return tensors, entry, row


def _storage_id(t: Tensor) -> tuple | None:
    if t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()), t.dtype)  # fmt: skip


def _encode(model: nn.Module, caller: str) -> _Encoded:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}.")
    state = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(
                f"{caller}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor; "
                "only tensors can be stored without pickling."
            )
    palettized = _palettized_fields(state)
    consumed = {k for f in palettized.values() for k in f.keys.values()}

    tensors: dict[str, Tensor] = {}
    entries: dict[str, Any] = {}
    rows: dict[str, Any] = {}
    for wkey, fields in palettized.items():
        t, entries[wkey], rows[wkey] = _encode_weight(wkey, state[wkey], fields)
        tensors.update(t)

    # tied tensors are stored once; partially overlapping views are copied apart
    canonical: dict[tuple, str] = {}
    for wkey in palettized:
        canonical.setdefault(_storage_id(state[wkey]), wkey)
    aliases: dict[str, str] = {}
    raw: list[str] = []
    storages: set[int] = set()
    other_bytes = 0
    for key, value in state.items():
        if key in palettized or key in consumed:
            continue
        ident = _storage_id(value)
        if ident is not None and ident in canonical and not _is_coreml_key(key):
            aliases[key] = canonical[ident]
            continue
        if ident is not None and not _is_coreml_key(key):
            canonical[ident] = key
        t = value.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in storages:
            t = t.clone()  # safetensors refuses tensors that share memory
        storages.add(t.untyped_storage().data_ptr())
        tensors[_RAW + key] = t
        raw.append(key)
        other_bytes += _nbytes(t)

    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tensors": raw,
        "aliases": aliases,
        "palettized": entries,
    }
    dense = sum(_nbytes(v) for k, v in state.items() if not _is_coreml_key(k) and k not in aliases)
    palettized_bytes = sum(r["bytes"] for r in rows.values())
    summary = {
        "dense_bytes": dense,
        "bytes": palettized_bytes + other_bytes,
        "palettized_bytes": palettized_bytes,
        "ideal_bytes": sum(r["ideal_bytes"] for r in rows.values()),
        "other_bytes": other_bytes,
        "weights": rows,
    }
    return _Encoded(tensors, header, summary)


# ----------------------------------------------------------------------------- public: save


def compact_size(model: nn.Module) -> dict[str, Any]:
    """Sizes :func:`save_palettized` would write, without writing a file.

    Args:
        model: a palettized model (or any model: without ``_COREML_`` LUT buffers it is all
            "other" tensors).

    Returns:
        ``{"dense_bytes", "bytes", "palettized_bytes", "ideal_bytes", "other_bytes",
        "weights"}``: the dense state_dict bytes (tied tensors once, ``_COREML_`` buffers
        excluded), the tensor bytes of the compact file (its JSON header excluded), the part
        of it taken by palettized weights, their ideal size (packed n-bit indices plus LUTs at
        the weight's dtype), the non-palettized tensors, and per palettized weight ``{"shape",
        "dtype", "n_bits", "num_luts", "cluster_dim", "outliers", "dense_bytes",
        "ideal_bytes", "bytes"}``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: naming the weight when its ``_COREML_`` buffers cannot be stored.
    """
    return _encode(model, "compact_size").summary


def save_palettized(
    model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None
) -> dict[str, Any]:
    """Write a palettized model to one compact safetensors file.

    Every weight with ``_COREML_/<param>/lut`` buffers is stored as packed n-bit indices, its
    LUT (int8 / uint8 codes when the LUT is quantized), scales and sparse outliers; every other
    tensor as is. The write is atomic (a temporary file is renamed over ``path``).

    Args:
        model: the palettized model (after ``compress()`` / ``finalize()``).
        path: destination, conventionally ``*.safetensors``.
        metadata: optional JSON-serializable dict stored in the header; read it back with
            :func:`read_palettized_metadata`.

    Returns:
        :func:`compact_size`'s summary plus ``"path"`` and ``"file_bytes"`` (the file's size,
        header included). ``dense_bytes`` vs ``file_bytes`` is the model's saving.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``metadata`` is not a JSON dict.
        ValueError: naming the weight when its ``_COREML_`` buffers cannot be stored, or a
            state_dict entry that is not a tensor.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_palettize import PostTrainingPalettizer
        >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256))
        >>> small = PostTrainingPalettizer(model, {"global_config": {"n_bits": 4}}).compress(
        ...     progress=False)
        >>> s = save_palettized(small, os.path.join(tempfile.mkdtemp(), "m.safetensors"))
        >>> s["dense_bytes"], s["weights"]["0.weight"]["bytes"]
        (263168, 32832)
    """
    from safetensors.torch import save_file

    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"save_palettized: metadata must be a dict, got {type(metadata).__name__}.")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as err:
        raise TypeError(f"save_palettized: metadata must be JSON-serializable: {err}") from err
    encoded = _encode(model, "save_palettized")
    text = json.dumps({**encoded.header, "metadata": metadata or {}})
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(encoded.tensors, tmp, metadata={_HEADER_KEY: text})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {**encoded.summary, "path": path, "file_bytes": os.path.getsize(path)}


# ----------------------------------------------------------------------------- public: load


class _Reader:
    """Reads and checks one file; every error names the file and the key."""

    def __init__(self, path: str | os.PathLike, caller: str) -> None:
        self.path = os.fspath(path)
        self.caller = caller
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{caller}: no such file: {self.path}")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(self.path, framework="pt") as f:
                meta = f.metadata()
                names = f.keys()  # a safe_open handle is not iterable
                self.tensors = {k: f.get_tensor(k) for k in names}
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise self.error(
                None, f"not a readable safetensors file ({err}); it may be truncated or corrupt"
            ) from err
        text = (meta or {}).get(_HEADER_KEY)
        if text is None:
            raise self.error(
                None, f"no {_HEADER_KEY!r} header: not a file written by save_palettized"
            )
        try:
            header = json.loads(text)
        except ValueError as err:
            raise self.error(_HEADER_KEY, f"the JSON header is corrupt ({err})") from err
        if not isinstance(header, dict):
            raise self.error(_HEADER_KEY, "the JSON header is not an object")
        if header.get("format") != FORMAT_NAME:
            raise self.error(
                "format", f"format is {header.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        if header.get("version") != FORMAT_VERSION:
            raise self.error(
                "version",
                f"version {header.get('version')!r} is not supported (this library reads "
                f"version {FORMAT_VERSION})",
            )
        self.header = header
        self.used: set[str] = set()

    def error(self, key: str | None, problem: str) -> ValueError:
        where = f"{self.caller}: {self.path}"
        if key is not None:
            where += f": key {key!r}"
        return ValueError(f"{where}: {problem}.")

    def get(self, obj: Any, name: str, kinds: type | tuple, key: str) -> Any:
        if not isinstance(obj, dict) or name not in obj:
            raise self.error(key, f"the header lacks {name!r}")
        value = obj[name]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds)):
            raise self.error(key, f"header field {name!r} has a bad value {value!r}")
        return value

    def dtype(self, name: Any, key: str) -> torch.dtype:
        if not isinstance(name, str) or name not in _DTYPES:
            raise self.error(key, f"unknown dtype {name!r}")
        return _DTYPES[name]

    def shape(self, value: Any, key: str) -> tuple[int, ...]:
        ok = isinstance(value, list) and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value
        )
        if not ok:
            raise self.error(key, f"bad shape {value!r}")
        return tuple(value)

    def tensor(
        self, name: str, key: str, dtype: torch.dtype | tuple, shape: tuple | None
    ) -> Tensor:
        """The file tensor ``name``, checked against the dtype(s) and shape the header implies."""
        if name not in self.tensors:
            raise self.error(key, f"tensor {name!r} is missing from the file")
        t = self.tensors[name]
        dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in dtypes:
            raise self.error(key, f"tensor {name!r} has dtype {t.dtype}, expected {dtypes[0]}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise self.error(
                key, f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
            )
        self.used.add(name)
        return t


def _tuple(kinds: type | tuple) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


@dataclass
class _Decoded:
    values: dict[str, Tensor]  # state_dict key -> new value (aliases included)
    buffers: list[tuple[str, str, Tensor]]  # (module path, buffer name, value)


def _decode_fields(r: _Reader, wkey: str, entry: dict, prefix: str) -> dict[str, Tensor]:
    records = r.get(entry, "fields", dict, wkey)
    out = {}
    for name, record in records.items():
        key = f"{wkey}/{name}"
        if not _FIELD_NAME.fullmatch(name) or name == _LUT:
            raise r.error(key, f"bad _COREML_ field name {name!r}")
        dtype = r.dtype(r.get(record, "dtype", str, key), key)
        shape = r.shape(r.get(record, "shape", list, key), key)
        if record.get("tensor") is True:
            out[name] = r.tensor(f"{prefix}field/{name}", key, dtype, shape)
            continue
        values = r.get(record, "values", (list, int, float, bool), key)
        try:
            value = torch.tensor(values, dtype=dtype)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise r.error(key, f"bad field values ({err})") from err
        if tuple(value.shape) != shape:
            raise r.error(key, f"field values have shape {tuple(value.shape)}, expected {shape}")
        out[name] = value
    return out


def _decode_weight(r: _Reader, wkey: str, entry: Any, target: Tensor) -> tuple[Tensor, dict]:
    """One palettized weight -> (dense weight, ``_COREML_`` fields), fully checked."""
    if not isinstance(entry, dict):
        raise r.error(wkey, "the palettized entry is not an object")
    shape = r.shape(r.get(entry, "shape", list, wkey), wkey)
    dtype = r.dtype(r.get(entry, "dtype", str, wkey), wkey)
    if shape != tuple(target.shape):
        raise r.error(wkey, f"shape {shape} in the file, {tuple(target.shape)} in the model")
    if dtype != target.dtype:
        raise r.error(
            wkey,
            f"dtype {dtype} in the file, {target.dtype} in the model; cast the model with "
            f"model.to({dtype}) first",
        )
    prefix = f"{_PALETTE}{wkey}/"
    fields = _decode_fields(r, wkey, entry, prefix)
    lut_record = r.get(entry, "lut", dict, wkey)
    lut_dtype = r.dtype(r.get(lut_record, "dtype", str, wkey), wkey)
    lut_shape = r.shape(r.get(lut_record, "shape", list, wkey), wkey)
    storage = r.get(lut_record, "storage", str, wkey)
    vector_axis = fields.get(_VECTOR_AXIS)
    try:
        if not lut_dtype.is_floating_point:
            raise ValueError(f"lut dtype {lut_dtype} is not a float")
        if vector_axis is not None and vector_axis.numel() != 1:
            raise ValueError("vector_axis must be a scalar")
        axis = None if vector_axis is None else int(vector_axis)
        layout, n_bits = _layout_from_lut("layout", shape, lut_shape, axis)
    except ValueError as err:
        raise r.error(wkey, str(err)) from err
    if entry.get("layout") != _layout_dict(layout) or entry.get("n_bits") != n_bits:
        raise r.error(
            wkey,
            f"header layout {entry.get('layout')!r} / n_bits {entry.get('n_bits')!r} disagrees "
            f"with its lut shape {lut_shape} ({_layout_dict(layout)}, n_bits {n_bits})",
        )
    if storage == "codes":
        zero_point = fields.get(_ZERO_POINT)
        qscale = fields.get(_QSCALE)
        if qscale is None or not qscale.dtype.is_floating_point:
            raise r.error(wkey, "a quantized lut needs a float quantization_scale field")
        codes = r.tensor(f"{prefix}lut", wkey, torch.int8 if zero_point is None else torch.uint8,
                         lut_shape)  # fmt: skip
        try:
            lut = _lut_from_codes(codes, qscale, zero_point, lut_dtype)
        except RuntimeError as err:
            raise r.error(wkey, f"quantization fields do not fit the lut ({err})") from err
        if tuple(lut.shape) != lut_shape:
            raise r.error(wkey, f"quantization fields do not fit the lut shape {lut_shape}")
        patches = r.get(lut_record, "patches", int, wkey)
        index, value = _read_sparse(r, f"{prefix}lut_patch", wkey, patches, lut_dtype, lut.numel())
        lut.view(-1)[index] = value
    else:
        stored = r.dtype(storage, wkey)
        if stored not in (lut_dtype, dtype) or not stored.is_floating_point:
            raise r.error(wkey, f"lut storage {storage!r} is neither {lut_dtype} nor {dtype}")
        lut = r.tensor(f"{prefix}lut", wkey, stored, lut_shape).to(lut_dtype)
    scale = fields.get(_SCALE)
    want = (shape[0],) + (1,) * (len(shape) - 1)
    if scale is not None and (tuple(scale.shape) != want or not scale.dtype.is_floating_point):
        raise r.error(wkey, f"palettization_scale must be a float tensor of shape {want}")

    numel = layout.num_groups * layout.vectors_per_group
    packed = r.tensor(f"{prefix}indices", wkey, torch.uint8, (-(-numel * n_bits // 8),))
    indices = unpack_indices(packed, n_bits, numel).view(layout.num_groups, -1)
    weight = _dequantize(layout, n_bits, lut, indices, scale, dtype)

    n_out = r.get(entry, "outliers", int, wkey)
    index, value = _read_sparse(r, f"{prefix}outlier", wkey, n_out, dtype, weight.numel())
    weight.view(-1)[index] = value
    return weight, {**fields, _LUT: lut}


def _read_sparse(
    r: _Reader, name: str, key: str, count: int, dtype: torch.dtype, size: int
) -> tuple[Tensor, Tensor]:
    """``count`` (flat index, value) pairs from ``<name>_index`` / ``<name>_value``, checked to
    lie inside a tensor of ``size`` elements."""
    if count < 0:
        raise r.error(key, f"bad count {count} of {name!r} entries")
    if count == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=dtype)
    index = r.tensor(f"{name}_index", key, (torch.int32, torch.int64), (count,)).long()
    value = r.tensor(f"{name}_value", key, dtype, (count,))
    lo, hi = (int(v) for v in torch.aminmax(index))
    if lo < 0 or hi >= size:
        raise r.error(key, f"{name}_index {lo if lo < 0 else hi} is outside 0..{size - 1}")
    return index, value


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _decode(r: _Reader, model: nn.Module) -> _Decoded:
    header = r.header
    raw = r.get(header, "tensors", list, "tensors")
    aliases = r.get(header, "aliases", dict, "aliases")
    entries = r.get(header, "palettized", dict, "palettized")
    if not all(isinstance(k, str) for k in raw) or len(set(raw)) != len(raw):
        raise r.error("tensors", "the tensor list is malformed")
    if not all(isinstance(v, str) for v in aliases.values()):
        raise r.error("aliases", "the alias table is malformed")

    target = model.state_dict(keep_vars=True)
    expected = [k for k in target if not _is_coreml_key(k)]
    in_file = [k for k in raw if not _is_coreml_key(k)] + list(entries) + list(aliases)
    dupes = {k for k in in_file if in_file.count(k) > 1}
    if dupes:
        raise r.error(sorted(dupes)[0], "the key is stored more than once")
    missing = [k for k in expected if k not in set(in_file)]
    extra = [k for k in in_file if k not in target or _is_coreml_key(k)]
    if missing:
        raise r.error(
            missing[0],
            f"the model expects {len(missing)} tensor(s) the file lacks ({missing[:5]}); the "
            "file was saved from a different model",
        )
    if extra:
        raise r.error(
            extra[0],
            f"the file holds {len(extra)} tensor(s) the model lacks ({extra[:5]}); the file was "
            "saved from a different model",
        )

    values: dict[str, Tensor] = {}
    buffers: list[tuple[str, str, Tensor]] = []
    for wkey, entry in entries.items():
        module_path = r.get(entry, "module", str, wkey)
        param = r.get(entry, "param", str, wkey)
        if _join(module_path, param) != wkey or not isinstance(target[wkey], Tensor):
            raise r.error(wkey, f"module {module_path!r} / param {param!r} do not name this key")
        if _module_at(model, module_path) is None:
            raise r.error(wkey, f"the model has no module {module_path!r}")
        weight, fields = _decode_weight(r, wkey, entry, target[wkey])
        values[wkey] = weight
        device = target[wkey].device
        for name, value in fields.items():
            buffers.append((module_path, f"{COREML_PREFIX}/{param}/{name}", value.to(device)))
    for key in raw:
        value = r.tensor(_RAW + key, key, tuple(_DTYPES.values()), None)
        if _is_coreml_key(key):
            module_path, name = _split_coreml_key(key)
            if _module_at(model, module_path) is None:
                raise r.error(key, f"the model has no module {module_path!r}")
            buffers.append((module_path, name, value))
            continue
        _check_like(r, key, value, target[key])
        values[key] = value
    for key, source in aliases.items():
        if source not in values:
            raise r.error(key, f"aliases {source!r}, which the file does not hold")
        _check_like(r, key, values[source], target[key])
        values[key] = values[source]
    unused = sorted(set(r.tensors) - r.used)
    if unused:
        raise r.error(unused[0], f"the file holds {len(unused)} tensor(s) its header does not list")
    return _Decoded(values, buffers)


def _check_like(r: _Reader, key: str, value: Tensor, target: Tensor) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise r.error(
            key, f"shape {tuple(value.shape)} in the file, {tuple(target.shape)} in the model"
        )
    if value.dtype != target.dtype:
        raise r.error(
            key,
            f"dtype {value.dtype} in the file, {target.dtype} in the model; cast the model to "
            "the saved dtype first",
        )


def load_palettized(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Restore a file written by :func:`save_palettized` into a freshly built model.

    Weights come back bit-identical, together with the ``_COREML_`` buffers (so the model
    converts to Core ML again, see :func:`export_coreml`). Everything is read and checked
    before the model is touched: on any error the model is unchanged. Nothing is unpickled;
    the file is safetensors tensors plus a JSON header.

    Args:
        path: a file written by :func:`save_palettized`.
        model: a model of the same architecture, dtypes and (any) device; its existing
            ``_COREML_`` buffers are replaced by the file's.

    Returns:
        ``model`` itself, loaded in place.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: naming the file and the key for a corrupt or truncated file, a file of
            another format or version, and a file that does not fit the model (missing or
            extra keys, shape or dtype mismatch).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"load_palettized: model must be a torch.nn.Module, got {type(model).__name__}."
        )
    reader = _Reader(path, "load_palettized")
    decoded = _decode(reader, model)
    target = model.state_dict(keep_vars=True)
    with torch.no_grad():
        strip_coreml_metadata(model)
        for key, value in decoded.values.items():
            target[key].copy_(value)
        for module_path, name, value in decoded.buffers:
            _module_at(model, module_path).register_buffer(name, value)
    return model


def read_palettized_metadata(path: str | os.PathLike) -> dict:
    """The ``metadata`` dict given to :func:`save_palettized` (``{}`` if none).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file for a corrupt file or one of another format.
    """
    reader = _Reader(path, "read_palettized_metadata")
    metadata = reader.header.get("metadata", {})
    if not isinstance(metadata, dict):
        raise reader.error("metadata", "the metadata is not an object")
    return metadata


# ----------------------------------------------------------------------------- Core ML


def _import_coremltools() -> Any:
    try:
        import coremltools
    except ImportError as err:
        raise ImportError(
            "export_coreml needs coremltools, an optional extra: "
            "pip install 'lightning-palettize[coreml]'"
        ) from err
    return coremltools


@dataclass
class _CoreMLWeight:
    shape: tuple[int, ...]
    needs_ios18: list[str]
    quantized_vectors: bool
    n_bits: int | None  # None for a malformed LUT, which _fit_palette reports
    fields: _Fields


def _coreml_weights(model: nn.Module) -> dict[str, _CoreMLWeight]:
    state = model.state_dict()
    out = {}
    tied = set()
    for wkey, fields in _palettized_fields(state).items():
        ident = _storage_id(state[wkey])
        if ident in tied:
            continue  # a tied weight is one constant, so one LUT op
        tied.add(ident)
        t = fields.tensors
        weight, lut = state[wkey], t[_LUT]
        reasons = []
        types = t.get("compression_type")
        if types is not None and types.reshape(-1).tolist() != [2]:
            reasons.append(f"compression_type {types.reshape(-1).tolist()}")
        blocks = tuple(lut.shape[: weight.dim()])
        if any(b != 1 for b in blocks):
            reasons.append(f"grouped LUT {blocks}")
        vector = lut.dim() == weight.dim() + 2 and lut.shape[-1] > 1
        if vector:
            reasons.append(f"vectors of {lut.shape[-1]}")
        if _SCALE in t:
            reasons.append("per-channel scale")
        # lut is [blocks per axis..., 2**n_bits, vector length] (the last dim may be absent)
        entries = int(lut.shape[weight.dim()]) if lut.dim() > weight.dim() else 0
        n_bits = entries.bit_length() - 1 if entries > 1 and entries & (entries - 1) == 0 else None
        out[wkey] = _CoreMLWeight(
            tuple(weight.shape), reasons, vector and _QSCALE in t, n_bits, fields
        )
    return out


def _check_index_widths(weights: Mapping[str, _CoreMLWeight], ios18: bool, target: str) -> None:
    """Raise, naming the weights, when Core ML's LUT op cannot take their index width."""
    allowed = _COREML_BITS_IOS18 if ios18 else _COREML_BITS_IOS16
    bad: dict[int, list[str]] = {}
    for wkey, info in weights.items():
        if info.n_bits is not None and info.n_bits not in allowed:
            bad.setdefault(info.n_bits, []).append(wkey)
    if not bad:
        return
    listed = "; ".join(f"{sorted(w)} use {n} bits" for n, w in sorted(bad.items()))
    widths = ", ".join(map(str, sorted(allowed)))
    hint = (
        " (iOS18 adds 3 bits: use ct.target.iOS18)"
        if not ios18 and all(n in _COREML_BITS_IOS18 for n in bad)
        else "; re-palettize them with one of these n_bits (save_palettized stores any 1..8)"
    )
    raise ValueError(
        f"export_coreml: Core ML's {_COREML_LUT_OP} at minimum_deployment_target={target} takes "
        f"{widths}-bit indices only, but {listed}{hint}."
    )


def _check_outliers(
    weights: Mapping[str, _CoreMLWeight], state: Mapping[str, Tensor], allow: bool
) -> None:
    """Raise (or warn, if ``allow``) naming the weights whose LUT does not reproduce them.

    An element counts when it differs from what its palette gives by more than the weight
    dtype's rounding (a few ulps; -0.0 against 0.0 does not count), as SKM's outliers do.
    """
    lossy: dict[str, tuple[int, int, float]] = {}
    for wkey, info in weights.items():
        try:
            fit = _fit_palette("export_coreml", wkey, state[wkey], info.fields)
        except ValueError as err:  # a layout save_palettized lacks; coremltools may know it
            warnings.warn(
                f"{err} Its outliers cannot be checked; coremltools converts it as its "
                f"{COREML_PREFIX} buffers say.",
                stacklevel=3,
            )
            continue
        if not fit.outlier_index.numel():
            continue
        flat = fit.weight.reshape(-1)
        want = flat[fit.outlier_index].float()
        got = fit.outlier_rebuilt.float()
        rtol = _COREML_RTOL_ULPS * torch.finfo(fit.weight.dtype).eps
        close = (want - got).abs() <= rtol * torch.maximum(want.abs(), got.abs())
        far = ~close  # NaN and inf mismatches count too
        count = int(far.sum())
        if count:
            worst = (want - got)[far].abs().nan_to_num(nan=float("inf")).max()
            scale = flat.float().abs().nan_to_num(nan=0.0, posinf=0.0).max().clamp_min(1e-30)
            lossy[wkey] = (count, flat.numel(), float(worst / scale))
    if not lossy:
        return
    listed = ", ".join(
        f"{w!r} ({c} of {n} elements, off by up to {r:.1%} of max|w|)"
        for w, (c, n, r) in lossy.items()
    )
    problem = (
        f"export_coreml: {len(lossy)} palettized weight(s) hold elements their LUT does not "
        f"reproduce: {listed}. "
        f"These outliers (e.g. SKM's outlier_fraction > 0, or weights changed after "
        f"palettization) are not representable in Core ML's {_COREML_LUT_OP}: coremltools "
        "would silently replace each with its nearest LUT entry."
    )
    if allow:
        warnings.warn(f"{problem} Converting anyway (allow_outliers=True).", stacklevel=3)
        return
    raise ValueError(
        f"{problem} Re-run SKM with outlier_fraction=0 for a Core ML model, keep the outliers "
        "with save_palettized (stored sparsely, restored exactly), or pass "
        "allow_outliers=True to accept the lossy conversion."
    )


@contextlib.contextmanager
def _modes_restored(model: nn.Module) -> Iterator[None]:
    """Put back every submodule's own train/eval mode afterwards, on error too."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _mil_ops(block: Any) -> Iterator[Any]:
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _mil_ops(inner)


def _mil_names(wkey: str) -> list[str]:
    """Names coremltools' torch frontend gives the constant of ``wkey`` ("0.weight" ->
    "op_0_weight"); lowering passes append suffixes such as ``_cast_fp16``."""
    base = re.sub(r"[^0-9A-Za-z_]", "_", wkey)
    return [base, f"op_{base}"]


def _match_lut_ops(ops: Sequence[Any], weights: Mapping[str, _CoreMLWeight]) -> list[str]:
    """Palettized weights that no ``constexpr_lut_to_dense`` op produces (by name, then shape)."""
    unmatched = list(ops)
    found: set[str] = set()
    # longest names first: "a_b_weight" claims its op before a shorter name can prefix-match it
    for wkey in sorted(weights, key=len, reverse=True):
        shape = weights[wkey].shape
        for op in unmatched:
            name = op.outputs[0].name
            named = any(name == n or name.startswith(f"{n}_") for n in _mil_names(wkey))
            if named and tuple(op.outputs[0].shape) == shape:
                unmatched.remove(op)
                found.add(wkey)
                break
    for wkey, info in weights.items():  # renamed by some pass: fall back to the shape
        if wkey in found:
            continue
        for op in unmatched:
            if tuple(op.outputs[0].shape) == info.shape:
                unmatched.remove(op)
                found.add(wkey)
                break
    return [w for w in weights if w not in found]


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    # eval + no_grad would trace MultiheadAttention's fused kernel, which coremltools lacks
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def export_coreml(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | os.PathLike | None = None,
    *,
    minimum_deployment_target: Any = None,
    convert_kwargs: dict | None = None,
    allow_outliers: bool = False,
) -> Any:
    """Convert a palettized model to a Core ML ML program with LUT-compressed weights.

    Before converting, every palettized weight is checked against what Core ML can express:
    its index width (``n_bits``) and whether its LUT reproduces it. Then the model is traced
    with ``torch.jit.trace`` (eval mode, no grad; each submodule's own train/eval mode is
    restored afterwards, on error too) and converted with
    ``coremltools.convert(..., convert_to="mlprogram")``, which turns each weight's
    ``_COREML_`` buffers into a ``constexpr_lut_to_dense`` op. The result is then checked:
    every palettized weight must have become such an op.

    Args:
        model: a palettized model (after a palettizer, or :func:`load_palettized`).
        example_inputs: a tensor or a tuple of tensors for ``model(*example_inputs)``; their
            shapes become the Core ML input shapes unless ``convert_kwargs`` gives ``inputs``.
        path: optional ``*.mlpackage`` destination.
        minimum_deployment_target: a ``coremltools.target``; default ``iOS18``, needed for
            grouped LUTs, vectors, per-channel scales, quantized LUTs and 3-bit indices.
            ``iOS16`` / ``iOS17`` work for per-tensor scalar LUTs of 1, 2, 4, 6 or 8 bits only;
            older targets would silently drop the LUTs. No target takes 5- or 7-bit palettes
            (valid in torch and in :func:`save_palettized`, but not in Core ML).
        convert_kwargs: extra ``coremltools.convert`` arguments (``inputs``, ``outputs``,
            ``compute_precision``, ``pass_pipeline``, ``skip_model_load``...).
            ``skip_model_load`` defaults to True off macOS, where models cannot be loaded.
        allow_outliers: weight elements the LUT does not reproduce (SKM's outliers with
            ``outlier_fraction > 0``, or weights edited after palettization) cannot be
            expressed by ``constexpr_lut_to_dense``: coremltools replaces each with its
            nearest LUT entry. By default that is an error; True converts anyway, with a
            warning naming the weights.

    Returns:
        The ``coremltools.models.MLModel``.

    Raises:
        ImportError: without coremltools (``pip install 'lightning-palettize[coreml]'``).
        ValueError: for a model without palettized weights, a deployment target or index
            width (5 or 7 bits; 3 bits before iOS18) that Core ML cannot express (naming the
            weights), weights with outliers (named; see ``allow_outliers``), a bad ``path`` or
            ``convert_kwargs``, or a conversion in which some palettized weights (named) did
            not become ``constexpr_lut_to_dense`` ops. The model's modes are unchanged.

    Example:
        >>> import torch
        >>> from lightning_palettize import PostTrainingPalettizer
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU())
        >>> small = PostTrainingPalettizer(model, {"global_config": {"n_bits": 4}}).compress(
        ...     progress=False)
        >>> mlmodel = export_coreml(small, torch.randn(1, 64))  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"export_coreml: model must be a torch.nn.Module, got {type(model).__name__}."
        )
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError("export_coreml: example_inputs must be a tensor or a tuple of tensors.")
    if path is not None and not os.fspath(path).endswith(".mlpackage"):
        raise ValueError(f"export_coreml: path={os.fspath(path)!r} must end with '.mlpackage'.")
    kwargs = dict(convert_kwargs or {})
    reserved = sorted({"convert_to", "minimum_deployment_target", "model"} & set(kwargs))
    if reserved:
        raise ValueError(
            f"export_coreml: convert_kwargs may not set {reserved}; use the function's own "
            "arguments (ML program output is required for LUT ops)."
        )
    weights = _coreml_weights(model)
    if not weights:
        raise ValueError(
            "export_coreml: the model has no palettized weights (no _COREML_/<param>/lut "
            "buffers); palettize it first, and do not strip its Core ML metadata."
        )
    ct = _import_coremltools()
    target = ct.target.iOS18 if minimum_deployment_target is None else minimum_deployment_target
    target_name = getattr(target, "name", target)
    if target < ct.target.iOS16:
        raise ValueError(
            f"export_coreml: minimum_deployment_target={target_name} is older than iOS16, where "
            "coremltools silently drops the LUTs; use ct.target.iOS18 (or iOS16 for per-tensor "
            "LUTs)."
        )
    if target < ct.target.iOS18:
        needy = {w: i.needs_ios18 for w, i in weights.items() if i.needs_ios18}
        if needy:
            raise ValueError(
                f"export_coreml: minimum_deployment_target={target_name} supports per-tensor "
                f"scalar LUTs only, but {sorted(needy)} need iOS18 ({needy}); use ct.target.iOS18."
            )
    _check_index_widths(weights, target >= ct.target.iOS18, target_name)
    _check_outliers(weights, model.state_dict(), allow_outliers)
    if "inputs" not in kwargs:
        kwargs["inputs"] = [
            ct.TensorType(shape=tuple(t.shape), dtype=_coreml_dtype(t)) for t in inputs
        ]
    kwargs.setdefault("skip_model_load", sys.platform != "darwin")
    if "pass_pipeline" not in kwargs and any(i.quantized_vectors for i in weights.values()):
        # coremltools 9.0's canonicalize_quantized_lut_pattern drops vector_axis
        pipeline = ct.PassPipeline.DEFAULT
        pipeline.remove_passes([_QUANTIZED_LUT_PASS])
        kwargs["pass_pipeline"] = pipeline

    with _modes_restored(model), torch.no_grad(), _mha_fastpath_off():
        model.eval()
        traced = torch.jit.trace(model, inputs)
    mlmodel = ct.convert(traced, convert_to="mlprogram", minimum_deployment_target=target, **kwargs)
    ops = [op for op in _mil_ops(mlmodel._mil_program.functions["main"])
           if op.op_type == _COREML_LUT_OP]  # fmt: skip
    missing = _match_lut_ops(ops, weights)
    if missing:
        raise ValueError(
            f"export_coreml: {len(missing)} palettized weight(s) did not become "
            f"{_COREML_LUT_OP} ops: {missing} ({len(ops)} such ops for {len(weights)} weights). "
            "Is the weight used in forward, and does pass_pipeline keep the LUTs?"
        )
    if path is not None:
        mlmodel.save(os.fspath(path))
    return mlmodel


def _coreml_dtype(t: Tensor) -> Any:
    import numpy as np

    if t.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        return np.int32  # ML programs have no int64 inputs
    if t.dtype == torch.bool:
        return np.bool_
    if t.dtype == torch.float16:
        return np.float16
    return np.float32
