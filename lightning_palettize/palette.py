"""The Palette value: a weight stored as LUT groups of centroids plus n-bit indices.

A dense weight of ``Layout.shape`` is cut into LUT groups along ``channel_axis`` (one group for
``per_tensor``, ``C_a / group_size`` groups of consecutive channels for
``per_grouped_channel``). Inside a group a *vector* is ``cluster_dim`` consecutive channels
along the axis at one position of the other dims, which is Core ML's ``vector_axis``
convention. ``Layout.to_groups`` gives the ``[G, N, d]`` view every k-means kernel works on and
``Layout.from_groups`` puts it back.

A ``Palette`` holds the result: ``lut[G, 2**n_bits, d]`` (effective, already dequantized
centroids in the scaled domain), ``indices[G, N]`` and an optional per-output-channel
``scale``, so that ``weight = scale * lut[g, indices[g, n]]``. It knows how to dequantize
itself (chunked, optionally in place), pack its indices, count its exact compact bytes and emit
the ``_COREML_`` fields that ``coremltools.convert`` reads.

Example:
    >>> import torch
    >>> layout = Layout((8, 4), "per_grouped_channel", group_size=4)
    >>> lut = torch.linspace(-1, 1, 4).repeat(2, 1).unsqueeze(-1)
    >>> palette = Palette(layout, 2, lut, torch.randint(0, 4, (2, 16), dtype=torch.uint8))
    >>> palette.dequantize().shape
    torch.Size([8, 4])
    >>> palette.nbytes()  # 8 index bytes + 2 LUTs of 4 float32 entries
    40
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lightning_palettize import _kmeans1d

# weight dtypes write_into handles in one compiled pass (the kernel's dtype codes)
_ONE_PASS_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

__all__ = [
    "Layout",
    "Palette",
    "channel_scale",
    "pack_indices",
    "quantize_lut",
    "unpack_indices",
]

_GRANULARITIES = ("per_tensor", "per_grouped_channel")
_LUT_QDTYPES = (torch.int8, torch.uint8)
_QMAX = 127  # LINEAR_SYMMETRIC 8-bit: int8 [-127, 127], uint8 [0, 254] with zero point 127
# Elements gathered per step by dequantize/relative_error: chunk temporaries stay ~16 MB each.
_CHUNK = 1 << 16
_COMPRESSION_PALETTIZATION = 2
_COMPRESSION_QUANTIZATION = 3


@dataclass(frozen=True)
class Layout:
    """How a dense weight of ``shape`` is split into LUT groups of vectors.

    Args:
        shape: the dense weight's shape (a 1-D weight such as ``LayerNorm.weight`` is fine).
        granularity: ``"per_tensor"`` (one LUT) or ``"per_grouped_channel"`` (one LUT per
            ``group_size`` consecutive channels along ``channel_axis``).
        group_size: channels per group; required for ``per_grouped_channel``, None otherwise.
        channel_axis: 0 or 1; the axis that groups and vectors run along.
        cluster_dim: vector length ``d``; a vector is ``d`` consecutive channels along
            ``channel_axis`` at one position of the other dims.

    Raises:
        ValueError: on a malformed field (granularity, group_size presence, axis, sizes).
            Shape-dependent divisibility is checked by :meth:`validate`.
    """

    shape: tuple[int, ...]
    granularity: str = "per_tensor"
    group_size: int | None = None
    channel_axis: int = 0
    cluster_dim: int = 1

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"Layout: shape={shape} has a negative dimension.")
        object.__setattr__(self, "shape", shape)
        if self.granularity not in _GRANULARITIES:
            raise ValueError(
                f"Layout: granularity={self.granularity!r} is not one of {_GRANULARITIES}."
            )
        if self.granularity == "per_grouped_channel":
            if self.group_size is None or int(self.group_size) < 1:
                raise ValueError(
                    f"Layout: granularity='per_grouped_channel' needs a positive group_size, "
                    f"got group_size={self.group_size!r}."
                )
            object.__setattr__(self, "group_size", int(self.group_size))
        elif self.group_size is not None:
            raise ValueError(
                f"Layout: group_size={self.group_size!r} is only valid with "
                "granularity='per_grouped_channel'; use group_size=None for 'per_tensor'."
            )
        if self.channel_axis not in (0, 1):
            raise ValueError(f"Layout: channel_axis={self.channel_axis!r} must be 0 or 1.")
        if int(self.cluster_dim) < 1:
            raise ValueError(f"Layout: cluster_dim={self.cluster_dim!r} must be >= 1.")
        object.__setattr__(self, "cluster_dim", int(self.cluster_dim))

    def validate(self, name: str) -> None:
        """Check that this layout can split a weight of ``shape``.

        Args:
            name: the weight's name, quoted in the error (e.g. ``"encoder.fc1.weight"``).

        Raises:
            ValueError: naming ``name``, the shape, the offending key and value when
                ``channel_axis >= ndim``, a dimension is empty, ``group_size`` exceeds or does
                not divide the axis, or ``cluster_dim`` does not divide the axis or the group.
        """
        where = f"{name} (shape {self.shape})"
        a = self.channel_axis
        if a >= len(self.shape):
            raise ValueError(
                f"{where}: channel_axis={a} is out of range for a {len(self.shape)}-D weight; "
                f"use channel_axis < {len(self.shape)}."
            )
        if 0 in self.shape:
            raise ValueError(f"{where}: cannot palettize a weight with an empty dimension.")
        channels = self.shape[a]
        d = self.cluster_dim
        if self.group_size is not None:
            if self.group_size > channels:
                raise ValueError(
                    f"{where}: group_size={self.group_size} exceeds the {channels} channels "
                    f"along channel_axis={a}; use a divisor of {channels}."
                )
            if channels % self.group_size:
                raise ValueError(
                    f"{where}: group_size={self.group_size} does not divide the {channels} "
                    f"channels along channel_axis={a}; use a divisor of {channels}."
                )
        if channels % d:
            raise ValueError(
                f"{where}: cluster_dim={d} does not divide the {channels} channels along "
                f"channel_axis={a}; use a divisor of {channels}."
            )
        if self.group_size is not None and self.group_size % d:
            raise ValueError(
                f"{where}: cluster_dim={d} does not divide group_size={self.group_size}; "
                "use a cluster_dim that divides the group size."
            )

    @property
    def num_groups(self) -> int:
        """G: the number of LUTs."""
        if self.group_size is None:
            return 1
        return self.shape[self.channel_axis] // self.group_size

    @property
    def group_channels(self) -> int:
        """Channels along ``channel_axis`` in one group."""
        return self.shape[self.channel_axis] // self.num_groups

    @property
    def vectors_per_group(self) -> int:
        """N: vectors (index entries) per group."""
        return self.group_channels // self.cluster_dim * self._rest_numel

    @property
    def indices_shape(self) -> tuple[int, ...]:
        """Core ML's index layout: ``shape`` with ``channel_axis`` divided by ``cluster_dim``."""
        out = list(self.shape)
        out[self.channel_axis] //= self.cluster_dim
        return tuple(out)

    def coreml_lut_shape(self, k: int) -> list[int]:
        """Core ML LUT shape ``[b0, b1, ..., k, d]`` (rank ``len(shape) + 2``).

        ``b_i`` is the number of LUT blocks along axis ``i``: G on ``channel_axis``, 1 elsewhere.
        """
        blocks = [1] * len(self.shape)
        blocks[self.channel_axis] = self.num_groups
        return [*blocks, int(k), self.cluster_dim]

    @property
    def _rest_shape(self) -> tuple[int, ...]:
        return self.shape[: self.channel_axis] + self.shape[self.channel_axis + 1 :]

    @property
    def _rest_numel(self) -> int:
        return math.prod(self._rest_shape)

    @property
    def _num_blocks(self) -> int:
        """Channel blocks (``cluster_dim`` consecutive channels) over all groups: G * C_g / d."""
        return self.shape[self.channel_axis] // self.cluster_dim

    def _block_view(self, t: torch.Tensor) -> torch.Tensor:
        """Always a view of ``t``: ``(blocks, *rest, d)``, whose C order is the [G, N, d] order."""
        a, d = self.channel_axis, self.cluster_dim
        return t.movedim(a, 0).unflatten(0, (self._num_blocks, d)).movedim(1, -1)

    def _check_shape(self, got: tuple[int, ...], want: tuple[int, ...], what: str) -> None:
        self.validate("Layout")
        if tuple(got) != tuple(want):
            raise ValueError(f"Layout.{what}: expected shape {tuple(want)}, got {tuple(got)}.")

    def to_groups(self, w: torch.Tensor) -> torch.Tensor:
        """Split a dense weight into ``[G, N, d]`` LUT groups of vectors.

        Within a group, vectors are ordered by channel block first, then by position in the
        other dims (C order). A view when memory allows (``channel_axis=0, cluster_dim=1``),
        otherwise a contiguous copy.

        Raises:
            ValueError: if ``w.shape != shape`` or the layout does not divide it.
        """
        if self.channel_axis == 0 and self.cluster_dim == 1 and tuple(w.shape) == self.shape:
            # the groups are runs of whole channels in C order: one reshape (a hot path of DKM)
            self.validate("Layout")
            return w.reshape(self.num_groups, -1, 1)
        self._check_shape(w.shape, self.shape, "to_groups")
        return self._block_view(w).reshape(self.num_groups, self.vectors_per_group, -1)

    def from_groups(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_groups`: ``[G, N, d]`` back to a tensor of ``shape``.

        May return a non-contiguous view (``channel_axis=1``); call ``.contiguous()`` if needed.

        Raises:
            ValueError: if ``x.shape != (G, N, d)``.
        """
        g, n, d = self.num_groups, self.vectors_per_group, self.cluster_dim
        if self.channel_axis == 0 and d == 1 and tuple(x.shape) == (g, n, 1):
            self.validate("Layout")
            return x.reshape(self.shape)  # runs of whole channels in C order
        self._check_shape(x.shape, (g, n, d), "from_groups")
        y = x.reshape(self._num_blocks, *self._rest_shape, d).movedim(-1, 1)
        y = y.reshape(self.shape[self.channel_axis], *self._rest_shape)
        return y.movedim(0, self.channel_axis)


def channel_scale(w: torch.Tensor, scheme: str = "abs", axis: int = 0) -> torch.Tensor:
    """Per-channel scale of ``w`` along ``axis``, broadcastable against ``w``.

    Args:
        w: the dense weight (any float dtype, any device).
        scheme: ``"abs"``: max |w| per channel (coremltools PTP); ``"min_max"``:
            (max - min) / 2 per channel (coremltools DKM).
        axis: the channel axis (Core ML's ``palettization_scale`` uses 0).

    Returns:
        float32 tensor of ``w.dim()`` dims, size ``w.shape[axis]`` on ``axis`` and 1 elsewhere,
        e.g. ``(C_0, 1, 1, 1)`` for a Conv2d weight. Zero or non-finite entries are 1.0, so
        dividing by it is always safe.

    Raises:
        ValueError: on an unknown scheme or an axis outside the weight.
    """
    if scheme not in ("abs", "min_max"):
        raise ValueError(f"channel_scale: scheme={scheme!r} must be 'abs' or 'min_max'.")
    if not 0 <= axis < w.dim():
        raise ValueError(f"channel_scale: axis={axis} is out of range for a {w.dim()}-D weight.")
    dims = [i for i in range(w.dim()) if i != axis]
    # max/min are exact in the weight's dtype; only the small result is cast up.
    if scheme == "abs":
        scale = w.abs().amax(dim=dims, keepdim=True).float() if dims else w.abs().float()
    else:
        hi = w.amax(dim=dims, keepdim=True) if dims else w
        lo = w.amin(dim=dims, keepdim=True) if dims else w
        scale = (hi.float() - lo.float()) / 2
    return torch.where(torch.isfinite(scale) & (scale != 0), scale, torch.ones_like(scale))


def quantize_lut(
    lut: torch.Tensor, qdtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize each group's LUT to 8 bits, as coremltools' LINEAR_SYMMETRIC does per block.

    ``scale = max|lut_g| / 127`` (1 for an all-zero group); int8 codes lie in [-127, 127];
    uint8 codes lie in [0, 254] with zero point 127.

    Args:
        lut: ``[G, K, d]`` float centroids.
        qdtype: ``torch.int8`` or ``torch.uint8``.

    Returns:
        ``(dequantized_lut, qscale, zero_point)``: the float32 LUT exactly equal to
        ``q * qscale`` (int8) or ``(q - 127) * qscale`` (uint8), ``qscale`` float32 ``[G, 1, 1]``
        and ``zero_point`` uint8 ``[G, 1, 1]`` (uint8 only, else None).

    Raises:
        ValueError: on a LUT that is not 3-D or an unsupported qdtype.
    """
    if qdtype not in _LUT_QDTYPES:
        raise ValueError(f"quantize_lut: qdtype={qdtype} must be torch.int8 or torch.uint8.")
    if lut.dim() != 3:
        raise ValueError(f"quantize_lut: lut must be [G, K, d], got shape {tuple(lut.shape)}.")
    lut = lut.float()
    peak = lut.abs().amax(dim=(1, 2), keepdim=True)
    # a tensor divisor: CUDA turns a Python-scalar divisor into a multiply by its reciprocal,
    # which is 1 ulp off coremltools' (and the CPU's) correctly rounded max / 127
    scale = peak / torch.full_like(peak, _QMAX)
    scale = torch.where(torch.isfinite(scale) & (scale != 0), scale, torch.ones_like(scale))
    q = torch.round(lut / scale).clamp_(-_QMAX, _QMAX)
    zero_point = None
    if qdtype == torch.uint8:
        zero_point = torch.full_like(scale, _QMAX, dtype=torch.uint8)
    return q * scale, scale, zero_point


def _check_n_bits(n_bits: int, where: str) -> None:
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 1 <= n_bits <= 8:
        raise ValueError(f"{where}: n_bits={n_bits!r} must be an int in 1..8.")


def pack_indices(idx: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Pack integer indices into an n-bit stream.

    Element ``i`` (of ``idx.flatten()``) occupies bits ``[i*n, (i+1)*n)`` of the stream, LSB
    first within little-endian bytes. Eight elements fill exactly ``n`` bytes, so the work is
    done on blocks of 8 elements.

    Args:
        idx: integer tensor of any shape with values in ``[0, 2**n_bits)``.
        n_bits: 1..8.

    Returns:
        1-D uint8 tensor of ``ceil(idx.numel() * n_bits / 8)`` bytes on ``idx``'s device.

    Raises:
        ValueError: on n_bits outside 1..8 or values out of range.
        TypeError: on a non-integer tensor.
    """
    _check_n_bits(n_bits, "pack_indices")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"pack_indices: idx must be an integer tensor, got {idx.dtype}.")
    flat = idx.reshape(-1)
    numel = flat.numel()
    if numel:
        lo, hi = (int(v) for v in torch.aminmax(flat))
        if lo < 0 or hi >= 1 << n_bits:
            raise ValueError(
                f"pack_indices: values must lie in [0, {1 << n_bits}) for n_bits={n_bits}, "
                f"got min {lo}, max {hi}."
            )
    if n_bits == 8:
        return flat.to(torch.uint8, copy=True)
    blocks = -(-numel // 8)
    padded = torch.zeros(blocks * 8, dtype=torch.uint8, device=flat.device)
    padded[:numel] = flat
    padded = padded.view(blocks, 8)
    # 8 elements * n <= 56 bits fit an int64 word without touching the sign bit.
    word = torch.zeros(blocks, dtype=torch.int64, device=flat.device)
    for j in range(8):
        word |= padded[:, j].long() << (j * n_bits)
    out = torch.empty(blocks, n_bits, dtype=torch.uint8, device=flat.device)
    for b in range(n_bits):
        out[:, b] = (word >> (8 * b)) & 0xFF
    return out.view(-1)[: -(-numel * n_bits // 8)]


def unpack_indices(packed: torch.Tensor, n_bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`.

    Args:
        packed: 1-D uint8 tensor of exactly ``ceil(numel * n_bits / 8)`` bytes.
        n_bits: 1..8.
        numel: number of indices to recover.

    Returns:
        1-D uint8 tensor of ``numel`` indices.

    Raises:
        ValueError: on n_bits outside 1..8, a negative numel or a wrong packed length.
        TypeError: if ``packed`` is not uint8.
    """
    _check_n_bits(n_bits, "unpack_indices")
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_indices: packed must be uint8, got {packed.dtype}.")
    if numel < 0:
        raise ValueError(f"unpack_indices: numel={numel} must be >= 0.")
    nbytes = -(-numel * n_bits // 8)
    if packed.dim() != 1 or packed.numel() != nbytes:
        raise ValueError(
            f"unpack_indices: {numel} indices at n_bits={n_bits} need a 1-D tensor of "
            f"{nbytes} bytes, got shape {tuple(packed.shape)}."
        )
    if n_bits == 8:
        return packed.clone()
    blocks = -(-numel // 8)
    padded = torch.zeros(blocks * n_bits, dtype=torch.uint8, device=packed.device)
    padded[:nbytes] = packed
    padded = padded.view(blocks, n_bits)
    word = torch.zeros(blocks, dtype=torch.int64, device=packed.device)
    for b in range(n_bits):
        word |= padded[:, b].long() << (8 * b)
    out = torch.empty(blocks, 8, dtype=torch.uint8, device=packed.device)
    mask = (1 << n_bits) - 1
    for j in range(8):
        out[:, j] = (word >> (j * n_bits)) & mask
    return out.view(-1)[:numel]


@dataclass(eq=False)  # tensors have no single truth value; compare fields explicitly
class Palette:
    """A palettized weight: ``weight = scale * lut[g, indices[g, n]]`` laid out by ``layout``.

    Args:
        layout: how the dense weight maps to ``[G, N, d]`` groups.
        n_bits: index width; the LUT has ``K = 2**n_bits`` entries (unused ones zero).
        lut: float32 ``[G, K, d]`` effective centroids in the scaled domain (already
            dequantized when the LUT is quantized).
        indices: uint8 ``[G, N]``, in :meth:`Layout.to_groups` order; reshaped to
            ``(C_a / d, *other dims)`` and moved back to ``channel_axis`` it is Core ML's
            index layout (:attr:`Layout.indices_shape`).
        scale: optional per-output-channel scale of shape ``(C_0, 1, ...)``.
        lut_qdtype: ``torch.int8`` / ``torch.uint8`` when the LUT is 8-bit quantized.
        lut_qscale: float ``[G, 1, 1]`` LUT quantization scale (with ``lut_qdtype``).
        lut_zero_point: uint8 ``[G, 1, 1]`` zero point (uint8 LUTs only).
        dtype: the original weight dtype (byte accounting, dequantize default).

    Raises:
        ValueError / TypeError: when shapes, dtypes or the quantization fields disagree.
    """

    layout: Layout
    n_bits: int
    lut: torch.Tensor
    indices: torch.Tensor
    scale: torch.Tensor | None = None
    lut_qdtype: torch.dtype | None = None
    lut_qscale: torch.Tensor | None = None
    lut_zero_point: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        layout = self.layout
        layout.validate("Palette.layout")
        _check_n_bits(self.n_bits, "Palette")
        g, n, d, k = layout.num_groups, layout.vectors_per_group, layout.cluster_dim, self.k
        if self.lut.dtype != torch.float32:
            raise TypeError(f"Palette: lut must be float32, got {self.lut.dtype}.")
        if tuple(self.lut.shape) != (g, k, d):
            raise ValueError(
                f"Palette: lut must have shape {(g, k, d)}, got {tuple(self.lut.shape)}."
            )
        if self.indices.dtype != torch.uint8:
            raise TypeError(f"Palette: indices must be uint8, got {self.indices.dtype}.")
        if tuple(self.indices.shape) != (g, n):
            raise ValueError(
                f"Palette: indices must have shape {(g, n)}, got {tuple(self.indices.shape)}."
            )
        if self.indices.device != self.lut.device:
            raise ValueError(
                f"Palette: indices on {self.indices.device} but lut on {self.lut.device}."
            )
        if not self.dtype.is_floating_point:
            raise TypeError(f"Palette: dtype={self.dtype} must be a floating dtype.")
        if self.scale is not None:
            want = (layout.shape[0],) + (1,) * (len(layout.shape) - 1)
            if tuple(self.scale.shape) != want:
                raise ValueError(
                    f"Palette: scale must have shape {want}, got {tuple(self.scale.shape)}."
                )
            if not self.scale.dtype.is_floating_point:
                raise TypeError(f"Palette: scale must be floating, got {self.scale.dtype}.")
            if self.scale.device != self.lut.device:
                raise ValueError(
                    f"Palette: scale on {self.scale.device} but lut on {self.lut.device}."
                )
        self._check_lut_quantization(g)

    def _check_lut_quantization(self, g: int) -> None:
        if self.lut_qdtype is None:
            if self.lut_qscale is not None or self.lut_zero_point is not None:
                raise ValueError("Palette: lut_qscale/lut_zero_point given without lut_qdtype.")
            return
        if self.lut_qdtype not in _LUT_QDTYPES:
            raise ValueError(
                f"Palette: lut_qdtype={self.lut_qdtype} must be torch.int8, torch.uint8 or None."
            )
        if self.lut_qscale is None or tuple(self.lut_qscale.shape) != (g, 1, 1):
            got = None if self.lut_qscale is None else tuple(self.lut_qscale.shape)
            raise ValueError(f"Palette: lut_qscale must have shape {(g, 1, 1)}, got {got}.")
        if self.lut_qdtype == torch.uint8:
            zp = self.lut_zero_point
            if zp is None or tuple(zp.shape) != (g, 1, 1):
                got = None if zp is None else tuple(zp.shape)
                raise ValueError(
                    f"Palette: a uint8 LUT needs lut_zero_point of shape {(g, 1, 1)}, got {got}."
                )
        elif self.lut_zero_point is not None:
            raise ValueError("Palette: lut_zero_point is only valid with lut_qdtype=torch.uint8.")

    @property
    def k(self) -> int:
        """LUT entries per group, ``2**n_bits``."""
        return 1 << self.n_bits

    @torch.no_grad()
    def dequantize(
        self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The dense weight ``scale * lut[indices]`` of ``layout.shape``.

        The product is formed in float32 and rounded once to ``dtype``. Work goes ~``_CHUNK``
        elements at a time straight into a strided view of the result, so besides the result
        nothing weight-sized is allocated (in particular no weight-sized int64 index).

        Args:
            dtype: result dtype (default: ``out.dtype`` if given, else ``self.dtype``).
            out: optional tensor of ``layout.shape`` to write into (e.g. ``weight.data``).

        Returns:
            the dense weight (``out`` itself when given), on the LUT's device.

        Raises:
            ValueError: if ``out`` has the wrong shape or device, or disagrees with ``dtype``.
        """
        layout = self.layout
        if out is None:
            dtype = self.dtype if dtype is None else dtype
            out = torch.empty(layout.shape, dtype=dtype, device=self.lut.device)
        else:
            if tuple(out.shape) != layout.shape or out.device != self.lut.device:
                raise ValueError(
                    f"Palette.dequantize: out must have shape {layout.shape} on "
                    f"{self.lut.device}, got {tuple(out.shape)} on {out.device}."
                )
            if dtype is not None and dtype != out.dtype:
                raise ValueError(
                    f"Palette.dequantize: dtype={dtype} disagrees with out.dtype={out.dtype}."
                )
        target = layout._block_view(out)
        for start, stop, values in self._blocks():
            target[start:stop].copy_(values)
        return out

    @torch.no_grad()
    def write_into(self, out: torch.Tensor) -> float:
        """Overwrite ``out`` (the weight being palettized) with the dense palettized values and
        return ``||before - after||^2 / ||before||^2`` (0 for an all-zero ``before``).

        One chunked pass: the error costs no extra gather, unlike :meth:`relative_error`
        followed by :meth:`dequantize`.

        Raises:
            ValueError: if ``out`` has the wrong shape or device.
        """
        if tuple(out.shape) != self.layout.shape or out.device != self.lut.device:
            raise ValueError(
                f"Palette.write_into: out must have shape {self.layout.shape} on "
                f"{self.lut.device}, got {tuple(out.shape)} on {out.device}."
            )
        if self._one_pass_ok(out):
            kind = _ONE_PASS_KINDS[out.dtype]
            raw = out.detach() if kind == 0 else out.detach().view(torch.int16)
            err, ref = _kmeans1d.write_lut(
                raw.numpy(), self.indices.numpy(), self.lut.numpy(), self.k, kind
            )
            return 0.0 if ref == 0.0 else err / ref
        target = self.layout._block_view(out)
        work = torch.float64 if out.dtype == torch.float64 else torch.float32
        err = torch.zeros((), dtype=torch.float64, device=out.device)
        ref = torch.zeros((), dtype=torch.float64, device=out.device)
        for start, stop, values in self._blocks():
            cur = target[start:stop]
            new = values.to(out.dtype)
            before = cur.to(work).reshape(stop - start, -1)
            diff = before - new.to(work).reshape(stop - start, -1)
            err += torch.linalg.vecdot(diff, diff).sum(dtype=torch.float64)
            ref += torch.linalg.vecdot(before, before).sum(dtype=torch.float64)
            cur.copy_(new)
        ref_value = float(ref)
        return 0.0 if ref_value == 0.0 else float(err) / ref_value

    def _one_pass_ok(self, out: torch.Tensor) -> bool:
        """Whether ``write_into`` can take the compiled one-pass path: a float32 / float16 /
        bfloat16 CPU weight, float32 LUT of scalars, no scale, groups that are row ranges."""
        layout = self.layout
        return (
            out.device.type == "cpu"
            and out.dtype in _ONE_PASS_KINDS
            and out.is_contiguous()
            and self.lut.dtype == torch.float32
            and self.lut.is_contiguous()
            and self.indices.dtype == torch.uint8
            and self.indices.is_contiguous()
            and self.scale is None
            and layout.cluster_dim == 1
            and layout.channel_axis == 0
        )

    def _blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield ``(start, stop, values)`` over ranges of channel blocks, ~``_CHUNK`` at a time.

        ``values`` is float32 ``scale * lut[indices]`` shaped like
        ``layout._block_view(weight)[start:stop]``. Only chunk-sized gather indices are built.
        """
        layout, k = self.layout, self.k
        d, rest = layout.cluster_dim, layout._rest_shape
        blocks, per_group = layout._num_blocks, layout._num_blocks // layout.num_groups
        step = max(1, _CHUNK // (layout._rest_numel * d))
        lut = self.lut.reshape(-1, d)
        indices = self.indices.reshape(blocks, -1)
        scale = None
        if self.scale is not None:
            scale = self.scale.reshape(-1).float()
            if layout.channel_axis == 0:
                # block b holds the axis-0 channels b*d .. b*d + d - 1
                scale = scale.view(blocks, *(1,) * len(rest), d)
            else:
                # axis 0 is the first of the other dims
                scale = scale.view(1, -1, *(1,) * len(rest))
        # int32 gather indices: half the traffic of int64, and casting then add_ is one pass
        row_dtype = torch.int32 if lut.shape[0] < 2**31 else torch.int64
        for start in range(0, blocks, step):
            stop = min(start + step, blocks)
            group_offset = torch.arange(start, stop, device=lut.device) // per_group * k
            rows = indices[start:stop].to(row_dtype).add_(group_offset.to(row_dtype)[:, None])
            values = lut.index_select(0, rows.view(-1)).view(stop - start, *rest, d)
            if scale is not None:
                values.mul_(scale[start:stop] if layout.channel_axis == 0 else scale)
            yield start, stop, values

    def packed_indices(self) -> torch.Tensor:
        """``indices`` packed with :func:`pack_indices`, in the Palette's own ``[G, N]`` order."""
        return pack_indices(self.indices, self.n_bits)

    def nbytes(self) -> int:
        """Exact compact size in bytes: packed indices + LUTs + scale + LUT qparams.

        LUT entries count 1 byte when quantized, else the original dtype's itemsize; the scale
        counts ``C_0`` entries at that itemsize; each quantized LUT adds a 4-byte scale and, for
        uint8, a 1-byte zero point.
        """
        layout, itemsize = self.layout, self.dtype.itemsize
        g, n, d = layout.num_groups, layout.vectors_per_group, layout.cluster_dim
        total = -(-g * n * self.n_bits // 8)
        total += g * self.k * d * (1 if self.lut_qdtype is not None else itemsize)
        if self.scale is not None:
            total += layout.shape[0] * itemsize
        if self.lut_qdtype is not None:
            total += g * (4 + (1 if self.lut_zero_point is not None else 0))
        return total

    def dense_nbytes(self) -> int:
        """Bytes of the dense weight at ``dtype``."""
        return math.prod(self.layout.shape) * self.dtype.itemsize

    def coreml_metadata(self) -> dict[str, torch.Tensor]:
        """The per-parameter fields ``coremltools.convert`` reads, without the prefix.

        Register each as a buffer ``f"_COREML_/{param_name}/{field}"`` on the module that owns
        the parameter (and ``_COREML_/metadata_version = tensor(1)`` on the root).

        For a quantized LUT, ``lut`` holds the *dequantized* float centroids, as coremltools
        writes them: the converter recomputes the integer codes as
        ``round(lut / quantization_scale) + zero_point``, so ``quantization_scale`` and
        ``zero_point`` are rank-matched to the LUT (``[b0, ..., 1, 1]``).

        coremltools 9.0 caveat: its ``canonicalize_quantized_lut_pattern`` pass drops
        ``vector_axis``, so a quantized LUT with ``cluster_dim > 1`` converts only with that pass
        removed from the ``pass_pipeline``.

        Returns:
            ``compression_type`` (int64 ``[2]`` or ``[2, 3]``), ``lut`` (float32,
            :meth:`Layout.coreml_lut_shape`), and when present ``palettization_scale``
            (float32 ``(C_0, 1, ...)``), ``vector_axis`` (int64 scalar, d > 1),
            ``quantization_n_bits`` (int64 8), ``quantization_scale`` (float32),
            ``zero_point`` (uint8).

        Raises:
            ValueError: for a per-channel scale together with a quantized LUT, which the
                coremltools converter rejects ("Unsupported joint compression combination").
        """
        layout, device = self.layout, self.lut.device
        if self.scale is not None and self.lut_qdtype is not None:
            raise ValueError(
                "Palette.coreml_metadata: Core ML conversion cannot combine a per-channel scale "
                f"with a quantized LUT (lut_qdtype={self.lut_qdtype}); drop one of the two."
            )
        lut_shape = layout.coreml_lut_shape(self.k)
        types = [_COMPRESSION_PALETTIZATION]
        meta = {"lut": self.lut.reshape(lut_shape).clone()}
        if self.scale is not None:
            meta["palettization_scale"] = self.scale.float().clone()
        if layout.cluster_dim > 1:
            meta["vector_axis"] = torch.tensor(layout.channel_axis, device=device)
        if self.lut_qdtype is not None:
            types.append(_COMPRESSION_QUANTIZATION)
            qparam_shape = [*lut_shape[:-2], 1, 1]
            meta["quantization_n_bits"] = torch.tensor(8, device=device)
            meta["quantization_scale"] = self.lut_qscale.float().reshape(qparam_shape).clone()
            if self.lut_zero_point is not None:
                zp = self.lut_zero_point.to(torch.uint8).reshape(qparam_shape).clone()
                meta["zero_point"] = zp
        meta["compression_type"] = torch.tensor(types, dtype=torch.int64, device=device)
        return meta

    @torch.no_grad()
    def relative_error(self, w: torch.Tensor) -> float:
        """``||w - dequantize()||^2 / ||w||^2`` (0 if ``w`` is all zero).

        Chunkwise, without a dense copy: differences and per-channel-block sums of squares in
        float32 (float64 for float64 weights), the sum over blocks in float64.

        Raises:
            ValueError: if ``w.shape != layout.shape``.
        """
        if tuple(w.shape) != self.layout.shape:
            raise ValueError(
                f"Palette.relative_error: expected shape {self.layout.shape}, got {tuple(w.shape)}."
            )
        w = self.layout._block_view(w.detach())
        work = torch.float64 if w.dtype == torch.float64 else torch.float32
        err = torch.zeros((), dtype=torch.float64, device=self.lut.device)
        ref = torch.zeros((), dtype=torch.float64, device=self.lut.device)
        for start, stop, values in self._blocks():
            wc = w[start:stop].to(self.lut.device, work)
            # compare with what dequantize() writes: rounded to the palette's dtype
            diff = (wc - values.to(self.dtype).to(work)).reshape(stop - start, -1)
            wc = wc.reshape(stop - start, -1)
            # per-block partial sums stay in `work`; blocks are summed in float64
            err += torch.linalg.vecdot(diff, diff).sum(dtype=torch.float64)
            ref += torch.linalg.vecdot(wc, wc).sum(dtype=torch.float64)
        ref_value = float(ref)
        return 0.0 if ref_value == 0.0 else float(err) / ref_value

    def num_unique_per_group(self) -> torch.Tensor:
        """int64 ``[G]``: how many distinct indices each group uses."""
        g = self.layout.num_groups
        used = torch.zeros(g, self.k, dtype=torch.bool, device=self.indices.device)
        used.scatter_(1, self.indices.long(), True)
        return used.sum(dim=1)
