"""Attention benchmark: forward and forward+backward time and TFLOP/s of each backend and
preconditioner, printed as one markdown table (paste it into docs/benchmarks.md).

    python -m bench.attention            # CUDA: T 1k-8k, D 64/128, bf16; CPU: small sizes
    python -m bench.attention --quick    # a few seconds anywhere (smoke test of the script)
    python -m bench.attention --out DIR --budget 120   # also DIR/attention.md and .json; stop measuring at 120 s

Rows: eager, sdpa (the flash backend of SDPA on CUDA), flash (the flash-attn package) and
triton (our fused kernel), each with `none` and `qkv`, and triton with `row`. sdpa/flash with
`qkv` are separate normalisation kernels followed by the attention kernel, which is exactly
what backend="sdpa"/"flash" run. A row that cannot run here says why instead of a time, and a
row that fails (a Triton compile or launch error, out of memory) says so in its note: the table
and the target summary still come out, and the exit status is 1. The cells the targets compare
run first at the sizes that decide them (TARGET_SIZES), so a budget that runs out costs the other
rows; rows print as measured, the files hold them in table order.
FLOPs: causal forward 2 matmuls of 2*T*T*D halved by the mask; backward 2.5x the forward.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import BACKENDS, attention

Tensor = torch.Tensor
CASES = [(b, p) for b in ("eager", "sdpa", "flash", "triton") for p in ("none", "qkv")] + [("triton", "row")]
TARGET_CASES = [("sdpa", "none"), ("triton", "qkv"), ("sdpa", "qkv")]
"""The cells the targets compare (target_summary)."""
TARGET_SIZES = [(4096, 128), (8192, 128)]
"""(T, D) where the targets are judged (a real head dim, sequences long enough for the kernel to
dominate): their TARGET_CASES are measured before every other cell."""


@dataclass(frozen=True)
class Sizes:
    batch: int
    heads: int
    T: int
    D: int
    dtype: torch.dtype


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: checks that the script runs")
    p.add_argument("--T", type=int, nargs="+", help="sequence lengths (CUDA default 1024 2048 4096 8192)")
    p.add_argument("--D", type=int, nargs="+", help="head dims (default 64 128)")
    p.add_argument("--tokens", type=int, help="batch * T per step (CUDA default 16384; batch = tokens // T)")
    p.add_argument("--heads", type=int, default=16, help="query = key/value heads")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--repeats", type=int, help="timed repeats per cell (median reported)")
    p.add_argument("--backends", nargs="+", default=[b for b in dict(CASES)], help="subset of backends to run")
    p.add_argument("--out", type=Path, help="also write OUT/attention.md (the table) and OUT/attention.json (rows)")
    p.add_argument("--budget", type=float, help="seconds: rows not started by then are skipped; the table still prints")
    return p.parse_args(argv)


def default_sizes(args: argparse.Namespace, cuda: bool) -> tuple[list[Sizes], int]:
    """GPU: the issue's grid at a fixed token count; CPU: small enough for 2 cores."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.quick:
        Ts, Ds, tokens, heads, repeats = [128], [64], 256, 2, 2
    elif cuda:
        Ts, Ds, tokens, heads, repeats = [1024, 2048, 4096, 8192], [64, 128], 16384, args.heads, 20
    else:
        Ts, Ds, tokens, heads, repeats = [256, 512], [64], 1024, 4, 3
    Ts, Ds = args.T or Ts, args.D or Ds
    tokens = args.tokens or tokens
    repeats = args.repeats or repeats
    return [Sizes(max(1, tokens // T), heads, T, D, dtype) for T in Ts for D in Ds], repeats


def run_order(sizes: list[Sizes], cases: list[tuple[str, str]]) -> list[tuple[Sizes, str, str]]:
    """Every (sizes, backend, precondition) cell in running order: the target cells at
    TARGET_SIZES first, then the rest T by T."""
    first = [
        (s, b, p) for T, D in TARGET_SIZES for s in sizes if (s.T, s.D) == (T, D) for b, p in TARGET_CASES
        if (b, p) in cases
    ]  # fmt: skip
    return first + [(s, b, p) for s in sizes for b, p in cases if (s, b, p) not in first]


def attention_flops(s: Sizes, backward: bool) -> float:
    fwd = 4 * s.batch * s.heads * s.T * s.T * s.D / 2  # two matmuls, causal half
    return fwd * (3.5 if backward else 1.0)


def why_not(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a backend is skipped here; the interpreted Triton kernel is for tests, not timing."""
    if backend == "triton" and device.type != "cuda":
        return "skipped: needs a CUDA GPU (the CPU interpreter is for tests only)"
    probe = torch.empty(0, device=device, dtype=dtype)
    why = BACKENDS[backend].missing(probe, device)
    return f"skipped: {why}" if why else None


def sdpa_context(backend: str, device: torch.device):
    """On CUDA pin SDPA to its flash backend, the target the issue compares against."""
    if backend != "sdpa" or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def time_ms(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of fn() in ms, after warm-up calls (compilation, autotuning)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(backend: str, precondition: str, s: Sizes, repeats: int, device: torch.device) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of one cell."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(s.batch, s.heads, s.T, s.D, device=device, dtype=s.dtype, generator=g) for _ in range(3))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    do = torch.randn_like(q)
    run = lambda: attention(q, k, v, precondition=precondition, backend=backend)

    def fwd():
        with torch.no_grad():
            run()

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        run().backward(do)

    with sdpa_context(backend, device):
        return time_ms(fwd, repeats, device), time_ms(fwd_bwd, repeats, device)


def cell(backend: str, precondition: str, s: Sizes, repeats: int, device: torch.device) -> dict:
    row = {"T": s.T, "D": s.D, "backend": backend, "precondition": precondition}
    why = why_not(backend, device, s.dtype)
    if why:
        return {**row, "note": why}
    try:
        f_ms, fb_ms = measure(backend, precondition, s, repeats, device)
    except torch.OutOfMemoryError:
        return {**row, "note": "error: out of memory"}
    except Exception as e:  # one failing row (OutOfResources, a PTXAS error, ...) must not end the table
        return {**row, "note": error_note(e)}
    finally:
        if device.type == "cuda":
            with contextlib.suppress(Exception):  # a launch error can leave the context unusable
                torch.cuda.empty_cache()
    tflops = lambda flops, ms: flops / (ms * 1e-3) / 1e12
    return {
        **row,
        "fwd_ms": f_ms,
        "fwd_tflops": tflops(attention_flops(s, False), f_ms),
        "fwdbwd_ms": fb_ms,
        "fwdbwd_tflops": tflops(attention_flops(s, True), fb_ms),
        "note": "",
    }


def error_note(e: BaseException) -> str:
    """`error: Type: first line of the message` for a table cell (no pipes, at most 160 chars)."""
    lines = str(e).strip().splitlines()
    text = f"error: {type(e).__name__}" + (f": {lines[0]}" if lines else "")
    return text.replace("|", "/")[:160]


TABLE_HEAD = "| T | D | backend | precondition | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | note |"


def format_row(r: dict) -> str:
    num = lambda key, fmt: format(r[key], fmt) if key in r else "-"
    return (
        f"| {r['T']} | {r['D']} | {r['backend']} | {r['precondition']} | {num('fwd_ms', '.3f')} "
        f"| {num('fwd_tflops', '.3g')} | {num('fwdbwd_ms', '.3f')} | {num('fwdbwd_tflops', '.3g')} | {r['note']} |"
    )


def target_summary(rows: list[dict]) -> list[str]:
    """The issue's targets: triton qkv <= 1.1x SDPA none, and faster than normalise + SDPA."""
    at = {(r["T"], r["D"], r["backend"], r["precondition"]): r.get("fwdbwd_ms") for r in rows}
    out = []
    for T, D in sorted({(r["T"], r["D"]) for r in rows}):
        pairs = (("triton", "qkv"), ("sdpa", "none"), ("sdpa", "qkv"))
        fused, plain, separate = (at.get((T, D, b, p)) for b, p in pairs)
        if fused and plain and separate:
            out.append(
                f"T={T} D={D} fwd+bwd: triton qkv / sdpa none = {fused / plain:.2f} (target <= 1.10); "
                f"triton qkv / (normalise + sdpa) = {fused / separate:.2f} (target < 1)"
            )
    return out


def device_line(device: torch.device, s: Sizes) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    versions = f"torch {torch.__version__}"
    with contextlib.suppress(ImportError):
        import triton

        versions += f", triton {triton.__version__}"
        if device.type == "cuda":
            from kernels.triton_attention import AUTOTUNE

            versions += " (block shapes " + ("autotuned)" if AUTOTUNE else "not tuned: TRITON_ATTN_AUTOTUNE=0)")
    return f"device: {name}; {versions}; dtype {s.dtype}; heads {s.heads}; batch * T = {s.batch * s.T}"


def write_outputs(out: Path, header: str, rows: list[dict]) -> None:
    """OUT/attention.md (the header line, the table, the target summary) and OUT/attention.json;
    rewritten after every row, so a run cut short keeps what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["T"], r["D"], CASES.index((r["backend"], r["precondition"]))))
    table = [header, "", TABLE_HEAD, "|" + "---|" * 9, *map(format_row, rows), "", *target_summary(rows)]
    (out / "attention.md").write_text("\n".join(table) + "\n")
    data = {"device": header, "rows": rows, "targets": target_summary(rows)}
    (out / "attention.json").write_text(json.dumps(data, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes, repeats = default_sizes(args, device.type == "cuda")
    cases = [(b, p) for b, p in CASES if b in args.backends]
    header = device_line(device, sizes[0])
    print(header, flush=True)
    print(TABLE_HEAD + "\n|" + "---|" * 9, flush=True)
    rows = []
    for s, backend, precondition in run_order(sizes, cases):
        if args.budget is not None and time.monotonic() - start > args.budget:
            note = f"skipped: past the time budget of {args.budget:g} s"
            rows.append({"T": s.T, "D": s.D, "backend": backend, "precondition": precondition, "note": note})
        else:
            rows.append(cell(backend, precondition, s, repeats, device))
        print(format_row(rows[-1]), flush=True)  # row by row: a cut-short run keeps what it measured
        if args.out:
            write_outputs(args.out, header, rows)
    for line in target_summary(rows):
        print(line)
    return 1 if any(r["note"].startswith("error:") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
