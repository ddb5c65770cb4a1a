"""Baseline versus preconditioned attention, measured: train every variant with the same seed,
data and token budget, probe the condition numbers before and after, and write a report.

    python -m launcher.experiment --config FILE [--name NAME] [--seeds 1,2] [--variants none,qk,qkv,row]
                                  [--conditioning-interval K] [--target-loss X]
                                  [--sweep section.key=v1,v2 ...] [key=value ...]

Runs `python -m launcher.train` once per (variant, seed) into runs/experiments/NAME/V-seedS,
or with --sweep once per (point, variant, seed) into runs/experiments/NAME/POINT/V-seedS, where
the points are the cross product of the swept values (e.g. lr=0.001), one after another; a
run that already finished is skipped, an unfinished one resumes from its checkpoint. Then the
probe (launcher.conditioning) measures the step-0 and the final model of each run, and
docs/experiments/NAME/ gets README.md (tables), results.json and PNG plots (sweep.png for a sweep).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from data.config import ConfigError, check_output_path, run_main
from kernels import PRECONDITIONERS
from launcher.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launcher.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path, help="the run config every variant trains with")
    p.add_argument("--name", help="experiment name (default: the config's file name)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the config's train.seed)")
    p.add_argument("--variants", default="none,qk,qkv,row", help="comma-separated preconditioners")
    interval = "(default: the config's log.conditioning_interval, or else train.eval_interval)"
    p.add_argument("--conditioning-interval", type=int, help=f"in-training probe every K steps {interval}")
    target = "(default: the worst variant's mean final validation loss, which every variant reaches on average)"
    p.add_argument("--target-loss", type=float, help=f"for 'tokens to reach' {target}")
    p.add_argument("--probe-batch", type=int, default=8, help="validation windows for the before/after probe")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/experiments"), help="where the runs go")
    p.add_argument("--out-dir", type=Path, default=Path("docs/experiments"), help="where the report goes")
    p.add_argument("--report-only", action="store_true", help="do not train; report on the runs already there")
    sweep = "sweep a key over values (repeatable; the points are the cross product)"
    p.add_argument("--sweep", action="append", default=[], metavar="SECTION.KEY=V1,V2", help=sweep)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace):
    """Validate before anything heavy; returns the resolved base config."""
    from launcher.config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants:
        raise ConfigError(f"--variants: empty; choose one or more of {', '.join(PRECONDITIONERS)}")
    for v in args.variants:
        if v not in PRECONDITIONERS:
            raise ConfigError(f"--variants: {v!r} is unknown; choose from {', '.join(PRECONDITIONERS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [cfg.train.seed]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated ints, e.g. 1,2,3") from None
    if args.conditioning_interval is None:
        args.conditioning_interval = cfg.log.conditioning_interval or cfg.train.eval_interval
    if args.conditioning_interval < 0 or args.probe_batch < 1:
        raise ConfigError("--conditioning-interval must be >= 0 and --probe-batch >= 1")
    args.name = args.name or args.config.stem
    check_paths(args)
    args.points = sweep_points(args)
    return cfg


RUNNER_KEYS = ("model.precondition", "train.seed", "train.output_dir", "log.conditioning_interval", "log.progress")
"""The keys the experiment sets for each run (train_command), in that order; a sweep may not set them."""


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    """Split "section.key=v1,v2" into ("section.key", ["v1", "v2"])."""
    key, sep, values = spec.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name or "." in name:
        raise ConfigError(f"--sweep {spec!r}: expected section.key=v1,v2,..., e.g. train.lr=1e-3,3e-3")
    if key.strip() in RUNNER_KEYS:
        raise ConfigError(f"--sweep {spec!r}: {key.strip()} is set by the experiment; use --variants or --seeds")
    items = [v.strip() for v in values.split(",")]
    if not values.strip() or any(not v for v in items):
        raise ConfigError(f"--sweep {spec!r}: empty value list; expected {key.strip()}=v1,v2,...")
    return key.strip(), items


def sweep_points(args: argparse.Namespace) -> list[dict]:
    """The cross product of the swept values: name, overrides and resolved config of each point."""
    from launcher.config import load_run_config

    axes = [parse_sweep(spec) for spec in args.sweep]
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--sweep: a key is swept twice ({', '.join(keys)}); give each key once")
    short = [k.split(".")[1] for k in keys]
    labels = short if len(set(short)) == len(short) else keys
    points = []
    for combo in itertools.product(*(values for _, values in axes)) if axes else []:
        over = [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
        try:
            cfg = load_run_config(args.config, [*args.overrides, *over])
        except ConfigError as e:
            raise ConfigError(f"--sweep {' '.join(over)}: {e}") from None
        resolved = [getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in keys]
        name = ",".join(f"{lab}={str(v).replace('/', '_')}" for lab, v in zip(labels, resolved, strict=True))
        points.append({"name": name, "overrides": over, "values": dict(zip(keys, resolved, strict=True)), "cfg": cfg})
    if len({p["name"] for p in points}) != len(points):
        raise ConfigError(f"--sweep: two points resolve to the same values ({', '.join(p['name'] for p in points)})")
    return points


def check_paths(args: argparse.Namespace) -> None:
    """The experiment's name and output folders, before anything is created."""
    if args.name in (".", "..") or "/" in args.name or os.sep in args.name:
        raise ConfigError(f"--name {args.name!r}: expected a plain folder name, e.g. {args.config.stem}")
    check_output_path("--runs-dir", args.runs_dir)
    check_output_path("--out-dir", args.out_dir)


# ---- training ------------------------------------------------------------------------------
def read_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows (none before the run starts)."""
    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def finished(run_dir: Path, max_steps: int) -> bool:
    """Trained to max_steps, final evaluation and checkpoint written."""
    latest = run_dir / "checkpoints" / "latest"
    done = latest.is_file() and latest.read_text().strip() == f"global_step{max_steps}"
    return done and any(r.get("step") == max_steps and "val_loss" in r for r in read_rows(run_dir))


def train_command(args: argparse.Namespace, variant: str, seed: int, run_dir: Path, point: list[str] = ()) -> list[str]:
    values = (variant, seed, run_dir, args.conditioning_interval, "false")
    ours = [f"{key}={value}" for key, value in zip(RUNNER_KEYS, values, strict=True)]
    return [sys.executable, "-m", "launcher.train", "--config", str(args.config), *args.overrides, *point, *ours]


def train_one(args: argparse.Namespace, variant: str, seed: int, run_dir: Path, point: list[str] = ()) -> float:
    """Train (or resume) one run as a subprocess, its output in RUN_DIR/train.log; returns seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "cond_after.json").unlink(missing_ok=True)  # stale once training continues
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    with open(run_dir / "train.log", "a") as log:
        cmd = train_command(args, variant, seed, run_dir, point)
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"{run_dir}: training failed (exit {proc.returncode}): {' '.join(tail)}; see train.log")
    return time.perf_counter() - start


def probe_run(run_dir: Path, batch: int) -> None:
    """The probe CLI on the step-0 model ("before") and on the final checkpoint ("after")."""
    from launcher import conditioning

    for which, extra in (("before", ["--untrained"]), ("after", [])):
        out = run_dir / f"cond_{which}.json"
        if not out.is_file():
            conditioning.main(["--model", str(run_dir), "--json", str(out), "--batch", str(batch), *extra])


def run_all(args: argparse.Namespace, max_steps: int) -> dict[tuple[str, int], Path]:
    """Every (variant, seed) trained and probed; returns their run dirs."""
    runs = {}
    for seed in args.seeds:
        for variant in args.variants:
            run_dir = args.runs_dir / args.name / f"{variant}-seed{seed}"
            runs[variant, seed] = run_dir
            if not args.report_only:
                run_one(args, variant, seed, run_dir, max_steps)
    return runs


def run_one(args: argparse.Namespace, variant: str, seed: int, run_dir: Path, max_steps: int, point=()) -> None:
    """Train (unless finished) one run; probe it unless it is a sweep point (the sweep reports losses)."""
    if finished(run_dir, max_steps):
        print(f"skip {run_dir}: already finished", flush=True)
    else:
        print(f"train {variant} seed {seed} {' '.join(point)} -> {run_dir}", flush=True)
        secs = train_one(args, variant, seed, run_dir, point)
        val = [r["val_loss"] for r in read_rows(run_dir) if "val_loss" in r]
        print(f"  done in {secs:.0f} s, final val_loss {val[-1]:.4f}", flush=True)
    if not point:
        probe_run(run_dir, args.probe_batch)


def run_sweep(args: argparse.Namespace) -> dict[tuple[str, str, int], tuple[Path, bool]]:
    """Every (point, variant, seed) trained and probed; returns (run dir, training failed).
    Within a point every variant of a seed has the same init and batches: the seed and the data
    settings come from the config, the point and the seed, never from the variant."""
    runs = {}
    for point in args.points:
        for seed in args.seeds:
            for variant in args.variants:
                run_dir = args.runs_dir / args.name / point["name"] / f"{variant}-seed{seed}"
                runs[point["name"], variant, seed] = (run_dir, False)
                if args.report_only:
                    continue
                try:
                    run_one(args, variant, seed, run_dir, point["cfg"].train.max_steps, point["overrides"])
                except RuntimeError as e:  # a diverged run (NaN loss) is a result of the sweep
                    print(f"  {e}; counted as diverged", flush=True)
                    runs[point["name"], variant, seed] = (run_dir, True)
    return runs


# ---- collecting what the runs logged -------------------------------------------------------
def logged_conditioning(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the in-training probe, from the "cond/..." keys of metrics.jsonl."""
    series: dict[str, list] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("cond/") and v is not None:
                series.setdefault(k, []).append((r["step"], float(v)))
    return series


def collect(run_dir: Path) -> dict:
    """One run's evaluation curve, throughput, and condition numbers (before, after, logged)."""
    from launcher.conditioning import read_json

    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl; train it first (drop --report-only)")
    rows = read_rows(run_dir)
    evals = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    tps = [r["tokens_per_sec"] for r in rows if r.get("tokens_per_sec")]
    tps = tps[1:] if len(tps) > 1 else tps  # the first row includes start-up
    out = {"run_dir": str(run_dir), "evals": evals, "tokens_per_sec": sorted(tps)[len(tps) // 2] if tps else None}
    for which in ("before", "after"):
        path = run_dir / f"cond_{which}.json"
        layers = read_json(path)["layers"] if path.is_file() else []
        out[f"cond_{which}"] = [layer["median_over_heads"] for layer in layers]
    out["cond_logged"] = logged_conditioning(rows)
    return out


def collect_sweep(run_dir: Path, failed: bool) -> dict:
    """collect() of a sweep run; one that failed before its first row is an empty, failed run."""
    if not (run_dir / "metrics.jsonl").is_file() and failed:
        return {"run_dir": str(run_dir), "evals": [], "tokens_per_sec": None, "failed": True}
    return collect(run_dir) | {"failed": failed}


def main(argv: list[str] | None = None) -> int:
    from launcher.experiment_report import write_report

    args = parse_args(argv)
    cfg = check_args(args)
    try:
        runs = run_sweep(args) if args.points else run_all(args, cfg.train.max_steps)
    except RuntimeError as e:  # a run failed: its log says why
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.points:
        results = {key: collect_sweep(*run) for key, run in runs.items()}
    else:
        results = {key: collect(run_dir) for key, run_dir in runs.items()}
    command = "python -m launcher.experiment " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    out = write_report(args.out_dir / args.name, cfg, args, results, command)
    print(f"report: {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
