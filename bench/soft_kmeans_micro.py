"""Micro-benchmark: one DKM fwd+bwd of a 1M-element weight at K=16, per engine.

Times ``soft_kmeans`` with the table, grid and dense engines against a naive dense reference
(full N x K tensors kept by plain autograd, what coremltools does minus its cdist round trip),
and a plain Linear(1024, 1024) training step on the same weight for scale.

    python bench/soft_kmeans_micro.py                  # 1 thread, then torch's default
    python bench/soft_kmeans_micro.py --threads 1 --device cuda
    python bench/soft_kmeans_micro.py --batch          # soft_kmeans_batch vs one call each
    python bench/soft_kmeans_micro.py --ops            # launches per DKM training step

``--ops`` counts, per training step of a 12 x Linear(768, 768) model (AdamW), the aten ops that
launch a kernel (leaf ops, views and allocations excluded) and the ops that read device memory
back to the host (a sync on a GPU), for plain training and for DKM at 4 bits. It runs the
engine's CPU code path and, on the CPU as well, its GPU code path (one stacked segment, no
early-stopping reads, no scratch buffers): the launch count is what makes a GPU step
launch-bound. (On the CPU, ops writing to an ``out=`` of another dtype add a copy that CUDA
does inside the kernel, so the GPU-path count is slightly high.)
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from lightning_palettize import soft_kmeans as sk
from lightning_palettize.soft_kmeans import soft_kmeans, soft_kmeans_batch


def naive_dkm(x, c, tau=1e-4, max_iter=3, epsilon=1e-4):
    """coremltools' per-partition loop with (x - c)^2 instead of cdist, full N x K tensors."""
    last = None
    for _ in range(max_iter):
        dist = ((x[:, :, None, :] - c[:, None, :, :]) ** 2).sum(-1)
        att = torch.softmax(-dist / tau, -1)
        c = (att.transpose(1, 2) @ x) / att.sum(1).unsqueeze(-1)
        inertia = dist.min(-1).values.sum()
        if last is not None and abs(float(last - inertia)) <= epsilon:
            break
        last = inertia
    return att @ c, c.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(step, device, reps):
    step()  # warm-up (allocator, first-call costs)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench(n, k, device, reps, naive):
    gen = torch.Generator().manual_seed(0)
    w0 = 0.02 * torch.randn(1, n, 1, generator=gen)
    c0 = torch.quantile(w0.view(-1)[:: max(1, n // 100_000)], torch.linspace(0.02, 0.98, k))
    w0, c0 = w0.to(device), c0.view(1, k, 1).to(device)
    up = torch.randn(1, n, 1, generator=gen).to(device)
    weight = w0.clone().requires_grad_()

    def dkm(fn, **kw):
        def step():
            weight.grad = None
            out, _ = fn(weight, c0, **kw)
            (out * up).sum().backward()

        return step

    side = int(round(n**0.5))
    lin = torch.nn.Linear(side, side).to(device)
    batch = torch.randn(64, side, device=device)

    def plain():
        lin.zero_grad(set_to_none=True)
        lin(batch).square().mean().backward()

    rows = {"plain Linear step": plain}
    rows["table"] = dkm(soft_kmeans, method="table")
    rows["dense"] = dkm(soft_kmeans, method="dense")
    rows["grid"] = dkm(soft_kmeans, method="grid")
    if naive:
        rows["naive reference"] = dkm(naive_dkm)
    results = {}
    for name, step in rows.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        try:
            ms = time_step(step, device, reps if name != "naive reference" else max(1, reps // 3))
        except torch.OutOfMemoryError:
            weight.grad = None
            print(f"{name}: out of memory")
            continue
        peak = None
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        results[name] = (ms, peak)
    return results


def _step(weight, c0, up, method):
    def step():
        weight.grad = None
        out, _ = soft_kmeans(weight, c0, method=method)
        (out * up).sum().backward()

    return step


def sweep(k, device, reps):
    """Table vs grid vs dense fwd+bwd over group shapes: where "auto" should switch engines."""
    shapes = [(1, 4096), (1, 16384), (1, 65536), (1, 262144), (4, 65536), (16, 16384)]
    shapes += [(64, 16384), (256, 4096), (1024, 1024)]
    print(f"{'G':>6} {'N/group':>8} {'table ms':>9} {'grid ms':>9} {'dense ms':>9}")
    for g, n in shapes:
        gen = torch.Generator().manual_seed(0)
        w0 = 0.02 * torch.randn(g, n, 1, generator=gen)
        c0 = torch.quantile(w0[0, :, 0], torch.linspace(0.02, 0.98, k)).view(1, k, 1)
        w0, c0 = w0.to(device), c0.repeat(g, 1, 1).to(device)
        up = torch.randn(g, n, 1, generator=gen).to(device)
        weight = w0.clone().requires_grad_()
        methods = ("table", "grid", "dense")
        ms = [time_step(_step(weight, c0, up, m), device, reps) for m in methods]
        print(f"{g:>6} {n:>8} {ms[0]:9.2f} {ms[1]:9.2f} {ms[2]:9.2f}")


def batch_bench(k, device, reps):
    """soft_kmeans_batch of the 512-1024-1024-10 MLP's weights vs one soft_kmeans each."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(1024, 512), (1024, 1024), (10, 1024)]
    ws = [(0.02 * torch.randn(*s, generator=gen)).reshape(1, -1, 1).to(device) for s in shapes]
    cs = [
        torch.quantile(w.view(-1)[::7].cpu(), torch.linspace(0.02, 0.98, k)).view(1, k, 1)
        for w in ws
    ]
    cs = [c.to(device) for c in cs]
    ups = [torch.randn_like(w) for w in ws]
    leaves = [w.clone().requires_grad_() for w in ws]

    def one_by_one():
        for x, c, up in zip(leaves, cs, ups):
            x.grad = None
            out, _ = soft_kmeans(x, c)
            (out * up).sum().backward()

    def batched():
        for x in leaves:
            x.grad = None
        res = soft_kmeans_batch(leaves, cs)
        torch.autograd.backward([o for o, _ in res], ups)

    for name, fn in [("one call per weight", one_by_one), ("soft_kmeans_batch", batched)]:
        print(f"{name:>22}: {time_step(fn, device, reps):8.2f} ms (fwd+bwd, 3 weights)")


# ops that only make views, metadata or empty allocations: no kernel
_NO_KERNEL = {
    "aten::" + name
    for name in [
        "view",
        "reshape",
        "_reshape_alias",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "transpose",
        "t",
        "permute",
        "expand",
        "as_strided",
        "alias",
        "detach",
        "_unsafe_view",
        "view_as",
        "unbind",
        "split",
        "narrow",
        "empty",
        "empty_like",
        "empty_strided",
        "lift_fresh",
        "resolve_conj",
        "resolve_neg",
        "result_type",
        "is_nonzero",
        "contiguous",
        "to",
        "_to_copy",
        "expand_as",
        "flatten",
        "set_",
        "is_same_size",
        "broadcast_tensors",
    ]
}
_HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::bincount")


def count_ops(kind, width=768, depth=12):
    """(kernel-launching ops, host reads) of one training step; kind: plain, dkm."""
    from torch import nn
    from torch.profiler import profile

    from lightning_palettize import DKMPalettizer

    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    x, y = torch.randn(64, width), torch.randint(0, width, (64,))
    pal = None
    if kind == "dkm":
        pal = DKMPalettizer(model, {"global_config": {"n_bits": 4, "weight_threshold": 0}})
        model = pal.prepare(inplace=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if pal is not None:
            pal.step()

    for _ in range(3):
        step()
    with profile() as prof:
        step()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    parents = {id(e.cpu_parent) for e in events if e.cpu_parent is not None}
    leaves = [e for e in events if id(e) not in parents and e.name not in _NO_KERNEL]
    reads = sum(e.name in _HOST_READS for e in events)
    return len(leaves), reads, collections.Counter(e.name for e in leaves)


def ops_report():
    rows = [("plain training", "plain", None), ("DKM, CPU code path", "dkm", None)]
    rows.append(("DKM, GPU code path", "dkm", "device"))
    print("per training step of 12 x Linear(768, 768), batch 64, AdamW, DKM 4 bits:")
    for label, kind, path in rows:
        saved = sk._sync_free, sk._host_layout
        if path == "device":
            sk._sync_free, sk._host_layout = (lambda d: True), (lambda d: False)
        try:
            n, reads, _ = count_ops(kind)
        finally:
            sk._sync_free, sk._host_layout = saved
        print(f"  {label:>20}: {n:6d} kernel-launching ops, {reads:4d} host reads")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1 << 20, help="weight elements (1 group)")
    parser.add_argument("--k", type=int, default=16, help="centroids")
    parser.add_argument("--threads", default="1,0", help="comma list; 0 = torch's default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--no-naive", action="store_true", help="skip the naive reference")
    parser.add_argument("--sweep", action="store_true", help="engines over group shapes")
    parser.add_argument("--batch", action="store_true", help="soft_kmeans_batch vs one by one")
    parser.add_argument("--ops", action="store_true", help="kernel launches per DKM step")
    args = parser.parse_args()
    device = torch.device(args.device)
    default_threads = torch.get_num_threads()
    if args.ops:
        torch.set_num_threads(1)
        ops_report()
        return
    if args.batch:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads or default_threads)
            print(f"-- {torch.get_num_threads()} thread(s), device {device}, K={args.k} --")
            batch_bench(args.k, device, args.reps)
        return
    if args.sweep:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads or default_threads)
            print(f"-- {torch.get_num_threads()} thread(s), device {device}, K={args.k} --")
            sweep(args.k, device, args.reps)
        return
    print(f"torch {torch.__version__}, device {device}, N={args.n}, K={args.k}, 3 iterations")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads or default_threads)
        res = bench(args.n, args.k, device, args.reps, not args.no_naive)
        print(f"\n-- {torch.get_num_threads()} thread(s) --")
        plain = res["plain Linear step"][0]
        naive = res.get("naive reference", (None, None))[0]
        for name, (ms, peak) in res.items():
            line = f"{name:>18}: {ms:9.2f} ms/step   {ms / plain:7.1f}x plain"
            if naive is not None and name != "plain Linear step":
                line += f"   naive/this {naive / ms:7.1f}x"
            if peak is not None:
                line += f"   peak +{peak:8.1f} MiB"
            print(line)


if __name__ == "__main__":
    main()
