"""What a DKM step asks of the host, counted on the CPU: the GPU step is host-bound (bench/
dkm_gpu.py), so the torch ops a step dispatches are the cost a GPU-less session can measure.

A 12-layer LLaMA-shaped model of width 64 (85 Linear, like the 134M one of dkm_gpu.py) takes
plain and DKM training steps (4 bits, every Linear, the table engine) with the soft k-means in
the device layout, the way CUDA runs it; a TorchDispatchMode counts the ops of the forward and
of the backward. Variants: "triton" (the fused Triton kernels, run in Triton's interpreter
here; the kernels' own work is not counted: on a GPU it is two launches per width bucket),
"triton_full" (the same with every group's code table all 65,536 codes, as the 134M model's
are; the kernels stubbed), "triton_full_elems" (and the element passes in the Triton element
kernels, run in the interpreter, not counted: four launches a round), "..._chunks4" /
"..._chunks8" (that in 4 / 8 rounds per step, DKM's _ROUND_CHUNKS: what chunks cost the host)
and "torchloop" (the per-code passes in torch ops). "launching"
excludes views and allocations. One more step is run under ``sys.setprofile``: its Python
function calls and the builtins called from Python ("py_calls", "c_calls"; the interpreter
runs no Triton kernel meanwhile).

Run:  TRITON_INTERPRET=1 python bench/dkm_host_ops.py [--out results.json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_palettize import DKMPalettizer  # noqa: E402
from lightning_palettize import soft_kmeans as sk  # noqa: E402
from lightning_palettize.palettizers import dkm as dkm_mod  # noqa: E402

# ops that launch no kernel on a GPU
NO_LAUNCH = {
    "view", "slice", "expand", "detach", "unsqueeze", "alias", "select", "t", "transpose",
    "_unsafe_view", "lift_fresh", "split_with_sizes", "squeeze", "permute", "as_strided",
    "_reshape_alias", "empty", "new_empty", "empty_like", "empty_strided",
}  # fmt: skip


_NO_MODE = contextlib.nullcontext()  # (reusable: it holds no state)


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _Stub:
    """A stand-in for a kernel that fills its outputs with torch copies (the input table as the
    soft weight, the starting centroids as every iteration's): the host's work around a launch
    without the interpreter's minutes on full tables (their shapes do not depend on the
    values, so the ops counted are the real kernels')."""

    def __init__(self, forward: bool) -> None:
        self.forward = forward

    def __getitem__(self, grid):
        def run(*a, **k):
            if not self.forward:
                return  # (h, r come zeroed)
            v, _m, c, c_hist, raw_hist, mass_hist, last_it, prev_c, last_c, y = a[:10]
            for t in (c_hist, raw_hist):
                t.copy_(c.expand_as(t))
            mass_hist.zero_()
            last_it.fill_(c_hist.shape[0] - 1)
            prev_c.copy_(c)
            last_c.copy_(c)
            y.copy_(v)

        return run


class _Uncounted:
    """A kernel whose launches run outside the count (the interpreter's own torch calls)."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*a, **k):
            profiler = sys.getprofile()
            sys.setprofile(None)  # (nor the interpreter's Python calls)
            try:
                with _disable_current_modes():
                    return launch(*a, **k)
            finally:
                sys.setprofile(profiler)

        return run


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=12,
        intermediate_size=128,
        vocab_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).train()


def count(dkm: bool, steps: int = 3) -> dict:
    """Ops of the forward and backward of the last of ``steps`` training steps."""
    model = _model()
    pal = None
    if dkm:
        cfg = {"module_type_configs": {"Linear": {"n_bits": 4, "weight_threshold": 0}}}
        pal = DKMPalettizer(model, cfg)
        model = pal.prepare(inplace=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))

    def train_step(fwd=_NO_MODE, bwd=_NO_MODE) -> None:
        opt.zero_grad(set_to_none=True)
        with fwd, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        with bwd:
            loss.backward()
        opt.step()
        if pal is not None:
            pal.step()

    res = {}
    for _ in range(steps):
        fwd, bwd = _Count(), _Count()
        train_step(fwd, bwd)
    for name, c in (("fwd", fwd.ops), ("bwd", bwd.ops)):  # (the last step's)
        res[name] = sum(c.values())
        res[f"{name}_launching"] = sum(v for k, v in c.items() if k not in NO_LAUNCH)
    # one more step, its Python-level calls counted (Python functions and builtins called
    # from Python: the host's interpreter work besides the dispatcher's; the step's own
    # few calls, the same in every variant, cancel out of the extras)
    calls = collections.Counter()

    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            calls[event] += 1

    sys.setprofile(profile)
    try:
        train_step()
    finally:
        sys.setprofile(None)
    res["py_calls"], res["c_calls"] = calls["call"], calls["c_call"]
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/dkm_host_ops.json")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        p.error("set TRITON_INTERPRET=1 (the Triton kernels run in the interpreter here)")
    torch.set_num_threads(1)
    # the device layout (as on CUDA) and the table engine at this width, on the CPU
    sk._host_layout = lambda device: False
    sk._sync_free = lambda device: True
    sk._TABLE_MIN_GROUP = {"cpu": 1}
    mod = sk._triton()
    kernels = mod._fwd_loop, mod._bwd_loop
    stubs = _Stub(True), _Stub(False)
    out = {"plain": count(False)}
    # "triton_full": the code tables the 134M model gets (85 x 65,536 codes for its 134M
    # weights: no compaction, no host read); this model's small weights would keep compacted
    # ones, so the fill limit is lifted, and the kernels are stubbed (see _Stub)
    variants = {
        "torchloop": (frozenset(), 1.0, kernels),
        "triton": (frozenset({"cpu"}), 1.0, kernels),
        "triton_full": (frozenset({"cpu"}), float("inf"), stubs),
        # and the element passes in the Triton element kernels (four launches a round, not
        # counted here, plus a copy of the gradients' address table in backward)
        "triton_full_elems": (frozenset({"cpu"}), float("inf"), stubs),
        # and each round in 4 / 8 chunks of layers (each chunk's fixed launches)
        "triton_full_elems_chunks4": (frozenset({"cpu"}), float("inf"), stubs),
        "triton_full_elems_chunks8": (frozenset({"cpu"}), float("inf"), stubs),
    }
    elems = mod._elems
    mod._elems = _Uncounted(elems)
    for name, (devices, fill, (fwd, bwd)) in variants.items():
        sk._TRITON_DEVICES, sk._FULL_TABLES_FILL = devices, fill
        sk._TRITON_ELEM_DEVICES = frozenset({"cpu"}) if "_elems" in name else frozenset()
        dkm_mod._ROUND_CHUNKS = {"cpu": int(name.partition("_chunks")[2] or 1)}
        mod._fwd_loop, mod._bwd_loop = _Uncounted(fwd), _Uncounted(bwd)
        out[name] = count(True)
    plain = out["plain"]
    for name in variants:
        extra = {k: out[name][k] - plain[k] for k in plain}
        out[f"{name}_extra"] = extra
        print(
            f"{name}: forward {out[name]['fwd']} ops ({out[name]['fwd_launching']} launching), "
            f"backward {out[name]['bwd']} ({out[name]['bwd_launching']}); over plain: "
            f"+{extra['fwd'] + extra['bwd']} ops, "
            f"+{extra['fwd_launching'] + extra['bwd_launching']} launching; Python calls "
            f"+{extra['py_calls']} (builtins +{extra['c_calls']})",
            flush=True,
        )
    print(
        f"plain: forward {plain['fwd']} ops ({plain['fwd_launching']} launching), backward "
        f"{plain['bwd']} ({plain['bwd_launching']}); Python calls {plain['py_calls']} "
        f"(builtins {plain['c_calls']})"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
