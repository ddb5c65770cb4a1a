"""Process-group set-up that works under `deepspeed`, `torchrun`, or as one plain process."""

from __future__ import annotations

import ctypes
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from core.errors import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_ranks(env: dict) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE from the launcher that started this
    process without setting them: OpenMPI's mpirun (DeepSpeed's openmpi runner) or Slurm's srun
    (a job step; a batch script's own shell is no rank). Empty when none did."""
    if "OMPI_COMM_WORLD_RANK" in env:
        keys = (
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        )
        values = [env[k] for k in keys]
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
        local_size = slurm_tasks_per_node(per_node)[int(env.get("SLURM_NODEID", 0))]
        values = [env["SLURM_PROCID"], env["SLURM_NTASKS"], env.get("SLURM_LOCALID", "0"), str(local_size)]
    else:
        return {}
    return dict(zip(("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"), values, strict=True))


def slurm_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed tasks-per-node list, one entry per node: "2(x3),1" -> [2, 2, 2, 1]."""
    out = []
    for item in spec.split(","):
        count, _, repeat = item.partition("(x")
        out += [int(count)] * int(repeat.rstrip(")") or 1)
    return out


def cores_here() -> int:
    """The cores this process may run on (a node's share, under taskset or a scheduler)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_environment(threads: int = 0) -> None:
    """Set the env a launcher would set when there is none, pick the accelerator, and give
    each CPU rank its share of the cores. Must run before deepspeed is imported."""
    if "RANK" not in os.environ:
        found = launcher_ranks(os.environ)
        if found and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
            raise ConfigError(
                "started by mpirun or srun without MASTER_ADDR and MASTER_PORT (run_pretrain.sh sets them)"
            )
        os.environ.update(found or dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(threads or max(1, cores_here() // local_world_size()))
        _return_large_frees_to_the_os()


def _return_large_frees_to_the_os() -> None:
    """glibc's mmap threshold grows with every large block freed (up to 32 MiB), after which
    such blocks come from heaps that keep freed memory resident: the model build's and the
    optimizer step's transient tensors stayed in each CPU rank's resident set. A fixed 4 MiB
    threshold returns every larger block when it is freed (the 350M model under ZeRO-3 on 2
    ranks in bf16: peak per rank 5.3 -> 4.6 GiB; bench/scale_check.py); smaller ones, the many
    activations of a small model, stay on the heap, where reusing them is fast (a 64 KiB
    threshold halved configs/tiny.yaml's tokens/s)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:  # the user's own glibc setting wins
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_mmap_threshold = -3  # mallopt's M_MMAP_THRESHOLD
    libc.mallopt(m_mmap_threshold, 4 * 2**20)


def init(timeout_s: int) -> torch.device:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA); returns the device.

    `timeout_s` bounds every collective of every process group: the default group's, and, as
    torch's default for groups made without one, those DeepSpeed creates later."""
    import deepspeed
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    _unlink_shm_buffer()
    return torch.device("cpu")


_hosts: list[str] = []
"""Each rank's "host (address)", in rank order, once hosts() has run."""


def this_host() -> str:
    """This node's name and the address it reaches the master rank from."""
    addr = "?"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 1))))
            addr = s.getsockname()[0]  # a UDP connect sends nothing: it only picks the route
    except OSError:
        pass
    return f"{socket.gethostname()} ({addr})"


def hosts() -> list[str]:
    """Every rank's host, gathered once (a collective), kept for the messages below."""
    global _hosts
    _hosts = gather_objects(this_host())
    return _hosts


def silent_peer() -> str:
    """Which rank (and node) another rank was waiting for, as far as this rank can know."""
    W, r = world_size(), rank()
    if W != 2:
        return "another rank"
    other = 1 - r
    return f"rank {other}" + (f" on {_hosts[other]}" if len(_hosts) == W else "")


def _unlink_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce op maps one /dev/shm file per rank (66 MB) and never removes
    it, so every run left its files in memory until reboot. init_distributed returns once this
    rank has mapped every rank's file; after the barrier all have, and the names can go (the
    mappings stay valid until the processes exit, even when they are killed)."""
    dist.barrier()
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    path = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"
    if os.path.exists(path):
        os.unlink(path)


def timed_out(error: BaseException) -> bool:
    """True when `error` is a collective that gave up waiting (gloo and NCCL word it differently)."""
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


def peer_lost(error: BaseException) -> bool:
    """True when `error` is a collective whose peer closed or reset its connection (its
    process died; gloo words it so)."""
    text = str(error).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe"))


def timeout_message(timeout_s: int) -> str:
    """One line: which limit was hit and, when it can be known, which rank (on which node) went silent."""
    return (
        f"a collective waited longer than train.dist_timeout={timeout_s} s: {silent_peer()} went silent "
        "(hung, stopped, dead or cut off); the job stops here; run it again to resume from the last checkpoint"
    )


def lost_message() -> str:
    """One line for a peer whose connection closed mid-collective."""
    return (
        f"{silent_peer()} went away (its process died or its node was lost); the job stops here; "
        "run it again to resume from the last checkpoint"
    )


def comms_bytes_by_op() -> dict[str, int]:
    """Bytes this rank has handed to each kind of collective so far, from DeepSpeed's comms
    logger (the `comms_logger` section of a DeepSpeed JSON); empty when the logger is off."""
    from deepspeed.comm.comm import comms_logger

    if not comms_logger.enabled:
        return {}
    return {op: sum(size * rec[0] for size, rec in sizes.items()) for op, sizes in comms_logger.comms_dict.items()}


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def gather_objects(obj) -> list:
    """Every rank's object, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
