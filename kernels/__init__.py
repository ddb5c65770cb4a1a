"""Attention kernels: `attention(q, k, v, *, precondition, backend, causal, eps)`.

model/ imports this package; it never imports model/, data/ or launcher/, nor deepspeed.
"""

from kernels.backends import BACKENDS, attention, resolve_backend
from kernels.precondition import PRECONDITIONERS, Preconditioner, get_preconditioner, register, rms_normalize

__all__ = [
    "BACKENDS",
    "PRECONDITIONERS",
    "Preconditioner",
    "attention",
    "get_preconditioner",
    "register",
    "resolve_backend",
    "rms_normalize",
]
