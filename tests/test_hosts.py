"""The launch's host checks and the rank environment of mpirun and srun, without a cluster
(tests/test_cluster.py runs them on one)."""

from __future__ import annotations

import pytest

from core.cli import run_main
from core.errors import ConfigError
from launcher.distributed import launcher_ranks, slurm_tasks_per_node
from launcher.hosts import main as hosts_main
from launcher.hosts import read_hostfile, take_nodes


def test_hostfile_lines_comments_and_slots(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# two nodes\nnode0 slots=2\n\nnode1 slots=1  # the small one\n")
    assert read_hostfile(str(f)) == [("node0", 2), ("node1", 1)]
    assert take_nodes(read_hostfile(str(f)), 1, "x") == [("node0", 2)]
    with pytest.raises(ConfigError, match=r"NUM_NODES=3: x has only 2 node\(s\)"):
        take_nodes(read_hostfile(str(f)), 3, "x")


@pytest.mark.parametrize(
    "text,message",
    [
        ("node0 slots=1\nnode1 slots=x\n", "line 2: slots=x is not a whole number"),
        ("node0 slots=\u00b2\n", "line 1: slots=\u00b2 is not a whole number"),
        ("node0 slots=0\n", "line 1: slots=0 is not a whole number"),
        ("node0\n", "line 1: 'node0' is not 'hostname slots=N'"),
        ("node0 slots=1\nnode0 slots=1\n", "line 2: host node0 is listed twice"),
        ("# nothing\n", "names no host"),
    ],
)
def test_bad_hostfile_lines(tmp_path, text, message):
    f = tmp_path / "hosts"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_hostfile(str(f))


def test_a_binary_hostfile_is_named(tmp_path):
    f = tmp_path / "hosts"
    f.write_bytes(b"\x00\xff\xfe slots=1\n")
    with pytest.raises(ConfigError, match=r"hosts: not UTF-8 text"):
        read_hostfile(str(f))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--num-nodes", "-1"], "argument --num-nodes: '-1' is not a whole number of 1 or more"),
        (["--slots", "0"], "argument --slots: '0' is not a whole number of 1 or more"),
        (["--min-nodes", "x"], "argument --min-nodes: 'x' is not a whole number of 1 or more"),
        (["--out", "{tmp}"], "--out {tmp}: is a folder, expected a file"),
        (["--out", ""], "--out is empty"),
    ],
)
def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    f = tmp_path / "hosts"
    f.write_text("localhost slots=1\n")
    argv = ["check", "--hostfile", str(f), "--out", str(tmp_path / "o"), *(a.format(tmp=tmp_path) for a in extra)]
    assert run_main(hosts_main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hosts"]


def test_check_writes_the_launch_hostfile_and_prints_the_first_host(tmp_path, capsys):
    f, out = tmp_path / "hosts", tmp_path / "launch"
    f.write_text("localhost slots=4\n127.0.0.1 slots=4\n")
    assert hosts_main(["check", "--hostfile", str(f), "--out", str(out), "--num-nodes", "1", "--slots", "2"]) == 0
    assert capsys.readouterr().out == "localhost\n"
    assert out.read_text() == "localhost slots=2\n"


def test_unresolved_host_is_named(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("localhost slots=1\nno-such-host.invalid slots=1\n")
    with pytest.raises(ConfigError, match=r"host no-such-host.invalid does not resolve"):
        hosts_main(["check", "--hostfile", str(f), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_slurm_outside_an_allocation(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    with pytest.raises(ConfigError, match="not inside a Slurm allocation"):
        hosts_main(["slurm", "--out", str(tmp_path / "o")])


def test_ranks_from_mpirun_and_srun():
    ompi = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    ompi["OMPI_COMM_WORLD_LOCAL_SIZE"] = "2"
    assert launcher_ranks(ompi) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    step = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "4", "SLURM_NTASKS": "5", "SLURM_LOCALID": "0"}
    step.update(SLURM_NODEID="3", SLURM_STEP_TASKS_PER_NODE="2(x2),1(x2)")
    assert launcher_ranks(step) == {"RANK": "4", "WORLD_SIZE": "5", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    batch_shell = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}  # sbatch's script, no step
    assert launcher_ranks(batch_shell) == {}
    assert slurm_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
