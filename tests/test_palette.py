import itertools
import math

import pytest
import torch

import lightning_palettize.palette as palette_mod
from lightning_palettize.palette import (
    Layout,
    Palette,
    channel_scale,
    pack_indices,
    quantize_lut,
    unpack_indices,
)

SHAPES = {
    "linear": (32, 16),
    "conv1d": (16, 8, 3),
    "conv2d": (16, 8, 3, 3),
    "conv3d": (8, 16, 3, 2, 2),
    "conv_transpose2d": (8, 16, 3, 3),  # (in, out, kH, kW): the output channels sit on axis 1
}


def _layouts():
    for (kind, shape), axis, grouped, d in itertools.product(
        SHAPES.items(), (0, 1), (False, True), (1, 2, 4)
    ):
        if grouped:
            yield kind, Layout(shape, "per_grouped_channel", 4, axis, d)
        else:
            yield kind, Layout(shape, "per_tensor", None, axis, d)
    for d in (1, 2):
        yield "layernorm", Layout((24,), cluster_dim=d)
        yield "layernorm", Layout((24,), "per_grouped_channel", 8, cluster_dim=d)


LAYOUTS = list(_layouts())
LAYOUT_IDS = [
    f"{kind}-{lay.granularity}-a{lay.channel_axis}-d{lay.cluster_dim}" for kind, lay in LAYOUTS
]


def _reference_groups(w, layout):
    """[G, N, d] built by explicit slicing: group g, channel block j, then other dims (C order)."""
    a, d = layout.channel_axis, layout.cluster_dim
    gs = layout.group_channels
    groups = []
    for g in range(layout.num_groups):
        blocks = []
        for j in range(gs // d):
            vectors = w.narrow(a, g * gs + j * d, d)  # d consecutive channels, all positions
            blocks.append(vectors.movedim(a, -1).reshape(-1, d))
        groups.append(torch.cat(blocks))
    return torch.stack(groups)


def _random_palette(layout, n_bits=3, scale=False, qdtype=None, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    g, n, d = layout.num_groups, layout.vectors_per_group, layout.cluster_dim
    lut = torch.randn(g, 2**n_bits, d, generator=gen)
    qscale = zero_point = None
    if qdtype is not None:
        lut, qscale, zero_point = quantize_lut(lut, qdtype)
    indices = torch.randint(0, 2**n_bits, (g, n), generator=gen, dtype=torch.uint8)
    s = None
    if scale:
        s = torch.rand(layout.shape[0], *[1] * (len(layout.shape) - 1), generator=gen) + 0.5
    return Palette(layout, n_bits, lut, indices, s, qdtype, qscale, zero_point, dtype)


# ----------------------------------------------------------------------------- Layout


@pytest.mark.parametrize(("kind", "layout"), LAYOUTS, ids=LAYOUT_IDS)
def test_to_groups_matches_explicit_slicing_and_round_trips(kind, layout):
    w = torch.randn(layout.shape)
    x = layout.to_groups(w)
    g, n, d = layout.num_groups, layout.vectors_per_group, layout.cluster_dim
    assert x.shape == (g, n, d)
    assert g * n * d == w.numel()
    torch.testing.assert_close(x, _reference_groups(w, layout), rtol=0, atol=0)
    back = layout.from_groups(x)
    assert back.shape == w.shape
    assert torch.equal(back, w)


def test_groups_are_consecutive_channels_along_the_axis():
    # channel c along axis 1 holds the value c everywhere: group g must hold exactly its channels
    w = torch.arange(16.0).view(1, 16, 1, 1).expand(8, 16, 3, 3).contiguous()
    layout = Layout(w.shape, "per_grouped_channel", 4, channel_axis=1, cluster_dim=2)
    x = layout.to_groups(w)
    for g in range(4):
        assert set(x[g].unique().tolist()) == {4.0 * g + c for c in range(4)}
        # a vector is 2 consecutive channels at one position
        assert torch.all(x[g, :, 1] - x[g, :, 0] == 1)


def test_to_groups_is_a_view_for_axis0_scalar():
    w = torch.randn(16, 8)
    x = Layout(w.shape, "per_grouped_channel", 4).to_groups(w)
    assert x.data_ptr() == w.data_ptr()


def test_layout_properties_follow_coremltools_examples():
    assert Layout((32, 64)).coreml_lut_shape(16) == [1, 1, 16, 1]
    assert Layout((64, 32), "per_grouped_channel", 8).coreml_lut_shape(16) == [8, 1, 16, 1]
    assert Layout((16, 8, 3, 3)).coreml_lut_shape(4) == [1, 1, 1, 1, 4, 1]
    assert Layout((32, 64), cluster_dim=4).coreml_lut_shape(16) == [1, 1, 16, 4]
    conv = Layout((32, 16, 3, 3), "per_grouped_channel", 4, channel_axis=1)
    assert conv.coreml_lut_shape(16) == [1, 4, 1, 1, 16, 1]
    assert Layout((24,)).coreml_lut_shape(4) == [1, 4, 1]
    vec = Layout((32, 16, 3, 3), "per_grouped_channel", 8, cluster_dim=4)
    assert (vec.num_groups, vec.vectors_per_group) == (4, 2 * 16 * 9)
    assert vec.indices_shape == (8, 16, 3, 3)
    assert Layout((32, 64), channel_axis=1, cluster_dim=2).indices_shape == (32, 32)


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        (dict(shape=(30, 8), granularity="per_grouped_channel", group_size=4), ["group_size=4"]),
        (
            dict(shape=(8, 4), granularity="per_grouped_channel", group_size=16),
            ["group_size=16", "exceeds"],
        ),
        (dict(shape=(30, 8), cluster_dim=4), ["cluster_dim=4"]),
        (dict(shape=(8, 30), channel_axis=1, cluster_dim=4), ["cluster_dim=4", "channel_axis=1"]),
        (
            dict(shape=(24, 8), granularity="per_grouped_channel", group_size=6, cluster_dim=4),
            ["cluster_dim=4", "group_size=6"],
        ),
        (dict(shape=(24,), channel_axis=1), ["channel_axis=1"]),
        (dict(shape=(0, 8)), ["empty"]),
    ],
)
def test_validate_names_weight_shape_key_and_value(kwargs, fragments):
    layout = Layout(**kwargs)
    with pytest.raises(ValueError) as info:
        layout.validate("encoder.fc1.weight")
    message = str(info.value)
    assert "encoder.fc1.weight" in message
    assert str(tuple(kwargs["shape"])) in message
    for fragment in fragments:
        assert fragment in message
    # the same layout refuses to split a tensor
    if 0 not in kwargs["shape"]:
        with pytest.raises(ValueError):
            layout.to_groups(torch.zeros(kwargs["shape"]))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(granularity="per_channel"), "granularity"),
        (dict(granularity="per_grouped_channel"), "group_size"),
        (dict(granularity="per_tensor", group_size=4), "group_size"),
        (dict(channel_axis=2), "channel_axis"),
        (dict(cluster_dim=0), "cluster_dim"),
    ],
)
def test_layout_rejects_malformed_fields(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        Layout((8, 8), **kwargs)


def test_to_groups_and_from_groups_check_shapes():
    layout = Layout((8, 4))
    with pytest.raises(ValueError, match="expected shape"):
        layout.to_groups(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="expected shape"):
        layout.from_groups(torch.zeros(1, 16, 2))


# ----------------------------------------------------------------------------- channel_scale


def test_channel_scale_abs_and_min_max():
    w = torch.tensor([[1.0, -3.0, 2.0], [0.0, 0.0, 0.0], [0.5, 0.25, 4.0], [math.inf, 1.0, 0.0]])
    w = w.view(4, 3, 1, 1).to(torch.float16)
    s = channel_scale(w)
    assert s.dtype == torch.float32 and s.shape == (4, 1, 1, 1)
    assert s.flatten().tolist() == [3.0, 1.0, 4.0, 1.0]
    s = channel_scale(w, "min_max")
    assert s.flatten().tolist() == [2.5, 1.0, 1.875, 1.0]
    s = channel_scale(w.float().view(4, 3), "abs", axis=1)
    assert s.shape == (1, 3)
    assert s.flatten().tolist() == [1.0, 3.0, 4.0]  # column 0 holds inf -> 1
    # dividing by the scale puts each row in [-1, 1]
    v = torch.randn(6, 5)
    assert (v / channel_scale(v)).abs().amax(dim=1).sub(1).abs().max() < 1e-6
    with pytest.raises(ValueError, match="scheme"):
        channel_scale(v, "l2")


# ----------------------------------------------------------------------------- quantize_lut


def test_quantize_lut_int8_and_uint8():
    lut = torch.randn(3, 16, 2) * torch.tensor([1.0, 100.0, 0.0]).view(3, 1, 1)
    deq, scale, zp = quantize_lut(lut, torch.int8)
    assert zp is None and scale.shape == (3, 1, 1) and deq.dtype == torch.float32
    assert scale[2].item() == 1.0  # all-zero group
    q = (deq / scale).round()
    assert torch.equal(deq, q * scale)  # exactly on the int8 grid
    assert q.abs().max() <= 127
    for g in range(2):
        assert q[g].abs().max() == 127
        torch.testing.assert_close(scale[g].squeeze(), lut[g].abs().max() / 127)
    assert (deq - lut).abs().max() <= scale.max() / 2 + 1e-6
    udeq, uscale, uzp = quantize_lut(lut, torch.uint8)
    assert uzp.dtype == torch.uint8 and uzp.shape == (3, 1, 1) and torch.all(uzp == 127)
    assert torch.equal(uscale, scale) and torch.equal(udeq, deq)
    codes = (udeq / uscale).round() + 127
    assert codes.min() >= 0 and codes.max() <= 254
    with pytest.raises(ValueError, match="qdtype"):
        quantize_lut(lut, torch.int16)


def test_quantize_lut_matches_coremltools():
    ct_utils = pytest.importorskip("coremltools.optimize._utils")
    lut = torch.randn(2, 16, 1)
    for qdtype, signed in ((torch.int8, True), (torch.uint8, False)):
        deq, scale, zp = quantize_lut(lut, qdtype)
        for g in range(2):
            q, ct_scale, ct_zp = ct_utils.compute_qparams(
                lut[g].numpy(), 8, signed, "LINEAR_SYMMETRIC", None, [0, 0]
            )
            ct_deq = ct_utils.dequantize_by_scale_and_zp(q, ct_scale, ct_zp)
            torch.testing.assert_close(deq[g], torch.from_numpy(ct_deq).float())
            torch.testing.assert_close(scale[g].flatten(), torch.from_numpy(ct_scale).flatten())
            if ct_zp is not None:
                assert int(zp[g]) == int(ct_zp.flatten()[0])


# ----------------------------------------------------------------------------- packing


def _reference_pack(values, n_bits):
    stream = sum(int(v) << (i * n_bits) for i, v in enumerate(values))
    return list(stream.to_bytes(math.ceil(len(values) * n_bits / 8), "little"))


@pytest.mark.parametrize("n_bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 7, 9, 13, 1001])
def test_pack_unpack_round_trip(n_bits, numel):
    gen = torch.Generator().manual_seed(n_bits * 1000 + numel)
    idx = torch.randint(0, 2**n_bits, (numel,), generator=gen)
    packed = pack_indices(idx, n_bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(numel * n_bits / 8)
    assert packed.tolist() == _reference_pack(idx.tolist(), n_bits)
    out = unpack_indices(packed, n_bits, numel)
    assert out.dtype == torch.uint8 and torch.equal(out.long(), idx)


def test_pack_bit_order_is_lsb_first():
    assert pack_indices(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert pack_indices(torch.tensor([7, 0, 1]), 3).tolist() == [0b01000111, 0]
    assert pack_indices(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [1, 1]
    # any int dtype and shape packs in flatten() order
    idx = torch.tensor([[3, 1], [2, 0]], dtype=torch.int32)
    assert torch.equal(pack_indices(idx, 2), pack_indices(idx.flatten().long(), 2))


def test_pack_unpack_validate_inputs():
    with pytest.raises(ValueError, match="n_bits"):
        pack_indices(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="n_bits"):
        pack_indices(torch.tensor([0]), 9)
    with pytest.raises(ValueError, match="values"):
        pack_indices(torch.tensor([0, 16]), 4)
    with pytest.raises(ValueError, match="values"):
        pack_indices(torch.tensor([-1]), 4)
    with pytest.raises(TypeError):
        pack_indices(torch.tensor([0.0]), 4)
    with pytest.raises(ValueError, match="bytes"):
        unpack_indices(torch.zeros(3, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError, match="n_bits"):
        unpack_indices(torch.zeros(3, dtype=torch.uint8), 9, 3)


# ----------------------------------------------------------------------------- Palette


def _reference_dequantize(palette):
    """Explicit loop: every vector (group g, channel block j, position r) gets lut[g, idx]."""
    layout = palette.layout
    a, d, gs = layout.channel_axis, layout.cluster_dim, layout.group_channels
    w = torch.zeros(layout.shape, dtype=torch.float32)
    for g in range(layout.num_groups):
        per_block = palette.indices[g].view(gs // d, -1)
        for j in range(gs // d):
            block = w.narrow(a, g * gs + j * d, d).movedim(a, -1)  # (*rest, d) view of w
            flat = block.reshape(-1, d)
            for r in range(flat.shape[0]):
                flat[r] = palette.lut[g, int(per_block[j, r])]
            block.copy_(flat.view(block.shape))
    if palette.scale is not None:
        w = w * palette.scale.float()
    return w.to(palette.dtype)


@pytest.mark.parametrize(
    ("kind", "layout"),
    [LAYOUTS[i] for i in range(0, len(LAYOUTS), 5)],
    ids=[LAYOUT_IDS[i] for i in range(0, len(LAYOUTS), 5)],
)
@pytest.mark.parametrize("scale", [False, True])
def test_dequantize_equals_loop_reference(kind, layout, scale, monkeypatch):
    palette = _random_palette(layout, n_bits=3, scale=scale)
    expected = _reference_dequantize(palette)
    assert torch.equal(palette.dequantize(), expected)
    # tiny chunks cross group and channel boundaries
    monkeypatch.setattr(palette_mod, "_CHUNK", 7)
    assert torch.equal(palette.dequantize(), expected)


@pytest.mark.parametrize("axis", [0, 1])
def test_dequantize_into_out_and_dtype(axis):
    layout = Layout((16, 8, 3, 3), "per_grouped_channel", 4, channel_axis=axis)
    palette = _random_palette(layout, n_bits=4, scale=True, dtype=torch.float16)
    expected = _reference_dequantize(palette)
    weight = torch.nn.Parameter(torch.randn(layout.shape, dtype=torch.float16))
    result = palette.dequantize(out=weight.data)
    assert result.data_ptr() == weight.data_ptr()
    assert torch.equal(weight.data, expected)
    assert palette.dequantize().dtype == torch.float16
    as32 = palette.dequantize(torch.float32)
    assert torch.equal(as32, _reference_dequantize(_with_dtype(palette, torch.float32)))
    with pytest.raises(ValueError, match="out"):
        palette.dequantize(out=torch.empty(16, 8, 3))
    with pytest.raises(ValueError, match="dtype"):
        palette.dequantize(torch.float32, out=weight.data)


def _with_dtype(palette, dtype):
    return Palette(palette.layout, palette.n_bits, palette.lut, palette.indices, palette.scale,
                   dtype=dtype)  # fmt: skip


def test_nbytes_hand_computed():
    # (64, 32) weight, 8 groups along axis 0, 4-bit, uint8 LUT, fp16 weight
    layout = Layout((64, 32), "per_grouped_channel", 8)
    p = _random_palette(layout, n_bits=4, qdtype=torch.uint8, dtype=torch.float16)
    # 2048 indices * 4 bits = 1024 B; 8 LUTs * 16 entries * 1 B = 128 B; 8 * (4 + 1) = 40 B
    assert p.nbytes() == 1024 + 128 + 40
    assert p.dense_nbytes() == 64 * 32 * 2
    # 3-bit, per-tensor, scale, fp32: ceil(2048*3/8) = 768; LUT 8 * 4 = 32; scale 64 * 4 = 256
    p = _random_palette(Layout((64, 32)), n_bits=3, scale=True)
    assert p.nbytes() == 768 + 32 + 256
    # vector d=2, int8 LUT, bf16: 1024 vectors * 2 bits = 256; LUT 4*2 = 8; qparams 4
    p = _random_palette(Layout((64, 32), cluster_dim=2), 2, qdtype=torch.int8, dtype=torch.bfloat16)
    assert p.nbytes() == 256 + 8 + 4
    assert p.packed_indices().numel() == 256


def test_packed_indices_round_trip():
    p = _random_palette(Layout((24, 5), "per_grouped_channel", 8), n_bits=3)
    packed = p.packed_indices()
    assert torch.equal(unpack_indices(packed, 3, p.indices.numel()).view_as(p.indices), p.indices)


def test_coreml_metadata_fields_and_shapes():
    meta = _random_palette(Layout((32, 64)), n_bits=4).coreml_metadata()
    assert set(meta) == {"compression_type", "lut"}
    assert (
        meta["compression_type"].tolist() == [2] and meta["compression_type"].dtype == torch.int64
    )
    assert meta["lut"].shape == (1, 1, 16, 1) and meta["lut"].dtype == torch.float32

    meta = _random_palette(Layout((64, 32), "per_grouped_channel", 8), 4).coreml_metadata()
    assert meta["lut"].shape == (8, 1, 16, 1)

    meta = _random_palette(Layout((16, 8, 3, 3)), n_bits=2, scale=True).coreml_metadata()
    assert meta["lut"].shape == (1, 1, 1, 1, 4, 1)
    assert meta["palettization_scale"].shape == (16, 1, 1, 1)

    meta = _random_palette(Layout((32, 64), channel_axis=1, cluster_dim=4), 4).coreml_metadata()
    assert meta["lut"].shape == (1, 1, 16, 4)
    assert meta["vector_axis"].item() == 1 and meta["vector_axis"].dim() == 0

    layout = Layout((32, 64), "per_grouped_channel", 16, channel_axis=1)
    p = _random_palette(layout, 4, qdtype=torch.uint8)
    meta = p.coreml_metadata()
    assert meta["compression_type"].tolist() == [2, 3]
    assert meta["quantization_n_bits"].item() == 8
    assert meta["quantization_scale"].shape == (1, 4, 1, 1)
    assert meta["zero_point"].shape == (1, 4, 1, 1) and meta["zero_point"].dtype == torch.uint8
    # the lut field holds the dequantized centroids; the converter re-derives the codes
    torch.testing.assert_close(meta["lut"].reshape(4, 16, 1), p.lut)

    p = _random_palette(Layout((32, 64)), 4, qdtype=torch.int8)
    object.__setattr__(p, "scale", torch.ones(32, 1))
    with pytest.raises(ValueError, match="per-channel scale"):
        p.coreml_metadata()


@pytest.mark.parametrize(("kind", "layout"), LAYOUTS, ids=LAYOUT_IDS)
def test_write_into_equals_loop_reference_and_error(kind, layout, monkeypatch):
    """write_into (compiled one-pass path where it applies, torch chunks elsewhere) writes the
    loop reference and returns ||before - after||^2 / ||before||^2."""
    palette = _random_palette(layout, n_bits=3)
    expected = _reference_dequantize(palette)
    before = torch.randn(layout.shape, generator=torch.Generator().manual_seed(1))
    want = (before.double() - expected.double()).square().sum() / before.double().square().sum()
    results = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(Palette, "_one_pass_ok", lambda self, out: False)
        weight = torch.nn.Parameter(before.clone())  # a Parameter, as compress passes it
        one_pass = palette._one_pass_ok(weight.data)
        err = palette.write_into(weight.data)
        assert torch.equal(weight.data, expected)
        # the compiled pass sums in float64 throughout; the torch chunks difference in float32
        assert err == pytest.approx(want.item(), rel=1e-12 if one_pass else 1e-6)
        results.append(err)
    assert palette._one_pass_ok(before) is False  # patched: the torch path ran second


def test_write_into_takes_the_compiled_path_for_row_groups():
    layout = Layout((32, 16), "per_grouped_channel", 8)
    assert _random_palette(layout)._one_pass_ok(torch.zeros(32, 16))
    assert _random_palette(layout)._one_pass_ok(torch.zeros(32, 16, dtype=torch.bfloat16))
    assert not _random_palette(layout, scale=True)._one_pass_ok(torch.zeros(32, 16))
    assert not _random_palette(layout)._one_pass_ok(torch.zeros(32, 16, dtype=torch.float64))
    axis1 = Layout((32, 16), "per_grouped_channel", 8, channel_axis=1)
    assert not _random_palette(axis1)._one_pass_ok(torch.zeros(32, 16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_write_into_16bit_weights_equals_torch_path(dtype, monkeypatch):
    """The one-pass path rounds the LUT to the weight's dtype like torch's cast (ties, tiny and
    large values included) and measures the error on the stored values."""
    layout = Layout((64, 48), "per_grouped_channel", 16)
    palette = _random_palette(layout, n_bits=4, dtype=dtype)
    lut = palette.lut.clone()
    lut.view(-1)[:6] = torch.tensor([1e-7, -3e-6, 65504.0, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 0.0])
    palette.lut = lut
    before = (torch.randn(layout.shape, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    a, b = before.clone(), before.clone()
    err_one = palette.write_into(a)
    monkeypatch.setattr(Palette, "_one_pass_ok", lambda self, out: False)
    err_torch = palette.write_into(b)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert err_one == pytest.approx(err_torch, rel=1e-6)


def test_relative_error_and_unique_counts(monkeypatch):
    layout = Layout((16, 12), "per_grouped_channel", 4, channel_axis=1)
    p = _random_palette(layout, n_bits=2, scale=True)
    w = p.dequantize()
    assert p.relative_error(w) == 0.0
    noisy = w + 0.1 * torch.randn_like(w)
    expected = ((noisy.double() - w.double()).square().sum() / noisy.double().square().sum()).item()
    monkeypatch.setattr(palette_mod, "_CHUNK", 5)
    assert p.relative_error(noisy) == pytest.approx(expected, rel=1e-6)
    assert p.relative_error(torch.zeros(layout.shape)) == 0.0
    indices = p.indices.clone()
    indices[0] = 1
    p.indices = indices
    counts = p.num_unique_per_group()
    assert counts[0] == 1
    assert torch.equal(counts[1:], torch.tensor([len(set(r.tolist())) for r in indices[1:]]))


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("lut", torch.zeros(1, 8, 1), ValueError),
        ("lut", torch.zeros(1, 16, 1, dtype=torch.float64), TypeError),
        ("indices", torch.zeros(1, 511, dtype=torch.uint8), ValueError),
        ("indices", torch.zeros(1, 512, dtype=torch.int64), TypeError),
        ("scale", torch.ones(1, 32), ValueError),
        ("lut_qdtype", torch.int8, ValueError),  # no lut_qscale
        ("n_bits", 9, ValueError),
    ],
)
def test_palette_rejects_inconsistent_fields(field, value, error):
    fields = dict(
        layout=Layout((16, 32)),
        n_bits=4,
        lut=torch.zeros(1, 16, 1),
        indices=torch.zeros(1, 512, dtype=torch.uint8),
    )
    fields[field] = value
    with pytest.raises(error):
        Palette(**fields)


# ----------------------------------------------------------------------------- Core ML


def _mil_ops(block):
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _mil_ops(inner)


def _materialize(var):
    """Decompress a chain of constexpr ops with coremltools' own numpy reference."""
    if var.val is not None:
        return var.val
    op = var.op
    if op.op_type == "constexpr_lut_to_dense":
        axis = None if op.vector_axis is None else op.vector_axis.val
        return op.decompress(op.indices.val, _materialize(op.lut), axis)
    assert op.op_type == "constexpr_blockwise_shift_scale", op.op_type
    offset = None if op.offset is None else _materialize(op.offset)
    return op.decompress(_materialize(op.data), _materialize(op.scale), offset)


@pytest.mark.parametrize(
    ("layout", "scale", "qdtype"),
    [
        (Layout((32, 64)), False, None),
        (Layout((32, 64), "per_grouped_channel", 8), False, None),
        (Layout((32, 64), "per_grouped_channel", 16, channel_axis=1), False, None),
        (Layout((32, 64)), True, None),
        (Layout((32, 64)), False, torch.int8),
        (Layout((32, 64), "per_grouped_channel", 8), False, torch.uint8),
        (Layout((32, 64), channel_axis=1, cluster_dim=2), False, None),
        (Layout((32, 64), cluster_dim=4), False, torch.int8),
    ],
    ids=["per_tensor", "grouped_axis0", "grouped_axis1", "scale", "int8", "uint8_grouped",
         "vector_axis1", "vector_int8"],
)  # fmt: skip
def test_coremltools_converts_metadata_to_lut_op(layout, scale, qdtype):
    ct = pytest.importorskip("coremltools")
    torch.manual_seed(0)
    palette = _random_palette(layout, n_bits=4, scale=scale, qdtype=qdtype, seed=1)
    linear = torch.nn.Linear(64, 32)
    with torch.no_grad():
        palette.dequantize(out=linear.weight.data)
    for field, value in palette.coreml_metadata().items():
        linear.register_buffer(f"_COREML_/weight/{field}", value)
    model = torch.nn.Sequential(linear).eval()
    model.register_buffer("_COREML_/metadata_version", torch.tensor(1))
    traced = torch.jit.trace(model, torch.randn(1, 64))
    pipeline = ct.PassPipeline.DEFAULT
    if qdtype is not None and layout.cluster_dim > 1:
        # coremltools 9.0's canonicalize_quantized_lut_pattern drops vector_axis
        pipeline.remove_passes(["common::canonicalize_quantized_lut_pattern"])
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(shape=(1, 64))],
        minimum_deployment_target=ct.target.iOS18,
        skip_model_load=True,
        convert_to="mlprogram",
        pass_pipeline=pipeline,
    )
    ops = list(_mil_ops(mlmodel._mil_program.functions["main"]))
    assert "constexpr_lut_to_dense" in [op.op_type for op in ops]
    (linear_op,) = [op for op in ops if op.op_type == "linear"]
    dense = torch.from_numpy(_materialize(linear_op.weight).astype("float32"))
    expected = palette.dequantize()
    # the model is stored in fp16: equal up to fp16 rounding of LUT and scale
    torch.testing.assert_close(dense, expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_bit_for_bit():
    layout = Layout((16, 8, 3, 3), "per_grouped_channel", 4, channel_axis=1, cluster_dim=2)
    cpu = _random_palette(layout, n_bits=3, scale=True, dtype=torch.float16)
    cuda = Palette(layout, 3, cpu.lut.cuda(), cpu.indices.cuda(), cpu.scale.cuda(),
                   dtype=torch.float16)  # fmt: skip
    assert torch.equal(cuda.dequantize().cpu(), cpu.dequantize())
    assert torch.equal(cuda.packed_indices().cpu(), cpu.packed_indices())
    lut = torch.randn(4, 16, 1)
    for got, want in zip(quantize_lut(lut.cuda(), torch.uint8), quantize_lut(lut, torch.uint8)):
        assert torch.equal(got.cpu(), want)  # scale = max / 127 correctly rounded on both
    w = torch.randn(layout.shape)
    assert torch.equal(channel_scale(w.cuda(), "min_max").cpu(), channel_scale(w, "min_max"))
    assert cuda.relative_error(w.cuda()) == pytest.approx(cpu.relative_error(w), rel=1e-5)
