"""bench/gpu_check.sh and bench/train_backends.py: the one device call, checked on the CPU.

`bash bench/gpu_check.sh --dry` runs the same stages as on a GPU (the CUDA tests, which skip here,
the attention table, real training runs of configs/gpu-125m.yaml shrunk to a tiny model) and
must leave the log and both tables under $OUT, whatever a row or stage does.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench import train_backends
from tests.train_helpers import ROOT


@pytest.mark.slow
def test_dry_run_writes_the_log_and_both_tables(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["attention.json", "attention.md", "gpu_check.log", "train.json", "train.md"]
    log = (out / "gpu_check.log").read_text()
    assert "gpu_check: tests exit 0, attention exit 0, training exit 0" in log
    assert log == proc.stdout  # the log is everything the call printed

    attention = json.loads((out / "attention.json").read_text())["rows"]
    assert {(r["backend"], r["precondition"]) for r in attention} >= {("sdpa", "qkv"), ("triton", "qkv")}
    assert all("fwdbwd_ms" in r for r in attention if r["backend"] == "sdpa")

    rows = {r["backend"]: r for r in json.loads((out / "train.json").read_text())["rows"]}
    assert sorted(rows) == ["flash", "sdpa", "triton"] and not any(r["compile"] for r in rows.values())
    assert rows["sdpa"]["note"] == "" and rows["sdpa"]["tokens_per_sec"] > 0 and rows["sdpa"]["peak_mem_gb"] > 0
    assert 0 < rows["sdpa"]["mfu"] < 1
    assert rows["triton"]["note"].startswith("skipped: it needs a CUDA GPU")
    assert rows["flash"]["note"].startswith("skipped:")
    table = (out / "train.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| gpu-125m |")]
    assert len(body) == 3 and all(line.count("|") == 10 for line in body)
    assert [line.split(" | ")[1] for line in body] == ["triton", "sdpa", "flash"]


def test_each_compiled_run_follows_its_eager_one_and_the_table_orders_them():
    assert train_backends.variants(train_backends.parse_args([]))[:4] == [
        ("configs/gpu-125m.yaml", "triton", False), ("configs/gpu-125m.yaml", "triton", True),
        ("configs/gpu-125m.yaml", "sdpa", False), ("configs/gpu-125m.yaml", "sdpa", True),
    ]  # fmt: skip
    args = train_backends.parse_args(["--config", "a.yaml", "b.yaml", "--backends", "triton", "sdpa"])
    assert train_backends.variants(args) == [
        ("a.yaml", "triton", False), ("a.yaml", "triton", True), ("a.yaml", "sdpa", False), ("a.yaml", "sdpa", True),
        ("b.yaml", "triton", False), ("b.yaml", "triton", True), ("b.yaml", "sdpa", False), ("b.yaml", "sdpa", True),
    ]  # fmt: skip
    rows = [{"config": c, "backend": b, "compile": m, "note": "x"} for c, b, m in train_backends.variants(args)]
    lines = train_backends.table("head", rows[::-1])[4:]
    assert [(line.split(" | ")[0], line.split(" | ")[1], line.split(" | ")[2]) for line in lines[:2]] == [
        ("| a", "triton", "off"),
        ("| a", "triton", "on"),
    ]


def test_throughput_leaves_out_the_first_metrics_row(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 10, "loss": 9.0, "tokens_per_sec": 10.0, "mfu": 0.01, "mem_gb": 3.0},  # compile + autotune
        {"step": 20, "loss": 8.0, "tokens_per_sec": 1000.0, "mfu": 0.4, "mem_gb": 2.0},
        {"step": 25, "val_loss": 8.0},
        {"step": 30, "loss": 7.0, "tokens_per_sec": 3000.0, "mfu": 0.6, "mem_gb": 2.5},
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = train_backends.summarize(metrics, tokens_per_step=4000)
    assert got == {"tokens_per_sec": 2000.0, "mfu": 0.5, "peak_mem_gb": 3.0, "step_ms": 2000.0, "loss": 7.0, "note": ""}


def test_a_run_that_fails_or_hangs_is_its_own_row(tmp_path):
    log = tmp_path / "run.log"
    ok, note, _ = train_backends.run_logged([sys.executable, "-c", "raise SystemExit('error: no GPU here')"], log, 30)
    assert not ok and note == "error: exit 1: error: no GPU here"
    ok, note, _ = train_backends.run_logged([sys.executable, "-c", "import time; time.sleep(30)"], log, 1)
    assert not ok and note == "error: timed out after 1 s"  # without the timeout it would end ok


def test_a_run_ends_once_its_last_row_is_written(tmp_path):
    """The final evaluation and save after the last metrics row measure nothing: the run is ended.
    The child would outlive the 60 s limit, so only `done` can make the run a success."""
    done = tmp_path / "metrics.jsonl"
    code = f"import pathlib, time; pathlib.Path({str(done)!r}).write_text('x'); time.sleep(600)"
    ok, note, _ = train_backends.run_logged([sys.executable, "-c", code], tmp_path / "run.log", 60, done.exists)
    assert ok and note == ""


def test_a_late_failure_keeps_the_numbers_measured_before_it(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 9.0, "tokens_per_sec": 100.0 * s, "mfu": 0.1, "mem_gb": 1.0} for s in (10, 20)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = train_backends.measured(metrics, 100, ok=False, note="error: timed out after 120 s")
    assert got["tokens_per_sec"] == 2000.0
    assert got["note"] == "error: timed out after 120 s (numbers from the 2 metrics rows before)"
    metrics.write_text(json.dumps(rows[0]) + "\n")  # one row: only the compile step, nothing to report
    assert train_backends.measured(metrics, 100, ok=False, note="error: exit 1: x") == {"note": "error: exit 1: x"}
    assert train_backends.measured(tmp_path / "none.jsonl", 100, ok=False, note="error: x") == {"note": "error: x"}


def test_sigterm_ends_the_running_child_too(tmp_path):
    """An outer `timeout` SIGTERMs train_backends; its child, in a session of its own, must not
    outlive it (it would hold the GPU)."""
    pid_file = tmp_path / "child.pid"
    child = f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(60)"
    parent = (
        "import sys; from pathlib import Path; from bench import train_backends as tb; tb.end_children_on_signals(); "
        f"tb.run_logged([sys.executable, '-c', {child!r}], Path({str(tmp_path / 'run.log')!r}), 60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
