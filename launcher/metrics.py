"""What a user sees: metrics.jsonl, TensorBoard scalars and a progress bar (rank 0 only)."""

from __future__ import annotations

import json
import math

from tqdm import tqdm

from run.rundir import RunDir


class MetricsLogger:
    """Writes rows to the run's metrics.jsonl and scalars to its TensorBoard folder; no-op off rank 0."""

    def __init__(self, run: RunDir, *, enabled: bool, tensorboard: bool, progress: bool, total: int, start: int):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        run.truncate_metrics(start)
        self.file = open(run.metrics, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.tensorboard), purge_step=start + 1)
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
