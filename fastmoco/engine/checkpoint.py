"""Checkpoints that survive: atomic rotated writes, torn-file fallback, safe loading, run locks.

A save writes a temp file beside the run's checkpoints, fsyncs it, shifts the older ones
down the chain (checkpoint.pt -> checkpoint.prev.pt -> checkpoint.prev2.pt ..., `keep` in
all) and renames the temp file to checkpoint.pt. A kill at any instant leaves either the
new file or the old ones complete; resuming walks the chain newest first and takes the
first file that loads, saying why it skipped the others.

Files are read with torch.load(weights_only=True): tensors, numbers, strings, tuples,
lists and dicts only, so a downloaded file cannot run code on load. Our checkpoints hold
nothing else (numpy's RNG state is stored as a tensor). A file that needs more is refused
unless the user passes --trust-checkpoint.

A run directory is owned by one process at a time through run.lock (host and pid of the
owner); a start on a directory that holds a run is refused unless it resumes it or
--force starts over.
"""

import json
import os
import random
import re
import shutil
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from fastmoco.errors import UsageError

CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = "run.lock"
RUNS_ROOT = "runs"
# Tests widen the window a kill -9 can hit during a save (seconds of sleep mid-write and
# between the renames); never set in normal use.
SAVE_DELAY_ENV = "FASTMOCO_TEST_SAVE_DELAY_S"
# What a run directory holds; --force removes these before a new run starts there.
RUN_OUTPUTS = ("checkpoint*.pt", "metrics.jsonl", "curves.png", "tb", "config.yaml")


class CheckpointError(UsageError):
    """A checkpoint file that cannot be read: torn, corrupt, or needing unsafe unpickling."""

    def __init__(self, path, reason: str, unsafe: list[str] | None = None):
        self.path, self.reason, self.unsafe = Path(path), reason, unsafe or []
        if self.unsafe:
            msg = (
                f"{path} needs arbitrary unpickling to load ({', '.join(self.unsafe[:4])}); "
                "it could run code. If you trust its source, pass --trust-checkpoint"
            )
        else:
            msg = f"cannot read checkpoint {path}: {reason}"
        super().__init__(msg)


# --- names of the chain ---------------------------------------------------------------
def chain_name(i: int) -> str:
    """checkpoint.pt, checkpoint.prev.pt, checkpoint.prev2.pt, ... (0 = newest)."""
    return CHECKPOINT_NAME if i == 0 else f"checkpoint.prev{'' if i == 1 else i}.pt"


def existing_chain(run_dir: str | Path) -> list[Path]:
    """The checkpoints present in run_dir, newest first (by chain position)."""
    run_dir = Path(run_dir)

    def position(p: Path) -> int:
        m = re.fullmatch(r"checkpoint(?:\.prev(\d*))?\.pt", p.name)
        return -1 if m is None else (0 if m.group(0) == CHECKPOINT_NAME else int(m[1] or 1))

    found = [(position(p), p) for p in run_dir.glob("checkpoint*.pt")]
    return [p for i, p in sorted(found) if i >= 0]


# --- writing ----------------------------------------------------------------------------
def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _write_synced(obj, tmp: Path) -> None:
    """torch.save to tmp and fsync it, so the rename that follows publishes whole bytes."""
    delay = float(os.environ.get(SAVE_DELAY_ENV, 0) or 0)
    with open(tmp, "wb") as f:
        if delay:  # write half, pause, write the rest: a kill lands mid-file
            import io

            buf = io.BytesIO()
            torch.save(obj, buf)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(delay)
            f.write(data[len(data) // 2 :])
        else:
            torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(obj, path: str | Path) -> Path:
    """torch.save to a temp file beside `path`, then rename: a crash never leaves half a
    file, and the temp file is removed on every exit path that Python sees."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        _write_synced(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def save_checkpoint(obj, run_dir: str | Path, keep: int = 2) -> Path:
    """Write checkpoint.pt in run_dir, keeping the keep-1 previous ones down the chain."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    newest = run_dir / CHECKPOINT_NAME
    tmp = _temp_name(newest)
    try:
        _write_synced(obj, tmp)
        # shift older files down; between these renames and the last one, the newest
        # complete file is checkpoint.prev.pt, which resume falls back to
        for i in range(keep - 1, 0, -1):
            src = run_dir / chain_name(i - 1)
            if src.exists():
                os.replace(src, run_dir / chain_name(i))
        delay = float(os.environ.get(SAVE_DELAY_ENV, 0) or 0)
        if delay:
            time.sleep(delay)
        os.replace(tmp, newest)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(run_dir)
    return newest


# --- reading ----------------------------------------------------------------------------
def load_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """torch.load on the CPU, weights only unless trust; CheckpointError says why it failed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "the file is empty (0 bytes): a save was cut short")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported the same way
        first_error = e
    unsafe = []
    if not trust:
        try:  # a whole file whose pickle names globals beyond tensors and containers
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - not even a readable archive: torn or foreign
            unsafe = []
    reason = str(first_error).strip().splitlines()[0] if str(first_error).strip() else ""
    reason = reason or type(first_error).__name__
    if "central directory" in reason or isinstance(first_error, EOFError):
        reason = f"the file is truncated or not a torch checkpoint ({reason[:120]})"
    elif "Weights only load failed" in reason:
        reason = "not a torch checkpoint, or one damaged inside"
    raise CheckpointError(path, reason, unsafe) from first_error


def newest_loadable(run_dir: str | Path, trust: bool = False, log=print) -> tuple[Path, dict]:
    """(path, state) of the newest checkpoint in run_dir that loads; the ones skipped are
    named with their reason. Raises when the chain is empty or every file is unreadable."""
    chain = existing_chain(run_dir)
    if not chain:
        raise UsageError(
            f"no {CHECKPOINT_NAME} in {run_dir}; start without --resume, or give --resume PATH"
        )
    errors = []
    for path in chain:
        try:
            state = load_checkpoint(path, trust)
        except CheckpointError as e:
            errors.append(e)
            log(f"fastmoco: skipping {path}: {e}", file=sys.stderr, flush=True)
            continue
        if errors:
            log(f"fastmoco: resuming from the previous good checkpoint {path}", flush=True)
        return path, state
    unsafe = next((e for e in errors if e.unsafe), None)
    if unsafe is not None:
        raise unsafe
    raise UsageError(
        f"every checkpoint in {run_dir} is unreadable ({'; '.join(e.reason for e in errors)}); "
        "nothing to resume: start over with --force, or resume from a copy with --resume PATH"
    )


def load_resumable(source: str | Path, trust: bool = False) -> dict:
    """The state to resume from a checkpoint file, or from a run directory's chain."""
    source = Path(source)
    return newest_loadable(source, trust)[1] if source.is_dir() else load_checkpoint(source, trust)


# --- RNG state (tensors and tuples only, so weights_only loading accepts it) -------------
def rng_states(*generators: torch.Generator) -> dict:
    """Every generator in play: python, numpy, torch CPU, every CUDA device, and extras."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }


def set_rng_states(states: dict, *generators: torch.Generator) -> None:
    random.setstate(tuple(states["python"]))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    for g, s in zip(generators, states["generators"], strict=True):
        g.set_state(s)


# --- run directories --------------------------------------------------------------------
def resolve_resume(resume: str, out: str | None, runs_root: str, preset: str) -> Path:
    """What --resume PATH|DIR|auto names: a checkpoint file, or a run directory whose chain
    is searched. auto: the run directory given by --out, else the newest runs/<preset>-*
    holding a checkpoint."""
    if resume != "auto":
        p = Path(resume)
        if p.is_dir():
            if not existing_chain(p):
                raise UsageError(f"--resume {resume}: no {CHECKPOINT_NAME} in that directory")
            return p
        if not p.is_file():
            raise UsageError(f"--resume {resume}: no checkpoint file there ({p} does not exist)")
        return p
    if out is not None:
        candidates = [Path(out)]
    else:
        candidates = sorted(
            (d for d in Path(runs_root).glob(f"{preset}-*") if existing_chain(d)),
            key=lambda d: max(p.stat().st_mtime for p in existing_chain(d)),
        )
    found = [d for d in candidates if existing_chain(d)]
    if not found:
        where = out if out is not None else f"{runs_root}/{preset}-*"
        raise UsageError(
            f"--resume auto: no {CHECKPOINT_NAME} under {where}; start without --resume, "
            "or give --resume PATH"
        )
    return found[-1]


def prepare_run_dir(out: str | None, resume: str | None, name: str) -> tuple[Path, Path | None]:
    """(run directory, checkpoint file or run directory to resume, or None).

    The directory is --out, else the resumed checkpoint's, else runs/<name>-<date-time>;
    it is created. `--resume auto` with an --out that holds no checkpoint yet starts a new
    run there (the first start of a job script that always says --resume auto).
    """
    if resume == "auto" and out is not None and not existing_chain(out):
        print(
            f"fastmoco: --resume auto: no checkpoint in {out} yet, starting a new run", flush=True
        )
        resume = None
    source = resolve_resume(resume, out, RUNS_ROOT, name) if resume else None
    if out is not None:
        run_dir = Path(out)
    elif source is not None:
        run_dir = source if source.is_dir() else source.parent
    else:
        run_dir = Path(RUNS_ROOT) / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.pt").unlink(missing_ok=True)  # left by older versions
    return run_dir, source


def check_overwrite(run_dir: Path, force: bool) -> None:
    """A new run refuses a directory holding a run's checkpoint unless forced to replace it
    (the caller then removes the old outputs with clear_run_outputs). The records of a run
    that never saved a checkpoint are replaced without asking: nothing there to continue."""
    held = [p.name for p in existing_chain(run_dir)]
    if held and not force:
        raise UsageError(
            f"{run_dir} already holds a run ({', '.join(held)}); continue it with "
            f"--resume {run_dir}, or pass --force to replace it"
        )


def clear_run_outputs(run_dir: Path) -> None:
    """--force: remove a previous run's outputs (the caller holds the lock)."""
    for pat in RUN_OUTPUTS:
        for p in run_dir.glob(pat):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def remove_stale_temps(directory: str | Path, name: str | None = None) -> list[Path]:
    """Delete the .NAME.tmpPID files that a killed save left behind. Without name (a run
    directory, whose lock the caller holds) every one; with name (a directory no lock
    protects) only NAME's, and only those whose writer is no longer alive on this host."""
    removed = []
    for p in Path(directory).glob(f".{name or '*'}.tmp*"):
        pid = p.name.rsplit(".tmp", 1)[-1]
        if name is not None and (not pid.isdigit() or _pid_alive(int(pid))):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """run.lock in a run directory, created exclusively, naming its owner (host, pid).

    A lock whose owner is a dead process on this host is taken over (a kill -9 leaves its
    lock behind); one held by a live process, or by another host, is a refusal that names
    the owner.
    """

    def __init__(self):
        self.path: Path | None = None

    def acquire(self, run_dir: str | Path) -> None:
        path = Path(run_dir) / LOCK_NAME
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read(path)
                if owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                    path.unlink(missing_ok=True)  # its owner was killed: take over
                    continue
                raise UsageError(
                    f"{run_dir} is in use by another run (host {owner.get('host', '?')}, "
                    f"pid {owner.get('pid', '?')}, since "
                    f"{datetime.fromtimestamp(owner.get('since', 0)):%Y-%m-%d %H:%M}); wait for "
                    f"it to end or use another --out. If that run is dead, delete {path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.path = path
            return

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.path is not None:
            owner = self._read(self.path)
            if owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.path = None
