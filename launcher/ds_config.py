"""The DeepSpeed config, generated from ours, with an optional user JSON merged in."""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import ConfigError
from run.config import RunConfig

# ZeRO-3 settings a user JSON may override. DeepSpeed steps the fp32 partition in sub-groups
# of this many elements, so AdamW's temporaries stay that small: the 350M model peaked at 5.7
# GiB per CPU rank with DeepSpeed's default of 1e9 and at 4.3 GiB with 5e7 (2 ranks, bf16;
# bench/scale_check.py, docs/benchmarks.md)
ZERO3_DEFAULTS = {"sub_group_size": 50_000_000}


def precision_mode(zero_stage: int, precision: str) -> str:
    """How a run computes in `precision` (the resolved train.precision) at `zero_stage`:
    - "fp32";
    - "bf16 autocast" (ZeRO-0): fp32 weights, gradients and AdamW, the forward under
      torch.autocast (bf16 matmuls), gradients all-reduced in bf16. Nothing is sharded, so bf16
      weights buy nothing, and DeepSpeed's bf16 mode without ZeRO accumulates gradients in bf16
      (it refuses fp32 accumulation there); the step is as fast (docs/benchmarks.md);
    - "bf16 weights" (ZeRO 1-3): DeepSpeed's bf16 mode, bf16 parameters and gradients (the
      collectives that shard them move half the bytes) with fp32 master weights and AdamW state.
    Checkpoints of the two bf16 modes differ, so a run resumes only in the mode that wrote it."""
    if precision == "fp32":
        return "fp32"
    return "bf16 autocast" if zero_stage == 0 else "bf16 weights"


def deepspeed_clips(cfg: RunConfig) -> bool:
    """True when DeepSpeed wraps the optimizer (ZeRO), so it clips and reports the gradient norm;
    a plain optimizer without ZeRO (fp32 or bf16 autocast) does neither."""
    return cfg.deepspeed.zero_stage > 0


def precision_config(cfg: RunConfig, precision: str) -> dict:
    """The DeepSpeed keys of precision_mode. ZeRO 1-3 accumulate bf16 gradients in fp32."""
    mode = precision_mode(cfg.deepspeed.zero_stage, precision)
    out = {"bf16": {"enabled": mode == "bf16 weights"}, "fp16": {"enabled": False}}
    if mode == "bf16 autocast":
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        out["communication_data_type"] = "bf16"
    if mode == "bf16 weights":
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out


def generated_ds_config(cfg: RunConfig, world_size: int, precision: str) -> dict:
    """Batch sizes, clipping, the ZeRO stage and the precision mode (`precision` is the resolved
    train.precision: fp32 or bf16)."""
    t = cfg.train
    return {
        "train_batch_size": t.global_batch(world_size),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # when DeepSpeed does not clip, the trainer does, to measure the norm DeepSpeed would not report
        "gradient_clipping": t.grad_clip if deepspeed_clips(cfg) else 0.0,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        **precision_config(cfg, precision),
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


def build_ds_config(cfg: RunConfig, world_size: int, precision: str, load_universal: bool = False) -> dict:
    """Ours plus the user's JSON; `precision` the resolved train.precision (fp32 or bf16);
    `load_universal` for a resume through a universal checkpoint."""
    ours = generated_ds_config(cfg, world_size, precision)
    if load_universal:
        ours["checkpoint"] = {"load_universal": True}
    merged = merge_user_config(ours, read_user_config(cfg.deepspeed.config), cfg.deepspeed.config)
    if cfg.deepspeed.zero_stage == 3:
        merged["zero_optimization"] = {**ZERO3_DEFAULTS, **merged["zero_optimization"]}
    return merged


def read_user_config(path_text: str) -> dict:
    """deepspeed.config's JSON object ({} when the key is empty)."""
    if not path_text:
        return {}
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config: {path} does not exist; give a DeepSpeed JSON file or leave it empty")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config {path}: not valid JSON ({e})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"deepspeed.config {path}: expected a JSON object")
    return user
