"""Checkpoints in DeepSpeed's layout, with our client state.

RUN_DIR/checkpoints/<tag>/ is written by engine.save_checkpoint on every rank; once every
rank has finished, rank 0 records the files and their sizes in <tag>/checkpoint.json and then
moves `latest` (atomically), so a crash during a save leaves `latest` on the last complete
checkpoint. Before a resume loads anything, `check_resume` verifies the checkpoint against
that record and the run's ZeRO stage, and `plan_resume` decides how it loads on this world
size. The client state holds the step, tokens seen, the last validation loss, the global
batch, every rank's data-pipeline and RNG state (gathered, because ZeRO-1/2 keep only rank
0's client state), and `universal_checkpoint_info` so DeepSpeed's ds_to_universal can
reshape the run: a ZeRO-1/2/3 checkpoint resumed on another number of ranks is converted
once into <tag>_universal/ beside it (ZeRO-0 checkpoints hold whole states and load as they are).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import ConfigError
from core.files import write_atomic
from launcher import distributed as dist
from launcher import faults
from run.pickles import check_folder
from run.rundir import (
    MANIFEST,
    MODEL_STATES,
    STAGE3_STATES,
    TAG_PATTERN,
    RunDir,
    complete_tags,
    damage,
    read_manifest,
    tag_for,
)

UNIVERSAL_SUFFIX = "_universal"


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


@dataclass
class TrainState:
    """Where training stands: what a checkpoint saves besides the engine and the data pipeline."""

    step: int = 0
    tokens: int = 0
    val_loss: float | None = None


def save(
    engine, run: RunDir, train: TrainState, config: dict, data_state: dict, keep_last: int, precision_mode: str
) -> str:
    """Collective: every rank calls it. Returns the tag written. precision_mode is the run's
    (launcher.ds_config.precision_mode), recorded in the manifest so a resume can check it."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    step = train.step
    tag = tag_for(step)
    if dist.rank() == 0:  # a crashed save's leftovers (maybe from another world size) must not mix in
        for stale in (run.checkpoint(tag), run.checkpoint(f"{tag}{UNIVERSAL_SUFFIX}")):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    state = {**asdict(train), "config": config}
    state["world_size"] = dist.world_size()
    state["global_batch"] = engine.train_batch_size()  # windows per step: micro x grad_accum x W
    state["data_states"] = dist.gather_objects(data_state)
    state["rng_states"] = dist.gather_objects(rng_state())
    state[UNIVERSAL_CHECKPOINT_INFO] = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    engine.save_checkpoint(str(run.checkpoints), tag=tag, client_state=state, save_latest=False)
    faults.maybe_slow("slow-save", step, dist.rank())
    faults.maybe_kill("sigkill-save", step, dist.rank())
    dist.barrier()
    if dist.rank() == 0:
        write_manifest(
            run.checkpoint(tag),
            step,
            dist.world_size(),
            engine.zero_optimization_stage(),
            state["global_batch"],
            precision_mode,
        )
        run.set_latest(tag)
        prune(run, keep_last)
    dist.barrier()
    return tag


def write_manifest(
    folder: Path, step: int, world_size: int, zero_stage: int, global_batch: int, precision_mode: str = "fp32"
) -> None:
    """Record what a complete checkpoint holds: every file with its size, and the world size, ZeRO
    stage, global batch (windows per step) and precision mode (launcher.ds_config) that wrote it."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    record = {"step": step, "world_size": world_size, "zero_stage": zero_stage, "global_batch": global_batch}
    record["precision_mode"] = precision_mode
    record["files"] = files
    write_atomic(folder / MANIFEST, json.dumps(record, indent=1) + "\n")


def check_resume(run: RunDir, zero_stage: int, precision_mode: str | None = None) -> str | None:
    """The tag a run in `run.checkpoints` resumes from (None for a fresh run), after checking, before
    anything is loaded or written, that it can: a ConfigError says what is wrong and what to do.
    The world size is checked by `plan_resume`, once the data pipeline is known."""
    latest = run.latest_file
    tag = run.latest_tag()
    if tag is None:
        return None
    problem = None
    if not TAG_PATTERN.fullmatch(tag):
        problem = f"{latest}: {tag[:40]!r} is not a checkpoint tag"
    elif not (run.checkpoint(tag)).is_dir():
        problem = f"{latest}: names {tag}, which does not exist"
    else:
        problem = damage(run.checkpoint(tag))
    if problem:
        whole = complete_tags(run)
        newest = f"write {whole[-1]} (the newest complete checkpoint) into {latest}" if whole else None
        todo = newest or f"remove {latest} to start afresh"
        raise ConfigError(f"{problem}; {todo}")
    check_folder(run.checkpoint(tag))  # DeepSpeed unpickles it with weights_only=False
    manifest = read_manifest(run.checkpoint(tag)) or {}
    saved_stage = manifest.get("zero_stage", zero_stage)
    if saved_stage != zero_stage:
        raise ConfigError(
            f"{run.checkpoint(tag)}: written under ZeRO stage {saved_stage}; "
            f"resume with deepspeed.zero_stage={saved_stage}"
        )
    saved_mode = precision_mode and (manifest.get("precision_mode") or weights_mode(run.checkpoint(tag)))
    if saved_mode and saved_mode != precision_mode:  # (older manifests do not record the mode)
        if saved_mode == "bf16 weights" and saved_stage == 0:  # an older version's bf16 at ZeRO-0
            raise ConfigError(
                f"{run.checkpoint(tag)}: written at ZeRO-0 in DeepSpeed's bf16 mode (bf16 weights and optimizer), "
                "which this version replaced by autocast over fp32 weights; its optimizer state does not carry "
                f"over: finish the run with the version that wrote it, or remove {latest} to start afresh"
            )
        raise ConfigError(
            f"{run.checkpoint(tag)}: written in precision mode {saved_mode!r}, this run would train in "
            f"{precision_mode!r} (another CPU or GPU picks another train.precision=auto); resume with "
            f"train.precision={saved_mode.split()[0]}"
        )
    return tag


def weights_mode(folder: Path) -> str | None:
    """The precision mode of a checkpoint whose manifest does not record it (written before it
    did, when bf16 meant bf16 weights at every ZeRO stage): from the dtype of its saved weights."""
    path = folder / (STAGE3_STATES if (folder / STAGE3_STATES).is_file() else MODEL_STATES)
    if not path.is_file():
        return None
    module = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("module") or {}
    dtype = next((t.dtype for t in module.values() if torch.is_tensor(t) and t.is_floating_point()), None)
    return None if dtype is None else "bf16 weights" if dtype == torch.bfloat16 else "fp32"


def ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


@dataclass(frozen=True)
class Resume:
    """How a run resumes from checkpoint `tag` on this world size."""

    tag: str
    saved_world_size: int
    world_size: int
    elastic: bool  # the data state is the same on every rank and for every world size
    universal: bool  # ZeRO-1/2/3 on another world size: load DeepSpeed's universal copy
    saved_global_batch: int | None  # windows per step when written (None: an older checkpoint)

    def global_batch_warning(self, global_batch: int) -> str | None:
        """One line when this run's windows per step differ from the checkpoint's, else None."""
        if self.saved_global_batch in (None, global_batch):
            return None
        return (
            f"warning: resuming {self.tag}: the global batch changed from {self.saved_global_batch} to "
            f"{global_batch} windows per step (micro_batch_size x grad_accum x ranks); training continues"
        )


def plan_resume(run: RunDir, tag: str, world_size: int, zero_stage: int, elastic: bool) -> Resume:
    """How checkpoint `tag` (checked by check_resume) loads on `world_size` ranks; a ConfigError,
    before anything is loaded or written, when the data pipeline cannot follow another world size."""
    record = read_manifest(run.checkpoint(tag)) or {}
    saved = record.get("world_size", world_size)
    if saved != world_size and not elastic:
        raise ConfigError(
            f"{run.checkpoint(tag)}: written by {ranks(saved)}, resuming with {world_size}; a streamed run "
            f"(data.loader=stream) resumes only on {ranks(saved)}; use data.loader=shards to change the number of ranks"
        )
    universal = saved != world_size and zero_stage > 0
    return Resume(tag, saved, world_size, elastic, universal, record.get("global_batch"))


def universal_copy(run: RunDir, tag: str) -> tuple[Path, bool]:
    """Collective. The universal copy of checkpoint `tag`, <tag>_universal beside it, made by
    rank 0 on first use while the others wait; returns its path and whether this call made it."""
    out = run.checkpoint(f"{tag}{UNIVERSAL_SUFFIX}")
    made, error = False, None
    if dist.rank() == 0 and not out.is_dir():
        made, error = True, convert_to_universal(run.checkpoint(tag), out)
    elif dist.rank() == 0:
        try:
            check_folder(out)  # made earlier, maybe by someone else
        except ConfigError as e:
            error = str(e)
    error = dist.gather_objects(error)[0]  # the other ranks wait here for rank 0's conversion
    if error:
        raise ConfigError(
            f"{run.checkpoint(tag)}: conversion to a universal checkpoint failed ({error}); "
            "resume on the number of ranks that wrote it"
        )
    return out, made


def convert_to_universal(folder: Path, out: Path) -> str | None:
    """DeepSpeed's ds_to_universal from `folder` into `out`, written under a temporary name and
    then renamed, so a crash leaves no half-made `out`. Returns the error in one line, or None."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(out.name + ".tmp")  # ds_to_universal also writes latest_universal beside its output
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(folder),
        output_folder=str(tmp / out.name),
        num_extract_workers=1,  # in this process: worker processes would each import torch again
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)
    except Exception as e:  # noqa: BLE001 - reported on every rank instead of leaving the others waiting
        shutil.rmtree(tmp, ignore_errors=True)
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    (tmp / out.name).rename(out)
    shutil.rmtree(tmp)
    return None


def repair_zero3_universal_load(engine, folder: Path) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal load (`folder`) gives every param group the
    hyperparameters of group 0 (weight decay on norms too) and one shared `step` tensor, which
    AdamW then advances once per group: give each group its own of both back."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS

    saved = torch.load(folder / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    optimizer = engine.optimizer.optimizer
    saved_groups = saved[OPTIMIZER_STATE_DICT][PARAM_GROUPS]
    for group, saved_group in zip(optimizer.param_groups, saved_groups, strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for state in optimizer.state.values():  # ZeRO-3 keeps the groups' params lists empty between steps
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def prune(run: RunDir, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step folders (never the one `latest` names)."""
    keep = run.latest_tag()
    for tag in run.tags()[:-keep_last]:
        if tag != keep:
            for name in (tag, f"{tag}{UNIVERSAL_SUFFIX}", f"{tag}{UNIVERSAL_SUFFIX}.tmp"):
                shutil.rmtree(run.checkpoint(name), ignore_errors=True)


def load(engine, run: RunDir, resume: Resume) -> tuple[TrainState, dict]:
    """Load the checkpoint `resume` names (through its universal copy on another world size:
    the engine must then be built with checkpoint.load_universal); returns the train state and
    this rank's data state, and sets this rank's RNG state."""
    tag, note = resume.tag, "ZeRO stage 0 keeps whole states, loaded as written"
    if resume.universal:
        path, made = universal_copy(run, tag)
        tag, note = path.name, f"{'converted to' if made else 'using'} a universal checkpoint at {path}"
    loaded, state = engine.load_checkpoint(str(run.checkpoints), tag=tag)
    if loaded is None or state is None:
        raise ConfigError(
            f"{run.checkpoint(tag)}: checkpoint could not be loaded; name another tag in {run.latest_file}"
        )
    if resume.universal and engine.zero_optimization_stage() == 3:
        repair_zero3_universal_load(engine, run.checkpoint(tag))
    if resume.saved_world_size != resume.world_size and dist.rank() == 0:
        saved, now = ranks(resume.saved_world_size), ranks(resume.world_size)
        print(f"resuming {resume.tag} written by {saved} on {now}: {note}", flush=True)
    r, rng_states = dist.rank(), state["rng_states"]
    data_state = state["data_states"][0 if resume.elastic else r]
    # A rank the checkpoint did not have starts from rank 0's RNG state: the model has no dropout,
    # so no random draw during training depends on it.
    set_rng_state(rng_states[r] if r < len(rng_states) else rng_states[0])
    return TrainState(state["step"], state["tokens"], state.get("val_loss")), data_state
