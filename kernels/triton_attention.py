"""`triton_attention`: FlashAttention in Triton with the preconditioner fused (backend="triton").

Legend: B batch, Hq query heads, Hkv key/value heads, T tokens, D head dim.
Forward in kernels/triton_attention_fwd.py, backward in kernels/triton_attention_bwd.py, the tile
math both share (and the row-scale pre-pass) in kernels/triton_tiles.py.
Saved for backward: q, k, v as given, the output, the log-sum-exp (B*Hq, T) and the fp32 row
scales the call computed: of q (B*Hq, T), k and v (B*Hkv, T), of the output (B*Hq, T), each
only where the preconditioner scales those rows.
The forward and the backward are torch.library custom ops, so torch.compile (train.compile)
keeps each one call in its graph instead of tracing into the Triton launches.
Runs on CUDA GPUs, or on the CPU when TRITON_INTERPRET=1 was set before this import (tests).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from kernels.precondition import Preconditioner, get_preconditioner
from kernels.triton_attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, preprocess_kernel
from kernels.triton_attention_fwd import attn_fwd_kernel
from kernels.triton_tiles import row_scales_kernel, scaled_rows_kernel

Tensor = torch.Tensor

INTERPRET = isinstance(attn_fwd_kernel, InterpretedFunction)
"""True when triton was imported with TRITON_INTERPRET=1: kernels run on CPU tensors in numpy."""

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP32_ON_GPU = (
    "the compiled Triton kernel takes bf16 or fp16 on a GPU: its fp32 dots (IEEE, no tensor cores) spill registers "
    "from 32 x 32 tiles up; fp32 runs in the interpreter (TRITON_INTERPRET=1), or use backend='sdpa'"
)
"""fp32 is the interpreter's dtype (the tests' 1e-5 references); compiled for a GPU it would spill."""

LOG2E = math.log2(math.e)

MAX_HEAD_DIM = 128
"""The largest head dim the block shapes below are sized for; larger ones take sdpa or flash."""

AUTOTUNE = os.environ.get("TRITON_ATTN_AUTOTUNE", "1") != "0"
"""TRITON_ATTN_AUTOTUNE=0 (read at import) runs each kernel with its first block shape that fits:
one compile per kernel, for quick GPU tests."""

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head-dim class (BLOCK_D <= 64, or 128);
# the first that fits shared memory is the default without autotuning, the rest are autotuned over.
# fwd and dq need BLOCK_M % BLOCK_N == 0, dkdv BLOCK_N % BLOCK_M == 0 (the causal diagonal).
# Every shape here compiles for sm_90 and sm_80 without spilling a register, in bf16 and fp16,
# causal or not, with every combination of the preconditioner's scales (`python bench/compile_check.py`,
# and the `extra` test that runs it; docs/benchmarks.md has the figures). Larger tiles spill: on
# sm_80 each warp holds a whole MMA B operand (a 64 x 128 K tile is 128 registers a thread), so the
# forward and dQ at D=128 stream 32 or 64 keys a step, and dK/dV (64 x 128 on 8 warps) spills at both
# head dims.
BLOCKS = {
    ("fwd", 64): [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
    ("fwd", 128): [(128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3)],
    ("dkdv", 64): [(32, 128, 8, 2), (32, 128, 8, 3), (16, 64, 4, 3)],
    ("dkdv", 128): [(32, 64, 8, 2), (32, 64, 8, 3), (16, 64, 8, 3)],
    ("dq", 64): [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3)],
    ("dq", 128): [(64, 64, 8, 2), (64, 32, 4, 3), (64, 32, 4, 2)],
}
SMEM_BYTES = 160 * 1024
"""Shared memory a block shape may plan for: an A100 gives a block 163 KiB, an H100/H200 227 KiB;
the rest is margin for Triton's own scratch."""


def smem_bytes(kernel: str, m: int, n: int, stages: int, block_d: int, elem: int) -> int:
    """Shared memory of the tiles a kernel keeps (resident) and pipelines (per stage), estimated:
    fwd keeps q and streams k, v; dkdv keeps k, v and streams q, dO; dq keeps q, dO and streams k, v."""
    resident, streamed = {"fwd": (m, 2 * n), "dkdv": (2 * n, 2 * m), "dq": (2 * m, 2 * n)}[kernel]
    return elem * block_d * (resident + stages * streamed)


def tile_configs(kernel: str, block_d: int, elem: int) -> list[tuple[int, int, int, int]]:
    """The block shapes of `kernel` for this padded head dim and element size (bytes) that fit
    shared memory, the default first."""
    shapes = BLOCKS[(kernel, 64 if block_d <= 64 else 128)]
    fits = [c for c in shapes if smem_bytes(kernel, c[0], c[1], c[3], block_d, elem) <= SMEM_BYTES]
    assert fits, f"no {kernel} block shape fits BLOCK_D={block_d} at {elem} bytes"
    return fits


def _autotuned(kernel_name: str, fn, key: list[str]):
    """fn autotuned over every shape of BLOCKS[kernel_name, *], pruned per call to those of its head dim."""
    shapes = list(dict.fromkeys(c for (k, _), cs in BLOCKS.items() if k == kernel_name for c in cs))
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]

    def prune(configs, named_args, **kwargs):
        keep = set(tile_configs(kernel_name, kwargs["BLOCK_D"], named_args["Q"].element_size()))
        shape = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        return [c for c in configs if shape(c) in keep]

    # a short timing per candidate (the default spends 125 ms on each): tuning T 1k-8k at two head
    # dims stays within a device call's minutes
    bench = lambda kernel_call, quantiles: triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune}, do_bench=bench)(fn)


_KERNELS = {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dq": attn_bwd_dq_kernel}
_KEY = ["T", "D", "GROUP", "CAUSAL", "PRE_QK", "PRE_V"]
_TUNED = {name: _autotuned(name, fn, _KEY + (["ROW"] if name == "fwd" else [])) for name, fn in _KERNELS.items()}


def _launch(name: str, grid, *args, **kw) -> None:
    """Kernel `name` on `grid`: one small block in the interpreter, the autotuner's pick, or
    (TRITON_ATTN_AUTOTUNE=0) the first block shape that fits. args[0] is Q."""
    if AUTOTUNE and not INTERPRET:
        _TUNED[name][grid](*args, **kw)
        return
    m, n, w, s = (16, 16, 1, 1) if INTERPRET else tile_configs(name, kw["BLOCK_D"], args[0].element_size())[0]
    _KERNELS[name][grid](*args, **kw, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)


def unavailable_reason(q: Tensor | None = None, device: torch.device | None = None) -> str | None:
    """Why the kernel cannot run on q (its dtype, head dim and device) or on `device`, None when it can."""
    if q is not None and q.dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernel takes fp32, bf16 or fp16 tensors, got {q.dtype}"
    if q is not None and q.dim() == 4 and q.shape[-1] > MAX_HEAD_DIM:
        return f"the Triton kernel takes head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}"
    dev = q.device if q is not None else device
    if dev is None or INTERPRET:
        return None
    if dev.type != "cuda":
        return f"it needs a CUDA GPU, or TRITON_INTERPRET=1 in the environment to run on the {dev.type} (slowly)"
    if q is not None and q.dtype == torch.float32:
        return FP32_ON_GPU
    return _gpu_reason(dev) or None


_GPU_REASONS: dict[torch.device, str] = {}


@torch.compiler.assume_constant_result
def _gpu_reason(device: torch.device) -> str:
    """Why the kernel cannot run on this CUDA device, "" when it can. The capability is read once
    per device (attention() resolves its backend first) and torch.compile keeps the answer as a
    constant: no device query inside a compiled graph."""
    if device not in _GPU_REASONS:
        old = torch.cuda.get_device_capability(device) < (8, 0)
        _GPU_REASONS[device] = "it needs an Ampere or newer GPU (compute capability 8.0+)" if old else ""
    return _GPU_REASONS[device]


def fused_flags(pre: Preconditioner) -> tuple[bool, bool, bool] | None:
    """What the kernel fuses: any preconditioner declared by `rows` in which q and k go together,
    as (scale q and k rows, scale v rows, scale output rows); None for every other one."""
    if pre.rows is None or ("q" in pre.rows) != ("k" in pre.rows):
        return None
    return "q" in pre.rows, "v" in pre.rows, "o" in pre.rows


def _flags(pre: Preconditioner) -> tuple[bool, bool, bool]:
    flags = fused_flags(pre)
    if flags is None:
        raise ValueError(
            f"precondition={pre.name!r} is registered but the fused Triton kernel does not implement it "
            "(it fuses rows= preconditioners that scale q and k together); use backend='sdpa', 'eager' or 'flash'"
        )
    return flags


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    """What the kernel needs beyond attention()'s checks (heads) and resolve_backend's (device, dtype,
    head dim): re-checked here because attention() caches the backend it resolved."""
    why = unavailable_reason(q)
    if why:
        raise ValueError(f"attention backend 'triton' is unavailable: {why}")
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected q (B, Hq, T, D), k and v (B, Hkv, T, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"the Triton kernel takes q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _unit_last_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _common(q: Tensor, k: Tensor, causal: bool, pre_qk: bool, pre_v: bool) -> dict:
    D = q.shape[-1]
    return dict(
        T=q.shape[2], Hq=q.shape[1], GROUP=q.shape[1] // k.shape[1], sm_scale=1.0 / math.sqrt(D),
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=causal, PRE_QK=pre_qk, PRE_V=pre_v,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32 rounding)
    )  # fmt: skip


def grid(T: int, heads: int, block: str | int):
    """The 1-D launch grid of cdiv(T, BLOCK) x heads programs (see triton_tiles.program_block);
    `block` is a size, or the name of the meta-parameter that holds it (autotuned kernels)."""
    if isinstance(block, int):
        return (triton.cdiv(T, block) * heads,)
    return lambda meta: (triton.cdiv(T, meta[block]) * heads,)


def _row_scales(x: Tensor, on: bool, eps: float) -> Tensor:
    """The pre-pass: 1/rms of each row of x (B, H, T, D) as fp32 (B*H, T); an empty tensor when off."""
    B, H, T, D = x.shape
    r = torch.empty(B * H if on else 0, T, device=x.device, dtype=torch.float32)
    if on:
        block = 16 if INTERPRET else 64
        row_scales_kernel[grid(T, B * H, block)](
            x, r, *_strides(x), T, H, eps, D, max(16, triton.next_power_of_2(D)), block
        )  # fmt: skip
    return r


def _scaled_rows(x: Tensor, r: Tensor, scale: float) -> Tensor:
    """The backward's pre-pass: x (B, H, T, D) with each row times its scale r (B*H, T) and
    `scale`, in x's dtype, contiguous."""
    B, H, T, D = x.shape
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    block = 16 if INTERPRET else 64
    scaled_rows_kernel[grid(T, B * H, block)](
        x, r, y, *_strides(x), T, H, scale, D, max(16, triton.next_power_of_2(D)), block
    )  # fmt: skip
    return y


def _forward(q, k, v, causal, pre_qk, pre_v, row, eps):
    B, Hq, T, D = q.shape
    rq, rk, rv = _row_scales(q, pre_qk, eps), _row_scales(k, pre_qk, eps), _row_scales(v, pre_v, eps)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B * Hq, T, device=q.device, dtype=torch.float32)
    ro = torch.empty(B * Hq if row else 0, T, device=q.device, dtype=torch.float32)
    kw = _common(q, k, causal, pre_qk, pre_v)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(o))
    _launch("fwd", grid(T, B * Hq, "BLOCK_M"), q, k, v, o, lse, ro, rq, rk, rv, *strides, eps=eps, ROW=row, **kw)
    return o, lse, ro, rq, rk, rv


def _backward(do, q, k, v, o, lse, ro, rq, rk, rv, causal, pre_qk, pre_v, row):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    kw = _common(q, k, causal, pre_qk, pre_v)
    delta = torch.empty_like(lse)
    dop = torch.empty_like(o) if row else do  # row: dO w.r.t. the unscaled output
    block = 16 if INTERPRET else 64
    preprocess_kernel[grid(T, B * Hq, block)](
        o, do, ro, delta, dop, *_strides(o), *_strides(do), T, Hq, D, kw["BLOCK_D"], block, row
    )  # fmt: skip
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if pre_qk:  # the operands both kernels stream and keep (kernels/triton_attention_bwd.py)
        q, k = _scaled_rows(q, rq, kw["sm_scale"] * LOG2E), _scaled_rows(k, rk, 1.0)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(dop))
    grid_kv = grid(T, B * Hkv, "BLOCK_N")
    _launch("dkdv", grid_kv, q, k, v, dop, lse, delta, rq, rk, rv, dk, dv, *strides, Hkv=Hkv, **kw)
    _launch("dq", grid(T, B * Hq, "BLOCK_M"), q, k, v, dop, lse, delta, rq, rk, rv, dq, *strides, **kw)
    return dq, dk, dv


def _on_device(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda and not INTERPRET else contextlib.nullcontext()


# The two custom ops. Outputs of the forward: o (B, Hq, T, D), lse (B*Hq, T), and the fp32 row
# scales ro (of o), rq, rk, rv, each (rows, T) where its flag is set and (0, T) where not.
# Schemas spelled out (not inferred from the annotations), the same on every torch since 2.4.
FWD_SCHEMA = "(Tensor q, Tensor k, Tensor v, bool causal, bool pre_qk, bool pre_v, bool row, float eps) -> " + (
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor ro, Tensor rq, Tensor rk, Tensor rv, "
    "bool causal, bool pre_qk, bool pre_v, bool row) -> (Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("precond_attn::triton_fwd", mutates_args=(), schema=FWD_SCHEMA)
def triton_fwd(q, k, v, causal, pre_qk, pre_v, row, eps):
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    with _on_device(q):
        return _forward(q, k, v, causal, pre_qk, pre_v, row, eps)


@triton_fwd.register_fake
def _(q, k, v, causal, pre_qk, pre_v, row, eps):
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    rows = lambda n, on: q.new_empty(n if on else 0, T, dtype=torch.float32)
    o = q.new_empty(q.shape)
    return o, rows(B * Hq, True), rows(B * Hq, row), rows(B * Hq, pre_qk), rows(B * Hkv, pre_qk), rows(B * Hkv, pre_v)


@torch.library.custom_op("precond_attn::triton_bwd", mutates_args=(), schema=BWD_SCHEMA)
def triton_bwd(grad_o, q, k, v, o, lse, ro, rq, rk, rv, causal, pre_qk, pre_v, row):
    grad_o, q, k, v = (_unit_last_stride(t) for t in (grad_o, q, k, v))
    with _on_device(q):
        return _backward(grad_o, q, k, v, o, lse, ro, rq, rk, rv, causal, pre_qk, pre_v, row)


@triton_bwd.register_fake
def _(grad_o, q, k, v, o, lse, ro, rq, rk, rv, causal, pre_qk, pre_v, row):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, pre_qk, pre_v, row, _ = inputs
    o, lse, ro, rq, rk, rv = output
    ctx.mark_non_differentiable(lse, ro, rq, rk, rv)  # saved for the backward kernels, which account for them
    ctx.save_for_backward(q, k, v, o, lse, ro, rq, rk, rv)
    ctx.flags = (causal, pre_qk, pre_v, row)


def _backward_rule(ctx, grad_o, *_unused):
    """Gradients of q, k and v; the other outputs are not differentiable."""
    dq, dk, dv = triton_bwd(grad_o, *ctx.saved_tensors, *ctx.flags)
    return dq, dk, dv, None, None, None, None, None


triton_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, *, precondition: str, causal: bool, eps: float) -> Tensor:
    """Preconditioned FlashAttention. q (B, Hq, T, D), k and v (B, Hkv, T, D) with Hq % Hkv == 0,
    bf16/fp16 (fp32 in the interpreter), any T, D <= MAX_HEAD_DIM. Returns (B, Hq, T, D) in q's dtype;
    differentiable (once: the backward is a kernel, not differentiable itself)."""
    pre_qk, pre_v, row = _flags(get_preconditioner(precondition))
    _check(q, k, v)
    return triton_fwd(q, k, v, causal, pre_qk, pre_v, row, eps)[0]
