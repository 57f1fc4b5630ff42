"""Process launch on torch.distributed: torchrun's environment, `--gpus N`, or one process.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) every process joins the group from the
environment, so multi-node is plain torchrun. `--gpus N` spawns N local ranks itself.
NCCL on CUDA, gloo on CPU (how the tests run two ranks on one machine).
"""

import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmoco.errors import UsageError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(device: str, gpus: int) -> str:
    """'cuda' or 'cpu' after checking --device/--gpus against what is visible."""
    visible = torch.cuda.device_count()
    if device == "auto":
        device = "cuda" if visible else "cpu"
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: choose auto, cpu or cuda")
    if gpus < 1:
        raise UsageError(f"--gpus {gpus}: must be at least 1")
    if device == "cuda" and visible == 0:
        raise UsageError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if "RANK" not in os.environ and gpus > 1 and gpus > visible:
        raise UsageError(
            f"--gpus {gpus}: only {visible} GPU(s) visible; use --gpus {max(visible, 1)} or fewer "
            "(for CPU processes use torchrun --nproc-per-node N ... --device cpu)"
        )
    return device


def _worker(local_rank: int, world_size: int, port: int, backend: str, fn: Callable, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
    )
    init(backend)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def init(backend: str) -> None:
    """Join the process group described by the environment (torchrun or spawn)."""
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def launch(fn: Callable, args: tuple, *, nprocs: int, device: str) -> None:
    """Run fn(*args) on every rank: joined from torchrun's env, spawned, or in this process."""
    backend = "nccl" if device == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        init(backend)
        try:
            fn(*args)
        finally:
            dist.destroy_process_group()
    elif nprocs > 1:
        mp.spawn(_worker, args=(nprocs, free_port(), backend, fn, args), nprocs=nprocs)
    else:
        fn(*args)


def local_device(device: str) -> torch.device:
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
