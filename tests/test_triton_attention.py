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
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

triton_attention = pytest.importorskip("kernels.triton_attention")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels import PRECONDITIONERS, Preconditioner, attention, resolve_backend  # noqa: E402
from kernels import backends as backends_mod  # noqa: E402
from kernels.triton_tiles import program_block  # noqa: E402
from tests.reference import attention_reference, attention_reference64, output_and_grads  # noqa: E402

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


def check_against_float64(shape, precondition, causal, dtype, rel_tol):
    B, Hq, Hkv, T, D = shape
    q, k, v = make_qkv(B, Hq, Hkv, T, D, dtype)
    do = torch.randn(B, Hq, T, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(q.device)
    return check_inputs_against_float64(q, k, v, do, precondition, causal, rel_tol)


def check_inputs_against_float64(q, k, v, do, precondition, causal, rel_tol):
    """Output and gradients of the kernel at (q, k, v, do) against attention_reference64's, each within
    rel_tol of its largest entry."""
    fused = lambda q, k, v: attention(q, k, v, precondition=precondition, backend="triton", causal=causal, eps=EPS)
    ref = lambda q, k, v: attention_reference64(q, k, v, precondition, causal, EPS)
    got = output_and_grads(fused, q, k, v, do)
    want = output_and_grads(ref, *(t.double() for t in (q, k, v)), do)
    assert got[0].shape == q.shape and got[0].dtype == q.dtype
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


def test_fp16_loss_scaled_rows_of_tiny_norm_keep_finite_gradients():
    """fp16, dO scaled by 256 (loss scaling), one q row per head of rms 2e-3 (1/rms ~ 450): dS
    times that 1/rms passes fp16's 65504, so a backward that casts dS C_Q for its dK dot gets inf
    in dK; dS enters the dots unscaled (qs holds C_Q), as FlashAttention-2 casts it. Key 1 sits
    near key 0, which keeps the true dq of the tiny row (~2.7e4) inside fp16 too."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 24, 32, generator=g, dtype=torch.float64) * 2 for h in (2, 1, 1))
    q[:, :, 1] *= 1e-3
    k[:, :, 1] = k[:, :, 0] + 0.5 * torch.randn(32, generator=g, dtype=torch.float64)
    do = torch.randn(1, 2, 24, 32, generator=g, dtype=torch.float64) * 256
    q, k, v = (t.to(DEVICE, torch.float16) for t in (q, k, v))
    got = check_inputs_against_float64(q, k, v, do.to(DEVICE), "qkv", causal=True, rel_tol=1e-2)
    assert all(bool(t.isfinite().all()) for t in got)


def test_strided_inputs_give_the_same_result():
    q, k, v = make_qkv(1, 4, 2, 19, 16)
    as_btHd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]  # model layout views
    assert not as_btHd[0].is_contiguous()
    do = torch.randn_like(q)
    fn = lambda q, k, v: attention(q, k, v, precondition="qkv", backend="triton")
    for a, b in zip(output_and_grads(fn, q, k, v, do), output_and_grads(fn, *as_btHd, do), strict=True):
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


def test_fp32_is_refused_on_a_gpu(monkeypatch):
    """fp32 runs in the interpreter only: compiled, its IEEE dots spill at every block shape."""
    monkeypatch.setattr(triton_attention, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(triton_attention, "_GPU_REASONS", {})
    gpu = torch.device("cuda", 0)
    on_gpu = lambda dtype: SimpleNamespace(dtype=dtype, device=gpu, shape=(1, 2, 8, 64), dim=lambda: 4)
    assert "takes bf16 or fp16 on a GPU" in triton_attention.unavailable_reason(on_gpu(torch.float32))
    assert triton_attention.unavailable_reason(on_gpu(torch.bfloat16)) is None


def test_head_dims_past_the_tiles_are_refused_and_auto_falls_back(monkeypatch):
    q, k, v = make_qkv(1, 2, 1, 8, 256)
    assert "head dims up to 128" in triton_attention.unavailable_reason(q)
    with pytest.raises(ValueError, match="head dims up to 128, got 256"):
        attention(q, k, v, backend="triton")
    B = backends_mod.BACKENDS
    monkeypatch.setitem(B, "flash", backends_mod.Backend("flash", B["flash"].run, False, lambda q, device: None))
    assert resolve_backend("auto", q, device="cuda") == "flash"  # the real triton check, on a "GPU"


def test_block_shapes_keep_the_diagonal_aligned_and_fit_shared_memory():
    """Every kernel has block shapes at each head dim and dtype, each keeping the causal diagonal
    aligned and within the shared-memory plan, which fits an A100's 163 KiB per block and so an
    H100's. Registers and spills are the compiled kernels' (the `extra` compile test below)."""
    assert triton_attention.SMEM_BYTES <= 163 * 1024
    for kernel in ("fwd", "dkdv", "dq"):
        for block_d in (16, 32, 64, 128):
            for elem in (2, 4):
                shapes = triton_attention.tile_configs(kernel, block_d, elem)
                if elem == 2:  # bf16/fp16, compiled: none of the listed shapes is dropped
                    assert shapes == triton_attention.BLOCKS[(kernel, 64 if block_d <= 64 else 128)]
                assert shapes, (kernel, block_d, elem)
                for m, n, _, stages in shapes:
                    assert (m % n if kernel != "dkdv" else n % m) == 0, (kernel, m, n)
                    smem = triton_attention.smem_bytes(kernel, m, n, stages, block_d, elem)
                    assert smem <= triton_attention.SMEM_BYTES, (kernel, m, n, stages)


@triton.jit
def _record_blocks(OUT, T, BLOCK: tl.constexpr, LAST_FIRST: tl.constexpr):
    pid_bh, block = program_block(T, BLOCK, LAST_FIRST)
    tl.store(OUT + 2 * tl.program_id(0), pid_bh.to(tl.int32))
    tl.store(OUT + 2 * tl.program_id(0) + 1, block)


@pytest.mark.parametrize("last_first", [False, True])
def test_program_ids_map_to_row_blocks_head_by_head(last_first):
    """The 1-D grid: program p takes head p // blocks and, of its blocks, p % blocks in order, or
    for causal query blocks (last_first) the last first: the longest programs start first."""
    T, BLOCK, heads = 40, 16, 3
    blocks = math.ceil(T / BLOCK)
    out = torch.full((blocks * heads, 2), -1, dtype=torch.int32, device=DEVICE)
    _record_blocks[(blocks * heads,)](out, T, BLOCK, last_first)
    order = [blocks - 1 - i if last_first else i for i in range(blocks)]
    assert out.tolist() == [[h, b] for h in range(heads) for b in order]


def test_gpu_capability_is_read_once_per_device(monkeypatch):
    """The kernel's Ampere check reads a device's capability once (when attention() resolves its
    backend), and torch.compile keeps the answer: compiled calls query no device."""
    calls = []

    def capability(device):
        calls.append(device)
        return (7, 5) if device.index == 1 else (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(triton_attention, "INTERPRET", False)
    monkeypatch.setattr(triton_attention, "_GPU_REASONS", {})
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    why = lambda x: x + len(triton_attention.unavailable_reason(device=gpu0) or "")
    compiled = torch.compile(why, backend="eager", fullgraph=True)
    for _ in range(3):
        assert compiled(torch.ones(2)).tolist() == [1.0, 1.0]
    assert triton_attention.unavailable_reason(device=gpu0) is None
    assert "compute capability 8.0+" in triton_attention.unavailable_reason(device=gpu1)
    assert calls == [gpu0, gpu1]


def test_torch_compile_keeps_the_kernel_in_one_graph():
    """train.compile: the forward and backward are custom ops, so dynamo neither traces into the
    Triton launches nor breaks the graph, and the compiled call gives the eager numbers."""
    q, k, v = make_qkv(1, 2, 1, 19, 16)
    do = torch.randn_like(q)
    fn = lambda q, k, v: attention(q, k, v, precondition="qkv", backend="triton")
    explained = torch._dynamo.explain(fn)(q, k, v)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for a, b in zip(output_and_grads(fn, q, k, v, do), output_and_grads(compiled, q, k, v, do), strict=True):
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
    for a, b in zip(output_and_grads(fn, q, k, v, do), output_and_grads(compiled, q, k, v, do), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_long_sequence_and_fp32_goes_to_sdpa():
    check_against_float64((1, 4, 4, 4096 + 17, 64), "qkv", causal=True, dtype=torch.bfloat16, rel_tol=2e-2)
    q, k, v = make_qkv(1, 2, 1, 64, 64, torch.float32, device="cuda")
    with pytest.raises(ValueError, match="takes bf16 or fp16 on a GPU"):
        attention(q, k, v, backend="triton")
    assert resolve_backend("auto", q) == "sdpa"


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


def _nvidia_compiler_missing() -> str | None:
    """Why Triton cannot compile for NVIDIA targets on this machine (None when it can): the
    compile needs Triton's NVIDIA backend and the ptxas it bundles, not a GPU."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = {arch: get_ptxas(arch).path for arch in (80, 90)}
    except Exception as e:  # noqa: BLE001 - any failure here means no offline NVIDIA compile
        return f"Triton cannot compile for sm_80/sm_90 offline here ({type(e).__name__}: {e})"
    missing = [path for path in ptxas.values() if not path or not os.path.exists(path)]
    return f"Triton's bundled ptxas is missing ({missing[0]})" if missing else None


@pytest.mark.extra
def test_default_block_shapes_compile_for_h100_and_a100_without_spills():
    """Triton compiles for a GPU target without a GPU (bench/compile_check.py, in a process
    without TRITON_INTERPRET): the default block shape tile_configs picks for the forward, dK/dV
    and dQ kernels, for sm_90 and sm_80, head dim 64 and 128, bf16, causal and not, with the
    preconditioner's scales on (the forward also with the output scale), specialised as
    Triton's JIT does for a training call: each compiles, spills no register and fits the
    target's shared memory per block. Prints its duration."""
    import subprocess
    import sys
    import time

    from tests.train_helpers import ROOT, env

    why = _nvidia_compiler_missing()
    if why:
        pytest.skip(why)
    sys.path.insert(0, str(ROOT / "bench"))
    import compile_check

    # the default block shapes in bf16: 128 compiles, 5 minutes with a cold Triton cache on 2 busy
    # cores; every autotuned shape and fp16 too (768, 30 minutes): python bench/compile_check.py
    want = list(compile_check.cases([90, 80], [64, 128], ["bf16"], defaults_only=True))
    e = env()
    e.pop("TRITON_INTERPRET", None)
    start = time.monotonic()
    cmd = [sys.executable, str(ROOT / "bench/compile_check.py"), "--dtype", "bf16", "--defaults-only"]
    proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=900)
    print(f"compile_check: {len(want)} compiles in {time.monotonic() - start:.0f} s")
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| sm_")]
    assert len(rows) == len(want), proc.stdout[-3000:] + proc.stderr[-2000:]
    for cells, (arch, name, d, dtype, causal, _, (m, n, w, s), _) in zip(rows, want, strict=True):
        assert [c.strip() for c in cells[:5]] == [f"sm_{arch}", name, str(d), dtype, str(causal)], cells
        assert cells[6].strip() == f"{m} x {n}, {w}, {s}", cells
        assert cells[8].strip().isdigit(), cells  # compiled: Triton reported its shared memory (KiB)
        assert cells[10].strip() == "0", f"spills: {cells}"
        assert cells[-1].strip() == "yes", f"past {compile_check.SMEM_LIMIT[arch]} B of shared memory: {cells}"
    assert proc.returncode == 0, proc.stdout[-3000:]
