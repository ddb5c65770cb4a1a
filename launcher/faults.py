"""Fault injection for the fault-tolerance tests, from the environment:

PRECOND_FAULT="KIND@STEP[:RANK][,KIND@STEP[:RANK]...]"   on that rank (default 0), at step STEP:
    sigkill        SIGKILL itself right after finishing the step
    sigkill-save   SIGKILL itself inside the checkpoint save of that step, after writing its files
    nan            the loss of the step becomes NaN
    slow-eval      the evaluation after the step takes SLOW_SECONDS longer
    slow-save      the checkpoint save of the step takes SLOW_SECONDS longer
    pause          the rank sleeps PAUSE_SECONDS after the step (a test acts on the cluster meanwhile)
"""

from __future__ import annotations

import os
import signal
import time

from core.errors import ConfigError

KINDS = ("sigkill", "sigkill-save", "nan", "slow-eval", "slow-save", "pause")
SLOW_SECONDS = 2.0
PAUSE_SECONDS = 8.0


def parse(spec: str) -> list[tuple[str, int, int]]:
    faults = []
    for item in filter(None, spec.split(",")):
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        if kind not in KINDS or not step.isdigit() or (rank and not rank.isdigit()):
            raise ConfigError(f"PRECOND_FAULT={spec!r}: expected KIND@STEP or KIND@STEP:RANK with KIND in {KINDS}")
        faults.append((kind, int(step), int(rank or 0)))
    return faults


_active: frozenset[tuple[str, int, int]] = frozenset()


def load() -> None:
    """Read PRECOND_FAULT once, at start (a bad value is a ConfigError); the hooks below only look up."""
    global _active
    _active = frozenset(parse(os.environ.get("PRECOND_FAULT", "")))


def due(kind: str, step: int, rank: int) -> bool:
    """True when PRECOND_FAULT asks for `kind` at `step` on `rank` (after load())."""
    return (kind, step, rank) in _active


def maybe_kill(kind: str, step: int, rank: int) -> None:
    if due(kind, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_slow(kind: str, step: int, rank: int) -> None:
    if due(kind, step, rank):
        time.sleep(PAUSE_SECONDS if kind == "pause" else SLOW_SECONDS)
