"""Tile math of the fused Triton attention, written once for the forward kernel
(kernels/triton_attention_fwd.py) and the backward kernels that recompute its S and P
(kernels/triton_attention_bwd.py), and the pre-pass that computes the preconditioner's row
scales once. The `@triton.jit` functions are inlined where called.

Legend: M query rows of one block, N key/value rows of one block, D head dim (BLOCK_D padded).
Offsets of a (batch, head) matrix are int64 (pid_bh is): B * H * T * D may pass 2^31.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
"""log2(e): the kernels compute exp(x) as exp2(x * log2(e)), folded into the query scale."""


@triton.jit
def program_block(T, BLOCK: tl.constexpr, LAST_FIRST: tl.constexpr):
    """(pid_bh, row block) of this program. Every kernel is launched on a 1-D grid of
    cdiv(T, BLOCK) x (batch x heads) programs (`grid` in kernels/triton_attention.py), the row
    block varying fastest, so the programs of one head run together and share its K and V in
    L2; grid axis 0 takes 2^31 - 1 programs where axis 1 stops at 65,535. LAST_FIRST (causal
    query blocks) hands each head's last block, the one that sees the most keys, to its first
    program: the longest programs start first and the short ones fill the tail of the launch."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(T, BLOCK)
    block = pid % blocks
    if LAST_FIRST:
        block = blocks - 1 - block
    return (pid // blocks).to(tl.int64), block


@triton.jit
def program_rows(H, T, BLOCK: tl.constexpr, LAST_FIRST: tl.constexpr):
    """(pid_bh, batch, head, row offsets) of this program; pid_bh, batch and head are int64, so
    every base offset computed from them is."""
    pid_bh, block = program_block(T, BLOCK, LAST_FIRST)
    return pid_bh, pid_bh // H, pid_bh % H, block * BLOCK + tl.arange(0, BLOCK)


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
def load_scales(ptr, rows, T, ON: tl.constexpr):
    """The fp32 row scales at ptr[rows] (1 past T) when ON, else ones: a (rows,) vector."""
    if ON:
        return tl.load(ptr + rows, mask=rows < T, other=1.0)
    return tl.full([rows.shape[0]], 1.0, tl.float32)


@triton.jit
def scale_rows(x, r):
    """The tile x with row i times r[i] (fp32), rounded back to x's dtype: a row scale folded into
    an MMA operand once, instead of into every element of the fp32 product."""
    return (x * r[:, None]).to(x.dtype)


@triton.jit
def row_scales_kernel(
    X, R, sx_b, sx_h, sx_t, T, H, eps, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr
):  # fmt: skip
    """The forward's pre-pass: R (B*H, T) fp32 = 1/rms of each row of X (B, H, T, D), computed
    once per call, so that the attention loops only scale tiles and S, P by loaded vectors."""
    pid_bh, b, h, rows = program_rows(H, T, BLOCK_M, False)
    offs_d = tl.arange(0, BLOCK_D)
    x = load_rows(X + b * sx_b + h * sx_h, rows, sx_t, offs_d, T, D).to(tl.float32)
    tl.store(R + pid_bh * T + rows, row_rscale(x, D, eps), mask=rows < T)


@triton.jit
def scaled_rows_kernel(
    X, R, Y, sx_b, sx_h, sx_t, T, H, scale, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr
):  # fmt: skip
    """The backward's pre-pass: Y (B, H, T, D contiguous) = each row of X (B, H, T, D) times its
    saved scale R (B*H, T) and `scale`, rounded to X's dtype (one rounding, as a tile fold)."""
    pid_bh, b, h, rows = program_rows(H, T, BLOCK_M, False)
    offs_d = tl.arange(0, BLOCK_D)
    x = load_rows(X + b * sx_b + h * sx_h, rows, sx_t, offs_d, T, D)
    r = tl.load(R + pid_bh * T + rows, mask=rows < T, other=1.0) * scale
    store_rows(Y + pid_bh * T * D, scale_rows(x, r), rows, D, offs_d, T, D)


@triton.jit
def dot_t(a, b, r, SCALE: tl.constexpr, PREC: tl.constexpr):
    """a b^T, times r (the row scales of b, broadcast over columns) when SCALE: C_K in the forward's
    S = q kn^T and C_V in the dQ kernel's dP = dO vn^T, where k and v stream through shared
    memory into the MMA: one multiply per score costs less there than rescaling each streamed
    tile in registers (on sm_80 Triton rescales an MMA operand in every warp that reads it)."""
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
    """(hi_full, hi) for this program's query block (causal: last first, as program_rows(..., CAUSAL)
    maps it): key blocks in [0, hi_full) need no mask, those in [hi_full, hi) do (the causal
    diagonal, or the tail past T)."""
    if CAUSAL:
        hi_full = program_block(T, BLOCK_M, True)[1] * BLOCK_M
        hi = tl.minimum(hi_full + BLOCK_M, T)
    else:
        hi_full = (T // BLOCK_N) * BLOCK_N
        hi = T
    return hi_full, hi
