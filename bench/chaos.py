"""A soak of the restarts: a 2-node run that loses node1 again and again, against one that does not.

    python bench/chaos.py [--steps 200] [--faults 6] [--seed 0] [--save-interval 10]

Needs the test cluster (tools/cluster.sh up 2; brought up here when it is not, and taken
down again at the end). Trains configs/tiny.yaml with the tests' small model (ZeRO-2, pdsh,
one CPU rank per node, MAX_RESTARTS) while a seeded schedule kills every process of node1 at
random steps, some of them inside a checkpoint save (rank 1's save is slowed by 2 s at those
steps, and the kill lands once the save's folder exists but `latest` does not name it yet),
and starts node1 again a few seconds later. Then it trains the same run uninterrupted (2 ranks
on one node) and prints a Markdown table: faults injected, faults survived, steps trained
twice, and whether every step's loss equals the uninterrupted run's (within 1e-4).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLUSTER = str(ROOT / "tools/cluster.sh")
RESTART = re.compile(r"^restart (\d+) of \d+: from step (\d+) on ([\w,]+), world size (\d+)", re.M)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--faults", type=int, default=6, help="node1 losses to inject (at least 5 for the soak)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-interval", type=int, default=10)
    return p.parse_args(argv)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=check)


def rank_pids(node: str) -> list[int]:
    """The training ranks (launcher.train processes) running inside `node`."""
    pids = []
    for pid in sh("ip", "netns", "pids", node, check=False).stdout.split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"launcher.train" in cmdline:
            pids.append(int(pid))
    return pids


def plan(args: argparse.Namespace) -> list[tuple[int, bool]]:
    """(step, during a save) of each fault: distinct steps, spread over the run, every other
    one at a save step."""
    rng = random.Random(args.seed)
    saves = list(range(args.save_interval, args.steps - args.save_interval, args.save_interval))
    faults = []
    for k in range(args.faults):
        if k % 2:
            step = rng.choice([s for s in saves if s not in {f for f, _ in faults}])
            faults.append((step, True))
        else:
            step = rng.randrange(5, args.steps - 5)
            while step in {f for f, _ in faults} or step % args.save_interval == 0:
                step = rng.randrange(5, args.steps - 5)
            faults.append((step, False))
    return sorted(faults)


class Killer(threading.Thread):
    """Watches the run directory and, at each planned fault (once per fault, in order), kills
    node1 (every process in it) and starts it again: after a seeded pause of 1-8 s (back before
    the restart), or, every third fault, only once the run has gone on without it (3 steps past
    the kill on node0 alone). While the run is on node0 alone, the fault kills rank 0 instead
    (a device failure on node0; the script that restarts lives there), and the restart takes
    node1 back."""

    def __init__(self, run_dir: Path, faults: list[tuple[int, bool]], seed: int):
        super().__init__(daemon=True)
        self.run_dir, self.faults, self.rng = run_dir, list(faults), random.Random(seed + 1)
        self.done: list[tuple[int, int, bool]] = []  # (planned step, step reached when killed, in a save)
        self.stop = False

    def reached(self) -> int:
        from run.rundir import RunDir

        try:
            return max((r["step"] for r in RunDir(self.run_dir).rows() if "loss" in r), default=0)
        except Exception:  # noqa: BLE001 - a row being written: look again
            return 0

    def in_save(self, step: int) -> bool:
        from run.rundir import RunDir, tag_for

        run = RunDir(self.run_dir)
        return run.checkpoint(tag_for(step)).is_dir() and run.latest_tag() != tag_for(step)

    def run(self) -> None:
        while self.faults and not self.stop:
            step, save = self.faults[0]
            reached = self.reached()
            if reached >= step and (not save or self.in_save(step) or reached > step):
                self.done.append((step, reached, save and self.in_save(step)))
                self.faults.pop(0)
                if not rank_pids("node1"):
                    for pid in rank_pids("node0"):
                        os.kill(pid, signal.SIGKILL)
                    continue
                sh(CLUSTER, "kill", "node1", check=False)
                if len(self.done) % 3 == 0:
                    deadline = time.monotonic() + 300
                    while self.reached() < reached + 3 and time.monotonic() < deadline and not self.stop:
                        time.sleep(0.2)
                else:
                    time.sleep(self.rng.uniform(1, 8))
                sh(CLUSTER, "start", "node1", check=False)
            time.sleep(0.05)


def pretrain(run_dir: Path, corpus: str, cache: Path, steps: int, save: int, node: str | None, **variables):
    from tests.train_helpers import env, tiny_overrides

    extra = {"deepspeed.zero_stage": 2, "train.max_steps": steps, "train.save_interval": save}
    extra.update({"train.eval_interval": save, "train.dist_timeout": 20, "train.keep_last": 3})
    cmd = ["env", *(f"{k}={v}" for k, v in variables.items()), "./run_pretrain.sh", "configs/tiny.yaml"]
    cmd += tiny_overrides(corpus, cache, run_dir, **extra)
    cmd = [CLUSTER, "exec", node, *cmd] if node else cmd
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tests.train_helpers import train_losses, write_corpus

    started_cluster = sh(CLUSTER, "status", check=False).stdout.strip().endswith("down")
    if started_cluster:
        sh(CLUSTER, "up", "2")
    try:
        with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
            tmp = Path(tmp)
            corpus, cache = write_corpus(tmp / "corpus"), tmp / "cache"
            (tmp / "hosts").write_text("node0 slots=1\nnode1 slots=1\n")
            faults = plan(args)
            slow = ",".join(f"slow-save@{s}:1" for s, save in faults if save)
            killer = Killer(tmp / "run", faults, args.seed)
            start = time.monotonic()
            variables = dict(HOSTFILE=tmp / "hosts", MASTER_PORT=29561, MAX_RESTARTS=3 * args.faults, RESTART_WAIT=1)
            proc = pretrain(tmp / "run", corpus, cache, args.steps, args.save_interval, "node0", PRECOND_FAULT=slow,
                            **variables)  # fmt: skip
            killer.start()
            output, _ = proc.communicate()
            killer.stop = True
            seconds = time.monotonic() - start
            ref = pretrain(tmp / "ref", corpus, cache, args.steps, args.save_interval, None, NUM_GPUS=2,
                           MASTER_PORT=29562)  # fmt: skip
            ref_out, _ = ref.communicate()
            if ref.returncode:
                sys.exit(f"the uninterrupted run failed:\n{ref_out[-3000:]}")
            losses, reference = train_losses(tmp / "run"), train_losses(tmp / "ref")
            restarts = [(int(k), int(step), hosts, int(world)) for k, step, hosts, world in RESTART.findall(output)]
            print(output[-2000:] if proc.returncode else "", end="")
            for line in output.splitlines():  # what the user saw of each fault
                if line.startswith(("training failed", "restart ", "host ")):
                    print(line[:200])
            print_table(args, killer.done, restarts, losses, reference, proc.returncode, seconds)
            return 0 if proc.returncode == 0 else 1
    finally:
        if started_cluster:
            sh(CLUSTER, "down", check=False)


def print_table(args, done, restarts, losses, reference, rc: int, seconds: float) -> None:
    resumed = [step for _, step, _, _ in restarts]
    retrained = sum(max(reached - step, 0) for (_, reached, _), step in zip(done, resumed, strict=False))
    common = sorted(set(losses) & set(reference))
    worst = max((abs(losses[s] - reference[s]) for s in common), default=float("nan"))
    equal = common == list(range(1, args.steps + 1)) and worst <= 1e-4
    on_one = sum(1 for *_, world in restarts if world == 1)
    print(f"\nchaos soak: {args.steps} steps, save_interval {args.save_interval}, seed {args.seed}, {seconds:.0f} s")
    print("| faults injected | in a save | restarts | restarts on node0 alone | exit | steps trained twice "
          "| steps logged | max loss diff | losses equal (1e-4) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print(f"| {len(done)} | {sum(1 for *_, s in done if s)} | {len(restarts)} | {on_one} | {rc} | {retrained} "
          f"| {len(common)} of {args.steps} | {worst:.2e} | {'yes' if equal else 'no'} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
