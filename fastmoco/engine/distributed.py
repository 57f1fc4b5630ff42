"""Process launch on torch.distributed: torchrun's environment, `--gpus N`, or one process.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) every process joins the group from the
environment, so multi-node is plain torchrun. `--gpus N` spawns N local ranks itself.
NCCL on CUDA, gloo on CPU (how the tests run two ranks on one machine).

Nothing here relies on a filesystem the nodes share: rank 0 decides what must be decided
once (the run directory, the checkpoint to resume) and sends it to the others over the
process group, and rank 0's results come back the same way.
"""

import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from fastmoco.errors import EnvironmentFault, UsageError


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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # what schedulers send


class PeerError(UsageError):
    """Another rank's UsageError, received here: that rank prints it, this one only exits 2."""

    quiet = True


def is_rank0_process() -> bool:
    """False in torchrun's processes other than global rank 0 (they keep quiet)."""
    return os.environ.get("RANK", "0") == "0"


def _worker(local_rank, world_size, port, backend, fn: Callable, args, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
    )
    init(backend)
    try:
        out = fn(*args)
        if local_rank == 0:
            results.put(("result", out, 0))
    except UsageError as e:  # the parent prints it as a one-line error
        results.put(("error", str(e), 2))
        sys.exit(2)
    except EnvironmentFault as e:  # a fault of the machine: the same, with its exit code
        results.put(("fault", str(e), e.exit_code))
        sys.exit(e.exit_code)
    finally:
        dist.destroy_process_group()


def init(backend: str) -> None:
    """Join the process group described by the environment (torchrun or spawn)."""
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized()


def launch(
    fn: Callable, args: tuple, *, nprocs: int, device: str, prepare: Callable | None = None
) -> Any:
    """Run fn(*args) on every rank and return rank 0's result: under torchrun to every
    process, with --gpus N (spawned ranks) to the caller, else in this process.

    prepare() runs once, before the ranks start, on the caller or torchrun's rank 0 (which
    names the run directory, so every node agrees on it); its result is passed as fn's
    first argument. A UsageError raised by prepare or on any spawned rank ends the run as
    that one error; the results travel by the process group or a pipe, never by a file.
    """
    backend = "nccl" if device == "cuda" else "gloo"
    if under_torchrun():
        init(backend)
        try:
            if prepare is not None:
                args = (decide_on_rank0(prepare), *args)
            out = fn(*args)
            return broadcast_object(out)
        finally:
            dist.destroy_process_group()
    if prepare is not None:
        args = (prepare(), *args)
    if nprocs > 1:
        return _spawn(fn, args, nprocs, backend)
    return fn(*args)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's obj on every rank (pickled over the process group)."""
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decide_on_rank0(decide: Callable) -> Any:
    """decide() on rank 0, its result on every rank. An error there becomes an error on
    every rank (PeerError elsewhere), rather than the others waiting for it forever."""
    if dist.get_rank() == 0:
        try:
            value = decide()
        except UsageError as e:
            broadcast_object(("error", str(e)))
            raise
        except BaseException as e:
            broadcast_object(("error", f"rank 0 failed: {type(e).__name__}: {e}"))
            raise
        return broadcast_object(("ok", value))[1]
    status, value = broadcast_object(None)
    if status == "error":
        raise PeerError(value)
    return value


def _spawn(fn: Callable, args: tuple, nprocs: int, backend: str) -> Any:
    """mp.spawn with rank 0's result and any rank's UsageError sent back through a pipe.

    The parent forwards the stop signals to its ranks (they save and stop together) rather
    than dying and leaving them orphaned.
    """
    results = mp.get_context("spawn").SimpleQueue()
    context = mp.spawn(
        _worker, args=(nprocs, free_port(), backend, fn, args, results), nprocs=nprocs, join=False
    )

    def forward(signum, frame):
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    old = {}
    for s in STOP_SIGNALS:
        try:
            old[s] = signal.signal(s, forward)
        except ValueError:  # not the main thread: leave signals alone
            pass
    received = []
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)  # not "Terminating process ..." after a rank's error
    try:
        while True:
            while not results.empty():  # drain as we go: a full pipe would block a rank
                received.append(results.get())
            try:
                if context.join(timeout=0.2):
                    break
            except ProcessException:
                while not results.empty():
                    received.append(results.get())
                error = next((v for kind, v, _ in received if kind == "error"), None)
                if error is not None:
                    raise UsageError(error) from None
                fault = next(((v, c) for kind, v, c in received if kind == "fault"), None)
                if fault is not None:  # a survivor's account of a rank that died
                    raise EnvironmentFault(*fault) from None
                raise
        while not results.empty():
            received.append(results.get())
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        spawn_log.setLevel(level)
    return next((v for kind, v, _ in received if kind == "result"), None)


def local_device(device: str) -> torch.device:
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
