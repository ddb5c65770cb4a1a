"""backend="flash": the flash-attn package (an optional CUDA extra, requirements-gpu.txt).

On the CPU a stand-in `flash_attn` module checks what we hand the package (layout (B, T, H, D),
fewer key/value heads for GQA, the causal flag); the CUDA tests run the real package.
"""

import math
import sys
import types

import numpy as np
import pytest
import torch

from kernels import attention, resolve_backend
from kernels import backends as backends_mod
from tests.reference import attention_reference

HANDED = []
"""The (q, k, v) shapes each call of the stand-in was given."""


def fake_flash_attn_func(q_BTHD, k_BTHD, v_BTHD, causal=False):
    """What flash_attn_func computes, written against its documented layout, in float64."""
    HANDED.append((q_BTHD.shape, k_BTHD.shape, v_BTHD.shape))
    B, T, Hq, D = q_BTHD.shape
    assert k_BTHD.shape == v_BTHD.shape and k_BTHD.shape[:2] == (B, T) and Hq % k_BTHD.shape[2] == 0
    ref = attention_reference(q_BTHD.transpose(1, 2), k_BTHD.transpose(1, 2), v_BTHD.transpose(1, 2), "none", causal)
    return torch.from_numpy(ref).to(q_BTHD.dtype).transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_path_hands_the_package_btHd_with_native_gqa(monkeypatch, causal):
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fake_flash_attn_func))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 13, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    HANDED.clear()
    out = backends_mod.flash_attention(q, k, v, causal)
    # one call, (B, T, H, D), the key/value heads not repeated up to the query heads
    assert HANDED == [((2, 13, 4, 16), (2, 13, 2, 16), (2, 13, 2, 16))]
    assert out.shape == (2, 4, 13, 16)
    np.testing.assert_allclose(out.numpy(), attention_reference(q, k, v, "none", causal), rtol=1e-12, atol=1e-12)


def test_flash_unavailable_is_a_clear_error():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="flash-attn"):
        attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match="flash-attn"):
        resolve_backend("flash", device="cpu")


def test_flash_needs_cuda_even_when_installed(monkeypatch):
    monkeypatch.setattr(backends_mod, "_import_error", lambda module: None)
    with pytest.raises(ValueError, match="fp16/bf16 tensors on a CUDA GPU"):
        resolve_backend("flash", torch.randn(1, 2, 8, 16, dtype=torch.bfloat16))


def _flash_installed() -> bool:
    return torch.cuda.is_available() and backends_mod._import_error("flash_attn") is None


@pytest.mark.cuda
@pytest.mark.skipif(not _flash_installed(), reason="needs a CUDA GPU and the flash-attn package")
@pytest.mark.parametrize("precondition", ["none", "qk", "qkv", "row"])
def test_cuda_flash_matches_float64(precondition):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 1000, 64, generator=g, dtype=torch.float64) * 2 for h in (8, 2, 2))
    out = attention(*(t.cuda().bfloat16() for t in (q, k, v)), precondition=precondition, backend="flash")
    ref = attention_reference(q, k, v, precondition)
    # bf16 (step 2^-8): rounded inputs, probabilities and products; 2e-2 of the largest entry
    err = np.abs(out.double().cpu().numpy() - ref).max()
    assert err <= 2e-2 * max(1.0, np.abs(ref).max()), err
    assert math.isfinite(err)
