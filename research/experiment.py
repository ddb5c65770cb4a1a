"""Baseline versus preconditioned attention, measured: train every variant with the same seed,
data and token budget, probe the condition numbers before and after, and write a report.

    python -m launcher.experiment --config FILE [--name NAME] [--seeds 1,2] [--variants none,qk,qkv,row]
                                  [--conditioning-interval K] [--target-loss X]
                                  [--sweep section.key=v1,v2 ...] [--variant-set V:section.key=value ...]
                                  [--jobs N] [key=value ...]

Runs `python -m launcher.train` once per (variant, seed) into runs/experiments/NAME/V-seedS,
or with --sweep once per (point, variant, seed) into runs/experiments/NAME/POINT/V-seedS, where
the points are the cross product of the swept values (e.g. lr=0.001). Runs go seed by seed (a
sweep cut short has every point at the first seeds), --jobs at a time, each with its share of
the cores; a run that already finished is skipped, an unfinished one resumes from its
checkpoint, and one not on disk but recorded as finished in the report's results.json with the
same settings (trained on another machine, say) is taken from there. --variant-set gives one variant its own
setting (e.g. each variant at its best learning rate from a sweep). Then the probe
(research.conditioning) measures the step-0 and the final model of each run (not for a sweep,
which reports losses), and docs/experiments/NAME/ gets README.md (tables), results.json and
PNG plots (sweep.png for a sweep).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from core.cli import run_main
from core.config import check_output_path
from core.errors import ConfigError
from kernels import PRECONDITIONERS
from research import report as rep
from run.rundir import RunDir, steady, tag_for

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
    own = "one variant's own setting, on top of the overrides (repeatable)"
    p.add_argument("--variant-set", action="append", default=[], metavar="VARIANT:SECTION.KEY=VALUE", help=own)
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, each on cores/N threads (default 1)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace):
    """Validate before anything heavy; returns the resolved base config."""
    from run.config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants:
        raise ConfigError(f"--variants: empty; choose one or more of {', '.join(PRECONDITIONERS)}")
    for v in args.variants:
        if v not in PRECONDITIONERS:
            raise ConfigError(f"--variants: {v!r} is unknown; choose from {', '.join(PRECONDITIONERS)}")
    if len(set(args.variants)) != len(args.variants):
        raise ConfigError(f"--variants {','.join(args.variants)}: a variant is named twice; name each once")
    if args.seeds is None:
        args.seeds = [cfg.train.seed]
    else:
        seeds = [s.strip() for s in args.seeds.split(",")]
        if not all(s.isascii() and s.isdigit() for s in seeds) or len(set(map(int, seeds))) != len(seeds):
            raise ConfigError(f"--seeds {args.seeds!r}: expected different comma-separated ints >= 0, e.g. 1,2,3")
        args.seeds = [int(s) for s in seeds]
    if args.conditioning_interval is None:
        args.conditioning_interval = cfg.log.conditioning_interval or cfg.train.eval_interval
    if args.conditioning_interval < 0 or args.probe_batch < 1:
        raise ConfigError("--conditioning-interval must be >= 0 and --probe-batch >= 1")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: expected a number of runs at once >= 1")
    args.name = args.name or args.config.stem
    check_paths(args)
    args.variant_sets = variant_sets(args)
    args.points = sweep_points(args)
    return cfg


RUNNER_KEYS = ("model.precondition", "train.seed", "train.output_dir", "log.conditioning_interval", "log.progress")
"""The keys the experiment sets for each run (train_command), in that order; a sweep may not set them."""


def variant_sets(args: argparse.Namespace) -> dict[str, list[str]]:
    """--variant-set V:section.key=value -> {V: ["section.key=value", ...]}, each checked by
    loading the config with it."""
    from run.config import load_run_config

    sets: dict[str, list[str]] = {}
    for spec in args.variant_set:
        variant, colon, over = spec.partition(":")
        if not colon or not re.fullmatch(r"[a-z_]+\.[a-z_0-9]+=.+", over.strip()):
            raise ConfigError(f"--variant-set {spec!r}: expected VARIANT:section.key=value, e.g. qk:train.lr=0.008")
        if variant not in args.variants:
            raise ConfigError(f"--variant-set {spec!r}: {variant!r} is not one of --variants {','.join(args.variants)}")
        key = over.split("=")[0].strip()
        if key in RUNNER_KEYS:
            raise ConfigError(f"--variant-set {spec!r}: {key} is set by the experiment")
        if key in {s.partition("=")[0].strip() for s in args.sweep}:
            raise ConfigError(f"--variant-set {spec!r}: {key} is swept (--sweep); a variant may not fix it")
        sets.setdefault(variant, []).append(over.strip())
    for variant, over in sets.items():
        try:
            load_run_config(args.config, [*args.overrides, *over])
        except ConfigError as e:
            raise ConfigError(f"--variant-set {variant}:{' '.join(over)}: {e}") from None
    return sets


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
    from run.config import load_run_config

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
    rep.check_report_dir(args.out_dir, args.name, args.config.stem)
    check_output_path("--runs-dir", args.runs_dir)


# ---- training ------------------------------------------------------------------------------
def read_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows (none before the run starts)."""
    return RunDir(run_dir).rows()


def finished(run_dir: Path, max_steps: int) -> bool:
    """Trained to max_steps, final evaluation and checkpoint written."""
    done = RunDir(run_dir).latest_tag() == tag_for(max_steps)
    return done and any(r.get("step") == max_steps and "val_loss" in r for r in read_rows(run_dir))


@dataclass
class Run:
    """One training run of the experiment: its key in the results, its folder and its settings."""

    key: tuple
    variant: str
    seed: int
    run_dir: Path
    max_steps: int
    overrides: list[str] = field(default_factory=list)  # the sweep point's, then the variant's own
    failed: bool = False
    reported: dict | None = None  # its finished result in the report's results.json, when not on disk


def settings(args: argparse.Namespace, run: Run) -> list[str]:
    """What a run's result depends on besides its variant and seed: the config and every override."""
    return [str(args.config), *args.overrides, *run.overrides]


def reported_results(args: argparse.Namespace) -> dict[str, dict]:
    """The runs the report in --out-dir already holds as finished (results.json), by name."""
    path = args.out_dir / args.name / "results.json"
    if not path.is_file():
        return {}
    return {name: r for name, r in rep.read_results(path).items() if not r.get("unfinished") and "settings" in r}


def plan(args: argparse.Namespace, cfg) -> list[Run]:
    """Every run, seed by seed: each seed's points, each point's variants."""
    from run.config import load_run_config

    runs = []
    reported = reported_results(args)
    for seed in args.seeds:
        for point in args.points or [None]:
            for variant in args.variants:
                own = args.variant_sets.get(variant, [])
                base = [] if point is None else point["overrides"]
                steps = (cfg if point is None else point["cfg"]).train.max_steps
                if own:  # a variant's own setting may change max_steps
                    steps = load_run_config(args.config, [*args.overrides, *base, *own]).train.max_steps
                key = (variant, seed) if point is None else (point["name"], variant, seed)
                folder = f"{variant}-seed{seed}" if point is None else f"{point['name']}/{variant}-seed{seed}"
                run = Run(key, variant, seed, args.runs_dir / args.name / folder, steps, [*base, *own])
                entry = reported.get(folder)  # results.json names a run by its folder
                if entry and entry["settings"] == settings(args, run) and not RunDir(run.run_dir).metrics.is_file():
                    run.reported, run.failed = entry, bool(entry.get("failed"))
                runs.append(run)
    return runs


def train_command(args: argparse.Namespace, run: Run) -> list[str]:
    values = (run.variant, run.seed, run.run_dir, args.conditioning_interval, "false")
    ours = [f"{key}={value}" for key, value in zip(RUNNER_KEYS, values, strict=True)]
    given = [*args.overrides, *run.overrides]
    if args.jobs > 1 and not any(o.startswith("train.threads=") for o in given):
        ours.append(f"train.threads={max(1, (os.cpu_count() or 1) // args.jobs)}")
    return [sys.executable, "-m", "launcher.train", "--config", str(args.config), *given, *ours]


FAILED = "failed.txt"
"""Written into a run's folder when its training fails (a sweep counts it as diverged); removed
when the run is trained again."""


def train_one(args: argparse.Namespace, run: Run) -> float:
    """Train (or resume) one run as a subprocess, its output in RUN_DIR/train.log; returns seconds."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("cond_after.json", FAILED):  # stale once training continues
        (run.run_dir / stale).unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    with open(run.run_dir / "train.log", "a") as log:
        proc = subprocess.run(train_command(args, run), stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode == 0:
        return time.perf_counter() - start
    last = " ".join((run.run_dir / "train.log").read_text().strip().splitlines()[-1:])
    if proc.returncode == 2:  # refused in one line (a config, a checkpoint): no result, the sweep stops
        raise ConfigError(f"{run.run_dir}: training refused to start: {last.removeprefix('error: ')}")
    why = f"training failed (exit {proc.returncode}): {last}"
    (run.run_dir / FAILED).write_text(why + "\n")
    raise RuntimeError(f"{run.run_dir}: {why}; see train.log")


def probe_run(run_dir: Path, batch: int) -> None:
    """The probe CLI on the step-0 model ("before") and on the final checkpoint ("after")."""
    from research import conditioning

    for which, extra in (("before", ["--untrained"]), ("after", [])):
        out = run_dir / f"cond_{which}.json"
        if not out.is_file():
            conditioning.main(["--model", str(run_dir), "--json", str(out), "--batch", str(batch), *extra])


def run_one(args: argparse.Namespace, run: Run) -> None:
    """Train one run unless it finished; a failed run is marked (a diverged sweep run is a result)."""
    if finished(run.run_dir, run.max_steps):
        print(f"skip {run.run_dir}: already finished", flush=True)
        return
    if run.reported:
        print(f"skip {run.run_dir}: finished in {args.out_dir / args.name / 'results.json'}", flush=True)
        return
    print(f"train {run.variant} seed {run.seed} {' '.join(run.overrides)} -> {run.run_dir}", flush=True)
    try:
        secs = train_one(args, run)
    except RuntimeError as e:
        run.failed = True
        print(f"  {e}", flush=True)
        return
    val = [r["val_loss"] for r in read_rows(run.run_dir) if "val_loss" in r]
    print(f"  {run.run_dir.name} done in {secs:.0f} s, final val_loss {val[-1]:.4f}", flush=True)


def run_all(args: argparse.Namespace, runs: list[Run]) -> None:
    """Train every run, --jobs at a time (with --report-only, only note which ones failed)."""
    if args.report_only:
        for run in runs:
            run.failed = bool(run.reported.get("failed")) if run.reported else (run.run_dir / FAILED).is_file()
    else:
        refused = threading.Event()

        def one(run: Run) -> None:
            if refused.is_set():  # a run was refused in one line: start no other
                return
            try:
                run_one(args, run)
            except ConfigError:
                refused.set()
                raise

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, runs))
    failed = [r for r in runs if r.failed]
    if failed and not args.points:  # in a sweep a failed run (NaN loss) counts as diverged
        raise RuntimeError(f"{len(failed)} of {len(runs)} runs failed, e.g. {failed[0].run_dir}: see its train.log")


# ---- collecting what the runs logged -------------------------------------------------------
def logged_conditioning(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the in-training probe, from the "cond/..." (condition numbers)
    and "logit/..." (largest attention logit) keys of metrics.jsonl."""
    series: dict[str, list] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith(("cond/", "logit/")) and v is not None:
                series.setdefault(k, []).append((r["step"], float(v)))
    return series


def collect(run_dir: Path) -> dict:
    """One run's evaluation curve, throughput, and condition numbers (before, after, logged)."""
    from research.conditioning import read_json

    if not RunDir(run_dir).metrics.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl; train it first (drop --report-only)")
    rows = read_rows(run_dir)
    evals = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    out = {"run_dir": str(run_dir), "evals": evals, "tokens_per_sec": steady(rows)}
    for which in ("before", "after"):
        path = run_dir / f"cond_{which}.json"
        layers = read_json(path)["layers"] if path.is_file() else []
        out[f"cond_{which}"] = [layer["median_over_heads"] for layer in layers]
    out["cond_logged"] = logged_conditioning(rows)
    return out


def collect_sweep(run: Run) -> dict:
    """collect() of a sweep run; one that failed before its first row is an empty, failed run;
    one neither finished nor failed (not yet trained, or cut short) is "unfinished"."""
    unfinished = not run.failed and not finished(run.run_dir, run.max_steps)
    if not RunDir(run.run_dir).metrics.is_file() and (run.failed or unfinished):
        return {"run_dir": str(run.run_dir), "evals": [], "tokens_per_sec": None, "failed": run.failed} | (
            {"unfinished": True} if unfinished else {}
        )
    return collect(run.run_dir) | {"failed": run.failed} | ({"unfinished": True} if unfinished else {})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = check_args(args)
    runs = plan(args, cfg)
    try:
        run_all(args, runs)
    except RuntimeError as e:  # a run failed: its log says why
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.points:
        results = {run.key: run.reported or collect_sweep(run) | {"settings": settings(args, run)} for run in runs}
    else:  # the finished runs, probed; the others (--report-only while they train) are left out and counted
        done = [run for run in runs if run.reported or finished(run.run_dir, run.max_steps)]
        if not done:
            raise ConfigError(f"{args.name}: none of its {len(runs)} runs has finished; train them first")
        for run in done:
            if not run.reported:
                probe_run(run.run_dir, args.probe_batch)
        results = {run.key: run.reported or collect(run.run_dir) | {"settings": settings(args, run)} for run in done}
    given = [a for a in (argv or sys.argv[1:]) if a != "--report-only"]  # the command that trains them
    command = "python -m launcher.experiment " + " ".join(shlex.quote(a) for a in given)
    out = rep.write_report(args.out_dir / args.name, cfg, args, results, command, total=len(runs))
    print(f"report: {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
