"""SKMPalettizer: lightning_palettize vs coremltools 9.0, side by side in one process.

    python bench/skm.py                  # MiniLM, n_bits 2/3/4 x per_tensor/g16, + outlier row
    python bench/skm.py --quick          # MiniLM, 4 bits per_tensor + the outlier row, 32 items
    python bench/skm.py --bits 3 --granularity per_tensor
    python bench/skm.py --scale1b        # 1.0B-parameter fp32 Linear stack, ours, peak RSS
    python bench/skm.py --scale1b --side coremltools --layers 1   # their cost for one layer

MiniLM rows (the real all-MiniLM-L6-v2, its 36 encoder Linear layers, 10.6M weights):

- Calibration: ``calibration_nsamples`` items (default 128, coremltools' default; 32 with
  --quick), each a list of 8 sentence pairs drawn (seeded) from the first 48 of the 64
  SENTENCE_PAIRS; loss = in-batch contrastive loss over mean-pooled embeddings. The Fisher is
  computed ONCE, by ours (per-item gradients, as coremltools), saved with
  ``Sensitivity.save``, and handed to coremltools in its own format (``torch.save`` of
  ``{name: normalised Fisher}``, what its ``compute_sensitivity`` writes and its
  ``compress(sensitivity_path=...)`` reads). Both sides therefore minimise the same objective.
- Time "excluding calibration": ours = ``SKMPalettizer(model, cfg).compress(sensitivity=file)``;
  theirs = ``SKMPalettizer(model, cfg).compress(sensitivity_path=file)``. Both include the deep
  copy of the model and reading the sensitivity file; ours is the median of --repeat runs
  (3), theirs one run (~1-2 minutes each), both with num_kmeans_workers=1. Target: ours >= 5x
  faster. ``ours_2w_s`` is ours with num_kmeans_workers=2 (two weights clustered at once on
  threads), for information.
- Per-layer Fisher-weighted error ``sum(S (W - W_hat)^2) / sum(S W^2)`` with S the normalised
  Fisher both sides used; the worst ratio ours / theirs over the 36 layers (target <= 1;
  theirs is the exact weighted 1-D DP, ours its default two-level DP / exact DP, so equality up
  to float rounding, ~1e-16, is the expected outcome).
- Embedding cosine to fp32 (mean over sentences): on all 128 sentences, and on the 32 sentences
  of the 16 pairs never used for calibration (held out). Target: ours >= theirs.
- Outlier row (ours only; coremltools does not implement it): outlier_fraction 0.0005 at 3 bits
  per_tensor, against the same run without outliers.

--scale1b: a 1.0-billion-parameter stack of 60 Linear(4096, 4096, bias=False) fp32 layers (4.0
GB), built layer by layer in a fresh process, with a synthetic Fisher (``(w * N(0, 1))^2``)
written layer by layer to a sensitivity file; ours compresses in place (4 bits, per_tensor)
reading the file one tensor at a time (4096 x 4096 weights use the 16-bit-code DP by default).
Reported: the process's peak RSS (VmHWM, model included) over the model's bytes (target <= 3x),
and the increase during compress. ``--side coremltools --layers N`` runs theirs on the first N
layers instead (same config, the Fisher handed over in its format).

Threads default to 1 (``--threads``; the box is 2 shared vCPUs, see bench/_harness.py). JSON goes
to bench/results/<out>.json (default ``skm``; ``skm_scale1b`` for --scale1b) and a markdown table
to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make "bench" importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from bench import _coremltools as C
from bench import _harness as H
from bench import _workloads as W

GRANULARITIES = {"per_tensor": None, "g16": 16}
SPEED_TARGET = 5.0
MEM_TARGET = 3.0
OUTLIER_FRACTION = 0.0005
CALIB_PAIRS = 48  # SENTENCE_PAIRS[:48] calibrate, [48:] are held out for the cosine
PAIRS_PER_ITEM = 8


# ---------------------------------------------------------------------------------------------
# MiniLM


def calibration_items(n_items: int, seed: int = 0) -> list[list[tuple[str, str]]]:
    """``n_items`` lists of PAIRS_PER_ITEM distinct calibration pairs (seeded draws)."""
    rng = random.Random(seed)
    pairs = W.SENTENCE_PAIRS[:CALIB_PAIRS]
    return [rng.sample(pairs, PAIRS_PER_ITEM) for _ in range(n_items)]


def held_out_sentences() -> list[str]:
    return [s for pair in W.SENTENCE_PAIRS[CALIB_PAIRS:] for s in pair]


def row_config(model: nn.Module, names: list[str], n_bits: int, gran: str, **extra: Any):
    gs = GRANULARITIES[gran]
    granularity = "per_tensor" if gs is None else "per_grouped_channel"
    return C.ptp_config_dict(model, n_bits, granularity, gs, names, **extra)


def ours_skm(model: nn.Module, config: dict[str, Any], sensitivity: Any, workers: int = 1):
    """(compressed model, seconds, palettizer) of ``compress(sensitivity=...)``."""
    from lightning_palettize import SKMPalettizer

    t0 = time.perf_counter()
    pal = SKMPalettizer(model, config)
    out = pal.compress(sensitivity=sensitivity, progress=False, num_kmeans_workers=workers)
    return out, time.perf_counter() - t0, pal


def _nan_fraction(model: nn.Module, names: list[str]) -> float:
    bad = total = 0
    for n in names:
        p = model.get_parameter(n)
        bad += int((~torch.isfinite(p)).sum())
        total += p.numel()
    return bad / total


def _cosines(ref: nn.Module, model: nn.Module, tok) -> tuple[float, float]:
    return (
        W.embedding_cosine(ref, model, tok),
        W.embedding_cosine(ref, model, tok, held_out_sentences()),
    )


def run_row(
    ctx: dict[str, Any], n_bits: int, gran: str, side_theirs: bool = True
) -> dict[str, Any]:
    model, tok, names, norm = ctx["model"], ctx["tok"], ctx["names"], ctx["normalized"]
    pnames = [f"{n}.weight" for n in names]
    cfg = row_config(model, names, n_bits, gran)
    row: dict[str, Any] = {"n_bits": n_bits, "granularity": gran, "layers": len(pnames)}

    times = []
    for _ in range(ctx["repeat"]):
        gc.collect()
        ours, secs, pal = ours_skm(model, cfg, ctx["ours_path"])
        times.append(secs)
    ours_s = statistics.median(times)
    row["ours_s"] = ours_s
    row["ours_s_all"] = times
    if ctx["workers"] > 1:
        gc.collect()
        row[f"ours_{ctx['workers']}w_s"] = ours_skm(model, cfg, ctx["ours_path"], ctx["workers"])[1]
    ours_w = C.per_layer_weighted_error(model, ours, norm, pnames)
    ours_rel = C.per_layer_relative_error(model, ours, pnames)
    row["ours_wmean"] = statistics.mean(ours_w.values())
    row["ours_rel_mean"] = statistics.mean(ours_rel.values())
    row["ours_nan"] = _nan_fraction(ours, pnames)
    row["ours_cos"], row["ours_cos_held"] = _cosines(model, ours, tok)
    row["ours_per_layer_weighted"] = ours_w
    del ours, pal

    if side_theirs:
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs, _total, ct_s = C.ct_skm(
                model, config=cfg, sensitivity_path=ctx["ct_path"], nsamples=ctx["nsamples"]
            )
        row["ct_s"] = ct_s
        ct_w = C.per_layer_weighted_error(model, theirs, norm, pnames)
        ct_rel = C.per_layer_relative_error(model, theirs, pnames)
        row["ct_wmean"] = statistics.mean(ct_w.values())
        row["ct_rel_mean"] = statistics.mean(ct_rel.values())
        row["ct_nan"] = _nan_fraction(theirs, pnames)
        row["ct_cos"], row["ct_cos_held"] = _cosines(model, theirs, tok)
        ratios = C.error_ratios(ours_w, ct_w)
        worst = max(ratios, key=lambda n: ratios[n])
        row["worst_wratio"] = ratios[worst]
        row["worst_layer"] = worst
        # 1e-12: the float64 -> float32 rounding of identical optimal centroids
        row["layers_ours_gt_theirs"] = sum(r > 1.0 + 1e-12 for r in ratios.values())
        row["speedup"] = ct_s / ours_s
        row["ok_err"] = ratios[worst] <= 1.0 + 1e-12
        row["ok_cos"] = row["ours_cos"] >= row["ct_cos"]
        row["ok_speed"] = row["speedup"] >= SPEED_TARGET
        row["ct_per_layer_weighted"] = ct_w
        del theirs
    return row


def outlier_row(ctx: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    model, tok, names, norm = ctx["model"], ctx["tok"], ctx["names"], ctx["normalized"]
    pnames = [f"{n}.weight" for n in names]
    if base is None:
        base = run_row(ctx, 3, "per_tensor", side_theirs=False)
    cfg = row_config(model, names, 3, "per_tensor", outlier_fraction=OUTLIER_FRACTION)
    out, secs, pal = ours_skm(model, cfg, ctx["ours_path"])
    w = C.per_layer_weighted_error(model, out, norm, pnames)
    cos, cos_held = _cosines(model, out, tok)
    n_out = sum(r.outliers for r in pal.report().rows)
    row = {
        "n_bits": 3,
        "granularity": "per_tensor",
        "outlier_fraction": OUTLIER_FRACTION,
        "outliers": n_out,
        "seconds": secs,
        "wmean_without": base["ours_wmean"],
        "wmean_with": statistics.mean(w.values()),
        "cos_without": base["ours_cos"],
        "cos_with": cos,
        "cos_held_without": base["ours_cos_held"],
        "cos_held_with": cos_held,
        "layers_error_lower": sum(w[n] < base["ours_per_layer_weighted"][n] for n in pnames),
        "layers": len(pnames),
    }
    if "ct_cos" in base:
        row["ct_cos"] = base["ct_cos"]
    row["ok"] = row["wmean_with"] < row["wmean_without"] and cos > base["ours_cos"]
    return row


def setup_minilm(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    from lightning_palettize import SKMPalettizer
    from lightning_palettize.sensitivity import normalize_sensitivity

    model, tok = W.minilm()
    names = W.minilm_linear_names(model)
    nsamples = args.nsamples or (32 if args.quick else 128)
    items = calibration_items(nsamples)
    loss_fn = W.minilm_loss_fn(tok)
    cfg = row_config(model, names, 4, "per_tensor")
    cfg["calibration_nsamples"] = nsamples
    ours_path = os.path.join(tmp, "fisher.safetensors")
    t0 = time.perf_counter()
    sens = SKMPalettizer(model, cfg).compute_sensitivity(
        items, loss_fn, sensitivity_path=ours_path, progress=False
    )
    calib_s = time.perf_counter() - t0
    normalized = {k: normalize_sensitivity(v) for k, v in sens.fisher.items()}
    ct_path = os.path.join(tmp, "ct_sensitivity.pt")
    torch.save(normalized, ct_path)
    zero = sum(int((v == 0).sum()) for v in sens.fisher.values())
    print(
        f"# calibration (ours, once): {nsamples} items x {PAIRS_PER_ITEM} pairs, "
        f"{calib_s:.1f} s; {len(sens.fisher)} weights, {zero} exactly-zero Fisher values, "
        f"missing {sens.missing}",
        flush=True,
    )
    return {
        "model": model,
        "tok": tok,
        "names": names,
        "nsamples": nsamples,
        "ours_path": ours_path,
        "ct_path": ct_path,
        "normalized": normalized,
        "calibration_s": calib_s,
        "zero_fisher": zero,
        "repeat": args.repeat or (1 if args.quick else 3),
        "workers": args.workers,
    }


TABLE_COLUMNS = [
    "n_bits",
    "granularity",
    "ours_s",
    "ours_2w_s",
    "ct_s",
    "speedup",
    "ours_wmean",
    "ct_wmean",
    "worst_wratio",
    "layers_ours_gt_theirs",
    "ours_cos",
    "ct_cos",
    "ours_cos_held",
    "ct_cos_held",
    "ct_nan",
]


def main_minilm(args: argparse.Namespace) -> int:
    bits = (
        [int(b) for b in args.bits.split(",")] if args.bits else ([4] if args.quick else [2, 3, 4])
    )
    grans = (
        args.granularity.split(",")
        if args.granularity
        else (["per_tensor"] if args.quick else list(GRANULARITIES))
    )
    print(
        f"# SKM on all-MiniLM-L6-v2 (36 Linear), ours vs coremltools {C.ct_version()}, "
        f"threads={torch.get_num_threads()}",
        flush=True,
    )
    rows, out_rows = [], []
    with tempfile.TemporaryDirectory(prefix="lp_bench_skm_") as tmp:
        ctx = setup_minilm(args, tmp)
        for n_bits in bits:
            for gran in grans:
                t0 = time.perf_counter()
                row = run_row(ctx, n_bits, gran, side_theirs=not args.no_theirs)
                rows.append(row)
                print(
                    f"  row {n_bits} bits {gran}: {time.perf_counter() - t0:.0f} s wall", flush=True
                )
        if not args.no_outliers:
            base = next(
                (r for r in rows if r["n_bits"] == 3 and r["granularity"] == "per_tensor"), None
            )
            out_rows.append(outlier_row(ctx, base))
        fp32_cos = W.embedding_cosine(ctx["model"], ctx["model"], ctx["tok"])
    print()
    H.print_table(rows, [c for c in TABLE_COLUMNS if any(c in r for r in rows)])
    if out_rows:
        print()
        H.print_table(out_rows)
    summary = _summarize(rows)
    print()
    print(json.dumps(summary, indent=1))
    payload = {
        "bench": "skm_minilm",
        "calibration": {
            "items": ctx["nsamples"],
            "pairs_per_item": PAIRS_PER_ITEM,
            "calibration_pairs": CALIB_PAIRS,
            "ours_seconds": ctx["calibration_s"],
            "zero_fisher_values": ctx["zero_fisher"],
        },
        "fp32_self_cosine": fp32_cos,
        "rows": rows,
        "outliers": out_rows,
        "summary": summary,
    }
    path = H.write_json(args.out, payload)
    print(f"wrote {path}")
    return 0


def _summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    with_ct = [r for r in rows if "ct_s" in r]
    if not with_ct:
        return {}
    return {
        "min_speedup": min(r["speedup"] for r in with_ct),
        "worst_weighted_error_ratio": max(r["worst_wratio"] for r in with_ct),
        "rows_cos_ours_ge_theirs": sum(r["ok_cos"] for r in with_ct),
        "rows": len(with_ct),
        "min_cos_margin": min(r["ours_cos"] - r["ct_cos"] for r in with_ct),
    }


# ---------------------------------------------------------------------------------------------
# 1B scale run

SCALE_LAYERS, SCALE_DIM = 60, 4096  # 60 * 4096^2 = 1,006,632,960 parameters


def _write_fisher_file(path: str, model: nn.Module, seed: int) -> None:
    """A sensitivity file in Sensitivity.save's format, written one layer at a time (so the
    synthetic Fisher never exists whole in memory)."""
    from lightning_palettize.sensitivity import _FORMAT_VERSION, _HEADER_KEY

    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    meta = {"format_version": _FORMAT_VERSION, "nsamples": 1, "per_sample": False, "missing": []}
    header: dict[str, Any] = {"__metadata__": {_HEADER_KEY: json.dumps(meta)}}
    offset = 0
    for n in names:
        nbytes = params[n].numel() * 4
        header[n] = {
            "dtype": "F32",
            "shape": list(params[n].shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for n in names:
            with torch.no_grad():
                fisher = (params[n].detach() * torch.randn(params[n].shape, generator=g)).square_()
            f.write(fisher.numpy().tobytes())
            del fisher


def _scale1b_target(
    layers: int = SCALE_LAYERS,
    dim: int = SCALE_DIM,
    n_bits: int = 4,
    outlier_fraction: float = 0.0,
    side: str = "ours",
    tmpdir: str | None = None,
):
    """Fresh-process target: build the stack and its sensitivity file; the measured call
    palettizes the whole model in place."""
    model = nn.Sequential()
    for i in range(layers):
        layer = torch.nn.utils.skip_init(nn.Linear, dim, dim, bias=False)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            layer.weight.normal_(0.0, 0.02, generator=g)
        model.append(layer)
    model.eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tmp = tempfile.mkdtemp(prefix="lp_skm1b_", dir=tmpdir)
    path = os.path.join(tmp, "fisher.safetensors")
    t0 = time.perf_counter()
    _write_fisher_file(path, model, seed=1234)
    write_s = time.perf_counter() - t0
    module = {"n_bits": n_bits, "granularity": "per_tensor"}
    if side == "ours" and outlier_fraction:
        module["outlier_fraction"] = outlier_fraction
    config = {"module_name_configs": {str(i): dict(module) for i in range(layers)}}
    info = {"model_bytes": model_bytes, "params": model_bytes // 4, "fisher_write_s": write_s}

    def call() -> dict[str, Any]:
        try:
            if side == "ours":
                from lightning_palettize import SKMPalettizer

                pal = SKMPalettizer(model, config)
                pal.compress(sensitivity=path, inplace=True, progress=False)
                rows = pal.report().rows
                return {
                    "rel_error_mean": statistics.mean(r.rel_error for r in rows),
                    "outliers": sum(r.outliers for r in rows),
                    "max_unique_layer0": int(torch.unique(model[0].weight).numel()),
                }
            from lightning_palettize.sensitivity import Sensitivity, normalize_sensitivity

            sens = Sensitivity.load(path)
            ct_path = os.path.join(tmp, "ct.pt")
            torch.save({k: normalize_sensitivity(v) for k, v in sens.fisher.items()}, ct_path)
            del sens
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, _, secs = C.ct_skm(model, config=config, sensitivity_path=ct_path)
            return {"ct_kmeans_s": secs}
        finally:
            for f in os.listdir(tmp):
                os.remove(os.path.join(tmp, f))
            os.rmdir(tmp)

    return call, info


def main_scale1b(args: argparse.Namespace) -> int:
    layers = args.layers or SCALE_LAYERS
    side = "ct" if args.side == "coremltools" else "ours"
    print(
        f"# SKM scale run: {layers} x Linear({SCALE_DIM}, {SCALE_DIM}) fp32, {side}, 4 bits "
        f"per_tensor, outlier_fraction={args.outlier_fraction}, threads={H.resolve_threads()}",
        flush=True,
    )
    m = H.run_in_fresh_process(
        "bench.skm:_scale1b_target",
        {"layers": layers, "outlier_fraction": args.outlier_fraction, "side": side},
    )
    info, res = m["info"], m["result"] or {}
    model_bytes = info["model_bytes"]
    hwm = m.get("hwm_peak_rss_increase_bytes")
    peak_total = m["baseline_rss_bytes"] + m["peak_rss_increase_bytes"]
    row = {
        "side": side,
        "params": f"{info['params'] / 1e9:.3f}B",
        "model_GiB": model_bytes / 2**30,
        "compress_s": m["seconds"],
        "s_per_layer": m["seconds"] / layers,
        "baseline_rss_GiB": m["baseline_rss_bytes"] / 2**30,
        "peak_rss_GiB": peak_total / 2**30,
        "peak_over_model": peak_total / model_bytes,
        "increase_GiB": m["peak_rss_increase_bytes"] / 2**30,
        "increase_over_model": m["peak_rss_increase_bytes"] / model_bytes,
        "peak_source": m["peak_source"],
        "target": MEM_TARGET,
        "ok": peak_total / model_bytes <= MEM_TARGET,
        **res,
    }
    if hwm is None:
        row["note"] = "VmHWM unavailable: sampled peak"
    H.print_table([row])
    path = H.write_json(args.out, {"bench": "skm_scale1b", "row": row, "measure": m})
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    H.add_common_args(p, default_out="skm")
    p.add_argument("--bits", help="comma list of n_bits (default 2,3,4; quick 4)")
    p.add_argument("--granularity", help="comma list from per_tensor,g16")
    p.add_argument("--nsamples", type=int, help="calibration items (default 128; quick 32)")
    p.add_argument("--repeat", type=int, help="timed repeats of ours (median; default 3, quick 1)")
    p.add_argument(
        "--workers", type=int, default=2, help="also time ours with num_kmeans_workers=N (1: skip)"
    )
    p.add_argument("--no-theirs", action="store_true", help="skip coremltools (ours only)")
    p.add_argument("--no-outliers", action="store_true", help="skip the outlier_fraction row")
    p.add_argument("--scale1b", action="store_true", help="the 1.0B-parameter memory run")
    p.add_argument("--side", choices=["ours", "coremltools"], default="ours", help="--scale1b")
    p.add_argument("--layers", type=int, help="--scale1b: only the first N layers")
    p.add_argument(
        "--outlier-fraction", type=float, default=0.0, help="--scale1b: outlier_fraction"
    )
    args = p.parse_args(argv)
    H.set_threads(args.threads)
    if args.scale1b:
        if args.out == "skm":
            args.out = "skm_scale1b"
        return main_scale1b(args)
    return main_minilm(args)


if __name__ == "__main__":
    sys.exit(main())
