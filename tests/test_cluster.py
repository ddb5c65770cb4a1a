"""Multi-node runs on a real two-node cluster on this machine (tools/cluster.sh): every launcher
the README names, a lost node and a cut link, and bad cluster input.

Each node is a network namespace with its own hostname, address, sshd and slurmd; the nodes
share the file system, as the nodes of a real cluster share NFS. The group runs on its own:
`./run_tests.sh -m cluster` (root, `ip netns` and Debian's openssh-server, pdsh, openmpi-bin,
slurm-wlm and munge, which tools/cluster.sh installs; skipped with the reason elsewhere).
It takes down any cluster tools/cluster.sh started before it.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.train_helpers import ROOT, env, tiny_overrides, train_losses, write_corpus

pytestmark = pytest.mark.cluster

CLUSTER = str(ROOT / "tools/cluster.sh")
STEPS, SAVE = 20, 10
DIST_TIMEOUT = 20
RANK_LINE = re.compile(r"rank (\d)/2 on (node\d) \(([\d.]+)\)")
COMMS_LINE = re.compile(r"rank 1 on node1 \([\d.]+\): collectives moved (\d+) bytes")


def cluster(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([CLUSTER, *args], capture_output=True, text=True, timeout=timeout, env=env())
    if check:
        assert proc.returncode == 0, f"tools/cluster.sh {' '.join(args)}: {proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def nodes():
    check = cluster("check", check=False, timeout=900)
    if check.returncode == 2:
        pytest.skip(check.stderr.strip())
    cluster("down")
    up = cluster("up", "2")
    assert up.stdout.splitlines()[-1] == "cluster up"
    yield dict(line.split() for line in up.stdout.splitlines()[:-1])
    cluster("down")


@pytest.fixture(scope="module")
def setup(nodes, tmp_path_factory):
    """A corpus, a hostfile, a DeepSpeed JSON with the comms logger, and the losses of the same
    run as 2 ranks on one node (the reference every launcher must match)."""
    root = tmp_path_factory.mktemp("cluster")
    glob = write_corpus(root / "corpus")
    (root / "hosts").write_text("node0 slots=1\nnode1 slots=1\n")
    (root / "comms.json").write_text(json.dumps({"comms_logger": {"enabled": True, "prof_all": True}}))
    s = dict(root=root, glob=glob, cache=root / "cache", hosts=str(root / "hosts"), comms=str(root / "comms.json"))
    run_dir = root / "one-node"
    proc = pretrain(s, run_dir, NUM_GPUS="2", MASTER_PORT="29531")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s["reference"] = train_losses(run_dir)
    assert sorted(s["reference"]) == list(range(1, STEPS + 1))
    return s


def overrides(s: dict, run_dir: Path, **extra) -> list[str]:
    extra = {"deepspeed.zero_stage": 2, "train.max_steps": STEPS, "train.save_interval": SAVE, **extra}
    extra.setdefault("train.eval_interval", SAVE)
    return tiny_overrides(s["glob"], s["cache"], run_dir, **{"deepspeed.config": s["comms"], **extra})


def pretrain(s: dict, run_dir: Path, node: str | None = None, timeout: float = 600, extra=None, **variables):
    """./run_pretrain.sh configs/tiny.yaml with the test's overrides, inside `node` (or here)."""
    cmd = ["./run_pretrain.sh", "configs/tiny.yaml", *overrides(s, run_dir, **(extra or {}))]
    cmd = ["env", *(f"{k}={v}" for k, v in variables.items()), *cmd]
    if node:
        cmd = [CLUSTER, "exec", node, *cmd]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def link_bytes(node: str) -> int:
    """Bytes received plus sent on NODE's network interface so far."""
    out = subprocess.run(["ip", "-n", node, "-j", "-s", "link", "show", "eth0"], capture_output=True, text=True)
    stats = json.loads(out.stdout)[0]["stats64"]
    return stats["rx"]["bytes"] + stats["tx"]["bytes"]


def check_two_node_run(s: dict, run_dir: Path, output: str, node1_bytes: int, nodes: dict) -> None:
    """What every launcher must show: the reference's losses, rank 1 inside node1, its traffic
    over node1's link, rank 0's logs and one checkpoint per save in the shared run directory."""
    losses = train_losses(run_dir)
    assert sorted(losses) == sorted(s["reference"])
    for step, loss in s["reference"].items():
        assert abs(losses[step] - loss) <= 1e-5, (step, losses[step], loss)  # summation order only (test_train)
    ranks = {int(r): (node, addr) for r, node, addr in RANK_LINE.findall(output)}
    assert ranks == {0: ("node0", nodes["node0"]), 1: ("node1", nodes["node1"])}, output[-3000:]
    comms = COMMS_LINE.search(output)
    assert comms, output[-3000:]
    assert node1_bytes >= int(comms.group(1)) > 0
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 2 and all(".node0." in e.name for e in events)  # train and val; the writing host
    assert (run_dir / "hf/config.json").is_file()
    ckpt = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [f"global_step{SAVE}", f"global_step{STEPS}"]
    assert (ckpt / "latest").read_text() == f"global_step{STEPS}"
    for tag in (f"global_step{SAVE}", f"global_step{STEPS}"):
        assert checkpoint_files(ckpt / tag) == ONE_CHECKPOINT


ONE_CHECKPOINT = [
    "mp_rank_00_model_states.pt",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "zero_pp_rank_1_mp_rank_00_optim_states.pt",
]


def checkpoint_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.pt"))


def test_pdsh_over_ssh(nodes, setup, tmp_path):
    before = link_bytes("node1")
    proc = pretrain(setup, tmp_path / "run", "node0", HOSTFILE=setup["hosts"], NUM_NODES="2", MASTER_PORT="29532")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--launcher pdsh" in proc.stdout
    check_two_node_run(setup, tmp_path / "run", proc.stdout + proc.stderr, link_bytes("node1") - before, nodes)
    assert "Hugging Face export" in proc.stdout


def test_openmpi(nodes, setup, tmp_path):
    before = link_bytes("node1")
    proc = pretrain(setup, tmp_path / "run", "node0", HOSTFILE=setup["hosts"], LAUNCHER="openmpi", MASTER_PORT="29533")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--launcher openmpi" in proc.stdout and "btl_tcp_if_include eth0" in proc.stdout
    check_two_node_run(setup, tmp_path / "run", proc.stdout + proc.stderr, link_bytes("node1") - before, nodes)
    assert "Hugging Face export" in proc.stdout


def test_one_launcher_per_node_without_ssh(nodes, setup, tmp_path):
    run_dir, before = tmp_path / "run", link_bytes("node1")
    variables = dict(HOSTFILE=setup["hosts"], MASTER_ADDR="node0", MASTER_PORT="29534")
    cmds = [
        [CLUSTER, "exec", f"node{k}", "env", f"NODE_RANK={k}", *(f"{a}={b}" for a, b in variables.items())]
        + ["./run_pretrain.sh", "configs/tiny.yaml", *overrides(setup, run_dir)]
        for k in (0, 1)
    ]
    procs = [
        subprocess.Popen(c, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in cmds
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    output = "".join(o + e for o, e in outs)
    check_two_node_run(setup, run_dir, output, link_bytes("node1") - before, nodes)
    assert "Hugging Face export" in outs[0][0] and "Hugging Face export" not in outs[1][0]


def slurm_job(out_file: Path, *sbatch_args: str, timeout: float = 600) -> dict:
    """Submit configs/slurm/pretrain.sbatch from node0, wait for the job to end; its fields."""
    sub = cluster("exec", "node0", "sbatch", "--parsable", "--output", str(out_file), *sbatch_args)
    job = sub.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        show = cluster("exec", "node0", "scontrol", "show", "job", job, "--oneliner").stdout
        fields = dict(f.split("=", 1) for f in show.split() if "=" in f)
        if fields.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return fields
        time.sleep(1)
    cluster("exec", "node0", "scancel", job, check=False)
    raise AssertionError(f"slurm job {job} did not end in {timeout} s")


def test_slurm_batch_script(nodes, setup, tmp_path):
    run_dir, out_file, before = tmp_path / "run", tmp_path / "slurm.out", link_bytes("node1")
    cmd = ["--nodes", "2", "--export", "ALL,MASTER_PORT=29535", "configs/slurm/pretrain.sbatch", "configs/tiny.yaml"]
    job = slurm_job(out_file, *cmd, *overrides(setup, run_dir))
    output = out_file.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", output[-3000:]
    assert job["BatchHost"] == "node0" and job["NodeList"] == "node[0-1]"
    check_two_node_run(setup, run_dir, output, link_bytes("node1") - before, nodes)
    assert "Hugging Face export" in output and "srun --nodes 2" in output


def run_and_break(setup: dict, run_dir: Path, breaker) -> tuple[subprocess.CompletedProcess, float]:
    """A 2-node pdsh run that pauses rank 0 after step 12; `breaker()` then hurts node1. Returns
    the finished run and the seconds from the break to the script's exit."""
    cmd = ["env", f"HOSTFILE={setup['hosts']}", "MASTER_PORT=29536", "PRECOND_FAULT=pause@12:0", "./run_pretrain.sh"]
    extra = {"train.max_steps": 30, "train.save_interval": 5, "train.dist_timeout": DIST_TIMEOUT}
    cmd += ["configs/tiny.yaml", *overrides(setup, run_dir, **extra)]
    proc = subprocess.Popen(
        [CLUSTER, "exec", "node0", *cmd], cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while 12 not in (train_losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before step 12"
        time.sleep(0.1)
    breaker()
    broke = time.monotonic()
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - broke


def leftover_ranks(node: str) -> list[str]:
    """Command lines of training processes (launcher or rank) still running inside `node`."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout.split()
    out = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "launcher.train" in cmdline or "deepspeed" in cmdline:
            out.append(cmdline)
    return out


def check_lost_node(proc: subprocess.CompletedProcess, seconds: float, run_dir: Path, silent: str) -> None:
    assert proc.returncode != 0
    assert seconds <= DIST_TIMEOUT + 30
    lines = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "error: rank 0:" in line]
    assert len(lines) == 1 and "rank 1 on node1 (" in lines[0] and silent in lines[0], proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (run_dir / "checkpoints/latest").read_text() == "global_step10"
    assert checkpoint_files(run_dir / "checkpoints/global_step10") == ONE_CHECKPOINT
    assert not (run_dir / "hf").exists() and "Hugging Face export" not in proc.stdout
    deadline = time.monotonic() + 30
    while (leftover_ranks("node0") or leftover_ranks("node1")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert leftover_ranks("node0") == [] and leftover_ranks("node1") == []


def test_lost_node_is_detected(nodes, setup, tmp_path):
    try:
        proc, seconds = run_and_break(setup, tmp_path / "run", lambda: cluster("kill", "node1"))
        check_lost_node(proc, seconds, tmp_path / "run", "went away")
    finally:
        cluster("start", "node1")


def test_cut_link_is_detected(nodes, setup, tmp_path):
    try:
        proc, seconds = run_and_break(setup, tmp_path / "run", lambda: cluster("link", "node1", "down"))
        check_lost_node(proc, seconds, tmp_path / "run", "went silent")
    finally:
        cluster("link", "node1", "up")


BAD_HOSTFILES = [
    ("unresolved", "node0 slots=1\nnodeX slots=1\n", {}, "host nodeX does not resolve"),
    ("ssh-refused", "node0 slots=1\nlocalhost slots=1\n", {}, "ssh to localhost failed"),
    ("slots-not-a-number", "node0 slots=1\nnode1 slots=two\n", {}, "line 2: slots=two is not a whole number"),
    ("too-few-nodes", "node0 slots=1\nnode1 slots=1\n", {"NUM_NODES": "3"}, "NUM_NODES=3: HOSTFILE="),
]


@pytest.mark.parametrize("hosts,variables,message", [b[1:] for b in BAD_HOSTFILES], ids=[b[0] for b in BAD_HOSTFILES])
def test_bad_hostfile_is_one_line_before_any_rank(nodes, setup, tmp_path, hosts, variables, message):
    (tmp_path / "hosts").write_text(hosts)
    proc = pretrain(setup, tmp_path / "run", "node0", timeout=120, HOSTFILE=str(tmp_path / "hosts"), **variables)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and message in err, err
    assert "[train]" not in proc.stdout and not (tmp_path / "run").exists()


def test_slurm_allocation_smaller_than_asked(nodes, setup, tmp_path):
    out_file = tmp_path / "slurm.out"
    cmd = ["--nodes", "1", "--export", "ALL,NUM_NODES=2", "configs/slurm/pretrain.sbatch", "configs/tiny.yaml"]
    job = slurm_job(out_file, *cmd, *overrides(setup, tmp_path / "run"), timeout=120)
    output = out_file.read_text().strip()
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", output
    assert output.count("\n") == 0 and "NUM_NODES=2: the Slurm allocation (1 node(s): node0) has only 1" in output
    assert not (tmp_path / "run").exists()
