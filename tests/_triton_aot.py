"""Compiles the fused DKM kernels (lightning_palettize/_dkm_triton.py) for a CUDA target on a
machine without a GPU: Triton's front end, its CUDA passes and ptxas (shipped in the Linux
wheel), so CI catches what the interpreter lets pass (types of loop-carried values, layouts,
register allocation, values the front end leaves out of a loop). Run by
tests/test_dkm_triton.py in a subprocess without TRITON_INTERPRET. Prints one line per kernel
and configuration; exits 1 on a failure.

    python tests/_triton_aot.py [ARCH ...]    (default: 90, the H100 / H200)
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lightning_palettize import _dkm_triton as kernels

INTS = {"G", "U", "K", "T", "P", "CH", "t_now", "i_now"}
FLOATS = {"factor", "prune", "zinv", "zt", "eps", "two"}
# what _fwd_loop's loop over iterations carries from one iteration to the next. Triton's front
# end leaves a name out when the body assigns it the object it held before the loop: with
# prev_c bound to c's object, the compiled kernel stored the initial centroids as prev_c (an
# H200 failed every CUDA check) while the interpreter, running the Python, was right. With
# early stopping (TEST) the stop flag and the last inertia too.
FWD_CARRIED = ("c", "prev_c", "last_c", "last_it")
FWD_CARRIED_TEST = ("active", "prev_in")


def carried(ttir: str) -> int:
    """How many values the kernel's first (outermost) loop carries in Triton's IR."""
    m = re.search(r"scf\.for [^\n]*?iter_args\(([^)]*)\)", ttir)
    return 0 if m is None else m.group(1).count("=")


def compile_one(fn, consts: dict, arch: int, types: dict | None = None):
    consts = dict(consts)
    warps = consts.pop("num_warps")
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif types and name in types:
            sig[name] = types[name]
        elif name in INTS:
            sig[name] = "i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = {"last_it_ptr": "*i64", "part": "*fp64", "part_in": "*fp64"}.get(
                name, "*fp32"
            )
    names = list(sig)
    src = ASTSource(
        fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}
    )
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def spills(ptx: str, arch: int) -> int | None:
    """Bytes of register spill stores ptxas reports for the kernel (None: no ptxas here)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [ptxas, f"-arch=sm_{arch}a", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    m = re.search(r"(\d+) bytes spill stores", res.stderr)
    return None if res.returncode or m is None else int(m.group(1))


def main(archs: list[int]) -> int:
    failed = 0
    # (K, prune pull, exact-zero rule, attention clamp, enforce_zero, early stopping), each
    # kernel at its launch settings (_dkm_triton._LAUNCH)
    for k, prune, kz, clamp, ez, test in [
        (16, False, False, False, False, True),
        (16, False, True, True, True, True),
        (256, True, False, False, True, False),
    ]:
        ct = (k, 1.0, 0.5 if prune else 0.0, int(kz), 1.0, int(clamp), 0.0, None)
        for arch in archs:
            for fn, kernel in (
                (kernels._fwd_loop, "fwd"),
                (kernels._bwd_loop, "bwd"),
                (kernels._fwd_pass, "fwd"),  # (rows split over programs, _SPLIT_CODES)
                (kernels._bwd_pass, "bwd"),
            ):
                consts = kernels._launch_args(ct, ez, kernel)[2]
                if kernel == "fwd":
                    consts["TEST"] = test
                name = f"{fn.fn.__name__} sm_{arch} {consts}"
                try:
                    done = compile_one(fn, consts, arch)
                    n = carried(done.asm["ttir"])
                    want = FWD_CARRIED + (FWD_CARRIED_TEST if consts.get("TEST") else ())
                    if fn is kernels._fwd_loop and n != len(want):
                        raise AssertionError(
                            f"its iteration loop carries {n} values, not the {len(want)} of {want}"
                        )
                    spilled = spills(done.asm["ptx"], arch) if k == 16 else None
                    if spilled:  # (the K = 16 of 4 bits: the settings were chosen for it)
                        raise AssertionError(f"ptxas spills {spilled} bytes of registers")
                    print("ok", name, f"spills={spilled}", flush=True)
                except Exception as err:  # report every configuration
                    failed += 1
                    print("FAILED", name, f"{type(err).__name__}: {err}", flush=True)
    failed += elements(archs)
    return 1 if failed else 0


def elements(archs: list[int]) -> int:
    """The element passes' kernel (_dkm_triton._elems), each pass with and without the
    exact-zero rule: the number that failed."""
    failed = 0
    for arch in archs:
        for op in range(4):
            for kz in (False, True):
                consts = dict(
                    OP=op, KZ=kz, BLOCK=kernels._ELEM_BLOCK, STRIDE=kernels._STRIDE,
                    num_warps=kernels._ELEM_WARPS,
                )  # fmt: skip
                types = dict(blocks="*i32", info="*i64", xp="*i64", gp="*i64", outp="*i64")
                types["table"] = "*i32" if op == 0 else "*fp32"
                name = f"_elems sm_{arch} {consts}"
                try:
                    done = compile_one(kernels._elems, consts, arch, types)
                    spilled = spills(done.asm["ptx"], arch)
                    if spilled:
                        raise AssertionError(f"ptxas spills {spilled} bytes of registers")
                    print("ok", name, f"spills={spilled}", flush=True)
                except Exception as err:
                    failed += 1
                    print("FAILED", name, f"{type(err).__name__}: {err}", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [90]))
