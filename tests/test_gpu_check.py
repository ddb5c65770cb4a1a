"""bench/gpu_check.sh and bench/train_backends.py: the one device call, checked on the CPU.

`bash bench/gpu_check.sh --dry` runs the same stages as on a GPU (the CUDA tests, which skip here,
the attention table, real training runs of configs/gpu-125m.yaml shrunk to a tiny model) and
must leave the log and both tables under $OUT, whatever a row or stage does. The script's plan
(environment, order, budget of each stage) is checked in a second with a stand-in interpreter
that records how it is called.
"""

import json
import os
import re
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
    assert names == ["attention.json", "attention.md", "gpu_check.log", "tests.xml", "train.json", "train.md"]
    log = (out / "gpu_check.log").read_text()
    assert "gpu_check: tests exit 0, attention exit 0, training exit 0" in log
    versions = next(line for line in log.splitlines() if line.startswith("python "))
    assert all(f" {name} " in versions for name in ("deepspeed", "omegaconf", "datasets", "huggingface_hub"))
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


FAKE_PYTHON = """#!/usr/bin/env bash
echo "${HF_HUB_OFFLINE:-} ${HF_DATASETS_OFFLINE:-} ${TRITON_ATTN_AUTOTUNE:--} $*" >>"$FAKE_LOG"
[ "$1" = - ] && [ -n "${FAKE_IMPORTS_FAIL:-}" ] && { echo "gpu_check: deepspeed does not import: X"; exit 1; }
exit 0
"""


def run_script(tmp_path, *args, **env_vars):
    """bench/gpu_check.sh with a stand-in python that records each call (offline vars, autotune,
    arguments) in tmp/calls and succeeds at once; (process, recorded calls, seconds)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "HF_", "TRITON_"))}
    env.update(OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"), PYTHON=str(fake))
    env.update(FAKE_LOG=str(tmp_path / "calls"), GPU_CHECK_WHEELS=str(wheels), **env_vars)
    start = time.monotonic()
    proc = subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return proc, calls, time.monotonic() - start


def test_without_wheels_the_dry_run_stops_at_once_with_one_line(tmp_path):
    """.whl/ missing: one line naming it and how to make it, no stage run (training least of all)."""
    proc, calls, seconds = run_script(tmp_path, "--dry", PYTHON=sys.executable)
    assert proc.returncode == 2 and seconds < 10 and proc.stderr == ""
    assert len(proc.stdout.splitlines()) == 1, proc.stdout
    line = proc.stdout.strip()
    assert line.startswith(f"gpu_check: error: no wheels in {tmp_path / 'wheels'}/ for deepspeed omegaconf")
    assert "bash tools/gpu_wheels.sh" in line and line.endswith("nothing was run")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["gpu_check.log"]
    assert (tmp_path / "out" / "gpu_check.log").read_text() == proc.stdout


def test_each_stage_runs_offline_in_turn_with_its_tiles_and_share_of_the_budget(tmp_path):
    """GPU_CHECK_LIMIT=300 (the call's timeout_s) leaves 260 s: tests 22%, attention 30/78 of the
    rest, training the rest less 15 s; the corpus is prepared after the tests, not beside them."""
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "a-1-py3-none-any.whl").write_text("")
    proc, calls, _ = run_script(tmp_path, GPU_CHECK_LIMIT="300")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # each stage line says when it started (bash's SECONDS: whole seconds, so a few ms can read 1 s)
    started = {m[1]: int(m[2]) for m in re.finditer(r"== gpu_check: (\w+).* \(at (\d+) s of 260\)", proc.stdout)}
    assert started["machine"] <= 2, proc.stdout
    assert all(c.startswith("1 1 ") for c in calls), calls  # HF_HUB_OFFLINE, HF_DATASETS_OFFLINE
    pip, imports, tests, *middle, train = (c.split(" ", 3)[2:] for c in calls)
    # the corpus is prepared in the background while the attention stage runs: either may log first
    prepare, attention = sorted(middle, key=lambda call: "--prepare-only" not in call[1])
    assert pip[1].startswith("-m pip install") and pip[1].endswith("a-1-py3-none-any.whl")
    assert imports == ["-", "- torch triton deepspeed omegaconf pydantic datasets"]
    assert tests[0] == "0" and "-m pytest -v -rA -m cuda" in tests[1]
    assert f"--junitxml={tmp_path / 'out' / 'tests.xml'}" in tests[1]
    assert "--prepare-only" in prepare[1]
    budget = lambda call: int(re.search(r"--budget (\d+)", call).group(1))
    # a stage's share is taken just after its line is printed, in that second or the next
    attention_budget = lambda elapsed: (260 - elapsed) * 30 // 78 * 3 // 4  # 30/78 of what is left, less 1/4
    at = started["attention"]
    assert attention[0] == "1" and "-m bench.attention" in attention[1]
    assert budget(attention[1]) in (attention_budget(at), attention_budget(at + 1)), (at, attention[1])
    at = started["training"]  # the rest less 5 s for the kill, less 10 s for the summary
    assert train[0] == "0" and "-m bench.train_backends" in train[1] and budget(train[1]) in (245 - at, 244 - at)


def test_a_training_stack_that_does_not_import_skips_training_only(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "a-1-py3-none-any.whl").write_text("")
    proc, calls, _ = run_script(tmp_path, FAKE_IMPORTS_FAIL="1")
    assert proc.returncode == 1
    assert "gpu_check: deepspeed does not import: X" in proc.stdout
    assert "gpu_check: the training stage is skipped" in proc.stdout
    assert [c.split()[4] for c in calls[2:]] == ["pytest", "bench.attention"]  # after pip and the import check


def test_the_budget_follows_the_call_limit_and_a_capped_test_run_is_tallied(tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text(
        "tests/test_a.py::test_x[1] \n"  # started, not finished when the cap hit
        "[gw0] [ 16%] PASSED tests/test_a.py::test_x[0] \n"
        "[gw1] [ 33%] FAILED tests/test_a.py::test_x[2] \n"
        "tests/test_b.py::test_y SKIPPED (needs a CUDA GPU)                [ 50%]\n"
        "PASSED tests/test_a.py::test_x[0]\n"  # the summary's lines are not counted again
    )
    script = f"source bench/gpu_check.sh; default_budget; LIMIT=300; default_budget; tally {log}; tally /dev/null"
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.stdout.splitlines() == ["540", "260", "1 passed, 1 failed, 1 skipped", "no test finished"]


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
