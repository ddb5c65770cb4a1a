"""Checkpoints in DeepSpeed's layout, with our client state.

RUN_DIR/checkpoints/<tag>/ is written by engine.save_checkpoint on every rank; `latest`
moves (atomically, on rank 0) only after every rank has finished writing. The client
state holds the step, tokens seen, the last validation loss, every rank's data-pipeline
and RNG state (gathered, because ZeRO-1/2 keep only rank 0's client state), and
`universal_checkpoint_info` so DeepSpeed's ds_to_universal can reshape the run later.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from data.config import ConfigError
from launcher import distributed as dist


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
    dist.barrier()
    if dist.rank() == 0:
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        tmp.replace(ckpt_dir / "latest")
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return tag


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step folders (never the one `latest` names)."""
    keep = latest_tag(ckpt_dir)
    tags = sorted(
        (p for p in ckpt_dir.iterdir() if p.is_dir() and re.fullmatch(r"global_step\d+", p.name)),
        key=lambda p: int(p.name.removeprefix("global_step")),
    )
    for p in tags[:-keep_last]:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)


def load(engine, ckpt_dir: Path) -> dict | None:
    """Resume from `latest` if there is one; returns our client state (this rank's data and
    RNG state under "data_state" / "rng_state"), or None for a fresh run."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None or state is None:
        raise ConfigError(f"{ckpt_dir}/{tag}: checkpoint could not be loaded; remove 'latest' to start afresh")
    if state["world_size"] != dist.world_size():
        raise ConfigError(
            f"{ckpt_dir}/{tag}: written by {state['world_size']} ranks, resuming with {dist.world_size()}; "
            "resume with the same number of ranks (or convert it with DeepSpeed's ds_to_universal)"
        )
    state["data_state"] = state["data_states"][dist.rank()]
    set_rng_state(state["rng_states"][dist.rank()])
    return state
