"""What a resumed run continues with: the checkpoint's configuration, and its records.

A resumed run starts from the configuration saved in the checkpoint and applies only what
was given on this command line: a change the saved state cannot follow (another
architecture, feature size, queue length, optimizer or global batch) is refused in one
line, one it can (epochs, lr, data path, checkpoint policy, ...) is printed as a notice.
What is not given is the checkpoint's, down to the device and the number of workers.
"""

import dataclasses
import json
from pathlib import Path

from fastmoco.config import COMMAND_LINE_ONLY, TrainConfig, flag
from fastmoco.errors import UsageError

# What this invocation is asked to do with the run: always from the current command line.
INVOCATION_FIELDS = frozenset(COMMAND_LINE_ONLY)
# How it runs rather than what it trains: changed without a notice.
QUIET_FIELDS = frozenset({"device", "gpus", "workers", "loader", "progress", "log_every"})
# The saved state has these shapes or meanings: a resumed run cannot change them.
# batch_size: the position in the epoch is a count of global batches.
FIXED_FIELDS = (
    "method",
    "arch",
    "small_images",
    "dim",
    "mlp_hidden",
    "queue_size",
    "optimizer",
    "batch_size",
    "frozen_patch_proj",
    "zero_init_residual",
)


def resume_config(
    given: TrainConfig, saved: dict, explicit: set[str] | None, log=print
) -> TrainConfig:
    """The checkpoint's config with the explicitly given fields (all of `given`'s when
    explicit is None, as for the Python API) and the invocation's fields applied."""
    base = TrainConfig.from_dict(saved)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    take = (names if explicit is None else set(explicit) & names) | INVOCATION_FIELDS
    cfg = dataclasses.replace(base, **{k: getattr(given, k) for k in take})
    changed = {
        k: (getattr(base, k), getattr(cfg, k))
        for k in sorted(names - INVOCATION_FIELDS)
        if getattr(base, k) != getattr(cfg, k)
    }
    fixed = [k for k in FIXED_FIELDS if k in changed]
    if fixed:
        k = fixed[0]
        old, new = changed[k]
        raise UsageError(
            f"--resume: {flag(k)} {new} differs from the checkpoint's {old}, and the saved "
            f"state cannot follow that change; drop {flag(k)} to resume, or start a new run "
            "with another --out"
        )
    for k, (old, new) in changed.items():
        if k not in QUIET_FIELDS:
            log(f"resume: {flag(k)} {old} -> {new} (from this command line)", flush=True)
    return cfg


def truncate_records(path: Path, last_step: int) -> int:
    """Drop the metrics.jsonl records written after the checkpoint being resumed (they
    would be written again); returns how many were dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except ValueError:  # a line cut short by a kill
            dropped += 1
            continue
        if step is not None and step > last_step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        path.write_text("".join(line + "\n" for line in keep))
    return dropped
