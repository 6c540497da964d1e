"""DKMPalettizer on weights read by more than their own module's forward (MultiheadAttention's
out_proj, tied weights), reparametrized weights, casts after prepare, and prepare's all-or-nothing
rules."""

import copy
import pickle

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from lightning_palettize import DKMPalettizer, strip_coreml_metadata
from lightning_palettize.palettizers.dkm import _fake_palettizers, _hook_owner

_CFG = {"global_config": {"n_bits": 2, "weight_threshold": 0}}


def _train(pal, model, batch, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        loss = model(batch).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pal.step()


def _hooks(model):
    return [
        (name, h)
        for name, m in model.named_modules()
        for h in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
    ]


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def _out_proj_weights_seen(monkeypatch):
    """The out_proj weight every multi_head_attention_forward call gets."""
    seen = []
    real = nn.functional.multi_head_attention_forward

    def spy(*args, **kwargs):
        seen.append(args[11] if len(args) > 11 else kwargs["out_proj_weight"])
        return real(*args, **kwargs)

    monkeypatch.setattr(nn.functional, "multi_head_attention_forward", spy)
    return seen


def test_multihead_attention_out_proj_is_palettized_in_training_and_eval(monkeypatch):
    # MultiheadAttention reads out_proj.weight itself and never calls out_proj: the weight
    # must still be soft-palettized in training and hard-assigned in eval, as finalize does
    torch.manual_seed(0)
    pal = DKMPalettizer(_Attention(), _CFG)
    model = pal.prepare()
    x = torch.randn(2, 5, 32)
    seen = _out_proj_weights_seen(monkeypatch)
    model(x).sum().backward()
    raw = model.mha.out_proj.weight
    assert seen[-1] is not raw and seen[-1].grad_fn is not None
    assert raw.grad is not None and raw.grad.abs().sum() > 0
    _train(pal, model, x)
    model.eval()
    y = model(x)  # (with autograd on: the python path, which the spy sees)
    assert len(torch.unique(seen[-1])) <= 4
    with torch.no_grad():
        y_fast = model(x)  # MultiheadAttention's fused inference path
    final = pal.finalize()
    with torch.no_grad():
        assert torch.allclose(y, final(x), atol=1e-6)
        assert torch.allclose(y_fast, final(x), atol=1e-6)
    assert _hooks(final) == []


def test_transformer_encoder_layer_eval_equals_finalize():
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    pal = DKMPalettizer(layer, _CFG)
    model = pal.prepare()
    x = torch.randn(2, 6, 32)
    _train(pal, model, x)
    model.eval()
    with torch.no_grad():
        y = model(x)
    final = pal.finalize()
    assert torch.allclose(y, final(x), atol=1e-5)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.emb(tokens))


def test_tied_weight_is_palettized_for_every_module_using_it():
    # select_weights lists a shared weight once (for emb); head reads the same parameter and
    # must see the same palettized value, or training and eval differ from finalize's model
    torch.manual_seed(2)
    pal = DKMPalettizer(_Tied(), _CFG)
    model = pal.prepare()
    tokens = torch.arange(10)
    seen = []
    model.head.register_forward_hook(lambda m, a, o: seen.append(m.weight), prepend=True)
    model(tokens)
    assert seen[-1] is not model.emb.weight and seen[-1].grad_fn is not None
    _train(pal, model, tokens)
    model.eval()
    with torch.no_grad():
        y = model(tokens)
    assert len(torch.unique(seen[-1])) <= 4
    final = pal.finalize()
    assert torch.allclose(y, final(tokens), atol=1e-6)
    assert [name for name, _ in _hooks(final)] == ["head"]  # only the test's own spy
    fresh = _Tied()
    fresh.load_state_dict(strip_coreml_metadata(copy.deepcopy(final)).state_dict(), strict=True)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_model_keeps_its_readers_on_its_own_palettizers(how):
    torch.manual_seed(3)
    pal = DKMPalettizer(_Tied(), _CFG)
    model = pal.prepare()
    copied = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    (fp_copy,) = [fp for *_, fp in _fake_palettizers(copied)]
    owners = {_hook_owner(h) for name, h in _hooks(copied) if name == "head"}
    assert owners == {fp_copy}
    copied.eval()
    model.eval()
    tokens = torch.arange(7)
    with torch.no_grad():
        assert torch.equal(copied(tokens), model(tokens))
        copied.emb.weight.mul_(2.0)  # the copy's own weight: only its outputs move
        assert not torch.equal(copied(tokens), model(tokens))


def test_pruning_applied_before_prepare_sees_the_palettized_weight():
    # pruning's pre-hook recomputes weight from weight_orig; DKM's hook runs first, so the
    # pruned weight is the palettized one times the mask (as when pruning after prepare)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 64))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    pal = DKMPalettizer(model, {"global_config": {"n_bits": 3, "weight_threshold": 0}})
    pal.prepare(inplace=True)
    seen = []
    model[0].register_forward_hook(lambda m, a, o: seen.append(m.weight), prepend=True)
    model.eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        y = model(x)
    assert len(torch.unique(seen[-1])) <= 8 + 1  # the LUT's values and the pruned zeros
    assert torch.allclose(y, pal.finalize(inplace=True)(x), atol=1e-6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: nn.utils.parametrizations.weight_norm(nn.Linear(32, 32)), "parametrization"),
        (lambda: nn.utils.parametrizations.spectral_norm(nn.Linear(32, 32)), "parametrization"),
        (lambda: nn.utils.weight_norm(nn.Linear(32, 32)), "neither a parameter nor a buffer"),
    ],
)
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_reparametrized_weight_is_rejected_and_model_left_as_is(make, match):
    model = nn.Sequential(make(), nn.Linear(32, 32))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match) as err:
        DKMPalettizer(model, _CFG).prepare(inplace=True)
    assert "0.weight" in str(err.value) and "module_name_configs={'0': None}" in str(err.value)
    assert list(_fake_palettizers(model)) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs", [{"sparse": True}, {"max_norm": 1.0}])
def test_embedding_options_dkm_cannot_serve_are_rejected(kwargs):
    key = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"0.weight.*{key}="):
        DKMPalettizer(nn.Sequential(nn.Embedding(100, 16, **kwargs)), _CFG).prepare()


def test_preparing_a_prepared_model_raises():
    model = nn.Sequential(nn.Linear(32, 64))
    pal = DKMPalettizer(model, _CFG)
    pal.prepare(inplace=True)
    hooks = _hooks(model)
    with pytest.raises(ValueError, match=r"already prepared for DKM \(0.weight\)"):
        pal.prepare(inplace=True)
    with pytest.raises(ValueError, match="already prepared"):
        DKMPalettizer(model, _CFG).prepare()
    assert _hooks(model) == hooks


def test_failed_prepare_leaves_the_model_as_it_was():
    # the second weight's k-means fails after the first one's succeeded
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 8))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match="1.weight: .*NaN"):
        DKMPalettizer(model, _CFG).prepare(inplace=True)
    assert [n for n, _ in model.named_modules()] == names
    assert _hooks(model) == []


def test_per_channel_scale_with_a_quantized_lut_is_rejected_at_prepare():
    # Core ML's converter refuses the pair: say so before training, naming the weight
    cfg = {
        "global_config": {"n_bits": 2, "weight_threshold": 0},
        "module_name_configs": {
            "1": {
                "n_bits": 2,
                "weight_threshold": 0,
                "enable_per_channel_scale": True,
                "lut_dtype": "i8",
            }
        },
    }
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="1.weight: enable_per_channel_scale=True with lut_dtype"):
        DKMPalettizer(model, cfg).prepare(inplace=True)
    assert _hooks(model) == []


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_model_cast_after_prepare_keeps_float32_kmeans_state(cast):
    # Lightning's "16-true" casts the module after the callback prepared it: the centroids
    # stay float32 with their values (fp16 buffers once reached the compiled kernels, which
    # read float32, and corrupted the heap)
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    cfg = {"global_config": {"n_bits": 2, "weight_threshold": 0, "enable_per_channel_scale": True}}
    pal = DKMPalettizer(model, cfg)
    pal.prepare(inplace=True)
    before = {k: v.clone() for k, v in model.state_dict().items() if "_dkm." in k}
    getattr(model, cast)()
    state = {k: v for k, v in model.state_dict().items() if "_dkm." in k}
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in state.items())
    assert model[0].weight.dtype == getattr(torch, "float16" if cast == "half" else cast)
    x = torch.randn(8, 16, dtype=model[0].weight.dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        loss = model(x).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pal.step()
    assert model[0].weight_dkm.centroids.dtype == torch.float32
    final = pal.finalize(inplace=True)
    assert final[0].weight.dtype == model[2].weight.dtype
    assert len(torch.unique(final[0].weight)) <= 4 * 32  # 4 LUT values times a scale per row


def test_soft_kmeans_takes_centroids_of_any_float_dtype():
    from lightning_palettize.soft_kmeans import soft_kmeans

    torch.manual_seed(7)
    x = 0.02 * torch.randn(1, 5000, 1)
    c = torch.quantile(x.view(-1), torch.linspace(0, 1, 4)).view(1, 4, 1).half().float()
    want = soft_kmeans(x, c)
    got = soft_kmeans(x, c.half())
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_meta_weights_are_rejected_naming_the_weight():
    from lightning_palettize import PostTrainingPalettizer

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(ValueError, match=r"0.weight \(32, 32\): the weight is on the meta device"):
        DKMPalettizer(model, _CFG).prepare(inplace=True)
    assert _hooks(model) == []
    with pytest.raises(ValueError, match="0.weight .*meta device"):
        PostTrainingPalettizer(model).compress(inplace=True, progress=False)


@pytest.mark.parametrize(
    "dim, config, want",
    [
        (32, None, {}),  # out_proj's 1,024 elements are under the 2,048 threshold: none
        (64, None, {"mha.in_proj_weight": 2, "mha.out_proj.weight": 2}),  # MHA's default
        (
            64,
            {"module_type_configs": {nn.MultiheadAttention: {"n_bits": 3}}},
            {"mha.in_proj_weight": 3, "mha.out_proj.weight": 3},
        ),
        (64, {"module_type_configs": {nn.Linear: {"n_bits": 6}, nn.MultiheadAttention: None}}, {}),
    ],
)
def test_attention_config_covers_out_proj_as_in_coremltools(dim, config, want):
    # coremltools' DKM: out_proj.weight is one of the attention's weights (its config; every
    # weight must pass weight_threshold), never a Linear of its own
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(dim, 4, batch_first=True)

    pal = DKMPalettizer(Attention(), config)
    model = pal.prepare()
    assert {f"{n}.{fp.param_name}": fp.n_bits for n, _, _, fp in _fake_palettizers(model)} == want


def _ckpt_run(layers, x, ckpt, steps=3, reentrant=False, monitor=False):
    from torch.utils.checkpoint import checkpoint

    model = copy.deepcopy(layers)
    pal = DKMPalettizer(model, _CFG)
    pal.prepare(inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for _ in range(steps):
        if monitor:  # a pass without autograd in training mode (monitoring, a target): its own
            with torch.no_grad():  # semantics, not a checkpoint region's
                h = x
                for layer in model:
                    h = layer(h)
        h = x.requires_grad_(reentrant)  # (a reentrant region needs an input with grad)
        for layer in model:
            h = checkpoint(layer, h, use_reentrant=reentrant) if ckpt else layer(h)
        opt.zero_grad()
        h.square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        pal.step()
    return grads, [layer.weight_dkm.centroids.clone() for layer in model]


@pytest.mark.parametrize("monitor", [False, True])
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("chunks", [1, 2])
def test_activation_checkpointing_equals_plain_training(monkeypatch, chunks, reentrant, monitor):
    # non-reentrant checkpointing (transformers' default): the batched round is computed in
    # the first layer's region; its recomputation is served the very soft weights of the
    # forward, so gradients and centroids equal those of the run without checkpointing.
    # reentrant: the region's forward runs without autograd (each palettized weight records
    # the centroids its call started from) and backward recomputes it with autograd, each call
    # again from those centroids: equal too (before, it ran from the moved centroids)
    from lightning_palettize.palettizers import dkm

    monkeypatch.setattr(dkm, "_ROUND_CHUNKS", {"cpu": chunks} if chunks > 1 else {})
    torch.manual_seed(8)
    layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(3)])
    x = torch.randn(8, 32)
    want, want_c = _ckpt_run(layers, x, ckpt=False, monitor=monitor)
    got, got_c = _ckpt_run(layers, x, ckpt=True, reentrant=reentrant, monitor=monitor)
    for w_step, g_step in zip(want, got):
        assert all(torch.equal(w, g) for w, g in zip(w_step, g_step))
    assert all(torch.equal(w, g) for w, g in zip(want_c, got_c))


def test_reentrant_region_and_a_later_call_share_one_soft_weight():
    # a layer called in a reentrant region (without autograd), then outside it with autograd at
    # the same weight version: the later call and the region's recomputation in backward get
    # the soft weight the region's forward used (one per weight version), nothing is left over
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    layer = model[0]
    DKMPalettizer(model, _CFG).prepare(inplace=True)
    seen = []
    layer.register_forward_pre_hook(lambda m, a: seen.append(m.__dict__["weight"].detach().clone()))
    x = torch.randn(8, 32, requires_grad=True)
    for _ in range(2):
        seen.clear()
        h = torch.tanh(layer(checkpoint(lambda h: torch.tanh(layer(h)), x, use_reentrant=True)))
        h.square().mean().backward()
        assert len(seen) == 3 and all(torch.equal(w, seen[0]) for w in seen[1:])
        with torch.no_grad():
            layer.weight -= 0.01 * layer.weight.grad
        layer.weight.grad = None
    assert not layer.weight_dkm._group._starts


def test_a_pass_without_autograd_keeps_the_next_step_batched(monkeypatch):
    # a no-grad pass in training mode (not a checkpoint region) records nothing: the next
    # training forward still computes every weight in one batched round
    from lightning_palettize.palettizers import dkm

    calls = []
    real = dkm.soft_kmeans_batch
    monkeypatch.setattr(
        dkm, "soft_kmeans_batch", lambda xs, *a, **k: calls.append(len(xs)) or real(xs, *a, **k)
    )
    torch.manual_seed(1)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)])
    DKMPalettizer(model, _CFG).prepare(inplace=True)
    x = torch.randn(8, 32)
    with torch.no_grad():
        model(x)
    calls.clear()
    model(x).square().sum().backward()
    assert calls == [4]
    assert not model[0].weight_dkm._group._starts


def test_a_replaced_member_is_not_kept_alive_by_its_recorded_start():
    import gc
    import weakref

    from torch.utils.checkpoint import checkpoint

    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    DKMPalettizer(model, _CFG).prepare(inplace=True)
    x = torch.randn(2, 32, requires_grad=True)
    checkpoint(model, x, use_reentrant=True)  # a region's calls recorded, never recomputed
    group = model[1].weight_dkm._group
    assert len(group._starts) == 2
    old = weakref.ref(model[0].weight)
    model[0] = nn.Linear(32, 32)  # the prepared layer replaced without detaching it
    gc.collect()  # (the old module, in reference cycles with its hooks, dies here)
    assert old() is None  # a start holds its weight weakly
    model(x).sum().backward()
    model[1].weight_dkm._group._round(model[1].weight_dkm, model[1], model[1].weight)
    assert len(group._starts) <= 1  # a round drops the members that died, and their starts


def test_reentrant_checkpoint_of_a_layer_called_twice():
    # without autograd a layer called again at one weight version gets the same soft weight
    # (recomputed from the same centroids: one soft weight per weight version, as served with
    # autograd); the recomputation replays both calls from those centroids, so the gradient is
    # the one of sum(layer(tanh(layer(x)))^2) with one soft weight S = soft_kmeans(W, c0)
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(3)
    layer = nn.Linear(32, 32)
    pal = DKMPalettizer(nn.Sequential(layer), _CFG)
    pal.prepare(inplace=True)
    fp = layer.weight_dkm
    c0 = fp.centroids.clone()
    x = torch.randn(8, 32, requires_grad=True)
    out = checkpoint(lambda h: layer(torch.tanh(layer(h))), x, use_reentrant=True)
    out.square().sum().backward()
    got_w, got_b, got_c = layer.weight.grad.clone(), layer.bias.grad.clone(), fp.centroids.clone()

    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    with torch.no_grad():
        fp.centroids.copy_(c0)
    soft = fp(w)
    h = torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, soft, b)), soft, b)
    h.square().sum().backward()
    # (two backward passes through the soft k-means summed, against one: rounding only)
    for got, want in ((got_w, w.grad), (got_b, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(got_c, fp.centroids) and not torch.equal(got_c, c0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_transformers_gradient_checkpointing_equals_plain_training(monkeypatch, reentrant):
    from test_dkm import tiny_llama

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(9)
    base = tiny_llama(hidden=32, intermediate=64, layers=2, vocab=64)
    ids = torch.randint(0, 64, (2, 12))

    def run(ckpt):
        model = copy.deepcopy(base)
        if ckpt:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model.config.use_cache = False
        pal = DKMPalettizer(model, {**_CFG, "module_type_configs": {"LlamaRMSNorm": None}})
        pal.prepare(inplace=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        grads = []
        for _ in range(2):
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
            opt.step()
            pal.step()
        return grads

    want, got = run(False), run(True)
    assert [len(g) for g in want] == [len(g) for g in got]
    for w_step, g_step in zip(want, got):
        assert all(torch.equal(w, g) for w, g in zip(w_step, g_step))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_finalizes_to_a_lut_in_its_dtype(dtype, tmp_path):
    # the LUT holds the values the weights hold, so the artifact stores it in the weight's
    # dtype and reaches the ideal size
    from lightning_palettize import load_palettized, save_palettized

    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(64, 256)).to(dtype)
    pal = DKMPalettizer(model, {"global_config": {"n_bits": 4, "weight_threshold": 0}})
    pal.prepare(inplace=True)
    model.eval()
    x = torch.randn(4, 64, dtype=dtype)
    with torch.no_grad():
        y = model(x)
    final = pal.finalize(inplace=True)
    lut = final[0].get_buffer("_COREML_/weight/lut")
    assert torch.equal(lut, lut.to(dtype).float())
    assert set(torch.unique(final[0].weight).float().tolist()) <= set(lut.view(-1).tolist())
    with torch.no_grad():
        assert torch.equal(y, final(x))
    path = tmp_path / "m.safetensors"
    summary = save_palettized(final, path)
    loaded = load_palettized(path, nn.Sequential(nn.Linear(64, 256)).to(dtype))
    assert torch.equal(loaded[0].weight, final[0].weight)
    weight = summary["weights"]["0.weight"]
    assert weight["bytes"] == weight["ideal_bytes"] == 256 * 64 // 2 + 16 * 2  # a half LUT


def test_pretrained_weights_loaded_after_prepare_start_the_centroids():
    # coremltools initializes at the first palettized forward; here prepare does (milestone 0),
    # so a plain state_dict loaded afterwards re-starts the centroids from the loaded weights,
    # and a strict load passes. A DKM state_dict, or one without the weight, keeps the state.
    from lightning_palettize.kmeans import kmeans

    torch.manual_seed(11)
    pretrained = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 64))
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 64))
    cfg = {"global_config": {"n_bits": 2, "weight_threshold": 0}}
    pal = DKMPalettizer(model, {**cfg, "module_name_configs": {"1": {"milestone": 2}}})
    pal.prepare(inplace=True)
    fresh = DKMPalettizer(pretrained, cfg).prepare()
    model.load_state_dict(pretrained.state_dict())  # strict
    fp0, fp1 = model[0].weight_dkm, model[1].weight_dkm
    assert torch.equal(fp0.centroids, fresh[0].weight_dkm.centroids)
    want = kmeans(fp0.layout.to_groups(pretrained[0].weight.detach()), 4).centroids
    assert torch.equal(fp0.centroids, want.float())
    assert not fp1.is_enabled and int(fp1.steps) == 0  # not started: starts at its milestone
    mid = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        fp0.centroids.add_(1.0)
    model.load_state_dict(mid)  # a DKM state_dict: its own centroids
    assert torch.equal(fp0.centroids, mid["0.weight_dkm.centroids"])
    before = fp0.centroids.clone()
    model.load_state_dict({"1.bias": torch.zeros(64)}, strict=False)  # no weight: state kept
    assert torch.equal(fp0.centroids, before)
    final = pal.finalize(inplace=True)
    assert all(len(m._load_state_dict_pre_hooks) == 0 for m in final.modules())
