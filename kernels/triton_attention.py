"""`triton_attention`: FlashAttention in Triton with the preconditioner fused (backend="triton").

Legend: B batch, Hq query heads, Hkv key/value heads, T tokens, D head dim.
Forward in kernels/triton_attention_fwd.py, backward in kernels/triton_attention_bwd.py, the tile
math both share in kernels/triton_tiles.py.
Saved for backward: q, k, v as given, the output, the log-sum-exp (B*Hq, T) and, when o's rows are
scaled, the output row scales (B*Hq, T); the q/k/v row scales are recomputed from the tiles.
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
from kernels.triton_attention_fwd import attn_fwd_kernel, configs

Tensor = torch.Tensor

INTERPRET = isinstance(attn_fwd_kernel, InterpretedFunction)
"""True when triton was imported with TRITON_INTERPRET=1: kernels run on CPU tensors in numpy."""

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

AUTOTUNE = os.environ.get("TRITON_ATTN_AUTOTUNE", "1") != "0"
"""TRITON_ATTN_AUTOTUNE=0 (read at import) compiles one block shape per kernel: for quick GPU tests."""

_KEY = ["T", "D", "GROUP", "CAUSAL", "PRE_QK", "PRE_V"]
_fwd = triton.autotune(configs("fwd", INTERPRET, AUTOTUNE), key=[*_KEY, "ROW"])(attn_fwd_kernel)
_dkdv = triton.autotune(configs("dkdv", INTERPRET, AUTOTUNE), key=_KEY)(attn_bwd_dkdv_kernel)
_dq = triton.autotune(configs("dq", INTERPRET, AUTOTUNE), key=_KEY)(attn_bwd_dq_kernel)


def unavailable_reason(q: Tensor | None = None, device: torch.device | None = None) -> str | None:
    """Why the kernel cannot run on q (its dtype and device) or on `device`, None when it can."""
    if q is not None and q.dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernel takes fp32, bf16 or fp16 tensors, got {q.dtype}"
    dev = q.device if q is not None else device
    if dev is None or INTERPRET:
        return None
    if dev.type != "cuda":
        return f"it needs a CUDA GPU, or TRITON_INTERPRET=1 in the environment to run on the {dev.type} (slowly)"
    if torch.cuda.get_device_capability(dev) < (8, 0):
        return "it needs an Ampere or newer GPU (compute capability 8.0+)"
    return None


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
    """What the kernel needs beyond attention()'s checks (heads) and resolve_backend's (device, dtype):
    re-checked here because attention() caches the backend it resolved."""
    why = unavailable_reason(q)
    if why:
        raise ValueError(f"attention backend 'triton' is unavailable: {why}")
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected q (B, Hq, T, D), k and v (B, Hkv, T, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"the Triton kernel takes q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} is too large for the Triton kernel (at most 256)")


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


def _forward(q, k, v, causal, pre_qk, pre_v, row, eps):
    B, Hq, T, D = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B * Hq, T, device=q.device, dtype=torch.float32)
    ro = torch.empty(B * Hq, T, device=q.device, dtype=torch.float32) if row else lse.new_empty(0)
    kw = _common(q, k, causal, pre_qk, pre_v)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * Hq)
    _fwd[grid](q, k, v, o, lse, ro, *_strides(q), *_strides(k), *_strides(v), *_strides(o), eps=eps, ROW=row, **kw)
    return o, lse, ro


def _backward(do, q, k, v, o, lse, ro, causal, pre_qk, pre_v, row, eps):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    kw = _common(q, k, causal, pre_qk, pre_v)
    delta = torch.empty_like(lse)
    dop = torch.empty_like(o) if row else do  # row: dO w.r.t. the unscaled output
    block = 16 if INTERPRET else 64
    pre_grid = (triton.cdiv(T, block), B * Hq)
    preprocess_kernel[pre_grid](
        o, do, ro, delta, dop, *_strides(o), *_strides(do), T, Hq, D, kw["BLOCK_D"], block, row
    )  # fmt: skip
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(dop))
    _dkdv[lambda m: (triton.cdiv(T, m["BLOCK_N"]), B * Hkv)](
        q, k, v, dop, lse, delta, dk, dv, *strides, Hkv=Hkv, eps=eps, **kw
    )  # fmt: skip
    _dq[lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * Hq)](q, k, v, dop, lse, delta, dq, *strides, eps=eps, **kw)
    return dq, dk, dv


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, pre_qk, pre_v, row, eps):
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        o, lse, ro = _forward(q, k, v, causal, pre_qk, pre_v, row, eps)
        ctx.save_for_backward(q, k, v, o, lse, ro)
        ctx.args = (causal, pre_qk, pre_v, row, eps)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, ro = ctx.saved_tensors
        dq, dk, dv = _backward(_unit_last_stride(do), q, k, v, o, lse, ro, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def triton_attention(q: Tensor, k: Tensor, v: Tensor, *, precondition: str, causal: bool, eps: float) -> Tensor:
    """Preconditioned FlashAttention. q (B, Hq, T, D), k and v (B, Hkv, T, D) with Hq % Hkv == 0,
    fp32/bf16/fp16, any T, D <= 256. Returns (B, Hq, T, D) in q's dtype; differentiable."""
    pre_qk, pre_v, row = _flags(get_preconditioner(precondition))
    _check(q, k, v)
    with torch.cuda.device(q.device) if q.is_cuda and not INTERPRET else contextlib.nullcontext():
        return _FusedAttention.apply(q, k, v, causal, pre_qk, pre_v, row, eps)
