"""Tests for lightning_palettize.sensitivity: Fisher values against explicit autograd loops,
the model-state contract, sample counting, serialisation and normalisation."""

from __future__ import annotations

import logging
import math
from collections import namedtuple

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_palettize import sensitivity as sens_mod
from lightning_palettize.sensitivity import (
    Sensitivity,
    compute_sensitivity,
    normalize_sensitivity,
)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 3)
        self.pooler = nn.Linear(4, 4)  # never called: gets no gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class BNDropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def ce_loss(model: nn.Module, item) -> torch.Tensor:
    x, y = item
    return F.cross_entropy(model(x), y)


def make_data(n_items: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 5, generator=g), torch.randint(0, 3, (batch,), generator=g))
        for _ in range(n_items)
    ]


def manual_fisher(model, items, loss_fn, names) -> dict[str, torch.Tensor]:
    """Reference: sum of squared gradients of loss_fn over `items`, by torch.autograd.grad."""
    params = dict(model.named_parameters())
    out = {n: torch.zeros_like(params[n]) for n in names}
    for item in items:
        grads = torch.autograd.grad(loss_fn(model, item), [params[n] for n in names])
        for n, g in zip(names, grads):
            out[n] += g.square()
    return out


def split_samples(items):
    return [(x[i : i + 1], y[i : i + 1]) for x, y in items for i in range(x.shape[0])]


USED = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def assert_fisher_close(got: Sensitivity, want: dict[str, torch.Tensor]) -> None:
    assert sorted(got.fisher) == sorted(want)
    for n, w in want.items():
        assert got[n].dtype == torch.float32 and got[n].shape == w.shape
        torch.testing.assert_close(got[n], w, rtol=1e-5, atol=1e-9)


@pytest.fixture
def no_vmap(monkeypatch):
    monkeypatch.setattr(sens_mod, "_TRY_VMAP", False)


# ---- Fisher values ---------------------------------------------------------------------------


def test_per_item_matches_manual_batch_gradients():
    torch.manual_seed(0)
    model, data = MLP(), make_data(6, 4)
    got = compute_sensitivity(model, data, ce_loss, progress=False, nsamples=6)
    assert got.nsamples == 6 and got.per_sample is False
    assert_fisher_close(got, manual_fisher(model, data, ce_loss, USED))


@pytest.mark.parametrize("vectorised", [True, False], ids=["vmap", "loop"])
def test_per_sample_matches_manual_per_sample_gradients(vectorised, monkeypatch):
    monkeypatch.setattr(sens_mod, "_TRY_VMAP", vectorised)
    torch.manual_seed(0)
    model, data = MLP(), make_data(3, 4)
    got = compute_sensitivity(model, data, ce_loss, progress=False, nsamples=12, per_sample=True)
    assert got.nsamples == 12 and got.per_sample is True
    want = manual_fisher(model, split_samples(data), ce_loss, USED)
    assert_fisher_close(got, want)
    # Per-sample Fisher is not the batch one: the switch changes the answer.
    batch = manual_fisher(model, data, ce_loss, USED)
    assert not torch.allclose(want["fc1.weight"], batch["fc1.weight"])


def test_vmap_path_is_used_and_equals_loop_path(monkeypatch, caplog):
    torch.manual_seed(0)
    model, data = MLP(), make_data(4, 5)
    calls = []

    def counting_loss(model, item):
        calls.append(item[0].shape)
        return ce_loss(model, item)

    with caplog.at_level(logging.DEBUG, logger="lightning_palettize.sensitivity"):
        fast = compute_sensitivity(
            model, data, counting_loss, nsamples=20, per_sample=True, progress=False
        )
    # One traced call per item: the vectorised path ran, with no fallback, and loss_fn saw
    # batches of one sample, as in the loop.
    assert len(calls) == 4 and "failed" not in caplog.text
    assert all(s == (1, 5) for s in calls)
    monkeypatch.setattr(sens_mod, "_TRY_VMAP", False)
    calls.clear()
    slow = compute_sensitivity(
        model, data, counting_loss, nsamples=20, per_sample=True, progress=False
    )
    assert len(calls) == 20 and all(s == (1, 5) for s in calls)
    assert fast.missing == slow.missing == ["pooler.weight", "pooler.bias"]
    assert_fisher_close(fast, slow.fisher)


def test_vmap_chunks_bound_live_per_sample_grads(monkeypatch):
    torch.manual_seed(0)
    model, data = MLP(), make_data(2, 6)
    numel = sum(model.get_parameter(n).numel() for n in USED)
    monkeypatch.setattr(sens_mod, "_VMAP_GRAD_ELEMENTS", 2 * numel + 1)  # chunks of 2
    calls = []
    got = compute_sensitivity(
        model,
        data,
        lambda m, it: calls.append(1) or ce_loss(m, it),
        param_names=USED,
        nsamples=12,
        per_sample=True,
        progress=False,
    )
    assert len(calls) == 6
    assert_fisher_close(got, manual_fisher(model, split_samples(data), ce_loss, USED))


def test_fallback_to_loop_when_torch_func_fails(caplog):
    class DataDependent(MLP):
        def forward(self, x):
            h = self.fc1(x)
            if h.sum() > 0:  # data-dependent control flow: vmap cannot trace it
                h = -h
            return self.fc2(h)

    torch.manual_seed(0)
    model, data = DataDependent(), make_data(3, 4)
    with caplog.at_level(logging.DEBUG, logger="lightning_palettize.sensitivity"):
        got = compute_sensitivity(
            model, data, ce_loss, nsamples=12, per_sample=True, progress=False
        )
    assert caplog.text.count("using a per-sample loop") == 1
    assert_fisher_close(got, manual_fisher(model, split_samples(data), ce_loss, USED))


def test_failed_probe_discards_its_partial_sums(monkeypatch):
    torch.manual_seed(0)
    model, data = MLP(), make_data(2, 6)
    numel = sum(model.get_parameter(n).numel() for n in USED)
    monkeypatch.setattr(sens_mod, "_VMAP_GRAD_ELEMENTS", 2 * numel + 1)  # chunks of 2
    calls = []

    def flaky_under_vmap(m, item):
        calls.append(1)
        if len(calls) > 1:
            item[0].sum().item()  # fine eagerly, an error under vmap: the 2nd chunk fails
        return ce_loss(m, item)

    got = compute_sensitivity(
        model,
        data,
        flaky_under_vmap,
        param_names=USED,
        nsamples=12,
        per_sample=True,
        progress=False,
    )
    assert len(calls) == 2 + 12  # two chunks tried, then the loop over every sample
    assert_fisher_close(got, manual_fisher(model, split_samples(data), ce_loss, USED))


def test_per_sample_splits_dicts_and_passes_non_tensor_leaves():
    torch.manual_seed(0)
    model = MLP()
    g = torch.Generator().manual_seed(1)
    data = [
        {"x": torch.randn(3, 5, generator=g), "y": torch.randint(0, 3, (3,), generator=g), "t": 2.0}
        for _ in range(2)
    ]
    seen_t = set()

    def loss_fn(m, item):
        seen_t.add(item["t"])
        return F.cross_entropy(m(item["x"]), item["y"]) * item["t"]

    got = compute_sensitivity(model, data, loss_fn, nsamples=6, per_sample=True, progress=False)
    samples = [
        {"x": d["x"][i : i + 1], "y": d["y"][i : i + 1], "t": 2.0} for d in data for i in range(3)
    ]
    assert seen_t == {2.0}
    assert_fisher_close(got, manual_fisher(model, samples, loss_fn, USED))


def test_per_sample_rejects_items_with_mismatched_batch_dims():
    model = MLP()
    data = [(torch.randn(4, 5), torch.randint(0, 3, (3,)))]
    with pytest.raises(ValueError, match="same size along dim 0"):
        compute_sensitivity(model, data, ce_loss, per_sample=True, progress=False)


# ---- which parameters ------------------------------------------------------------------------


@pytest.mark.parametrize("per_sample", [False, True])
def test_unused_submodule_is_missing_not_zero(per_sample):
    torch.manual_seed(0)
    got = compute_sensitivity(
        MLP(), make_data(2, 3), ce_loss, nsamples=2, per_sample=per_sample, progress=False
    )
    assert got.missing == ["pooler.weight", "pooler.bias"]
    assert "pooler.weight" not in got and got.get("pooler.weight") is None
    with pytest.raises(KeyError, match="no gradient"):
        got["pooler.weight"]
    assert sorted(got.fisher) == sorted(USED)


def test_zero_gradient_is_not_missing():
    class DeadBranch(MLP):
        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x))) + 0.0 * self.pooler.bias.sum()

    torch.manual_seed(0)
    for per_sample in (False, True):
        got = compute_sensitivity(
            DeadBranch(),
            make_data(2, 3),
            ce_loss,
            nsamples=6 if per_sample else 2,
            per_sample=per_sample,
            progress=False,
        )
        assert got.missing == ["pooler.weight"]
        assert torch.equal(got["pooler.bias"], torch.zeros(4))


@pytest.mark.parametrize("per_sample", [False, True])
def test_frozen_requested_param_gets_fisher_and_stays_frozen(per_sample):
    torch.manual_seed(0)
    model, data = MLP(), make_data(2, 3)
    model.fc1.requires_grad_(False)
    got = compute_sensitivity(
        model,
        data,
        ce_loss,
        param_names=["fc1.weight", "fc2.bias"],
        nsamples=6 if per_sample else 2,
        per_sample=per_sample,
        progress=False,
    )
    assert not model.fc1.weight.requires_grad and not model.fc1.bias.requires_grad
    assert sorted(got.fisher) == ["fc1.weight", "fc2.bias"] and got.missing == []
    model.fc1.requires_grad_(True)
    items = split_samples(data) if per_sample else data
    want = manual_fisher(model, items, ce_loss, ["fc1.weight", "fc2.bias"])
    assert_fisher_close(got, want)
    assert got["fc1.weight"].abs().sum() > 0


def test_tied_aliases_share_values_in_separate_tensors():
    class Tied(MLP):
        def __init__(self):
            super().__init__()
            self.head = self.fc2  # same parameters under a second name

    torch.manual_seed(0)
    model, data = Tied(), make_data(2, 3)
    got = compute_sensitivity(
        model, data, ce_loss, param_names=["fc2.weight", "head.weight"], nsamples=2, progress=False
    )
    assert torch.equal(got["fc2.weight"], got["head.weight"])
    assert got["fc2.weight"].data_ptr() != got["head.weight"].data_ptr()


def test_bad_param_names_and_nsamples():
    model, data = MLP(), make_data(1, 2)
    with pytest.raises(ValueError, match="nope"):
        compute_sensitivity(model, data, ce_loss, param_names=["nope"], progress=False)
    with pytest.raises(TypeError, match="sequence of names"):
        compute_sensitivity(model, data, ce_loss, param_names="fc1.weight", progress=False)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="nsamples"):
            compute_sensitivity(model, data, ce_loss, nsamples=bad, progress=False)
    with pytest.raises(ValueError, match="no samples"):
        compute_sensitivity(model, [], ce_loss, progress=False)
    with pytest.raises(ValueError, match="single-element"):
        compute_sensitivity(
            model,
            data,
            lambda m, it: F.cross_entropy(m(it[0]), it[1], reduction="none"),
            progress=False,
        )


# ---- counting --------------------------------------------------------------------------------


def test_nsamples_counts_items_or_samples():
    torch.manual_seed(0)
    model, data = MLP(), make_data(5, 4)
    per_item = compute_sensitivity(model, data, ce_loss, nsamples=3, progress=False)
    assert per_item.nsamples == 3
    assert_fisher_close(per_item, manual_fisher(model, data[:3], ce_loss, USED))
    # 6 samples = the first item whole and half of the second.
    per_sample = compute_sensitivity(
        model, data, ce_loss, nsamples=6, per_sample=True, progress=False
    )
    assert per_sample.nsamples == 6
    want = manual_fisher(model, split_samples(data)[:6], ce_loss, USED)
    assert_fisher_close(per_sample, want)


def test_stops_reading_the_dataloader_at_nsamples():
    pulled = []

    def stream():
        for item in make_data(10, 2):
            pulled.append(1)
            yield item

    compute_sensitivity(MLP(), stream(), ce_loss, nsamples=3, progress=False)
    assert len(pulled) == 3


@pytest.mark.parametrize("per_sample, want", [(False, 3), (True, 6)])
def test_short_dataloader_warns_and_uses_what_there_is(per_sample, want):
    data = make_data(3, 2)
    with pytest.warns(UserWarning, match=rf"only {want} .*nsamples=10"):
        got = compute_sensitivity(
            MLP(), data, ce_loss, nsamples=10, per_sample=per_sample, progress=False
        )
    assert got.nsamples == want


# ---- model state contract --------------------------------------------------------------------


def _bn_model_with_state():
    torch.manual_seed(0)
    model = BNDropNet()
    model.train()
    model.fc2.eval()  # a mixed-mode model: every submodule's flag must come back
    model.bn.running_mean.uniform_()
    model.bn.num_batches_tracked.fill_(7)
    model.fc2.bias.requires_grad_(False)
    model.fc1.weight.grad = torch.full_like(model.fc1.weight, 0.25)
    model.fc2.weight.grad = torch.randn_like(model.fc2.weight)
    return model


def _snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "buffer_objects": {n: b for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad_objects": {n: p.grad for n, p in model.named_parameters()},
        "grad_values": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
    }


def _assert_same_state(model, before):
    for n, p in model.named_parameters():
        assert torch.equal(p, before["params"][n]), n
        assert p.requires_grad == before["requires_grad"][n], n
        assert p.grad is before["grad_objects"][n], n
        if before["grad_values"][n] is not None:
            assert torch.equal(p.grad, before["grad_values"][n]), n
    for n, b in model.named_buffers():
        assert b is before["buffer_objects"][n], n
        assert torch.equal(b, before["buffers"][n]), n
    assert {n: m.training for n, m in model.named_modules()} == before["modes"]


def test_model_state_is_restored_bitwise():
    model = _bn_model_with_state()
    before = _snapshot(model)
    mean_calls = []

    def loss_fn(m, item):
        mean_calls.append(m.bn.running_mean.clone())
        m.eval()  # a careless loss_fn: the mode must still come back
        m.train()
        if len(mean_calls) == 4:  # ... and it even replaces a buffer object
            m.bn.running_var = torch.zeros(8)
        return ce_loss(m, item)

    got = compute_sensitivity(model, make_data(4, 4), loss_fn, nsamples=4, progress=False)
    # BatchNorm did update its stats during calibration (train mode kept), then got them back.
    assert not torch.equal(mean_calls[-1], before["buffers"]["bn.running_mean"])
    _assert_same_state(model, before)
    assert "fc2.bias" in got  # frozen but requested by default


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize(
    "per_sample, vectorised",
    [(False, False), (True, False), (True, True)],
    ids=["per-item", "per-sample-loop", "per-sample-vmap"],
)
def test_model_state_is_restored_when_loss_fn_raises(per_sample, vectorised, monkeypatch):
    monkeypatch.setattr(sens_mod, "_TRY_VMAP", vectorised)
    model = _bn_model_with_state()
    if per_sample:
        model.bn.eval()  # BatchNorm in train mode cannot see batches of one
    before = _snapshot(model)
    calls = []

    def loss_fn(m, item):
        calls.append(1)
        if len(calls) == 3:
            raise Boom("third item")
        return ce_loss(m, item)

    with pytest.raises(Boom, match="third item"):
        compute_sensitivity(model, make_data(5, 2), loss_fn, per_sample=per_sample, progress=False)
    assert len(calls) == 3
    _assert_same_state(model, before)
    # Hooks are gone and flags are back: a second run works and restores again.
    compute_sensitivity(
        model,
        make_data(2, 2),
        ce_loss,
        nsamples=4 if per_sample else 2,
        per_sample=per_sample,
        progress=False,
    )
    _assert_same_state(model, before)


def test_grads_enabled_inside_no_grad_refused_in_inference_mode():
    torch.manual_seed(0)
    model, data = MLP(), make_data(2, 3)
    with torch.no_grad():
        got = compute_sensitivity(model, data, ce_loss, nsamples=2, progress=False)
    assert_fisher_close(got, manual_fisher(model, data, ce_loss, USED))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        compute_sensitivity(model, data, ce_loss, progress=False)


# ---- serialisation ---------------------------------------------------------------------------


def test_save_load_round_trip_is_bitwise(tmp_path):
    torch.manual_seed(0)
    got = compute_sensitivity(
        MLP(), make_data(2, 3), ce_loss, nsamples=6, per_sample=True, progress=False
    )
    path = tmp_path / "sens.safetensors"
    got.save(path)
    back = Sensitivity.load(path)
    assert (back.nsamples, back.per_sample, back.missing) == (6, True, got.missing)
    assert sorted(back.fisher) == sorted(got.fisher)
    for n, t in got.fisher.items():
        assert back[n].dtype == torch.float32 and torch.equal(back[n], t)


def test_load_rejects_corrupt_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        Sensitivity.load(corrupt)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="foreign.safetensors.*not a sensitivity file"):
        Sensitivity.load(foreign)
    newer = tmp_path / "newer.safetensors"
    header = '{"format_version": 99, "nsamples": 1, "per_sample": false, "missing": []}'
    save_file({"w": torch.zeros(2)}, str(newer), metadata={sens_mod._HEADER_KEY: header})
    with pytest.raises(ValueError, match="format_version 99"):
        Sensitivity.load(newer)
    with pytest.raises(FileNotFoundError):
        Sensitivity.load(tmp_path / "absent.safetensors")


# ---- normalisation ---------------------------------------------------------------------------


def test_normalize_all_zero_gives_ones():
    out = normalize_sensitivity(torch.zeros(3, 4))
    assert out.dtype == torch.float32 and torch.equal(out, torch.ones(3, 4))


def test_normalize_mixed_zeros_get_smallest_positive():
    f = torch.tensor([0.0, 4.0, 1e-3, 0.0, 2.0])
    out = normalize_sensitivity(f)
    assert torch.equal(f, torch.tensor([0.0, 4.0, 1e-3, 0.0, 2.0]))  # input untouched
    torch.testing.assert_close(out, torch.tensor([2.5e-4, 1.0, 2.5e-4, 2.5e-4, 0.5]))
    # Huge dynamic range: still finite and strictly positive after the fp32 cast.
    wide = normalize_sensitivity(torch.tensor([0.0, 1e-300, 1.0], dtype=torch.float64))
    assert torch.isfinite(wide).all() and (wide > 0).all() and wide.max() == 1.0


def test_normalize_rejects_non_finite_and_negative():
    with pytest.raises(ValueError, match="2 of 4"):
        normalize_sensitivity(torch.tensor([1.0, math.nan, math.inf, 0.0]))
    with pytest.raises(ValueError, match="negative"):
        normalize_sensitivity(torch.tensor([1.0, -1.0]))


# ---- progress --------------------------------------------------------------------------------


def test_progress_false_prints_nothing(capsys):
    compute_sensitivity(MLP(), make_data(3, 2), ce_loss, nsamples=3, progress=False)
    compute_sensitivity(
        MLP(), make_data(3, 2), ce_loss, nsamples=6, per_sample=True, progress=False
    )
    assert capsys.readouterr() == ("", "")


def test_progress_plain_fallback_prints_to_stderr(capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    compute_sensitivity(MLP(), make_data(20, 2), ce_loss, nsamples=20, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 10 and "20/20 samples (100%)" in err


Point = namedtuple("Point", "x y")


def test_namedtuple_items_are_split_per_sample():
    torch.manual_seed(0)
    model = MLP()
    data = [Point(x, y) for x, y in make_data(2, 3)]
    got = compute_sensitivity(model, data, ce_loss, nsamples=6, per_sample=True, progress=False)
    want = manual_fisher(model, split_samples(data), ce_loss, USED)
    assert_fisher_close(got, want)


# ---- CUDA ------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("per_sample", [False, True])
def test_cuda_matches_cpu_and_restores_state(per_sample, tmp_path):
    torch.manual_seed(0)
    model, data = MLP(), make_data(3, 4)
    n = 12 if per_sample else 3
    cpu = compute_sensitivity(
        model, data, ce_loss, nsamples=n, per_sample=per_sample, progress=False
    )
    model.cuda()
    model.fc1.weight.grad = torch.ones_like(model.fc1.weight)
    before = _snapshot(model)
    gpu = compute_sensitivity(
        model,
        data,
        lambda m, it: ce_loss(m, (it[0].cuda(), it[1].cuda())),
        nsamples=n,
        per_sample=per_sample,
        progress=False,
    )
    _assert_same_state(model, before)
    assert gpu.missing == cpu.missing
    for name, f in cpu.fisher.items():
        assert gpu[name].device == model.get_parameter(name).device
        torch.testing.assert_close(gpu[name].cpu(), f, rtol=1e-4, atol=1e-9)
    path = tmp_path / "gpu.safetensors"
    gpu.save(path)
    back = Sensitivity.load(path, map_location="cuda")
    assert all(torch.equal(back[k], v) for k, v in gpu.fisher.items())
    w = normalize_sensitivity(gpu["fc1.weight"])
    assert w.is_cuda and torch.isfinite(w).all() and (w > 0).all()
