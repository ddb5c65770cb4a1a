"""What a user sees: metrics.jsonl, TensorBoard scalars and a progress bar (rank 0 only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

from data.config import ConfigError


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl. A last line cut short by a crash is dropped; a malformed
    line before it is a ConfigError naming the file and line."""
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break  # torn by a crash mid-write
            raise ConfigError(f"{path}:{number}: not a JSON row; remove the line or the file") from None
    return rows


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop rows past `after_step` (left by a run that died after its last checkpoint) and a
    torn last line, so a resumed run appends each step once. Atomic: temporary file, then rename."""
    if not path.is_file():
        return
    keep = [row for row in read_metrics(path) if row.get("step", 0) <= after_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))
    tmp.replace(path)


class MetricsLogger:
    """Writes rows to RUN_DIR/metrics.jsonl and scalars to RUN_DIR/tensorboard; no-op off rank 0."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, progress: bool, total: int, start: int):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        truncate_metrics(run_dir / "metrics.jsonl", start)
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1)
        if progress:
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)

    def log(self, step: int, row: dict, scalars: dict) -> None:
        """row goes to metrics.jsonl (with "step"); scalars (tag -> value) to TensorBoard."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        if self.writer is not None:
            for tag, value in scalars.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(tag, value, step)

    def progress(self, step: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.refresh()

    def write(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.file.close()
