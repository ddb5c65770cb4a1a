"""Build small run directories with a real single-process DeepSpeed engine (CPU, gloo).

Each run directory follows the training contract: config.yaml, tokenizer.json,
metrics.jsonl and checkpoints/<tag>/ written by `engine.save_checkpoint` with client_state
{"step", "tokens", "val_loss"}. Beside them, `reference.pt` holds what the export is checked
against, taken from the live engine: a fixed batch of token ids and, for fp32 runs, the
engine's logits on it; for bf16 runs, the optimizer's fp32 master weights by name.

Tests call `make_run_dirs(root, specs)` (or `cached_run_dirs`, to share one build between
test modules), which runs this file in a subprocess so that the process group and
DeepSpeed's global state never leak into the pytest process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EOT = "<|endoftext|>"
SAMPLE_TEXT = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune.",
    "Ça, c'est déjà l'été: naïve façade, Übermaß, smörgåsbord, 東京, Ελληνικά, emoji 🙂.",
    "All the world's a stage, and all the men and women merely players.",
]


@dataclass
class RunSpec:
    """One run directory to build."""

    name: str
    precondition: str = "qkv"
    zero_stage: int = 0
    precision: str = "fp32"
    tie_embeddings: bool = True
    steps: int = 2
    world_size: int = 1
    """Ranks (processes) that train it; ZeRO partitions parameters across them."""


def train_tokenizer(path: Path, vocab_size: int = 300) -> None:
    """A tiny byte-level BPE with the end-of-text special token, trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SAMPLE_TEXT * 4, trainer)
    tok.save(str(path))


def run_config(spec: RunSpec, run_dir: Path):
    """A tiny model. precondition_eps is large and differs from norm_eps, so that using one eps
    for the other changes the logits by far more than fp32 rounding does."""
    from launcher.config import run_config_from_dict

    return run_config_from_dict(
        {
            "model": dict(
                vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                max_seq_len=64, norm_eps=1e-5, precondition_eps=1e-2, precondition=spec.precondition,
                tie_embeddings=spec.tie_embeddings, attn_backend="sdpa", init_std=0.1,
            ),
            "data": dict(vocab_size=300, seq_len=32, tokenizer=str(run_dir / "tokenizer.json")),
            "train": dict(precision=spec.precision, max_steps=spec.steps, output_dir=str(run_dir)),
            "deepspeed": dict(zero_stage=spec.zero_stage),
        }
    )  # fmt: skip


def perturbed_model(cfg):
    """A Transformer whose norm gains are not all ones, so a swapped or dropped norm shows."""
    import torch

    from model import Transformer

    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def build_engine(spec: RunSpec, cfg):
    import deepspeed
    import torch

    model = perturbed_model(cfg.model)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": spec.precision == "bf16"},
        "steps_per_print": 10**9,
    }
    # two groups (matrices, then vectors) as in training, so masters are not in model order
    groups = [{"params": [p for p in model.parameters() if p.dim() == d]} for d in (2, 1)]
    optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def fp32_masters(engine, spec: RunSpec) -> dict:
    """The optimizer's fp32 master weights by parameter name, read from the live engine."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters())
    if spec.zero_stage > 0:
        return {k: safe_get_full_fp32_param(p).detach().clone() for k, p in params.items()}
    name_of = {id(p): k for k, p in params.items()}  # stage 0 bf16 keeps fp32 copies group by group
    pairs = zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups, strict=True)
    return {name_of[id(lp)]: hp.detach().clone() for lo, hi in pairs for lp, hp in zip(lo, hi, strict=True)}


def reference(engine, spec: RunSpec, vocab: int) -> dict:
    """Fixed token ids and what the live engine says about them: fp32 logits or fp32 masters."""
    import deepspeed
    import torch

    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(7))
    if spec.precision == "bf16":
        return {"input_ids": ids, "fp32_params": fp32_masters(engine, spec)}
    engine.eval()
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=spec.zero_stage == 3), torch.no_grad():
        return {"input_ids": ids, "logits": engine(ids).logits.float().clone()}


def build_run_dir(spec: RunSpec, run_dir: Path, tokenizer: Path) -> None:
    """Train `spec.steps` steps, save a checkpoint per step, and write the run files (rank 0)."""
    import torch
    import torch.distributed as dist

    from launcher.config import save_run_config

    rank0 = dist.get_rank() == 0
    cfg = run_config(spec, run_dir)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "tokenizer.json").write_bytes(tokenizer.read_bytes())
        save_run_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(0)  # the same initial weights on every rank
    engine = build_engine(spec, cfg)
    torch.manual_seed(1 + dist.get_rank())  # different batches on every rank
    vocab, rows = cfg.model.vocab_size, []
    for step in range(1, spec.steps + 1):
        x = torch.randint(0, vocab, (2, 17))
        loss = engine(x[:, :-1], x[:, 1:]).loss
        engine.backward(loss)
        engine.step()
        tokens = step * x[:, :-1].numel() * dist.get_world_size()
        val_loss = round(loss.item() + 0.01, 6)
        rows.append({"step": step, "loss": loss.item(), "lr": 1e-2, "tokens": tokens, "val_loss": val_loss})
        state = {"step": step, "tokens": tokens, "val_loss": val_loss}
        engine.save_checkpoint(str(run_dir / "checkpoints"), tag=f"global_step{step}", client_state=state)
    ref = reference(engine, spec, vocab)  # collective under ZeRO-3
    if rank0:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        torch.save(ref, run_dir / "reference.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_all(root: Path, specs: list[RunSpec]) -> None:
    """In this process (one rank; RANK/WORLD_SIZE/MASTER_* come from the environment): one gloo
    process group for every engine, destroyed at the end."""
    import deepspeed
    import torch

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        for spec in specs:
            build_run_dir(spec, root / spec.name, root / "tokenizer.json")
    finally:
        torch.distributed.destroy_process_group()


def launch_ranks(root: Path, specs: list[RunSpec], world_size: int) -> list[subprocess.Popen]:
    """Start `world_size` rank processes that build `specs` together."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world_size))
    payload = json.dumps([asdict(s) for s in specs])
    return [
        subprocess.Popen(
            [sys.executable, __file__, str(root), payload],
            cwd=ROOT,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(world_size)
    ]


def make_run_dirs(root: Path, specs: list[RunSpec], timeout: float = 300) -> dict[str, Path]:
    """Build the run directories in fresh processes (one group of ranks per world size, all
    at once); returns {spec.name: run_dir}."""
    root.mkdir(parents=True, exist_ok=True)
    train_tokenizer(root / "tokenizer.json")
    sizes = sorted({s.world_size for s in specs})
    procs = [p for n in sizes for p in launch_ranks(root, [s for s in specs if s.world_size == n], n)]
    outputs = []
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:  # a rank left waiting in a collective after its peer died
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError("building run directories failed:\n" + "\n".join(o[-4000:] for o in outputs))
    return {s.name: root / s.name for s in specs}


# The run directories the export and generate tests share (built once per pytest session).
STANDARD_SPECS = [
    RunSpec("none", precondition="none", zero_stage=0),
    RunSpec("qk", precondition="qk", zero_stage=1),
    RunSpec("qkv", precondition="qkv", zero_stage=3, world_size=2),
    RunSpec("row", precondition="row", zero_stage=2, tie_embeddings=False, world_size=2),
    RunSpec("bf16_z0", precondition="qkv", zero_stage=0, precision="bf16"),
    RunSpec("bf16_z3", precondition="qk", zero_stage=3, precision="bf16", tie_embeddings=False, world_size=2),
]


def cached_run_dirs(root: Path, specs: list[RunSpec] = STANDARD_SPECS) -> dict[str, Path]:
    """make_run_dirs, unless `root` already holds these runs (so test modules can share them)."""
    done = root / "specs.json"
    payload = json.dumps([asdict(s) for s in specs])
    if not (done.is_file() and done.read_text() == payload):
        make_run_dirs(root, specs)
        done.write_text(payload)
    return {s.name: root / s.name for s in specs}


if __name__ == "__main__":
    build_all(Path(sys.argv[1]), [RunSpec(**d) for d in json.loads(sys.argv[2])])
