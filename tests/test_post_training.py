"""PostTrainingPalettizer: options, modules, atomicity, metadata, report, coremltools parity."""

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_palettize import (
    PostTrainingPalettizer,
    PostTrainingPalettizerConfig,
    strip_coreml_metadata,
)
from lightning_palettize.kmeans import kmeans_1d


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 8)
    )


class _AllModules(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(32, 16)
        self.c1 = nn.Conv1d(4, 8, 3)
        self.c2 = nn.Conv2d(4, 8, 3)
        self.c3 = nn.Conv3d(4, 8, 3)
        self.t1 = nn.ConvTranspose1d(8, 4, 3)
        self.t2 = nn.ConvTranspose2d(8, 4, 3)
        self.emb = nn.Embedding(50, 16)
        self.mha = nn.MultiheadAttention(16, 2)
        self.norm = nn.LayerNorm(16)  # not a PTP module: must stay untouched


class _MyLinear(nn.Linear):
    pass


def _weights(model):
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n.endswith("weight") and "norm" not in n
    }


def _distinct_per_group(w, group_axis=0, group_size=None):
    w = w.movedim(group_axis, 0)
    size = group_size or w.shape[0]
    return [len(torch.unique(w[i : i + size])) for i in range(0, w.shape[0], size)]


@pytest.mark.parametrize("n_bits", [1, 2, 3, 4, 8])
def test_every_supported_module_palettized_per_tensor(n_bits):
    model = _AllModules()
    before = copy.deepcopy(model.state_dict())
    out = PostTrainingPalettizer(model, {"global_config": {"n_bits": n_bits}}).compress(
        progress=False
    )
    # input untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    palettized = _weights(out)
    assert set(palettized) == {
        "lin.weight",
        "c1.weight",
        "c2.weight",
        "c3.weight",
        "t1.weight",
        "t2.weight",
        "emb.weight",
        "mha.in_proj_weight",
        "mha.out_proj.weight",
    }
    for name, w in palettized.items():
        assert len(torch.unique(w)) <= 2**n_bits, name
    # biases and LayerNorm untouched
    assert torch.equal(out.lin.bias, model.lin.bias)
    assert torch.equal(out.norm.weight, model.norm.weight)
    assert "norm._COREML_/weight/lut" not in out.state_dict()


def test_weights_equal_lut_entries_and_optimal_lut():
    model = _mlp()
    out = PostTrainingPalettizer(model, {"global_config": {"n_bits": 3}}).compress(progress=False)
    for i in (0, 2, 4):
        lut = getattr(out[i], "_COREML_/weight/lut").reshape(-1)
        w = out[i].weight
        assert set(torch.unique(w).tolist()) <= set(lut.tolist())
        exact = kmeans_1d(model[i].weight.detach().reshape(1, -1), 8, exact=True)
        opt = exact.inertia.item()
        ours = ((model[i].weight - w) ** 2).sum().item()
        assert ours <= opt * 1.001 + 1e-12


@pytest.mark.parametrize("axis", [0, 1])
def test_grouped_channels_along_either_axis(axis):
    model = _mlp()
    cfg = {
        "global_config": {
            "n_bits": 2,
            "granularity": "per_grouped_channel",
            "group_size": 8,
            "channel_axis": axis,
        }
    }
    out = PostTrainingPalettizer(model, cfg).compress(progress=False)
    for i in (0, 2, 4):
        counts = _distinct_per_group(out[i].weight, axis, 8)
        assert max(counts) <= 4 and len(counts) == out[i].weight.shape[axis] // 8
        lut = getattr(out[i], "_COREML_/weight/lut")
        expect = [1, 1, 4, 1]
        expect[axis] = out[i].weight.shape[axis] // 8
        assert list(lut.shape) == expect


def test_vectors_per_channel_scale_and_lut_quantization():
    model = _mlp()
    out = PostTrainingPalettizer(
        model, {"global_config": {"n_bits": 2, "cluster_dim": 2}}
    ).compress(progress=False)
    w = out[2].weight  # (32, 128): vectors of 2 consecutive output channels
    pairs = w.reshape(16, 2, 128).permute(0, 2, 1).reshape(-1, 2)
    assert len(torch.unique(pairs, dim=0)) <= 4
    assert int(getattr(out[2], "_COREML_/weight/vector_axis")) == 0

    out = PostTrainingPalettizer(
        model, {"global_config": {"n_bits": 2, "enable_per_channel_scale": True}}
    ).compress(progress=False)
    scale = getattr(out[0], "_COREML_/weight/palettization_scale")
    assert scale.shape == (128, 1)
    torch.testing.assert_close(scale.squeeze(1), model[0].weight.abs().amax(dim=1))
    normed = out[0].weight / scale
    assert len(torch.unique(torch.round(normed * 1e5))) <= 4

    for qdtype in ("int8", "uint8"):
        out = PostTrainingPalettizer(
            model, {"global_config": {"n_bits": 4, "lut_dtype": qdtype}}
        ).compress(progress=False)
        lut = getattr(out[0], "_COREML_/weight/lut")
        qs = getattr(out[0], "_COREML_/weight/quantization_scale")
        codes = lut / qs
        torch.testing.assert_close(codes, torch.round(codes), atol=1e-4, rtol=0)
        assert out.state_dict()["0._COREML_/weight/compression_type"].tolist() == [2, 3]


def test_subclass_and_name_and_type_selection():
    model = nn.Sequential(_MyLinear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    cfg = PostTrainingPalettizerConfig.from_dict(
        {
            "global_config": {"n_bits": 4},
            "module_type_configs": {"Linear": {"n_bits": 2}},
            "module_name_configs": {"2": None},
        }
    )
    out = PostTrainingPalettizer(model, cfg).compress(progress=False)
    assert len(torch.unique(out[0].weight)) <= 4  # subclass uses the Linear config
    assert len(torch.unique(out[1].weight)) <= 4
    assert torch.equal(out[2].weight, model[2].weight)  # disabled by name


def test_inplace_and_failed_call_leaves_model_unchanged():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    # group_size 16 divides 128 and 32 but not the last layer's 8 outputs: nothing may change
    cfg = {"global_config": {"granularity": "per_grouped_channel", "group_size": 16}}
    with pytest.raises(ValueError, match=r"4\.weight.*group_size"):
        PostTrainingPalettizer(model, cfg).compress(inplace=True, progress=False)
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    out = PostTrainingPalettizer(model, {"global_config": {"n_bits": 2}}).compress(
        inplace=True, progress=False
    )
    assert out is model and len(torch.unique(model[0].weight)) <= 4


def test_bf16_and_fp16_weights():
    for dtype in (torch.bfloat16, torch.float16):
        model = _mlp().to(dtype)
        out = PostTrainingPalettizer(model).compress(progress=False)
        assert out[0].weight.dtype == dtype
        assert len(torch.unique(out[0].weight)) <= 16
        report = PostTrainingPalettizer(model).compress(progress=False)
        assert report is not None


def test_report_rows_and_bytes():
    model = _mlp()
    p = PostTrainingPalettizer(model, {"global_config": {"n_bits": 4}})
    out = p.compress(progress=False)
    rep = p.report()
    assert list(rep) == ["0.weight", "2.weight", "4.weight"]
    row = rep["0.weight"]
    assert row.num_params == 64 * 128 and row.n_bits == 4 and row.num_luts == 1
    assert row.bytes_before == 64 * 128 * 4
    assert row.bytes_after == 64 * 128 * 4 // 8 + 16 * 4
    rel = ((model[0].weight - out[0].weight) ** 2).sum() / (model[0].weight ** 2).sum()
    assert row.rel_error == pytest.approx(rel.item(), rel=1e-5)
    table = rep.to_table()
    assert "0.weight" in table and "TOTAL" in table
    assert rep.summary()["compression_ratio"] > 7


def test_progress_can_be_silenced(capsys):
    PostTrainingPalettizer(_mlp()).compress(progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_progress_shows_for_long_work_only(capsys, monkeypatch):
    from lightning_palettize import _progress

    PostTrainingPalettizer(_mlp()).compress()  # tests show bars at once (conftest)
    assert "k-means palettization" in capsys.readouterr().err
    monkeypatch.setattr(_progress, "DELAY_S", 30.0)  # the library default is 0.5 s
    PostTrainingPalettizer(_mlp()).compress()
    assert capsys.readouterr().err == ""


def test_metadata_can_be_stripped_for_strict_loading():
    model = _mlp()
    out = PostTrainingPalettizer(model).compress(progress=False)
    assert any("_COREML_" in k for k in out.state_dict())
    fresh = _mlp()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(out.state_dict())
    fresh.load_state_dict(strip_coreml_metadata(copy.deepcopy(out)).state_dict())
    assert torch.equal(fresh[0].weight, out[0].weight)


def test_bad_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        PostTrainingPalettizer("model")
    with pytest.raises(ValueError, match="n_bits"):
        PostTrainingPalettizer(_mlp(), {"global_config": {"n_bits": 9}})
    with pytest.raises(ValueError, match="num_kmeans_workers"):
        PostTrainingPalettizer(_mlp()).compress(num_kmeans_workers=0)


coremltools = pytest.importorskip("coremltools")


def _ct_ops(mlmodel):
    ops = []

    def walk(block):
        for op in block.operations:
            ops.append(op)
            for b in op.blocks:
                walk(b)

    walk(mlmodel._mil_program.functions["main"])
    return ops


@pytest.mark.parametrize(
    "cfg",
    [
        {"n_bits": 4},
        {"n_bits": 2, "granularity": "per_grouped_channel", "group_size": 8},
        {"n_bits": 3, "enable_per_channel_scale": True},
        {"n_bits": 4, "lut_dtype": "int8"},
    ],
)
def test_coreml_conversion_emits_lut_ops(cfg):
    import coremltools as ct

    model = _mlp().eval()
    out = PostTrainingPalettizer(model, {"global_config": cfg}).compress(progress=False).eval()
    traced = torch.jit.trace(out, torch.randn(1, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = ct.convert(
            traced,
            inputs=[ct.TensorType(shape=(1, 64))],
            minimum_deployment_target=ct.target.iOS18,
            skip_model_load=True,
            convert_to="mlprogram",
        )
    luts = [op for op in _ct_ops(ml) if op.op_type == "constexpr_lut_to_dense"]
    assert len(luts) == 3
    k = 2 ** cfg["n_bits"]
    assert sorted(int(op.lut.shape[-2]) for op in luts) == [k, k, k]


@pytest.mark.parametrize("granularity", ["per_tensor", "per_grouped_channel"])
def test_error_not_worse_than_coremltools(granularity):
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer as CtPTP
    from coremltools.optimize.torch.palettization import (
        PostTrainingPalettizerConfig as CtConfig,
    )

    model = _mlp()
    cfg = {"global_config": {"n_bits": 4, "granularity": granularity}}
    if granularity == "per_grouped_channel":
        cfg["global_config"]["group_size"] = 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = CtPTP(copy.deepcopy(model), CtConfig.from_dict(cfg)).compress()
    ours = PostTrainingPalettizer(model, cfg).compress(progress=False)
    for i in (0, 2, 4):
        w = model[i].weight
        e_ours = ((w - ours[i].weight) ** 2).sum().item()
        e_theirs = ((w - theirs[i].weight) ** 2).sum().item()
        assert e_ours <= e_theirs * 1.001, (i, e_ours, e_theirs)


class _Exotic(nn.Module):
    """Attributes deepcopy must copy, share or re-create: see test_copy_model_equals_deepcopy."""

    def __init__(self, shared):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # tied
        self.shared1, self.shared2 = shared, shared  # one module twice
        self.register_buffer("steps", torch.tensor(3))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.notes = {"list": [1, 2], "t": torch.ones(2)}
        self.kernel = (3, 3)
        self.dtype_attr = torch.float16
        self.empty = None
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)


class _OwnCopy(nn.Linear):
    def __deepcopy__(self, memo):
        new = nn.Linear.__new__(type(self))
        nn.Module.__init__(new)
        new.in_features, new.out_features = self.in_features, self.out_features
        new.weight = nn.Parameter(self.weight.detach().clone())
        new.bias = None
        new.copied_by_own_protocol = True
        return new


class _TupleState(nn.Linear):
    def __getstate__(self):
        return (dict(self.__dict__), "extra")

    def __setstate__(self, state):
        self.__dict__.update(state[0])
        self.restored_from = state[1]


def test_copy_model_equals_deepcopy():
    from lightning_palettize.palettizers._common import copy_model

    shared = nn.Linear(4, 2)
    model = nn.Sequential(_Exotic(shared), _OwnCopy(4, 4), nn.ReLU(), _TupleState(4, 4)).eval()
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append(1))
    model[0].a.weight.grad = torch.ones(4, 4)
    twin, ref = copy_model(model), copy.deepcopy(model)
    if True:
        assert type(twin) is type(ref) and not twin.training
        a, r = twin[0], ref[0]
        assert a.b.weight is a.a.weight and a.a.weight is not model[0].a.weight
        assert a.shared1 is a.shared2 and a.shared1 is not shared
        assert a.notes is not model[0].notes and a.notes["list"] == [1, 2]
        assert torch.equal(a.notes["t"], r.notes["t"])
        assert a.notes["t"] is not model[0].notes["t"]
        assert a.kernel == (3, 3) and a.dtype_attr is torch.float16 and a.empty is None
        assert not a.frozen.requires_grad and a.a.weight.requires_grad
        assert (a.a.weight.grad is None) == (r.a.weight.grad is None)  # (Parameter's own rule)
        assert "scratch" in a._non_persistent_buffers_set
        assert a._non_persistent_buffers_set is not model[0]._non_persistent_buffers_set
        assert twin[1].copied_by_own_protocol  # its own __deepcopy__ ran
        assert twin[3].restored_from == "extra"  # a non-dict state: deepcopy's own path
        assert twin.state_dict().keys() == ref.state_dict().keys()
        for (k, v), w in zip(twin.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(v, w), k
        # hooks come along; changing the copy leaves the original alone
        assert len(a._forward_hooks) == 1
        a.a.weight.data.zero_()
        a.kernel = (1, 1)
        assert model[0].a.weight.abs().sum() > 0 and model[0].kernel == (3, 3)


def test_batched_planning_equals_one_weight_at_a_time(monkeypatch):
    from lightning_palettize.palettizers import _common

    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.Linear(128, 32).to(torch.bfloat16), nn.Conv2d(8, 16, 3)
    )
    cfg = {
        "global_config": {"n_bits": 3, "granularity": "per_grouped_channel", "group_size": 8},
        "module_name_configs": {"1": {"n_bits": 2}, "2": {"n_bits": 4, "cluster_dim": 2}},
    }
    together = PostTrainingPalettizer(model, cfg)
    out_together = together.compress(progress=False)
    monkeypatch.setattr(_common, "PLAN_BATCH_ELEMS", 1)  # one weight per batch
    alone = PostTrainingPalettizer(model, cfg)
    out_alone = alone.compress(progress=False)
    for (name, a), b in zip(out_together.state_dict().items(), out_alone.state_dict().values()):
        assert torch.equal(a, b), name
    assert together.report().to_table() == alone.report().to_table()


def _unchanged(model, before):
    state = model.state_dict()
    return state.keys() == before.keys() and all(torch.equal(before[k], state[k]) for k in state)


def test_per_channel_scale_with_quantized_lut_fails_before_any_write():
    # the coremltools converter rejects the pair; the error names the weight and comes before
    # the first weight is written (it used to come from the metadata, mid-write)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    before = copy.deepcopy(model.state_dict())
    cfg = {
        "global_config": {"n_bits": 2},
        "module_name_configs": {
            "1": {"n_bits": 2, "enable_per_channel_scale": True, "lut_dtype": "int8"}
        },
    }
    with pytest.raises(ValueError, match="1.weight: enable_per_channel_scale=True with lut_dtype"):
        PostTrainingPalettizer(model, cfg).compress(inplace=True, progress=False)
    assert _unchanged(model, before)


def test_non_finite_weight_error_names_the_weight():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[3, 1] = float("inf")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"2.weight \(32, 128\): contains NaN or Inf"):
        PostTrainingPalettizer(model).compress(inplace=True, progress=False)
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    "reparametrize, match",
    [
        (lambda m: nn.utils.parametrizations.weight_norm(m), "parametrization"),
        (lambda m: nn.utils.parametrizations.spectral_norm(m), "parametrization"),
        (lambda m: nn.utils.weight_norm(m), "neither a parameter nor a buffer"),
        (lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight", 0.5), "prune.remove"),
    ],
)
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_weight_computed_in_forward_is_rejected(reparametrize, match):
    # palettizing it would write into a temporary the next forward recomputes (coremltools
    # raises too); the error says how to make the weight a parameter or exclude the module
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    reparametrize(model[1])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match) as err:
        PostTrainingPalettizer(model).compress(inplace=True, progress=False)
    assert "1.weight" in str(err.value) and "{'1': None}" in str(err.value)
    assert _unchanged(model, before)
    excluded = PostTrainingPalettizer(
        model, {"global_config": {"n_bits": 4}, "module_name_configs": {"1": None}}
    )
    excluded.compress(inplace=True, progress=False)  # (legacy weight_norm: no deepcopy)
    assert [row.name for row in excluded.report().rows] == ["0.weight"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_lut_holds_the_weights_values(dtype):
    # the float32 LUT of a half-precision weight is rounded to its dtype: its entries are the
    # values the weight holds (so the compact file stores it at 2 bytes an entry), and without
    # a scale the weight is what the unrounded LUT gave (its rounding to the dtype)
    from lightning_palettize.kmeans import kmeans_many
    from lightning_palettize.palette import Layout, Palette
    from lightning_palettize.palettizers._common import scaled_groups

    model = _mlp().to(dtype)
    cfg = {"global_config": {"n_bits": 4, "granularity": "per_grouped_channel", "group_size": 4}}
    out = PostTrainingPalettizer(model, cfg).compress(progress=False)
    lut = getattr(out[0], "_COREML_/weight/lut")
    assert lut.dtype == torch.float32 and lut.shape == (32, 1, 16, 1)
    assert torch.equal(lut, lut.to(dtype).float())
    weight = out[0].weight.float()
    for group in range(32):
        rows = weight[4 * group : 4 * group + 4]
        assert set(rows.unique().tolist()) <= set(lut[group].reshape(-1).tolist())
    layout = Layout((128, 64), "per_grouped_channel", 4)
    x, _ = scaled_groups(model[0].weight, layout, None)
    found = kmeans_many([x], [16], [None], exact=False)[0]
    unrounded = Palette(layout, 4, found.centroids.float().contiguous(),
                        found.labels.to(torch.uint8), dtype=dtype)  # fmt: skip
    assert torch.equal(unrounded.dequantize().view(torch.int16), out[0].weight.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_scale_and_quantized_luts(dtype):
    model = _mlp().to(dtype)
    scaled = PostTrainingPalettizer(
        model, {"global_config": {"n_bits": 4, "enable_per_channel_scale": True}}
    ).compress(progress=False)
    lut = getattr(scaled[0], "_COREML_/weight/lut")
    scale = getattr(scaled[0], "_COREML_/weight/palettization_scale")
    assert torch.equal(lut, lut.to(dtype).float())  # rounded in the scaled domain
    assert scale.dtype == torch.float32
    values = (scale * lut.reshape(1, 16)).to(dtype)  # each row: its scale times the LUT
    assert all(
        set(row.tolist()) <= set(v.tolist()) for row, v in zip(scaled[0].weight.float(), values)
    )
    # a quantized LUT stays code * quantization_scale in float32, as coremltools has it
    quantized = PostTrainingPalettizer(
        model, {"global_config": {"n_bits": 4, "lut_dtype": "int8"}}
    ).compress(progress=False)
    lut = getattr(quantized[0], "_COREML_/weight/lut")
    qscale = getattr(quantized[0], "_COREML_/weight/quantization_scale")
    codes = torch.round(lut / qscale)
    assert torch.equal(codes * qscale, lut) and codes.abs().max() == 127
