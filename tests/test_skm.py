"""SKMPalettizer: weighted optimality, zero Fisher, reusable sensitivity, the calibration
contract, the no-gradient fallback, outliers, per-sample gradients and argument errors."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_palettize import SKMPalettizer
from lightning_palettize.sensitivity import Sensitivity, compute_sensitivity, normalize_sensitivity

# ----------------------------------------------------------------------------------------------
# helpers


def _ce(model, item):
    return F.cross_entropy(model(item[0]), item[1])


def _data(n_items=8, batch=4, n_in=16, n_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, n_in, generator=g), torch.randint(0, n_out, (batch,), generator=g))
        for _ in range(n_items)
    ]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))


def _cfg(n_bits=2, nsamples=8, **module):
    return {"global_config": {"n_bits": n_bits, **module}, "calibration_nsamples": nsamples}


def _quiet(skm, *args, **kwargs):
    return skm.compress(*args, progress=False, **kwargs)


def _weighted_sse(w, w_hat, s):
    w, w_hat = w.detach().double(), w_hat.detach().double()
    return float((s.double() * (w - w_hat).square()).sum())


def _brute_force(x, s, k):
    """Minimum weighted SSE over every partition of the sorted values into <= k contiguous
    runs (optimal 1-D clusters are contiguous), each run at its weighted mean."""
    order = torch.argsort(x)
    xs, ss = x[order].double().tolist(), s[order].double().tolist()
    n = len(xs)

    def run_cost(a, b):
        w = sum(ss[a:b])
        mean = sum(wi * xi for wi, xi in zip(ss[a:b], xs[a:b])) / w
        return sum(wi * (xi - mean) ** 2 for wi, xi in zip(ss[a:b], xs[a:b]))

    best = float("inf")
    for m in range(1, min(k, n) + 1):
        for cuts in itertools.combinations(range(1, n), m - 1):
            bounds = (0, *cuts, n)
            best = min(best, sum(run_cost(a, b) for a, b in zip(bounds[:-1], bounds[1:])))
    return best


def _state(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {
            n: (p.grad, None if p.grad is None else p.grad.clone())
            for n, p in model.named_parameters()
        },
    }


def _assert_state(model, state):
    for n, p in model.named_parameters():
        assert torch.equal(p, state["params"][n]), n
        assert p.requires_grad == state["requires_grad"][n], n
        obj, value = state["grads"][n]
        assert p.grad is obj, n
        if value is not None:
            assert torch.equal(p.grad, value), n
    for n, b in model.named_buffers():
        assert torch.equal(b, state["buffers"][n]), n
    for n, m in model.named_modules():
        assert m.training == state["modes"][n], n


# ----------------------------------------------------------------------------------------------
# weighted optimality


def _tiny():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-1.0, -0.55, -0.5], [0.1, 0.12, 1.3]]))
    return nn.Sequential(layer)


# Hand-made Fisher: a very sensitive -0.55, an almost ignored 1.3, one exact zero.
_TINY_FISHER = torch.tensor([[1.0, 40.0, 0.5], [0.0, 2.0, 1e-6]])


@pytest.mark.parametrize("n_bits", [1, 2])
def test_per_tensor_matches_brute_force_optimum(n_bits):
    model = _tiny()
    skm = SKMPalettizer(model, _cfg(n_bits))
    out = _quiet(skm, sensitivity={"0.weight": _TINY_FISHER})
    w, w_hat = model[0].weight.detach(), out[0].weight.detach()
    s = normalize_sensitivity(_TINY_FISHER)
    best = _brute_force(w.flatten(), s.flatten(), 2**n_bits)
    assert _weighted_sse(w, w_hat, s) == pytest.approx(best, rel=1e-9, abs=1e-15)
    # The weighting matters: the unweighted optimum is worse under the Fisher weights.
    plain = _quiet(SKMPalettizer(model, _cfg(n_bits)), sensitivity={"0.weight": torch.ones(2, 3)})
    assert _weighted_sse(w, plain[0].weight.detach(), s) > best * (1 + 1e-3)


def test_per_grouped_channel_matches_brute_force_per_group():
    model = _tiny()
    cfg = _cfg(1, granularity="per_grouped_channel", group_size=1)
    out = _quiet(SKMPalettizer(model, cfg), sensitivity={"0.weight": _TINY_FISHER})
    s = normalize_sensitivity(_TINY_FISHER)
    w, w_hat = model[0].weight.detach(), out[0].weight.detach()
    for row in range(2):
        best = _brute_force(w[row], s[row], 2)
        got = _weighted_sse(w[row], w_hat[row], s[row])
        assert got == pytest.approx(best, rel=1e-9, abs=1e-15), row


def test_random_layer_matches_brute_force_and_codes_are_near_exact():
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 4, generator=g))
    model = nn.Sequential(layer)
    fisher = torch.rand(3, 4, generator=g) ** 3
    s = normalize_sensitivity(fisher)
    out = _quiet(SKMPalettizer(model, _cfg(2)), sensitivity={"0.weight": fisher})
    best = _brute_force(layer.weight.detach().flatten(), s.flatten(), 4)
    assert _weighted_sse(layer.weight, out[0].weight, s) == pytest.approx(best, rel=1e-9)

    # Larger layer: the 16-bit code path stays within 1e-4 of the exact DP, never below it.
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(256, 128, bias=False))
    fisher = {"0.weight": torch.rand(128, 256, generator=g) ** 4}
    s = normalize_sensitivity(fisher["0.weight"])
    exact = _quiet(SKMPalettizer(big, _cfg(4)), sensitivity=fisher, exact_kmeans=True)
    codes = _quiet(SKMPalettizer(big, _cfg(4)), sensitivity=fisher, exact_kmeans=False)
    e_exact = _weighted_sse(big[0].weight, exact[0].weight, s)
    e_codes = _weighted_sse(big[0].weight, codes[0].weight, s)
    assert e_exact <= e_codes * (1 + 1e-9)
    assert e_codes <= e_exact * (1 + 1e-4)


# ----------------------------------------------------------------------------------------------
# zero and tiny Fisher values


@pytest.mark.parametrize("n_bits", [3, 4])
def test_zero_fisher_mlp_never_nan(n_bits):
    # coremltools 9.0 repro: 512-1024-1024-10 MLP, 16 single-sample items; ReLU rows that are
    # dead for every sample get exactly zero Fisher (coremltools then returns ~12% NaN).
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    data = _data(16, batch=1, n_in=512, n_out=10)
    skm = SKMPalettizer(model, _cfg(n_bits, nsamples=16))
    sens = skm.compute_sensitivity(data, _ce, progress=False)
    assert int((sens["2.weight"] == 0).sum()) > 0  # the condition under test is present
    out = _quiet(skm, sensitivity=sens)
    for name, p in out.named_parameters():
        assert torch.isfinite(p).all(), name
    for i in (0, 2, 4):
        assert len(torch.unique(out[i].weight)) <= 2**n_bits
    assert all(0 < row.rel_error < 0.1 for row in skm.report().rows)


def test_extreme_fisher_range_and_all_zero_fisher():
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    f0 = torch.exp(torch.empty(32, 16).uniform_(-87, 0, generator=g))  # down to ~1e-38
    f0[::3] = 0.0
    out = _quiet(
        SKMPalettizer(model, _cfg(3)),
        sensitivity={"0.weight": f0, "2.weight": torch.zeros(4, 32)},
    )
    assert all(torch.isfinite(p).all() for p in out.parameters())
    # An all-zero Fisher is plain k-means: the same as a weight with no Fisher at all.
    with pytest.warns(UserWarning, match="no Fisher"):
        plain = _quiet(SKMPalettizer(model, _cfg(3)), sensitivity={"0.weight": f0})
    assert torch.equal(out[2].weight, plain[2].weight)


def test_nan_fisher_is_an_error_naming_the_weight():
    model = _mlp()
    bad = torch.ones(32, 16)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'0\.weight'.*NaN"):
        _quiet(
            SKMPalettizer(model, _cfg()),
            sensitivity={"0.weight": bad, "2.weight": torch.ones(4, 32)},
        )


# ----------------------------------------------------------------------------------------------
# reusable sensitivity


def test_sensitivity_file_round_trip_gives_identical_weights(tmp_path):
    model, data = _mlp(), _data()
    path = tmp_path / "fisher.safetensors"
    skm = SKMPalettizer(model, _cfg(3))
    sens = skm.compute_sensitivity(data, _ce, sensitivity_path=path, progress=False)
    direct = _quiet(skm, data, _ce)
    variants = {
        "object": _quiet(skm, sensitivity=sens),
        "path": _quiet(skm, sensitivity=path),
        "str path": _quiet(skm, sensitivity=str(path)),
        "sensitivity_path": _quiet(skm, sensitivity_path=path),
        "loaded": _quiet(skm, sensitivity=Sensitivity.load(path)),
        "mapping": _quiet(skm, sensitivity=dict(sens.fisher)),
    }
    # coremltools' own file format: torch.save of the normalised values.
    ct_path = tmp_path / "ct_sensitivity.pt"
    torch.save({k: normalize_sensitivity(v) for k, v in sens.fisher.items()}, ct_path)
    variants["coremltools file"] = _quiet(skm, sensitivity_path=ct_path)
    for how, out in variants.items():
        for (name, a), b in zip(direct.state_dict().items(), out.state_dict().values()):
            assert torch.equal(a, b), (how, name)


def test_sensitivity_file_for_another_model_is_rejected(tmp_path):
    other = nn.Sequential(nn.Linear(3, 3))
    path = tmp_path / "other.safetensors"
    compute_sensitivity(
        other, [torch.randn(2, 3)], lambda m, x: m(x).sum(), nsamples=1, progress=False
    ).save(path)
    with pytest.raises(ValueError, match="another model"):
        _quiet(SKMPalettizer(_mlp(), _cfg()), sensitivity=path)
    wrong_shape = {"0.weight": torch.ones(16, 32), "2.weight": torch.ones(4, 32)}
    with pytest.raises(ValueError, match=r"'0\.weight' has shape \(16, 32\)"):
        _quiet(SKMPalettizer(_mlp(), _cfg()), sensitivity=wrong_shape)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a tensor file at all")
    with pytest.raises(ValueError, match="neither"):
        _quiet(SKMPalettizer(_mlp(), _cfg()), sensitivity=junk)


# ----------------------------------------------------------------------------------------------
# the calibration contract through SKMPalettizer


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def _bn_model():
    model = _BNNet().train()
    model.bn.eval()  # a mixed-mode model: the per-module modes must survive too
    model.fc1.bias.requires_grad_(False)
    model.fc2.weight.grad = torch.full_like(model.fc2.weight, 0.5)
    return model


def test_calibration_restores_model_state():
    model = _bn_model()
    model.bn.train()  # BatchNorm statistics change during calibration; they must be restored
    state = _state(model)
    out = _quiet(SKMPalettizer(model, _cfg(2)), _data(), _ce)
    _assert_state(model, state)
    assert len(torch.unique(out.fc1.weight)) <= 4


def test_calibration_restores_model_state_when_loss_fn_raises():
    model = _bn_model()
    state = _state(model)
    calls = []

    def failing(m, item):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("loss exploded")
        return _ce(m, item)

    with pytest.raises(RuntimeError, match="loss exploded"):
        _quiet(SKMPalettizer(model, _cfg(2)), _data(), failing)
    _assert_state(model, state)


# ----------------------------------------------------------------------------------------------
# weights without a gradient


class _WithPooler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)
        self.pooler = nn.Linear(8, 8)  # never called: no gradient

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_unused_weight_falls_back_to_plain_kmeans_with_one_warning():
    model = _WithPooler()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _quiet(SKMPalettizer(model, _cfg(2)), _data(), _ce)
    ours = [w for w in caught if "SKMPalettizer" in str(w.message)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "pooler.weight" in message and "fc1.weight" not in message
    assert "plain" in message
    assert len(torch.unique(out.pooler.weight)) <= 4
    # Plain k-means = the same weight with a uniform Fisher.
    uniform = {"pooler.weight": torch.ones(8, 8)}
    ref = _quiet(
        SKMPalettizer(model, {"module_name_configs": {"pooler": {"n_bits": 2}}}),
        sensitivity=uniform,
    )
    assert torch.equal(out.pooler.weight, ref.pooler.weight)


# ----------------------------------------------------------------------------------------------
# outliers


def test_outliers_kept_exact_counted_and_lower_the_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    g = torch.Generator().manual_seed(0)
    fisher = torch.rand(32, 64, generator=g) ** 8
    s = normalize_sensitivity(fisher)
    w = model[0].weight.detach()
    frac = 0.01
    n_out = int(frac * w.numel())

    skm = SKMPalettizer(model, _cfg(2, outlier_fraction=frac))
    out = _quiet(skm, sensitivity={"0.weight": fisher})
    base = _quiet(SKMPalettizer(model, _cfg(2)), sensitivity={"0.weight": fisher})
    w_hat = out[0].weight.detach()

    top = torch.topk(fisher.flatten(), n_out).indices
    assert torch.equal(w_hat.flatten()[top], w.flatten()[top])
    rest = torch.ones(w.numel(), dtype=torch.bool)
    rest[top] = False
    assert len(torch.unique(w_hat.flatten()[rest])) <= 4
    # The rest is clustered optimally without the outliers: better than the base palette on
    # the same elements, so the total drops by at least the outliers' share of the base error.
    sse_base = _weighted_sse(w, base[0].weight, s)
    sse_base_out = _weighted_sse(w.flatten()[top], base[0].weight.flatten()[top], s.flatten()[top])
    assert sse_base_out > 0
    assert _weighted_sse(w, w_hat, s) <= (sse_base - sse_base_out) * (1 + 1e-9)

    row = skm.report()["0.weight"]
    assert row.outliers == n_out
    expected = float((w.double() - w_hat.double()).square().sum() / w.double().square().sum())
    assert row.rel_error == pytest.approx(expected, rel=1e-9)
    base_bytes = SKMPalettizer(model, _cfg(2))
    _quiet(base_bytes, sensitivity={"0.weight": fisher})
    assert row.bytes_after == base_bytes.report()["0.weight"].bytes_after + n_out * (4 + 4)


# ----------------------------------------------------------------------------------------------
# per-sample gradients, options, progress


def test_per_sample_option_uses_per_sample_fisher():
    model, data = _mlp(), _data(n_items=4, batch=4)
    cfg = _cfg(3, nsamples=12)
    out = _quiet(SKMPalettizer(model, cfg), data, _ce, per_sample=True)
    sens = compute_sensitivity(model, data, _ce, nsamples=12, per_sample=True, progress=False)
    ref = _quiet(SKMPalettizer(model, cfg), sensitivity=sens)
    for a, b in zip(out.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    per_item = SKMPalettizer(model, _cfg(3, nsamples=4)).compute_sensitivity(
        data, _ce, progress=False
    )
    assert per_item.nsamples == 4 and not per_item.per_sample
    assert not torch.allclose(per_item["0.weight"], sens["0.weight"])


def test_inplace_grouped_vector_and_lut_dtype_options():
    model = _mlp()
    out = _quiet(SKMPalettizer(model, _cfg(2)), _data(), _ce, inplace=True)
    assert out is model and len(torch.unique(model[0].weight)) <= 4
    model = _mlp()
    cfg = _cfg(2, granularity="per_grouped_channel", group_size=4, lut_dtype="int8")
    out = _quiet(SKMPalettizer(model, cfg), _data(), _ce)
    for rows in out[0].weight.detach().split(4):
        assert len(torch.unique(rows)) <= 4
    out = _quiet(SKMPalettizer(_mlp(), _cfg(2, cluster_dim=2)), _data(), _ce)
    vectors = out[0].weight.detach().T.reshape(-1, 2)  # consecutive output channels
    assert len(torch.unique(vectors, dim=0)) <= 4
    assert all(torch.isfinite(p).all() for p in out.parameters())


def test_progress_is_shown_and_silenceable(capsys):
    model, data = _mlp(), _data()
    SKMPalettizer(model, _cfg(2)).compress(data, _ce, progress=False)
    assert capsys.readouterr().err == ""
    SKMPalettizer(model, _cfg(2)).compress(data, _ce)
    err = capsys.readouterr().err
    assert "Fisher sensitivity" in err and "sensitive k-means" in err


# ----------------------------------------------------------------------------------------------
# argument errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "dataloader=.*or a precomputed sensitivity"),
        ({"dataloader": [1]}, ValueError, "without loss_fn"),
        ({"sensitivity": {}, "sensitivity_path": "x"}, ValueError, "both sensitivity"),
        ({"sensitivity": 3}, TypeError, "sensitivity must be"),
        ({"sensitivity": {"0.weight": [1.0]}}, TypeError, "names .str. to tensors"),
        ({"sensitivity_path": "/no/such/file"}, FileNotFoundError, "no such sensitivity file"),
        ({"dataloader": [1], "loss_fn": 5}, TypeError, "loss_fn must be a callable"),
        ({"dataloader": [1], "loss_fn": _ce, "inplace": "f.pt"}, TypeError, "sensitivity_path="),
        ({"dataloader": [1], "loss_fn": _ce, "per_sample": 1}, TypeError, "per_sample"),
        ({"dataloader": [1], "loss_fn": _ce, "num_kmeans_workers": 0}, ValueError, ">= 1"),
        ({"dataloader": [], "loss_fn": _ce}, ValueError, "no samples"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        SKMPalettizer(model, _cfg()).compress(progress=False, **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_layout_fails_before_calibration():
    calls = []

    def counting(m, item):
        calls.append(1)
        return _ce(m, item)

    cfg = _cfg(2, granularity="per_grouped_channel", group_size=5)
    with pytest.raises(ValueError, match="group_size"):
        _quiet(SKMPalettizer(_mlp(), cfg), _data(), counting)
    assert calls == []


def test_kmeans_workers_give_identical_results_and_propagate_errors():
    model, data = _mlp(), _data()
    sens = SKMPalettizer(model, _cfg(3)).compute_sensitivity(data, _ce, progress=False)
    one, two = SKMPalettizer(model, _cfg(3)), SKMPalettizer(model, _cfg(3))
    a = _quiet(one, sensitivity=sens)
    b = _quiet(two, sensitivity=sens, num_kmeans_workers=2)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    assert one.report().as_dicts() == two.report().as_dicts()
    bad = dict(sens.fisher)
    bad["2.weight"] = torch.full_like(bad["2.weight"], float("inf"))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"'2\.weight'"):
        _quiet(SKMPalettizer(model, _cfg(3)), sensitivity=bad, num_kmeans_workers=2, inplace=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    ("kind", "n_bits", "groups"),
    [("bimodal", 4, 1), ("student", 3, 1), ("gauss", 2, 1), ("bimodal", 4, 2)],
)
def test_default_kmeans_equals_full_exact_dp(kind, n_bits, groups):
    # The default for large fp32 layers is the two-level DP (much faster than the exact DP on
    # every distinct value); it must land on the same optimum. The bimodal layer once fooled a
    # refinement around the 16-bit-code solution (a near tie between cluster allocations).
    g = torch.Generator().manual_seed(7)
    shape = (256, 512)
    if kind == "bimodal":
        far = torch.rand(shape, generator=g) < 0.5
        w = torch.where(
            far, torch.randn(shape, generator=g) + 3, torch.randn(shape, generator=g) * 0.1
        )
    elif kind == "student":
        w = torch.distributions.StudentT(2.5).sample(shape) * 0.02
    else:
        w = torch.randn(shape, generator=g) * 0.02
    layer = nn.Linear(512, 256, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    model = nn.Sequential(layer)
    fisher = {"0.weight": (w * torch.randn(shape, generator=g)).square()}
    s = normalize_sensitivity(fisher["0.weight"])
    module = (
        {"granularity": "per_grouped_channel", "group_size": 256 // groups} if groups > 1 else {}
    )
    cfg = _cfg(n_bits, **module)
    auto = _quiet(SKMPalettizer(model, cfg), sensitivity=fisher)
    exact = _quiet(SKMPalettizer(model, cfg), sensitivity=fisher, exact_kmeans=True)
    e_auto = _weighted_sse(w, auto[0].weight, s)
    e_exact = _weighted_sse(w, exact[0].weight, s)
    assert e_auto == pytest.approx(e_exact, rel=1e-12)


def _layer(w):
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return nn.Sequential(layer)


def _auto_and_exact(w, fisher, cfg):
    model = _layer(w)
    auto = _quiet(SKMPalettizer(model, cfg), sensitivity={"0.weight": fisher})
    exact = _quiet(SKMPalettizer(model, cfg), sensitivity={"0.weight": fisher}, exact_kmeans=True)
    return auto[0].weight.detach(), exact[0].weight.detach()


@pytest.mark.parametrize(
    ("distinct", "n_bits"),
    [(2, 4), (3, 2), (4, 2), (4, 4), (7, 3), (8, 2), (15, 3), (15, 4)],
)
def test_default_kmeans_with_few_distinct_values_is_exact(distinct, n_bits):
    # 65,536 values per LUT: the default two-level path. With few distinct values (a weight
    # palettized before, ternary or integer weights) level 1 has at most k blocks; it crashed
    # (an index past the end of the values) and could miss the optimum.
    g = torch.Generator().manual_seed(distinct * 10 + n_bits)
    w = (torch.randint(0, distinct, (128, 512), generator=g) - distinct // 2).float() * 0.03
    fisher = torch.rand(128, 512, generator=g) ** 2
    s = normalize_sensitivity(fisher)
    auto, exact = _auto_and_exact(w, fisher, _cfg(n_bits))
    # the optimum by brute force over the distinct values (each carrying its summed weight)
    u, inv = torch.unique(w, return_inverse=True)
    su = torch.zeros(len(u), dtype=torch.float64).index_add_(0, inv.flatten(), s.double().flatten())
    best = _brute_force(u, su, 2**n_bits)
    for got in (auto, exact):
        assert _weighted_sse(w, got, s) == pytest.approx(best, rel=1e-9, abs=1e-15)
    if distinct <= 2**n_bits:
        # (the exact kernel centres its sums: a cluster of zeros comes back as ~1e-18)
        torch.testing.assert_close(auto, w, rtol=0, atol=1e-15)


def test_default_kmeans_on_a_weight_palettized_before():
    # the reviewer's repro: a 2-bit palettized layer re-palettized by SKM at 4 bits
    from lightning_palettize import PostTrainingPalettizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 128, bias=False))
    small = PostTrainingPalettizer(model, {"global_config": {"n_bits": 2}}).compress(progress=False)
    fisher = {"0.weight": torch.rand(128, 512)}
    out = _quiet(SKMPalettizer(small, _cfg(4)), sensitivity=fisher)
    assert torch.equal(out[0].weight, small[0].weight)


@pytest.mark.parametrize(
    ("case", "seed", "n_bits"),
    [("one_code", 7, 2), ("one_code", 2, 3), ("bulk_and_far", 2, 2), ("bulk_and_far", 3, 3)],
)
def test_default_kmeans_when_level1_does_not_resolve_the_values(case, seed, n_bits):
    # All values within one 16-bit code (level 1: one block; the default was ~200x worse than
    # exact at 2 bits), or that bulk next to a few far values (level 1 spends its clusters on
    # the far values; the bulk's split lies far from every level-1 boundary).
    g = torch.Generator().manual_seed(seed)
    w = 1.0 + torch.randn(128, 512, generator=g) * 1e-6
    fisher = torch.exp(torch.randn(128, 512, generator=g) * 8)
    if case == "bulk_and_far":
        w.view(-1)[:12] = torch.linspace(-2, 3, 12)
    s = normalize_sensitivity(fisher)
    auto, exact = _auto_and_exact(w, fisher, _cfg(n_bits))
    e_exact = _weighted_sse(w, exact, s)  # ~1e-13: no absolute tolerance
    assert _weighted_sse(w, auto, s) == pytest.approx(e_exact, rel=1e-12, abs=0)


def test_default_kmeans_mixes_exact_and_two_level_groups():
    # one LUT group with few distinct values (the exact DP), one ordinary (the two levels)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(256, 512, generator=g) * 0.02
    w[:128] = torch.randint(-3, 4, (128, 512), generator=g).float() * 0.01
    fisher = torch.rand(256, 512, generator=g)
    s = normalize_sensitivity(fisher)
    cfg = _cfg(4, granularity="per_grouped_channel", group_size=128)
    auto, exact = _auto_and_exact(w, fisher, cfg)
    torch.testing.assert_close(auto[:128], w[:128], rtol=0, atol=1e-15)
    assert _weighted_sse(w[128:], auto[128:], s[128:]) == pytest.approx(
        _weighted_sse(w[128:], exact[128:], s[128:]), rel=1e-12, abs=0
    )


def test_touches_edge_ignores_empty_clusters_at_the_end():
    from lightning_palettize.palettizers.skm import _touches_edge

    cuts = torch.zeros(1, 8, dtype=torch.long)
    cuts[0, 2:5] = 1
    # clusters 2 and 3 are empty (start == n): no index past the end, and not an edge
    assert not _touches_edge(torch.tensor([[3, 8, 8]]), cuts, 8)
    assert _touches_edge(torch.tensor([[2, 8, 8]]), cuts, 8)  # no cut allowed before position 1
