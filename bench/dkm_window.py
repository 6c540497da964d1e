"""Micro-benchmark: the AVX2 per-code kernels with and without the centroid window.

Times ``_dkm_cpu.fwd_stats`` and ``_dkm_cpu.bwd_step`` (one call each, best of several
repetitions, the two settings alternating in one process) on two node layouts at K = 16,
tau 1e-4: "mlp-like" (64 groups x 256 nodes over a range where every centroid shares every
node: the window switches itself off) and "minilm-like" (24 groups x 1,200 sorted nodes over a
range where each node sees a few centroids). ``_WINDOW_LOGIT`` 0 is the unwindowed kernel.

    python bench/dkm_window.py
"""

from __future__ import annotations

import time

import torch

from lightning_palettize import soft_kmeans as sk

LAYOUTS = {"mlp-like": (64, 256, 0.09), "minilm-like": (24, 1200, 0.7)}


def _inputs(g: int, u: int, spread: float, k: int = 16):
    gen = torch.Generator().manual_seed(0)
    v = (torch.rand(g, u, generator=gen) - 0.5).mul(spread).sort(1).values.contiguous()
    m = torch.rand(g, u, generator=gen)
    c = torch.linspace(-spread / 2.2, spread / 2.2, k).repeat(g, 1).contiguous()
    return v, m, c, torch.randn(g, k, generator=gen), torch.randn(g, u, generator=gen)


def _cfg(tau: float):
    args = ("bench", torch.device("cpu"), tau, 3, 1e-4, "dkm", False, 0.0, 1e-7, None, None)
    return sk._make_cfg(*args, "auto", False)[0]


def _time_kernels(v, m, c, s_hat, gsum, tau: float, calls: int = 20) -> tuple[float, float]:
    g, u = v.shape
    k = c.shape[1]
    ct = sk._c_cfg(_cfg(tau), k, c)
    sm, r, h = torch.zeros(g, 2, k), torch.zeros(g, u), torch.zeros(g, u)
    dc, dco = torch.empty(g, k), torch.empty(g, k)
    p = sk._ptr
    t0 = time.perf_counter()
    for _ in range(calls):
        sk._dkm_cpu.fwd_stats(p(v), p(m), p(c), g, u, ct, p(sm), 0)
    t1 = time.perf_counter()
    for _ in range(calls):
        sk._dkm_cpu.bwd_step(p(v), p(m), p(gsum), p(c), g, u, ct, 2 / tau, p(s_hat), p(c), p(c),
                             p(r), p(h), p(dc), p(dco))  # fmt: skip
    t2 = time.perf_counter()
    return (t1 - t0) / calls, (t2 - t1) / calls


def main() -> None:
    if sk._dkm_cpu is None or not sk._dkm_cpu.simd(sk._c_cfg(_cfg(1e-4), 16)):
        raise SystemExit("needs the compiled AVX2 kernels")
    torch.set_num_threads(1)
    tau, default = 1e-4, sk._WINDOW_LOGIT
    for name, (g, u, spread) in LAYOUTS.items():
        data = _inputs(g, u, spread)
        best = {w: [float("inf")] * 2 for w in (0.0, default)}
        for _ in range(7):
            for w in best:
                sk._WINDOW_LOGIT = w
                times = _time_kernels(*data, tau)
                best[w] = [min(a, b) for a, b in zip(best[w], times)]
        sk._WINDOW_LOGIT = default
        (f0, b0), (f1, b1) = best[0.0], best[default]
        print(
            f"{name:12s} fwd_stats {1e3 * f0:.3f} -> {1e3 * f1:.3f} ms ({f0 / f1:.2f}x)   "
            f"bwd_step {1e3 * b0:.3f} -> {1e3 * b1:.3f} ms ({b0 / b1:.2f}x)"
        )


if __name__ == "__main__":
    main()
