"""Backward Triton kernels of the fused preconditioned FlashAttention.

Legend: M query rows of a block, N key/value rows of a block, D head dim (BLOCK_D padded).
The attention backward runs on the normalised rows qn, kn, vn without materialising them
(the scales enter as row/column factors, as in the forward); the row-scale gradients are
folded into each kernel's epilogue, the rms-norm backward without gain:
    xn = x r, r = rsqrt(mean(x^2) + eps)  =>  dx = r (dxn - xn mean(dxn xn))
For `row`, `preprocess_kernel` turns dO into the gradient w.r.t. the unscaled output.
Two kernels, so that no atomics are needed: dk/dv (one program per key block and key/value
head, looping over its query heads: GQA sums in registers) and dq (one per query block).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_attention_fwd import row_rscale


@triton.jit
def preprocess_kernel(
    O, DO, RO, DELTA, DOP,
    so_b, so_h, so_t, sdo_b, sdo_h, sdo_t,
    T, Hq, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ROW: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO' * O') of the pre-epilogue output O' (B*Hq, T) fp32. For ROW,
    O = O' ro, so dO' = ro (dO - O mean(dO O)) is written to DOP (B, Hq, T, D contiguous):
    a gradient, read by both kernels, cheaper than recomputing it in every dk/dv step."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    ok = row_ok[:, None] & (offs_d[None, :] < D)
    o_MD = tl.load(O + b * so_b + hq * so_h + offs_m[:, None] * so_t + offs_d[None, :], mask=ok, other=0.0)
    do_MD = tl.load(DO + b * sdo_b + hq * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :], mask=ok, other=0.0)
    o_MD = o_MD.to(tl.float32)
    do_MD = do_MD.to(tl.float32)
    if ROW:
        ro_M = tl.load(RO + pid_bh * T + offs_m, mask=row_ok, other=1.0)
        mean_M = tl.sum(do_MD * o_MD, 1) / D
        do_MD = ro_M[:, None] * (do_MD - o_MD * mean_M[:, None])
        o_MD = o_MD / ro_M[:, None]
        dop = DOP + pid_bh * T * D + offs_m[:, None] * D + offs_d[None, :]
        tl.store(dop, do_MD.to(DOP.dtype.element_ty), mask=ok)
    tl.store(DELTA + pid_bh * T + offs_m, tl.sum(do_MD * o_MD, 1), mask=row_ok)


@triton.jit
def _dkdv_inner(
    dk_ND, dv_ND, k_ND, v_ND, rk_N, rv_N, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_qt, stride_dot,
    cols, offs_d, lo, hi, T, sm_scale, eps,
    D: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
    PRE_QK: tl.constexpr, PRE_V: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Accumulate dkn (in log2-scaled units) and dvn over query blocks [lo, hi)."""
    offs_m = tl.arange(0, BLOCK_M)
    d_ok = offs_d[None, :] < D
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        ok = (rows[:, None] < T) & d_ok
        q_MD = tl.load(q_ptr + rows[:, None] * stride_qt + offs_d[None, :], mask=ok, other=0.0)
        q_scale = tl.full([BLOCK_M], sm_scale * 1.4426950408889634, tl.float32)
        if PRE_QK:
            q_scale = q_scale * row_rscale(q_MD.to(tl.float32), D, eps)
        qs_MD = (q_MD.to(tl.float32) * q_scale[:, None]).to(q_MD.dtype)
        # rows past T get lse = +inf, hence P = 0 and no contribution (and no NaN)
        lse_M = tl.load(lse_ptr + rows, mask=rows < T, other=float("inf"))
        sT_NM = tl.dot(k_ND, tl.trans(qs_MD), input_precision=PREC)
        if PRE_QK:
            sT_NM = sT_NM * rk_N[:, None]
        pT_NM = tl.math.exp2(sT_NM - lse_M[None, :])
        if MASK:
            pT_NM = tl.where(rows[None, :] >= cols[:, None], pT_NM, 0.0)
        do_MD = tl.load(do_ptr + rows[:, None] * stride_dot + offs_d[None, :], mask=ok, other=0.0)
        dv_ND += tl.dot(pT_NM.to(do_MD.dtype), do_MD, input_precision=PREC)
        dpT_NM = tl.dot(v_ND, tl.trans(do_MD), input_precision=PREC)
        if PRE_V:
            dpT_NM = dpT_NM * rv_N[:, None]
        delta_M = tl.load(delta_ptr + rows, mask=rows < T, other=0.0)
        dsT_NM = pT_NM * (dpT_NM - delta_M[None, :])
        dk_ND += tl.dot(dsT_NM.to(qs_MD.dtype), qs_MD, input_precision=PREC)
    return dk_ND, dv_ND


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
    T, Hq, Hkv, GROUP, sm_scale, eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    PRE_QK: tl.constexpr, PRE_V: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N key/value rows of one (batch, kv head), all GROUP query heads.
    Writes DK, DV (B, Hkv, T, D contiguous)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (cols[:, None] < T) & (offs_d[None, :] < D)
    k_ptrs = K + b * sk_b + hkv * sk_h + cols[:, None] * sk_t + offs_d[None, :]
    v_ptrs = V + b * sv_b + hkv * sv_h + cols[:, None] * sv_t + offs_d[None, :]
    k_ND = tl.load(k_ptrs, mask=ok, other=0.0)
    v_ND = tl.load(v_ptrs, mask=ok, other=0.0)
    rk_N = row_rscale(k_ND.to(tl.float32), D, eps)
    rv_N = row_rscale(v_ND.to(tl.float32), D, eps)
    dk_ND = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_ND = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start_n = pid_n * BLOCK_N
    for g in range(GROUP):
        hq = hkv * GROUP + g
        q_ptr = Q + b * sq_b + hq * sq_h
        do_ptr = DO + b * sdo_b + hq * sdo_h
        lse_ptr = LSE + (b * Hq + hq) * T
        delta_ptr = DELTA + (b * Hq + hq) * T
        if CAUSAL:  # the diagonal block is masked; query blocks below it see every key
            dk_ND, dv_ND = _dkdv_inner(
                dk_ND, dv_ND, k_ND, v_ND, rk_N, rv_N, q_ptr, do_ptr, lse_ptr, delta_ptr, sq_t, sdo_t,
                cols, offs_d, start_n, start_n + BLOCK_N, T, sm_scale, eps, D, BLOCK_M, True, PRE_QK, PRE_V, PREC,
            )  # fmt: skip
            lo = start_n + BLOCK_N
        else:
            lo = 0
        dk_ND, dv_ND = _dkdv_inner(
            dk_ND, dv_ND, k_ND, v_ND, rk_N, rv_N, q_ptr, do_ptr, lse_ptr, delta_ptr, sq_t, sdo_t,
            cols, offs_d, lo, T, T, sm_scale, eps, D, BLOCK_M, False, PRE_QK, PRE_V, PREC,
        )  # fmt: skip

    dk_ND = dk_ND * 0.6931471805599453  # qs carries sm_scale * log2(e); dkn = sm_scale dS^T qn
    if PRE_QK:  # rms-norm backward through C_K (reload: shorter register lifetimes in the loop)
        kn_ND = tl.load(k_ptrs, mask=ok, other=0.0).to(tl.float32) * rk_N[:, None]
        dk_ND = rk_N[:, None] * (dk_ND - kn_ND * (tl.sum(dk_ND * kn_ND, 1) / D)[:, None])
    if PRE_V:
        vn_ND = tl.load(v_ptrs, mask=ok, other=0.0).to(tl.float32) * rv_N[:, None]
        dv_ND = rv_N[:, None] * (dv_ND - vn_ND * (tl.sum(dv_ND * vn_ND, 1) / D)[:, None])
    out = pid_bh * T * D + cols[:, None] * D + offs_d[None, :]
    tl.store(DK + out, dk_ND.to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + out, dv_ND.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _dq_inner(
    dq_MD, qs_MD, do_MD, lse_M, delta_M, k_ptr, v_ptr, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T, eps,
    D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
    PRE_QK: tl.constexpr, PRE_V: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Accumulate dS kn over key blocks [lo, hi) for one query block."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d[None, :] < D
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = (cols[:, None] < T) & d_ok
        k_ND = tl.load(k_ptr + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_ok, other=0.0)
        v_ND = tl.load(v_ptr + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_ok, other=0.0)
        s_MN = tl.dot(qs_MD, tl.trans(k_ND), input_precision=PREC)
        if PRE_QK:
            rk_N = row_rscale(k_ND.to(tl.float32), D, eps)
            s_MN = s_MN * rk_N[None, :]
        p_MN = tl.math.exp2(s_MN - lse_M[:, None])
        if MASK:
            ok = cols[None, :] < T
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None])
            p_MN = tl.where(ok, p_MN, 0.0)
        dp_MN = tl.dot(do_MD, tl.trans(v_ND), input_precision=PREC)
        if PRE_V:
            dp_MN = dp_MN * row_rscale(v_ND.to(tl.float32), D, eps)[None, :]
        ds_MN = p_MN * (dp_MN - delta_M[:, None])
        if PRE_QK:  # dS kn = (dS C_K) k
            ds_MN = ds_MN * rk_N[None, :]
        dq_MD += tl.dot(ds_MN.to(k_ND.dtype), k_ND, input_precision=PREC)
    return dq_MD


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
    T, Hq, GROUP, sm_scale, eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    PRE_QK: tl.constexpr, PRE_V: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one (batch, query head). Writes DQ (B, Hq, T, D contiguous)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    hkv = hq // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    ok = row_ok[:, None] & (offs_d[None, :] < D)
    q_MD = tl.load(Q + b * sq_b + hq * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=ok, other=0.0)
    do_MD = tl.load(DO + b * sdo_b + hq * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :], mask=ok, other=0.0)
    rq_M = row_rscale(q_MD.to(tl.float32), D, eps)
    q_scale = tl.full([BLOCK_M], sm_scale * 1.4426950408889634, tl.float32)
    if PRE_QK:
        q_scale = q_scale * rq_M
    qs_MD = (q_MD.to(tl.float32) * q_scale[:, None]).to(q_MD.dtype)
    lse_M = tl.load(LSE + pid_bh * T + offs_m, mask=row_ok, other=float("inf"))
    delta_M = tl.load(DELTA + pid_bh * T + offs_m, mask=row_ok, other=0.0)

    dq_MD = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        hi_full = pid_m * BLOCK_M
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    else:
        hi_full = (T // BLOCK_N) * BLOCK_N
        hi = T
    k_ptr = K + b * sk_b + hkv * sk_h
    v_ptr = V + b * sv_b + hkv * sv_h
    dq_MD = _dq_inner(
        dq_MD, qs_MD, do_MD, lse_M, delta_M, k_ptr, v_ptr, sk_t, sv_t, offs_m, offs_d, 0, hi_full, T, eps,
        D, BLOCK_N, CAUSAL, False, PRE_QK, PRE_V, PREC,
    )  # fmt: skip
    dq_MD = _dq_inner(
        dq_MD, qs_MD, do_MD, lse_M, delta_M, k_ptr, v_ptr, sk_t, sv_t, offs_m, offs_d, hi_full, hi, T, eps,
        D, BLOCK_N, CAUSAL, True, PRE_QK, PRE_V, PREC,
    )  # fmt: skip

    dq_MD = dq_MD * sm_scale
    if PRE_QK:
        qn_MD = q_MD.to(tl.float32) * rq_M[:, None]
        dq_MD = rq_M[:, None] * (dq_MD - qn_MD * (tl.sum(dq_MD * qn_MD, 1) / D)[:, None])
    tl.store(DQ + pid_bh * T * D + offs_m[:, None] * D + offs_d[None, :], dq_MD.to(DQ.dtype.element_ty), mask=ok)
