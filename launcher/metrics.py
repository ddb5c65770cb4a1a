"""What a user sees: metrics.jsonl, TensorBoard scalars, optionally Weights & Biases, and a
progress bar (rank 0 only)."""

from __future__ import annotations

import json
import math
import uuid

from tqdm import tqdm

from core.errors import ConfigError
from core.files import write_atomic
from run.rundir import RunDir

# metrics.jsonl key -> (TensorBoard run, tag). Training and validation loss share the tag
# "loss" in the runs "train" and "val" (folders of tensorboard/), so TensorBoard draws them on one
# chart, in the section that sorts first; the other sections follow: optim, probe, speed, time.
TAGS = {
    "loss": ("train", "loss"),
    "val_loss": ("val", "loss"),
    "val_ppl": ("val", "perplexity"),
    "lr": ("train", "optim/lr"),
    "grad_norm": ("train", "optim/grad_norm"),
    "tokens_per_sec": ("train", "speed/tokens_per_sec"),
    "mfu": ("train", "speed/mfu"),
    "mem_gb": ("train", "speed/mem_gb"),
}
RUNS = ("train", "val")


def scalar_tag(key: str) -> tuple[str, str] | None:
    """The TensorBoard (run, tag) of a metrics.jsonl key, None when it is not plotted: TAGS,
    NAME_seconds as time/NAME_seconds, the probe's cond/... and logit/... as probe/...."""
    if key in TAGS:
        return TAGS[key]
    if key.endswith("_seconds"):
        return "train", f"time/{key}"
    if key.startswith(("cond/", "logit/")):  # probe/layer0/O, probe/logit/layer0/max
        return "train", f"probe/{key.removeprefix('cond/')}"
    return None


class MetricsLogger:
    """Writes rows to the run's metrics.jsonl and scalars to its TensorBoard folder; no-op off rank 0."""

    def __init__(
        self, run: RunDir, *, enabled: bool, tensorboard: bool, progress: bool, total: int, start: int,
        wandb: WandbSink | None = None,
    ):  # fmt: skip
        self.enabled = enabled
        self.writers = {}
        self.bar = None
        self.wandb = wandb
        if not enabled:
            return
        run.truncate_metrics(start)
        self.file = open(run.metrics, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run purges the steps after its checkpoint (start + 1 on; a fresh run's step-0 row stays)
            self.writers = {name: SummaryWriter(str(run.tensorboard / name), purge_step=start + 1) for name in RUNS}
        if progress:
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)

    def log(self, step: int, row: dict) -> None:
        """One row to metrics.jsonl (with "step"), and each of its values that has a scalar_tag to
        TensorBoard (a value that is not finite is null in the row and left out of TensorBoard)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        if self.wandb is not None:
            self.wandb.log(step, clean)
        for key, value in clean.items():
            where = scalar_tag(key)
            if where is not None and self.writers and isinstance(value, (int, float)):
                self.writers[where[0]].add_scalar(where[1], value, step)

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
        for writer in self.writers.values():
            writer.close()
        if self.wandb is not None:
            self.wandb.close()
        self.file.close()


class WandbSink:
    """Every metrics row to a Weights & Biases run (log.wandb; rank 0). The run id is kept in the
    run directory, so a resumed run, or a restarted one, continues the same W&B run; the config
    is logged at the start. `wandb` is imported only here (WANDB_MODE=offline works without a
    network: `wandb sync RUN_DIR/wandb/offline-run-*` uploads later)."""

    def __init__(self, run: RunDir, log, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("log.wandb=true: the wandb package is not installed; pip install wandb==0.31.0") from None
        if run.wandb_id.is_file():
            run_id = run.wandb_id.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:8]  # W&B's own ids: 8 characters of [0-9a-z]
            write_atomic(run.wandb_id, run_id + "\n")
        self.run = wandb.init(
            project=log.wandb_project,
            entity=log.wandb_entity or None,
            name=log.wandb_name or run.root.resolve().name,
            tags=[t.strip() for t in log.wandb_tags.split(",") if t.strip()],
            config=config,
            id=run_id,
            resume="allow",
            dir=str(run.root),
        )

    def log(self, step: int, row: dict) -> None:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()
