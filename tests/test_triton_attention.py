"""The fused Triton kernel (backend="triton") against independent float64 references.

On the CPU these run the kernels in Triton's interpreter (TRITON_INTERPRET=1, set by
run_tests.sh and below), at small sizes; tests marked `cuda` run the compiled kernels. On a
CUDA machine the environment decides: TRITON_INTERPRET unset or 0 compiles the kernels
(bench/gpu_check.sh), 1 interprets them. Speed is not tested here: `python -m bench.attention`
prints the table and the fused kernel's targets against SDPA.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (decoration time)

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

triton_attention = pytest.importorskip("kernels.triton_attention")

from kernels import PRECONDITIONERS, Preconditioner, attention, resolve_backend  # noqa: E402
from kernels import backends as backends_mod  # noqa: E402
from tests.reference import attention_reference  # noqa: E402

CUDA = torch.cuda.is_available()
RUNNABLE = triton_attention.INTERPRET or CUDA
pytestmark = pytest.mark.skipif(not RUNNABLE, reason="needs a CUDA GPU or TRITON_INTERPRET=1 before import")
DEVICE = "cuda" if CUDA and not triton_attention.INTERPRET else "cpu"
PRECONDS = sorted(PRECONDITIONERS)
EPS = 1e-6


def make_qkv(B, Hq, Hkv, T, D, dtype=torch.float32, device=DEVICE, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + T * 10 + D)
    shapes = [(B, Hq, T, D), (B, Hkv, T, D), (B, Hkv, T, D)]
    return [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(device, dtype) for s in shapes]


def reference64(q, k, v, precondition, causal=True, eps=EPS):
    """Plain float64 torch formula (autograd gives the reference gradients); no project code."""
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if precondition in ("qk", "qkv"):
        q, k = rms(q), rms(k)
    if precondition == "qkv":
        v = rms(v)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[2]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    o = s.softmax(-1) @ v
    return rms(o) if precondition == "row" else o


def grads(fn, q, k, v, do):
    """Output and (dq, dk, dv) of fn at (q, k, v) for the output gradient do."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do.to(o.dtype))
    return o.detach(), q.grad, k.grad, v.grad


def check_against_float64(shape, precondition, causal, dtype, rel_tol):
    B, Hq, Hkv, T, D = shape
    q, k, v = make_qkv(B, Hq, Hkv, T, D, dtype)
    do = torch.randn(B, Hq, T, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(q.device)
    fused = lambda q, k, v: attention(q, k, v, precondition=precondition, backend="triton", causal=causal, eps=EPS)
    ref = lambda q, k, v: reference64(q, k, v, precondition, causal)
    got = grads(fused, q, k, v, do)
    want = grads(ref, *(t.double() for t in (q, k, v)), do)
    assert got[0].shape == (B, Hq, T, D) and got[0].dtype == dtype
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.shape == b.shape, name
        scale = float(b.abs().max())
        torch.testing.assert_close(a.double(), b, rtol=rel_tol, atol=rel_tol * scale, msg=lambda m, n=name: f"{n}: {m}")
    return got


# fp32 data, fp32 math (IEEE dots): each output/gradient entry sums at most T*D ~ 1e3 rounded
# products (relative step 2^-24 ~ 6e-8) plus exp2/rsqrt ulps; 1e-5 of the largest entry is
# ~150 steps, while a missing or wrong scale-gradient term is off by O(1) relative.
FP32_TOL = 1e-5
SHAPES = [
    (1, 2, 2, 16, 16),  # exactly one block (interpreter block = 16)
    (2, 4, 2, 37, 16),  # GQA, T not a multiple of the block
    (1, 4, 1, 21, 32),  # multi-query, two blocks with a tail
    (1, 2, 1, 5, 8),  # T and D smaller than a block (padded head dim)
]


@pytest.mark.parametrize("precondition", PRECONDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_grads_match_float64(shape, precondition):
    check_against_float64(shape, precondition, causal=True, dtype=torch.float32, rel_tol=FP32_TOL)


@pytest.mark.parametrize("precondition", PRECONDS)
def test_non_causal_matches_float64(precondition):
    check_against_float64((1, 4, 2, 19, 16), precondition, causal=False, dtype=torch.float32, rel_tol=FP32_TOL)


def test_forward_matches_numpy_reference():
    q, k, v = make_qkv(2, 4, 2, 23, 16)
    for p in PRECONDS:
        out = attention(q, k, v, precondition=p, backend="triton")
        ref = attention_reference(q.cpu(), k.cpu(), v.cpu(), p)
        np.testing.assert_allclose(out.cpu().double().numpy(), ref, rtol=FP32_TOL, atol=FP32_TOL)


@pytest.mark.parametrize("precondition", ["none", "qkv", "row"])
def test_fp16_matches_float64(precondition):
    # fp16 (10 mantissa bits, step 2^-11 ~ 5e-4): inputs, P and dS are rounded before the dots,
    # each sum of ~T terms; 1e-2 of the largest entry is ~20 steps. (bf16 runs in the CUDA tests:
    # Triton's interpreter mis-multiplies bf16 dots, which it stores as raw uint16.)
    check_against_float64((1, 2, 1, 33, 32), precondition, causal=True, dtype=torch.float16, rel_tol=1e-2)


def test_strided_inputs_give_the_same_result():
    q, k, v = make_qkv(1, 4, 2, 19, 16)
    as_btHd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]  # model layout views
    assert not as_btHd[0].is_contiguous()
    do = torch.randn_like(q)
    fn = lambda q, k, v: attention(q, k, v, precondition="qkv", backend="triton")
    for a, b in zip(grads(fn, q, k, v, do), grads(fn, *as_btHd, do), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_causality():
    q, k, v = make_qkv(1, 2, 1, 20, 16)
    t = 11
    base = attention(q, k, v, precondition="qkv", backend="triton")
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t:] += 5 * torch.randn_like(x[:, :, t:])
    moved = attention(q2, k2, v2, precondition="qkv", backend="triton")
    torch.testing.assert_close(moved[:, :, :t], base[:, :, :t], rtol=0, atol=0)
    assert not torch.allclose(moved[:, :, t:], base[:, :, t:])


def test_unknown_fused_preconditioner_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(PRECONDITIONERS, "diag2", Preconditioner("diag2"))  # as register() would, undone after
    q, k, v = make_qkv(1, 2, 1, 8, 16)
    with pytest.raises(ValueError, match="fused Triton kernel does not implement"):
        attention(q, k, v, precondition="diag2", backend="triton")
    # the other backends still take it: a preconditioner that scales no rows is plain attention
    plain = attention(q, k, v, precondition="none", backend="sdpa")
    torch.testing.assert_close(attention(q, k, v, precondition="diag2", backend="sdpa"), plain, rtol=0, atol=0)


def test_wrong_dtype_and_cpu_without_interpreter_are_clear(monkeypatch):
    q, k, v = make_qkv(1, 2, 1, 8, 16, dtype=torch.float64, device="cpu")
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        attention(q, k, v, backend="triton")
    monkeypatch.setattr(triton_attention, "INTERPRET", False)
    with pytest.raises(ValueError, match="CUDA GPU, or TRITON_INTERPRET=1"):
        attention(q.float(), k.float(), v.float(), backend="triton")


def test_head_dims_past_the_tiles_are_refused_and_auto_falls_back(monkeypatch):
    q, k, v = make_qkv(1, 2, 1, 8, 256)
    assert "head dims up to 128" in triton_attention.unavailable_reason(q)
    with pytest.raises(ValueError, match="head dims up to 128, got 256"):
        attention(q, k, v, backend="triton")
    B = backends_mod.BACKENDS
    monkeypatch.setitem(B, "flash", backends_mod.Backend("flash", B["flash"].run, False, lambda q, device: None))
    assert resolve_backend("auto", q, device="cuda") == "flash"  # the real triton check, on a "GPU"


def test_block_shapes_fit_registers_and_shared_memory():
    """Every kernel has a default block shape at each head dim and dtype; the defaults keep the
    causal diagonal aligned, fit the shared-memory plan, and at D=128 keep each fp32 accumulator
    at 64 registers per thread or fewer (255 is the most a thread has)."""
    for kernel in ("fwd", "dkdv", "dq"):
        for block_d in (16, 32, 64, 128):
            for elem in (2, 4):
                m, n, warps, stages = triton_attention.tile_configs(kernel, block_d, elem)[0]
                assert (m % n if kernel != "dkdv" else n % m) == 0, (kernel, m, n)
                assert triton_attention.smem_bytes(kernel, m, n, stages, block_d, elem) <= triton_attention.SMEM_BYTES
                acc_rows = {"fwd": m, "dkdv": 2 * n, "dq": m}[kernel]  # dkdv holds dk and dv
                if block_d == 128 and elem == 2:
                    assert acc_rows * block_d / (32 * warps) <= 64, (kernel, m, n, warps)


def test_torch_compile_keeps_the_kernel_in_one_graph():
    """train.compile: the forward and backward are custom ops, so dynamo neither traces into the
    Triton launches nor breaks the graph, and the compiled call gives the eager numbers."""
    q, k, v = make_qkv(1, 2, 1, 19, 16)
    do = torch.randn_like(q)
    fn = lambda q, k, v: attention(q, k, v, precondition="qkv", backend="triton")
    explained = torch._dynamo.explain(fn)(q, k, v)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for a, b in zip(grads(fn, q, k, v, do), grads(compiled, q, k, v, do), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_auto_order(monkeypatch):
    assert resolve_backend("auto", device="cpu") == "sdpa"
    B = backends_mod.BACKENDS
    can = lambda q, device: None
    cannot = lambda q, device: "not here"
    monkeypatch.setitem(B, "triton", backends_mod.Backend("triton", B["triton"].run, True, can))
    monkeypatch.setitem(B, "flash", backends_mod.Backend("flash", B["flash"].run, False, can))
    assert resolve_backend("auto", device="cuda") == "triton"
    monkeypatch.setitem(PRECONDITIONERS, "diag2", Preconditioner("diag2"))
    assert resolve_backend("auto", device="cuda", precondition="diag2") == "flash"
    monkeypatch.setitem(B, "triton", backends_mod.Backend("triton", B["triton"].run, True, cannot))
    assert resolve_backend("auto", device="cuda") == "flash"
    monkeypatch.setitem(B, "flash", backends_mod.Backend("flash", B["flash"].run, False, cannot))
    assert resolve_backend("auto", device="cuda") == "sdpa"


# ---- CUDA only: compiled kernels, low precision, real head dims and lengths ----------------
# every preconditioner in bf16 at D 64 and 128, fp16 once: each variant is a few kernel compiles
CUDA_CASES = [(torch.bfloat16, D, p) for D in (64, 128) for p in PRECONDS] + [(torch.float16, 64, "qkv")]


@pytest.mark.parametrize("dtype, D, precondition", CUDA_CASES)
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_low_precision_matches_float64(dtype, D, precondition):
    # bf16 keeps 8 mantissa bits (step 2^-8 ~ 4e-3): 2e-2 of the largest entry is ~5 steps
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-2
    check_against_float64((2, 8, 2, 1000, D), precondition, causal=True, dtype=dtype, rel_tol=tol)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_inductor_compile_keeps_the_kernel():
    """train.compile on the GPU: inductor compiles the graph around the custom ops (fullgraph),
    and the compiled forward and gradients are the eager ones."""
    q, k, v = make_qkv(2, 8, 2, 1000, 64, torch.bfloat16, device="cuda")
    do = torch.randn_like(q)
    fn = lambda q, k, v: attention(q, k, v, precondition="qkv", backend="triton")
    compiled = torch.compile(fn, fullgraph=True)
    for a, b in zip(grads(fn, q, k, v, do), grads(compiled, q, k, v, do), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_fp32_long_sequence():
    check_against_float64((1, 4, 4, 4096 + 17, 64), "qkv", causal=True, dtype=torch.float32, rel_tol=FP32_TOL)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_offsets_past_2_31_elements():
    """q and o of 2.2e9 elements (17000 query heads on one key/value head): base offsets of the
    last heads pass 2^31, which int32 arithmetic would wrap. The last heads match SDPA."""
    g = torch.Generator(device="cuda").manual_seed(0)
    Hq, T, D = 17000, 1024, 128
    assert Hq * T * D > 2**31
    q = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 1, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    out = attention(q, k, v, precondition="qkv", backend="triton")
    tail = slice(Hq - 3, Hq)
    want = attention(q[:, tail], k, v, precondition="qkv", backend="sdpa")
    err = (out[:, tail].float() - want.float()).abs().max().item()
    del q, out
    assert err <= 2e-2 * want.float().abs().max().item(), err


@pytest.mark.extra
def test_default_block_shapes_compile_for_h100_and_a100_and_fit_shared_memory():
    """Triton compiles for a GPU target without a GPU (bench/compile_check.py, in a process
    without TRITON_INTERPRET): the default block shape of the forward, dK/dV and dQ kernels,
    bf16, head dim 128, causal and not, for sm_90 and sm_80: each compiles to a cubin within
    the target's shared memory per block. Register spills are reported, not asserted: the
    defaults spill at D=128 today (docs/benchmarks.md, "Compiled for real GPUs")."""
    import subprocess
    import sys

    from tests.train_helpers import ROOT, env

    cmd = [sys.executable, str(ROOT / "bench/compile_check.py"), "--arch", "90", "80", "--head-dim", "128"]
    cmd += ["--dtype", "bf16", "--defaults-only"]
    e = env()
    e.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| sm_")]
    assert len(rows) == 2 * 3 * 2, proc.stdout + proc.stderr[-2000:]
    for cells in rows:
        shared = cells[7].strip()
        assert shared.replace(".", "").isdigit(), cells  # compiled: Triton reported its shared memory
        limit = {"sm_90": 227, "sm_80": 163}[cells[0].strip()]
        assert float(shared) <= limit, cells
