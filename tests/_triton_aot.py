"""Compiles the fused DKM kernels (lightning_palettize/_dkm_triton.py) for a CUDA target on a
machine without a GPU: Triton's front end, its CUDA passes and ptxas (shipped in the Linux
wheel), so CI catches what the interpreter lets pass (types of loop-carried values, layouts,
register allocation). Run by tests/test_dkm_triton.py in a subprocess without
TRITON_INTERPRET. Prints one line per kernel and configuration; exits 1 on a failure.

    python tests/_triton_aot.py [ARCH ...]    (default: 90, the H100 / H200)
"""

from __future__ import annotations

import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lightning_palettize import _dkm_triton as kernels

INTS = {"G", "U", "K", "T"}
FLOATS = {"factor", "prune", "zinv", "zt", "eps", "two"}


def compile_one(fn, consts: dict, arch: int) -> None:
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in INTS:
            sig[name] = "i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "*i64" if name == "last_it_ptr" else "*fp32"
    names = list(sig)
    src = ASTSource(
        fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}
    )
    triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": kernels._NUM_WARPS}
    )


def main(archs: list[int]) -> int:
    failed = 0
    # (K, prune pull, exact-zero rule, attention clamp, enforce_zero, early stopping)
    for k, prune, kz, clamp, ez, test in [
        (16, False, False, False, False, True),
        (16, False, True, True, True, True),
        (256, True, False, False, True, False),
    ]:
        kp, bu = kernels._shapes(k)
        flags = dict(KP=kp, BU=bu, PRUNE=prune, KZ=kz, CLAMP=clamp, EZ=ez)
        for arch in archs:
            for fn, consts in (
                (kernels._fwd_loop, dict(flags, TEST=test)),
                (kernels._bwd_loop, flags),
            ):
                name = f"{fn.fn.__name__} sm_{arch} {consts}"
                try:
                    compile_one(fn, consts, arch)
                    print("ok", name, flush=True)
                except Exception as err:  # report every configuration
                    failed += 1
                    print("FAILED", name, f"{type(err).__name__}: {err}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [90]))
