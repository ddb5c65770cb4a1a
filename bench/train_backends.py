"""Training throughput of each attention backend, with and without train.compile: short real runs
of `python -m launcher.train` (one process, one GPU), tokens/s, MFU and peak memory read from each
run's metrics.jsonl, printed as one markdown table.

    python -m bench.train_backends                          # CUDA: configs/gpu-125m.yaml, 30 steps
    python -m bench.train_backends --dry                    # CPU: the same runs, tiny model, 4 steps
    python -m bench.train_backends --out DIR --budget 240   # also DIR/train.md and DIR/train.json

The corpus is synthetic text written into the work folder (a GPU machine may have no network and
no hub cache), tokenised once by data.prepare and shared by every run. Rows: config x backend
(triton, sdpa, flash: the order of importance) x train.compile, each backend's compiled run right
after its eager one, so a budget that runs out costs the last backends. A run is ended once its
last training row is in metrics.jsonl: the final evaluation (a recompile under train.compile) and
the final checkpoint save measure nothing here, and the trainer has no option to skip them.
A backend that cannot run here is skipped with the reason, a run that fails or passes its timeout
says so in its note (its log's tail is printed; with 2 or more training rows its numbers are kept),
and the table still comes out. SIGTERM or SIGINT ends the running child's process group first.
Throughput and MFU: the mean over the metrics rows after the first, which holds the compilation
and autotuning; peak memory: the run's largest `mem_gb` (CUDA: max_memory_allocated).
--dry shrinks the model and the batch of the same config (and runs triton in Triton's interpreter
when TRITON_INTERPRET=1 is set), so that the whole path runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("triton", "sdpa", "flash")
PREPARE_TIMEOUT = 150.0
POLL_SECONDS = 1.0
"""How often a run's metrics.jsonl is read for its last training row."""
MIN_SECONDS = {False: 30.0, True: 90.0}
"""A run (without, with train.compile) is not started with less of the budget left than this:
it could not finish, and its time is better left to the rest."""
DRY_MODEL = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_hidden=128",
    "model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=64", "train.micro_batch_size=2", "train.threads=1",
]  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """What every run shares: the work folder, the data overrides, steps and timeouts."""

    work: Path
    data: list[str]
    steps: int
    log_interval: int
    overrides: list[str]
    run_timeout: float
    compile_timeout: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", default=["configs/gpu-125m.yaml"], help="run configs, in order")
    p.add_argument("--dry", action="store_true", help="CPU check of the whole path: tiny model, few steps")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 30; --dry 4)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--compile", choices=["off", "on", "both"], default="both", help="train.compile variants")
    p.add_argument("--work", type=Path, help="folder for the corpus, the prepared data and the runs (default: temp)")
    p.add_argument("--out", type=Path, help="also write OUT/train.md (the table) and OUT/train.json (rows)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for everything; later runs are skipped")
    p.add_argument("--run-timeout", type=float, help="seconds per run without train.compile (120; --dry 600)")
    p.add_argument("--compile-timeout", type=float, help="seconds per run with train.compile (240; --dry 900)")
    p.add_argument("--prepare-only", action="store_true", help="write and prepare the corpus, then stop")
    p.add_argument("--prepare-timeout", type=float, default=PREPARE_TIMEOUT, help="seconds for data.prepare")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    return p.parse_args(argv)


def write_corpus(folder: Path, total_bytes: int, seed: int = 0) -> None:
    """Deterministic synthetic text: documents of Zipf-distributed pseudo-words, about total_bytes
    in files of 64 documents (about 230 KB). Idempotent."""
    if (folder / "done").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(rng.choices(letters, k=rng.randint(1, 9))) for _ in range(4000)]
    cum = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
    written, index = 0, 0
    while written < total_bytes:
        docs = []
        for _ in range(64):
            sentence = lambda: " ".join(rng.choices(words, cum_weights=cum, k=rng.randint(5, 20)))
            sentences = (sentence() for _ in range(rng.randint(5, 80)))
            docs.append(". ".join(sentences) + ".\n")
        text = "\n".join(docs)  # blank lines separate documents (data.text_split=blank_lines)
        (folder / f"part{index:03d}.txt").write_text(text)
        written, index = written + len(text), index + 1
    (folder / "done").write_text("")


def make_plan(args: argparse.Namespace, work: Path) -> Plan:
    steps = args.steps or (4 if args.dry else 30)
    vocab = 512 if args.dry else 8192
    data = [
        f"data.files={work / 'corpus' / '*.txt'}", "data.hf_dataset=", "data.hf_subset=", "data.loader=shards",
        "data.text_split=blank_lines", f"data.cache_dir={work / 'cache'}", f"data.vocab_size={vocab}",
        "data.val_windows=1", f"data.shard_bytes={1 << 20}",  # 1: the cheapest final evaluation
    ]  # fmt: skip
    overrides = [*(DRY_MODEL if args.dry else []), *args.overrides]
    # --dry: a CPU run may first JIT-build DeepSpeed's CPU comm op (minutes on a busy machine);
    # killing it then would leave torch's build lock behind, and every later build would wait on it
    run_timeout = args.run_timeout or (600.0 if args.dry else 120.0)
    compile_timeout = args.compile_timeout or (900.0 if args.dry else 240.0)
    return Plan(work, data, steps, max(1, steps // 3), overrides, run_timeout, compile_timeout)


def prepare(plan: Plan, config: str, dry: bool, timeout: float) -> str | None:
    """Write the corpus and tokenise it (data.prepare); None on success, else why not."""
    write_corpus(plan.work / "corpus", (256 << 10) if dry else (8 << 20))
    workers = 1 if dry else min(8, os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "data.prepare", "--config", config, "--workers", str(workers)]
    ok, note, _ = run_logged([*cmd, *plan.data, *plan.overrides], plan.work / "logs" / "prepare.log", timeout)
    return None if ok else f"data.prepare failed: {note}"


RUNNING: list[subprocess.Popen] = []
"""The child run_logged is waiting on (at most one): what a SIGTERM or SIGINT must end first."""


def run_logged(
    cmd: list[str], log: Path, timeout: float, done: Callable[[], bool] | None = None
) -> tuple[bool, str, float]:
    """Run cmd from the project root, its output into `log`, in its own process group (killed
    whole at the timeout: inductor's compile workers too). When `done()` turns true the group is
    ended and the run counts as a success. Returns (ok, note, seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + max(1.0, timeout)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        RUNNING.append(proc)
        try:
            while (code := poll(proc, min(POLL_SECONDS, deadline - time.monotonic()))) is None:
                finished = done is not None and done()
                if finished or time.monotonic() >= deadline:
                    kill_group(proc)
                    note = "" if finished else f"error: timed out after {timeout:.0f} s"
                    return finished, note, time.monotonic() - start
        finally:
            RUNNING.remove(proc)
    seconds = time.monotonic() - start
    if code != 0:
        return False, f"error: exit {code}: {last_error_line(log)}", seconds
    return True, "", seconds


def poll(proc: subprocess.Popen, seconds: float) -> int | None:
    """proc's exit code, waiting at most `seconds` for it; None while it runs."""
    try:
        return proc.wait(timeout=max(0.0, seconds))
    except subprocess.TimeoutExpired:
        return None


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL proc's process group (proc leads it: start_new_session) and reap proc. os.waitpid,
    not proc.wait: a signal handler may run while proc.wait holds its lock."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):  # already reaped by proc.wait
        proc.returncode = os.waitstatus_to_exitcode(os.waitpid(proc.pid, 0)[1])


def end_children_on_signals() -> None:
    """On SIGTERM (an outer `timeout`) or SIGINT: kill the running child's process group, which is
    in a session of its own and so gets neither signal, then exit 128 + the signal's number."""

    def handler(signum: int, frame) -> None:
        for proc in list(RUNNING):
            kill_group(proc)
        print(f"train_backends: {signal.Signals(signum).name}: ended the running child", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def last_error_line(log: Path) -> str:
    """The line of a failed run's log that says what went wrong (the last `error`/`Error` line)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    hits = [line for line in lines if "error" in line.lower()]
    return ((hits or lines or ["no output"])[-1]).replace("|", "/")[:160]


def why_skipped(backend: str, config: str, overrides: list[str]) -> str | None:
    """Why `backend` cannot run this config here (None when it can), asked of kernels/ itself."""
    import torch

    from kernels import BACKENDS as KERNELS
    from launcher.precision import resolve_precision
    from run.config import load_run_config

    cfg = load_run_config(config, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if resolve_precision(cfg.train.precision, device).name == "bf16" else torch.float32
    probe = torch.empty(0, 1, 0, cfg.model.head_dim, dtype=dtype, device=device)
    why = KERNELS[backend].missing(probe, device)
    return f"skipped: {why}" if why else None


def training_rows(metrics: Path) -> list[dict]:
    """The training rows (those with tokens/s) of a run's metrics.jsonl so far (the one reader)."""
    from run.rundir import read_metrics

    return [r for r in read_metrics(metrics) if r.get("tokens_per_sec")] if metrics.is_file() else []


def summarize(metrics: Path, tokens_per_step: int) -> dict:
    """Throughput, MFU and peak memory of a run from its metrics.jsonl."""
    train = training_rows(metrics)
    if not train:
        return {"note": "error: no training rows in metrics.jsonl"}
    from run.rundir import steady

    tps = steady(train)
    return {
        "tokens_per_sec": tps,
        "mfu": steady(train, "mfu"),
        "peak_mem_gb": max(r["mem_gb"] for r in train),
        "step_ms": 1e3 * tokens_per_step / tps,
        "loss": train[-1]["loss"],
        "note": "",
    }


def train_one(plan: Plan, config: str, backend: str, compiled: bool, timeout: float) -> dict:
    """One run of launcher.train; its row of the table."""
    from run.config import load_run_config
    from run.rundir import RunDir

    name = f"{Path(config).stem}-{backend}-{'compiled' if compiled else 'eager'}"
    run_dir = plan.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume
    overrides = [
        *plan.data, *plan.overrides, f"model.attn_backend={backend}", f"train.compile={str(compiled).lower()}",
        f"train.max_steps={plan.steps}", f"train.log_interval={plan.log_interval}", "train.grad_accum=1",
        "train.eval_interval=0", "train.save_interval=0", f"train.output_dir={run_dir}",
        "log.tensorboard=false", "log.progress=false", "log.conditioning_interval=0",
    ]  # fmt: skip
    cfg = load_run_config(config, overrides)
    cmd = [sys.executable, "-m", "launcher.train", "--config", config, *overrides]
    log = plan.work / "logs" / f"{name}.log"
    metrics = RunDir(run_dir).metrics
    last_row_written = lambda: any(r["step"] >= plan.steps for r in training_rows(metrics))
    ok, note, seconds = run_logged(cmd, log, timeout, done=last_row_written)
    if not ok:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"--- {name}: {note}; the end of {log}:", *tail, sep="\n")
    shutil.rmtree(RunDir(run_dir).checkpoints, ignore_errors=True)  # GBs on a GPU config
    return {"wall_s": seconds, **measured(metrics, cfg.train.micro_batch_size * cfg.data.seq_len, ok, note)}


def measured(metrics: Path, tokens_per_step: int, ok: bool, note: str) -> dict:
    """The numbers of a run and its note: a run that failed or timed out after 2 or more training
    rows keeps the numbers of those rows, its note says so."""
    if ok:
        return summarize(metrics, tokens_per_step)
    n = len(training_rows(metrics))
    if n < 2:
        return {"note": note}
    return {**summarize(metrics, tokens_per_step), "note": f"{note} (numbers from the {n} metrics rows before)"}


def variants(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(config, backend, compiled) in running order: per config and backend (the order of
    --backends: the most important first), the eager run, then the compiled one."""
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    return [(c, b, m) for c in args.config for b in args.backends for m in modes]


TABLE_HEAD = "| config | backend | compile | tokens/s | MFU | peak mem GiB | step ms | run s | note |"


def format_row(r: dict) -> str:
    num = lambda key, fmt: format(r[key], fmt) if key in r else "-"
    return (
        f"| {Path(r['config']).stem} | {r['backend']} | {'on' if r['compile'] else 'off'} "
        f"| {num('tokens_per_sec', ',.0f')} | {num('mfu', '.1%')} | {num('peak_mem_gb', '.2f')} "
        f"| {num('step_ms', '.1f')} | {num('wall_s', '.0f')} | {r['note']} |"
    )


def table(header: str, rows: list[dict]) -> list[str]:
    """The header line and the table, rows by config, backend, then compile off/on."""
    key = lambda r: (r["config"], BACKENDS.index(r["backend"]), r["compile"])
    return [header, "", TABLE_HEAD, "|" + "---|" * 9, *map(format_row, sorted(rows, key=key))]


def write_outputs(out: Path, header: str, rows: list[dict]) -> None:
    """OUT/train.md and OUT/train.json, rewritten after every run (a cut-short call keeps them)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.md").write_text("\n".join(table(header, rows)) + "\n")
    (out / "train.json").write_text(json.dumps({"setup": header, "rows": rows}, indent=1) + "\n")


def header_line(plan: Plan, args: argparse.Namespace) -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    extra = " ".join(plan.overrides) or "none"
    return (
        f"training: {device}; torch {torch.__version__}; {plan.steps} steps per run (throughput from steps "
        f"{plan.log_interval + 1}-{plan.steps}), micro batch x seq_len of the config, grad_accum 1, one process; "
        f"synthetic corpus; overrides: {extra}" + ("; DRY RUN" if args.dry else "")
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    end_children_on_signals()
    start = time.monotonic()
    left = lambda: args.budget - (time.monotonic() - start)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="train-backends-")))
        plan = make_plan(args, work.resolve())
        failed = prepare(plan, args.config[0], args.dry, min(args.prepare_timeout, left()))
        print(failed or f"prepared: {plan.work} ({time.monotonic() - start:.0f} s)", flush=True)
        if args.prepare_only:
            return 1 if failed else 0
        return run_all(args, plan, left, failed)


def run_row(args: argparse.Namespace, plan: Plan, variant: tuple[str, str, bool], timeout: float) -> dict:
    """The row of one (config, backend, compiled): measured, skipped with the reason, or the error."""
    config, backend, compiled = variant
    try:
        why = why_skipped(backend, config, [*plan.data, *plan.overrides])
        if why:
            return {"note": why}
        if timeout < MIN_SECONDS[compiled]:
            return {"note": f"skipped: past the time budget of {args.budget:g} s"}
        return train_one(plan, config, backend, compiled, timeout)
    except Exception as e:  # one broken row must not end the table
        return {"note": f"error: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:200]}


def run_all(args: argparse.Namespace, plan: Plan, left, failed: str | None) -> int:
    header = header_line(plan, args)
    print(header, TABLE_HEAD, "|" + "---|" * 9, sep="\n", flush=True)
    rows = []
    for variant in variants(args):
        config, backend, compiled = variant
        row = {"config": config, "backend": backend, "compile": compiled}
        timeout = min(plan.compile_timeout if compiled else plan.run_timeout, left())
        row.update({"note": f"error: {failed}"} if failed else run_row(args, plan, variant, timeout))
        rows.append(row)
        print(format_row(row), flush=True)
        if args.out:
            write_outputs(args.out, header, rows)
    print("\n".join(table(header, rows)[2:]) if len(rows) > 1 else "", flush=True)
    return 1 if any(r["note"].startswith("error:") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
