"""train.precision=auto picks bf16 only where the hardware computes it natively."""

from __future__ import annotations

import pytest
import torch

from launcher import precision

CPU = torch.device("cpu")


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set whether the CPU reports native bf16 (the capability check auto relies on)."""

    def set_native(native: bool) -> None:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)

    return set_native


def test_auto_picks_bf16_on_a_cpu_with_native_bf16(cpu_bf16):
    cpu_bf16(True)
    assert precision.resolve_precision("auto", CPU) == ("bf16", "auto: this CPU computes bf16 natively", None)
    assert precision.resolve_precision("bf16", CPU) == ("bf16", "asked", None)


def test_auto_picks_fp32_on_a_cpu_that_emulates_bf16(cpu_bf16):
    cpu_bf16(False)
    assert precision.resolve_precision("auto", CPU) == ("fp32", "auto: this CPU has no native bf16", None)


def test_explicit_bf16_on_a_cpu_that_emulates_it_runs_and_warns(cpu_bf16):
    cpu_bf16(False)
    chosen, why, warning = precision.resolve_precision("bf16", CPU)
    assert chosen == "bf16" and "emulated" in why
    assert warning.startswith("warning: train.precision=bf16") and "slower" in warning
    assert precision.resolve_precision("fp32", CPU).warning is None


@pytest.mark.parametrize("native", [True, False])
def test_explicit_fp32_is_kept(cpu_bf16, native):
    cpu_bf16(native)
    assert precision.resolve_precision("fp32", CPU) == ("fp32", "asked", None)


def test_auto_on_a_gpu_follows_its_bf16_support(monkeypatch):
    gpu = torch.device("cuda", 0)
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert precision.resolve_precision("auto", gpu).name == expected


def test_every_config_asks_for_auto(project_root):
    from pathlib import Path

    from run.config import load_run_config

    for path in sorted(Path(project_root, "configs").glob("*.yaml")):
        assert load_run_config(path).train.precision == "auto", path
