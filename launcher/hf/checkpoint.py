"""Find and consolidate a DeepSpeed checkpoint of our Transformer into one fp32 state dict.

Layout (from `engine.save_checkpoint(RUN_DIR/"checkpoints", tag=...)`): `checkpoints/latest`
names the newest tag; `checkpoints/<tag>/` holds `mp_rank_00_model_states.pt` (ZeRO 0-2,
with the client state) or `zero_pp_rank_0_mp_rank_00_model_states.pt` (ZeRO-3), plus
`*_optim_states.pt` files for ZeRO 1-3.

- ZeRO 1-3: DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` merges the fp32
  partitions.
- ZeRO 0: the `module` entry is the full state dict. The trainer runs DeepSpeed in fp32 mode
  (launcher/ds_config.py), so these are the fp32 weights.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from data.config import ConfigError
from model import ModelConfig, Transformer

Tensor = torch.Tensor
STAGE3_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass
class Checkpoint:
    """A consolidated checkpoint: fp32 weights (no lm_head when tied) and the client state."""

    tag: str
    state_dict: dict[str, Tensor]
    step: int | None
    tokens: int | None
    val_loss: float | None


def resolve_tag(run_dir: Path, tag: str | None) -> Path:
    """The checkpoint folder for `tag` (default: the one `checkpoints/latest` names)."""
    ckpt_root = run_dir / "checkpoints"
    if tag is None:
        latest = ckpt_root / "latest"
        if not latest.is_file():
            raise ConfigError(f"--run {run_dir}: no checkpoint found ({latest} is missing); train first")
        tag = latest.read_text().strip()
    folder = ckpt_root / tag
    if not folder.is_dir():
        have = sorted(p.name for p in ckpt_root.iterdir() if p.is_dir()) if ckpt_root.is_dir() else []
        raise ConfigError(f"--tag {tag}: no such checkpoint under {ckpt_root}; available: {', '.join(have) or 'none'}")
    if not (folder / MODEL_STATES).is_file() and not (folder / STAGE3_STATES).is_file():
        raise ConfigError(f"checkpoint {folder}: no {MODEL_STATES} or {STAGE3_STATES}; is it a DeepSpeed checkpoint?")
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


def consolidate(folder: Path, cfg: ModelConfig) -> Checkpoint:
    """Load checkpoint `folder` (any ZeRO stage) as fp32 tensors on the CPU."""
    states_file = folder / (STAGE3_STATES if (folder / STAGE3_STATES).is_file() else MODEL_STATES)
    states = torch.load(states_file, map_location="cpu", weights_only=False, mmap=True)
    if any(folder.glob("*_optim_states.pt")):
        with _quiet():  # importing deepspeed also logs its accelerator choice
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:
        sd = dict(states["module"])
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
