"""GPU checks and the GPU DKM benchmark, as one script for a short lease on a CUDA machine.

1. CUDA correctness: the k-means engine, the soft k-means (both engines) and the palettizers
   give on CUDA what they give on CPU.
2. DKM on a 134M-parameter LLaMA-shaped causal LM (transformers LlamaConfig: hidden 768,
   12 layers, intermediate 2048, vocab 32000; random init; batch 8 x 512 tokens, bf16 autocast,
   AdamW; every nn.Linear, LM head included, at 4 bits): step time and peak CUDA memory vs plain
   training, in one process: a plain run before the first DKM run and after each one, each
   DKM run's ratios against the mean step (the larger peak) of the two plain runs around it.

3. With --variants: the same LLaMA DKM run per engine variant ("auto": the engines "auto"
   picks on CUDA; "grid": "auto" with the grid allowed on CUDA as on the CPU); with --micro
   the soft k-means of the LLaMA's Linear weights alone (forward + backward, no model); with
   --profile a torch.profiler table of one step per variant (top kernels, launches, syncs).

Run:  python bench/dkm_gpu.py [--out results.json] [--steps 12] [--variants auto,grid]
          [--micro] [--profile DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import shutil
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.trace_gaps import summary as _gaps  # noqa: E402
from lightning_palettize import DKMPalettizer, PostTrainingPalettizer  # noqa: E402
from lightning_palettize import soft_kmeans as sk  # noqa: E402
from lightning_palettize.kmeans import kmeans_1d, kmeans_vectors  # noqa: E402
from lightning_palettize.palettizers import dkm as dkm_mod  # noqa: E402
from lightning_palettize.soft_kmeans import soft_kmeans, soft_kmeans_batch  # noqa: E402

# engine variants: the soft_kmeans module settings each one runs under
VARIANTS = {
    # the engines "auto" picks on CUDA: the table from 2^18 elements per group, full code
    # tables, the fused Triton kernels (before commit "DKM round graphs off", "auto" replayed
    # the rounds from CUDA graphs and "eager" was this; the json files of that session say so)
    "auto": {},
    # "auto" with each round's forward replayed from a CUDA graph (DKM's _ROUND_GRAPHS; the
    # soft weights gathered after each replay through the bins the graph keeps)
    "graphs": {},
    "grid": {"_GRID_AUTO_DEVICES": frozenset({"cuda"})},  # "auto" as on the CPU: the grid
    "dense": {"_TABLE_MIN_GROUP": {"cpu": 1 << 16, "cuda": 1 << 62}},  # the element engine
    # "auto" with every table width in one segment (fewer launches, more padded per-code work)
    "onebucket": {"_SEGMENT_FILL": 0.0},
    # "auto" with the per-code passes in torch ops instead of the fused Triton kernels (the
    # code CUDA ran before them: ~45 launches per iteration and segment)
    "torchloop": {"_TRITON_DEVICES": frozenset()},
    # "auto" with each group's code table compacted to its distinct codes (the one host read
    # per round that full tables avoid; the LLaMA's per-tensor tables are full under "auto")
    "compact": {"_FULL_TABLES_FILL": 0.0},
    # "auto" with the fused kernels at their launch settings before bench/dkm_kernels.py's
    # sweep (8 warps, 4,096-entry tiles, sums reduced per tile)
    "oldkernels": {},
    # "auto" with each row's codes split over programs in chunks of 8,192 (a launch per pass;
    # the kernels are latency-bound at one program per row): not timed yet
    "split": {},
    # "auto" with the element passes (codes, histogram, soft weight gather, gradient sums and
    # gather) in the Triton element kernels: one launch per pass, no bins: not timed yet
    "elems": {"_TRITON_ELEM_DEVICES": frozenset({"cuda"})},
    # both of the above
    "splitelems": {"_TRITON_ELEM_DEVICES": frozenset({"cuda"})},
    # "elems" with the rounds' forward replayed from CUDA graphs (the graph now stops at the
    # per-code outputs and the soft weights are gathered after each replay in fresh memory;
    # graphs holding the soft weights cost +0.45 GiB peak on the H200)
    "graphselems": {"_TRITON_ELEM_DEVICES": frozenset({"cuda"})},
    # "auto" with each round split into 4 chunks of consecutive layers, each its own node
    # (DKM's _ROUND_CHUNKS): a chunk's backward runs when its layers' gradients are in, inside
    # the model's backward, instead of all of it on the step's tail: not timed yet
    "chunks": {},
    # "splitelems" in 4 and 8 chunks (a chunk's latency-bound kernels cost as much as the whole
    # round's unless each row's codes are split over programs)
    "chunked": {"_TRITON_ELEM_DEVICES": frozenset({"cuda"})},
    "chunked8": {"_TRITON_ELEM_DEVICES": frozenset({"cuda"})},
}
# settings of lightning_palettize._dkm_triton per variant (its launch reads them at each call)
KERNEL_SETTINGS = {
    "oldkernels": {"_LAUNCH": {"fwd": (8, 4096, False, 1), "bwd": (8, 4096, False, 1)}},
    "split": {"_SPLIT_CODES": 8192},
    "splitelems": {"_SPLIT_CODES": 8192},
    "chunked": {"_SPLIT_CODES": 8192},
    "chunked8": {"_SPLIT_CODES": 8192},
}
# settings of lightning_palettize.palettizers.dkm per variant
DKM_SETTINGS = {
    "graphs": {"_ROUND_GRAPHS": True},
    "graphselems": {"_ROUND_GRAPHS": True},
    "chunks": {"_ROUND_CHUNKS": {"cuda": 4}},
    "chunked": {"_ROUND_CHUNKS": {"cuda": 4}},
    "chunked8": {"_ROUND_CHUNKS": {"cuda": 8}},
}


@contextlib.contextmanager
def patched(target=sk, **settings):
    """Run with these settings of module ``target`` (the soft k-means by default)."""
    saved = {k: getattr(target, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(target, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(target, k, v)


@contextlib.contextmanager
def variant(name: str):
    """Run the soft k-means (and its kernels) under the settings of engine variant ``name``."""
    kernels = sk._triton() if name in KERNEL_SETTINGS else None
    with (
        patched(**VARIANTS[name]),
        patched(kernels, **(KERNEL_SETTINGS[name] if kernels else {})),
        patched(dkm_mod, **DKM_SETTINGS.get(name, {})),
    ):
        yield


@contextlib.contextmanager
def launches():
    """Counts the calls of the Triton kernels' entry points (fwd_loop, bwd_loop, elems) and
    records the warnings raised meanwhile: which code a variant really ran (a kernel that
    fails to build warns once and switches the kernels off for the rest of the process)."""
    kernels = sk._triton()
    counts: dict = {"fwd_loop": 0, "bwd_loop": 0, "elems": 0}
    names = list(counts) if kernels else []

    def counted(name, fn):
        def call(*a, **k):
            counts[name] += 1
            return fn(*a, **k)

        return call

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with patched(kernels, **{n: counted(n, getattr(kernels, n)) for n in names}):
            yield counts
    counts["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:300] for w in caught})
    counts["triton_on"] = sk._triton() is not None


DEV = "cuda"  # the LLaMA and micro sections' device (a CPU dry run of this script sets "cpu")
TINY = False  # a small LLaMA config, for that dry run


def check(name: str, ok: bool, detail: str = "") -> dict:
    print(f"[{'PASS' if ok else 'FAIL'}] {name} {detail}", flush=True)
    return {"check": name, "ok": bool(ok), "detail": detail}


def correctness() -> list[dict]:
    out = []
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50000, generator=g) * 0.02
    cpu, gpu = kmeans_1d(x, 16), kmeans_1d(x.to(dev), 16)
    out.append(
        check(
            "kmeans_1d cuda == cpu",
            torch.equal(cpu.labels, gpu.labels.cpu())
            and torch.allclose(cpu.centroids, gpu.centroids.cpu()),
        )
    )
    v = kmeans_vectors(torch.randn(2, 4000, 2, generator=g).to(dev), 8)
    out.append(check("kmeans_vectors on cuda", bool(torch.isfinite(v.centroids).all())))
    for method in ("table", "dense", "grid"):
        w = (torch.randn(2, 30000, 1, generator=g) * 0.05).half().float()
        c0 = kmeans_1d(w[..., 0], 16).centroids.unsqueeze(-1)
        res = []
        for d in ("cpu", "cuda"):
            wd = w.to(d).requires_grad_(True)
            y, _ = soft_kmeans(wd, c0.to(d), method=method, epsilon=0.0)
            (gr,) = torch.autograd.grad(
                (y * torch.linspace(-1, 1, y.numel()).view_as(y).to(d)).sum(), wd
            )
            res.append((y.detach().cpu(), gr.cpu()))
        err_y = (res[0][0] - res[1][0]).abs().max().item()
        err_g = ((res[0][1] - res[1][1]).norm() / res[0][1].norm()).item()
        out.append(
            check(
                f"soft_kmeans[{method}] cuda == cpu",
                err_y < 1e-5 and err_g < 1e-4,
                f"max|dy|={err_y:.2e} rel|dg|={err_g:.2e}",
            )
        )
    out.append(triton_check())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64))
    a = PostTrainingPalettizer(model, {"global_config": {"n_bits": 3}}).compress(progress=False)
    b = PostTrainingPalettizer(model.to(dev), {"global_config": {"n_bits": 3}}).compress(
        progress=False
    )
    cfg = {"global_config": {"n_bits": 3, "weight_threshold": 0}}
    out.append(
        check("PTP cuda == cpu", all(torch.equal(a[i].weight, b[i].weight.cpu()) for i in (0, 2)))
    )
    model = model.cpu()
    xb = torch.randn(32, 256)
    results = []
    for d in ("cpu", "cuda"):
        m = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64))
        m.load_state_dict(model.state_dict())
        m = m.to(d)
        pal = DKMPalettizer(m, cfg)
        prepared = pal.prepare(inplace=True)
        opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
        # the same engines on both devices ("auto" takes the grid on the CPU only)
        with patched(_GRID_AUTO_MIN_GROUP=1 << 62):
            for _ in range(3):
                opt.zero_grad()
                prepared(xb.to(d)).square().mean().backward()
                opt.step()
                pal.step()
        results.append(pal.finalize()[0].weight.detach().cpu())
    diff = (results[0] - results[1]).abs().max().item()
    out.append(check("DKM 3 steps + finalize cuda ~= cpu", diff < 1e-4, f"max diff {diff:.2e}"))
    return out


def triton_check() -> dict:
    """The fused Triton kernels on CUDA against the torch code they replace, on tensors of
    several table widths (several segments) with early stopping, and that they ran."""
    mod = sk._triton()
    if mod is None:
        return check("soft_kmeans triton kernels == torch code on cuda", False, "no triton")
    calls = []
    fwd = mod.fwd_loop

    def counted(*a, **k):
        calls.append(1)
        return fwd(*a, **k)

    g = torch.Generator().manual_seed(5)
    sizes = (3000, 700, 50) if TINY else (300000, 70000, 5000)
    ws = [(torch.randn(1, n, 1, generator=g) * 0.02).half().float() for n in sizes]
    cs = [kmeans_1d(w[..., 0], 16).centroids.unsqueeze(-1) for w in ws]
    res = []
    for name in ("auto", "torchloop"):
        with variant(name), patched(_TABLE_MIN_GROUP={DEV: 1}):
            mod.fwd_loop = counted if name == "auto" else fwd
            try:
                leaves = [w.to(DEV).requires_grad_() for w in ws]
                outs = soft_kmeans_batch(leaves, [c.to(DEV) for c in cs], max_iter=6, epsilon=1e-9)
                loss = sum(
                    (o * torch.linspace(-1, 1, o.numel(), device=DEV).view_as(o)).sum()
                    for o, _ in outs
                )
                grads = torch.autograd.grad(loss, leaves)
            finally:
                mod.fwd_loop = fwd
            res.append([(o.detach().cpu(), c.cpu(), gr.cpu()) for (o, c), gr in zip(outs, grads)])
    err_y = max((a[0] - b[0]).abs().max().item() for a, b in zip(*res))
    err_c = max((a[1] - b[1]).abs().max().item() for a, b in zip(*res))
    err_g = max(((a[2] - b[2]).norm() / b[2].norm()).item() for a, b in zip(*res))
    return check(
        "soft_kmeans triton kernels == torch code on cuda",
        bool(calls) and err_y < 1e-5 and err_c < 1e-5 and err_g < 1e-4,
        f"launches={len(calls)} max|dy|={err_y:.2e} max|dc|={err_c:.2e} rel|dg|={err_g:.2e}",
    )


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64 if TINY else 768,
        num_hidden_layers=2 if TINY else 12,
        intermediate_size=128 if TINY else 2048,
        vocab_size=1000 if TINY else 32000,
        num_attention_heads=4 if TINY else 12,
        num_key_value_heads=4 if TINY else 12,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def _profile_table(prof, rows: int = 25) -> tuple[str, dict]:
    """The profiler's top ops by device time and by host time, and launch / sync counts."""
    events = prof.key_averages()
    table = ""
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = events.table(sort_by=key, row_limit=rows)
            break
        except Exception:  # the key's name moved between torch versions
            continue
    table += "\n\nby host time:\n" + events.table(sort_by="self_cpu_time_total", row_limit=rows)
    counts = {"launches": 0, "syncs": 0, "memcpy": 0}
    for e in events:
        name = e.key
        if name.startswith("cudaLaunchKernel") or name.startswith("cuLaunchKernel"):
            counts["launches"] += e.count
        elif "Synchronize" in name:
            counts["syncs"] += e.count
        elif name.startswith("cudaMemcpy"):
            counts["memcpy"] += e.count
    return table, counts


def _cuda_timed(fn):
    """(seconds, result) of fn(), the device's queue drained before and after."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def _profiled(step, out_dir: Path | None, name: str) -> dict:
    if out_dir is None:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    if name != "plain" and not name.startswith("micro"):
        # where the host's time goes in Python (the GPU step is host-bound when it is)
        torch.cuda.synchronize()
        py = cProfile.Profile()
        py.enable()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        py.disable()
        text = io.StringIO()
        stats = pstats.Stats(py, stream=text)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(60)
        (out_dir / f"cprof_{name}.txt").write_text(text.getvalue())

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table, counts = _profile_table(prof)
    (out_dir / f"prof_{name}.txt").write_text(table)
    # the step's timeline (host ops, launches, kernels): where the GPU waits for the host and
    # what runs after the host is done (bench/trace_gaps.py reads it)
    trace = out_dir / f"trace_{name}.json"
    try:
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        counts.update(_gaps(f"{trace}.gz"))
    except Exception as err:  # (a trace is a diagnostic: never fail the run over it)
        print(f"trace {name}: {type(err).__name__}: {err}", flush=True)
    print(f"--- profile {name}: {counts}\n{table}", flush=True)
    return counts


def llama(steps: int, variants: list[str], prof_dir: Path | None, save=lambda out: None) -> dict:
    from transformers import LlamaForCausalLM

    cfg = _llama_config()
    dev = torch.device(DEV)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    state = {k: v.clone() for k, v in base.state_dict().items()}
    tokens = torch.randint(
        0, cfg.vocab_size, (2, 64) if TINY else (8, 512), generator=torch.Generator().manual_seed(1)
    ).to(dev)

    def run(name: str | None, profile: bool = True) -> dict:
        with variant(name or "auto"):
            return _run(name, prof_dir if profile else None)

    def trainer(name: str | None):
        """(model, palettizer or None, one training step, prepare seconds): plain training, or
        DKM under the current variant's settings."""
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(state)
        model = model.to(dev).train()
        torch.cuda.synchronize()
        pal = None
        t0 = time.perf_counter()
        if name is not None:
            pal = DKMPalettizer(
                model,
                {"module_type_configs": {"Linear": {"n_bits": 4, "weight_threshold": 0}}},
            )
            model = pal.prepare(inplace=True)
        torch.cuda.synchronize()
        prepare_s = time.perf_counter() - t0
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def one() -> Tensor:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(DEV, dtype=torch.bfloat16):
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            if pal is not None:
                pal.step()
            return loss

        return model, pal, one, prepare_s

    def pairs(name: str, n: int) -> dict:
        """Plain and DKM steps alternated in one process (a plain model and a DKM model side by
        side): each DKM step next to a plain one, so the machine's drift cancels."""
        with variant(name):
            _, _, plain_step, _ = trainer(None)
            _, _, dkm_step, _ = trainer(name)
            for _ in range(3):  # warm-up: compiles, captures
                _cuda_timed(plain_step)
                _cuda_timed(dkm_step)
            p_s, d_s = [], []
            for _ in range(n):
                p_s.append(_cuda_timed(plain_step)[0])
                d_s.append(_cuda_timed(dkm_step)[0])
        res = {
            "plain_step_s": statistics.median(p_s),
            "dkm_step_s": statistics.median(d_s),
            "step_ratio": statistics.median(d_s) / statistics.median(p_s),
            "pair_ratio_median": statistics.median([d / p for d, p in zip(d_s, p_s)]),
        }
        plain_step = dkm_step = None
        torch.cuda.empty_cache()
        return res

    def _run(name: str | None, prof_dir: Path | None) -> dict:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
        with launches() as calls:
            model, pal, one, prepare_s = trainer(name)
            times, losses = [], []
            for _ in range(steps):
                secs, loss = _cuda_timed(one)
                times.append(secs)
                losses.append(loss.item())
        peak = torch.cuda.max_memory_allocated() - base_mem
        # (a CUDA graph's pool stays reserved between steps; reported beside the allocations)
        peak_reserved = torch.cuda.max_memory_reserved() - base_mem
        res = {
            "prepare_s": prepare_s,
            "first_step_s": times[0],
            "steady_step_s": statistics.median(times[2:]),
            "peak_mem_GiB": peak / 2**30,
            "peak_reserved_GiB": peak_reserved / 2**30,
            "losses": losses,
            "kernel_calls": calls,  # over the run's steps
        }
        if pal is not None:
            n_pal = sum(1 for n, _ in model.named_modules() if n.endswith("_dkm"))
            res["palettized_weights"] = n_pal
        res["profile"] = _profiled(one, prof_dir, name or "plain")
        model = pal = one = None  # frees them (the step's closure holds the model, optimizer)
        torch.cuda.empty_cache()
        return res

    # plain runs bracket every DKM run: a shared GPU machine drifts over a run (an H200 gave
    # plain 86.9 ms first and 61.4 ms last), so each ratio is to the mean of the plain runs
    # just before and just after it
    plain = run(None)
    out = {"params": n_params, "plain": plain}
    before = plain
    for v in variants:
        try:
            ours = run(v)
        except Exception:  # one variant's failure keeps the others' figures
            out[f"dkm_{v}_error"] = traceback.format_exc()
            print(out[f"dkm_{v}_error"], flush=True)
            torch.cuda.empty_cache()
            continue
        after = out[f"plain_after_{v}"] = run(None, profile=False)
        ref_s = (before["steady_step_s"] + after["steady_step_s"]) / 2
        ref_mem = max(before["peak_mem_GiB"], after["peak_mem_GiB"])
        ref_res = max(before["peak_reserved_GiB"], after["peak_reserved_GiB"])
        out[f"dkm_{v}"] = ours
        out[f"plain_ref_{v}"] = {
            "steady_step_s": ref_s,
            "peak_mem_GiB": ref_mem,
            "peak_reserved_GiB": ref_res,
        }
        out[f"step_ratio_{v}"] = ours["steady_step_s"] / ref_s
        out[f"mem_ratio_{v}"] = ours["peak_mem_GiB"] / ref_mem
        out[f"reserved_ratio_{v}"] = ours["peak_reserved_GiB"] / ref_res
        print(
            f"{v}: step {ours['steady_step_s'] * 1e3:.1f} ms vs plain {ref_s * 1e3:.1f} ms "
            f"({before['steady_step_s'] * 1e3:.1f} before, {after['steady_step_s'] * 1e3:.1f} "
            f"after: {out[f'step_ratio_{v}']:.2f}x), peak {ours['peak_mem_GiB']:.2f} GiB "
            f"({out[f'mem_ratio_{v}']:.2f}x; reserved {ours['peak_reserved_GiB']:.2f} GiB, "
            f"{out[f'reserved_ratio_{v}']:.2f}x), prepare + first step "
            f"{ours['prepare_s'] + ours['first_step_s']:.2f} s",
            flush=True,
        )
        before = after
        # the step ratio again, plain and DKM steps alternated (see pairs): robust to the drift
        try:
            res = out[f"pairs_{v}"] = pairs(v, steps)
        except Exception:
            out[f"pairs_{v}_error"] = traceback.format_exc()
            print(out[f"pairs_{v}_error"], flush=True)
            torch.cuda.empty_cache()
        else:
            print(
                f"{v} alternated with plain ({steps} pairs): step {res['dkm_step_s'] * 1e3:.1f} "
                f"ms vs plain {res['plain_step_s'] * 1e3:.1f} ms: {res['step_ratio']:.2f}x "
                f"(median of the pairs' ratios {res['pair_ratio_median']:.2f}x)",
                flush=True,
            )
        save(out)  # (a lease's time limit keeps the variants done so far)
    return out


def micro(variants: list[str], prof_dir: Path | None, reps: int = 5) -> dict:
    """Forward + backward of the soft k-means of the LLaMA's Linear weights alone (4 bits, per
    tensor, centroids from k-means), per variant: the DKM work of one step without the model."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config())
    ws = [
        m.weight.detach().to(DEV).reshape(1, -1, 1)
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    del model
    cs = [kmeans_1d(w[..., 0], 16).centroids.unsqueeze(-1) for w in ws]
    out = {"tensors": len(ws), "weights": sum(w.numel() for w in ws)}
    for v in variants:
        leaves = [w.clone().requires_grad_() for w in ws]
        grads = [torch.randn_like(w) for w in ws]

        def one(leaves=leaves, grads=grads) -> None:
            res = soft_kmeans_batch(leaves, cs)
            torch.autograd.backward([o for o, _ in res], grads)

        with variant(v):
            for _ in range(2):
                one()
            times = [_cuda_timed(one)[0] for _ in range(reps)]
            profile = _profiled(one, prof_dir, f"micro_{v}")
        out[v] = {
            "ms": statistics.median(times) * 1e3,
            "profile": profile,
        }
        print(f"micro {v}: {out[v]['ms']:.1f} ms fwd+bwd over {out['tensors']} tensors", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/dkm_gpu.json")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--variants", default="auto", help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--micro", default="", help="comma list of variants for the micro section")
    p.add_argument("--profile", type=Path, default=None, help="folder for profiler tables")
    p.add_argument("--skip-checks", action="store_true")
    args = p.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    sections = [] if args.skip_checks else [("correctness", correctness)]
    micro_variants = [v for v in args.micro.split(",") if v]
    for v in variants + micro_variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; expected some of {sorted(VARIANTS)}")
    kernels = sk._triton()
    try:  # the host's CPU model and load too: the plain step is host-bound, so it sets the ratio
        from bench._harness import environment

        env = environment()
    except Exception as err:
        env = {"error": f"{type(err).__name__}: {err}"}
    out: dict = {
        "env": env,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": kernels.triton.__version__ if kernels else None,
        "variants": variants,
    }
    if micro_variants:
        sections.append(("micro", lambda: micro(micro_variants, args.profile)))

    def save(llama_part: dict | None = None) -> None:
        """Write the results so far (with the LLaMA section's part while it runs)."""
        done = out if llama_part is None else {**out, "llama": llama_part}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(done, indent=1))

    sections.append(("llama", lambda: llama(args.steps, variants, args.profile, save)))
    for name, fn in sections:
        try:
            out[name] = fn()
        except Exception:
            out[f"{name}_error"] = traceback.format_exc()
            print(out[f"{name}_error"], flush=True)
        save()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
