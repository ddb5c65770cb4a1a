"""bench/gpu_check.sh and bench/train_backends.py: the one device call, checked on the CPU.

`bash bench/gpu_check.sh --dry` runs the same stages as on a GPU (the CUDA tests, which skip here,
the attention table, real training runs of configs/gpu-125m.yaml shrunk to a tiny model) and
must leave the log and both tables under $OUT, whatever a row or stage does.
"""

import json
import os
import subprocess
import sys

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
    assert [line.split(" | ")[1] for line in body] == ["triton", "flash", "sdpa"]


def test_runs_go_eager_first_and_the_table_orders_them():
    args = train_backends.parse_args(["--config", "a.yaml", "b.yaml", "--backends", "triton", "sdpa"])
    assert train_backends.variants(args) == [
        ("a.yaml", "triton", False), ("a.yaml", "sdpa", False), ("a.yaml", "triton", True), ("a.yaml", "sdpa", True),
        ("b.yaml", "triton", False), ("b.yaml", "sdpa", False), ("b.yaml", "triton", True), ("b.yaml", "sdpa", True),
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
    ok, note, seconds = train_backends.run_logged([sys.executable, "-c", "import time; time.sleep(30)"], log, 1)
    assert not ok and note == "error: timed out after 1 s" and seconds < 20
