"""Run directories written by `launcher.train` itself: a tiny corpus and model, CPU, gloo.

Each run trains 8 steps and saves checkpoints global_step4 and global_step8 with the
trainer's own DeepSpeed config and optimizer; 2-rank runs go through the deepspeed launcher.
Test files get the standard runs from the session fixture `runs` (tests/conftest.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, also when run as a script

from data.tokenizer import EOS_TOKEN as EOT  # noqa: E402
from launcher.distributed import free_port  # noqa: E402
from tests.train_helpers import ROOT, check, run_deepspeed, run_single, tiny_overrides, write_corpus  # noqa: E402

__all__ = ["BF16_SPECS", "EOT", "ROOT", "RunSpec", "STANDARD_SPECS", "make_run_dirs"]


@dataclass
class RunSpec:
    """One run directory to build."""

    name: str
    precondition: str = "qk"
    zero_stage: int = 0
    tie_embeddings: bool = True
    ranks: int = 1
    precision: str = "fp32"


def overrides(spec: RunSpec, corpus: str, cache: Path, run_dir: Path) -> list[str]:
    """precondition_eps is large and differs from norm_eps, so that using one eps for the other
    changes the logits by far more than fp32 rounding does; the large lr moves the norm gains
    away from 1, so a swapped or dropped norm shows."""
    return tiny_overrides(corpus, cache, run_dir, **{
        "model.precondition": spec.precondition,
        "model.tie_embeddings": str(spec.tie_embeddings).lower(),
        "model.precondition_eps": 1e-2,
        "model.init_std": 0.1,
        "model.attn_backend": "sdpa",
        "deepspeed.zero_stage": spec.zero_stage,
        "train.precision": spec.precision,
        "train.lr": 3e-2,
    })  # fmt: skip


def make_run_dirs(root: Path, specs: list[RunSpec]) -> dict[str, Path]:
    """Train every spec in turn (they share one corpus cache); returns {spec.name: run_dir}."""
    corpus, cache = write_corpus(root / "corpus"), root / "cache"
    for spec in specs:
        args = overrides(spec, corpus, cache, root / spec.name)
        check(run_single(args) if spec.ranks == 1 else run_deepspeed(args, spec.ranks, free_port()))
    return {s.name: root / s.name for s in specs}


# The run directories the export and generate tests share (conftest.py's `runs`).
STANDARD_SPECS = [
    RunSpec("none", precondition="none", zero_stage=0),
    RunSpec("qk", precondition="qk", zero_stage=1),
    RunSpec("qkv", precondition="qkv", zero_stage=3, ranks=2),
    RunSpec("row", precondition="row", zero_stage=2, tie_embeddings=False, ranks=2),
]


# bf16 where the fp32 weights sit in different places (see export/consolidate.py): ZeRO-0 under
# autocast (the module), ZeRO-1 and ZeRO-3 in DeepSpeed's bf16 mode (the optimizer's masters)
BF16_SPECS = [
    RunSpec("bf16-zero0", zero_stage=0, precision="bf16"),
    RunSpec("bf16-zero1", zero_stage=1, precision="bf16", tie_embeddings=False, ranks=2),
    RunSpec("bf16-zero3", zero_stage=3, precision="bf16", ranks=2),
]
