"""Vector palettization (cluster_dim > 1): our k-means kernel, side by side in one process.

    python bench/vectors.py                  # all sections
    python bench/vectors.py --quick          # one kernel shape, the MLP at 4 bits, no DKM
    python bench/vectors.py --sections kernel,ptp --repeat 3

Sections:

- ``kernel``: ``kmeans_vectors`` on the vectors of the MLP's 1024x1024 Linear (N(0, 0.02) init;
  cluster_dim 2 and 4, K = 4 and 16, ``n_init`` 3 as PostTrainingPalettizer uses) through the
  compiled kernel (k-means++ and Hamerly-accelerated Lloyd, restarts on two threads) and through
  the torch program (the same seeding and plain Lloyd, what other devices run and what the CPU
  ran before the kernel). Reports the time ratio and the inertia ratio (kernel / torch).
- ``ptp``: PostTrainingPalettizer with ``cluster_dim`` 2 and 4 at 2 and 4 bits, ours vs
  coremltools 9.0 on the MLP and the conv net: time ratio and the worst per-layer relative
  squared error ratio (ours / theirs).
- ``dkm``: ``DKMPalettizer.prepare`` of the MLP with ``cluster_dim`` 2, 4 bits and coremltools'
  default ``kmeans_n_init=10`` (its centroid init: ten k-means++ restarts per layer), timed
  with the kernel and with the torch program; then the steady DKM training step (SGD, batch
  64) against the plain step, and coremltools' DKM (first step, with its k-means init, and
  steady step) on the same model and config.

Times are medians over ``--repeat`` runs, the two sides alternating. Results go to
bench/results/<out>.json and markdown tables on stdout. Torch threads default to 1 (see
bench/_harness.py); our kernel splits restarts over two threads of its own.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make "bench" importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import _coremltools as C
from bench import _harness as H
from bench import _workloads as W
from lightning_palettize import kmeans as km

SECTIONS = ("kernel", "ptp", "dkm")


def _alternate(sides: dict[str, Any], repeat: int) -> dict[str, tuple[float, Any]]:
    """{side: (median seconds, last result)}, the sides' order alternating between repeats."""
    times: dict[str, list[float]] = {s: [] for s in sides}
    out: dict[str, Any] = {}
    names = list(sides)
    for r in range(repeat):
        for s in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            out[s] = sides[s]()
            times[s].append(time.perf_counter() - t0)
    return {s: (statistics.median(times[s]), out[s]) for s in names}


def _torch_program(fn):
    """Run ``fn`` with the CPU kernel switched off (kmeans_vectors' torch program)."""

    def run():
        km._VECTORS_CPU = False
        try:
            return fn()
        finally:
            km._VECTORS_CPU = True

    return run


def kernel_rows(repeat: int, quick: bool) -> list[dict[str, Any]]:
    weight = W.mlp()[2].weight.detach()  # 1024 x 1024
    rows = []
    cases = [(2, 16)] if quick else [(2, 4), (2, 16), (4, 4), (4, 16)]
    for dim, k in cases:
        # cluster_dim consecutive output channels per vector, as the palettizers group them
        x = weight.t().reshape(1, -1, dim).contiguous()
        res = _alternate(
            {
                "kernel": lambda x=x, k=k: km.kmeans_vectors(x, k, n_init=3),
                "torch": _torch_program(lambda x=x, k=k: km.kmeans_vectors(x, k, n_init=3)),
            },
            repeat,
        )
        (tk, a), (tt, b) = res["kernel"], res["torch"]
        rows.append(
            {
                "vectors": x.shape[1],
                "cluster_dim": dim,
                "K": k,
                "kernel_s": tk,
                "torch_s": tt,
                "speedup": tt / tk,
                "inertia_ratio": float(a.inertia.sum() / b.inertia.sum()),
            }
        )
        print(f"kernel d={dim} K={k}: {tt / tk:.1f}x", flush=True)
    return rows


def ptp_rows(repeat: int, quick: bool) -> list[dict[str, Any]]:
    from lightning_palettize import PostTrainingPalettizer, PostTrainingPalettizerConfig

    rows = []
    workloads = {"mlp": W.mlp} if quick else {"mlp": W.mlp, "conv": W.conv_net}
    for wname, build in workloads.items():
        model = build()
        for n_bits in (4,) if quick else (2, 4):
            for dim in (2,) if quick else (2, 4):
                cfg = C.ptp_config_dict(model, n_bits, cluster_dim=dim)
                # only layers whose output channels cluster_dim divides (both sides refuse others)
                mods = dict(model.named_modules())
                cfg["module_name_configs"] = {
                    k: v
                    for k, v in cfg["module_name_configs"].items()
                    if mods[k.replace("\\", "")].weight.shape[0] % dim == 0
                }
                names = C.configured_param_names(model, cfg)
                ours_cfg = PostTrainingPalettizerConfig.from_dict(cfg)
                res = _alternate(
                    {
                        "ours": lambda m=model, c=ours_cfg: PostTrainingPalettizer(m, c).compress(),
                        "coremltools": lambda m=model, c=cfg: C.ct_ptp(m, config=c)[0],
                    },
                    repeat,
                )
                (to, mo), (tc, mc) = res["ours"], res["coremltools"]
                ratios = C.error_ratios(
                    C.per_layer_relative_error(model, mo, names),
                    C.per_layer_relative_error(model, mc, names),
                )
                rows.append(
                    {
                        "workload": wname,
                        "n_bits": n_bits,
                        "cluster_dim": dim,
                        "ours_s": to,
                        "coremltools_s": tc,
                        "speedup": tc / to,
                        "worst_err_ratio": max(ratios.values()),
                        "mean_err_ratio": statistics.mean(ratios.values()),
                    }
                )
                print(f"ptp {wname} {n_bits} bits d={dim}: {tc / to:.1f}x", flush=True)
    return rows


def dkm_rows(repeat: int) -> list[dict[str, Any]]:
    from lightning_palettize import DKMPalettizer, DKMPalettizerConfig

    model = W.mlp()
    cfg_dict = {"module_type_configs": {"Linear": {"n_bits": 4, "cluster_dim": 2}}}
    cfg = DKMPalettizerConfig.from_dict(cfg_dict)

    def prepare():
        return DKMPalettizer(model, cfg).prepare()

    res = _alternate({"kernel": prepare, "torch": _torch_program(prepare)}, repeat)
    (tk, _), (tt, _) = res["kernel"], res["torch"]
    print(f"dkm prepare: {tt / tk:.1f}x", flush=True)
    # the steady training step, DKM vs plain (SGD, the MLP's batch of 64), alternating
    batches = [W.mlp_batch()]
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=1e-3)  # noqa: E731
    plain, dkm = [], []
    for r in range(repeat):
        pal = DKMPalettizer(W.mlp(), cfg)
        prepared = pal.prepare()
        runs = [("plain", W.mlp(), None), ("dkm", prepared, pal.step)]
        for side, m, after in runs if r % 2 == 0 else runs[::-1]:
            t = H.train_steps(m, batches, sgd, 6, after_step=after)["steady_step_s"]
            (plain if side == "plain" else dkm).append(t)
    tp, td = statistics.median(plain), statistics.median(dkm)
    print(f"dkm step: {td / tp:.1f}x plain", flush=True)
    ct: dict[str, Any] = {}
    if C.ct_available():  # coremltools' DKM on the same model and config: its first and steady step
        res = C.ct_dkm_steps(W.mlp(), cfg_dict, batches, sgd, 4)
        ct = {"ct_first_step_s": res["first_step_s"], "ct_steady_step_s": res["steady_step_s"]}
        ct["ct_steady_over_ours"] = res["steady_step_s"] / td
        print(f"coremltools dkm step: {ct['ct_steady_over_ours']:.1f}x ours", flush=True)
    return [
        {
            "workload": "mlp",
            "n_bits": 4,
            "cluster_dim": 2,
            "kmeans_n_init": 10,
            "prepare_kernel_s": tk,
            "prepare_torch_s": tt,
            "prepare_speedup": tt / tk,
            "plain_step_s": tp,
            "dkm_step_s": td,
            "step_ratio": td / tp,
            **ct,
        }
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    H.add_common_args(p, default_out="vectors")
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma list of " + ",".join(SECTIONS)
    )
    p.add_argument(
        "--repeat", type=int, default=None, help="timed runs per side (default 3, quick 1)"
    )
    args = p.parse_args(argv)
    H.set_threads(args.threads)
    repeat = args.repeat or (1 if args.quick else 3)
    sections = [s for s in args.sections.split(",") if s]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        p.error(f"--sections: unknown {bad}; choose from {', '.join(SECTIONS)}")
    out: dict[str, Any] = {"bench": "vectors", "repeat": repeat}
    if "kernel" in sections:
        out["kernel"] = kernel_rows(repeat, args.quick)
        H.print_table(out["kernel"])
    if "ptp" in sections:
        if C.ct_available():
            out["ptp"] = ptp_rows(repeat, args.quick)
            H.print_table(out["ptp"])
        else:
            print("coremltools is not installed: ptp section skipped")
    if "dkm" in sections and not args.quick:
        out["dkm"] = dkm_rows(repeat)
        H.print_table(out["dkm"])
    print("wrote", H.write_json(args.out, out))


if __name__ == "__main__":
    main()
