"""Find and consolidate a DeepSpeed checkpoint of our Transformer into one fp32 state dict.

Layout (from `engine.save_checkpoint(RUN_DIR/"checkpoints", tag=...)`): `checkpoints/latest`
names the newest tag; `checkpoints/<tag>/` holds `mp_rank_00_model_states.pt` (ZeRO 0-2,
with the client state) or `zero_pp_rank_0_mp_rank_00_model_states.pt` (ZeRO-3), plus
`*_optim_states.pt` files for ZeRO 1-3.

The export takes the fp32 weights: in DeepSpeed's bf16 mode (ZeRO 1-3, launcher/ds_config.py)
the module holds bf16 copies and the fp32 master weights live with the optimizer.

- ZeRO 1-3: DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` merges the fp32
  partitions (`zero_pp_rank_*`, or `bf16_zero_pp_rank_*` in bf16 mode).
- ZeRO-1 in bf16 mode: DeepSpeed's BF16_Optimizer, whose `bf16_zero_pp_rank_*` files that
  converter does not read: each holds its rank's slice of the flat fp32 groups
  (`single_partition_of_fp32_groups`) and which parameter fragments it holds
  (`param_slice_mappings`); concatenated in rank order they give each parameter.
- ZeRO-0: the `module` entry is the fp32 state dict (fp32, and bf16, which trains under
  autocast over fp32 weights). Checkpoints written before that, in DeepSpeed's bf16 mode
  without ZeRO (FP16_UnfusedOptimizer), hold the fp32 copies under `optimizer.fp32_groups`,
  one list per param group, in the order of launcher.optim's groups: read from there.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import ConfigError
from model import ModelConfig, Transformer, param_groups
from run.pickles import check_folder
from run.rundir import MODEL_STATES, STAGE3_STATES, RunDir, complete_tags, damage

Tensor = torch.Tensor


@dataclass
class Checkpoint:
    """A consolidated checkpoint: fp32 weights (no lm_head when tied) and the client state."""

    tag: str
    state_dict: dict[str, Tensor]
    step: int | None
    tokens: int | None
    val_loss: float | None


def resolve_tag(run_dir: Path, tag: str | None, option: str = "--tag") -> Path:
    """The checkpoint folder for `tag` (default: the one `checkpoints/latest` names). `option` is
    how the user picks another checkpoint (the export's --tag); None: by editing `latest`."""
    run = RunDir(run_dir)
    named = tag is not None
    if tag is None:
        tag = run.latest_tag()
        if tag is None:
            raise ConfigError(f"--run {run_dir}: no checkpoint found ({run.latest_file} is missing); train first")
    folder = run.checkpoint(tag)
    pick = f"pass one with {option}" if option else f"write one into {run.latest_file}"
    if not folder.is_dir():
        where = f"{option} {tag}:" if named and option else f"{run.latest_file} names {tag}:"
        have = ", ".join(run.tags()) or "none"
        raise ConfigError(f"{where} no such checkpoint under {run.checkpoints}; available: {have}")
    if not (folder / MODEL_STATES).is_file() and not (folder / STAGE3_STATES).is_file():
        raise ConfigError(f"checkpoint {folder}: no {MODEL_STATES} or {STAGE3_STATES}; is it a DeepSpeed checkpoint?")
    problem = damage(folder)
    if problem:
        whole = ", ".join(complete_tags(run)) or "none"
        raise ConfigError(f"checkpoint {folder.name} is not whole ({problem}); {pick}; whole ones: {whole}")
    return folder


def _quiet():
    """DeepSpeed's converter prints progress to stdout and stderr; keep the CLI's output clean."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def _check_keys(sd: dict[str, Tensor], cfg: ModelConfig, where: Path) -> None:
    """The consolidated dict must be exactly our Transformer's (shapes included)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    wrong = [k for k in expected.keys() & sd.keys() if tuple(sd[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        raise ConfigError(
            f"checkpoint {where} does not match config.yaml's model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}"
        )


def _unfused_master_weights(optimizer_state: dict, cfg: ModelConfig) -> dict[str, Tensor]:
    """ZeRO-0 in bf16 mode: name -> fp32 master weight from `optimizer.fp32_groups`."""
    with torch.device("meta"):
        groups = param_groups(Transformer(cfg))
    saved = optimizer_state["fp32_groups"]
    return {
        name: t
        for group, tensors in zip(groups, saved, strict=True)
        for (name, _), t in zip(group, tensors, strict=True)
    }


def _bf16_optimizer_weights(files: list[Path], cfg: ModelConfig) -> dict[str, Tensor]:
    """ZeRO-1 in bf16 mode: name -> fp32 master weight from BF16_Optimizer's per-rank files."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    pieces: dict[str, list[Tensor]] = {}
    for path in sorted(files, key=lambda p: int(re.search(r"pp_rank_(\d+)", p.name)[1])):
        state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for flat, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"], strict=True):
            for name, fragment in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, fragment.start, fragment.numel))
    return {name: torch.cat(parts).view(shapes[name]) for name, parts in pieces.items()}


def _fp32_weights(folder: Path, states: dict, cfg: ModelConfig) -> dict[str, Tensor]:
    """The checkpoint's fp32 weights, wherever its ZeRO stage and precision mode keep them."""
    optim_files = sorted(folder.glob("*_optim_states.pt"))
    if not optim_files:
        optimizer_state = states.get("optimizer") or {}
        return _unfused_master_weights(optimizer_state, cfg) if "fp32_groups" in optimizer_state else states["module"]
    first = torch.load(optim_files[0], map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
    if "param_slice_mappings" in first and "zero_stage" not in first:
        return _bf16_optimizer_weights(optim_files, cfg)
    with _quiet():  # importing deepspeed also logs its accelerator choice
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


def consolidate(folder: Path, cfg: ModelConfig) -> Checkpoint:
    """Load checkpoint `folder` (any ZeRO stage, fp32 or bf16 mode) as fp32 tensors on the CPU,
    after checking that its pickles name only what checkpoints hold (run.pickles)."""
    check_folder(folder)
    states_file = folder / (STAGE3_STATES if (folder / STAGE3_STATES).is_file() else MODEL_STATES)
    states = torch.load(states_file, map_location="cpu", weights_only=False, mmap=True)
    sd = dict(_fp32_weights(folder, states, cfg))
    head = sd.pop("lm_head.weight", None)
    if cfg.tie_embeddings and head is not None and not torch.equal(head.float(), sd["embed_tokens.weight"].float()):
        raise ConfigError(f"checkpoint {folder}: lm_head differs from embed_tokens but model.tie_embeddings is true")
    if not cfg.tie_embeddings and head is not None:
        sd["lm_head.weight"] = head
    sd = {k: v.detach().float().contiguous() for k, v in sd.items()}
    _check_keys(sd, cfg, folder)
    val_loss = states.get("val_loss")
    return Checkpoint(
        tag=folder.name,
        state_dict=sd,
        step=states.get("step"),
        tokens=states.get("tokens"),
        val_loss=None if val_loss is None else float(val_loss),
    )
