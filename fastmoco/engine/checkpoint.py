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

A save the disk refuses (full, over quota, read-only, not writable) ends in SaveError: one
line naming the cause, the newest complete checkpoint that remains and how to continue; the
temp file is removed and nothing older is touched. check_writable refuses, before training,
an --out that cannot hold the checkpoints --keep asks for.

A file the chain cannot read is set aside (checkpoint.pt.unreadable-N), never rotated over
a good one: after a torn-file fallback the file the run resumed from stays in the chain.

A run directory is owned by one process at a time through an OS lock (flock) on run.lock,
which the kernel releases however its holder ends; the file names the holder (host, pid)
for the refusal's message. A start on a directory that holds a run is refused unless it
resumes it or --force starts over.
"""

import errno
import json
import os
import random
import re
import shutil
import socket
import sys
import time
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml

from fastmoco.config_io import CONFIG_NAME
from fastmoco.errors import UsageError

from . import faults

try:
    import fcntl
except ImportError:  # not POSIX: run.lock falls back to the owner's pid
    fcntl = None

CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = "run.lock"
RUNS_ROOT = "runs"
# Tests widen the window a kill -9 can hit during a save (seconds of sleep mid-write and
# between the renames); never set in normal use.
SAVE_DELAY_ENV = "FASTMOCO_TEST_SAVE_DELAY_S"
# What a run directory holds; --force removes these before a new run starts there.
RUN_OUTPUTS = (
    "checkpoint*.pt",
    "checkpoint*.pt.unreadable-*",
    "metrics.jsonl",
    "curves.png",
    "tb",
    "config.yaml",
)


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
class SaveError(faults.EnvironmentFault):
    """A save the disk refused (full, over quota, read-only, not writable): the message says
    which, the newest complete checkpoint that remains and how to continue; exit code 75
    (faults.EXIT_REQUEUE). The temp file is removed; no older file was touched."""

    def __init__(self, message: str, path: Path, kept: Path | None, kind: str):
        super().__init__(message)
        self.path, self.kept, self.kind = path, kept, kind


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


def _remove_temp(tmp: Path) -> None:
    """Remove a save's temp file on the way out. On a read-only filesystem even the unlink
    of a missing file fails (EROFS), and that must not hide the error being raised."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass  # left for remove_stale_temps at the next start


def _save_error(e: BaseException, path: Path, kept, how: str | None = None):
    """SaveError for a write the disk refused, None for any other failure (a bug keeps its
    traceback). kept(): the newest complete file left; how: the way to continue (None: the
    fix of the refusal's kind, with --resume)."""
    failed = faults.write_failure(e, path=path, run_dir=path.parent)
    if failed is None:
        return None
    what, kind = failed
    kept = kept()
    kept_s = faults.kept_clause(kept, path.parent, searched=True)
    how = how or faults.write_fix(kind, path.parent)
    return SaveError(f"could not save {path}: {what}; {kept_s}; {how}", path, kept, kind)


def save_atomic(obj, path: str | Path, *, how: str | None = None) -> Path:
    """torch.save to a temp file beside `path`, then rename: a crash never leaves half a
    file, and the temp file is removed on every exit path that Python sees. A write the
    disk refuses is a SaveError (path, if it existed, is as it was); how: what its message
    says to do (default: free space or make the directory writable)."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_synced(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        kept = lambda: path if path.is_file() else None  # untouched by the failure
        err = _save_error(e, path, kept, how or _replace_fix(path))
        if err is None:
            raise
        raise err from e
    finally:
        _remove_temp(tmp)
    _fsync_dir(path.parent)
    return path


def _replace_fix(path: Path) -> str:
    return f"free space or make {path.parent} writable and run it again, or choose another path"


def save_checkpoint(obj, run_dir: str | Path, keep: int = 2) -> Path:
    """Write checkpoint.pt in run_dir, keeping the keep-1 previous ones down the chain.

    Files of the chain that do not look complete (a torn file resumed past) are set aside
    first rather than rotated over the good ones behind them. A write the disk refuses is a
    SaveError naming the newest complete checkpoint left; the chain is as it was."""
    run_dir = Path(run_dir)
    newest = run_dir / CHECKPOINT_NAME
    tmp = _temp_name(newest)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_synced(obj, tmp)
        for i in range(keep - 1):  # the files the shift below moves down
            p = run_dir / chain_name(i)
            if p.exists() and not looks_complete(p):
                set_aside(p, "it is not a complete checkpoint")
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
    except (OSError, RuntimeError) as e:
        err = _save_error(e, newest, lambda: newest_complete(run_dir))
        if err is None:
            raise
        raise err from e
    finally:
        _remove_temp(tmp)
    _fsync_dir(run_dir)
    return newest


def looks_complete(path: str | Path) -> bool:
    """Whether a checkpoint file is a whole torch archive: its zip central directory, at the
    end, reads (a torn, empty or foreign file's does not). Reads kilobytes, not the file."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def newest_complete(run_dir: str | Path) -> Path | None:
    """The newest file of run_dir's chain that looks complete: what a fault leaves to resume
    from (named in its message)."""
    return next((p for p in existing_chain(run_dir) if looks_complete(p)), None)


def set_aside(path: Path, why: str, log=print) -> Path | None:
    """Rename an unreadable checkpoint out of the chain, to NAME.unreadable-N, keeping its
    bytes for a look; None (and a note) where the directory refuses the rename."""
    n = 1
    while path.with_name(f"{path.name}.unreadable-{n}").exists():
        n += 1
    dest = path.with_name(f"{path.name}.unreadable-{n}")
    try:
        os.replace(path, dest)
    except OSError as e:
        log(f"fastmoco: could not set {path} aside ({e.strerror})", file=sys.stderr, flush=True)
        return None
    log(f"fastmoco: set {path} aside as {dest.name}: {why}", file=sys.stderr, flush=True)
    return dest


def check_writable(run_dir: str | Path, checkpoint_bytes: int, keep: int) -> None:
    """Refuse, before training, a run directory that cannot hold the run's checkpoints.

    A probe file is written, fsynced and removed (a read-only or foreign directory fails
    here rather than at the first save, hours in). A save writes the new file before the
    oldest is removed, so the chain peaks at keep + 1 files; the free space (statvfs) must
    hold (keep + 1) x checkpoint_bytes less the files of the chain already on disk."""
    run_dir = Path(run_dir)
    probe = run_dir / f".fastmoco-probe.tmp{os.getpid()}"  # removed as a stale temp if killed
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        failed = faults.write_failure(e, path=probe, run_dir=run_dir)
        what = failed[0] if failed else f"{e.strerror} ({errno.errorcode.get(e.errno, e.errno)})"
        raise UsageError(
            f"--out {run_dir} cannot hold the run: {what}; make it writable or choose another --out"
        ) from None
    finally:
        _remove_temp(probe)
    free = faults.free_bytes(run_dir)
    if free is None:
        return
    held = sum(
        (run_dir / chain_name(i)).stat().st_size
        for i in range(keep)
        if (run_dir / chain_name(i)).is_file()
    )
    need = max(0, (keep + 1) * checkpoint_bytes - held)
    if need <= free:
        return
    fb = faults.format_bytes
    fewer = ""
    if keep > 1:
        need1 = max(0, 2 * checkpoint_bytes - held)
        fewer = f", lower --keep (--keep 1 needs {fb(need1)})"
    raise UsageError(
        f"--out {run_dir} has {fb(free)} free, but --keep {keep} checkpoints of about "
        f"{fb(checkpoint_bytes)} need {fb(need)} more (a save writes the new file before the "
        f"oldest is removed: {keep + 1} files at its peak); free space{fewer}, or choose "
        "another --out"
    )


def estimate_checkpoint_bytes(state, optimizer: torch.optim.Optimizer | None = None) -> int:
    """About the size of torch.save(state): its tensors' bytes, each storage once, plus the
    per-parameter buffers the optimizer creates at its first step when it has none yet
    (momentum: one per parameter; Adam's betas: two), plus the archive's records."""
    seen, total, count = set(), 0, 0

    def walk(x):
        nonlocal total, count
        if isinstance(x, torch.Tensor):
            count += 1
            key = (x.untyped_storage().data_ptr(), x.device)
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    walk(state)
    if optimizer is not None:
        for group in optimizer.param_groups:
            slots = 2 if "betas" in group else 1 if group.get("momentum", 0) else 0
            for p in group["params"]:
                if p not in optimizer.state or not optimizer.state[p]:
                    total += slots * p.numel() * p.element_size()
    return total + 64 * 1024 + 1024 * count  # zip headers, the pickle, alignment


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


def newest_loadable(
    run_dir: str | Path, trust: bool = False, log=print, set_aside_unreadable: bool = True
) -> tuple[Path, dict]:
    """(path, state) of the newest checkpoint in run_dir that loads; the ones skipped are
    named with their reason. Raises when the chain is empty or every file is unreadable.

    set_aside_unreadable: the files skipped for a file that loads are renamed out of the
    chain (NAME.unreadable-N), so the run's next save does not rotate a torn file over the
    one it resumed from; pass False for a directory this process does not own."""
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
            if set_aside_unreadable:
                for e in errors:
                    set_aside(e.path, f"skipped for {path.name}", log)
        return path, state
    unsafe = next((e for e in errors if e.unsafe), None)
    if unsafe is not None:
        raise unsafe
    raise UsageError(
        f"every checkpoint in {run_dir} is unreadable ({'; '.join(e.reason for e in errors)}); "
        "nothing to resume: start over with --force, or resume from a copy with --resume PATH"
    )


def load_resumable(source: str | Path, trust: bool = False, set_aside_unreadable=True) -> dict:
    """The state to resume from a checkpoint file, or from a run directory's chain (its
    unreadable files set aside unless told not to: see newest_loadable)."""
    source = Path(source)
    if source.is_dir():
        return newest_loadable(source, trust, set_aside_unreadable=set_aside_unreadable)[1]
    return load_checkpoint(source, trust)


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
# resolve_resume's data=: not given, any run of the preset will do (the old behaviour)
ANY_DATA = object()


def data_key(spec) -> str | None:
    """--data as compared between runs: data.sources.resolved (None for the demo set)."""
    from fastmoco.data.sources import resolved  # lazy: PIL and torchvision

    return resolved(spec)


_UNKNOWN = object()


def saved_data(run_dir: Path):
    """The --data a run was trained on, from its config.yaml (yaml.safe_load: choosing a run
    never unpickles a checkpoint); _UNKNOWN without a readable one."""
    try:
        values = yaml.safe_load((Path(run_dir) / CONFIG_NAME).read_text())
    except (OSError, yaml.YAMLError):
        return _UNKNOWN
    return values["data"] if isinstance(values, dict) and "data" in values else _UNKNOWN


def _describe_data(spec) -> str:
    return "the demo set (no --data)" if spec is None else str(spec)


def _describe_saved(saved) -> str:
    return f"no readable {CONFIG_NAME}" if saved is _UNKNOWN else _describe_data(saved)


def _choose_run(runs: list[Path], data, where: str, log) -> Path:
    """The newest of runs (oldest first) trained on data, said with why; refused, listing
    the candidates and their data, when none was."""
    want = data_key(data)
    passed = []
    for d in reversed(runs):
        saved = saved_data(d)
        if saved is not _UNKNOWN and data_key(saved) == want:
            newer = f"; passed over newer runs: {', '.join(passed)}" if passed else ""
            log(
                f"fastmoco: --resume auto: continuing {d}, the newest {where} run trained on "
                f"{_describe_data(data)}{newer}",
                flush=True,
            )
            return d
        passed.append(f"{d.name} ({_describe_saved(saved)})")
    listed = [f"{d}: {_describe_saved(saved_data(d))}" for d in reversed(runs)]
    more = f", and {len(listed) - 4} older" if len(listed) > 4 else ""
    raise UsageError(
        f"--resume auto: no {where} run was trained on {_describe_data(data)} "
        f"({'; '.join(listed[:4])}{more}); continue one of them with --resume DIR, or start a "
        "new run without --resume (or with --out DIR)"
    )


def resolve_resume(
    resume: str, out: str | None, runs_root: str, preset: str, *, data=ANY_DATA, log=print
) -> Path:
    """What --resume PATH|DIR|auto names: a checkpoint file, or a run directory whose chain
    is searched. auto: the run directory given by --out, else the newest runs/<preset>-*
    holding a checkpoint whose saved config (config.yaml) was trained on `data` (compared
    as resolved absolute paths; any when data is ANY_DATA), said in one line. None of
    them on that data is a refusal naming each one's data."""
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
        if not existing_chain(out):
            raise UsageError(
                f"--resume auto: no {CHECKPOINT_NAME} under {out}; start without --resume, "
                "or give --resume PATH"
            )
        return Path(out)
    where = f"{runs_root}/{preset}-*"
    runs = sorted(
        (d for d in Path(runs_root).glob(f"{preset}-*") if existing_chain(d)),
        key=lambda d: max(p.stat().st_mtime for p in existing_chain(d)),
    )
    if not runs:
        raise UsageError(
            f"--resume auto: no {CHECKPOINT_NAME} under {where}; start without --resume, "
            "or give --resume PATH"
        )
    if data is ANY_DATA:
        log(f"fastmoco: --resume auto: continuing {runs[-1]}, the newest {where} run", flush=True)
        return runs[-1]
    return _choose_run(runs, data, where, log)


def prepare_run_dir(
    out: str | None, resume: str | None, name: str, *, data=ANY_DATA
) -> tuple[Path, Path | None]:
    """(run directory, checkpoint file or run directory to resume, or None).

    The directory is --out, else the resumed checkpoint's, else runs/<name>-<date-time>;
    it is created. `--resume auto` with an --out that holds no checkpoint yet starts a new
    run there (the first start of a job script that always says --resume auto); without
    --out it continues the newest runs/<name>-* trained on `data` (resolve_resume).
    """
    if resume == "auto" and out is not None and not existing_chain(out):
        print(
            f"fastmoco: --resume auto: no checkpoint in {out} yet, starting a new run", flush=True
        )
        resume = None
    source = resolve_resume(resume, out, RUNS_ROOT, name, data=data) if resume else None
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


# Descriptors of run.lock held by this process. A forked child (a loader worker) closes its
# copies at once: a flock lasts while any descriptor of it is open, and the lock must end
# with its holder, not with its last worker.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)

# what flock says on a filesystem without it (some Lustre and old NFS mounts)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
# without flock: an empty or unreadable run.lock this old is a writer killed between
# creating it and filling it (which it does at once)
_EMPTY_LOCK_STALE_S = 60.0


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open fd is still the file at path (not one its holder removed since)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fs = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fs.st_dev, fs.st_ino)


class RunLock:
    """run.lock in a run directory: an OS lock (flock) held for the run's life.

    The kernel releases a flock when its holder ends, however it ends (kill -9, the
    out-of-memory killer) and in whatever pid namespace it ran: a requeued job takes over
    its dead predecessor's lock even when both were pid 1 of their containers, where a test
    of the recorded pid would find "pid 1" alive and refuse every requeue. The file records
    the holder (host, pid, start) for the refusal's message only, so an empty or stale file
    that no one holds is simply taken. On NFS the lock server keeps the lock of a host
    that died until its lease ends (about 90 s).

    Only the process that plans the run takes it (the caller of --gpus N, torchrun's rank
    0); release removes the file. Where the filesystem has no flock, the lock falls back to
    an exclusive create and the recorded pid, said in one line.
    """

    def __init__(self):
        self.path: Path | None = None
        self.fd: int | None = None
        self.pid: int | None = None

    def acquire(self, run_dir: str | Path) -> None:
        path = Path(run_dir) / LOCK_NAME
        if fcntl is None:
            return self._acquire_by_pid(path)
        for _ in range(5):
            created = not path.exists()
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise self._cannot_create(path, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refusal(path) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in _NO_FLOCK:
                    raise
                if created:  # the exclusive create below must not find our own empty file
                    path.unlink(missing_ok=True)
                print(
                    f"fastmoco: the filesystem of {path.parent} has no file locks "
                    f"({e.strerror}); run.lock falls back to the owner's pid",
                    flush=True,
                )
                return self._acquire_by_pid(path)
            if _same_file(fd, path):
                self._record(fd)
                self.path, self.fd, self.pid = path, fd, os.getpid()
                _HELD_LOCKS.add(fd)
                return
            os.close(fd)  # its holder removed it between our open and our lock: again
        raise UsageError(f"{path} keeps being replaced by another run; use another --out")

    @staticmethod
    def _owner() -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}

    def _record(self, fd: int) -> None:
        """Name this process in the file (for another run's refusal): the lock itself is
        the flock, so a disk too full for these bytes does not stop the run."""
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self._owner()).encode(), 0)
        except OSError:
            pass

    def _acquire_by_pid(self, path: Path) -> None:
        """Without flock: create the file exclusively; take over a file whose recorded
        owner is a dead process of this host, or that stayed empty past _EMPTY_LOCK_STALE_S."""
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale(path):
                    path.unlink(missing_ok=True)
                    continue
                raise self._refusal(path, f". If that run is dead, delete {path}") from None
            except OSError as e:
                raise self._cannot_create(path, e) from None
            with os.fdopen(fd, "w") as f:
                json.dump(self._owner(), f)
            self.path, self.pid = path, os.getpid()
            return
        raise self._refusal(path)

    def _stale(self, path: Path) -> bool:
        owner = self._read(path)
        if not owner:
            try:
                return time.time() - path.stat().st_mtime > _EMPTY_LOCK_STALE_S
            except FileNotFoundError:
                return True
        return owner.get("host") == socket.gethostname() and not _pid_alive(
            int(owner.get("pid", -1))
        )

    def _refusal(self, path: Path, hint: str = "") -> UsageError:
        owner = self._read(path)
        if owner:
            since = datetime.fromtimestamp(owner.get("since", 0))
            who = (
                f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, since "
                f"{since:%Y-%m-%d %H:%M}"
            )
        else:
            who = "it has not recorded its host and pid yet"
        return UsageError(
            f"{path.parent} is in use by another run ({who}); wait for it to end or use "
            f"another --out{hint}"
        )

    @staticmethod
    def _cannot_create(path: Path, e: OSError) -> UsageError:
        failed = faults.write_failure(e, path=path)
        what = failed[0] if failed else e.strerror
        return UsageError(f"cannot create {path}: {what}; make --out writable or use another")

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            owner = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def release(self) -> None:
        """Remove the file and end the lock (a no-op in a forked child: not its lock)."""
        if self.path is None or self.pid != os.getpid():
            return
        if self.fd is not None:
            try:  # removed while still held: a run that opened it meanwhile sees it gone
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
            _HELD_LOCKS.discard(self.fd)
            os.close(self.fd)
            self.fd = None
        elif self._read(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.path = None
