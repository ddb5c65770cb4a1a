"""Checkpoints in DeepSpeed's layout, with our client state.

RUN_DIR/checkpoints/<tag>/ is written by engine.save_checkpoint on every rank; once every
rank has finished, rank 0 records the files and their sizes in <tag>/checkpoint.json and then
moves `latest` (atomically), so a crash during a save leaves `latest` on the last complete
checkpoint. Before a resume loads anything, `check_resume` verifies the checkpoint against
that record and the run's world size and ZeRO stage. The client
state holds the step, tokens seen, the last validation loss, every rank's data-pipeline
and RNG state (gathered, because ZeRO-1/2 keep only rank 0's client state), and
`universal_checkpoint_info` so DeepSpeed's ds_to_universal can reshape the run later.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from data.config import ConfigError
from launcher import distributed as dist
from launcher import faults

MANIFEST = "checkpoint.json"
TAG_PATTERN = re.compile(r"global_step(\d+)")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict, data_state: dict, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    tag = tag_for(step)
    state = dict(client_state)
    state["step"] = step
    state["world_size"] = dist.world_size()
    state["data_states"] = dist.gather_objects(data_state)
    state["rng_states"] = dist.gather_objects(rng_state())
    state[UNIVERSAL_CHECKPOINT_INFO] = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
    faults.maybe_slow("slow-save", step, dist.rank())
    faults.maybe_kill("sigkill-save", step, dist.rank())
    dist.barrier()
    if dist.rank() == 0:
        write_manifest(ckpt_dir / tag, step, dist.world_size(), engine.zero_optimization_stage())
        _write_atomic(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return tag


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_manifest(folder: Path, step: int, world_size: int, zero_stage: int) -> None:
    """Record what a complete checkpoint holds: every file with its size, and the world size and
    ZeRO stage that wrote it."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    record = {"step": step, "world_size": world_size, "zero_stage": zero_stage, "files": files}
    _write_atomic(folder / MANIFEST, json.dumps(record, indent=1) + "\n")


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def damage(folder: Path) -> str | None:
    """What makes the checkpoint in `folder` unusable (a missing or truncated file), or None.
    Without a manifest (a checkpoint of an older version), every .pt file must be a whole zip."""
    record = read_manifest(folder)
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


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of the checkpoints in `ckpt_dir` that are whole, oldest first."""
    tags = sorted(
        (p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_PATTERN.fullmatch(p.name)),
        key=lambda p: int(p.name.removeprefix("global_step")),
    )
    return [p.name for p in tags if damage(p) is None]


def check_resume(ckpt_dir: Path, world_size: int, zero_stage: int) -> str | None:
    """The tag a run in `ckpt_dir` resumes from (None for a fresh run), after checking, before
    anything is loaded or written, that it can: a ConfigError says what is wrong and what to do."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text(errors="replace").strip()
    problem = None
    if not TAG_PATTERN.fullmatch(tag):
        problem = f"{latest}: {tag[:40]!r} is not a checkpoint tag"
    elif not (ckpt_dir / tag).is_dir():
        problem = f"{latest}: names {tag}, which does not exist"
    else:
        problem = damage(ckpt_dir / tag)
    if problem:
        whole = [t for t in complete_tags(ckpt_dir) if t != tag]
        newest = f"write {whole[-1]} (the newest complete checkpoint) into {latest}" if whole else None
        todo = newest or f"remove {latest} to start afresh"
        raise ConfigError(f"{problem}; {todo}")
    record = read_manifest(ckpt_dir / tag) or {}
    saved_ws, saved_stage = record.get("world_size", world_size), record.get("zero_stage", zero_stage)
    if saved_ws != world_size:
        raise ConfigError(
            f"{ckpt_dir / tag}: written by {saved_ws} ranks, resuming with {world_size}; "
            f"resume with {saved_ws} ranks (or use a new train.output_dir)"
        )
    if saved_stage != zero_stage:
        raise ConfigError(
            f"{ckpt_dir / tag}: written under ZeRO stage {saved_stage}; resume with deepspeed.zero_stage={saved_stage}"
        )
    return tag


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step folders (never the one `latest` names)."""
    keep = latest_tag(ckpt_dir)
    tags = sorted(
        (p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_PATTERN.fullmatch(p.name)),
        key=lambda p: int(p.name.removeprefix("global_step")),
    )
    for p in tags[:-keep_last]:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)


def load(engine, ckpt_dir: Path, tag: str) -> dict:
    """Load checkpoint `tag` (checked by check_resume); returns our client state with this
    rank's data and RNG state under "data_state"."""
    path, state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None or state is None:
        raise ConfigError(f"{ckpt_dir / tag}: checkpoint could not be loaded; name another tag in {ckpt_dir}/latest")
    state["data_state"] = state["data_states"][dist.rank()]
    set_rng_state(state["rng_states"][dist.rank()])
    return state
