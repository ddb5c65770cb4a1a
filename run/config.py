"""The run config: sections model, data, train, deepspeed, log, each a typed dataclass.

`load_run_config(path, overrides)` reads a YAML file, applies dotted `key=value`
overrides and validates every key (unknown keys, bad choices, bad types and ranges are
ConfigErrors naming the key and what would be right).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from core.config import build_section, check_choice, check_output_path, check_range, help_parser, load_yaml
from core.errors import ConfigError
from core.files import write_atomic
from data.config import DataConfig
from model.config import ModelConfig
from run.rundir import RunDir

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    max_steps: int = 200
    """Optimizer steps to train for."""
    seed: int = 1234
    """Seed of the model init and (unless data_seed is set) of the data order."""
    data_seed: int = -1
    """Seed of the order of the training windows (-1 = train.seed): vary it alone to tell
    data-order noise from init noise."""
    micro_batch_size: int = 8
    """Windows per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    precision: str = "auto"
    """auto (bf16 where the hardware computes it natively: CUDA GPUs with bf16, CPUs with
    AVX512-BF16/AMX; fp32 elsewhere), fp32, or bf16 (DeepSpeed's bf16 mode: bf16 weights,
    gradients and collectives, fp32 master weights and optimizer state)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)."""
    beta1: float = 0.9
    """AdamW's decay rate of the running mean of gradients."""
    beta2: float = 0.95
    """AdamW's decay rate of the running mean of squared gradients."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0 = off)."""
    save_interval: int = 100
    """Save a checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """How many checkpoints to keep."""
    eval_interval: int = 50
    """Evaluate on the validation windows every N steps (and at the end); 0 = only at the end."""
    log_interval: int = 10
    """Write a metrics row every N steps."""
    output_dir: str = "runs/tiny"
    """The run directory: config, checkpoints, tensorboard, metrics.jsonl, hf export."""
    threads: int = 0
    """CPU threads per rank (0 = cores / local ranks)."""
    peak_flops: float = 0.0
    """Dense peak FLOP/s of one device at the training precision, for MFU (0 = known from the device
    name: H100, H200, A100, L40, or the development CPUs; MFU is left out for a device not known)."""
    dist_timeout: int = 600
    """Seconds a collective may wait before the job fails (a dead rank must not hang the rest)."""
    compile: bool = False
    """torch.compile the model through DeepSpeed (inductor): about 1.4x faster steps after a
    compile of about 30 s on CPU (the tiny model); pays off after about 200 steps."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping
    them (torch.utils.checkpoint, non-reentrant): less memory for about one more forward pass."""

    @property
    def order_seed(self) -> int:
        """The seed of the training-window order."""
        return self.seed if self.data_seed < 0 else self.data_seed

    def __post_init__(self) -> None:
        check_choice("train", "precision", self.precision, PRECISIONS)
        check_range("train", "dist_timeout", self.dist_timeout, self.dist_timeout >= 10, "an int >= 10 (seconds)")
        for key in ("max_steps", "micro_batch_size", "grad_accum", "keep_last"):
            check_range("train", key, getattr(self, key), getattr(self, key) >= 1, "a positive int")
        for key in ("save_interval", "eval_interval", "warmup_steps", "threads"):
            check_range("train", key, getattr(self, key), getattr(self, key) >= 0, "an int >= 0")
        check_range("train", "log_interval", self.log_interval, self.log_interval >= 1, "a positive int")
        check_range("train", "seed", self.seed, self.seed >= 0, "an int >= 0")
        check_range("train", "data_seed", self.data_seed, self.data_seed >= -1, "an int >= 0, or -1 for train.seed")
        check_range("train", "lr", self.lr, 0 < self.lr < math.inf, "a positive float")
        check_range("train", "min_lr", self.min_lr, 0 <= self.min_lr <= self.lr, "0 <= min_lr <= train.lr")
        for key in ("beta1", "beta2"):
            check_range("train", key, getattr(self, key), 0 <= getattr(self, key) < 1, "0 <= x < 1")
        for key in ("weight_decay", "grad_clip", "peak_flops"):
            value = getattr(self, key)
            check_range("train", key, value, 0 <= value < math.inf, "a float >= 0")

    def global_batch(self, world_size: int) -> int:
        """Windows per optimizer step: micro_batch_size x grad_accum x ranks."""
        return self.micro_batch_size * self.grad_accum * world_size


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    """ZeRO stage: 0, 1, 2 or 3."""
    config: str = ""
    """An optional DeepSpeed JSON merged into the generated one (conflicts are errors)."""

    def __post_init__(self) -> None:
        check_choice("deepspeed", "zero_stage", self.zero_stage, (0, 1, 2, 3))

    def check_files(self) -> None:
        """Before a run starts (not when a saved config is read back): the JSON must be there."""
        if self.config and not Path(self.config).is_file():
            raise ConfigError(f"deepspeed.config {self.config}: no such file; give a DeepSpeed JSON or leave it empty")


@dataclass
class LogConfig:
    tensorboard: bool = True
    """Write TensorBoard event files under RUN_DIR/tensorboard."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    conditioning_interval: int = 0
    """Run the conditioning probe every N steps (0 = off); every rank joins the forward pass."""
    wandb: bool = False
    """Also log every metrics row to Weights & Biases (rank 0; needs `pip install wandb`)."""
    wandb_project: str = "precond-lm"
    """W&B project."""
    wandb_entity: str = ""
    """W&B entity (user or team); empty = your default."""
    wandb_name: str = ""
    """W&B run name; empty = the run directory's name."""
    wandb_tags: str = ""
    """W&B tags, comma-separated."""

    def __post_init__(self) -> None:
        check_range("log", "conditioning_interval", self.conditioning_interval, self.conditioning_interval >= 0, ">= 0")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len: {self.data.seq_len} is larger than model.max_seq_len={self.model.max_seq_len}"
            )
        if not self.data.tokenizer and self.data.vocab_size > self.model.vocab_size:
            raise ConfigError(
                f"data.vocab_size: {self.data.vocab_size} is larger than model.vocab_size={self.model.vocab_size}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "deepspeed": DeepSpeedConfig,
    "log": LogConfig,
}


def run_config_from_dict(raw: dict) -> RunConfig:
    for name in raw:
        if name not in SECTIONS:
            raise ConfigError(f"{name}: unknown section; valid sections: {', '.join(SECTIONS)}")
    sections = {name: build_section(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
    return RunConfig(**sections)


def load_run_config(path: str | Path | None, overrides: list[str] = (), name: str = "--config") -> RunConfig:
    """`name` is the option that gave the path, for error messages."""
    return run_config_from_dict(load_yaml(path, overrides, name))


def check_run_dir(cfg: RunConfig) -> None:
    """train.output_dir must be a folder that can be written; a run it already holds must have
    the same model and data sections. Checked before any set-up, so nothing is written."""
    run_dir = Path(cfg.train.output_dir)
    check_output_path("train.output_dir", run_dir)
    run = RunDir(run_dir)
    saved = run.config
    if not (saved.is_file() and run.latest_file.is_file()):
        return
    try:
        before = load_run_config(saved)
    except ConfigError as e:
        raise ConfigError(f"train.output_dir {run_dir}: its config.yaml is not a run config ({e})") from None
    for section in ("model", "data"):
        if getattr(before, section) != getattr(cfg, section):
            raise ConfigError(
                f"train.output_dir {run_dir}: holds a run with a different {section} section; "
                "use a new train.output_dir (or the saved config.yaml) to resume"
            )


def save_run_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config atomically (temporary name, then rename)."""
    write_atomic(path, cfg.to_yaml())


def main(argv: list[str] | None = None) -> int:
    """`python -m run.config --config FILE [key=value ...] [--get section.key]`: print the
    resolved config (or one value of it)."""
    parser = help_parser("python -m run.config", "Print a resolved run config.", SECTIONS)
    parser.add_argument("--config", default=None, help="a run config YAML (default: built-in defaults)")
    parser.add_argument("--get", default=None, metavar="SECTION.KEY", help="print only this value")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    cfg = load_run_config(args.config, args.overrides)
    if args.get is None:
        print(cfg.to_yaml(), end="")
        return 0
    section, _, key = args.get.partition(".")
    value = getattr(getattr(cfg, section, None), key, None) if section in cfg.to_dict() else None
    if value is None or key not in cfg.to_dict()[section]:
        raise ConfigError(f"--get {args.get}: no such key; use section.key, e.g. train.output_dir")
    print(value)
    return 0


if __name__ == "__main__":
    import sys

    from core.cli import run_main

    sys.exit(run_main(main))
