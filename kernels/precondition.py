"""Diagonal attention preconditioners (README, "The preconditioner").

Each preconditioner is a prologue on (q, k, v) before the attention kernel and/or an
epilogue on the output o after it. The built-in family scales rows by 1 / rms(row), a diagonal
matrix C that depends on the rows themselves; gradients flow through C.
To add one: `register(Preconditioner("name", rows="qkvo"))` with the rows it scales (every backend,
the Triton kernel and the HF export take it), or with prologue= / epilogue= for anything else
(eager, sdpa and flash run it; the Triton kernel and the export refuse it). Callers look them up by name.

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
    rows: str | None = None
    """Which of q, k, v and o have each row divided by its rms, e.g. "qkv"; None for a custom one."""
    prologue: Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor, Tensor]] | None = None
    epilogue: Callable[[Tensor, float], Tensor] | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.rows is not None and (set(self.rows) - set("qkvo") or self.prologue or self.epilogue):
            raise ValueError(f"preconditioner {self.name!r}: rows= takes letters of 'qkvo' and no prologue or epilogue")

    def before(self, q: Tensor, k: Tensor, v: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        if self.prologue:
            return self.prologue(q, k, v, eps)
        rows = self.rows or ""
        return tuple(rms_normalize(x, eps) if n in rows else x for n, x in zip("qkv", (q, k, v), strict=True))

    def after(self, o: Tensor, eps: float) -> Tensor:
        if self.epilogue:
            return self.epilogue(o, eps)
        return rms_normalize(o, eps) if "o" in (self.rows or "") else o


PRECONDITIONERS: dict[str, Preconditioner] = {}


def register(p: Preconditioner) -> Preconditioner:
    PRECONDITIONERS[p.name] = p
    return p


def get_preconditioner(name: str) -> Preconditioner:
    if name not in PRECONDITIONERS:
        raise ValueError(f"precondition={name!r} is unknown; choose one of {', '.join(PRECONDITIONERS)}")
    return PRECONDITIONERS[name]


register(Preconditioner("none", rows="", doc="plain attention"))
register(Preconditioner("qk", rows="qk", doc="C_Q Q, C_K K (Qwen3's QK-norm with unit gains)"))
register(Preconditioner("qkv", rows="qkv", doc="C_Q Q, C_K K, C_V V"))
register(Preconditioner("row", rows="o", doc="C O: output rows scaled by 1/rms"))
