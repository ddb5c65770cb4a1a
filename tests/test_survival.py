"""Runs that survive: ./run_pretrain.sh restarts training after a failure (MAX_RESTARTS) from the
latest checkpoint on the hosts that still answer, holds its run directory alone, and leaves no
process behind when it is killed.

The restarts after a lost node run on the two-node cluster of tools/cluster.sh (see
tests/test_cluster.py); the rest on this machine. The group runs with the cluster tests:
`./run_tests.sh -m cluster -n 0`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.test_cluster import CLUSTER, cluster, nodes  # noqa: F401 - the module fixture
from tests.train_helpers import ROOT, env, metric_rows, tiny_overrides, train_losses, write_corpus

pytestmark = pytest.mark.cluster

STEPS, SAVE, BREAK_AT = 30, 5, 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("survival")
    return dict(root=root, glob=write_corpus(root / "corpus"), cache=root / "cache")


def overrides(data: dict, run_dir: Path, **extra) -> list[str]:
    extra = {"deepspeed.zero_stage": 2, "train.max_steps": STEPS, "train.save_interval": SAVE, **extra}
    extra.setdefault("train.eval_interval", SAVE)
    extra.setdefault("train.dist_timeout", 20)
    return tiny_overrides(data["glob"], data["cache"], run_dir, **extra)


def pretrain_cmd(data: dict, run_dir: Path, node: str | None = None, extra=None, **variables) -> list[str]:
    cmd = ["env", *(f"{k}={v}" for k, v in variables.items())]
    cmd += ["./run_pretrain.sh", "configs/tiny.yaml", *overrides(data, run_dir, **(extra or {}))]
    return [CLUSTER, "exec", node, *cmd] if node else cmd


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def start(cmd: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )  # fmt: skip


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while step not in (train_losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}):
        assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no step {step} in {timeout} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def reference(data):
    """The per-step losses of the uninterrupted run: 2 ranks on one node."""
    run_dir = data["root"] / "reference"
    proc = run(pretrain_cmd(data, run_dir, NUM_GPUS="2", MASTER_PORT="29541"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def tensorboard_steps(run_dir: Path, tag: str = "loss") -> list[int]:
    """The steps of the training run's `tag` as TensorBoard's own reader shows them (purged
    steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard/train"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def check_continued(run_dir: Path, reference: dict, output: str, resumed_from: int) -> None:
    """One row per step, each loss after the resumed step equal to the uninterrupted run's,
    TensorBoard one curve without a backward jump, the export written."""
    rows = [r["step"] for r in metric_rows(run_dir) if "loss" in r]
    assert rows == list(range(1, STEPS + 1)), rows
    losses = train_losses(run_dir)
    # after the restart one rank takes the global batch in 2 micro-batches (grad_accum 2): the
    # gradient is summed in another order and the loss moves by up to ~1e-5 per step, which
    # compounds over the steps left; a skipped or repeated batch moves it by 1e-2.
    for step in range(resumed_from + 1, STEPS + 1):
        assert abs(losses[step] - reference[step]) <= 1e-4, (step, losses[step], reference[step])
    assert tensorboard_steps(run_dir) == list(range(1, STEPS + 1))
    assert (run_dir / "hf/config.json").is_file() and "Hugging Face export" in output
    assert (run_dir / "checkpoints/latest").read_text() == f"global_step{STEPS}"


def lose_node1(data: dict, run_dir: Path, breaker, extra_env: dict | None = None):
    """A 2-node pdsh run with restarts whose rank 0 pauses after step BREAK_AT while `breaker()`
    hurts node1; returns the finished run."""
    hosts = data["root"] / "hosts"
    hosts.write_text("node0 slots=1\nnode1 slots=1\n")
    variables = dict(HOSTFILE=hosts, MASTER_PORT="29542", PRECOND_FAULT=f"pause@{BREAK_AT}:0")
    variables.update({"MAX_RESTARTS": "2", "RESTART_WAIT": "1", **(extra_env or {})})
    proc = start(pretrain_cmd(data, run_dir, "node0", **variables))
    wait_for_step(proc, run_dir, BREAK_AT)
    breaker()
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def restart_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("restart 1 of 2:")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


def test_lost_node_restarts_on_the_node_left(nodes, data, reference, tmp_path):  # noqa: F811
    """node1 is killed after step 12 and stays down: the run restarts from step 10 on node0
    alone with grad_accum 2 (the same global batch) and finishes."""
    try:
        proc = lose_node1(data, tmp_path / "run", lambda: cluster("kill", "node1"))
    finally:
        cluster("start", "node1")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    line = restart_line(output)
    assert "from step 10 on node0, world size 1, train.grad_accum=2" in line, line
    assert "host node1 does not answer" in output and "training failed (" in output
    check_continued(tmp_path / "run", reference, output, resumed_from=10)
    assert BREAK_AT - 10 <= SAVE  # steps trained twice: 11 and 12


def test_cut_link_restarts_on_the_node_left(nodes, data, reference, tmp_path):  # noqa: F811
    try:
        proc = lose_node1(data, tmp_path / "run", lambda: cluster("link", "node1", "down"))
    finally:
        cluster("link", "node1", "up")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "from step 10 on node0, world size 1, train.grad_accum=2" in restart_line(output)
    check_continued(tmp_path / "run", reference, output, resumed_from=10)


def test_a_node_that_answers_again_is_used_again(nodes, data, reference, tmp_path):  # noqa: F811
    """node1 is killed and started again (its sshd back) before the restart: 2 nodes again."""

    def kill_and_restart():
        cluster("kill", "node1")
        cluster("start", "node1")

    proc = lose_node1(data, tmp_path / "run", kill_and_restart, {"RESTART_WAIT": "3"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "from step 10 on node0,node1, world size 2" in restart_line(output)
    check_continued(tmp_path / "run", reference, output, resumed_from=10)


def test_restarts_run_out(data, tmp_path):
    """MAX_RESTARTS=1 and rank 0 killed at step 7 on every attempt: one restart from step 5,
    then one line and a non-zero exit, `latest` on the last complete checkpoint."""
    variables = dict(NUM_GPUS="2", MASTER_PORT="29543", MAX_RESTARTS="1", RESTART_WAIT="1", PRECOND_FAULT="sigkill@7:0")
    proc = run(pretrain_cmd(data, tmp_path / "run", **variables))
    assert proc.returncode != 0
    assert proc.stdout.count("restart 1 of 1: from step 5") == 1, proc.stdout[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "after 1 restart(s)" in line]
    assert len(errors) == 1 and "latest checkpoint: step 5" in errors[0], proc.stderr[-3000:]
    assert (tmp_path / "run/checkpoints/latest").read_text() == "global_step5"
    assert not (tmp_path / "run/hf").exists()


def test_a_nan_stop_is_not_restarted(data, tmp_path):
    proc = run(pretrain_cmd(data, tmp_path / "run", NUM_GPUS="2", MASTER_PORT="29544", MAX_RESTARTS="2",
                            RESTART_WAIT="1", PRECOND_FAULT="nan@3:0"))  # fmt: skip
    assert proc.returncode == 1
    assert "not restarting: training diverged: loss is nan at step 3" in proc.stderr, proc.stderr[-3000:]
    assert "restart 1" not in proc.stdout


def run_processes(run_dir: Path) -> list[str]:
    """Command lines of live processes that name `run_dir` (the script, launcher, ranks)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(run_dir) in cmdline and "pytest" not in cmdline:
            found.append(cmdline)
    return found


def test_one_run_per_directory_and_no_orphans(data, tmp_path):
    """A second run on a directory in use is refused in one line with nothing written; the
    script's whole process group killed with SIGKILL after step 7 leaves no process of the run
    within a few seconds; the next run resumes normally."""
    run_dir = tmp_path / "run"
    extra = {"train.max_steps": 400}
    first = start(pretrain_cmd(data, run_dir, extra=extra, NUM_GPUS="2", MASTER_PORT="29545"), start_new_session=True)
    wait_for_step(first, run_dir, 7)

    before = sorted(p.name for p in run_dir.iterdir())
    second = run(pretrain_cmd(data, run_dir, extra=extra, NUM_GPUS="2", MASTER_PORT="29546"), timeout=120)
    err = second.stderr.strip()
    assert second.returncode == 2 and err.count("\n") == 0, err
    assert f"train.output_dir {run_dir}: in use by the run of {os.uname().nodename} pid {first.pid}" in err
    assert sorted(p.name for p in run_dir.iterdir()) == before and "[train]" not in second.stdout

    os.killpg(first.pid, signal.SIGKILL)  # what a job killer or a closed terminal does
    first.communicate()
    deadline = time.monotonic() + 20
    while run_processes(run_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run_processes(run_dir) == []

    again = run(pretrain_cmd(data, run_dir, extra={"train.max_steps": 12}, NUM_GPUS="2", MASTER_PORT="29545"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step" in again.stdout and (run_dir / "hf/config.json").is_file()


def test_slurm_restarts_on_the_nodes_still_up(nodes, data, reference, tmp_path):  # noqa: F811
    """The batch script with MAX_RESTARTS: node1 (its slurmd too) killed after step 12; once
    Slurm marks it down (SlurmdTimeout 20 s), srun starts again on node0 alone, in the same
    allocation, and the job completes."""
    from tests.test_cluster import slurm_job

    run_dir, out_file = tmp_path / "run", tmp_path / "slurm.out"
    variables = f"ALL,MASTER_PORT=29547,MAX_RESTARTS=2,RESTART_WAIT=30,PRECOND_FAULT=pause@{BREAK_AT}:0"
    args = ["--nodes", "2", "--export", variables, "configs/slurm/pretrain.sbatch", "configs/tiny.yaml"]
    deadline = time.monotonic() + 300

    def kill_when_at_break() -> None:
        while BREAK_AT not in (train_losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}):
            assert time.monotonic() < deadline, "no step 12"
            time.sleep(0.1)
        cluster("kill", "node1")

    killer = threading.Thread(target=kill_when_at_break)
    killer.start()
    try:
        job = slurm_job(out_file, *args, *overrides(data, run_dir), timeout=900)
    finally:
        killer.join()
        cluster("start", "node1")
    output = out_file.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", output[-3000:]
    assert "from step 10 on node0, world size 1, train.grad_accum=2" in restart_line(output)
    check_continued(run_dir, reference, output, resumed_from=10)
