"""The fused Triton kernels compiled for real GPUs, on a machine without one.

    python bench/compile_check.py [--arch 90 80] [--head-dim 64 128] [--dtype bf16 fp16]

Triton compiles for a target GPU without one being present: every block shape of
kernels/triton_attention.BLOCKS (the default and the autotuned ones) of the forward, dK/dV and
dQ kernels, for each target, head dim, dtype and causal or not, is compiled to PTX and a cubin;
the bundled `ptxas -v` reports registers and spill bytes, Triton's metadata the shared memory.
Prints a Markdown table, one row per compile, and exits 1 if any compile fails, spills or needs
more shared memory than the target gives a block. TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Shared memory one block may use (opt-in maximum), by compute capability.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 86: 99 * 1024}
SCALES = ("LSE", "RO", "RQ", "RK", "RV", "DELTA")  # fp32 vectors
TENSORS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")  # the input dtype


def kernel(name: str):
    """The JITFunction of kernel `name` (fwd, dkdv, dq) under its autotuner."""
    import triton

    from kernels.triton_attention import _KERNELS

    fn = _KERNELS[name]
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    return fn


def signature(fn, dtype: str) -> dict[str, str]:
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in SCALES:
            sig[p.name] = "*fp32"
        elif p.name in TENSORS:
            sig[p.name] = f"*{dtype}"
        elif p.name in ("sm_scale", "eps"):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig


def ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) of the PTX, from `ptxas -v`: the one Triton
    itself assembles this target with (it bundles two)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        target = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        proc = subprocess.run(
            [str(ptxas), "-v", f"-arch={target}", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True, text=True,
        )  # fmt: skip
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    regs = max(int(r) for r in re.findall(r"Used (\d+) registers", proc.stderr))
    spills = sum(int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", proc.stderr))
    return regs, spills


def compile_one(name: str, arch: int, head_dim: int, dtype: str, causal: bool, shape) -> dict:
    """Compile kernel `name` with block shape (BLOCK_M, BLOCK_N, warps, stages) for sm_`arch`;
    its shared memory, registers and spill bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    m, n, warps, stages = shape
    fn = kernel(name)
    consts = dict(D=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), CAUSAL=causal, PRE_QK=True)
    consts.update(PRE_V=name != "fwd", PREC="tf32", BLOCK_M=m, BLOCK_N=n)
    if name == "fwd":
        consts["ROW"] = False
    src = ASTSource(fn=fn, signature=signature(fn, dtype), constexprs=consts)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages}
    )
    regs, spills = ptxas_report(compiled.asm["ptx"], arch)
    return {"shared": compiled.metadata.shared, "regs": regs, "spills": spills}


def cases(archs, head_dims, dtypes, defaults_only: bool = False):
    from kernels.triton_attention import BLOCKS

    for arch in archs:
        for name in ("fwd", "dkdv", "dq"):
            for d in head_dims:
                for dtype in dtypes:
                    for causal in (True, False):
                        shapes = BLOCKS[(name, 64 if d <= 64 else 128)]
                        for k, shape in enumerate(shapes[:1] if defaults_only else shapes):
                            yield arch, name, d, dtype, causal, shape, k == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp16"])
    p.add_argument("--defaults-only", action="store_true", help="only the first (default) block shape of each")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    print("| target | kernel | D | dtype | causal | BLOCK_M x BLOCK_N, warps, stages | default | shared KiB | "
          "registers | spill bytes | ok |")  # fmt: skip
    print("|---|---|---:|---|---|---|---|---:|---:|---:|---|")
    bad = 0
    for arch, name, d, dtype, causal, shape, default in cases(args.arch, args.head_dim, args.dtype, args.defaults_only):
        m, n, w, s = shape
        try:
            r = compile_one(name, arch, d, dtype, causal, shape)
            ok = r["spills"] == 0 and r["shared"] <= SMEM_LIMIT[arch]
            cells = f"{r['shared'] / 1024:.0f} | {r['regs']} | {r['spills']} | {'yes' if ok else '**no**'}"
        except Exception as e:  # noqa: BLE001 - a failed compile is a row of the table
            ok, cells = False, f"- | - | - | **{type(e).__name__}: {str(e).splitlines()[0][:80]}**"
        bad += not ok
        print(f"| sm_{arch} | {name} | {d} | {dtype} | {causal} | {m} x {n}, {w}, {s} | {'yes' if default else ''} "
              f"| {cells} |", flush=True)  # fmt: skip
    print(f"\n{bad} of the compiles failed, spilled or did not fit" if bad else "\nevery compile fits, none spills")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
