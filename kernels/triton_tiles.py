"""Tile math of the fused Triton attention, written once for the forward kernel
(kernels/triton_attention_fwd.py) and the backward kernels that recompute its S and P
(kernels/triton_attention_bwd.py). All are `@triton.jit` functions, inlined where called.

Legend: M query rows of one block, N key/value rows of one block, D head dim (BLOCK_D padded).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def program_rows(H, BLOCK: tl.constexpr):
    """(pid_bh, batch, head, row offsets) of this program, launched on (T blocks, batch * H heads)."""
    pid_bh = tl.program_id(1)
    return pid_bh, pid_bh // H, pid_bh % H, tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def load_rows(ptr, rows, stride, offs_d, T, D: tl.constexpr):
    """The (rows, BLOCK_D) tile of a (T, D) matrix at ptr with row stride `stride`; 0 past T and D."""
    ok = (rows[:, None] < T) & (offs_d[None, :] < D)
    return tl.load(ptr + rows[:, None] * stride + offs_d[None, :], mask=ok, other=0.0)


@triton.jit
def store_rows(ptr, x, rows, stride, offs_d, T, D: tl.constexpr):
    """Store the tile x, in ptr's dtype, at `rows` (< T) and columns offs_d (< D) of a matrix at ptr."""
    ok = (rows[:, None] < T) & (offs_d[None, :] < D)
    tl.store(ptr + rows[:, None] * stride + offs_d[None, :], x.to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def row_rscale(x, D: tl.constexpr, eps):
    """1/rms of each row of an fp32 (rows, BLOCK_D) tile whose padded columns are zero."""
    return tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)


@triton.jit
def scaled_q(q_MD, sm_scale, eps, D: tl.constexpr, PRE_QK: tl.constexpr):
    """q's rows times sm_scale * log2(e) (scores in the log2 domain) and, for PRE_QK, C_Q;
    scaled in fp32, then rounded to q's dtype for the dots."""
    q_scale = tl.full([q_MD.shape[0]], sm_scale * 1.4426950408889634, tl.float32)
    if PRE_QK:
        q_scale = q_scale * row_rscale(q_MD.to(tl.float32), D, eps)
    return (q_MD.to(tl.float32) * q_scale[:, None]).to(q_MD.dtype)


@triton.jit
def dot_t(a, b, r, SCALE: tl.constexpr, PREC: tl.constexpr):
    """a b^T, times r (the normalised operand's row scales, broadcast) when SCALE: C_K in S = qs kn^T
    (or S^T = kn qs^T), C_V in dP = dO vn^T, so kn and vn are never formed."""
    s = tl.dot(a, tl.trans(b), input_precision=PREC)
    if SCALE:
        s = s * r
    return s


@triton.jit
def visible(x, q_pos, k_pos, T, other, CAUSAL: tl.constexpr):
    """x where the query at q_pos sees the key at k_pos (positions broadcast to x), else `other`.
    Causal: keys up to the query (a key past T then meets only queries past T, never stored)."""
    if CAUSAL:
        ok = k_pos <= q_pos
    else:
        ok = k_pos < T
    return tl.where(ok, x, other)


@triton.jit
def key_bounds(T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(hi_full, hi) for this program's query block: key blocks in [0, hi_full) need no mask,
    those in [hi_full, hi) do (the causal diagonal, or the tail past T)."""
    if CAUSAL:
        hi_full = tl.program_id(0) * BLOCK_M
        hi = tl.minimum(hi_full + BLOCK_M, T)
    else:
        hi_full = (T // BLOCK_N) * BLOCK_N
        hi = T
    return hi_full, hi
