"""train.precision=auto: bf16 only where the hardware computes it natively.

CPUs without native bf16 (for example AVX2-only AMD EPYC) emulate bf16 matmuls, which runs
them about 80x slower than fp32; on those, auto picks fp32 and an explicit bf16 warns.
"""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """True when `device` computes bf16 matmuls in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def _device_words(device: torch.device) -> str:
    return "this GPU" if device.type == "cuda" else f"this {device.type.upper()}"


def resolve_precision(asked: str, device: torch.device) -> tuple[str, str]:
    """(the precision to run, why): auto -> bf16 where native, else fp32; fp32 and bf16 as asked.
    The reason is what the rank-0 summary prints beside the precision."""
    native = native_bf16(device)
    if asked == "auto":
        if native:
            return "bf16", f"auto: {_device_words(device)} computes bf16 natively"
        return "fp32", f"auto: {_device_words(device)} has no native bf16"
    if asked == "bf16" and not native:
        return "bf16", f"asked; {_device_words(device)} has no native bf16, so bf16 is emulated and many times slower"
    return asked, "asked"


def slow_bf16_warning(asked: str, device: torch.device) -> str | None:
    """The one-time warning for an explicit bf16 on hardware that emulates it, else None."""
    if asked != "bf16" or native_bf16(device):
        return None
    return (
        f"warning: train.precision=bf16 on {_device_words(device)}, which has no native bf16: bf16 matmuls are "
        "emulated and run many times slower than fp32; use train.precision=auto or fp32"
    )
