"""Where a profiled GPU step's time goes: a torch.profiler chrome trace summed up.

A DKM step on the GPU is bound by the host launching work, by the device running it, or by
work that only starts once the host is done (the round's backward runs after the last weight
gradient, with nothing left to overlap). The profiler's tables sum time per op; this reads the
timeline (bench/dkm_gpu.py --profile writes one per variant, trace_<name>.json.gz):

- step_ms: first host op to the last device op's end;
- gpu_busy_ms / gpu_idle_ms: the union of device ops, and the device's idle time between its
  first and last op (waiting for the host);
- host_issue_ms: first host op to the end of the host's last launch; after_host_ms: what runs
  on the device after that launch (the step's tail, which host savings cannot shorten);
- gaps: the longest idle stretches, each with the kernel that ends it and the host op that
  launched that kernel;
- marks: per kernel-name pattern, its first start and last end (ms from the step's start)
  and its summed device time.

Run:  python bench/trace_gaps.py TRACE.json[.gz] [...]
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
from pathlib import Path

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATS = {"cpu_op", "cuda_runtime", "cuda_driver"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}
MARKS = {
    "round_forward": r"_fwd_loop|_fwd_pass",
    "round_backward": r"_bwd_loop|_bwd_pass",
    "element_passes": r"_elems",
    "index_ops": r"indexFunc|index_elementwise|scatter_gather",
    "optimizer": r"multi_tensor|adam",
}


def load(path: str | Path) -> list[dict]:
    """The trace's complete ("X") events."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _enclosing(ops: list[dict], starts: list[float], at: float, tid) -> str:
    """The innermost host op of thread ``tid`` running at time ``at``."""
    best = None
    for i in range(bisect.bisect_right(starts, at) - 1, -1, -1):
        e = ops[i]
        inside = e["ts"] + e["dur"] >= at and e.get("tid") == tid
        if inside and (best is None or e["dur"] < best["dur"]):
            best = e
        if at - e["ts"] > 1e6:  # (no host op lasts a second)
            break
    return "" if best is None else best["name"]


def summary(path: str | Path, top: int = 8, min_gap_us: float = 20.0) -> dict:
    """The figures described in the module docstring, in milliseconds."""
    events = load(path)
    device = [e for e in events if e.get("cat") in DEVICE_CATS]
    host = [e for e in events if e.get("cat") in HOST_CATS]
    if not device or not host:
        return {"trace_error": "no device or no host events"}
    t0 = min(e["ts"] for e in host)
    end = max(e["ts"] + e["dur"] for e in device)
    busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in device])
    launches = [e for e in host if e.get("cat") in LAUNCH_CATS]
    host_end = max(e["ts"] + e["dur"] for e in launches) if launches else t0
    by_corr = {e["args"]["correlation"]: e for e in launches if "correlation" in e.get("args", {})}
    ops = sorted([e for e in host if e.get("cat") == "cpu_op"], key=lambda e: e["ts"])
    starts = [e["ts"] for e in ops]
    first_at = {}
    for e in device:
        first_at.setdefault(e["ts"], e)
    gaps = []
    for (_, b), (a2, _) in zip(busy, busy[1:]):
        if a2 - b >= min_gap_us:
            nxt = first_at.get(a2)
            launch = by_corr.get(nxt.get("args", {}).get("correlation")) if nxt else None
            gaps.append(
                {
                    "at_ms": round((b - t0) / 1e3, 3),
                    "ms": round((a2 - b) / 1e3, 3),
                    "next_kernel": (nxt or {}).get("name", "")[:80],
                    "launched_in": _enclosing(ops, starts, launch["ts"], launch.get("tid"))[:80]
                    if launch
                    else "",
                }
            )
    gaps.sort(key=lambda g: -g["ms"])
    marks = {}
    for label, pattern in MARKS.items():
        hit = [e for e in device if re.search(pattern, e["name"], re.I)]
        if hit:
            marks[label] = {
                "first_ms": round((min(e["ts"] for e in hit) - t0) / 1e3, 3),
                "last_end_ms": round((max(e["ts"] + e["dur"] for e in hit) - t0) / 1e3, 3),
                "device_ms": round(sum(e["dur"] for e in hit) / 1e3, 3),
            }
    busy_us = sum(b - a for a, b in busy)
    return {
        "step_ms": round((end - t0) / 1e3, 3),
        "gpu_busy_ms": round(busy_us / 1e3, 3),
        "gpu_idle_ms": round((busy[-1][1] - busy[0][0] - busy_us) / 1e3, 3),
        "host_issue_ms": round((host_end - t0) / 1e3, 3),
        "after_host_ms": round((end - host_end) / 1e3, 3),
        "gaps": gaps[:top],
        "marks": marks,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("traces", nargs="+")
    args = p.parse_args()
    print(json.dumps({str(t): summary(t) for t in args.traces}, indent=1))


if __name__ == "__main__":
    main()
