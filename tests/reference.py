"""Independent float64 references for the numerics tests: numpy for forward values, plain torch
formulas in float64 where autograd gives the reference gradients."""

import math

import numpy as np
import torch

from kernels import get_preconditioner


def rms_normalize(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)


def attention_reference(q, k, v, precondition: str, causal: bool = True, eps: float = 1e-6) -> np.ndarray:
    """q (B, Hq, T, D), k and v (B, Hkv, T, D), any array-likes; returns float64 (B, Hq, T, D).
    `precondition` names a registered preconditioner declared by rows= (the rows it scales)."""
    rows = get_preconditioner(precondition).rows
    assert rows is not None, f"precondition={precondition!r} has no rows=: no numpy reference"
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    q, k, v = (rms_normalize(x, eps) if n in rows else x for n, x in zip("qkv", (q, k, v), strict=True))
    B, Hq, T, D = q.shape
    group = Hq // k.shape[1]
    out = np.zeros((B, Hq, T, D))
    for b in range(B):
        for h in range(Hq):
            s = q[b, h] @ k[b, h // group].T / np.sqrt(D)
            if causal:
                s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            out[b, h] = p @ v[b, h // group]
    if "o" in rows:
        out = rms_normalize(out, eps)
    return out


def attention_reference64(q, k, v, precondition: str, causal: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """The same formula as attention_reference, written in torch so that autograd (in float64,
    given float64 inputs) gives the reference gradients."""
    rows = get_preconditioner(precondition).rows
    assert rows is not None, f"precondition={precondition!r} has no rows=: no float64 reference"
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    q, k, v = (rms(x) if n in rows else x for n, x in zip("qkv", (q, k, v), strict=True))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[2]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    o = s.softmax(-1) @ v
    return rms(o) if "o" in rows else o


def output_and_grads(fn, q, k, v, do) -> tuple[torch.Tensor, ...]:
    """Output and (dq, dk, dv) of fn at (q, k, v) for the output gradient do."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do.to(o.dtype))
    return o.detach(), q.grad, k.grad, v.grad
