"""The DeepSpeed config, generated from ours, with an optional user JSON merged in."""

from __future__ import annotations

import json
from pathlib import Path

from data.config import ConfigError
from launcher.config import RunConfig


def generated_ds_config(cfg: RunConfig, world_size: int) -> dict:
    """Batch sizes, clipping and the ZeRO stage. Precision is torch autocast around the
    forward pass (weights and optimizer state stay fp32), so DeepSpeed runs in fp32 mode."""
    t = cfg.train
    return {
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # without ZeRO the trainer clips itself, to measure the norm DeepSpeed does not report
        "gradient_clipping": t.grad_clip if cfg.deepspeed.zero_stage else 0.0,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def merge_user_config(ours: dict, user: dict, path: str, prefix: str = "") -> dict:
    """Add the user's keys to ours; a key both set to different values is a ConfigError."""
    out = dict(ours)
    for key, value in user.items():
        name = f"{prefix}{key}"
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge_user_config(out[key], value, path, prefix=f"{name}.")
        elif out[key] != value:
            raise ConfigError(
                f"deepspeed.config {path}: {name}={value!r} conflicts with {name}={out[key]!r} from our config; "
                "set it through our config keys or drop it from the JSON"
            )
    return out


def build_ds_config(cfg: RunConfig, world_size: int) -> dict:
    ours = generated_ds_config(cfg, world_size)
    if not cfg.deepspeed.config:
        return ours
    path = Path(cfg.deepspeed.config)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config: {path} does not exist; give a DeepSpeed JSON file or leave it empty")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config {path}: not valid JSON ({e})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"deepspeed.config {path}: expected a JSON object")
    return merge_user_config(ours, user, str(path))
