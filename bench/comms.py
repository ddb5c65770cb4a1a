"""Bytes that ZeRO's collectives move per training step, bf16 mode against fp32, and the loss gap.

    python bench/comms.py [--config configs/tiny.yaml] [--stages 2 3] [--steps 100] [key=value ...]

For each ZeRO stage and precision it starts 2 CPU ranks over gloo (the deepspeed launcher),
trains `--steps` steps of the config (default corpus, train.max_steps = --steps) with
DeepSpeed's comms logger on, and has every rank call deepspeed.comm.log_summary() at the end.
The bytes are the logger's message sizes (the tensor each rank hands to a collective) summed
over the training steps only (set-up, evaluation and saving left out), per step and rank.
Prints two Markdown tables: bytes per step by collective, and the losses after --steps steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COMMS_LOGGER = {"comms_logger": {"enabled": True, "verbose": False, "prof_all": True, "debug": False}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON file a rank-0 worker writes
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One rank: set up the trainer, train --steps steps with the comms logger on, report."""
    from launcher import distributed as dist
    from launcher.stopping import StopRequest
    from run.config import load_run_config
    from run.rundir import RunDir

    cfg = load_run_config(args.config, args.overrides)
    dist.prepare_environment(cfg.train.threads)
    dist.init(cfg.train.dist_timeout)
    import deepspeed.comm as ds_comm

    from launcher.trainer import Trainer

    trainer = Trainer(cfg, StopRequest(RunDir(cfg.train.output_dir)))
    before = dist.comms_bytes_by_op()
    losses = [trainer.train_step(step) for step in range(1, args.steps + 1)]
    after = dist.comms_bytes_by_op()
    val_loss = trainer.evaluate()
    ds_comm.log_summary()  # collective: every rank calls it; rank 0 prints DeepSpeed's table
    per_step = {op: (after[op] - before.get(op, 0)) / args.steps for op in after}
    if dist.rank() == 0:
        result = dict(precision=trainer.precision, bytes_per_step={k: v for k, v in per_step.items() if v})
        result.update(losses=losses, val_loss=val_loss, n_params=trainer.n_params)
        Path(args.worker).write_text(json.dumps(result))


def launch(args: argparse.Namespace, stage: int, precision: str, tmp: Path) -> dict:
    """Run the worker on 2 CPU ranks for one (stage, precision); returns rank 0's report."""
    from launcher.distributed import free_port

    out, ds_json = tmp / f"z{stage}-{precision}.json", tmp / "comms_logger.json"
    ds_json.write_text(json.dumps(COMMS_LOGGER))
    overrides = [f"deepspeed.zero_stage={stage}", f"train.precision={precision}", f"train.max_steps={args.steps}"]
    overrides += [f"deepspeed.config={ds_json}", f"train.output_dir={tmp / f'run-z{stage}-{precision}'}"]
    overrides += ["log.progress=false", "train.threads=1", *args.overrides]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [str(Path(__file__).resolve()), "--config", args.config, "--steps", str(args.steps), "--worker", str(out)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"stage {stage} {precision} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out_lines = proc.stdout.splitlines()
    start = next((i for i, line in enumerate(out_lines) if "Comm. Op" in line), len(out_lines))
    print(f"-- ZeRO-{stage} {precision}: DeepSpeed's log_summary (whole run, rank 0) --", *out_lines[start:], sep="\n")
    return json.loads(out.read_text())


def tables(results: dict[tuple[int, str], dict], steps: int) -> str:
    """Two Markdown tables: bytes per step by collective (with bf16 / fp32), and the losses."""
    lines = ["| ZeRO | precision | collective | MB per step per rank |", "|---|---|---|---:|"]
    for (stage, precision), r in sorted(results.items()):
        for op, b in sorted(r["bytes_per_step"].items()):
            lines.append(f"| {stage} | {precision} | {op} | {b / 1e6:.3f} |")
        lines.append(f"| {stage} | {precision} | **total** | **{sum(r['bytes_per_step'].values()) / 1e6:.3f}** |")
    head = f"| ZeRO | bf16 / fp32 bytes | loss at step {steps}: fp32 | bf16 | gap | mean of the last 10: fp32 | bf16 |"
    lines += ["", head + " val loss: fp32 | bf16 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage in sorted({s for s, _ in results}):
        a, b = results.get((stage, "fp32")), results.get((stage, "bf16"))
        if not (a and b):
            continue
        ratio = sum(b["bytes_per_step"].values()) / sum(a["bytes_per_step"].values())
        last = [sum(r["losses"][-10:]) / len(r["losses"][-10:]) for r in (a, b)]
        lines.append(
            f"| {stage} | {ratio:.3f} | {a['losses'][-1]:.4f} | {b['losses'][-1]:.4f} | "
            f"{b['losses'][-1] - a['losses'][-1]:+.4f} | {last[0]:.4f} | {last[1]:.4f} | "
            f"{a['val_loss']:.4f} | {b['val_loss']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            for precision in args.precisions:
                results[stage, precision] = launch(args, stage, precision, Path(tmp))
    print(tables(results, args.steps))


if __name__ == "__main__":
    main()
