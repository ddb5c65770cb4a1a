"""Attention backends behind one table, and `attention`, the one function callers use.

Legend: B batch, Hq query heads, Hkv key/value heads, T tokens, D head dim.
A kernel computes softmax(Q K^T / sqrt(D) + causal mask) V. Every backend is called as
run(q, k, v, causal, pre, eps) with `pre` a Preconditioner: triton fuses it into its tiles, the
others apply its prologue and epilogue around the kernel. `attention` resolves the backend once
per (backend, preconditioner, device, dtype, head dim).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.precondition import Preconditioner, get_preconditioner

Tensor = torch.Tensor
log = logging.getLogger(__name__)


def eager_attention(q_BHTD: Tensor, k_BHTD: Tensor, v_BHTD: Tensor, causal: bool) -> Tensor:
    """The readable reference: explicit scores, mask and softmax (softmax in fp32)."""
    groups = q_BHTD.shape[1] // k_BHTD.shape[1]
    k_BHTD = k_BHTD.repeat_interleave(groups, dim=1)
    v_BHTD = v_BHTD.repeat_interleave(groups, dim=1)
    scores = q_BHTD @ k_BHTD.transpose(-1, -2)
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    scores = scores / math.sqrt(q_BHTD.shape[-1])
    if causal:
        T = q_BHTD.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool, device=q_BHTD.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(v_BHTD.dtype)
    return probs @ v_BHTD


def sdpa_attention(q_BHTD: Tensor, k_BHTD: Tensor, v_BHTD: Tensor, causal: bool) -> Tensor:
    """torch's scaled_dot_product_attention (flash / memory-efficient / math, as torch picks)."""
    gqa = q_BHTD.shape[1] != k_BHTD.shape[1]
    return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, is_causal=causal, enable_gqa=gqa)


def flash_attention(q_BHTD: Tensor, k_BHTD: Tensor, v_BHTD: Tensor, causal: bool) -> Tensor:
    """The flash-attn package (layout (B, T, H, D), native GQA); fp16/bf16 on CUDA only."""
    from flash_attn import flash_attn_func  # lazy: an optional GPU extra

    o_BTHD = flash_attn_func(q_BHTD.transpose(1, 2), k_BHTD.transpose(1, 2), v_BHTD.transpose(1, 2), causal=causal)
    return o_BTHD.transpose(1, 2)


@functools.cache
def _import_error(module: str) -> str | None:
    """Why `module` cannot be imported (None when it can); cached."""
    try:
        importlib.import_module(module)
    except (ImportError, OSError, RuntimeError) as e:  # a CUDA/ABI mismatch surfaces as OSError or RuntimeError
        return f"{type(e).__name__}: {e}"
    return None


def _flash_missing(q: Tensor | None, device: torch.device) -> str | None:
    if _import_error("flash_attn"):
        return "the flash-attn package is not installed (pip install -r requirements-gpu.txt on a CUDA machine)"
    if device.type != "cuda" or (q is not None and q.dtype not in (torch.float16, torch.bfloat16)):
        dtype = q.dtype if q is not None else "tensors"
        return f"flash-attn needs fp16/bf16 tensors on a CUDA GPU, got {dtype} on {device.type}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "flash-attn needs an Ampere or newer GPU (compute capability 8.0+)"
    return None


def _triton_missing(q: Tensor | None, device: torch.device) -> str | None:
    why = _import_error("kernels.triton_attention")
    if why:
        return f"the Triton kernel cannot be imported ({why}); pip install triton, or torch's CUDA wheel"
    from kernels.triton_attention import unavailable_reason

    return unavailable_reason(q, device)


def _triton(q: Tensor, k: Tensor, v: Tensor, causal: bool, pre: Preconditioner, eps: float) -> Tensor:
    from kernels.triton_attention import triton_attention

    return triton_attention(q, k, v, precondition=pre.name, causal=causal, eps=eps)


def _around(kernel: Callable) -> Callable:
    """A plain kernel as a backend: the preconditioner's prologue and epilogue around it."""
    return lambda q, k, v, causal, pre, eps: pre.after(kernel(*pre.before(q, k, v, eps), causal), eps)


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable[[Tensor, Tensor, Tensor, bool, Preconditioner, float], Tensor]
    fuses_preconditioner: bool = False
    missing: Callable[[Tensor | None, torch.device], str | None] = lambda q, device: None
    """Returns why this backend cannot run on `device` (None when it can); q may be None."""


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("eager", _around(eager_attention)),
        Backend("sdpa", _around(sdpa_attention)),
        Backend("flash", _around(flash_attention), missing=_flash_missing),
        Backend("triton", _triton, fuses_preconditioner=True, missing=_triton_missing),
    )
}

_auto_logged: set[str] = set()
_resolved: dict[tuple, str] = {}


def resolve_backend(
    name: str, q: Tensor | None = None, device: torch.device | str | None = None, precondition: str | None = None
) -> str:
    """Map `auto` to a concrete backend (CUDA: triton, then flash, then sdpa; CPU: sdpa; triton
    only where it can run and fuses `precondition`) and check that a named backend can run on
    q's device (or `device`); raises ValueError saying what is missing. Logs the auto choice once."""
    device = torch.device(device) if device is not None else (q.device if q is not None else torch.device("cpu"))
    if name == "auto":
        order = ("triton", "flash", "sdpa") if device.type == "cuda" else ("sdpa",)
        chosen = next(b for b in order if BACKENDS[b].missing(q, device) is None and _fuses(b, precondition))
        if chosen not in _auto_logged:
            _auto_logged.add(chosen)
            log.info("attention backend auto -> %s (%s)", chosen, device.type)
        return chosen
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; choose one of auto, {', '.join(BACKENDS)}")
    why = BACKENDS[name].missing(q, device)
    if why:
        raise ValueError(f"attention backend {name!r} is unavailable: {why}")
    return name


def _fuses(backend: str, precondition: str | None) -> bool:
    """False when a fusing backend cannot fuse `precondition` (auto then tries the next one)."""
    if not BACKENDS[backend].fuses_preconditioner or precondition is None:
        return True
    from kernels.triton_attention import fused_flags

    return fused_flags(get_preconditioner(precondition)) is not None


@torch.compiler.assume_constant_result
def _resolved_name(backend: str, precondition: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The backend attention() runs for these inputs, resolved once per key. torch.compile calls it
    at trace time and keeps the answer as a constant, so a compiled model never traces the
    resolution (imports, device queries) and never recompiles when the cache fills."""
    key = (backend, precondition, device, dtype, head_dim)
    if key not in _resolved:
        probe = torch.empty(0, 1, 0, head_dim, dtype=dtype, device=device)  # what the checks read of q
        _resolved[key] = resolve_backend(backend, probe, precondition=precondition)
    return _resolved[key]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    precondition: str = "qk",
    backend: str = "auto",
    causal: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Preconditioned attention. q (B, Hq, T, D), k and v (B, Hkv, T, D), RoPE already
    applied, Hq % Hkv == 0. Returns (B, Hq, T, D)."""
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    pre = get_preconditioner(precondition)
    name = _resolved_name(backend, precondition, q.device, q.dtype, q.shape[-1])
    return BACKENDS[name].run(q, k, v, causal, pre, eps)
