"""Fault injection for the fault-tolerance tests, from the environment:

PRECOND_FAULT="sigkill@STEP[:RANK]"   that rank (default 0) SIGKILLs itself right after
                                      finishing optimizer step STEP
PRECOND_FAULT="nan@STEP[:RANK]"       that rank's loss of step STEP becomes NaN
"""

from __future__ import annotations

import os
import signal

from data.config import ConfigError

KINDS = ("sigkill", "nan")


def parse(spec: str) -> tuple[str, int, int] | None:
    if not spec:
        return None
    kind, _, where = spec.partition("@")
    step, _, rank = where.partition(":")
    if kind not in KINDS or not step.isdigit() or (rank and not rank.isdigit()):
        raise ConfigError(f"PRECOND_FAULT={spec!r}: expected KIND@STEP or KIND@STEP:RANK with KIND in {KINDS}")
    return kind, int(step), int(rank or 0)


def _due(kind: str, step: int, rank: int) -> bool:
    return parse(os.environ.get("PRECOND_FAULT", "")) == (kind, step, rank)


def maybe_kill(step: int, rank: int) -> None:
    if _due("sigkill", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def poison_loss(step: int, rank: int) -> bool:
    """True when the loss of `step` on `rank` should be replaced by NaN."""
    return _due("nan", step, rank)
