"""Helpers for the training tests: a tiny corpus, a tiny config, and launchers as subprocesses."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORDS = "the of and to in is was he for it with as his on be at by had are but from or she an they".split()
WORDS += "king queen lord sword crown night day love death fear hope storm sea ship castle field".split()


def write_corpus(folder: Path, n_docs: int = 60, seed: int = 0) -> str:
    """Plain-text documents of random words, one file each; returns their glob."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(40, 120))]
        (folder / f"doc{i:03d}.txt").write_text(" ".join(words) + ".\n")
    return str(folder / "*.txt")


def tiny_overrides(corpus_glob: str, cache_dir: Path, run_dir: Path, **extra) -> list[str]:
    """A ~60k-parameter model that trains a step in milliseconds, fp32, logging every step."""
    cfg = {
        "model.vocab_size": 512,
        "model.d_model": 32,
        "model.n_layers": 2,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        "model.ffn_hidden": 64,
        "model.max_seq_len": 32,
        "data.files": corpus_glob,
        "data.vocab_size": 300,
        "data.seq_len": 16,
        "data.val_windows": 8,
        "data.cache_dir": str(cache_dir),
        "train.max_steps": 8,
        "train.micro_batch_size": 2,
        "train.precision": "fp32",
        "train.warmup_steps": 2,
        "train.log_interval": 1,
        "train.eval_interval": 4,
        "train.save_interval": 4,
        "train.output_dir": str(run_dir),
        "train.threads": 1,
        "train.dist_timeout": 60,
        "log.progress": "false",
    }
    cfg.update(extra)
    return [f"{k}={v}" for k, v in cfg.items()]


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def fresh_process_env(tmp: Path) -> dict:
    """A user's process: offline, an empty HF home in `tmp`, and nothing of the project importable."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "PYTHONPATH"))}
    return {**e, "HF_HOME": str(tmp / "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_single(overrides: list[str], timeout: int = 240, **env_extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launcher.train", "--config", str(ROOT / "configs/tiny.yaml"), *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)


def deepspeed_cmd(overrides: list[str], ranks: int, port: int, extra_args: list[str] = ()) -> list[str]:
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [
        *launcher,
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port),
        *extra_args,
        "--module",
        "launcher.train",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        *overrides,
    ]


def run_deepspeed(overrides, ranks: int, port: int, timeout: int = 300, **env_extra) -> subprocess.CompletedProcess:
    cmd = deepspeed_cmd(overrides, ranks, port)
    return subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `folder`: to check a command changed nothing.
    A run directory's `lock` is left out: each run that takes it writes its own host and pid there."""
    paths = [p for p in sorted(folder.rglob("*")) if p.relative_to(folder) != Path("lock")]
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in paths}


def metric_rows(run_dir: Path) -> list[dict]:
    from run.rundir import RunDir

    return RunDir(run_dir).rows()


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(run_dir) if "loss" in r}


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    )
