import numpy as np
import pytest
import torch

from kernels import PRECONDITIONERS, attention
from tests.reference import attention_reference

PRECONDS = sorted(PRECONDITIONERS)


def make_qkv(B=2, Hq=4, Hkv=2, T=19, D=16, dtype=torch.float32, requires_grad=False, scale=1.0):
    g = torch.Generator().manual_seed(T * 100 + Hq)
    shapes = [(B, Hq, T, D), (B, Hkv, T, D), (B, Hkv, T, D)]
    return [
        (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(requires_grad)
        for s in shapes
    ]


@pytest.mark.parametrize("precondition", PRECONDS)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 19, 16), (1, 6, 6, 33, 8), (1, 4, 1, 1, 32)])
def test_matches_float64_reference(precondition, backend, shape):
    B, Hq, Hkv, T, D = shape
    q, k, v = make_qkv(B, Hq, Hkv, T, D, scale=3.0)
    out = attention(q, k, v, precondition=precondition, backend=backend)
    ref = attention_reference(q, k, v, precondition)
    assert out.shape == (B, Hq, T, D)
    # fp32 inputs, fp32 math on values of order 1 (rms-normalised or convex combinations); the
    # inputs' std of 3 gives logits of std up to 9, whose exp amplifies their rounding: errors of
    # up to about 1e-5 relative are seen (row: the rms of a nearly cancelled output); 1e-4 leaves
    # room for that and is still far below a missing or wrong scale (off by O(1)).
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precondition", PRECONDS)
def test_eager_and_sdpa_agree(precondition):
    q, k, v = make_qkv(T=37, scale=2.0)
    a = attention(q, k, v, precondition=precondition, backend="eager")
    b = attention(q, k, v, precondition=precondition, backend="sdpa")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    a16 = attention(qb, kb, vb, precondition=precondition, backend="eager")
    b16 = attention(qb, kb, vb, precondition=precondition, backend="sdpa")
    ref = torch.from_numpy(attention_reference(qb.float(), kb.float(), vb.float(), precondition))
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.0039). An output row is a convex
    # combination of value rows, so its error scales with the largest value entry (1 after
    # rms-normalisation); inputs, probabilities and products are each rounded: allow 8 steps.
    assert a16.dtype == b16.dtype == torch.bfloat16
    vmax = 1.0 if precondition == "qkv" else float(vb.abs().max())
    atol = 8 * 2**-8 * max(vmax, float(ref.abs().max()))
    torch.testing.assert_close(a16.double(), ref, rtol=0, atol=atol)
    torch.testing.assert_close(b16.double(), ref, rtol=0, atol=atol)


@pytest.mark.parametrize("precondition", PRECONDS)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_causality(precondition, backend):
    q, k, v = make_qkv(T=16)
    t = 9
    base = attention(q, k, v, precondition=precondition, backend=backend)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t] += torch.randn_like(x[:, :, t]) * 5
    moved = attention(q2, k2, v2, precondition=precondition, backend=backend)
    torch.testing.assert_close(moved[:, :, :t], base[:, :, :t], rtol=0, atol=0)
    assert not torch.allclose(moved[:, :, t:], base[:, :, t:])


@pytest.mark.parametrize("precondition", PRECONDS)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_gradcheck_float64(precondition, backend):
    q, k, v = make_qkv(B=1, Hq=2, Hkv=1, T=6, D=4, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: attention(q, k, v, precondition=precondition, backend=backend)
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


def test_preconditioner_changes_output():
    q, k, v = make_qkv(scale=3.0)
    outs = {p: attention(q, k, v, precondition=p, backend="sdpa") for p in PRECONDS}
    for a in PRECONDS:
        for b in PRECONDS:
            if a < b:
                assert not torch.allclose(outs[a], outs[b]), (a, b)


def test_unknown_names_and_missing_backends_are_clear():
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="choose one of"):
        attention(q, k, v, precondition="diag")
    with pytest.raises(ValueError, match="choose one of"):
        attention(q, k, v, backend="cudnn")
    with pytest.raises(ValueError, match="flash-attn"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q[:, :3], k, v)


def rope_float64(x: np.ndarray, theta: float) -> np.ndarray:
    """Rotate each pair (x_i, x_{i+D/2}) of position t by the angle t * theta^(-2i/D), in float64
    (the half-split pairing of Hugging Face Llama, which the export relies on)."""
    T, D = x.shape[-2:]
    angle = np.arange(T)[:, None] * theta ** (-2.0 * np.arange(D // 2) / D)
    a, b = x[..., : D // 2], x[..., D // 2 :]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)], -1)


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_rotates_pairs_by_position_times_frequency(theta):
    from model.transformer import apply_rope, rope_tables

    x = torch.randn(2, 3, 32, 16, dtype=torch.float64)
    cos, sin = rope_tables(16, 40, theta)
    y = apply_rope(x.transpose(1, 2), cos[:32].double(), sin[:32].double()).transpose(1, 2)  # takes (B, T, H, E)
    # the tables are fp32: angles are exact to ~1e-7, so 1e-5 leaves room and a wrong sign or frequency does not
    np.testing.assert_allclose(y.numpy(), rope_float64(x.numpy(), theta), rtol=0, atol=1e-5)


@pytest.mark.parametrize("precondition", PRECONDS)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_preconditioner_eps_is_inside_the_square_root(precondition, backend):
    """Rows of size 1e-3 have mean square 1e-6, the size of eps: x / sqrt(mean x^2 + eps) and
    x / (sqrt(mean x^2) + eps) then differ by ~30%."""
    from kernels.precondition import rms_normalize

    q, k, v = make_qkv(dtype=torch.float64, scale=1e-3)
    np.testing.assert_allclose(rms_normalize(q, 1e-6).numpy(), q / np.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6))
    out = attention(q, k, v, precondition=precondition, backend=backend, eps=1e-6)
    np.testing.assert_allclose(out.numpy(), attention_reference(q, k, v, precondition, eps=1e-6), rtol=1e-10, atol=0)
