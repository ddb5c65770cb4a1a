"""Process-group set-up that works under `deepspeed`, `torchrun`, or as one plain process."""

from __future__ import annotations

import ctypes
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_environment(threads: int = 0) -> None:
    """Set the env a launcher would set when there is none, pick the accelerator, and give
    each CPU rank its share of the cores. Must run before deepspeed is imported."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local))
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


def timeout_message(timeout_s: int) -> str:
    """One line: which limit was hit and, when it can be known, which rank went silent."""
    W = world_size()
    silent = f"rank {1 - rank()}" if W == 2 else "another rank"
    return (
        f"a collective waited longer than train.dist_timeout={timeout_s} s: {silent} went silent "
        "(hung, stopped or dead); the job stops here; run it again to resume from the last checkpoint"
    )


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
