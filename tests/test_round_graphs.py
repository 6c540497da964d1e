"""RoundGraphs: a batch's soft k-means forward captured in a graph and replayed.

On CUDA the real torch.cuda.CUDAGraph (the CUDA-only tests at the end). Without a GPU (CI) the
device layout on the CPU, full code tables, and an emulated graph whose replay reruns the
captured function and writes its results into the captured tensors, as a replay writes into
the graph's memory: a result handed out while something still reads the previous one would
change under it, and the comparisons with the eager runs would see it.
"""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
from test_soft_kmeans import make_data
from torch import nn

from lightning_palettize import DKMPalettizer
from lightning_palettize import soft_kmeans as sk
from lightning_palettize.palettizers import dkm as dkm_mod
from lightning_palettize.soft_kmeans import RoundGraphs, soft_kmeans_batch


def _tensors(result) -> list:
    outs, new_c, fields, saved = result
    rows = [t for t in fields.seg_trows if t is not None]
    # (the per-code outputs the soft weights are gathered from after a replay)
    kept = [] if fields.gather is None else [fields.gather[1]]
    outs = [t for t in outs if t is not None]
    return [*outs, new_c, *[t for t in saved if t is not None], *rows, *kept]


class EmulatedGraph:
    """capture: runs the function (a CUDA capture records it); replay: runs it again and copies
    every result into the captured tensors (the graph's memory)."""

    made: list[EmulatedGraph] = []

    def __init__(self) -> None:
        self.fn = None
        self.captured = None
        self.replays = 0
        EmulatedGraph.made.append(self)

    def capture(self, fn):
        self.fn = fn
        self.captured = fn()
        return self.captured

    def replay(self) -> None:
        self.replays += 1
        fresh = self.fn()
        for old, new in zip(_tensors(self.captured), _tensors(fresh)):
            if old.data_ptr() != new.data_ptr():  # (cached tensors are the same memory)
                old.copy_(new)


@pytest.fixture
def graph_layout(monkeypatch):
    """The device layout a GPU round takes (full tables, per-code passes in torch ops, table
    engine from 1,024 elements per group) on the CPU, with emulated graphs."""
    monkeypatch.setattr(sk, "_sync_free", lambda device: True)
    monkeypatch.setattr(sk, "_host_layout", lambda device: False)
    monkeypatch.setattr(sk, "_TRITON_DEVICES", frozenset())
    monkeypatch.setattr(sk, "_full_tables", lambda *args: True)
    monkeypatch.setattr(sk, "_TABLE_MIN_GROUP", {"cpu": 1024})
    monkeypatch.setattr(sk, "_GRAPH_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(sk, "_new_graph", lambda device: EmulatedGraph())
    EmulatedGraph.made = []
    return monkeypatch


def _batch():
    xs, cs = [], []
    for i, (g, n) in enumerate([(1, 3000), (2, 1500), (1, 2048)]):
        x, c0 = make_data(g, n, 1, seed=30 + i, zeros=0.05)
        xs.append(x.view(g * n).clone())
        cs.append(c0)
    return xs, cs


def _call(xs, cs, graphs, weights=None):
    """One batch call with gradients: (outputs, centroids, gradients), detached copies."""
    leaves = [x.detach().clone().requires_grad_() for x in xs] if weights is None else weights
    res = soft_kmeans_batch(leaves, cs, groups=[c.shape[0] for c in cs], graphs=graphs)
    loss = sum([(o * (i + 1)).sum() for i, (o, _) in enumerate(res)])
    grads = torch.autograd.grad(loss, leaves)
    return [(o.detach().clone(), c.clone(), g) for (o, c), g in zip(res, grads)]


def _equal(a, b) -> None:
    for (oa, ca, ga), (ob, cb, gb) in zip(a, b, strict=True):
        assert torch.equal(oa, ob)
        assert torch.equal(ca, cb)
        assert torch.equal(ga, gb)


@pytest.mark.parametrize("elements", ["torch", "triton"])
def test_batch_calls_capture_once_then_replay_with_the_eager_results(elements, graph_layout):
    if elements == "triton":  # the element passes in Triton's kernels (interpreter on the CPU)
        if os.environ.get("TRITON_INTERPRET") != "1" or sk._triton() is None:
            pytest.skip("no Triton interpreter here")
        graph_layout.setattr(sk, "_TRITON_ELEM_DEVICES", frozenset({"cpu"}))
        graph_layout.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    ran = []
    if elements == "triton":
        elems = sk._triton().elems
        graph_layout.setattr(
            sk._triton(), "elems", lambda op, *a, **k: ran.append(op) or elems(op, *a, **k)
        )
    xs, cs = _batch()
    eager = _call(xs, cs, None)
    leaves = [x.detach().clone().requires_grad_() for x in xs]  # the same storage every call
    graphs = RoundGraphs()
    for i in range(4):
        got = _call(xs, cs, graphs, leaves)
        _equal(got, eager)
        assert graphs.captures == (i >= 1)  # eager once, captured at the second call
        assert graphs.replays == max(0, i)
    assert len(EmulatedGraph.made) == 1
    # the graph holds no soft weight: they are gathered after each replay, in fresh memory
    (entry,) = graphs._entries.values()
    assert entry.outs == [None] * len(xs) and entry.fields.gather is not None
    # the element passes: 4 a call (histogram, gather; gradient sums, gradient); the
    # capturing call's histogram ran twice (captured, then replayed), each replay reruns it
    assert len(ran) == (0 if elements == "torch" else 2 * 4 + (2 + 1 + 2) + 2 * (1 + 1 + 2))


def test_a_replay_waits_while_the_previous_results_are_alive(graph_layout):
    xs, cs = _batch()
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    graphs = RoundGraphs()
    _call(xs, cs, graphs, leaves)
    _call(xs, cs, graphs, leaves)  # captured
    assert graphs.replays == 1
    with torch.no_grad():
        held = soft_kmeans_batch(leaves, cs, groups=[1, 2, 1], graphs=graphs)  # replay 2
        assert graphs.replays == 2
        before = [o.clone() for o, _ in held]
        # another call while `held` is alive: eager, `held` unchanged, the same values
        other = soft_kmeans_batch([x * 1.5 for x in leaves], cs, groups=[1, 2, 1], graphs=graphs)
        again = soft_kmeans_batch(leaves, cs, groups=[1, 2, 1], graphs=graphs)
    assert graphs.replays == 2
    for (o, _), b, (a, _) in zip(held, before, again):
        assert torch.equal(o, b)
        assert torch.equal(a, b)
    assert not torch.equal(other[0][0], before[0])
    del held, again, o, a
    with torch.no_grad():
        soft_kmeans_batch(leaves, cs, groups=[1, 2, 1], graphs=graphs)
    assert graphs.replays == 3  # everything it returned freed: replays again


def test_a_replay_waits_for_the_previous_backward(graph_layout):
    xs, cs = _batch()
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    graphs = RoundGraphs()
    want = _call(xs, cs, None)
    _call(xs, cs, graphs, leaves)
    _call(xs, cs, graphs, leaves)
    # forward (a replay), outputs dropped, backward not run yet: the next call is eager
    res = soft_kmeans_batch(leaves, cs, groups=[1, 2, 1], graphs=graphs)
    loss = sum([(o * (i + 1)).sum() for i, (o, _) in enumerate(res)])
    del res
    assert graphs.replays == 2
    _equal(_call(xs, cs, graphs, leaves), want)
    assert graphs.replays == 2
    grads = torch.autograd.grad(loss, leaves)  # the replay's state was kept intact
    for g, (_, _, gw) in zip(grads, want):
        assert torch.equal(g, gw)
    _call(xs, cs, graphs, leaves)
    assert graphs.replays == 3


def test_a_second_backward_after_a_later_replay_raises(graph_layout):
    xs, cs = _batch()
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    graphs = RoundGraphs()
    _call(xs, cs, graphs, leaves)
    _call(xs, cs, graphs, leaves)
    res = soft_kmeans_batch(leaves, cs, groups=[1, 2, 1], graphs=graphs)
    loss = sum([o.sum() for o, _ in res])
    del res
    torch.autograd.grad(loss, leaves, retain_graph=True)
    _call(xs, cs, graphs, leaves)  # a replay: the kept graph's state is overwritten
    assert graphs.replays == 3
    with pytest.raises(RuntimeError, match="replayed since.*retain_graph=True"):
        torch.autograd.grad(loss, leaves)


def test_a_failed_capture_warns_and_the_batch_stays_eager(graph_layout):
    xs, cs = _batch()
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    want = _call(xs, cs, None)

    class Failing(EmulatedGraph):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    graph_layout.setattr(sk, "_new_graph", lambda device: Failing())
    graphs = RoundGraphs()
    _equal(_call(xs, cs, graphs, leaves), want)
    with pytest.warns(RuntimeWarning, match="capturing a soft k-means round.*not permitted"):
        _equal(_call(xs, cs, graphs, leaves), want)
    _equal(_call(xs, cs, graphs, leaves), want)  # no second try, no second warning
    assert (graphs.captures, graphs.replays, len(EmulatedGraph.made)) == (0, 0, 1)


def test_graphs_are_kept_per_batch_up_to_max_graphs(graph_layout):
    xs, cs = _batch()
    a = [x.detach().clone().requires_grad_() for x in xs]
    b = [x.detach().clone().requires_grad_() for x in xs]  # other storage: another graph
    graphs = RoundGraphs(max_graphs=1)
    for leaves in (a, a, b, b, a):
        _call(xs, cs, graphs, leaves)
    # a captured, b captured (a dropped), a eager again: seen once since it was dropped
    assert (graphs.captures, graphs.replays) == (2, 2)
    assert len(graphs._entries) == 1
    graphs.clear()
    assert not graphs._entries


def test_rounds_a_graph_cannot_hold_run_eagerly(graph_layout):
    xs, cs = _batch()
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    graph_layout.setattr(sk, "_full_tables", lambda *args: False)  # compacted: a host read
    graphs = RoundGraphs()
    for _ in range(3):
        _call(xs, cs, graphs, leaves)
    assert graphs.captures == graphs.replays == 0
    graph_layout.setattr(sk, "_full_tables", lambda *args: True)
    graph_layout.setattr(sk, "_GRAPH_DEVICES", frozenset())
    for _ in range(3):
        _call(xs, cs, graphs, leaves)
    assert graphs.captures == graphs.replays == 0


def test_round_graphs_arguments_and_copies():
    with pytest.raises(ValueError, match="max_graphs must be an int >= 1, got 0"):
        RoundGraphs(max_graphs=0)
    with pytest.raises(TypeError, match="graphs must be a RoundGraphs or None, got str"):
        soft_kmeans_batch([torch.ones(4)], [torch.zeros(1, 2, 1)], groups=[1], graphs="yes")
    g = RoundGraphs(max_graphs=3)
    g.replays = 5
    for twin in (copy.deepcopy(g), pickle.loads(pickle.dumps(g))):
        assert twin.max_graphs == 3 and twin.replays == 0 and not twin._entries


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 32)
    )


def _train(model: nn.Module, steps: int, device: torch.device):
    """DKM (4 bits per tensor, 2 bits per 16-row group) for ``steps`` AdamW steps: losses,
    weights, centroids, the model."""
    cfg = {
        "module_name_configs": {
            "0": {"n_bits": 4, "weight_threshold": 0},
            "2": {
                "n_bits": 2,
                "granularity": "per_grouped_channel",
                "group_size": 16,
                "weight_threshold": 0,
            },  # fmt: skip
            "4": {"n_bits": 4, "weight_threshold": 0},
        }
    }
    pal = DKMPalettizer(model.to(device), cfg)
    model = pal.prepare(inplace=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 64, generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        pal.step()
        losses.append(loss.item())
    cents = [b.clone() for n, b in model.named_buffers() if n.endswith("centroids")]
    return losses, [p.detach().clone() for p in model.parameters()], cents, model


def _graphs_of(model: nn.Module) -> RoundGraphs:
    groups = {id(m._group): m._group for m in model.modules() if hasattr(m, "_group")}
    assert len(groups) == 1
    return next(iter(groups.values()))._graphs


def test_dkm_training_with_replayed_rounds_equals_eager(graph_layout):
    assert dkm_mod._ROUND_GRAPHS is False  # (off by default: see its comment)
    want = _train(_mlp(), 5, torch.device("cpu"))
    assert EmulatedGraph.made == []
    graph_layout.setattr(dkm_mod, "_ROUND_GRAPHS", True)
    got = _train(_mlp(), 5, torch.device("cpu"))
    for a, b in zip(got[:3], want[:3]):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))
    graphs = _graphs_of(got[3])
    # a round per step, of two batches (16 and 4 centroids): eager at step 1, captured at
    # step 2 (and replayed: its results), replayed from step 3 on
    assert (graphs.captures, graphs.replays) == (2, 8)
    assert len(EmulatedGraph.made) == 2


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_cuda_graph_rounds_equal_eager_rounds(monkeypatch):
    # the real capture: the LLaMA-like batch of per-tensor 4-bit weights whose tables are full
    dev = torch.device("cuda")
    monkeypatch.setattr(sk, "_FULL_TABLES_FILL", 1e9)  # (small weights: full tables anyway)
    monkeypatch.setattr(sk, "_TABLE_MIN_GROUP", {"cpu": 1 << 16, "cuda": 1024})
    want = _train(_mlp(), 6, dev)
    monkeypatch.setattr(dkm_mod, "_ROUND_GRAPHS", True)
    got = _train(_mlp(), 6, dev)
    # (not bitwise: CUDA's float index_add_ in the backward sums in no fixed order, so two
    # eager runs differ in the last bits too; 7e-9 on the H200)
    for a, b in zip(got[:3], want[:3]):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(torch.as_tensor(x), torch.as_tensor(y), rtol=1e-5, atol=1e-7)
    graphs = _graphs_of(got[3])
    assert (graphs.captures, graphs.replays) == (2, 10)  # (two batches, as on the CPU)


@needs_cuda
@pytest.mark.parametrize("elements", ["torch", "triton"])
def test_cuda_graph_batch_calls_equal_eager(elements, monkeypatch):
    if elements == "triton":  # the Triton element kernels, in the capture and after it
        monkeypatch.setattr(sk, "_TRITON_ELEM_DEVICES", frozenset({"cuda"}))
    monkeypatch.setattr(sk, "_FULL_TABLES_FILL", 1e9)
    monkeypatch.setattr(sk, "_TABLE_MIN_GROUP", {"cpu": 1 << 16, "cuda": 1024})
    xs, cs = _batch()
    xs = [x.cuda() for x in xs]
    cs = [c.cuda() for c in cs]
    eager = _call(xs, cs, None)
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    graphs = RoundGraphs()
    for _ in range(4):
        for (o, c, g), (ow, cw, gw) in zip(_call(xs, cs, graphs, leaves), eager):
            torch.testing.assert_close(o, ow, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(c, cw, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(g, gw, rtol=1e-5, atol=1e-7)
    assert (graphs.captures, graphs.replays) == (1, 3)  # eager, captured (+ its replay), 2 more
