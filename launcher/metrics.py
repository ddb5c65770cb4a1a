"""What a user sees: metrics.jsonl, TensorBoard scalars and a progress bar (rank 0 only)."""

from __future__ import annotations

import json
import math

from tqdm import tqdm

from run.rundir import RunDir

TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_sec": "train/tokens_per_sec",
    "mfu": "train/mfu",
    "mem_gb": "train/mem_gb",
    "val_loss": "val/loss",
    "val_ppl": "val/ppl",
}


def scalar_tag(key: str) -> str | None:
    """The TensorBoard tag of a metrics.jsonl key (None: not plotted): TAGS, NAME_seconds as
    time/NAME_seconds, a key that is already a tag (cond/layer0/...) as it is."""
    if key in TAGS:
        return TAGS[key]
    if key.endswith("_seconds"):
        return f"time/{key}"
    return key if "/" in key else None


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

    def log(self, step: int, row: dict) -> None:
        """One row to metrics.jsonl (with "step"), and each of its values that has a scalar_tag to
        TensorBoard (a value that is not finite is null in the row and left out of TensorBoard)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        if self.writer is not None:
            for key, value in clean.items():
                tag = scalar_tag(key)
                if tag is not None and isinstance(value, (int, float)):
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
