"""Diagonal attention preconditioners (README, "The preconditioner").

Each preconditioner is a prologue on (q, k, v) before the attention kernel and/or an
epilogue on the output after it. Both scale rows by 1 / rms(row), a diagonal matrix C
that depends on the rows themselves; gradients flow through C.
To add one: `register(Preconditioner("name", prologue=..., epilogue=...))`; callers look
preconditioners up by name only.

Shapes: q (B, Hq, T, D); k, v (B, Hkv, T, D); o (B, Hq, T, D).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / rms(x) over the last dim, rms(x) = sqrt(mean(x^2) + eps); computed in fp32 at least."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@dataclass(frozen=True)
class Preconditioner:
    name: str
    prologue: Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor, Tensor]] | None = None
    epilogue: Callable[[Tensor, float], Tensor] | None = None
    doc: str = ""

    def before(self, q: Tensor, k: Tensor, v: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return self.prologue(q, k, v, eps) if self.prologue else (q, k, v)

    def after(self, o: Tensor, eps: float) -> Tensor:
        return self.epilogue(o, eps) if self.epilogue else o


PRECONDITIONERS: dict[str, Preconditioner] = {}


def register(p: Preconditioner) -> Preconditioner:
    PRECONDITIONERS[p.name] = p
    return p


def get_preconditioner(name: str) -> Preconditioner:
    if name not in PRECONDITIONERS:
        raise ValueError(f"precondition={name!r} is unknown; choose one of {', '.join(PRECONDITIONERS)}")
    return PRECONDITIONERS[name]


register(Preconditioner("none", doc="plain attention"))
register(
    Preconditioner(
        "qk",
        prologue=lambda q, k, v, eps: (rms_normalize(q, eps), rms_normalize(k, eps), v),
        doc="C_Q Q, C_K K (Qwen3's QK-norm with unit gains)",
    )
)
register(
    Preconditioner(
        "qkv",
        prologue=lambda q, k, v, eps: (rms_normalize(q, eps), rms_normalize(k, eps), rms_normalize(v, eps)),
        doc="C_Q Q, C_K K, C_V V",
    )
)
register(Preconditioner("row", epilogue=rms_normalize, doc="C O: output rows scaled by 1/rms"))
