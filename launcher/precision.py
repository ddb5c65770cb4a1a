"""train.precision=auto: bf16 only where the hardware computes it natively.

CPUs without native bf16 (for example AVX2-only AMD EPYC) emulate bf16 matmuls, which runs
them about 80x slower than fp32; on those, auto picks fp32 and an explicit bf16 warns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def native_bf16(device: torch.device) -> bool:
    """True when `device` computes bf16 matmuls in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class Precision(NamedTuple):
    name: str
    """fp32 or bf16: what the run computes in."""
    reason: str
    """Why, as the rank-0 summary prints it beside the name."""
    warning: str | None = None
    """Printed once: an explicit bf16 on hardware that emulates it."""


def resolve_precision(asked: str, device: torch.device) -> Precision:
    """auto -> bf16 where the hardware computes it natively, else fp32; fp32 and bf16 as asked."""
    where = "this GPU" if device.type == "cuda" else f"this {device.type.upper()}"
    native = native_bf16(device)
    if asked == "auto":
        return (
            Precision("bf16", f"auto: {where} computes bf16 natively")
            if native
            else Precision("fp32", f"auto: {where} has no native bf16")
        )
    if asked == "bf16" and not native:
        warning = (
            f"warning: train.precision=bf16 on {where}, which has no native bf16: bf16 matmuls are emulated "
            "and run many times slower than fp32; use train.precision=auto or fp32"
        )
        return Precision("bf16", "asked; emulated", warning)
    return Precision(asked, "asked")
