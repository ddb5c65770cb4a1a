"""The nodes of a multi-node launch, checked before any rank starts.

    python -m launcher.hosts check --hostfile FILE --out FILE [--num-nodes N] [--slots N] [--ssh]
                                   [--alive --min-nodes M]
    python -m launcher.hosts slurm --out FILE [--num-nodes N] [--slots N] [--alive --min-nodes M]

`check` reads a DeepSpeed hostfile (one `hostname slots=N` line per node), keeps its first
N hosts, checks that each resolves and, with --ssh (the pdsh and OpenMPI launchers), answers
ssh without a password or a prompt; `slurm` takes the hosts of the Slurm allocation this runs
in. Both write the hostfile of the launch to --out (slots = --slots when given) and print the
first host, where rank 0 runs (MASTER_ADDR). A bad input is one line naming it, exit 2.

--alive (before a restart) leaves out, with a line each on stderr, the hosts that do not
answer (ssh, or Slurm's node state) instead of failing, and fails only when fewer than
--min-nodes answer.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core.cli import at_least_one, is_count, run_main
from core.config import check_output_path
from core.errors import ConfigError
from core.files import write_atomic

SSH_TIMEOUT_S = 10


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """[(host, slots)] in file order; blank lines and `#` comments are skipped."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"HOSTFILE={path}: {e.strerror}; one 'hostname slots=N' line per node") from None
    except UnicodeDecodeError:
        raise ConfigError(f"HOSTFILE={path}: not UTF-8 text; one 'hostname slots=N' line per node") from None
    hosts = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].startswith("slots="):
            raise ConfigError(f"HOSTFILE={path} line {n}: {raw.strip()!r} is not 'hostname slots=N'")
        slots = fields[1].removeprefix("slots=")
        if not is_count(slots):
            raise ConfigError(f"HOSTFILE={path} line {n}: slots={slots} is not a whole number of processes (1 or more)")
        if any(h == fields[0] for h, _ in hosts):
            raise ConfigError(f"HOSTFILE={path} line {n}: host {fields[0]} is listed twice")
        hosts.append((fields[0], int(slots)))
    if not hosts:
        raise ConfigError(f"HOSTFILE={path}: names no host; one 'hostname slots=N' line per node")
    return hosts


def take_nodes(hosts: list[tuple[str, int]], num_nodes: int | None, where: str) -> list[tuple[str, int]]:
    if num_nodes is not None and num_nodes > len(hosts):
        raise ConfigError(f"NUM_NODES={num_nodes}: {where} has only {len(hosts)} node(s)")
    return hosts[:num_nodes] if num_nodes else hosts


def check_resolves(hosts: list[str], where: str) -> None:
    for host in hosts:
        try:
            socket.getaddrinfo(host, None)
        except OSError:
            raise ConfigError(f"{where}: host {host} does not resolve (not in /etc/hosts or DNS)") from None


def ssh_error(host: str) -> str | None:
    """None when `ssh host true` works without a password or a prompt, else ssh's last words."""
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}", host, "true"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SSH_TIMEOUT_S + 5, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"no answer in {SSH_TIMEOUT_S + 5} s"
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"ssh exit code {proc.returncode}"


def ssh_errors(hosts: list[str]) -> list[str | None]:
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return list(pool.map(ssh_error, hosts))


def check_ssh(hosts: list[str], where: str) -> None:
    for host, error in zip(hosts, ssh_errors(hosts), strict=True):
        if error:
            raise ConfigError(
                f"{where}: ssh to {host} failed ({error}); the launcher needs ssh from this node to every host "
                "without a password or a prompt (see docs/multinode.md)"
            )


def slurm_hosts() -> list[str]:
    """The hosts of the Slurm allocation this process runs in, in Slurm's order."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("LAUNCHER=slurm: not inside a Slurm allocation (no SLURM_JOB_NODELIST); submit with sbatch")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def slurm_node_errors(hosts: list[str]) -> list[str | None]:
    """Per host, None when Slurm counts the node as up, else its state (DOWN, NOT_RESPONDING, ...)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T", "-n", ",".join(hosts)], capture_output=True, text=True)
    states = dict(line.split(maxsplit=1) for line in out.stdout.splitlines() if len(line.split()) == 2)
    bad = ("down", "drain", "fail", "not_responding", "unknown", "*")
    errors = []
    for host in hosts:
        state = states.get(host, "unknown").lower()
        errors.append(f"Slurm node state {state}" if any(b in state for b in bad) else None)
    return errors


def answering(hosts: list[tuple[str, int]], errors: list[str | None], min_nodes: int, where: str):
    """The hosts without an error; a line on stderr for each left out; ConfigError below min_nodes."""
    kept = []
    for (host, slots), error in zip(hosts, errors, strict=True):
        if error:
            print(f"host {host} does not answer ({error}): leaving it out", file=sys.stderr, flush=True)
        else:
            kept.append((host, slots))
    if len(kept) < min_nodes:
        names = ",".join(h for h, _ in kept) or "none"
        answer = f"{len(kept)} of {len(hosts)} hosts answer ({names})"
        raise ConfigError(f"{where}: {answer}, fewer than MIN_NODES={min_nodes}; not restarting")
    return kept


def write_hostfile(path: str, hosts: list[tuple[str, int]], slots: int | None) -> None:
    write_atomic(path, "".join(f"{h} slots={slots or s}\n" for h, s in hosts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launcher.hosts", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["check", "slurm"])
    p.add_argument("--hostfile", help="a DeepSpeed hostfile (check)")
    p.add_argument("--out", required=True, help="where to write the launch's hostfile")
    p.add_argument("--num-nodes", type=at_least_one, default=None, help="use the first N nodes (default: all)")
    p.add_argument("--slots", type=at_least_one, default=None, help="processes per node (default: the hostfile's)")
    p.add_argument("--ssh", action="store_true", help="check passwordless ssh to every host")
    p.add_argument("--alive", action="store_true", help="leave out the hosts that do not answer")
    p.add_argument("--min-nodes", type=at_least_one, default=1, help="with --alive: fail below this many hosts")
    args = p.parse_args(argv)
    check_output_path("--out", args.out, folder=False)
    if args.what == "check":
        if not args.hostfile:
            raise ConfigError("check needs --hostfile")
        where = f"HOSTFILE={args.hostfile}"
        hosts = take_nodes(read_hostfile(args.hostfile), args.num_nodes, where)
        check_resolves([h for h, _ in hosts], where)
        if args.alive:
            errors = ssh_errors([h for h, _ in hosts]) if args.ssh else [None] * len(hosts)
            hosts = answering(hosts, errors, args.min_nodes, where)
        elif args.ssh:
            check_ssh([h for h, _ in hosts], where)
    else:
        allocated = slurm_hosts()
        where = f"the Slurm allocation ({len(allocated)} node(s): {','.join(allocated)})"
        hosts = take_nodes([(h, 1) for h in allocated], args.num_nodes, where)
        if args.alive:
            hosts = answering(hosts, slurm_node_errors([h for h, _ in hosts]), args.min_nodes, where)
    write_hostfile(args.out, hosts, args.slots)
    print(hosts[0][0])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
