"""Render the README's benchmark tables from bench/results/*.json.

Run:  python bench/readme_tables.py [ptp|dkm|skm]   (prints markdown)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def ptp(name: str = "ptp_full") -> str:
    d = _load(name)
    if d is None:
        return f"(no bench/results/{name}.json)"
    rows = []
    for r in d["rows"]:
        gran = "per_tensor" if r["granularity"] == "per_tensor" else f"group {r['group_size']}"
        rows.append(
            [
                r["workload"],
                f"{r['weights'] / 1e6:.2f}M",
                str(r["n_bits"]),
                gran,
                f"{r['ct_s']:.3g}",
                f"{r['ours_s']:.3g}",
                f"{r['speedup']:.1f}x",
                f"{r['ct_err_mean']:.4g}",
                f"{r['ours_err_mean']:.4g}",
                f"{r['worst_err_ratio']:.4f}",
                f"{r['ours_rss_ratio']:.2f}",
            ]
        )
    header = [
        "workload",
        "weights",
        "bits",
        "granularity",
        "coremltools s",
        "ours s",
        "speedup",
        "mean rel. err. ct",
        "mean rel. err. ours",
        "worst layer ours/ct",
        "peak RSS / weight bytes",
    ]
    return _table(header, rows)


def dkm() -> str:
    parts = []
    d = _load("dkm_speed") or _load("dkm_quick") or _load("dkm")
    if d and d.get("speed"):
        rows = [
            [
                r["workload"],
                str(r["n_bits"]),
                r["gran"],
                f"{r['plain_ms']:.1f}",
                f"{r['dkm_ms']:.1f}",
                f"{r['ratio']:.2f}x",
                f"{r['first_incl_prepare_s']:.2f}",
            ]
            for r in d["speed"]
        ]
        header = [
            "workload",
            "bits",
            "granularity",
            "plain ms/step",
            "DKM ms/step",
            "ratio",
            "prepare + first step s",
        ]
        parts.append("Step time, CPU, 1 thread:\n\n" + _table(header, rows))
    mem = _load("dkm_memory") or d
    if mem and mem.get("memory"):
        rows = [
            [
                r["workload"],
                f"{r['plain_peak_MiB']:.1f}",
                f"{r['dkm_peak_MiB']:.1f}",
                f"{r['ratio']:.2f}x",
            ]
            for r in mem["memory"]
        ]
        parts.append(
            "Peak RSS increase of 3 training steps, each in a fresh process:\n\n"
            + _table(["workload", "plain MiB", "DKM MiB", "ratio"], rows)
        )
    a = _load("dkm_acc")
    if a and a.get("accuracy"):
        rows = [
            [
                str(r["n_bits"]),
                str(r["steps"]),
                f"{r['fp32_acc']:.4f}",
                f"{r['ours_ptp_acc']:.4f}",
                f"{r['ct_dkm_acc']:.4f} ({r['ct_dkm_s']:.0f} s)",
                f"{r['ours_dkm_acc']:.4f} ({r['ours_dkm_s']:.0f} s)",
            ]
            for r in a["accuracy"]
        ]
        header = ["bits", "DKM steps", "fp32", "our PTP", "coremltools DKM", "our DKM"]
        parts.append(
            "Digits CNN test accuracy after finalize (fine-tuned from the fp32 checkpoint, Adam "
            "1e-3, same batches):\n\n" + _table(header, rows)
        )
    parts.append(gpu())
    return "\n\n".join(parts) if parts else "(no DKM results)"


def _gpu_runs(g: dict) -> list[tuple[str, dict, dict]]:
    """(variant, DKM run, plain run) of a bench/dkm_gpu.py result (both of its formats)."""
    ll = g["llama"]
    if "dkm" in ll:  # one DKM run per file (before --variants)
        return [("auto", ll["dkm"], ll["plain"])]
    # with plain runs around each DKM run, its reference is their mean (plain_ref_<variant>)
    return [
        (v, ll[f"dkm_{v}"], ll.get(f"plain_ref_{v}", ll["plain"]))
        for v in g.get("variants", [])
        if f"dkm_{v}" in ll
    ]


# this session's three runs named their variants before the CUDA graphs went off by default:
# there "auto" replayed the rounds from graphs and "eager" is today's default
_OLD_K, _NEW_K = "8 warps x 4,096 (before the sweep)", "16 warps x 4,096 / 8,192 (now)"
GPU_RUNS = [  # (result file, what it measured, {variant: what it ran} where not "auto")
    (
        "gpu_h200/dkm_gpu_h200_pairs",
        "run C",
        {
            "auto": "graphs on, kernels " + _NEW_K,
            "eager": "graphs off (today's default), kernels " + _NEW_K,
            "oldkernels": "graphs on, kernels " + _OLD_K,
        },
    ),
    (
        "gpu_h200/dkm_gpu_h200_kernels",
        "run B",
        {
            "auto": "graphs on, kernels 8 warps x 4,096, register sums",
            "tilesums": "graphs on, kernels " + _OLD_K,
            "warps16": "graphs on, kernels 16 warps x 4,096, register sums",
            "eager": "graphs off, kernels 8 warps x 4,096, register sums",
        },
    ),
    (
        "gpu_h200/dkm_gpu_h200_graphs",
        "run A",
        {"auto": "graphs on, kernels " + _OLD_K, "eager": "graphs off, kernels " + _OLD_K},
    ),
    ("gpu_h200/dkm_gpu_h200", "Triton kernels, run 1", {}),
    ("gpu_h200/dkm_gpu_h200_rep", "Triton kernels, run 2 (another H200)", {}),
    ("gpu_h100/dkm_gpu_h100", "device layout, before the kernels, run 1", {}),
    ("gpu_h100/dkm_gpu_h100_rep", "device layout, before the kernels, run 2", {}),
    ("gpu_h100/dkm_gpu_session_start", "before the device layout", {}),
    ("dkm_gpu_h200", "an earlier session", {}),
]


def _gpu_files():
    """(result, the first two cells of a row of variant v) per GPU_RUNS file with LLaMA runs."""
    for name, what, labels in GPU_RUNS:
        g = _load(name)
        if not g or not g.get("llama"):
            continue

        def head(v: str, g=g, what=what, labels=labels) -> list[str]:
            if v in labels:
                label = f"{what}: {labels[v]}"
            else:
                label = what + ("" if v == "auto" else f" (engine variant {v})")
            return [g["device"].replace("NVIDIA ", ""), label]

        yield g, head


def gpu_pairs() -> str:
    """The runs that also alternated plain and DKM steps (bench/dkm_gpu.py's pairs)."""
    rows = []
    for g, head in _gpu_files():
        for v in g.get("variants", []):
            res = g["llama"].get(f"pairs_{v}")
            if res is None:
                continue
            rows.append(
                [
                    *head(v),
                    f"{1e3 * res['plain_step_s']:.1f}",
                    f"{1e3 * res['dkm_step_s']:.1f}",
                    f"{res['step_ratio']:.2f}x",
                    f"{res['pair_ratio_median']:.2f}x",
                ]
            )
    if not rows:
        return "(no alternated GPU runs)"
    header = ["card", "code", "plain ms/step", "DKM ms/step", "step ratio", "median pair ratio"]
    return (
        "The same runs' step times with plain and DKM steps alternated in one process (a plain "
        "and a DKM model side by side, 30 pairs after 3 warm-up pairs; medians), which the "
        "machine's drift cannot bias:\n\n" + _table(header, rows)
    )


def gpu() -> str:
    """The GPU LLaMA DKM runs: step time and peak memory against plain training."""
    rows, checks = [], None
    for g, head in _gpu_files():
        for v, dkm_run, plain in _gpu_runs(g):
            rows.append(
                [
                    *head(v),
                    f"{1e3 * plain['steady_step_s']:.1f}",
                    f"{1e3 * dkm_run['steady_step_s']:.1f}",
                    f"{dkm_run['steady_step_s'] / plain['steady_step_s']:.2f}x",
                    f"{plain['peak_mem_GiB']:.2f}",
                    f"{dkm_run['peak_mem_GiB']:.2f}",
                    f"{dkm_run['peak_mem_GiB'] / plain['peak_mem_GiB']:.2f}x",
                    f"{dkm_run['prepare_s'] + dkm_run['first_step_s']:.2f}",
                ]
            )
        if checks is None and g.get("correctness"):
            checks = (g["device"], g["correctness"])
    if not rows:
        return "(no GPU DKM results)"
    header = [
        "card",
        "code",
        "plain ms/step",
        "DKM ms/step",
        "step ratio",
        "plain GiB",
        "DKM GiB",
        "memory ratio",
        "prepare + first step s",
    ]
    out = (
        "134M-parameter LLaMA-shaped LM, batch 8 x 512, bf16 autocast, AdamW, every Linear at "
        "4 bits (85 weights); plain and DKM in one process, each row one DKM run; plain: the "
        "mean of the plain runs just before and after it (the H200 rows of the Triton "
        "kernels), else the one plain run before all DKM runs of the process; first step: "
        "with Triton's compilation of the kernels (cold cache):\n\n" + _table(header, rows)
    )
    pairs = gpu_pairs()
    if rows and not pairs.startswith("(no"):
        out += "\n\n" + pairs
    if checks:
        ok = sum(c["ok"] for c in checks[1])
        out += (
            f"\n\nCUDA correctness on the {checks[0]}: {ok}/{len(checks[1])} checks passed ("
            + "; ".join(c["check"] for c in checks[1])
            + ")."
        )
    return out


def skm() -> str:
    d = _load("skm")
    if d is None:
        return "(no bench/results/skm.json)"
    rows = []
    for r in d["rows"]:
        rows.append(
            [
                str(r["n_bits"]),
                r["granularity"],
                f"{r['ct_s']:.1f}",
                f"{r['ours_s']:.1f}",
                f"{r['speedup']:.1f}x",
                f"{r['worst_wratio']:.4f}",
                f"{r['ct_cos']:.4f}",
                f"{r['ours_cos']:.4f}",
            ]
        )
    header = [
        "bits",
        "granularity",
        "coremltools k-means s",
        "ours s",
        "speedup",
        "worst layer Fisher-weighted error ours/ct",
        "embedding cosine ct",
        "ours",
    ]
    out = [_table(header, rows)]
    for o in d.get("outliers", []):
        out.append(
            f"outlier_fraction {o['outlier_fraction']} at {o['n_bits']} bits ({o['outliers']} "
            f"weights kept exact): Fisher-weighted error {o['wmean_without']:.4f} -> "
            f"{o['wmean_with']:.4f}, embedding cosine {o['cos_without']:.4f} -> "
            f"{o['cos_with']:.4f} (lower error on {o['layers_error_lower']}/{o['layers']} layers)."
        )
    for key in ("scale1b", "scale"):
        if d.get(key):
            out.append(f"Scale run: {json.dumps(d[key])}")
    return "\n\n".join(out)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "ptp"
    print({"ptp": ptp, "dkm": dkm, "skm": skm, "gpu": gpu}[what]())
