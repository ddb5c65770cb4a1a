"""Stops as users make them: Ctrl-C and SIGTERM through ./run_pretrain.sh (one, then a second),
a closed stdout, a stop during set-up, and a rank that hangs (SIGSTOP) without dying."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import checkpoint
from launcher.distributed import free_port
from run.rundir import RunDir
from tests.train_helpers import ROOT, env, metric_rows, tiny_overrides, train_losses

pytestmark = pytest.mark.slow

# `corpus` (glob, cache_dir) comes from conftest.py.


def start_script(corpus, run_dir: Path, **extra) -> subprocess.Popen:
    """./run_pretrain.sh on the tiny config that would train for hours, as the leader of its
    own process group (as a terminal's foreground job is)."""
    glob, cache = corpus
    settings = {"train.max_steps": 100000, "train.save_interval": 0, "train.eval_interval": 0, **extra}
    cmd = ["bash", str(ROOT / "run_pretrain.sh"), "configs/tiny.yaml"]
    cmd += tiny_overrides(glob, cache, run_dir, **settings)
    script_env = env(MASTER_PORT=free_port())  # the launcher's default port may be taken by another job
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=script_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=as_a_terminal_job,
    )


def as_a_terminal_job() -> None:
    """Ctrl-C and SIGTERM at their defaults, as in a shell's foreground job: a test worker may
    have SIGINT ignored (a library that set it), which the child would inherit, and bash cannot
    trap a signal that was ignored when it started."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def processes_of(folder: Path) -> list[int]:
    """Pids of the live processes whose command line names `folder` (a run's launcher and ranks)."""
    pids = []
    for pid in Path("/proc").iterdir():
        try:
            if pid.name.isdigit() and str(folder).encode() in (pid / "cmdline").read_bytes():
                pids.append(int(pid.name))
        except OSError:
            pass
    return pids


@pytest.fixture(autouse=True)
def no_leftover_ranks(tmp_path):
    """A failed test must not leave its training stage (a session of its own, which the script's
    process group does not include) running into the next tests."""
    yield
    for pid in processes_of(tmp_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def read_until(stream, text: str) -> list[str]:
    """The lines of `stream` up to the first that contains `text` (AssertionError at its end)."""
    lines = []
    while True:
        line = stream.readline()
        assert line, f"the output ended before a line with {text!r}: {''.join(lines)[-3000:]}"
        lines.append(line)
        if text in line:
            return lines


def wait_for_steps(run_dir: Path, proc: subprocess.Popen, steps: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and len(train_losses(run_dir)) >= steps:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {steps} training steps within {timeout} s (exit {proc.poll()})")


def finish(proc: subprocess.Popen, timeout: float = 120, run_dir: Path | None = None) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        os.killpg(proc.pid, signal.SIGKILL)
        steps = max(train_losses(run_dir), default=None) if run_dir and (run_dir / "metrics.jsonl").exists() else None
        stop_file = run_dir is not None and (run_dir / "stop").exists()
        raise AssertionError(
            f"the script did not end within {timeout} s of the stop (last step {steps}, stop file there: {stop_file}); "
            f"stderr so far: {(e.stderr or b'')[-2000:]!r}"
        ) from None
    return out or "", err


def assert_saved_and_exported(run_dir: Path) -> None:
    last = max(train_losses(run_dir))
    assert RunDir(run_dir).latest_tag() == f"global_step{last}"
    assert checkpoint.damage(run_dir / "checkpoints" / f"global_step{last}") is None
    assert (run_dir / "hf" / "model.safetensors").is_file()
    assert not (run_dir / "stop").exists()


def test_sigterm_to_the_script_saves_exports_and_exits_0(corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_script(corpus, run_dir)
    wait_for_steps(run_dir, proc, 3)
    proc.send_signal(signal.SIGTERM)  # the script alone, not its group
    out, err = finish(proc, run_dir=run_dir)
    assert proc.returncode == 0, err[-3000:]
    assert_saved_and_exported(run_dir)
    assert "stop requested" in err and "Traceback" not in err


def test_ctrl_c_with_a_closed_stdout_still_saves_and_exits_0(corpus, tmp_path):
    """`./run_pretrain.sh | head -n 3`, then Ctrl-C: the reader is gone before the stop."""
    run_dir = tmp_path / "run"
    proc = start_script(corpus, run_dir)
    for _ in range(3):
        proc.stdout.readline()
    proc.stdout.close()
    wait_for_steps(run_dir, proc, 3)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    proc.stdout = None
    _, err = finish(proc, run_dir=run_dir)
    assert proc.returncode == 0, err[-3000:]
    assert_saved_and_exported(run_dir)
    assert "Traceback" not in err


def test_a_second_ctrl_c_aborts_at_once_and_keeps_the_last_checkpoint(corpus, tmp_path):
    """The second Ctrl-C comes while the first stop is still being honoured: the script kills
    the training stage instead of letting it save, exports nothing and exits 130."""
    run_dir = tmp_path / "run"
    proc = start_script(corpus, run_dir, **{"train.save_interval": 2})
    wait_for_steps(run_dir, proc, 5)
    os.killpg(proc.pid, signal.SIGINT)
    seen = read_until(proc.stderr, "stop requested during train")  # the script has taken the first one
    os.killpg(proc.pid, signal.SIGINT)
    out, err = finish(proc, timeout=30)
    err = "".join(seen) + err
    assert proc.returncode == 130, err[-3000:]
    assert "aborted: second stop request; the last complete checkpoint is kept" in err
    assert "training stopped at a step boundary" not in out and not (run_dir / "hf").exists()
    assert processes_of(run_dir) == [], "the training stage outlived the script"
    assert not (run_dir / "stop").exists()  # a later launcher.train must not stop at once
    tag = RunDir(run_dir).latest_tag()
    assert tag and checkpoint.damage(run_dir / "checkpoints" / tag) is None
    assert checkpoint.check_resume(RunDir(run_dir), zero_stage=0) == tag


def test_a_stop_during_set_up_exits_cleanly(corpus, tmp_path):
    """SIGTERM as soon as the rank has started (its first line), while it is still setting up:
    the trainer stops before its first step, and the script says there is nothing to export."""
    run_dir = tmp_path / "run"
    proc = start_script(corpus, run_dir)
    seen = read_until(proc.stdout, "rank 0/1 on ")  # printed before the trainer's set-up
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    out = "".join(seen) + out
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert "stop requested during train:" in err  # after data preparation, in the training stage
    assert "stop requested at step 0: nothing new to save" in out  # before the first step
    rows = metric_rows(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    assert not any("loss" in r for r in rows)
    assert "nothing to export" in out


def start_rank(rank: int, port: int, overrides: list[str]) -> subprocess.Popen:
    """A rank started directly, with no launcher watching it."""
    rank_env = env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1")
    rank_env["MASTER_PORT"] = str(port)
    cmd = [sys.executable, "-m", "launcher.train", "--config", str(ROOT / "configs/tiny.yaml"), *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_hung_rank_ends_the_job_within_dist_timeout(corpus, tmp_path):
    """SIGSTOP rank 1 of a 2-rank ZeRO-2 run: rank 0 gives up within dist_timeout + 60 s and
    names the limit and the silent rank in one line."""
    glob, cache = corpus
    run_dir, timeout = tmp_path / "hung", 15
    settings = {"deepspeed.zero_stage": 2, "train.dist_timeout": timeout, "train.max_steps": 100000}
    overrides = tiny_overrides(glob, cache, run_dir, **settings, **{"train.save_interval": 0})
    port = free_port()
    ranks = [start_rank(r, port, overrides) for r in (0, 1)]
    try:
        wait_for_steps(run_dir, ranks[0], 3)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        _, err = ranks[0].communicate(timeout=timeout + 120)
        assert ranks[0].returncode not in (0, None)
        assert time.monotonic() - stopped_at < timeout + 60, f"rank 0 outlived train.dist_timeout={timeout} s + 60 s"
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: rank 0:"), err[-2000:]
        assert f"train.dist_timeout={timeout} s" in last
        assert f"rank 1 on {socket.gethostname()} (127.0.0.1) went silent" in last  # the rank and its node
        assert "Traceback" not in err
    finally:
        for proc in ranks:
            proc.kill()
            proc.communicate()
