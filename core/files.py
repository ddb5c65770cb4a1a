"""Writing files so that a reader never sees half of one: a temporary name beside the target
(it names this process, so two writers never share one), then a rename."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `data` (bytes, or text as UTF-8) to `path` under a temporary name, then rename it."""
    path = Path(path)
    tmp = temporary_name(path)
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """An empty folder beside `out` to write into. When the block succeeds it takes the place of
    `out` (a previous `out` is renamed aside, then deleted); when the block fails it is removed."""
    tmp, old = (out.with_name(f".{out.name}.{what}-{os.getpid()}") for what in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
