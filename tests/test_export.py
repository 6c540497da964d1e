"""lightning_palettize.export: bit-identical round trip, compact size, rejection of bad files
(model untouched), pickle safety, Core ML conversion."""

import copy
import functools
import json
import os
import pickle
import re
import sys
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_palettize import (
    DKMPalettizer,
    PostTrainingPalettizer,
    SKMPalettizer,
    strip_coreml_metadata,
)
from lightning_palettize.export import (
    FORMAT_VERSION,
    compact_size,
    export_coreml,
    load_palettized,
    read_palettized_metadata,
    save_palettized,
)


class _Net(nn.Module):
    """Every module kind PTP handles that the brief asks for, plus an unpalettized LayerNorm."""

    def __init__(self, seed=0, width=16):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(32, width)
        self.conv = nn.Conv2d(8, 16, 3)
        self.emb = nn.Embedding(16, 32)
        self.mha = nn.MultiheadAttention(32, 4)
        self.norm = nn.LayerNorm(16)
        self.register_buffer("steps", torch.tensor(7))


def _palettized(cfg, dtype=torch.float32):
    """A fresh copy of ``_Net(0)`` palettized with ``cfg`` (clustered once per config)."""
    return copy.deepcopy(_palettized_once(json.dumps(cfg, sort_keys=True), dtype))


@functools.lru_cache
def _palettized_once(cfg, dtype):
    model = _Net(0).to(dtype)
    return PostTrainingPalettizer(model, {"global_config": json.loads(cfg)}).compress(
        progress=False
    )


def _bits(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _assert_bit_identical(expected: nn.Module, got: nn.Module):
    """Every state_dict entry, the _COREML_ buffers included, equal bit for bit."""
    want, have = expected.state_dict(), got.state_dict()
    assert set(have) == set(want), set(have) ^ set(want)
    for key, value in want.items():
        assert have[key].dtype == value.dtype, key
        assert have[key].shape == value.shape, key
        assert torch.equal(_bits(have[key]), _bits(value)), key


def _round_trip(model, tmp_path, fresh):
    path = tmp_path / "model.safetensors"
    summary = save_palettized(model, path)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert not torch.equal(
        before["lin.weight"], model.state_dict()["lin.weight"].to(before["lin.weight"].dtype)
    )
    assert load_palettized(path, fresh) is fresh
    _assert_bit_identical(model, fresh)
    return summary


CONFIGS = {
    **{f"per_tensor_{b}bit": {"n_bits": b} for b in range(1, 9)},
    "grouped_axis0": {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 8},
    "grouped_axis1": {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 8,
                      "channel_axis": 1},
    "vectors_axis1": {"n_bits": 2, "cluster_dim": 2, "granularity": "per_grouped_channel",
                      "group_size": 8, "channel_axis": 1},
    "scale": {"n_bits": 4, "enable_per_channel_scale": True},
    "int8_lut": {"n_bits": 4, "lut_dtype": "int8"},
    "uint8_lut_grouped": {"n_bits": 4, "lut_dtype": "uint8", "granularity": "per_grouped_channel",
                          "group_size": 8},
}  # fmt: skip
PALETTIZED = [
    "lin.weight",
    "conv.weight",
    "emb.weight",
    "mha.in_proj_weight",
    "mha.out_proj.weight",
]


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_round_trip_is_bit_identical_fp32(cfg, tmp_path):
    model = _palettized(cfg)
    summary = _round_trip(model, tmp_path, _Net(seed=1))
    assert sorted(summary["weights"]) == sorted(PALETTIZED)
    assert all(row["outliers"] == 0 for row in summary["weights"].values())
    assert all(row["n_bits"] == cfg["n_bits"] for row in summary["weights"].values())


@pytest.mark.parametrize("name", ["per_tensor_4bit", "scale", "uint8_lut_grouped", "grouped_axis1"])
def test_round_trip_is_bit_identical_bf16(name, tmp_path):
    model = _palettized(CONFIGS[name], torch.bfloat16)
    assert model.lin.weight.dtype == torch.bfloat16
    _round_trip(model, tmp_path, _Net(seed=1).to(torch.bfloat16))


def test_quantized_lut_is_stored_as_8bit_codes(tmp_path):
    path = tmp_path / "q.safetensors"
    save_palettized(_palettized(CONFIGS["uint8_lut_grouped"]), path)
    with safe_open(path, "pt") as f:
        lut = f.get_tensor("palette/lin.weight/lut")
        header = json.loads(f.metadata()["lightning_palettize"])
    assert lut.dtype == torch.uint8 and lut.shape == (2, 1, 16, 1)
    assert header["palettized"]["lin.weight"]["lut"]["storage"] == "codes"
    assert header["palettized"]["lin.weight"]["layout"]["group_size"] == 8


@pytest.mark.parametrize("name", ["per_tensor_4bit", "scale", "vectors_axis1"])
def test_injected_outliers_are_stored_sparsely_and_restored(name, tmp_path):
    model = _palettized(CONFIGS[name])
    with torch.no_grad():
        flat = model.conv.weight.view(-1)
        flat[[0, 17, 1000]] = torch.tensor([12.345, -0.0, float("nan")])
        model.lin.weight[3, 5] = model.lin.weight[3, 5] * 1.0001  # near a LUT value, not on it
    summary = _round_trip(model, tmp_path, _Net(seed=1))
    outliers = {k: r["outliers"] for k, r in summary["weights"].items()}
    assert outliers["lin.weight"] == 1
    # -0.0 is an outlier unless its LUT entry is -0.0; a vector keeps its entry
    assert outliers["conv.weight"] in (2, 3)
    assert sum(outliers.values()) == outliers["lin.weight"] + outliers["conv.weight"]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))


def test_skm_outliers_round_trip(tmp_path):
    data = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(4)]
    loss_fn = lambda m, item: nn.functional.cross_entropy(m(item[0]), item[1])  # noqa: E731
    cfg = {"global_config": {"n_bits": 3, "outlier_fraction": 0.02}, "calibration_nsamples": 4}
    skm = SKMPalettizer(_mlp(), cfg)
    model = skm.compress(data, loss_fn, progress=False)
    summary = save_palettized(model, tmp_path / "skm.safetensors")
    kept = {row.name: row.outliers for row in skm.report().rows}
    assert {k: r["outliers"] for k, r in summary["weights"].items()} == kept
    assert kept["0.weight"] == 20
    fresh = load_palettized(tmp_path / "skm.safetensors", _mlp(seed=1))
    _assert_bit_identical(model, fresh)


def test_dkm_finalized_model_round_trips_without_outliers(tmp_path):
    cfg = {"global_config": {"n_bits": 2, "weight_threshold": 0}}
    palettizer = DKMPalettizer(_mlp(), cfg)
    model = palettizer.prepare()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(torch.randn(8, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        palettizer.step()
    model = palettizer.finalize()
    summary = save_palettized(model, tmp_path / "dkm.safetensors")
    assert sorted(summary["weights"]) == ["0.weight", "2.weight"]
    assert all(row["outliers"] == 0 for row in summary["weights"].values())
    _assert_bit_identical(model, load_palettized(tmp_path / "dkm.safetensors", _mlp(seed=1)))


@pytest.mark.parametrize(
    "cfg",
    [
        {"n_bits": 4, "lut_dtype": "uint8", "granularity": "per_grouped_channel", "group_size": 8},
        {"n_bits": 3, "enable_per_channel_scale": True},
        {"n_bits": 2, "cluster_dim": 2},
    ],
    ids=["uint8_grouped", "scale", "vectors"],
)
def test_coremltools_palettized_model_round_trips(cfg, tmp_path):
    ct_palettization = pytest.importorskip("coremltools.optimize.torch.palettization")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = ct_palettization.PostTrainingPalettizerConfig.from_dict({"global_config": cfg})
        model = ct_palettization.PostTrainingPalettizer(_mlp(), config).compress()
    summary = save_palettized(model, tmp_path / "ct.safetensors")
    assert all(row["outliers"] == 0 for row in summary["weights"].values())
    _assert_bit_identical(model, load_palettized(tmp_path / "ct.safetensors", _mlp(seed=1)))


def test_tied_tensors_are_stored_once_and_metadata_round_trips(tmp_path):
    def build(seed):
        net = _Net(seed)
        net.norm2 = nn.LayerNorm(16)
        net.norm2.weight = net.norm.weight  # tied
        return net

    model = PostTrainingPalettizer(build(0), {"global_config": {"n_bits": 4}}).compress(
        progress=False
    )
    with torch.no_grad():
        model.norm.weight.uniform_()
    path = tmp_path / "tied.safetensors"
    save_palettized(model, path, metadata={"task": "digits", "acc": [0.97, 0.96]})
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert "tensor/norm.weight" in keys and "tensor/norm2.weight" not in keys
    fresh = load_palettized(path, build(1))
    _assert_bit_identical(model, fresh)
    assert fresh.norm2.weight is fresh.norm.weight
    assert read_palettized_metadata(path) == {"task": "digits", "acc": [0.97, 0.96]}


def test_4bit_file_is_within_10_percent_of_ideal(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3), nn.Linear(256, 256), nn.Linear(256, 128))
    for cfg in ({"n_bits": 4}, {"n_bits": 4, "granularity": "per_grouped_channel",
                                "group_size": 32}):  # fmt: skip
        small = PostTrainingPalettizer(model, {"global_config": cfg}).compress(progress=False)
        summary = save_palettized(small, tmp_path / "m.safetensors")
        assert summary == {**compact_size(small), "path": summary["path"],
                           "file_bytes": summary["file_bytes"]}  # fmt: skip
        for name, row in summary["weights"].items():
            numel = torch.tensor(row["shape"]).prod().item()
            ideal = numel * 4 // 8 + row["num_luts"] * 16 * 4  # 4/32 of fp32 + fp32 LUTs
            assert row["ideal_bytes"] == ideal, name
            assert row["bytes"] <= 1.1 * ideal, (name, row)
        # the whole file, JSON header included, minus the biases stored as they are
        ratio = (summary["file_bytes"] - summary["other_bytes"]) / summary["ideal_bytes"]
        assert ratio <= 1.1, ratio
        assert summary["dense_bytes"] == sum(p.numel() * 4 for p in model.parameters())
        assert summary["file_bytes"] < summary["dense_bytes"] / 7


class _HalfNet(nn.Module):
    """Linear, Conv2d and Embedding whose output channels divide by 4 (group_size 4)."""

    def __init__(self, seed=0, rows=64):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(16, rows)
        self.conv = nn.Conv2d(8, 16, 3)
        self.emb = nn.Embedding(rows // 2, 16)


HALF_LAYOUTS = {
    "per_tensor": {},
    "group1": {"granularity": "per_grouped_channel", "group_size": 1},
    "group4": {"granularity": "per_grouped_channel", "group_size": 4},
}


@pytest.mark.parametrize("n_bits", [2, 4, 5])
@pytest.mark.parametrize("layout", HALF_LAYOUTS.values(), ids=HALF_LAYOUTS.keys())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_file_stores_the_lut_in_the_weight_dtype(dtype, layout, n_bits, tmp_path):
    cfg = {"global_config": {"n_bits": n_bits, **layout}}
    model = PostTrainingPalettizer(_HalfNet().to(dtype), cfg).compress(progress=False)
    path = tmp_path / "half.safetensors"
    summary = save_palettized(model, path)
    assert sorted(summary["weights"]) == ["conv.weight", "emb.weight", "lin.weight"]
    for name, row in summary["weights"].items():
        numel = torch.tensor(row["shape"]).prod().item()
        ideal = -(-numel * n_bits // 8) + row["num_luts"] * 2**n_bits * 2  # 2-byte entries
        assert row["ideal_bytes"] == ideal, name
        assert row["bytes"] == ideal, (name, row)  # no overhead left: indices + LUT
        assert row["outliers"] == 0, name
    # what remains: the fp16 biases and the int64 _COREML_/metadata_version, stored as they
    # are, and the JSON header
    assert summary["bytes"] == summary["ideal_bytes"] + summary["other_bytes"]
    assert summary["other_bytes"] == 2 * (64 + 16) + 8
    with safe_open(path, "pt") as f:
        header = json.loads(f.metadata()["lightning_palettize"])
        for name in summary["weights"]:
            assert f.get_tensor(f"palette/{name}/lut").dtype == dtype, name
            lut = header["palettized"][name]["lut"]
            assert (lut["dtype"], lut["storage"]) == ("float32", str(dtype)[6:]), name
    # the _COREML_ lut stays float32 (as coremltools writes it) and comes back bit for bit
    assert getattr(model.lin, "_COREML_/weight/lut").dtype == torch.float32
    fresh = load_palettized(path, _HalfNet(seed=1).to(dtype))
    _assert_bit_identical(model, fresh)


def test_half_precision_5bit_grouped_file_is_smaller_than_dense(tmp_path):
    # the reviewer's case: with float32 LUTs (32 entries * 4 bytes per 4 rows of 16) the
    # palettized rows took 168 bytes against 128 dense, and this file (36,936 bytes) was larger
    # than the dense fp16 state_dict's (28,304); with fp16 LUTs they take 104 (file 24,392)
    dense = _HalfNet(rows=512).half()
    cfg = {"n_bits": 5, "granularity": "per_grouped_channel", "group_size": 4}
    model = PostTrainingPalettizer(dense, {"global_config": cfg}).compress(progress=False)
    summary = save_palettized(model, tmp_path / "small.safetensors")
    save_file(dense.state_dict(), tmp_path / "dense.safetensors")
    dense_file = os.path.getsize(tmp_path / "dense.safetensors")
    assert summary["bytes"] == summary["ideal_bytes"] + summary["other_bytes"]
    assert summary["palettized_bytes"] == (128 + 64) * 104 + 4 * (32 * 2 + 4 * 72 * 5 // 8)
    assert summary["bytes"] < 0.8 * summary["dense_bytes"], summary
    assert summary["file_bytes"] < 0.9 * dense_file, (summary["file_bytes"], dense_file)
    fresh = load_palettized(tmp_path / "small.safetensors", _HalfNet(seed=1, rows=512).half())
    _assert_bit_identical(model, fresh)


@pytest.mark.parametrize("name", ["scale", "int8_lut", "uint8_lut_grouped", "vectors_axis1"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_scales_quantized_luts_and_vectors(name, dtype, tmp_path):
    model = _palettized(CONFIGS[name], dtype)
    summary = _round_trip(model, tmp_path, _Net(seed=1).to(dtype))
    for key, row in summary["weights"].items():
        weight = model.get_parameter(key)
        if name == "scale":  # plus the float32 per-channel scale, C_0 * 4 bytes
            assert row["bytes"] == row["ideal_bytes"] + weight.shape[0] * 4, key
        elif name == "vectors_axis1":
            assert row["bytes"] == row["ideal_bytes"], key
        else:  # 1-byte codes instead of 2-byte entries, plus the LUTs' quantization params
            assert row["bytes"] < row["ideal_bytes"], key


def test_fp32_lut_is_not_rounded(tmp_path):
    model = _palettized(CONFIGS["per_tensor_4bit"])
    lut = getattr(model.lin, "_COREML_/weight/lut")
    assert not torch.equal(lut, lut.half().float())  # k-means centroids, full precision
    path = tmp_path / "fp32.safetensors"
    save_palettized(model, path)
    with safe_open(path, "pt") as f:
        assert f.get_tensor("palette/lin.weight/lut").dtype == torch.float32


# ----------------------------------------------------------------------------- bad files


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [n for n, _ in model.named_buffers()],
    )


def _assert_rejected(path, model, *needles):
    state, buffers = _snapshot(model)
    with pytest.raises(ValueError) as info:
        load_palettized(path, model)
    message = str(info.value)
    assert str(path) in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    after, after_buffers = _snapshot(model)
    assert after_buffers == buffers
    for key, value in state.items():
        assert torch.equal(_bits(after[key]), _bits(value)), key
    return message


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "good.safetensors"
    model = _palettized(CONFIGS["uint8_lut_grouped"])
    with torch.no_grad():
        model.conv.weight.view(-1)[[3, 4]] = 9.0  # outliers, so their tensors exist
    save_palettized(model, path)
    return path


def _rewrite(src, dst, edit=None, header_edit=None, raw_header=None):
    with safe_open(src, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header = json.loads(f.metadata()["lightning_palettize"])
    if edit:
        edit(tensors)
    if header_edit:
        header_edit(header)
    text = raw_header if raw_header is not None else json.dumps(header)
    save_file(tensors, dst, metadata={"lightning_palettize": text})
    return dst


def test_corrupt_and_truncated_files_are_rejected(saved, tmp_path):
    model = _Net(seed=1)
    data = saved.read_bytes()
    cases = {
        "truncated": data[: len(data) - 100],
        "garbage": bytes(range(256)) * 16,
        "empty": b"",
        "header_only": data[:8],
    }
    for name, blob in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        _assert_rejected(path, model, "safetensors")
    # valid safetensors, but not ours
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, plain)
    _assert_rejected(plain, model, "lightning_palettize")
    broken = _rewrite(saved, tmp_path / "json.safetensors", raw_header="{not json")
    _assert_rejected(broken, model, "JSON")
    other = _rewrite(
        saved, tmp_path / "fmt.safetensors", header_edit=lambda h: h.update(format="x")
    )
    _assert_rejected(other, model, "format")
    newer = _rewrite(
        saved,
        tmp_path / "ver.safetensors",
        header_edit=lambda h: h.update(version=FORMAT_VERSION + 1),
    )
    _assert_rejected(newer, model, "version")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_palettized(tmp_path / "missing.safetensors", model)


def test_file_from_another_model_is_rejected(saved):
    class _Wider(_Net):
        def __init__(self):
            super().__init__(seed=1, width=24)
            self.norm = nn.LayerNorm(24)

    class _Extra(_Net):
        def __init__(self):
            super().__init__(seed=1)
            self.head = nn.Linear(16, 4)

    class _Fewer(_Net):
        def __init__(self):
            super().__init__(seed=1)
            del self.norm

    _assert_rejected(saved, _Wider(), "'lin.weight'", "shape")
    _assert_rejected(saved, _Extra(), "'head.weight'", "lacks")
    _assert_rejected(saved, _Fewer(), "'norm.weight'", "the model lacks")
    _assert_rejected(saved, _Net(seed=1).to(torch.bfloat16), "dtype")
    # a palettized model keeps its own buffers when the load fails
    _assert_rejected(saved, _palettized({"n_bits": 2}).to(torch.float16), "dtype")


def _drop(key):
    return lambda t: t.pop(key)


def _put(key, value):
    return lambda t: t.__setitem__(key, value)


def test_tampered_contents_are_rejected_with_the_key(saved, tmp_path):
    model = _Net(seed=1)
    w = "palette/conv.weight/"
    cases = {
        "short_indices": (_put(w + "indices", torch.zeros(3, dtype=torch.uint8)), "'conv.weight'"),
        "float_indices": (_put(w + "indices", torch.zeros(432)), "'conv.weight'"),
        "missing_lut": (_drop(w + "lut"), "missing"),
        "missing_raw": (_drop("tensor/lin.bias"), "'lin.bias'"),
        "extra_tensor": (_put("tensor/sneaky", torch.zeros(2)), "'tensor/sneaky'"),
        "outlier_range": (_put(w + "outlier_index", torch.tensor([3, 10**6], dtype=torch.int32)),
                          "outside"),
        "outlier_dtype": (_put(w + "outlier_value", torch.zeros(2, dtype=torch.float64)),
                          "'conv.weight'"),
        "lut_shape": (_put(w + "lut", torch.zeros(2, 1, 1, 1, 8, 1, dtype=torch.uint8)), "shape"),
        "raw_shape": (_put("tensor/lin.bias", torch.zeros(17)), "'lin.bias'"),
    }  # fmt: skip
    for name, (edit, needle) in cases.items():
        path = _rewrite(saved, tmp_path / f"{name}.safetensors", edit=edit)
        _assert_rejected(path, model, needle)

    def bad_layout(h):
        h["palettized"]["lin.weight"]["layout"]["group_size"] = 4

    def bad_field(h):
        h["palettized"]["lin.weight"]["fields"]["compression_type"]["values"] = "rm -rf"

    def bad_dtype(h):
        h["palettized"]["emb.weight"]["dtype"] = "os.system"

    def bad_outliers(h):
        h["palettized"]["conv.weight"]["outliers"] = 5

    def lost_entry(h):
        del h["palettized"]["mha.in_proj_weight"]

    headers = {
        "layout": (bad_layout, "'lin.weight'"),
        "field": (bad_field, "compression_type"),
        "dtype": (bad_dtype, "'emb.weight'"),
        "outliers": (bad_outliers, "'conv.weight'"),
        "lost_entry": (lost_entry, "'mha.in_proj_weight'"),
    }
    for name, (edit, needle) in headers.items():
        path = _rewrite(saved, tmp_path / f"h_{name}.safetensors", header_edit=edit)
        _assert_rejected(path, model, needle)


# ----------------------------------------------------------------------------- no pickle


def _touch(path):
    with open(path, "w") as f:
        f.write("pwned")
    return {}


class _Payload:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (_touch, (self.sentinel,))


def test_pickle_payloads_never_run(tmp_path):
    sentinel = str(tmp_path / "pwned")
    model = _Net(seed=1)
    evil = tmp_path / "evil.safetensors"
    torch.save({"state_dict": _Payload(sentinel)}, evil)
    _assert_rejected(evil, model, "safetensors")
    evil_raw = tmp_path / "evil_raw.safetensors"
    evil_raw.write_bytes(pickle.dumps(_Payload(sentinel)))
    _assert_rejected(evil_raw, model, "safetensors")
    assert not os.path.exists(sentinel)

    # a pickle hidden in the JSON header stays an inert string
    path = tmp_path / "meta.safetensors"
    payload = pickle.dumps(_Payload(sentinel)).hex()
    save_palettized(_palettized({"n_bits": 2}), path, metadata={"__reduce__": payload})
    load_palettized(path, model)
    assert read_palettized_metadata(path) == {"__reduce__": payload}
    assert not os.path.exists(sentinel)

    # the payload is live: unpickling it does run it
    pickle.loads(evil_raw.read_bytes())
    assert os.path.exists(sentinel)


def test_save_rejects_bad_metadata_and_non_modules(tmp_path):
    model = _palettized({"n_bits": 2})
    with pytest.raises(TypeError, match="JSON"):
        save_palettized(model, tmp_path / "x.safetensors", metadata={"f": object()})
    with pytest.raises(TypeError, match="metadata must be a dict"):
        save_palettized(model, tmp_path / "x.safetensors", metadata=[1])
    with pytest.raises(TypeError, match="nn.Module"):
        save_palettized({"w": torch.zeros(2)}, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written


# ----------------------------------------------------------------------------- Core ML


class _ConvNet(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(8, 16, 3)
        self.fc1 = nn.Linear(16 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def _lut_ops(mlmodel):
    def walk(block):
        for op in block.operations:
            yield op
            for inner in op.blocks:
                yield from walk(inner)

    return [op for op in walk(mlmodel._mil_program.functions["main"])
            if op.op_type == "constexpr_lut_to_dense"]  # fmt: skip


COREML_CONFIGS = {
    "per_tensor": {"n_bits": 4},
    "grouped": {"n_bits": 2, "granularity": "per_grouped_channel", "group_size": 8},
    "scale": {"n_bits": 3, "enable_per_channel_scale": True},
    "int8_lut": {"n_bits": 4, "lut_dtype": "int8"},
}


@pytest.fixture
def ct():
    ct = pytest.importorskip("coremltools")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield ct


@pytest.mark.parametrize("cfg", COREML_CONFIGS.values(), ids=COREML_CONFIGS.keys())
def test_export_coreml_emits_a_lut_op_per_palettized_weight(cfg, ct, tmp_path):
    model = PostTrainingPalettizer(_ConvNet(), {"global_config": cfg}).compress(progress=False)
    # what is exported is the model restored from the compact file
    save_palettized(model, tmp_path / "m.safetensors")
    loaded = load_palettized(tmp_path / "m.safetensors", _ConvNet(seed=3)).train()
    out = tmp_path / "m.mlpackage"
    mlmodel = export_coreml(loaded, (torch.randn(1, 8, 8, 8),), out)
    assert isinstance(mlmodel, ct.models.MLModel)
    assert (out / "Manifest.json").exists()
    ops = _lut_ops(mlmodel)
    assert len(ops) == 3
    assert sorted(int(op.lut.shape[-2]) for op in ops) == [2 ** cfg["n_bits"]] * 3
    assert loaded.training  # mode restored


def test_export_coreml_deployment_targets(ct):
    per_tensor = PostTrainingPalettizer(_ConvNet(), {"global_config": {"n_bits": 4}})
    per_tensor = per_tensor.compress(progress=False)
    assert len(_lut_ops(export_coreml(per_tensor, torch.randn(1, 8, 8, 8),
                                      minimum_deployment_target=ct.target.iOS16))) == 3  # fmt: skip
    with pytest.raises(ValueError, match="iOS15"):
        export_coreml(per_tensor, torch.randn(1, 8, 8, 8),
                      minimum_deployment_target=ct.target.iOS15)  # fmt: skip
    grouped = PostTrainingPalettizer(_ConvNet(), {"global_config": COREML_CONFIGS["grouped"]})
    grouped = grouped.compress(progress=False)
    with pytest.raises(ValueError, match=re.escape("['conv.weight', 'fc1.weight']")):
        export_coreml(grouped, torch.randn(1, 8, 8, 8), minimum_deployment_target=ct.target.iOS17)
    with pytest.raises(ValueError, match="mlpackage"):
        export_coreml(grouped, torch.randn(1, 8, 8, 8), "model.mlmodel")
    with pytest.raises(ValueError, match="convert_to"):
        export_coreml(grouped, torch.randn(1, 8, 8, 8), convert_kwargs={"convert_to": "x"})


def test_export_coreml_names_weights_that_lost_their_lut(ct):
    class _WithSpare(_ConvNet):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(32, 32)  # palettized, never used in forward

    model = PostTrainingPalettizer(_WithSpare(), {"global_config": {"n_bits": 4}})
    model = model.compress(progress=False)
    with pytest.raises(ValueError, match=r"\['spare.weight'\]"):
        export_coreml(model, torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match="no palettized weights"):
        export_coreml(strip_coreml_metadata(copy.deepcopy(model)), torch.randn(1, 8, 8, 8))


def test_export_coreml_without_coremltools_says_how_to_install(monkeypatch):
    model = PostTrainingPalettizer(_ConvNet(), {"global_config": {"n_bits": 4}})
    model = model.compress(progress=False)
    monkeypatch.setitem(sys.modules, "coremltools", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'lightning-palettize[coreml]'")):
        export_coreml(model, torch.randn(1, 8, 8, 8))


def _skm_with_outliers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    sensitivity = {"0.weight": torch.rand(32, 64) ** 8}
    cfg = {"global_config": {"n_bits": 4, "outlier_fraction": 0.02}}
    return SKMPalettizer(model, cfg).compress(sensitivity=sensitivity, progress=False)


def test_export_coreml_refuses_outliers_unless_allowed(ct, monkeypatch):
    model = _skm_with_outliers()
    convert = ct.convert
    monkeypatch.setattr(ct, "convert", lambda *a, **k: pytest.fail("converted a lossy model"))
    with pytest.raises(ValueError, match=r"'0\.weight' \(40 of 2048 elements") as info:
        export_coreml(model, torch.randn(1, 64))
    assert "outlier_fraction=0" in str(info.value) and "save_palettized" in str(info.value)
    monkeypatch.setattr(ct, "convert", convert)
    with pytest.warns(UserWarning, match=r"'0\.weight'.*allow_outliers=True"):
        mlmodel = export_coreml(model, torch.randn(1, 64), allow_outliers=True)
    assert len(_lut_ops(mlmodel)) == 1


@pytest.mark.parametrize(
    ("n_bits", "target", "needle"),
    [(5, "iOS18", "5 bits"), (7, "iOS16", "7 bits"), (3, "iOS16", "use ct.target.iOS18"),
     (3, "iOS17", "use ct.target.iOS18")],
)  # fmt: skip
def test_export_coreml_refuses_index_widths_before_converting(n_bits, target, needle, ct,
                                                              monkeypatch):  # fmt: skip
    model = PostTrainingPalettizer(_mlp(), {"global_config": {"n_bits": n_bits}})
    model = model.compress(progress=False)
    monkeypatch.setattr(ct, "convert", lambda *a, **k: pytest.fail("reached coremltools"))
    with pytest.raises(ValueError, match=re.escape("['0.weight', '2.weight'] use")) as info:
        export_coreml(model, torch.randn(1, 16), minimum_deployment_target=ct.target[target])
    assert needle in str(info.value) and target in str(info.value)


def test_export_coreml_index_widths_core_ml_takes(ct):
    for n_bits, target in ((3, ct.target.iOS18), (6, ct.target.iOS16)):
        model = PostTrainingPalettizer(nn.Sequential(nn.Linear(16, 8)),
                                       {"global_config": {"n_bits": n_bits}})  # fmt: skip
        mlmodel = export_coreml(model.compress(progress=False), torch.randn(1, 16),
                                minimum_deployment_target=target)  # fmt: skip
        assert [op.lut.shape[-2] if op.lut.rank > 1 else op.lut.shape[0]
                for op in _lut_ops(mlmodel)] == [2**n_bits]  # fmt: skip


def test_export_coreml_restores_each_submodules_mode(ct):
    model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    model = PostTrainingPalettizer(model, {"global_config": {"n_bits": 2}}).compress(progress=False)
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    modes = [m.training for m in model.modules()]
    assert len(_lut_ops(export_coreml(model, torch.randn(2, 16)))) == 2
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(RuntimeError):  # wrong input width: tracing fails
        export_coreml(model, torch.randn(2, 15))
    assert [m.training for m in model.modules()] == modes


def test_export_coreml_fp16_lut_is_the_torch_lut(ct):
    # a half-precision palette's float32 LUT holds fp16 values: Core ML's float16 program
    # (its lut cast to fp16) uses exactly the values the fp16 torch weights hold
    model = PostTrainingPalettizer(_ConvNet().half(), {"global_config": {"n_bits": 4}})
    model = model.compress(progress=False).float()
    ops = _lut_ops(export_coreml(model, torch.randn(1, 8, 8, 8)))
    assert len(ops) == 3
    luts = {tuple(op.outputs[0].shape): op.lut.val for op in ops}
    for module in (model.conv, model.fc1, model.fc2):
        want = getattr(module, "_COREML_/weight/lut").reshape(-1)
        got = torch.from_numpy(luts[tuple(module.weight.shape)].astype("float32")).reshape(-1)
        assert torch.equal(got, want)
        assert set(module.weight.unique().tolist()) <= set(want.tolist())
