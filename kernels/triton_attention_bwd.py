"""Backward Triton kernels of the fused preconditioned FlashAttention.

Legend: M query rows of a block, N key/value rows of a block, D head dim (BLOCK_D padded).
The attention backward runs on the normalised rows qn, kn, vn. With the `qk` scales on, the
backward's pre-pass (kernels/triton_tiles.scaled_rows_kernel) writes two operands once per
call, in the input dtype: qs = qn sm_scale log2(e) (the forward's scaled q tile) and kn; both
kernels stream and keep them as FlashAttention-2 does q and k, so S = qs kn^T needs no
per-element scale and dS enters its dots unscaled, in the range FlashAttention-2 casts it in
(never dS / rms(q), which can pass fp16's range where a row's rms is small). vn is the dK/dV
kernel's resident v times C_V (once per program), and a column factor of dP in the dQ kernel.
The forward's fp32 row scales are saved, not recomputed; the row-scale gradients are folded into
each kernel's epilogue, the rms-norm backward without gain (xn from the operands):
    xn = x r, r = rsqrt(mean(x^2) + eps)  =>  dx = r (dxn - xn mean(dxn xn))
For `row`, `preprocess_kernel` turns dO into the gradient w.r.t. the unscaled output.
Two kernels, so that no atomics are needed: dk/dv (one program per key block and key/value
head, looping over its query heads: GQA sums in registers) and dq (one per query block).
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
    program_block,
    program_rows,
    scale_rows,
    store_rows,
    visible,
)


@triton.jit
def rms_norm_bwd(dxn, xn, r, D: tl.constexpr):
    """dx = r (dxn - xn mean(dxn xn)) per row of fp32 tiles: the gradient through xn = x r, r = 1/rms(x)."""
    return r[:, None] * (dxn - xn * (tl.sum(dxn * xn, 1) / D)[:, None])


@triton.jit
def preprocess_kernel(
    O, DO, RO, DELTA, DOP,
    so_b, so_h, so_t, sdo_b, sdo_h, sdo_t,
    T, Hq, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ROW: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO' * O') of the pre-epilogue output O' (B*Hq, T) fp32. For ROW,
    O = O' ro, so dO' = ro (dO - O mean(dO O)) is written to DOP (B, Hq, T, D contiguous):
    a gradient, read by both kernels, cheaper than recomputing it in every dk/dv step."""
    pid_bh, b, hq, offs_m = program_rows(Hq, T, BLOCK_M, False)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    o_MD = load_rows(O + b * so_b + hq * so_h, offs_m, so_t, offs_d, T, D).to(tl.float32)
    do_MD = load_rows(DO + b * sdo_b + hq * sdo_h, offs_m, sdo_t, offs_d, T, D).to(tl.float32)
    if ROW:
        ro_M = tl.load(RO + pid_bh * T + offs_m, mask=row_ok, other=1.0)
        do_MD = rms_norm_bwd(do_MD, o_MD, ro_M, D)
        o_MD = o_MD / ro_M[:, None]
        store_rows(DOP + pid_bh * T * D, do_MD, offs_m, D, offs_d, T, D)
    tl.store(DELTA + pid_bh * T + offs_m, tl.sum(do_MD * o_MD, 1), mask=row_ok)


@triton.jit
def _dkdv_inner(
    dk_ND, dv_ND, k_ND, v_ND, q_ptr, do_ptr, lse_ptr, delta_ptr, sq_h, sq_t, sdo_h, sdo_t, cols, offs_d,
    lo, blocks, steps, T,
    D: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Accumulate dS^T q and dv over `steps` query blocks, `blocks` per query head from the
    pointers' head on: rows lo, lo + BLOCK_M, ..., then the next head (MASK: the causal
    diagonal). One loop over the GROUP heads' blocks, not a loop per head: nested pipelined
    loops cost registers. S^T = k_ND q^T: the softmax scale is in one of the two."""
    offs_m = tl.arange(0, BLOCK_M)
    start_m = lo
    for _ in range(0, steps):
        rows = start_m + offs_m
        q_MD = load_rows(q_ptr, rows, sq_t, offs_d, T, D)
        # rows past T get lse = +inf, hence P = 0 and no contribution (and no NaN)
        lse_M = tl.load(lse_ptr + rows, mask=rows < T, other=float("inf"))
        pT_NM = tl.math.exp2(tl.dot(k_ND, tl.trans(q_MD), input_precision=PREC) - lse_M[None, :])
        if MASK:
            pT_NM = visible(pT_NM, rows[None, :], cols[:, None], T, 0.0, True)
        do_MD = load_rows(do_ptr, rows, sdo_t, offs_d, T, D)
        dv_ND += tl.dot(pT_NM.to(do_MD.dtype), do_MD, input_precision=PREC)
        dpT_NM = tl.dot(v_ND, tl.trans(do_MD), input_precision=PREC)
        delta_M = tl.load(delta_ptr + rows, mask=rows < T, other=0.0)
        dsT_NM = pT_NM * (dpT_NM - delta_M[None, :])
        dk_ND += tl.dot(dsT_NM.to(q_MD.dtype), q_MD, input_precision=PREC)
        # the next block, or the next head's first: scalar steps, no division per tile
        next_head = start_m + BLOCK_M >= lo + blocks * BLOCK_M
        start_m = tl.where(next_head, lo, start_m + BLOCK_M)
        q_ptr += tl.where(next_head, sq_h, 0)
        do_ptr += tl.where(next_head, sdo_h, 0)
        lse_ptr += tl.where(next_head, T, 0)
        delta_ptr += tl.where(next_head, T, 0)
    return dk_ND, dv_ND


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, RQ, RK, RV, DK, DV,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
    T, Hq, Hkv, GROUP, sm_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    PRE_QK: tl.constexpr, PRE_V: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N key/value rows of one (batch, kv head), all GROUP query heads.
    Q and K are the backward's operands (PRE_QK: qs and kn, see the module docstring). Writes
    DK, DV (B, Hkv, T, D contiguous)."""
    pid_bh, b, hkv, cols = program_rows(Hkv, T, BLOCK_N, False)  # causal: the first key block is the longest
    offs_d = tl.arange(0, BLOCK_D)
    k_ND = load_rows(K + b * sk_b + hkv * sk_h, cols, sk_t, offs_d, T, D)
    if not PRE_QK:  # the softmax scale, once into the resident k (PRE_QK: qs holds it)
        k_ND = (k_ND * (sm_scale * LOG2E)).to(k_ND.dtype)
    rv_N = load_scales(RV + pid_bh * T, cols, T, PRE_V)
    v_ND = load_rows(V + b * sv_b + hkv * sv_h, cols, sv_t, offs_d, T, D)
    if PRE_V:  # vn = C_V v, once into the resident tile: dP^T = vn dO^T
        v_ND = scale_rows(v_ND, rv_N)
    dk_ND = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_ND = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start_n = program_block(T, BLOCK_N, False)[1] * BLOCK_N
    hq0 = hkv * GROUP
    q_ptr = Q + b * sq_b + hq0 * sq_h
    do_ptr = DO + b * sdo_b + hq0 * sdo_h
    lse_ptr = LSE + (b * Hq + hq0) * T
    delta_ptr = DELTA + (b * Hq + hq0) * T
    lo = 0
    if CAUSAL:  # the diagonal block is masked; query blocks below it see every key
        diag = BLOCK_N // BLOCK_M
        dk_ND, dv_ND = _dkdv_inner(
            dk_ND, dv_ND, k_ND, v_ND, q_ptr, do_ptr, lse_ptr, delta_ptr, sq_h, sq_t, sdo_h, sdo_t, cols, offs_d,
            start_n, diag, GROUP * diag, T, D, BLOCK_M, True, PREC,
        )  # fmt: skip
        lo = start_n + BLOCK_N
    blocks = tl.maximum(tl.cdiv(T - lo, BLOCK_M), 0)
    dk_ND, dv_ND = _dkdv_inner(
        dk_ND, dv_ND, k_ND, v_ND, q_ptr, do_ptr, lse_ptr, delta_ptr, sq_h, sq_t, sdo_h, sdo_t, cols, offs_d,
        lo, blocks, GROUP * blocks, T, D, BLOCK_M, False, PREC,
    )  # fmt: skip

    # the rms-norm backward reloads kn and v: reading the resident tiles here would keep a copy of
    # each in registers through the loop
    if PRE_QK:  # dkn = sm_scale dS^T qn = dS^T qs / log2(e), then the backward through C_K
        kn_ND = load_rows(K + b * sk_b + hkv * sk_h, cols, sk_t, offs_d, T, D).to(tl.float32)
        dk_ND = rms_norm_bwd(dk_ND * (1.0 / LOG2E), kn_ND, load_scales(RK + pid_bh * T, cols, T, True), D)
    else:
        dk_ND = dk_ND * sm_scale
    if PRE_V:
        vn_ND = load_rows(V + b * sv_b + hkv * sv_h, cols, sv_t, offs_d, T, D).to(tl.float32) * rv_N[:, None]
        dv_ND = rms_norm_bwd(dv_ND, vn_ND, rv_N, D)
    store_rows(DK + pid_bh * T * D, dk_ND, cols, D, offs_d, T, D)
    store_rows(DV + pid_bh * T * D, dv_ND, cols, D, offs_d, T, D)


@triton.jit
def _dq_inner(
    dq_MD, q_MD, do_MD, lse_M, delta_M, k_ptr, v_ptr, rv_ptr, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T,
    D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
    PRE_V: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Accumulate dS k (dq / sm_scale before the C_Q backward) over key blocks [lo, hi) of one
    query block, q_MD holding the softmax scale: P = exp2(S - lse) from the forward's
    log-sum-exp, dS = P (dP - delta), dP = dO vn^T."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ND = load_rows(k_ptr, cols, stride_kt, offs_d, T, D)
        v_ND = load_rows(v_ptr, cols, stride_vt, offs_d, T, D)
        p_MN = tl.math.exp2(tl.dot(q_MD, tl.trans(k_ND), input_precision=PREC) - lse_M[:, None])
        if MASK:
            p_MN = visible(p_MN, offs_m[:, None], cols[None, :], T, 0.0, CAUSAL)
        dp_MN = dot_t(do_MD, v_ND, load_scales(rv_ptr, cols, T, PRE_V)[None, :], PRE_V, PREC)
        ds_MN = p_MN * (dp_MN - delta_M[:, None])
        dq_MD += tl.dot(ds_MN.to(k_ND.dtype), k_ND, input_precision=PREC)
    return dq_MD


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, RQ, RK, RV, DQ,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
    T, Hq, GROUP, sm_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    PRE_QK: tl.constexpr, PRE_V: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one (batch, query head). Q and K are the backward's
    operands (PRE_QK: qs and kn, see the module docstring). Writes DQ (B, Hq, T, D contiguous)."""
    pid_bh, b, hq, offs_m = program_rows(Hq, T, BLOCK_M, CAUSAL)
    hkv = hq // GROUP
    kv_bh = b * (Hq // GROUP) + hkv
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    q_MD = load_rows(Q + b * sq_b + hq * sq_h, offs_m, sq_t, offs_d, T, D)
    if not PRE_QK:  # the softmax scale, once into the resident q (PRE_QK: qs holds it)
        q_MD = (q_MD * (sm_scale * LOG2E)).to(q_MD.dtype)
    do_MD = load_rows(DO + b * sdo_b + hq * sdo_h, offs_m, sdo_t, offs_d, T, D)
    lse_M = tl.load(LSE + pid_bh * T + offs_m, mask=row_ok, other=float("inf"))
    delta_M = tl.load(DELTA + pid_bh * T + offs_m, mask=row_ok, other=0.0)

    dq_MD = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi_full, hi = key_bounds(T, BLOCK_M, BLOCK_N, CAUSAL)
    k_ptr = K + b * sk_b + hkv * sk_h
    v_ptr = V + b * sv_b + hkv * sv_h
    rv_ptr = RV + kv_bh * T
    dq_MD = _dq_inner(
        dq_MD, q_MD, do_MD, lse_M, delta_M, k_ptr, v_ptr, rv_ptr, sk_t, sv_t, offs_m, offs_d, 0, hi_full, T,
        D, BLOCK_N, CAUSAL, False, PRE_V, PREC,
    )  # fmt: skip
    dq_MD = _dq_inner(
        dq_MD, q_MD, do_MD, lse_M, delta_M, k_ptr, v_ptr, rv_ptr, sk_t, sv_t, offs_m, offs_d, hi_full, hi, T,
        D, BLOCK_N, CAUSAL, True, PRE_V, PREC,
    )  # fmt: skip

    dq_MD = dq_MD * sm_scale  # dqn = sm_scale dS kn
    if PRE_QK:  # rms-norm backward through C_Q: the saved scale, qn = qs / (sm_scale log2(e)) reloaded
        qn_MD = load_rows(Q + b * sq_b + hq * sq_h, offs_m, sq_t, offs_d, T, D).to(tl.float32) * (
            1.0 / (sm_scale * LOG2E)
        )
        dq_MD = rms_norm_bwd(dq_MD, qn_MD, load_scales(RQ + pid_bh * T, offs_m, T, True), D)
    store_rows(DQ + pid_bh * T * D, dq_MD, offs_m, D, offs_d, T, D)
