"""Timing, memory measurement and reporting helpers for the benchmarks under bench/.

Threads
-------
Every benchmark runs torch with **1 intra-op thread by default** (``--threads N`` or the env var
``LP_BENCH_THREADS=N`` override it; ``set_threads`` also exports the value so fresh worker
processes inherit it). The reference box has 2 vCPUs that other jobs share (load average ~6 was
seen). Under that contention OpenMP with 2 threads becomes erratic: its barrier waits for a
thread that has been descheduled, and a plain MLP step went from 15 ms to 310 ms. With one thread
the numbers are stable and ours-vs-coremltools comparisons are fair (both sides always run with the
same setting in the same process). Use ``--threads 2`` only on a quiet machine.

Memory
------
``run_in_fresh_process("module:function", kwargs)`` runs ``function(**kwargs)`` in a fresh
``python -c`` process. The function does its setup (imports, model build) and returns a zero-arg
callable: the *measured call*. The child then

1. runs ``gc.collect()`` and records the baseline RSS (after imports and model build),
2. resets the kernel's peak-RSS high-water mark (``/proc/self/clear_refs`` <- 5, Linux),
3. runs the measured call while a background thread samples RSS every ~5 ms,
4. reports ``peak_rss_increase_bytes`` = peak RSS during the call - baseline.

The peak comes from the kernel high-water mark (VmHWM) when the reset worked; otherwise from the
5 ms samples, cross-checked with ``ru_maxrss`` (which only helps when the call sets a new
lifetime peak). All three figures are returned so a reader can see they agree.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
THREADS_ENV = "LP_BENCH_THREADS"
DEFAULT_THREADS = 1

# ---------------------------------------------------------------------------------------------
# threads and CLI


def resolve_threads(threads: int | None = None) -> int:
    """``threads`` if given, else $LP_BENCH_THREADS, else 1."""
    if threads is None:
        env = os.environ.get(THREADS_ENV, "").strip()
        threads = int(env) if env else DEFAULT_THREADS
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return threads


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op (and, if still possible, inter-op) thread count; export it in
    $LP_BENCH_THREADS so fresh processes started by ``run_in_fresh_process`` match."""
    import torch

    n = resolve_threads(threads)
    torch.set_num_threads(n)
    # Fails once parallel work has started; intra-op threads are what matters here.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(n)
    os.environ[THREADS_ENV] = str(n)
    return n


def add_common_args(parser: argparse.ArgumentParser, default_out: str) -> argparse.ArgumentParser:
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"torch threads (default ${THREADS_ENV} or {DEFAULT_THREADS}; see bench/_harness.py)",
    )
    parser.add_argument(
        "--out",
        default=default_out,
        help="result name (bench/results/<out>.json) or a path ending in .json",
    )
    parser.add_argument("--quick", action="store_true", help="a small subset, for smoke tests")
    return parser


# ---------------------------------------------------------------------------------------------
# timing


def timed(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times; return (median s, all s)."""
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def time_once(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds) of a single call."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# memory

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS high-water mark (Linux >= 4.0). True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def _ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class RSSSampler:
    """Background thread sampling RSS every ``interval`` seconds; ``peak`` is the max seen."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def measure_call(call: Callable[[], Any], interval: float = 0.005) -> tuple[Any, dict[str, Any]]:
    """Run ``call`` once, measuring wall time and peak RSS increase over the RSS just before it.

    Meaningful only in a process that does nothing else meanwhile; prefer
    ``run_in_fresh_process`` so that memory freed by earlier work (kept by the allocator) does
    not hide the call's own peak.
    """
    gc.collect()
    baseline = rss_bytes()
    ru_before = _ru_maxrss_bytes()
    hwm_ok = _reset_hwm()
    with RSSSampler(interval) as sampler:
        t0 = time.perf_counter()
        out = call()
        seconds = time.perf_counter() - t0
    ru_after = _ru_maxrss_bytes()
    hwm_kib = _status_kib("VmHWM") if hwm_ok else None
    hwm = hwm_kib * 1024 if hwm_kib is not None else None
    sampled_inc = max(0, sampler.peak - baseline)
    # ru_maxrss is a lifetime peak: it only says something about this call if the call raised it.
    ru_inc = max(0, ru_after - baseline) if ru_after > ru_before else None
    if hwm is not None:
        peak_inc, source = max(0, hwm - baseline), "VmHWM"
    elif ru_inc is not None:
        peak_inc, source = max(ru_inc, sampled_inc), "ru_maxrss"
    else:
        peak_inc, source = sampled_inc, "sampled"
    stats = {
        "seconds": seconds,
        "baseline_rss_bytes": baseline,
        "peak_rss_increase_bytes": peak_inc,
        "peak_source": source,
        "sampled_peak_rss_increase_bytes": sampled_inc,
        "hwm_peak_rss_increase_bytes": None if hwm is None else max(0, hwm - baseline),
        "ru_maxrss_increase_bytes": ru_inc,
        "ru_maxrss_before_bytes": ru_before,
        "ru_maxrss_after_bytes": ru_after,
        "rss_samples": sampler.samples,
        "final_rss_bytes": rss_bytes(),
    }
    return out, stats


def _resolve(fn_path: str) -> Callable[..., Any]:
    module, _, attr = fn_path.partition(":")
    if not module or not attr:
        raise ValueError(f"fn_path must look like 'package.module:function', got {fn_path!r}")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _child_main(spec_path: str, out_path: str) -> None:
    """Entry point of the fresh process started by ``run_in_fresh_process``."""
    import traceback

    with open(spec_path) as f:
        spec = json.load(f)
    result: dict[str, Any]
    try:
        threads = set_threads(spec.get("threads"))
        t0 = time.perf_counter()
        setup = _resolve(spec["fn_path"])(**spec.get("kwargs", {}))
        info: dict[str, Any] = {}
        if isinstance(setup, tuple):
            setup, info = setup
        if not callable(setup):
            raise TypeError(f"{spec['fn_path']} must return a zero-arg callable (measured call)")
        setup_s = time.perf_counter() - t0
        out, stats = measure_call(setup, spec.get("interval", 0.005))
        result = {"ok": True, "threads": threads, "setup_seconds": setup_s, **stats}
        result["info"] = info
        result["result"] = out if isinstance(out, dict) else None
        del out
    except BaseException as e:  # report, do not hang the parent
        result = {
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
        }
    with open(out_path, "w") as f:
        json.dump(result, f, default=_json_default)


def run_in_fresh_process(
    fn_path: str,
    kwargs: dict[str, Any] | None = None,
    threads: int | None = None,
    timeout: float | None = None,
    interval: float = 0.005,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``fn_path`` ("package.module:function") in a fresh ``python -c`` process and return
    its measurements (see the module docstring).

    ``function(**kwargs)`` must build everything it needs and return the measured call, a
    zero-arg callable (or ``(callable, info_dict)``). If the call returns a dict it is passed back
    under ``"result"``. Keys of the returned dict: ``seconds`` (the measured call),
    ``setup_seconds``, ``peak_rss_increase_bytes``, ``baseline_rss_bytes``, the cross-checks
    (``sampled_...``, ``hwm_...``, ``ru_maxrss_...``), ``threads``, ``info``, ``result``.
    Raises RuntimeError (with the child's traceback) if the function failed.
    """
    with tempfile.TemporaryDirectory(prefix="lp_bench_") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(
                {
                    "fn_path": fn_path,
                    "kwargs": kwargs or {},
                    "threads": resolve_threads(threads),
                    "interval": interval,
                },
                f,
            )
        child_env = dict(os.environ)
        child_env.update(env or {})
        child_env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [child_env.get("PYTHONPATH")])]
        )
        code = "import sys; from bench._harness import _child_main as m; m(*sys.argv[1:3])"
        proc = subprocess.run(
            [sys.executable, "-c", code, spec_path, out_path],
            cwd=str(REPO_ROOT),
            env=child_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if not os.path.exists(out_path):
            raise RuntimeError(
                f"fresh process for {fn_path} exited with {proc.returncode} and no result "
                f"(killed for memory?)\nstderr tail:\n{proc.stderr[-3000:]}"
            )
        with open(out_path) as f:
            result = json.load(f)
    if not result.get("ok"):
        raise RuntimeError(f"{fn_path} failed in a fresh process:\n{result.get('traceback')}")
    result.pop("ok")
    result["returncode"] = proc.returncode
    return result


# ---------------------------------------------------------------------------------------------
# plain training steps (the baseline DKM is compared with)


def train_steps(
    model: Any,
    batches: Sequence[Any],
    optimizer_fn: Callable[[Any], Any],
    n_steps: int,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    after_step: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """``n_steps`` optimizer steps (cycling through ``batches``), each timed separately.

    ``loss_fn(model, batch)`` defaults to cross-entropy of ``model(x)`` for ``batch = (x, y)``.
    ``after_step`` runs inside the timed step (e.g. ``palettizer.step``). Returns
    ``first_step_s``, ``steady_step_s`` (median of steps 2..n), ``step_s`` (all) and ``losses``.
    """
    import torch

    if loss_fn is None:

        def loss_fn(m, batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(m(x), y)

    model.train()
    opt = optimizer_fn(model)
    step_s, losses = [], []
    for i in range(n_steps):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
        step_s.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return {
        "first_step_s": step_s[0] if step_s else None,
        "steady_step_s": statistics.median(step_s[1:]) if len(step_s) > 1 else None,
        "step_s": step_s,
        "losses": losses,
    }


# ---------------------------------------------------------------------------------------------
# reporting


def _fmt(v: Any, floatfmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # NaN
            return "nan"
        return format(v, floatfmt)
    return str(v)


def markdown_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] | None = None,
    floatfmt: str = ".4g",
    headers: dict[str, str] | None = None,
) -> str:
    """A GitHub-markdown table of ``rows`` (dicts); ``columns`` picks and orders the keys."""
    if columns is None:
        columns = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)
    headers = headers or {}
    head = [headers.get(c, c) for c in columns]
    body = [[_fmt(r.get(c), floatfmt) for c in columns] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(b, widths)) + " |" for b in body]
    return "\n".join(lines)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, **kw) -> None:
    print(markdown_table(rows, columns, **kw), flush=True)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cpu_model() -> str | None:
    """The CPU's model name and family / model numbers (Linux), else None."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break
    if not fields:
        return None
    name, family, model = (fields.get(k, "?") for k in ("model name", "cpu family", "model"))
    return f"{name} (family {family}, model {model})"


def environment() -> dict[str, Any]:
    """Machine / library facts recorded next to every result."""
    import torch

    info: dict[str, Any] = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        # the vector ISA torch's own kernels (conv, matmul reductions) run with: a different
        # one rounds differently, so training figures may move with it
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": _cpu_model(),
    }
    with contextlib.suppress(OSError):
        info["loadavg"] = os.getloadavg()
    try:
        from importlib.metadata import version

        info["coremltools"] = version("coremltools")
    except Exception:
        info["coremltools"] = None
    return info


def _json_default(o: Any) -> Any:
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, torch.dtype):
            return str(o)
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return repr(o)


def results_path(out: str) -> Path:
    p = Path(out)
    if p.suffix == ".json":
        return p
    return RESULTS_DIR / f"{out}.json"


def write_json(name: str, payload: dict[str, Any], with_env: bool = True) -> Path:
    """Write ``payload`` (plus ``environment()`` under "env") to bench/results/<name>.json, or to
    ``name`` itself when it ends in .json. Returns the path."""
    path = results_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(payload)
    if with_env:
        data.setdefault("env", environment())
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=_json_default)
        f.write("\n")
    return path


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def _alloc_probe(n_bytes: int = 64 << 20) -> Callable[[], dict[str, Any]]:
    """Self-test target for ``run_in_fresh_process``: the measured call allocates and touches
    ``n_bytes`` (then frees them), so the reported peak increase should be about ``n_bytes``."""
    import torch

    def call() -> dict[str, Any]:
        t = torch.ones(n_bytes // 4, dtype=torch.float32)
        s = float(t[:: 1 << 10].sum())
        del t
        return {"touched": s}

    return call, {"n_bytes": n_bytes}
