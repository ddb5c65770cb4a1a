"""Peak activation memory of one training step, with and without activation checkpointing.

    python bench/activation_memory.py [--config configs/gpu-350m.yaml] [--seq 512] [--batch 1]

Each variant (precision x train.activation_checkpointing) runs in a fresh process on the CPU:
the config's model (parameters in the precision, gradients already allocated), then two
forward + backward passes of random tokens. The peak is the process's resident-set high-water
mark (VmHWM, reset through /proc/self/clear_refs just before the second step) minus the
resident set before it, so it counts what the step adds: activations and transient buffers.
glibc is told to mmap every allocation of 64 KiB or more, so freed tensors leave the resident
set at once and the high-water mark follows live memory. Linux only. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/gpu-350m.yaml")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--worker", nargs=2, metavar=("PRECISION", "CHECKPOINTING"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now, VmHWM: the high-water mark)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def worker(args: argparse.Namespace) -> dict:
    """One variant: returns the step's added peak and the resident set before it, in GiB."""
    import torch

    from model import Transformer
    from run.config import load_run_config

    precision, checkpointing = args.worker[0], args.worker[1] == "on"
    cfg = load_run_config(args.config, ["model.attn_backend=sdpa"]).model
    model = Transformer(cfg).train()
    if precision == "bf16":  # what DeepSpeed's bf16 mode does: bf16 parameters, fp32 buffers
        for p in model.parameters():
            p.data = p.data.bfloat16()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.activation_checkpointing = checkpointing
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    model(x[:, :-1], x[:, 1:]).loss.backward()  # warm-up: the kernels' one-time allocations
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = status_kib("VmRSS")
    start = time.perf_counter()
    model(x[:, :-1], x[:, 1:]).loss.backward()
    seconds = time.perf_counter() - start
    return dict(added_gib=(status_kib("VmHWM") - before) / 2**20, before_gib=before / 2**20, seconds=seconds)


def run_variant(args: argparse.Namespace, precision: str, checkpointing: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--seq", str(args.seq)]
    cmd += ["--batch", str(args.batch), "--worker", precision, checkpointing]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(f"{args.config}, batch {args.batch} x seq {args.seq}, {os.cpu_count()} cores")
    print("| precision | activation checkpointing | step adds (GiB) | resident before (GiB) | step s |")
    print("|---|---|---:|---:|---:|")
    for precision in args.precisions:
        for checkpointing in ("off", "on"):
            r = run_variant(args, precision, checkpointing)
            print(
                f"| {precision} | {checkpointing} | {r['added_gib']:.2f} | {r['before_gib']:.2f} | {r['seconds']:.1f} |"
            )


if __name__ == "__main__":
    main()
