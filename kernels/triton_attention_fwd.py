"""Forward Triton kernel of causal FlashAttention with the preconditioner fused.

Legend: M query rows of one block, N key/value rows of one block, D head dim (BLOCK_D padded).
For `qk`/`qkv` the row scales r = 1/rms(row) are computed from each tile as it is loaded and
folded into the products (q before rounding, k and v as column scales of S and P), so no
normalised copy of q, k or v exists anywhere. For `row` the output scale is the epilogue.
Scores are kept in the log2 domain (exp2 is the hardware instruction); the saved log-sum-exp
is in that domain too.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_tiles import dot_t, key_bounds, load_rows, program_rows, row_rscale, scaled_q, store_rows, visible

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, first = the default without autotuning.
# fwd and dq need BLOCK_M % BLOCK_N == 0, dkdv BLOCK_N % BLOCK_M == 0 (the causal diagonal).
# Few on purpose: each is a compile (seconds). All compile for sm_90 (bf16 D=64/128, fp32 D=64).
BLOCKS = {
    "fwd": [(128, 64, 4, 3), (128, 128, 8, 2)],
    "dkdv": [(32, 128, 4, 3), (64, 128, 8, 2), (32, 64, 4, 3)],  # the last fits fp32 D=128 in shared memory
    "dq": [(128, 64, 8, 2), (128, 32, 4, 3)],
}


def configs(kernel: str, interpret: bool, autotune: bool) -> list[triton.Config]:
    """Block shapes for `kernel` to autotune over (just the first when not autotuning);
    the interpreter gets one small block."""
    if interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    shapes = BLOCKS[kernel] if autotune else BLOCKS[kernel][:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


@triton.jit
def _fwd_inner(
    acc_MD, l_M, m_M, qs_MD, k_ptr, v_ptr, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T, eps,
    D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
    PRE_QK: tl.constexpr, PRE_V: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks [lo, hi); MASK applies the causal and tail masks."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ND = load_rows(k_ptr, cols, stride_kt, offs_d, T, D)
        s_MN = dot_t(qs_MD, k_ND, row_rscale(k_ND.to(tl.float32), D, eps)[None, :], PRE_QK, PREC)
        if MASK:
            s_MN = visible(s_MN, offs_m[:, None], cols[None, :], T, float("-inf"), CAUSAL)
        m_new = tl.maximum(m_M, tl.max(s_MN, 1))
        p_MN = tl.math.exp2(s_MN - m_new[:, None])
        alpha = tl.math.exp2(m_M - m_new)
        l_M = l_M * alpha + tl.sum(p_MN, 1)
        v_ND = load_rows(v_ptr, cols, stride_vt, offs_d, T, D)
        if PRE_V:  # C_V as a column scale of P (P C_V V = P (C_V V))
            p_MN = p_MN * row_rscale(v_ND.to(tl.float32), D, eps)[None, :]
        acc_MD = acc_MD * alpha[:, None] + tl.dot(p_MN.to(v_ND.dtype), v_ND, input_precision=PREC)
        m_M = m_new
    return acc_MD, l_M, m_M


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, RO,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
    T, Hq, GROUP, sm_scale, eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    PRE_QK: tl.constexpr, PRE_V: tl.constexpr, ROW: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one (batch, query head). Last-dim strides are 1.
    Writes O (B, Hq, T, D), LSE (B*Hq, T) fp32 log2-domain, RO (B*Hq, T) fp32 when ROW."""
    pid_bh, b, hq, offs_m = program_rows(Hq, BLOCK_M)
    hkv = hq // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    qs_MD = scaled_q(load_rows(Q + b * sq_b + hq * sq_h, offs_m, sq_t, offs_d, T, D), sm_scale, eps, D, PRE_QK)

    acc_MD = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_M = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    hi_full, hi = key_bounds(T, BLOCK_M, BLOCK_N, CAUSAL)
    k_ptr = K + b * sk_b + hkv * sk_h
    v_ptr = V + b * sv_b + hkv * sv_h
    acc_MD, l_M, m_M = _fwd_inner(
        acc_MD, l_M, m_M, qs_MD, k_ptr, v_ptr, sk_t, sv_t, offs_m, offs_d, 0, hi_full, T, eps,
        D, BLOCK_N, CAUSAL, False, PRE_QK, PRE_V, PREC,
    )  # fmt: skip
    acc_MD, l_M, m_M = _fwd_inner(
        acc_MD, l_M, m_M, qs_MD, k_ptr, v_ptr, sk_t, sv_t, offs_m, offs_d, hi_full, hi, T, eps,
        D, BLOCK_N, CAUSAL, True, PRE_QK, PRE_V, PREC,
    )  # fmt: skip

    o_MD = acc_MD / l_M[:, None]
    if ROW:  # epilogue C O: the scale is kept for backward, the unscaled O is not
        ro_M = row_rscale(o_MD, D, eps)
        o_MD = o_MD * ro_M[:, None]
        tl.store(RO + pid_bh * T + offs_m, ro_M, mask=row_ok)
    tl.store(LSE + pid_bh * T + offs_m, m_M + tl.math.log2(l_M), mask=row_ok)
    store_rows(O + b * so_b + hq * so_h, o_MD, offs_m, so_t, offs_d, T, D)
