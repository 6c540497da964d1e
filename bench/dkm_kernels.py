"""Times the fused Triton DKM kernels (``fwd_loop``, ``bwd_loop``) under launch settings.

The input is what a DKM round of the 134M LLaMA hands them: the full code tables of its 85
Linear weights at 4 bits per tensor (85 rows of 65,536 codes, K = 16, 3 iterations, the
DKMPalettizer defaults), centroids from each weight's quantiles. Each setting is
``WARPSxTILE:SUMS[:STAGES]`` (warps per program, (code, centroid) entries per tile, the sums per
tile slot in registers "acc" or reduced per tile "tile", software-pipelining stages of the tile
loops), the same for both kernels, or "default" (_dkm_triton._LAUNCH), optionally with "/N":
each row's codes split in chunks of N over programs (_dkm_triton._SPLIT_CODES); its results are
checked against the first setting's. Each kernel timed with CUDA events (median of ``--reps``).

    python bench/dkm_kernels.py [--configs 8x4096:tile,8x4096:acc,...] [--out FILE]
    python bench/dkm_kernels.py --small       (4 small rows: a dry run, e.g. in Triton's
                                               interpreter on the CPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_palettize import soft_kmeans as sk  # noqa: E402

# WARPSxTILE:SUMS[:STAGES], the same for both kernels, or "default" (_dkm_triton._LAUNCH: the
# forward at 16x4096:acc, the backward at 16x8192:tile, from the H200 sweeps in
# bench/results/gpu_h200/dkm_kernels*.json); "/N": rows split in chunks of N codes over
# programs (_SPLIT_CODES). The pipelined (:2) and split ones are not timed yet.
DEFAULT_CONFIGS = (
    "default,default/16384,default/8192,default/4096,default/2048,8x4096:tile,"
    "16x8192:tile:2,16x4096:acc:2"
)


def llama_weights(device: torch.device, small: bool) -> list[torch.Tensor]:
    """The 134M LLaMA's Linear weight shapes (12 layers of q, k, v, o, gate, up, down and the
    LM head), N(0, 0.02) as at initialisation; ``small``: 4 weights of 20,000."""
    gen = torch.Generator().manual_seed(0)
    if small:
        shapes = [(100, 200)] * 4
    else:
        layer = [(768, 768)] * 4 + [(2048, 768)] * 2 + [(768, 2048)]
        shapes = layer * 12 + [(32000, 768)]
    return [(0.02 * torch.randn(s, generator=gen)).to(device) for s in shapes]


def tables(weights: list[torch.Tensor], k: int, cfg) -> tuple:
    """(values, masses [G, 65536], centroids [G, K]) as a round builds them (full tables)."""
    device = weights[0].device
    flats = [w.reshape(1, -1) for w in weights]
    _, _, _, values, mass, _, _ = sk._encode_many(flats, cfg, device, False, True)
    q = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    gen = torch.Generator().manual_seed(1)
    cents = []
    for w in weights:
        flat = w.reshape(-1)
        pick = torch.randint(0, flat.numel(), (1 << 16,), generator=gen).to(device)
        cents.append(torch.quantile(flat[pick], q.to(device)))
    return values.contiguous(), mass.contiguous(), torch.stack(cents)


def _timed(fn, reps: int) -> tuple[float, object]:
    out = fn()  # (compiles this setting's kernel)
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def elements(weights: list[torch.Tensor], cfg, reps: int) -> dict:
    """The element passes of a round over these weights (one LUT group each), in the torch
    code (int32 bins, runs of tensors concatenated) and in the Triton element kernels
    (soft_kmeans._TRITON_ELEM_DEVICES): forward = scales, codes, histogram and tables, then
    the soft-weight gather; backward = per-code gradient sums, then the gradient gather.
    Each pair is checked equal (gathers exactly, sums to float rounding)."""
    device = weights[0].device
    flats = [w.reshape(1, -1) for w in weights]
    items, start = [], 0
    for t, f in enumerate(flats):
        items.append(sk._ScalarItem("table", 1, f.shape[1], t, t, start))
        start += f.numel()
    n_tab = len(flats)
    gen = torch.Generator().manual_seed(3)
    y_full = torch.randn(n_tab * sk._STRIDE, generator=gen).to(device)
    hr = torch.randn(n_tab, sk._STRIDE, 2, generator=gen).to(device)
    grads = [torch.randn(f.shape[1], generator=gen).to(device) for f in flats]
    live = [True] * n_tab
    res, got = {}, {}

    def torch_fwd():
        bins, _, codes, *_ = sk._encode_many(flats, cfg, device, False, True)
        return bins, codes

    def torch_bwd(bins, codes):
        gsum = sk._code_grad_sums(items, live, grads, bins, codes, n_tab)
        h, r = hr[..., 0].reshape(-1), hr[..., 1].reshape(-1)
        return gsum, sk._gather_grads(items, live, h, r, bins, grads)

    def triton_fwd():
        plan = sk._ElemPlan(flats, items, sk._group_scales(flats, device))
        assert plan.code_tables(cfg.keep_zeros, True) is not None
        return plan

    def triton_bwd(plan, codes):
        gsum = plan.grad_sums(codes, cfg.keep_zeros, live, grads)
        out = plan.grads(hr, cfg.keep_zeros, live, grads)
        assert gsum is not None and out is not None
        return gsum, sk._split_tables(items, None, out)

    res["torch_codes_ms"], (bins, codes) = _timed(torch_fwd, reps)
    res["torch_gather_ms"], got["torch_y"] = _timed(
        lambda: sk._gather_tables(items, None, y_full, bins, cfg)[0], reps
    )
    res["torch_backward_ms"], got["torch_g"] = _timed(lambda: torch_bwd(bins, codes), reps)
    res["triton_codes_ms"], plan = _timed(triton_fwd, reps)
    res["triton_gather_ms"], got["triton_y"] = _timed(
        lambda: sk._gather_tables(items, plan, y_full, None, cfg)[0], reps
    )
    res["triton_backward_ms"], got["triton_g"] = _timed(lambda: triton_bwd(plan, codes), reps)
    res["gather_equal"] = all(
        torch.equal(got["torch_y"][i], got["triton_y"][i]) for i in range(n_tab)
    )
    res["gsum_max_rel_diff"] = _rel(got["triton_g"][0], got["torch_g"][0])
    res["grad_max_rel_diff"] = max(
        _rel(got["triton_g"][1][i], got["torch_g"][1][i]) for i in range(n_tab)
    )
    return res


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--small", action="store_true")
    p.add_argument("--out", default="bench/results/dkm_kernels.json")
    p.add_argument("--no-elements", action="store_true", help="skip the element passes' timing")
    args = p.parse_args()
    kernels = sk._triton()
    if kernels is None:
        sys.exit("the Triton kernels do not import here")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    k, max_iter, epsilon = 16, 3, 1e-4
    cfg = sk._make_cfg(
        "bench", device, 1e-4, max_iter, epsilon, "dkm", False, 0.0, 1e-7, None, None, "table",
        False,
    )[0]  # fmt: skip
    weights = llama_weights(device, args.small)
    v, m, c = tables(weights, k, cfg)
    gsum = torch.randn(v.shape, generator=torch.Generator().manual_seed(2)).to(device)
    gsum = gsum * (m > 0)
    ct = sk._c_cfg(cfg, k)
    out: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "rows": v.shape[0],
        "codes": v.shape[1],
        "configs": {},
    }
    saved, saved_split = kernels._LAUNCH, kernels._SPLIT_CODES
    ref = None
    try:
        for spec in args.configs.split(","):
            launch, _, split = spec.partition("/")
            kernels._SPLIT_CODES = int(split or 0)
            if launch == "default":
                kernels._LAUNCH = saved
            else:
                shape, sums, *stages = launch.split(":")
                warps, tile = (int(x) for x in shape.split("x"))
                one = (warps, tile, sums == "acc", int(stages[0]) if stages else 1)
                kernels._LAUNCH = {"fwd": one, "bwd": one}
            try:
                t_f, res = _timed(lambda: kernels.fwd_loop(v, m, c, ct, max_iter, epsilon, False),
                                  args.reps)  # fmt: skip
                y, prev_c, last_c, last_it, c_hist, raw_hist, mass_hist = res
                state = dict(v=v, m=m, c_hist=c_hist, raw_hist=raw_hist, mass_hist=mass_hist,
                             last_it=last_it, prev_c=prev_c, last_c=last_c)  # fmt: skip
                t_b, (h, r) = _timed(
                    lambda st=state: kernels.bwd_loop(st, gsum, ct, 2.0 / cfg.tau, False),
                    args.reps,
                )
            except Exception as err:  # a setting that does not build: recorded, the rest run
                out["configs"][spec] = {"error": f"{type(err).__name__}: {err}"[:500]}
                print(spec, "failed:", out["configs"][spec]["error"], flush=True)
                continue
            row = {"fwd_ms": t_f, "bwd_ms": t_b}
            if ref is None:
                ref = (y, last_c, h, r)
            else:
                row["max_rel_diff"] = max(
                    _rel(a, b) for a, b in zip((y, last_c, h, r), ref, strict=True)
                )
            out["configs"][spec] = row
            print(spec, {key: round(val, 4) for key, val in row.items()}, flush=True)
    finally:
        kernels._LAUNCH, kernels._SPLIT_CODES = saved, saved_split
    if not args.no_elements:
        try:
            out["elements"] = elements(weights, cfg, args.reps)
            print("elements", out["elements"], flush=True)
        except Exception as err:  # (recorded; the kernel timings above stand)
            out["elements"] = {"error": f"{type(err).__name__}: {err}"[:500]}
            print("elements failed:", out["elements"]["error"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
