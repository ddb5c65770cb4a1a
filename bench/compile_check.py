"""The fused Triton kernels compiled for real GPUs, on a machine without one.

    python bench/compile_check.py [--arch 90 80] [--head-dim 64 128] [--dtype bf16 fp16] [--defaults-only] [--jobs N]

Triton compiles for a target GPU without one being present: every block shape that
kernels/triton_attention.tile_configs returns (the default and the autotuned ones) of the forward,
dK/dV and dQ kernels, for each target, head dim, dtype and causal or not, is compiled to PTX and a
cubin, with every combination of the preconditioner's row scales the kernels take (of q and k, of
v, of the output: Triton's register allocation is not monotone in them). Each is compiled as
Triton's JIT compiles it for a training call: pointers 16-byte aligned, the strides and T
multiples of 16 (Triton specialises such arguments at launch; the vectorised, pipelined loads
depend on it), GQA (GROUP > 1). Registers and spill bytes are `ptxas -v`'s, run with Triton's own
flags and the ptxas it picks for the target; shared memory is Triton's; instructions are static
counts of the cubin's SASS (`cuobjdump -sass`): the whole kernel, and its main loop (the
unmasked loop over key or query tiles) with the loop's fp32 multiplies (FMUL). Prints a Markdown
table, one row per compile, and exits 1 if any compile fails, spills or needs more shared memory
than the target gives a block. TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Shared memory one block may use (opt-in maximum), by compute capability.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 86: 99 * 1024}
SCALES = ("LSE", "RO", "RQ", "RK", "RV", "DELTA")  # fp32 vectors
TENSORS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")  # the input dtype
ALIGNED = ("T",)  # ints besides the strides (s*_*) that a training call passes as multiples of 16
# (PRE_QK, PRE_V, ROW) per kernel: every combination a `rows=` preconditioner can ask for (the
# built-in none, qk, qkv and row are four of them); ROW only changes the forward
VARIANTS = {
    "fwd": list(itertools.product((False, True), repeat=3)),
    "dkdv": [(qk, v, False) for qk, v in itertools.product((False, True), repeat=2)],
    "dq": [(qk, v, False) for qk, v in itertools.product((False, True), repeat=2)],
}
# one SASS instruction of `cuobjdump -sass`: (address, opcode without modifiers, operands)
SASS_OP = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)\S*([^;]*);", re.MULTILINE)


def kernel(name: str):
    """The JITFunction of kernel `name` (fwd, dkdv, dq) under its autotuner."""
    import triton

    from kernels.triton_attention import _KERNELS

    fn = _KERNELS[name]
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    return fn


def signature(fn, dtype: str) -> tuple[dict[str, str], dict[tuple[int], list]]:
    """Triton's signature of fn for `dtype` tensors, and the attributes its JIT gives the
    arguments of a training call: 16-byte aligned pointers, strides and T multiples of 16."""
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        if p.name in SCALES:
            sig[p.name] = "*fp32"
        elif p.name in TENSORS:
            sig[p.name] = f"*{dtype}"
        elif p.name in ("sm_scale", "eps"):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
        if sig[p.name].startswith("*") or p.name in ALIGNED or re.fullmatch(r"s[a-z]+_[bht]", p.name):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _tool(arch: int, name: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return str(Path(get_ptxas(arch).path).with_name(name))


def ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) of the PTX, from `ptxas -v` with the flags
    Triton assembles with: the ptxas it picks for this target (it bundles two)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        target = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={target}", str(src)]
        proc = subprocess.run([*cmd, "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    regs = max(int(r) for r in re.findall(r"Used (\d+) registers", proc.stderr))
    spills = sum(int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", proc.stderr))
    return regs, spills


def sass_counts(cubin: bytes, arch: int) -> dict[str, int]:
    """Static SASS counts of the cubin: every instruction, and those of the main loop (the
    shortest loop body of 100 instructions or more: the unmasked key or query loop, run once per
    tile) with its fp32 multiplies (FMUL)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([_tool(arch, "cuobjdump"), "-sass", str(path)], capture_output=True, text=True).stdout
    code = [(int(a, 16), op, rest) for a, op, rest in SASS_OP.findall(sass)]
    loops = []
    for addr, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:  # a backward branch closes a loop
            loops.append([o for a, o, _ in code if int(target.group(1), 16) <= a <= addr])
    body = min((b for b in loops if len(b) >= 100), key=len, default=[])
    return {"sass": len(code), "loop": len(body), "loop_fmul": sum(o == "FMUL" for o in body)}


def compile_one(name: str, arch: int, head_dim: int, dtype: str, causal: bool, shape, flags=(True, True, False)):
    """Compile kernel `name` with block shape (BLOCK_M, BLOCK_N, warps, stages) and preconditioner
    flags (PRE_QK, PRE_V, ROW) for sm_`arch`; its shared memory, registers, spill bytes and SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    m, n, warps, stages = shape
    fn = kernel(name)
    pre_qk, pre_v, row = flags
    consts = dict(D=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), CAUSAL=causal, PRE_QK=pre_qk)
    consts.update(PRE_V=pre_v, PREC="ieee" if dtype == "fp32" else "tf32", BLOCK_M=m, BLOCK_N=n)
    if name == "fwd":
        consts["ROW"] = row
    sig, attrs = signature(fn, dtype)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    regs, spills = ptxas_report(compiled.asm["ptx"], arch)
    counts = sass_counts(compiled.asm["cubin"], arch)
    return {"shared": compiled.metadata.shared, "regs": regs, "spills": spills} | counts


ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}


def cases(archs, head_dims, dtypes, defaults_only: bool = False):
    """(arch, kernel, head dim, dtype, causal, flags, block shape, is the default) of every compile."""
    from kernels.triton_attention import tile_configs

    for arch in archs:
        for name in ("fwd", "dkdv", "dq"):
            for d in head_dims:
                for dtype in dtypes:
                    for causal in (True, False):
                        for flags in VARIANTS[name]:
                            shapes = tile_configs(name, d, ELEM[dtype])
                            for k, shape in enumerate(shapes[:1] if defaults_only else shapes):
                                yield arch, name, d, dtype, causal, flags, shape, k == 0


def _flag_names(flags) -> str:
    return "+".join(n for n, on in zip(("qk", "v", "o"), flags, strict=True) if on) or "none"


def row(case) -> tuple[bool, str]:
    """(fits without spilling, the table row) of one compile."""
    arch, name, d, dtype, causal, flags, shape, default = case
    m, n, w, s = shape
    try:
        r = compile_one(name, arch, d, dtype, causal, shape, flags)
        ok = r["spills"] == 0 and r["shared"] <= SMEM_LIMIT[arch]
        cells = " | ".join(str(r[k]) for k in ("regs", "spills", "sass", "loop", "loop_fmul"))
        cells = f"{r['shared'] / 1024:.0f} | {cells} | {'yes' if ok else '**no**'}"
    except Exception as e:  # noqa: BLE001 - a failed compile is a row of the table
        ok, cells = False, f"- | - | - | - | - | - | **{type(e).__name__}: {str(e).splitlines()[0][:80]}**"
    return ok, (f"| sm_{arch} | {name} | {d} | {dtype} | {causal} | {_flag_names(flags)} | {m} x {n}, {w}, {s} | "
                f"{'yes' if default else ''} | {cells} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtype", nargs="+", choices=sorted(ELEM), default=["bf16", "fp16"])
    p.add_argument("--defaults-only", action="store_true", help="only the first (default) block shape of each")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles run at once (processes)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    print("| target | kernel | D | dtype | causal | scales | BLOCK_M x BLOCK_N, warps, stages | default | shared KiB | "
          "registers | spill bytes | SASS | loop SASS | loop FMUL | ok |")  # fmt: skip
    print("|---|---|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    todo = list(cases(args.arch, args.head_dim, args.dtype, args.defaults_only))
    bad, start = 0, time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.jobs > 1:  # spawned, not forked: a fork of a process that imported torch can hang
            pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
            results = stack.enter_context(pool).map(row, todo)
        else:
            results = map(row, todo)
        for ok, line in results:
            bad += not ok
            print(line, flush=True)
    took = f"({len(todo)} compiles, {time.monotonic() - start:.0f} s, {args.jobs} at once)"
    print(f"\n{bad} of the compiles failed, spilled or did not fit {took}" if bad else f"\nnone spills {took}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
