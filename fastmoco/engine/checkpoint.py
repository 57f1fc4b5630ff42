"""Checkpoints: atomic writes, RNG states, and finding the one to resume from."""

import os
import random
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from fastmoco.errors import UsageError

CHECKPOINT_NAME = "checkpoint.pt"


def save_atomic(obj, path: str | Path) -> Path:
    """torch.save to a temp file beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def rng_states(*generators: torch.Generator) -> dict:
    """Every generator in play: python, numpy, torch CPU, every CUDA device, and extras."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }


def set_rng_states(states: dict, *generators: torch.Generator) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    for g, s in zip(generators, states["generators"], strict=True):
        g.set_state(s)


def resolve_resume(resume: str, out: str | None, runs_root: str, preset: str) -> Path:
    """The checkpoint file for --resume PATH|DIR|auto.

    auto: the run directory given by --out, else the newest runs/<preset>-* holding a
    checkpoint.
    """
    if resume != "auto":
        p = Path(resume)
        if p.is_dir():
            p = p / CHECKPOINT_NAME
        if not p.is_file():
            raise UsageError(f"--resume {resume}: no checkpoint file there ({p} does not exist)")
        return p
    if out is not None:
        candidates = [Path(out) / CHECKPOINT_NAME]
    else:
        candidates = sorted(
            Path(runs_root).glob(f"{preset}-*/{CHECKPOINT_NAME}"), key=lambda p: p.stat().st_mtime
        )
    found = [p for p in candidates if p.is_file()]
    if not found:
        where = out if out is not None else f"{runs_root}/{preset}-*"
        raise UsageError(
            f"--resume auto: no {CHECKPOINT_NAME} under {where}; start without --resume, "
            "or give --resume PATH"
        )
    return found[-1]


RUNS_ROOT = "runs"


def prepare_run_dir(out: str | None, resume: str | None, name: str) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume or None) for a run called `name`.

    The directory is --out, else the resumed checkpoint's, else runs/<name>-<date-time>;
    it is created, and a results.pt left by an earlier run in it is removed (the caller
    reads the new one once its ranks are done).
    """
    resume_path = resolve_resume(resume, out, RUNS_ROOT, name) if resume else None
    if out is not None:
        run_dir = Path(out)
    elif resume_path is not None:
        run_dir = resume_path.parent
    else:
        run_dir = Path(RUNS_ROOT) / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.pt").unlink(missing_ok=True)
    return run_dir, resume_path


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise UsageError(f"cannot read checkpoint {path}: {e}") from e
