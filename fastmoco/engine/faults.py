"""Faults of the machine end a run in one line: what happened, what is kept, how to continue.

A run on a cluster meets faults that are not its own: the disk fills up or turns read-only
under a save, the kernel's out-of-memory killer takes a loader worker, a node dies and
takes a rank with it. Each ends the run, none loses more than the steps since the newest
complete checkpoint, and each used to end in a traceback that said none of this.
`classify` turns the exception each of them raises into one line and an exit code a job
script can act on:

- EXIT_REQUEUE = 75 (EX_TEMPFAIL of sysexits.h): a fault of the environment, not of the
  run or its input; requeue with --resume. A requeue that meets a disk still full or
  still read-only is refused before training (checkpoint.check_writable, exit 2), so a
  script that requeues on 75 does not loop.
- EXIT_USAGE = 2: bad input; the message names the fix and a requeue would repeat it.
- EXIT_NONFINITE = 3: NaN/inf stopped the run (engine/guard.py).
- 128 + signal: stopped by a signal after saving.

What classify recognises, in the exception or anything in its __cause__/__context__ chain:

- an EnvironmentFault (checkpoint.SaveError: a save that failed), as it is;
- a write that failed: an OSError with ENOSPC, EDQUOT or EROFS anywhere, EACCES/EPERM on a
  file under the run directory, and torch.save's own "[enforce fail at inline_container.cc]
  ... unexpected pos" RuntimeError, which is what a full disk looks like from inside
  torch.save (the OSError it hides sits in its __context__ when the file is ours);
- a DataLoader worker that died ("DataLoader worker (pid(s) N) exited unexpectedly");
- a lost peer: gloo's "Connection closed/reset by peer", NCCL's remote errors and aborted
  communicators, torch.distributed's DistNetworkError/DistStoreError.

Anything else is a bug or a usage error and keeps its traceback (None).
"""

import errno
import os
import re
import signal
import traceback
from pathlib import Path
from typing import NamedTuple

from fastmoco.errors import EXIT_REQUEUE, EnvironmentFault

EXIT_USAGE = 2
EXIT_NONFINITE = 3

# errnos that mean "the disk refused the write", wherever the path
_WRITE_ERRNOS = {errno.ENOSPC: "full", errno.EDQUOT: "quota", errno.EROFS: "read-only"}
# errnos that mean it only for files of the run (a data file may be unreadable too)
_PERMISSION_ERRNOS = {errno.EACCES: "permission", errno.EPERM: "permission"}
# torch.save's C++ writer reports a short write without the errno
_TORCH_WRITE_FAILED = re.compile(
    r"inline_container\.cc.*unexpected pos|PytorchStreamWriter failed|file write failed"
)
_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")
_WORKER_SIGNAL = re.compile(r"killed by signal: ([\w -]+?)\.")
_WORKER_EXIT = re.compile(r"exited unexpectedly with exit code (-?\d+)")
_SHM = re.compile(r"shared memory|bus error", re.IGNORECASE)
# not "Broken pipe" or "Connection refused": a closed stdout or a wrong MASTER_ADDR say so too
_PEER_LOST = re.compile(
    r"Connection (?:closed|reset) by peer|remote process exited|ncclRemoteError"
    r"|NCCL communicator was aborted"
)
# strsignal's words ("Killed", "Bus error") back to names, for a message that says SIGKILL
_SIGNAL_NAMES = {signal.strsignal(s): s.name for s in signal.Signals if signal.strsignal(s)}


class Fault(NamedTuple):
    """One line for the user (the CLI prefixes "fastmoco CMD: error: ") and an exit code."""

    message: str
    exit_code: int


# --- small pieces shared with checkpoint.py ------------------------------------------------
def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': the sizes the messages quote."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def free_bytes(directory: str | Path) -> int | None:
    """Bytes an unprivileged writer may still use on directory's filesystem (statvfs's
    f_bavail: root's reserve is not counted), or None where statvfs cannot say."""
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _chain(exc: BaseException):
    """exc and everything it was raised from or during, each once."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def _under(path, directory) -> bool:
    if path is None or directory is None:
        return False
    try:
        return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(directory))
    except (TypeError, ValueError):
        return False


def write_failure(exc: BaseException, path=None, run_dir=None) -> tuple[str, str] | None:
    """(what happened, kind) when exc is a write the disk refused, else None; kind is one
    of full, quota, read-only, permission. path: the file being written, when the caller
    knows it (OSError.filename is used otherwise); run_dir: where EACCES/EPERM count."""
    for e in _chain(exc):
        if not isinstance(e, OSError):
            continue
        kind = _WRITE_ERRNOS.get(e.errno)
        target = e.filename or path
        if kind is None and _under(target, run_dir if run_dir is not None else path):
            kind = _PERMISSION_ERRNOS.get(e.errno)
        if kind is None:
            continue
        where = Path(target).parent if target is not None else run_dir
        what = {
            "full": f"the disk holding {where} is full",
            "quota": f"the disk quota for {where} is exhausted",
            "read-only": f"{where} is on a read-only filesystem",
            "permission": f"{where} is not writable by this user",
        }[kind]
        name = errno.errorcode.get(e.errno, str(e.errno))
        on = f"writing {target}: " if target is not None else ""
        return f"{what} ({on}{e.strerror or os.strerror(e.errno)}, {name})", kind
    for e in _chain(exc):
        if isinstance(e, RuntimeError) and _TORCH_WRITE_FAILED.search(str(e)):
            where = Path(path).parent if path is not None else run_dir
            free = free_bytes(where) if where is not None else None
            room = f"; {format_bytes(free)} free there" if free is not None else ""
            first = str(e).strip().splitlines()[0][:120]
            return (
                f"torch.save stopped short writing {path or 'a checkpoint'} ({first}), "
                f"which is what a full disk or an exhausted quota does{room}",
                "full",
            )
    return None


def kept_clause(kept, run_dir=None, searched: bool = False) -> str:
    """What the user still has: the newest complete checkpoint, named when known. searched:
    kept is None because run_dir holds none (not because this rank cannot see it)."""
    if kept:
        return f"the newest complete checkpoint, {kept}, is kept"
    if searched and run_dir is not None:
        return f"no complete checkpoint was in {run_dir} yet"
    if run_dir is not None:
        return f"the checkpoints already in {run_dir} are kept (none may have been written yet)"
    return "the checkpoints already written are kept"


def resume_hint(run_dir=None) -> str:
    return f"--resume {run_dir}" if run_dir is not None else "--resume auto"


def write_fix(kind: str, run_dir) -> str:
    """How to go on after a refused write, by its kind."""
    if kind in ("full", "quota"):
        return f"free space (or lower --keep) and continue with {resume_hint(run_dir)}"
    return (
        f"make the directory writable and continue with {resume_hint(run_dir)}, or continue "
        f"elsewhere with {resume_hint(run_dir)} --out NEW_DIR"
    )


# --- the other faults ------------------------------------------------------------------------
def _in_loader(e: BaseException) -> bool:
    """Whether e was raised inside torch's DataLoader (by the traceback's files)."""
    files = [f.filename.replace(os.sep, "/") for f in traceback.extract_tb(e.__traceback__)]
    return any("torch/utils/data/" in f for f in files)


def _worker_death(exc: BaseException) -> str | None:
    """What a DataLoader worker's death says, with the likely cause by its signal."""
    text = " ".join(str(e) for e in _chain(exc))
    m = _WORKER_DIED.search(text)
    if m is None:
        # the worker died after queueing a batch whose tensors it shares by file
        # descriptor: fetching them fails first, before the SIGCHLD check says who died
        lost = next(
            (e for e in _chain(exc) if isinstance(e, ConnectionError | EOFError) and _in_loader(e)),
            None,
        )
        if lost is None:
            return None
        return (
            f"a data loader worker died while handing over a batch ({type(lost).__name__}), "
            "most often killed by the kernel's out-of-memory killer (see dmesg); lower "
            "--workers if memory is short"
        )
    pids = m.group(1).strip(" ,")
    sig, code = _WORKER_SIGNAL.search(text), _WORKER_EXIT.search(text)
    if _SHM.search(text) or (sig and _SIGNAL_NAMES.get(sig.group(1)) == "SIGBUS"):
        return (
            f"a data loader worker (pid {pids}) ran out of shared memory (/dev/shm); give "
            "the container more (docker --shm-size) or lower --workers"
        )
    if sig is not None:
        name = _SIGNAL_NAMES.get(sig.group(1), sig.group(1))
        why = (
            ", most often the kernel's out-of-memory killer (see dmesg); lower --workers "
            "if memory is short"
            if name == "SIGKILL"
            else ""
        )
        return f"a data loader worker (pid {pids}) was killed by {name}{why}"
    how = f"exited with code {code.group(1)}" if code else "exited unexpectedly"
    return (
        f"a data loader worker (pid {pids}) {how} (its own error is lost with it; "
        "--workers 0 would show it in the main process)"
    )


def _peer_loss(exc: BaseException) -> str | None:
    """What a lost rank looks like from the ranks that survive it."""
    import torch.distributed as dist

    kinds = tuple(
        t for t in (getattr(dist, "DistNetworkError", None), getattr(dist, "DistStoreError", None))
        if t is not None
    )  # fmt: skip
    for e in _chain(exc):
        if isinstance(e, OSError):  # a socket of this process (a loader worker's, stdout's)
            continue
        text = str(e).strip()
        m = _PEER_LOST.search(text)
        if m is None and not (kinds and isinstance(e, kinds)):
            continue
        said = m.group(0) if m is not None else type(e).__name__
        backend = "NCCL" if "nccl" in text.lower() else "gloo" if "gloo" in text else "torch"
        return (
            f"lost contact with another rank ({backend}: {said}): a rank died or the network "
            "failed; that rank's own error is in its log (torchrun's summary names it)"
        )
    return None


def classify(exc: BaseException, *, run_dir=None, kept=None, step: int | None = None):
    """Fault(one-line message, exit code) for an environment fault, None for anything else.

    run_dir: the run's directory (for --resume DIR and the permission check); kept: the
    newest complete checkpoint (checkpoint.newest_complete(run_dir)), named in the message;
    step: the step the run had reached."""
    for e in _chain(exc):
        if isinstance(e, EnvironmentFault):
            return Fault(str(e), e.exit_code)
    at = f" at step {step}" if step is not None else ""
    failed = write_failure(exc, run_dir=run_dir)
    if failed is not None:
        what, kind = failed
        msg = f"{what}{at}; {kept_clause(kept, run_dir)}; {write_fix(kind, run_dir)}"
        return Fault(msg, EXIT_REQUEUE)
    what = _worker_death(exc) or _peer_loss(exc)
    if what is None:
        return None
    msg = f"{what}{at}; {kept_clause(kept, run_dir)}; continue with {resume_hint(run_dir)}"
    return Fault(msg, EXIT_REQUEUE)


def as_fault(exc: BaseException, **where) -> EnvironmentFault | None:
    """classify(exc, **where) as the exception to raise from exc (None: re-raise exc)."""
    fault = classify(exc, **where)
    return None if fault is None else EnvironmentFault(fault.message, fault.exit_code)
