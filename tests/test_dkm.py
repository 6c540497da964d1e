"""DKMPalettizer: equality to a dense reference DKM, milestones, training, finalize, state."""

import copy
import pickle
import warnings
import weakref

import pytest
import torch
from test_soft_kmeans import _HostReads
from torch import nn

from lightning_palettize import DKMPalettizer, PostTrainingPalettizer, strip_coreml_metadata
from lightning_palettize.palettizers.dkm import (
    _attached,
    _fake_palettizers,
    load_prepared_state_dict,
)

# small tensors: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(hidden: int, intermediate: int, layers: int, vocab: int):
    """A randomly initialized transformers LlamaForCausalLM of 4 heads (skips without
    transformers)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab,
    )
    return transformers.LlamaForCausalLM(config)


def _fp16_exact(module):
    # weights exactly representable in fp16: the table engine then matches the dense math tightly
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def _reference_dkm(w, cfg, cent, scale=None):
    """Naive dense DKM: full N x K autograd tensors, written from the math."""
    from lightning_palettize.palette import Layout

    layout = Layout(
        tuple(w.shape),
        cfg.get("granularity", "per_tensor"),
        cfg.get("group_size"),
        cfg.get("channel_axis", 0),
        cfg.get("cluster_dim", 1),
    )
    x = w if scale is None else w / scale
    xg = layout.to_groups(x)  # [G, N, d]
    c = cent.clone()
    tau = cfg.get("palett_tau", 1e-4)
    prev = None
    for _ in range(cfg.get("kmeans_max_iter", 3)):
        d = ((xg.unsqueeze(2) - c.unsqueeze(1)) ** 2).sum(-1)  # [G, N, K]
        prune = cfg.get("prune_threshold", 1e-7)  # coremltools' default pulls toward slot 0
        if prune > 0:
            d = torch.cat([d[..., :1] - prune, d[..., 1:]], dim=-1)
        elif cfg.get("enforce_zero"):
            nonzero = (xg != 0).any(-1)
            d = d.clone()
            d[..., 0] = torch.where(nonzero, torch.full_like(d[..., 0], 1e7), d[..., 0])
        if cfg.get("palett_mode", "dkm") == "hard":
            a = nn.functional.one_hot(d.argmin(-1), c.shape[1]).float()
        else:
            a = torch.softmax(-d / tau, dim=-1)
        mass = a.sum(1)  # [G, K]
        newc = torch.einsum("gnk,gnd->gkd", a, xg) / mass.clamp_min(1e-30).unsqueeze(-1)
        c = torch.where(mass.unsqueeze(-1) > 0, newc, c)
        if cfg.get("enforce_zero"):
            c = torch.cat([torch.zeros_like(c[:, :1]), c[:, 1:]], dim=1)
        inertia = d.min(-1).values.sum(1)
        if prev is not None and bool(
            ((inertia - prev).abs() <= cfg.get("palett_epsilon", 1e-4)).all()
        ):
            break
        prev = inertia
    out = layout.from_groups(torch.einsum("gnk,gkd->gnd", a, c))
    return out if scale is None else out * scale


def _dkm_and_reference(lin, cfg):
    """(out, d(out . g)/dw) of a prepared lin's first DKM forward and of the dense reference,
    with the initial centroids and the per-channel scale (or None)."""
    model = DKMPalettizer(lin, {"global_config": cfg}).prepare()
    fp = model.weight_dkm
    cent0 = fp.centroids.clone()
    scale = fp.scale.clone() if cfg.get("enable_per_channel_scale") else None
    w = model.weight
    out = fp(w)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * g).sum(), w)
    w_ref = w.detach().clone().requires_grad_(True)
    ref = _reference_dkm(w_ref, cfg, cent0, scale)
    (grad_ref,) = torch.autograd.grad((ref * g).sum(), w_ref)
    return out, grad, ref, grad_ref, cent0, scale


CASES = [
    {},
    {"granularity": "per_grouped_channel", "group_size": 8},
    {"cluster_dim": 2},
    {"enable_per_channel_scale": True},
    {"enable_per_channel_scale": True, "per_channel_scaling_factor_scheme": "abs"},
    {"enforce_zero": True},
    {"enforce_zero": True, "prune_threshold": 0.0},
    {"prune_threshold": 1e-3},
    {"palett_mode": "hard"},
    {"palett_tau": 1e-3, "kmeans_max_iter": 2},
    {"palett_epsilon": 1e3},  # always stops after the second iteration
]


@pytest.mark.parametrize("extra", CASES, ids=[str(c) for c in CASES])
def test_forward_and_gradient_equal_dense_reference(extra):
    torch.manual_seed(0)
    lin = _fp16_exact(nn.Linear(48, 32))
    # epsilon 0: no early stop that a last-bit difference in the inertia could flip
    cfg = {"n_bits": 2, "weight_threshold": 0, "palett_epsilon": 0.0, **extra}
    out, grad, ref, grad_ref, _, scale = _dkm_and_reference(lin, cfg)
    if scale is None:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-3, atol=1e-5)
    else:
        # w / scale is not fp16-exact: the per-code engine differs by the 16-bit rounding
        assert (out - ref).norm() <= 1e-4 * ref.norm()
        assert (grad - grad_ref).norm() <= 2e-3 * grad_ref.norm()
    if cfg.get("palett_mode") != "hard":
        assert grad.abs().sum() > 0


GRID_CASES = [
    {},
    {"granularity": "per_grouped_channel", "group_size": 16},
    {"n_bits": 2, "granularity": "per_grouped_channel", "group_size": 16},
    {"palett_tau": 1e-3},
    # weights / scale reach +-1: at tau 1e-4 the grid would need too many nodes (exact engine)
    {"enable_per_channel_scale": True, "palett_tau": 1e-2},
]


@pytest.mark.parametrize("extra", GRID_CASES, ids=[str(c) for c in GRID_CASES])
def test_grid_engine_layers_close_to_dense_reference(extra, monkeypatch):
    # LUT groups of >= 4096 generic fp32 weights run on the grid engine (interpolated)
    import lightning_palettize.soft_kmeans as sk

    grids = []
    spec_fn = sk._grid_spec
    monkeypatch.setattr(sk, "_grid_spec", lambda *a: grids.append(spec_fn(*a)) or grids[-1])
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    cfg = {"n_bits": 4, "weight_threshold": 0, "palett_epsilon": 0.0, **extra}
    out, grad, ref, grad_ref, cent0, scale = _dkm_and_reference(lin, cfg)
    assert grids and grids[-1] is not None  # the grid ran
    gap = cent0.sort(1).values.diff(dim=1).amax()
    if scale is not None:
        gap = gap * scale.abs().max()
    assert (out - ref).abs().max() <= 2e-3 * gap
    assert (grad - grad_ref).norm() <= 3e-3 * grad_ref.norm()
    assert grad.abs().sum() > 0


def test_prepare_keeps_parameters_and_adds_no_learnables():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    DKMPalettizer(model, {"global_config": {"weight_threshold": 0}}).prepare(inplace=True)
    assert list(model.parameters()) == params
    assert all(a is b for a, b in zip(model.parameters(), params))
    loss = model(torch.randn(4, 64)).square().sum()
    loss.backward()
    before = model[0].weight.detach().clone()
    opt.step()  # the optimizer built before prepare updates the same Parameter
    assert not torch.equal(before, model[0].weight.detach())


def test_milestone_passes_weights_through_until_reached():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    ref = copy.deepcopy(model)
    cfg = {"global_config": {"n_bits": 2, "milestone": 2, "weight_threshold": 0}}
    pal = DKMPalettizer(model, cfg)
    prepared = pal.prepare()
    x = torch.randn(5, 32)
    for step in range(3):
        out = prepared(x)
        if step < 2:
            assert torch.equal(out, ref(x)), step
        else:
            assert not torch.allclose(out, ref(x))
        pal.step()
    assert pal.steps == 3


def test_step_walk_finds_what_named_modules_finds_in_its_order():
    # step() walks the model with _attached; finalize and report with named_modules
    shared = nn.Linear(4, 4)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 4), nn.Sequential(shared, nn.Linear(4, 4))),
        shared,  # the same module again: found once, at its first place
        nn.Conv1d(4, 4, 1),
        nn.Sequential(nn.Embedding(8, 4), nn.LayerNorm(4)),
    )
    model.register_module("empty", None)
    model.head = nn.Linear(4, 4)
    cfg = {"global_config": {"n_bits": 2, "weight_threshold": 0}}
    pal = DKMPalettizer(model, cfg)
    prepared = pal.prepare()
    named = [(module, fp) for _, module, _, fp in _fake_palettizers(prepared)]
    assert len(named) == 7
    assert [(id(m), id(fp)) for m, fp in _attached(prepared)] == [
        (id(m), id(fp)) for m, fp in named
    ]
    pal.step()
    assert pal.steps == 1 and all(fp.step_count == 1 for _, fp in named)


def test_error_right_after_milestone_matches_post_training():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    for n_bits in (2, 4):
        pal = DKMPalettizer(model, {"global_config": {"n_bits": n_bits}})
        prepared = pal.prepare()
        ptp = PostTrainingPalettizer(model, {"global_config": {"n_bits": n_bits}})
        ptp.compress(progress=False)
        dkm_rows, ptp_rows = pal.report(), ptp.report()
        for name in ptp_rows:
            assert dkm_rows[name].rel_error <= 1.05 * ptp_rows[name].rel_error + 1e-12
        assert prepared is not model


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    return x, torch.tensor(d.target)


def test_training_lowers_loss_and_finalize_gives_a_palette():
    pytest.importorskip("sklearn")
    torch.manual_seed(3)
    x, y = _digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    pal = DKMPalettizer(
        model,
        {
            "global_config": {
                "n_bits": 2,
                "granularity": "per_grouped_channel",
                "group_size": 8,
                "weight_threshold": 0,
                "palett_tau": 1e-3,
            },
            "module_name_configs": {"2": {"n_bits": 4, "weight_threshold": 0}},
        },
    )
    model = pal.prepare(inplace=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for i in range(60):
        idx = torch.randint(0, len(x), (64,), generator=torch.Generator().manual_seed(i))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        pal.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    final = pal.finalize()
    w = final[0].weight.detach()
    for g in range(w.shape[0] // 8):
        assert len(torch.unique(w[g * 8 : (g + 1) * 8])) <= 4
    assert len(torch.unique(final[2].weight)) <= 16
    acc = (final(x).argmax(1) == y).float().mean().item()
    assert acc > 0.6


class _AllTypes(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.conv1 = nn.Conv1d(32, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv3 = nn.Conv3d(1, 4, 3, padding=1)
        self.tconv = nn.ConvTranspose2d(8, 4, 3, padding=1)
        self.norm = nn.LayerNorm(32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, tokens):
        h = self.emb(tokens)  # [B, T, 32]
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2)
        h = self.norm(h)
        h, _ = self.mha(h, h, h)
        img = h.mean(-1, keepdim=True).unsqueeze(1).expand(-1, 1, -1, 8)  # [B,1,T,8]
        img = self.tconv(self.conv2(img))
        vol = self.conv3(img[:, :1].unsqueeze(1))
        return self.head(h.mean(1)) + vol.mean() + img.mean()


def test_every_module_type_finalizes_and_loads_strictly():
    torch.manual_seed(4)
    model = _AllTypes()
    pal = DKMPalettizer(model, {"global_config": {"n_bits": 2, "weight_threshold": 0}})
    prepared = pal.prepare()
    tokens = torch.randint(0, 64, (2, 6))
    prepared(tokens).sum().backward()
    final = pal.finalize()
    names = [k for k in final.state_dict() if k.endswith("_COREML_/weight/lut") or "in_proj" in k]
    assert any("mha._COREML_/in_proj_weight/lut" in k for k in final.state_dict())
    assert any("norm._COREML_/weight/lut" in k for k in final.state_dict())
    assert names
    for mod_name, pname in [
        ("emb", "weight"),
        ("norm", "weight"),
        ("mha", "in_proj_weight"),
        ("mha.out_proj", "weight"),
        ("conv3", "weight"),
        ("tconv", "weight"),
    ]:
        w = getattr(final.get_submodule(mod_name), pname)
        assert len(torch.unique(w)) <= 4, mod_name
    fresh = _AllTypes()
    fresh.load_state_dict(strip_coreml_metadata(copy.deepcopy(final)).state_dict(), strict=True)
    assert torch.allclose(fresh(tokens), final(tokens))


def test_state_dict_round_trip_deepcopy_and_pickle_of_prepared_model():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    cfg = {"global_config": {"n_bits": 3, "weight_threshold": 0}}
    pal = DKMPalettizer(model, cfg)
    prepared = pal.prepare()
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    x = torch.randn(16, 64)
    for _ in range(3):
        prepared(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        pal.step()
    sd = prepared.state_dict()
    assert "0.weight" in sd and "0.weight_dkm.centroids" in sd
    other = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    pal2 = load_prepared_state_dict(other, sd, cfg)
    assert pal2.steps == 3
    # a training forward advances the centroids: compare fresh copies one at a time
    for make in (
        lambda: other,
        lambda: copy.deepcopy(prepared),
        lambda: pickle.loads(pickle.dumps(prepared)),
    ):
        snapshot = copy.deepcopy(prepared.state_dict())
        m = make()
        torch.testing.assert_close(m(x), prepared(x))
        prepared.load_state_dict(snapshot)
    prepared.eval()
    again = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    load_prepared_state_dict(again, prepared.state_dict(), cfg)
    torch.testing.assert_close(again.eval()(x), prepared(x))


def test_lut_dtype_quantizes_in_forward_and_finalize():
    torch.manual_seed(6)
    model = nn.Linear(64, 64)
    for lut_dtype in ("i8", "u8", "f16", "bf16"):
        pal = DKMPalettizer(
            model, {"global_config": {"n_bits": 3, "weight_threshold": 0, "lut_dtype": lut_dtype}}
        )
        prepared = pal.prepare()
        prepared(torch.randn(2, 64)).sum().backward()
        cent = prepared.weight_dkm.centroids
        final = pal.finalize()
        lut = getattr(final, "_COREML_/weight/lut").reshape(-1)
        if lut_dtype in ("i8", "u8"):
            qs = getattr(final, "_COREML_/weight/quantization_scale").reshape(-1)
            codes = lut / qs
            torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
            c = cent.reshape(-1)
            s = c.abs().max() / 127
            torch.testing.assert_close(c / s, (c / s).round(), atol=1e-3, rtol=0)
        else:
            dt = torch.float16 if lut_dtype == "f16" else torch.bfloat16
            assert torch.equal(lut, lut.to(dt).float())


def test_bf16_autocast_and_torch_compile(monkeypatch):
    # the weight hooks run their eager body directly, and through the torch.compiler.disable
    # wrapper (a graph break) only while torch.compile traces them
    from lightning_palettize.palettizers.dkm import FakePalettize

    broken = []
    eager_body = FakePalettize._shadow_eagerly

    @torch.compiler.disable
    def counted(self, module):
        broken.append(module)
        return eager_body(self, module)

    monkeypatch.setattr(FakePalettize, "_shadow_eagerly", counted)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    pal = DKMPalettizer(model, {"global_config": {"n_bits": 2, "weight_threshold": 0}})
    prepared = pal.prepare()
    x = torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prepared(x)
    out.float().sum().backward()
    assert prepared[0].weight.grad is not None and torch.isfinite(prepared[0].weight.grad).all()
    prepared.zero_grad()
    snapshot = copy.deepcopy(prepared.state_dict())
    eager = prepared(x)  # a training forward advances the centroids: restore before compiling
    prepared.load_state_dict(snapshot)
    compiled = torch.compile(prepared, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    assert broken == [prepared[0], prepared[2]]  # (none in the eager calls above)
    out.sum().backward()
    assert prepared[0].weight.grad is not None


def test_unsupported_options_and_bad_shapes_are_rejected():
    model = nn.Sequential(nn.Linear(64, 10))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="quantize_activations=True"):
        DKMPalettizer(
            model, {"global_config": {"quantize_activations": True, "weight_threshold": 0}}
        ).prepare(inplace=True)
    with pytest.raises(ValueError, match="palett_lambda"):
        DKMPalettizer(
            model, {"global_config": {"palett_lambda": 0.1, "weight_threshold": 0}}
        ).prepare(inplace=True)
    with pytest.raises(ValueError, match=r"0\.weight.*group_size"):
        DKMPalettizer(
            model,
            {
                "global_config": {
                    "granularity": "per_grouped_channel",
                    "group_size": 4,
                    "weight_threshold": 0,
                }
            },
        ).prepare(inplace=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not any(isinstance(c, nn.Module) and "dkm" in n for n, c in model.named_modules())
    with pytest.raises(RuntimeError, match="prepare"):
        DKMPalettizer(model).step()


def test_default_config_uses_coremltools_table():
    model = nn.Sequential(nn.Linear(128, 128), nn.Conv1d(4, 4, 1), nn.Linear(8, 8))
    pal = DKMPalettizer(model)
    prepared = pal.prepare()
    fps = {n: m for n, m in prepared.named_modules() if n.endswith("_dkm")}
    # Linear(128,128) has 16384 > 2048 elements: 4 bits; the small ones stay unprepared
    assert list(fps) == ["0.weight_dkm"] and fps["0.weight_dkm"].n_bits == 4


coremltools = pytest.importorskip("coremltools")


def test_finalized_model_converts_to_lut_ops():
    import coremltools as ct

    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    cfg = {
        "global_config": {
            "n_bits": 2,
            "weight_threshold": 0,
            "granularity": "per_grouped_channel",
            "group_size": 8,
        }
    }
    pal = DKMPalettizer(model, cfg)
    prepared = pal.prepare()
    prepared(torch.randn(4, 64)).sum().backward()
    final = pal.finalize()
    traced = torch.jit.trace(final, torch.randn(1, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = ct.convert(
            traced,
            inputs=[ct.TensorType(shape=(1, 64))],
            minimum_deployment_target=ct.target.iOS18,
            skip_model_load=True,
            convert_to="mlprogram",
        )
    ops = [
        op
        for op in ml._mil_program.functions["main"].operations
        if op.op_type == "constexpr_lut_to_dense"
    ]
    assert len(ops) == 2


# ---------------------------------------------------------------------------------------------
# batched rounds, host-side flags


def _unbatched(monkeypatch):
    """Every weight computes its own soft k-means when its module runs (the reference); a
    weight version's soft weight is still served again to its module's later calls."""
    from lightning_palettize.palettizers import dkm

    monkeypatch.setattr(dkm._DKMGroup, "_compute", lambda self, fp, module, w: (fp(w), None))


class _Reuse(nn.Module):
    """A module called twice per forward (shared weights) and one that may run on its own."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(260, 260)  # >= 65536 weights: the per-code table engine on the CPU
        self.b = nn.Linear(260, 120)
        self.head = nn.Linear(120, 7)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(self.a(h))  # a again: served the soft weight of its first call
        return self.head(torch.relu(self.b(h)))


_MIXED = {
    "global_config": {"n_bits": 3, "weight_threshold": 0, "palett_tau": 1e-3},
    "module_name_configs": {
        "b": {
            "n_bits": 2,
            "weight_threshold": 0,
            "granularity": "per_grouped_channel",
            "group_size": 8,
        },
        "head": {"n_bits": 4, "weight_threshold": 0, "enable_per_channel_scale": True},
    },
}


def _train(monkeypatch, batched, config=_MIXED, steps=3, alone=False):
    layout = {}
    if not batched:
        from lightning_palettize import soft_kmeans as sk

        layout = {"_sync_free": sk._sync_free, "_host_layout": sk._host_layout}
        _unbatched(monkeypatch)
    torch.manual_seed(11)
    model = _Reuse()
    pal = DKMPalettizer(model, config)
    model = pal.prepare(inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(16, 260, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 7, (16,), generator=torch.Generator().manual_seed(2))
    losses, alone_out = [], []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pal.step()
        losses.append(loss.detach())
        if alone:  # run one module outside the model's forward (training mode, no backward)
            alone_out.append(model.b(torch.relu(x)).detach())
    if not batched:  # drop the unbatched patch, keep the layout the test chose
        from lightning_palettize import soft_kmeans as sk

        monkeypatch.undo()
        for name, fn in layout.items():
            monkeypatch.setattr(sk, name, fn)
    return losses, alone_out, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_runs(got, want, rtol: float, atol: float) -> None:
    """Two _train runs: the same losses, outputs of the module run alone, and state."""
    torch.testing.assert_close(torch.stack(got[0]), torch.stack(want[0]), rtol=rtol, atol=atol)
    for x, y in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
    assert got[2].keys() == want[2].keys()
    for k in want[2]:
        torch.testing.assert_close(got[2][k], want[2][k], rtol=rtol, atol=atol, msg=k)


def _device_layout(monkeypatch):
    """The kernel's GPU code path (stacked tables, sync-free early stopping), on the CPU."""
    from lightning_palettize import soft_kmeans as sk

    monkeypatch.setattr(sk, "_sync_free", lambda device: True)
    monkeypatch.setattr(sk, "_host_layout", lambda device: False)
    # (torch's deterministic mode, which a Trainer(deterministic=True) leaves on, takes the
    # device layout's deterministic kernels)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)


@pytest.mark.parametrize("layout", ["host", "device"])
def test_batched_rounds_train_like_weight_by_weight(monkeypatch, layout):
    # one soft_kmeans_batch call per configuration and forward; a module called twice reuses
    # its soft weight, one run on its own between steps recomputes from its current state
    if layout == "device":
        _device_layout(monkeypatch)
    a = _train(monkeypatch, batched=True, alone=True)
    _same_runs(a, _train(monkeypatch, batched=False, alone=True), rtol=1e-5, atol=1e-6)


def test_rounds_batch_every_weight_in_one_call(monkeypatch):
    from lightning_palettize.palettizers import dkm

    calls = []
    real = dkm.soft_kmeans_batch
    monkeypatch.setattr(
        dkm, "soft_kmeans_batch", lambda xs, cs, **kw: calls.append(len(xs)) or real(xs, cs, **kw)
    )
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(5)])
    pal = DKMPalettizer(model, {"global_config": {"n_bits": 2, "weight_threshold": 0}})
    prepared = pal.prepare()
    x = torch.randn(4, 64)
    for _ in range(2):
        prepared(x).sum().backward()
        pal.step()
    assert calls == [5, 5]
    calls.clear()
    copied = copy.deepcopy(prepared)  # a copy gets its own, empty group: it learns its members
    for _ in range(2):
        a, b = copied(x), prepared(x)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        (a.sum() + b.sum()).backward()  # frees the graphs: the next forward recomputes
    assert calls == [5, 5, 5]  # the copy: weight by weight in its first forward, then batched
    prepared(x)  # a new round (the last backward freed the graph)
    assert calls == [5, 5, 5, 5]
    # called again at the same weight versions: the soft weights were only weakly held (no
    # module had been seen called twice), so this first repeat computes anew; the members are
    # then held and served again
    second = prepared(x)
    assert calls == [5, 5, 5, 5, 5]
    assert torch.equal(prepared(x), second)
    assert calls == [5, 5, 5, 5, 5]
    with torch.no_grad():
        prepared.eval()
        prepared(x)  # eval: hard assignment per module, no round
    assert calls == [5, 5, 5, 5, 5]


@pytest.mark.parametrize("layout", ["host", "device"])
@pytest.mark.parametrize("n_chunks", [2, 3])
def test_chunked_rounds_train_like_one_round(monkeypatch, layout, n_chunks):
    # dkm._ROUND_CHUNKS: each chunk of consecutive members its own round and node
    from lightning_palettize.palettizers import dkm

    if layout == "device":
        _device_layout(monkeypatch)
    one = _train(monkeypatch, batched=True, alone=True)
    monkeypatch.setattr(dkm, "_ROUND_CHUNKS", {"cpu": n_chunks})
    _same_runs(_train(monkeypatch, batched=True, alone=True), one, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "dev",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ],
)
def test_chunked_rounds_run_each_chunks_backward_when_its_gradients_are_in(monkeypatch, dev):
    # (on CUDA the autograd engine's device thread runs the nodes: the same order)
    from lightning_palettize.palettizers import dkm

    if dev == "cpu":
        _device_layout(monkeypatch)
    calls = []
    real = dkm.soft_kmeans_batch
    monkeypatch.setattr(
        dkm, "soft_kmeans_batch", lambda xs, cs, **kw: calls.append(len(xs)) or real(xs, cs, **kw)
    )
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)]).to(dev)
    pal = DKMPalettizer(model, {"global_config": {"n_bits": 2, "weight_threshold": 0}})
    model = pal.prepare(inplace=True)
    x = torch.randn(4, 64, device=dev, requires_grad=True)

    def order(n_chunks):
        monkeypatch.setattr(dkm, "_ROUND_CHUNKS", {dev: n_chunks})
        log, handles = [], []
        for name, t in [("x", x)] + [(f"w{i}", m.weight) for i, m in enumerate(model)]:
            handles.append(t.register_post_accumulate_grad_hook(lambda _, n=name: log.append(n)))
        calls.clear()
        model(x).sum().backward()
        pal.step()
        for h in handles:
            h.remove()
        return log, list(calls)

    log, rounds = order(1)  # one round: every weight gradient after the first layer's input's
    assert rounds == [6] and log.index("x") < min(log.index(f"w{i}") for i in range(6)), log
    log, rounds = order(3)  # chunks {0, 1}, {2, 3}, {4, 5}, each when its gradients are in
    assert rounds == [2, 2, 2], rounds
    at = {n: log.index(n) for n in log}
    assert max(at["w4"], at["w5"]) < min(at["w2"], at["w3"]), log
    assert max(at["w2"], at["w3"]) < at["x"] < min(at["w0"], at["w1"]), log
    # members in their order, about equal numbers of elements per chunk
    uneven = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 16), nn.Linear(16, 16))
    uneven = DKMPalettizer(uneven, {"global_config": {"n_bits": 2, "weight_threshold": 0}})
    group = uneven.prepare(inplace=True)[0].weight_dkm._group
    assert list(group._chunks(2).values()) == [0, 1, 1]  # 16,384 | 4,096 + 256 elements
    assert list(group._chunks(3).values()) == [0, 2, 2]  # (the first member's share: 2 chunks)
    assert list(group._chunks(1).values()) == [0, 0, 0]


def test_chunked_rounds_in_a_llama_run_inside_its_backward(monkeypatch):
    # the GPU benchmark's model shape, small: with one round every Linear's weight gradient
    # arrives after the layers' backward has passed layer 1; in 4 chunks the last chunk's
    # (the last layer's MLP and the LM head) before the last layer's own norm's
    from lightning_palettize.palettizers import dkm

    _device_layout(monkeypatch)
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, intermediate=128, layers=4, vocab=500).train()
    pal = DKMPalettizer(model, {"module_type_configs": {"Linear": {"n_bits": 4}}})
    model = pal.prepare(inplace=True)
    tokens = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    watched = [
        (name, mod.weight)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) or name.endswith("input_layernorm")
    ]

    def order(n_chunks):
        monkeypatch.setattr(dkm, "_ROUND_CHUNKS", {"cpu": n_chunks})
        log = []
        hooks = [
            w.register_post_accumulate_grad_hook(lambda _, n=n: log.append(n)) for n, w in watched
        ]
        model(input_ids=tokens, labels=tokens).loss.backward()
        for h in hooks:
            h.remove()
        return {n: i for i, n in enumerate(log)}

    linears = [n for n, w in watched if "norm" not in n]
    one = order(1)
    assert min(one[n] for n in linears) > one["model.layers.1.input_layernorm"], one
    at = order(4)
    last = at["model.layers.3.input_layernorm"]
    assert max(at["lm_head"], at["model.layers.3.mlp.down_proj"]) < last, at
    assert at.keys() == one.keys()


def test_training_forward_reads_the_device_a_fixed_number_of_times(monkeypatch):
    # on a GPU every host read is a sync: the enabled flag and the step counters live on the
    # host, early stopping is sync-free, and a round reads back only its table sizes
    _device_layout(monkeypatch)
    reads = [_second_step_reads(depth) for depth in (2, 6)]
    assert reads == [1, 1], reads


def _second_step_reads(depth: int) -> int:
    """Host reads of the second DKM training step of ``depth`` 300x300 Linears (4 bits)."""
    model = nn.Sequential(*[nn.Linear(300, 300) for _ in range(depth)])
    pal = DKMPalettizer(model, {"global_config": {"n_bits": 4, "weight_threshold": 0}})
    model = pal.prepare(inplace=True)
    x = torch.randn(8, 300)
    model(x).sum().backward()
    with _HostReads() as mode:
        model(x).sum().backward()
        pal.step()
        assert pal.steps == 1
    return mode.count


@pytest.mark.parametrize("full", [False, True])
def test_chunked_rounds_read_the_device_once_per_chunk_only_with_compacted_tables(
    monkeypatch, full
):
    # a read in a chunk's round, mid-forward, would stall the host behind the device on a GPU
    # (and with it the overlap chunks are for): full code tables (the 134M LLaMA's) read
    # nothing, compacted ones their sizes once per chunk
    from lightning_palettize import soft_kmeans as sk
    from lightning_palettize.palettizers import dkm

    _device_layout(monkeypatch)
    if full:
        monkeypatch.setattr(sk, "_full_tables", lambda *args: True)
    monkeypatch.setattr(dkm, "_ROUND_CHUNKS", {"cpu": 3})
    assert _second_step_reads(6) == (0 if full else 3)


class _Looped(nn.Module):
    """One Linear applied twice per forward, as a loop or a siamese pair would."""

    def __init__(self, width=48):
        super().__init__()
        self.a = nn.Linear(width, width)

    def forward(self, x):
        return self.a(torch.tanh(self.a(x)))


def _looped(mode="dkm"):
    torch.manual_seed(21)
    model = _Looped()
    cfg = {"n_bits": 2, "weight_threshold": 0, "palett_tau": 1e-3, "palett_mode": mode}
    pal = DKMPalettizer(model, {"global_config": cfg})
    return pal.prepare(inplace=True), torch.randn(8, 48, generator=torch.Generator().manual_seed(3))


def _called_twice_once(model, x):
    """One step without update: the group learns that ``model.a`` is called twice per forward
    (that first repeat computes anew, from the centroids the first call left)."""
    fp = model.a.weight_dkm
    assert id(fp) not in fp._group._again
    model(x).sum().backward()
    assert id(fp) in fp._group._again
    model.zero_grad()


def test_a_weight_version_gets_one_soft_weight_for_all_its_calls():
    model, x = _looped()
    _called_twice_once(model, x)
    ref = copy.deepcopy(model)
    seen = []
    model.a.register_forward_pre_hook(lambda m, args: seen.append(m.weight))
    loss = model(x).square().sum()
    assert seen[0] is seen[1]  # both calls of the step use one soft weight
    loss.backward()
    # the reference: one soft k-means of the weight (weight by weight), used twice
    lin = ref.a
    soft = lin.weight_dkm(lin.weight)
    want = nn.functional.linear(torch.tanh(nn.functional.linear(x, soft, lin.bias)), soft, lin.bias)
    want.square().sum().backward()
    torch.testing.assert_close(loss, want.square().sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.a.weight.grad, lin.weight.grad, rtol=1e-5, atol=1e-7)
    # the centroids moved once, as the reference's single call moved them
    assert torch.equal(model.a.weight_dkm.centroids, lin.weight_dkm.centroids)
    # the backward freed the graph: the next forward (gradient accumulation, same weight)
    # computes anew, from the centroids the first one left
    cent = model.a.weight_dkm.centroids.clone()
    model(x).square().sum().backward()
    assert seen[2] is seen[3] and seen[2] is not seen[0]
    assert not torch.equal(model.a.weight_dkm.centroids, cent)


def test_losses_of_a_served_soft_weight_backward_separately_with_retain_graph():
    model, x = _looped()
    summed = copy.deepcopy(model)  # (a copy learns its members' calls anew)
    _called_twice_once(model, x)
    _called_twice_once(summed, x)
    (summed(x).sum() + summed(2 * x).sum()).backward()
    l1, l2 = model(x).sum(), model(2 * x).sum()  # one graph through the soft k-means
    l1.backward(retain_graph=True)
    l2.backward()
    torch.testing.assert_close(model.a.weight.grad, summed.a.weight.grad, rtol=1e-5, atol=1e-7)
    l1, l2 = model(x).sum(), model(2 * x).sum()
    l1.backward()  # frees the shared graph: as for any graph, a second backward needs it kept
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        l2.backward()


def test_a_weight_called_once_is_not_held_through_the_step():
    # a layer whose consumer does not keep its weight (the input needs no gradient) frees its
    # soft weight after the forward: nothing keeps a weight-sized tensor until backward
    model, x = _looped()
    lin = model.a
    soft = lin.weight_dkm._group.soft_weight(lin.weight_dkm, lin, lin.weight)
    ref = weakref.ref(soft)
    nn.functional.linear(x, soft).sum().backward()
    del soft
    assert ref() is None


def test_gumbel_weights_draw_new_noise_at_every_call():
    model, x = _looped("gsm")
    seen = []
    model.a.register_forward_pre_hook(lambda m, args: seen.append(m.weight))
    model(x)
    assert not torch.equal(seen[0], seen[1])


def test_host_flags_follow_their_buffers():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    cfg = {"global_config": {"n_bits": 2, "weight_threshold": 0, "milestone": 2}}
    pal = DKMPalettizer(model, cfg)
    prepared = pal.prepare()
    fp = prepared[0].weight_dkm
    assert not fp.is_enabled and pal.steps == 0
    pal.step()
    pal.step()
    assert fp.is_enabled and pal.steps == 2 and int(fp.steps) == 2
    state = copy.deepcopy(prepared.state_dict())
    with torch.no_grad():  # a direct write (e.g. a broadcast from rank 0) is seen
        fp.enabled.zero_()
        fp.steps.fill_(9)
    assert not fp.is_enabled and fp.step_count == 9
    prepared.load_state_dict(state)  # and so is a state_dict load
    assert fp.is_enabled and pal.steps == 2
    pal.set_step(5)
    assert [int(m.weight_dkm.steps) for m in prepared] == [5, 5] and pal.steps == 5


# ---------------------------------------------------------------------------------------------
# the weight's gradient written into the soft weight's incoming gradient (CPU table engine)


class _Twice(nn.Linear):
    """Uses its (soft) weight twice in one forward: autograd sums the two gradients."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias) + nn.functional.linear(
            x * 0.5, self.weight
        )


def _in_place_runs(monkeypatch):
    from lightning_palettize import soft_kmeans as sk

    verdicts = []
    real = sk._overwritable
    monkeypatch.setattr(sk, "_overwritable", lambda *a: verdicts.append(real(*a)) or verdicts[-1])
    return verdicts


@pytest.mark.parametrize("model_kind", ["called_twice", "weight_used_twice"])
def test_training_with_gradients_in_place_is_bit_identical(monkeypatch, model_kind):
    from lightning_palettize import soft_kmeans as sk

    def train(in_place):
        monkeypatch.setattr(sk, "_GRAD_IN_PLACE", in_place)
        if model_kind == "called_twice":
            return _train(monkeypatch, batched=True, steps=3)
        torch.manual_seed(3)
        model = nn.Sequential(_Twice(260, 260), nn.ReLU(), nn.Linear(260, 260))
        pal = DKMPalettizer(model, {"global_config": {"n_bits": 3, "weight_threshold": 0}})
        model = pal.prepare(inplace=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x = torch.randn(16, 260, generator=torch.Generator().manual_seed(4))
        losses = []
        for _ in range(3):
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            pal.step()
            losses.append(loss.detach())
        return losses, [], {k: v.detach().clone() for k, v in model.state_dict().items()}

    verdicts = _in_place_runs(monkeypatch)
    got = train(True)
    assert any(verdicts)  # the in-place path ran
    want = train(False)
    assert torch.equal(torch.stack(got[0]), torch.stack(want[0]))
    for k in want[2]:
        assert torch.equal(got[2][k], want[2][k]), k
    # and the torch code (no compiled kernels, always a fresh gradient) agrees
    monkeypatch.setattr(sk, "_USE_C", False)
    slow = train(True)
    for k in want[2]:
        torch.testing.assert_close(got[2][k], slow[2][k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_hook_keeping_the_soft_weight_gradient_sees_it_unchanged(monkeypatch):
    from lightning_palettize import soft_kmeans as sk

    def run(in_place, keep):
        monkeypatch.setattr(sk, "_GRAD_IN_PLACE", in_place)
        torch.manual_seed(5)
        lin = nn.Linear(256, 300)
        pal = DKMPalettizer(
            nn.Sequential(lin), {"global_config": {"n_bits": 2, "weight_threshold": 0}}
        )
        model = pal.prepare(inplace=True)
        soft, kept = [], []

        def pre_hook(module, args):  # registered after prepare: sees the soft weight
            soft.append(module.weight)
            if keep:
                module.weight.register_hook(kept.append)

        lin.register_forward_pre_hook(pre_hook)
        x = torch.randn(8, 256, generator=torch.Generator().manual_seed(6), requires_grad=True)
        loss = model(x).square().sum()
        (want,) = torch.autograd.grad(loss, soft[0], retain_graph=True)
        loss.backward()
        return lin.weight.grad, want, kept

    verdicts = _in_place_runs(monkeypatch)
    grad, want, kept = run(True, keep=True)
    assert not any(verdicts)  # the hook keeps the gradient: the fallback ran
    assert torch.equal(kept[-1], want)
    ref, _, _ = run(False, keep=False)
    assert torch.equal(grad, ref)
    verdicts.clear()
    grad2, _, _ = run(True, keep=False)  # the soft weight itself kept: no obstacle
    assert any(verdicts) and torch.equal(grad2, ref)


def test_bf16_autocast_and_torch_compile_gradients_in_place(monkeypatch):
    # the 256 x 300 weight runs on the grid engine, the 300 x 4 one per element
    from lightning_palettize import soft_kmeans as sk

    grids = []
    spec_fn = sk._grid_spec
    monkeypatch.setattr(sk, "_grid_spec", lambda *a: grids.append(spec_fn(*a)) or grids[-1])

    def run(in_place):
        monkeypatch.setattr(sk, "_GRAD_IN_PLACE", in_place)
        torch.manual_seed(9)
        model = nn.Sequential(nn.Linear(256, 300), nn.ReLU(), nn.Linear(300, 4))
        pal = DKMPalettizer(model, {"global_config": {"n_bits": 2, "weight_threshold": 0}})
        prepared = pal.prepare()
        x = torch.randn(8, 256, generator=torch.Generator().manual_seed(10))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = prepared(x)
        out.float().sum().backward()
        grads = [prepared[0].weight.grad.clone()]
        prepared.zero_grad()
        compiled = torch.compile(prepared, backend="aot_eager")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled(x).sum().backward()
        grads.append(prepared[0].weight.grad.clone())
        return grads

    got = run(True)
    want = run(False)
    assert grids and all(g is not None for g in grids)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_device_rounds_serve_the_batched_nodes_outputs_and_forget_them_in_backward(monkeypatch):
    # on the device layout a float32 Linear weight goes into the round as it is: its soft
    # weight is an output of the batched node itself (no view node on either side), and one
    # pre-hook on that node forgets the served weights when backward reaches it
    _device_layout(monkeypatch)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 300))
    cfg = {"global_config": {"n_bits": 4, "weight_threshold": 0}}
    pal = DKMPalettizer(model, cfg)
    model = pal.prepare(inplace=True)
    seen = []
    for lin in (model[0], model[2]):
        lin.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight))
    x = torch.randn(8, 300)
    out = model(x)
    nodes = {w.grad_fn for w in seen}
    assert len(nodes) == 1 and type(next(iter(nodes))).__name__ == "_ScalarKMeansBackward"
    group = model[0].weight_dkm._group
    assert len(group._served) == 2 and len({e.token for e in group._served.values()}) == 1
    out.sum().backward()
    assert not group._served and not group._pending
    assert model[0].weight.grad is not None and model[2].weight.grad is not None
    # a per-channel scale keeps the [G, N, 1] path (its output is scaled after the node)
    seen.clear()
    torch.manual_seed(4)
    model2 = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 300))
    cfg = {"global_config": {"n_bits": 4, "weight_threshold": 0, "enable_per_channel_scale": True}}
    model2 = DKMPalettizer(model2, cfg).prepare(inplace=True)
    for lin in (model2[0], model2[2]):
        lin.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight))
    model2(x).sum().backward()
    assert all(type(w.grad_fn).__name__ != "_ScalarKMeansBackward" for w in seen)
    assert not model2[0].weight_dkm._group._served
