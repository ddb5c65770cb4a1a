"""The GPU configs on CPU ranks: each rank's peak memory against the model-state estimate.

    python bench/scale_check.py                      # gpu-350m and gpu-1b, ZeRO-3, 2 ranks
    python bench/scale_check.py --config configs/gpu-350m.yaml --stages 0 1 2 3 --ranks 1 2 [key=value ...]

Each (config, ZeRO stage, ranks) runs under the deepspeed launcher on CPU ranks over gloo, with
the shipped DeepSpeed JSON of that stage (configs/deepspeed/zeroN.json; none for stage 0): the
trainer's set-up (default corpus, a short sequence, micro batch 1) and --steps training steps,
without evaluation or checkpoints. Every rank reports its resident set (VmRSS) and high-water
mark (VmHWM) after building the model, after deepspeed.initialize and after each step; the
table shows each rank's peak beside launcher.memory's model-state estimate and 16 bytes/param
of the unsharded model. Not part of the test suite: a 1.1B run takes minutes and ~20 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the default corpus (cached) and its 4096-token BPE stand in for the hub corpus; no probe
SHORT_RUN = ["data.files=[]", "data.hf_dataset=", "data.tokenizer=", "data.vocab_size=4096", "data.val_windows=2",
             "train.micro_batch_size=1", "train.grad_accum=1", "log.conditioning_interval=0"]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", help="a run config (repeatable; default: gpu-350m and gpu-1b)")
    p.add_argument("--stages", type=int, nargs="+", default=[3])
    p.add_argument("--ranks", type=int, nargs="+", default=[2])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # folder for the per-rank reports
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    return p.parse_args(argv)


def memory_gib() -> dict[str, float]:
    """This process's resident set now (rss) and its high-water mark (peak), in GiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss": int(fields["VmRSS"].split()[0]) / 2**20, "peak": int(fields["VmHWM"].split()[0]) / 2**20}


def worker(args: argparse.Namespace, config: str) -> None:
    """One rank: the trainer's set-up and --steps steps; writes RANK.json with memory by phase."""
    import torch

    from launcher import distributed as dist
    from run.config import load_run_config

    cfg = load_run_config(config, args.overrides)
    dist.prepare_environment(cfg.train.threads)
    dist.init(cfg.train.dist_timeout)
    from data import prepare_data, training_batches
    from launcher.ds_config import build_ds_config
    from launcher.engine import Stepper, build_engine, build_model, parameter_count
    from launcher.precision import resolve_precision

    phases = {"start": memory_gib()}
    device = torch.device("cpu")
    precision = resolve_precision(cfg.train.precision, device).name
    prepared = prepare_data(cfg.data, model_vocab_size=cfg.model.vocab_size, progress=False)  # locked: one prepares
    B, W = cfg.train.micro_batch_size, dist.world_size()
    stream = training_batches(prepared, rank=dist.rank(), world_size=W, seed=cfg.train.order_seed, batch_size=B)
    phases["data ready"] = memory_gib()
    ds_config = build_ds_config(cfg, dist.world_size(), precision)
    model = build_model(cfg, ds_config)  # the trainer's pieces, in its order, measured between
    phases["model built"] = memory_gib()
    engine, scheduler = build_engine(cfg, model, ds_config, device)
    phases["engine built"] = memory_gib()
    train_step = Stepper(cfg, engine, scheduler, stream, device)
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        loss = train_step(step)
        phases[f"step {step}"] = {**memory_gib(), "loss": loss, "seconds": time.perf_counter() - start}
    stream.close()
    zero = ds_config["zero_optimization"]
    report = dict(phases=phases, n_params=parameter_count(cfg), precision=precision, zero=zero)
    Path(args.worker, f"rank{dist.rank()}.json").write_text(json.dumps(report))


def launch(args: argparse.Namespace, config: str, stage: int, ranks: int, tmp: Path) -> list[dict]:
    """One run on `ranks` CPU ranks; returns every rank's report."""
    from launcher.distributed import free_port

    out = tmp / f"{Path(config).stem}-z{stage}-r{ranks}"
    out.mkdir()
    stage_json = ROOT / f"configs/deepspeed/zero{stage}.json"  # the shipped JSON of the stage run
    overrides = [*SHORT_RUN, f"data.seq_len={args.seq}", f"deepspeed.zero_stage={stage}"]
    overrides += [f"deepspeed.config={stage_json if stage_json.is_file() else ''}"]
    overrides += [f"train.output_dir={out / 'run'}", *args.overrides]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
    cmd += ["--master_port", str(free_port())]
    cmd += [str(Path(__file__).resolve()), "--config", config, "--steps", str(args.steps), "--worker", str(out)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*cmd, *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(f"{config} ZeRO-{stage} on {ranks} ranks failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return []
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def rows(config: str, stage: int, ranks: int, reports: list[dict]) -> list[str]:
    """Markdown rows, one per rank: peak and resident set by phase against the estimates."""
    from launcher.memory import model_state_bytes

    out = []
    for rank, r in enumerate(reports):
        n, phases = r["n_params"], r["phases"]
        estimate = model_state_bytes(n, stage, ranks, r["precision"]) / 2**30
        unsharded = 16 * n / 2**30
        peak = max(p["peak"] for p in phases.values())
        steps = [k for k in phases if k.startswith("step")]
        cells = [Path(config).stem, f"{n / 1e6:.0f}M", r["precision"], str(stage), str(ranks), str(rank)]
        cells += [f"{peak:.2f}", f"{estimate:.2f}", f"{peak / unsharded:.2f}"]
        cells += [f"{phases[k]['peak']:.2f}" for k in ("data ready", "model built", "engine built", steps[0])]
        cells += [f"{phases[steps[-1]]['rss']:.2f}"]
        cells += [f"{phases[steps[-1]]['seconds']:.1f}"]
        out.append("| " + " | ".join(cells) + " |")
    return out


HEADER = (
    "| config | params | precision | ZeRO | ranks | rank | peak GiB | model-state estimate GiB | "
    "peak / (16 B x params) | peak so far: data ready | model built | engine built | step 1 | "
    "RSS after the last step | step s |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args, args.config[0])
        return
    table = [HEADER]
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.config or ["configs/gpu-350m.yaml", "configs/gpu-1b.yaml"]:
            for stage in args.stages:
                for ranks in args.ranks:
                    reports = launch(args, config, stage, ranks, Path(tmp))
                    table += rows(config, stage, ranks, reports)
                    print(table[-1] if reports else "", flush=True)
    print(f"seq {args.seq}, micro batch 1, {args.steps} steps, {os.cpu_count()} cores; " + " ".join(args.overrides))
    print("\n".join(table))


if __name__ == "__main__":
    main()
