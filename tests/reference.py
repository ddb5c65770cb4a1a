"""Independent float64 references written with numpy, for the numerics tests."""

import numpy as np

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
