"""Forward Triton kernel of causal FlashAttention with the preconditioner fused.

Legend: M query rows of one block, N key/value rows of one block, D head dim (BLOCK_D padded).
For `qk`/`qkv` the row scales r = 1/rms(row) come from the pre-pass (kernels/triton_tiles.py,
fp32, computed once per call). The program's resident q tile takes r_q and the softmax scale
once, qs = q (r_q sm_scale log2(e)) rounded to q's dtype; the streamed k and v take theirs as
fp32 column factors of the scores and probabilities: S = (qs k^T) * r_k[None, :], P C_V for v.
No normalised copy of q, k or v exists outside a program's registers and shared memory.
For `row` the output scale is the epilogue. Scores are kept in the log2 domain (exp2 is the
hardware instruction); the saved log-sum-exp is in that domain too.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_tiles import (
    LOG2E,
    dot_t,
    key_bounds,
    load_rows,
    load_scales,
    program_rows,
    row_rscale,
    scale_rows,
    store_rows,
    visible,
)


@triton.jit
def _fwd_inner(
    acc_MD, l_M, m_M, q_MD, k_ptr, v_ptr, rk_ptr, rv_ptr, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T,
    D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
    PRE_QK: tl.constexpr, PRE_V: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks [lo, hi) for q_MD, the scaled q tile; MASK applies the causal
    and tail masks."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ND = load_rows(k_ptr, cols, stride_kt, offs_d, T, D)
        s_MN = dot_t(q_MD, k_ND, load_scales(rk_ptr, cols, T, PRE_QK)[None, :], PRE_QK, PREC)
        if MASK:
            s_MN = visible(s_MN, offs_m[:, None], cols[None, :], T, float("-inf"), CAUSAL)
        m_new = tl.maximum(m_M, tl.max(s_MN, 1))
        p_MN = tl.math.exp2(s_MN - m_new[:, None])
        alpha = tl.math.exp2(m_M - m_new)
        l_M = l_M * alpha + tl.sum(p_MN, 1)
        v_ND = load_rows(v_ptr, cols, stride_vt, offs_d, T, D)
        if PRE_V:  # C_V as a column scale of P (P C_V V = P (C_V V))
            p_MN = p_MN * load_scales(rv_ptr, cols, T, PRE_V)[None, :]
        acc_MD = acc_MD * alpha[:, None] + tl.dot(p_MN.to(v_ND.dtype), v_ND, input_precision=PREC)
        m_M = m_new
    return acc_MD, l_M, m_M


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, RO, RQ, RK, RV,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
    T, Hq, GROUP, sm_scale, eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    PRE_QK: tl.constexpr, PRE_V: tl.constexpr, ROW: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one (batch, query head). Last-dim strides are 1.
    Reads the row scales RQ (B*Hq, T), RK and RV (B*Hkv, T) when PRE_QK / PRE_V.
    Writes O (B, Hq, T, D), LSE (B*Hq, T) fp32 log2-domain, RO (B*Hq, T) fp32 when ROW."""
    pid_bh, b, hq, offs_m = program_rows(Hq, T, BLOCK_M, CAUSAL)
    hkv = hq // GROUP
    kv_bh = b * (Hq // GROUP) + hkv
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    q_MD = load_rows(Q + b * sq_b + hq * sq_h, offs_m, sq_t, offs_d, T, D)
    q_MD = scale_rows(q_MD, load_scales(RQ + pid_bh * T, offs_m, T, PRE_QK) * (sm_scale * LOG2E))

    acc_MD = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_M = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    hi_full, hi = key_bounds(T, BLOCK_M, BLOCK_N, CAUSAL)
    k_ptr = K + b * sk_b + hkv * sk_h
    v_ptr = V + b * sv_b + hkv * sv_h
    rk_ptr = RK + kv_bh * T
    rv_ptr = RV + kv_bh * T
    acc_MD, l_M, m_M = _fwd_inner(
        acc_MD, l_M, m_M, q_MD, k_ptr, v_ptr, rk_ptr, rv_ptr, sk_t, sv_t, offs_m, offs_d, 0, hi_full, T,
        D, BLOCK_N, CAUSAL, False, PRE_QK, PRE_V, PREC,
    )  # fmt: skip
    acc_MD, l_M, m_M = _fwd_inner(
        acc_MD, l_M, m_M, q_MD, k_ptr, v_ptr, rk_ptr, rv_ptr, sk_t, sv_t, offs_m, offs_d, hi_full, hi, T,
        D, BLOCK_N, CAUSAL, True, PRE_QK, PRE_V, PREC,
    )  # fmt: skip

    o_MD = acc_MD / l_M[:, None]
    if ROW:  # epilogue C O: the scale is kept for backward, the unscaled O is not
        ro_M = row_rscale(o_MD, D, eps)
        o_MD = o_MD * ro_M[:, None]
        tl.store(RO + pid_bh * T + offs_m, ro_M, mask=row_ok)
    tl.store(LSE + pid_bh * T + offs_m, m_M + tl.math.log2(l_M), mask=row_ok)
    store_rows(O + b * so_b + hq * so_h, o_MD, offs_m, so_t, offs_d, T, D)
