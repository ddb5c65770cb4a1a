"""Independent float64 references written with numpy, for the numerics tests."""

import numpy as np


def rms_normalize(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)


def attention_reference(q, k, v, precondition: str, causal: bool = True, eps: float = 1e-6) -> np.ndarray:
    """q (B, Hq, T, D), k and v (B, Hkv, T, D), any array-likes; returns float64 (B, Hq, T, D)."""
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    if precondition in ("qk", "qkv"):
        q, k = rms_normalize(q, eps), rms_normalize(k, eps)
    if precondition == "qkv":
        v = rms_normalize(v, eps)
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
    if precondition == "row":
        out = rms_normalize(out, eps)
    return out
