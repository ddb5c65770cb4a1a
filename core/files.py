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
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_folder(out: Path, replace: bool = True) -> Iterator[Path]:
    """An empty folder beside `out` to write into. When the block succeeds it takes the place of
    `out` (a previous `out` is renamed aside, then deleted), or, with replace=False, it is
    dropped if another process made `out` first (its copy is the same); when the block fails
    it is removed."""
    tmp, old = temporary_name(out), out.with_name(f".{out.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists() and not replace:
            return
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if replace or not out.exists():
                raise  # else another process renamed its copy into place first
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
