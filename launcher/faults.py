"""Fault injection for the fault-tolerance tests: PRECOND_FAULT="sigkill@STEP[:RANK]" makes
that rank (default 0) SIGKILL itself right after finishing optimizer step STEP."""

from __future__ import annotations

import os
import signal

from data.config import ConfigError


def parse(spec: str) -> tuple[int, int] | None:
    if not spec:
        return None
    kind, _, where = spec.partition("@")
    step, _, rank = where.partition(":")
    if kind != "sigkill" or not step.isdigit() or (rank and not rank.isdigit()):
        raise ConfigError(f"PRECOND_FAULT={spec!r}: expected sigkill@STEP or sigkill@STEP:RANK")
    return int(step), int(rank or 0)


def maybe_kill(step: int, rank: int) -> None:
    fault = parse(os.environ.get("PRECOND_FAULT", ""))
    if fault == (step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
