"""DKM benchmark: ours vs plain training vs coremltools 9.0 DKMPalettizer, side by side.

Sections (each can be selected with --sections):
  speed     first step after prepare (includes the centroid init) and the steady step, for the
            MLP (batch 64), the digits conv net, all-MiniLM-L6-v2 fine-tuning (batch 16, seq 64)
            and one 4096x4096 Linear; n_bits 2 and 4; per_tensor and group_size 16. Plain
            training is timed in the same process, interleaved.
  ct        coremltools' DKM on the MLP (4 bits, per_tensor): first and steady step.
  memory    peak RSS increase of a DKM training run vs a plain one, each in a fresh process.
  accuracy  digits CNN fine-tuned from an fp32 checkpoint with DKM for a fixed budget at 2, 3
            and 4 bits: our DKM vs coremltools' DKM vs our PostTrainingPalettizer.

Run:  python bench/dkm.py [--quick] [--sections speed,ct,memory,accuracy] [--threads 1]
      [--steps 8] [--workloads mlp,minilm]
Writes bench/results/<out>.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _workloads as W  # noqa: E402
from bench._harness import (  # noqa: E402
    add_common_args,
    print_table,
    run_in_fresh_process,
    set_threads,
    train_steps,
    write_json,
)
from bench.dkm_window import _cfg as dkm_window_cfg  # noqa: E402
from lightning_palettize import DKMPalettizer, PostTrainingPalettizer  # noqa: E402
from lightning_palettize import soft_kmeans as sk  # noqa: E402


@contextlib.contextmanager
def recorded_paths(out: dict):
    """Records in ``out["paths"]`` which code paths our DKM took inside the block: compiled
    kernels (and their AVX2 variant) or the torch code, the engine of each soft k-means call
    (grid / 16-bit code table / per element), and how many weight gradients were written in
    place, so that an outlier figure says what ran differently."""
    kinds: dict[str, int] = {}
    verdicts = [0, 0]
    real_kind, real_over = sk._scalar_kind, sk._overwritable

    def kind(*args):
        k = real_kind(*args)
        name = "grid" if isinstance(k, sk._GridSpec) else str(k)
        kinds[name] = kinds.get(name, 0) + 1
        return k

    def over(*args):
        ok = real_over(*args)
        verdicts[bool(ok)] += 1
        return ok

    sk._scalar_kind, sk._overwritable = kind, over
    try:
        yield
    finally:
        sk._scalar_kind, sk._overwritable = real_kind, real_over
        compiled = sk._dkm_cpu is not None and sk._USE_C
        simd = compiled and bool(sk._dkm_cpu.simd(sk._c_cfg(dkm_window_cfg(1e-4), 16)))
        engine = "compiled AVX2" if simd else ("compiled portable" if compiled else "torch")
        calls = " ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        out["paths"] = (
            f"{engine}; {calls or 'no scalar calls'}; in place {verdicts[1]}/{sum(verdicts)}"
        )


# ---------------------------------------------------------------------------------------------
# workloads: (model, batches, loss_fn, optimizer factory)


def _ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def workload(name: str, steps: int):
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        model = W.mlp().train()
        batches = [
            (torch.randn(64, 512, generator=g), torch.randint(0, 10, (64,), generator=g))
            for _ in range(steps)
        ]
        return model, batches, _ce, lambda m: torch.optim.SGD(m.parameters(), lr=0.01)
    if name == "conv":
        data = W.digits()
        model = W.conv_net().train()
        batches = W.digits_batches(data.x_train, data.y_train, 64)[:steps]
        return model, batches, _ce, lambda m: torch.optim.SGD(m.parameters(), lr=0.01)
    if name == "minilm":
        model, tok = W.minilm()
        model.train()
        batches = W.sentence_pair_batches(16)
        loss = W.minilm_loss_fn(tok, max_length=64)
        return model, batches, loss, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-5)
    if name == "linear4096":
        model = W.big_linear().train()
        batches = [
            (torch.randn(64, 4096, generator=g), torch.randn(64, 4096, generator=g))
            for _ in range(2)
        ]
        return model, batches, _mse, lambda m: torch.optim.SGD(m.parameters(), lr=0.01)
    raise ValueError(name)


def dkm_config(name: str, model: nn.Module, n_bits: int, gran: str) -> dict:
    g = {"n_bits": n_bits, "weight_threshold": 0}
    if gran == "g16":
        g.update(granularity="per_grouped_channel", group_size=16)
    cfg: dict = {"global_config": None, "module_type_configs": {}, "module_name_configs": {}}
    if name == "minilm":
        names = W.minilm_linear_names(model)
        cfg["module_name_configs"] = {n.replace(".", r"\."): dict(g) for n in names}
        cfg["global_config"] = None
        cfg["module_type_configs"] = {"Embedding": None, "LayerNorm": None}
        # only the encoder Linears; everything else unselected
        cfg["module_name_configs"][".*"] = None
        return cfg
    cfg["global_config"] = g
    if gran == "g16":
        # layers whose output channels are not a multiple of 16 stay per-tensor
        for mname, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.shape[0] % 16:
                cfg["module_name_configs"][mname.replace(".", r"\.")] = {
                    "n_bits": n_bits,
                    "weight_threshold": 0,
                }
    return cfg


def _one_step(model, opt, batch, loss_fn, after=None) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    opt.step()
    if after is not None:
        after()
    return time.perf_counter() - t0


def bench_speed(names, bits, grans, steps):
    rows = []
    for name in names:
        for n_bits in bits:
            for gran in grans:
                base, batches, loss_fn, make_opt = workload(name, steps)
                plain = copy.deepcopy(base)
                p_opt = make_opt(plain)
                for i in range(2):  # warm-up
                    _one_step(plain, p_opt, batches[i % len(batches)], loss_fn)
                model = copy.deepcopy(base)
                cfg = dkm_config(name, model, n_bits, gran)
                t0 = time.perf_counter()
                pal = DKMPalettizer(model, cfg)
                prepared = pal.prepare(inplace=True)
                t_prepare = time.perf_counter() - t0
                d_opt = make_opt(prepared)
                first = _one_step(prepared, d_opt, batches[0], loss_fn, pal.step)
                # interleave plain and DKM steps so both see the same machine load
                p_times, d_times = [], []
                for i in range(steps):
                    batch = batches[i % len(batches)]
                    p_times.append(_one_step(plain, p_opt, batch, loss_fn))
                    d_times.append(_one_step(prepared, d_opt, batch, loss_fn, pal.step))
                plain_s, dkm_s = statistics.median(p_times), statistics.median(d_times)
                row = {
                    "workload": name,
                    "n_bits": n_bits,
                    "gran": gran,
                    "plain_ms": 1e3 * plain_s,
                    "prepare_s": t_prepare,
                    "first_step_s": first,
                    "first_incl_prepare_s": first + t_prepare,
                    "dkm_ms": 1e3 * dkm_s,
                    "ratio": dkm_s / plain_s,
                }
                print(row, flush=True)
                rows.append(row)
    return rows


def bench_coremltools(steps):
    from bench._coremltools import ct_dkm_steps

    model, batches, loss_fn, make_opt = workload("mlp", steps)
    p_times = train_steps(copy.deepcopy(model), batches, make_opt, steps, loss_fn)["step_s"]
    cfg = {"global_config": {"n_bits": 4, "weight_threshold": 0}}
    t0 = time.perf_counter()
    ct = ct_dkm_steps(copy.deepcopy(model), cfg, batches, make_opt, steps, loss_fn)
    ct_total = time.perf_counter() - t0
    ours_model = copy.deepcopy(model)
    t0 = time.perf_counter()
    pal = DKMPalettizer(ours_model, cfg)
    prepared = pal.prepare(inplace=True)
    prep = time.perf_counter() - t0
    o_times = train_steps(prepared, batches, make_opt, steps, loss_fn, pal.step)["step_s"]
    row = {
        "workload": "mlp",
        "n_bits": 4,
        "plain_ms": 1e3 * statistics.median(p_times[1:]),
        "ct_first_s": ct["first_step_s"] + ct["prepare_s"],
        "ct_steady_s": ct["steady_step_s"],
        "ours_first_s": o_times[0] + prep,
        "ours_steady_ms": 1e3 * statistics.median(o_times[1:]),
        "steady_speedup_vs_ct": ct["steady_step_s"] / statistics.median(o_times[1:]),
        "ct_total_s": ct_total,
    }
    print(row, flush=True)
    return [row]


# ---------------------------------------------------------------------------------------------
# memory: fresh processes


def mem_run(name: str, dkm: bool, n_bits: int = 4, steps: int = 3):
    """Fresh-process entry point: builds the workload, returns the measured training call."""
    model, batches, loss_fn, make_opt = workload(name, steps)
    pal = None
    if dkm:
        pal = DKMPalettizer(model, dkm_config(name, model, n_bits, "tensor"))
        model = pal.prepare(inplace=True)

    def call():
        train_steps(model, batches, make_opt, steps, loss_fn, pal.step if pal else None)
        return {}

    return call


def bench_memory(names):
    rows = []
    for name in names:
        plain = run_in_fresh_process("bench.dkm:mem_run", {"name": name, "dkm": False})
        ours = run_in_fresh_process("bench.dkm:mem_run", {"name": name, "dkm": True})
        row = {
            "workload": name,
            "plain_peak_MiB": plain["peak_rss_increase_bytes"] / 2**20,
            "dkm_peak_MiB": ours["peak_rss_increase_bytes"] / 2**20,
            "ratio": ours["peak_rss_increase_bytes"] / max(1, plain["peak_rss_increase_bytes"]),
        }
        print(row, flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# accuracy on digits


def bench_accuracy(bits, budget, with_ct, ct_seeds=1, order_seeds=1):
    """Digits CNN accuracy after DKM fine-tuning, ours and coremltools', on the same batches.

    ``ct_seeds`` > 1: coremltools once per global seed 0..N-1 (its centroid init draws from
    the global RNGs; ours has none), its median recorded. ``order_seeds`` > 1: both sides once
    per training batch order (seeds SEED..SEED+N-1, coremltools with global seed i on order i),
    each side's median recorded with every run and the per-order comparison: at one test image
    (1/360) of resolution, one run per side is not enough to rank them.
    """
    if ct_seeds > 1 and order_seeds > 1:
        raise ValueError("bench_accuracy: use either ct_seeds or order_seeds, not both")
    data = W.digits()
    base = W.train_digits_cnn()
    fp32 = W.accuracy(base, data.x_test, data.y_test)
    orders = [W.SEED + i for i in range(order_seeds)]
    batch_sets = {
        o: W.digits_batches(data.x_train, data.y_train, 64, seed=o, epochs=50)[:budget]
        for o in orders
    }

    def make_opt(m):
        return torch.optim.Adam(m.parameters(), lr=1e-3)

    rows = []
    for n_bits in bits:
        cfg = {"global_config": {"n_bits": n_bits, "weight_threshold": 0}}
        row = {"n_bits": n_bits, "fp32_acc": fp32, "steps": budget}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ptp_cfg = {"global_config": {"n_bits": n_bits}}
            ptp = PostTrainingPalettizer(base, ptp_cfg).compress(progress=False)
        row["ours_ptp_acc"] = W.accuracy(ptp, data.x_test, data.y_test)
        ours: dict[str, list] = {"accs": [], "losses": [], "secs": []}
        theirs: dict[str, list] = {"accs": [], "losses": [], "secs": []}
        for i, order in enumerate(orders):
            batches = batch_sets[order]
            model = copy.deepcopy(base)
            pal = DKMPalettizer(model, cfg)
            prepared = pal.prepare(inplace=True)
            t0 = time.perf_counter()
            with recorded_paths(row):
                train_steps(prepared, batches, make_opt, budget, _ce, pal.step)
            ours["secs"].append(time.perf_counter() - t0)
            final = pal.finalize()
            ours["accs"].append(W.accuracy(final, data.x_test, data.y_test))
            ours["losses"].append(W.eval_loss(final, data.x_test, data.y_test))
            if not with_ct:
                continue
            from bench._coremltools import ct_dkm_steps

            seeds = range(ct_seeds) if ct_seeds > 1 else [i] if order_seeds > 1 else [None]
            for seed in seeds:
                if seed is not None:  # its centroid init draws from the global RNGs
                    L.seed_everything(seed, verbose=False)
                t0 = time.perf_counter()
                res = ct_dkm_steps(copy.deepcopy(base), cfg, batches, make_opt, budget, _ce, True)
                theirs["secs"].append(time.perf_counter() - t0)
                theirs["accs"].append(W.accuracy(res["model"], data.x_test, data.y_test))
                theirs["losses"].append(W.eval_loss(res["model"], data.x_test, data.y_test))
        for side, runs in (("ours", ours), ("ct", theirs)):
            if not runs["accs"]:
                continue
            # (the one run's figures with neither option)
            row[f"{side}_dkm_s"] = statistics.mean(runs["secs"])
            row[f"{side}_dkm_acc"] = statistics.median(runs["accs"])
            row[f"{side}_dkm_loss"] = statistics.median(runs["losses"])
            if len(runs["accs"]) > 1:
                row[f"{side}_dkm_accs"], row[f"{side}_dkm_losses"] = runs["accs"], runs["losses"]
        if order_seeds > 1 and theirs["accs"]:
            pairs = list(zip(ours["accs"], theirs["accs"]))
            row["orders"] = orders
            row["ours_vs_ct"] = {
                "ahead": sum(a > b for a, b in pairs),
                "level": sum(a == b for a, b in pairs),
                "behind": sum(a < b for a, b in pairs),
                "lower_loss": sum(a < b for a, b in zip(ours["losses"], theirs["losses"])),
            }
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, "dkm")
    parser.add_argument("--sections", default="speed,ct,memory,accuracy")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--workloads", default=None, help="speed section: comma-separated subset of the workloads"
    )
    parser.add_argument("--budget", type=int, default=150, help="DKM steps for the accuracy run")
    parser.add_argument(
        "--ct-seeds",
        type=int,
        default=1,
        help="accuracy: run coremltools' DKM with global seeds 0..N-1 and record each (its "
        "centroid init draws from the global RNGs; ours has no randomness); ct_dkm_acc is then "
        "their median",
    )
    parser.add_argument(
        "--order-seeds",
        type=int,
        default=1,
        help="accuracy: run both sides once per training batch order (N orders; coremltools "
        "with global seed i on order i) and record each run, the medians and the per-order "
        "comparison",
    )
    args = parser.parse_args()
    threads = set_threads(args.threads)
    sections = args.sections.split(",")
    names = ["mlp", "conv"] if args.quick else ["mlp", "conv", "minilm", "linear4096"]
    if args.workloads:
        names = args.workloads.split(",")
    bits = [4] if args.quick else [2, 4]
    grans = ["tensor"] if args.quick else ["tensor", "g16"]
    out: dict = {"threads": threads}
    if "speed" in sections:
        out["speed"] = bench_speed(names, bits, grans, args.steps)
        print_table(out["speed"])
    if "ct" in sections:
        out["coremltools"] = bench_coremltools(4 if args.quick else 6)
        print_table(out["coremltools"])
    if "memory" in sections:
        out["memory"] = bench_memory(["mlp", "linear4096"] if not args.quick else ["mlp"])
        print_table(out["memory"])
    if "accuracy" in sections:
        out["accuracy"] = bench_accuracy(
            [4] if args.quick else [2, 3, 4],
            40 if args.quick else args.budget,
            True,
            args.ct_seeds,
            args.order_seeds,
        )
        runs = ("ct_dkm_accs", "ct_dkm_losses", "ours_dkm_accs", "ours_dkm_losses")
        skip = ("paths", "orders", "ours_vs_ct", *runs)
        print_table(out["accuracy"], [k for k in out["accuracy"][0] if k not in skip])
        for row in out["accuracy"]:
            print(f"  {row['n_bits']} bits, our DKM: {row['paths']}")
            for side, name in (("ours", "ours"), ("ct", "coremltools")):
                if f"{side}_dkm_accs" in row:
                    accs, losses = row[f"{side}_dkm_accs"], row[f"{side}_dkm_losses"]
                    print(f"  {row['n_bits']} bits, {name} by run: acc {accs}, loss {losses}")
            if "ours_vs_ct" in row:
                print(f"  {row['n_bits']} bits, ours vs coremltools per order: {row['ours_vs_ct']}")
    print("wrote", write_json(args.out, out))


if __name__ == "__main__":
    main()
