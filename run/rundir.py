"""The run directory (train.output_dir): the one place that knows its layout.

config.yaml        the resolved run config
metrics.jsonl      one JSON row per logged step (read_metrics)
tensorboard/       TensorBoard event files
tokenizer/         the tokenizer the run trained with; tokenizer.json beside it
checkpoints/       DeepSpeed checkpoints (global_stepN/), `latest` names the newest complete one
stop               present: the run saves at the next step boundary and exits 0
hf/                the Hugging Face export
lock               held (flock) by the one run that uses the directory; names its host and pid
outcome            why the last training attempt failed, written by rank 0: "restart: WHY"
                   (a lost rank or node: a restart may help) or "final: WHY" (it would not)
wandb_id, wandb/   the Weights & Biases run id (a resume continues that run) and its files

python -m run.rundir RUN_DIR --get WHAT [WHAT ...]   (latest, latest-step, stop, export,
                                                      tensorboard, lock, outcome; a line each)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

from core.cli import run_main
from core.errors import ConfigError
from core.files import staged_folder, write_atomic

TAG_PATTERN = re.compile(r"global_step(\d+)")
MODEL_STATES = "mp_rank_00_model_states.pt"
"""DeepSpeed's model states in a checkpoint folder (ZeRO 0-2, with the client state); ZeRO-3's:"""
STAGE3_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
MANIFEST = "checkpoint.json"
"""In each checkpoint folder, written by rank 0 once every rank has saved: its files and their
sizes, and the world size, ZeRO stage, global batch and precision mode that wrote it."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def tag_step(tag: str) -> int:
    """The step a checkpoint tag names (global_step300 -> 300); -1 for another name."""
    m = TAG_PATTERN.fullmatch(tag)
    return int(m.group(1)) if m else -1


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl. A last line cut short by a crash is dropped; a malformed
    line before it is a ConfigError naming the file and line."""
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # torn by a crash mid-write
            row = None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{number}: not a JSON row (an object); remove the line or the file")
        rows.append(row)
    return rows


def steady(rows: list[dict], key: str = "tokens_per_sec") -> float | None:
    """The median of `key` over the training rows after the first, whose time holds the
    start-up (compilation, autotuning); None without training rows."""
    values = [r[key] for r in rows if r.get("tokens_per_sec") and r.get(key) is not None]
    values = sorted(values[1:] if len(values) > 1 else values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest; None without one, or for a file that is not one (damage says so)."""
    try:
        record = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def damage(folder: Path) -> str | None:
    """What makes the checkpoint in `folder` unusable (a missing or truncated file), or None.
    Without a manifest (a checkpoint of an older version), every .pt file must be a whole zip."""
    record = read_manifest(folder)
    if record is None and (folder / MANIFEST).exists():
        return f"{folder / MANIFEST}: not a checkpoint manifest (without one, each file is checked as a whole zip)"
    if record is None:
        pts = sorted(folder.glob("*.pt"))
        if not pts:
            return f"{folder}: holds no checkpoint files"
        bad = next((p for p in pts if not zipfile.is_zipfile(p)), None)
        return f"{bad}: truncated or not a torch checkpoint" if bad else None
    for name, size in record["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != size:
            return f"{path}: truncated ({path.stat().st_size} of {size} bytes)"
    return None


def complete_tags(run: RunDir) -> list[str]:
    """Tags of the checkpoints in `run.checkpoints` that are whole, oldest first."""
    return [tag for tag in run.tags() if damage(run.checkpoint(tag)) is None]


class RunDir:
    """Paths and reads of one run directory; nothing else spells its file names."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.jsonl"
        self.tensorboard = self.root / "tensorboard"
        self.tokenizer_dir = self.root / "tokenizer"
        self.tokenizer_file = self.root / "tokenizer.json"
        self.checkpoints = self.root / "checkpoints"
        self.latest_file = self.checkpoints / "latest"
        self.stop_file = self.root / "stop"
        self.export = self.root / "hf"
        self.lock_file = self.root / "lock"
        self.outcome = self.root / "outcome"
        self.wandb_id = self.root / "wandb_id"

    def latest_tag(self) -> str | None:
        """The tag `checkpoints/latest` names, or None before the first save."""
        return self.latest_file.read_text(errors="replace").strip() if self.latest_file.is_file() else None

    def latest_step(self) -> int:
        """The step of the newest checkpoint (0 before the first save)."""
        return max(tag_step(self.latest_tag() or ""), 0)

    def checkpoint(self, tag: str) -> Path:
        return self.checkpoints / tag

    def tags(self) -> list[str]:
        """Checkpoint folders (global_stepN), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(
            (p.name for p in self.checkpoints.iterdir() if p.is_dir() and tag_step(p.name) >= 0), key=tag_step
        )

    def set_latest(self, tag: str) -> None:
        write_atomic(self.latest_file, tag)

    def rows(self) -> list[dict]:
        """metrics.jsonl's rows; none before the run logs its first step."""
        return read_metrics(self.metrics) if self.metrics.is_file() else []

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows past `after_step` (left by a run that died after its last checkpoint) and a
        torn last line, so a resumed run appends each step once."""
        if self.metrics.is_file():
            keep = [row for row in self.rows() if row.get("step", 0) <= after_step]
            write_atomic(self.metrics, "".join(json.dumps(row) + "\n" for row in keep))

    def hold(self) -> bool:
        """Take the run directory's lock for the life of this process (a process that dies, any
        way, releases it); True when this made the directory. A ConfigError, with nothing
        written, when another run holds it."""
        import fcntl
        import os
        import socket

        made = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"train.output_dir {self.root}: in use by the run of {holder}; wait for it to end, stop it "
                f"(touch {self.stop_file}), or use another train.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._lock_fd = fd  # kept open: closing it would release the lock
        return made

    def forget_if_empty(self) -> None:
        """Remove the directory when it holds nothing but the lock (a run that wrote nothing)."""
        if [p.name for p in self.root.iterdir()] == [self.lock_file.name]:
            self.lock_file.unlink()
            self.root.rmdir()

    def record_outcome(self, restart: bool, why: str) -> None:
        write_atomic(self.outcome, f"{'restart' if restart else 'final'}: {why}\n")

    def keep_tokenizer(self, tokenizer_dir: Path) -> None:
        """Copy the prepared tokenizer folder to tokenizer/ and its tokenizer.json beside it,
        each under a temporary name first, then renamed into place."""
        with staged_folder(self.tokenizer_dir) as tmp:
            shutil.copytree(tokenizer_dir, tmp, dirs_exist_ok=True)
        write_atomic(self.tokenizer_file, (tokenizer_dir / "tokenizer.json").read_bytes())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m run.rundir", description="Paths of a run directory, for scripts.")
    p.add_argument("run_dir")
    what = ["latest", "latest-step", "stop", "export", "tensorboard", "lock", "outcome"]
    p.add_argument("--get", required=True, nargs="+", choices=what, help="one line each, in order")
    args = p.parse_args(argv)
    run = RunDir(args.run_dir)
    paths = {"stop": run.stop_file, "export": run.export, "tensorboard": run.tensorboard, "lock": run.lock_file}
    paths["outcome"] = run.outcome
    if "latest" in args.get:  # every answer is known before the first is printed
        tag = run.latest_tag()
        if tag is None:
            raise ConfigError(f"{run.root}: no checkpoint yet ({run.latest_file} is missing)")
        paths["latest"] = run.checkpoint(tag)
    paths["latest-step"] = run.latest_step()
    print("\n".join(str(paths[what]) for what in args.get))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
