"""What rank 0 decides before training: the checked configuration, the run directory, the
checkpoint to resume from, the data splits. engine/trainer.py then only trains.

    cfg -> check_config                 every field, the registries' names, the method's rules
        -> run directory and resume     (nothing is created yet)
        -> the checkpoint's config      resume.resume_config: flags over the saved recipe
        -> the data                     splits, sizes, the kNN cadence, the method's data checks
        -> the directory is made, locked, cleared or trimmed, config.yaml written

Nothing is written before every check has passed, so a refused start leaves no directory
behind. The checks that name a registry live in that registry (models.METHODS and each
method's check_config / check_data, data.recipes.RECIPES, optim.OPTIMIZERS); CHOICES lists
them for the CLI's --help.
"""

import dataclasses
from datetime import datetime
from pathlib import Path

import torch

from fastmoco.config import TrainConfig, flag
from fastmoco.config_io import write_config
from fastmoco.data import demo_dataset
from fastmoco.data.recipes import RECIPES
from fastmoco.data.sources import bank_is_labelled, open_source, resolved, splits
from fastmoco.errors import UsageError
from fastmoco.models import ALL_ARCHS, METHODS, build_model, method_class

from . import checkpoint as ckpt
from .knn import knn_cadence
from .optim import OPTIMIZERS
from .resume import resume_config, truncate_records

# Fields whose choices a registry owns: the CLI's choices, the planner's check.
CHOICES = {"method": METHODS, "arch": ALL_ARCHS, "recipe": RECIPES, "optimizer": OPTIMIZERS}


def check_config(cfg: TrainConfig) -> None:
    """Errors a user can fix, raised before any process or file is made."""
    cfg.check()
    for name, registry in CHOICES.items():
        value = getattr(cfg, name)
        if value not in registry:
            raise UsageError(f"{flag(name)} {value!r}: choose one of {', '.join(registry)}")
    method_class(cfg.method).check_config(cfg)


def check_device(cfg: TrainConfig, device: str) -> None:
    """The choices that need CUDA, against the device this run got."""
    if cfg.amp and cfg.amp_dtype == "fp16" and device != "cuda":
        raise UsageError("--amp-dtype fp16 needs CUDA (GradScaler); use bf16 on the CPU")
    if cfg.cuda_graph == "on" and device != "cuda":
        raise UsageError("--cuda-graph on needs CUDA (this run is on the CPU); use auto or off")
    if cfg.cuda_graph == "on" and cfg.amp and cfg.amp_dtype == "fp16":
        raise UsageError(
            "--cuda-graph on with --amp-dtype fp16: the GradScaler decides on the host whether "
            "to skip a step, so that step is not captured; use --amp-dtype bf16 or --cuda-graph off"
        )


def data_roots(cfg: TrainConfig) -> tuple[str, str | None]:
    """(train split, val split or None) of --data (data/sources.py: a folder with or without
    train/ and val/, an image list, cifar10:DIR, ...). Without --data, the embedded demo set
    (made once)."""
    if cfg.data is None:
        root = demo_dataset(seed=cfg.demo_seed, progress=cfg.progress)
        return str(root / "train"), str(root / "val")
    return splits(cfg.data)


@dataclasses.dataclass
class RunPlan:
    """What rank 0 decided before training, sent to every rank."""

    cfg: TrainConfig
    train_root: str
    val_root: str | None
    out: str
    state: dict | None  # the checkpoint to resume, loaded
    done: str | None = None  # why there is nothing to train (the run is finished)


def run_directory(cfg: TrainConfig, explicit=None) -> tuple[Path, Path | None]:
    """(run directory, checkpoint file or run directory to resume, or None), nothing made.
    The directory is --out, else the resumed checkpoint's, else runs/<preset>-<date-time>.
    `--resume auto` with an --out that holds no checkpoint yet starts a new run there (the
    first start of a job script that always says --resume auto)."""
    resume = cfg.resume
    if resume == "auto" and cfg.out is not None and not ckpt.existing_chain(cfg.out):
        print(f"fastmoco: --resume auto: no checkpoint in {cfg.out} yet, starting a new run",
              flush=True)  # fmt: skip
        resume = None
    source = None
    if resume:
        given = explicit is None or "data" in explicit
        data = resolved(cfg.data) if given else ckpt.ANY_DATA
        source = ckpt.resolve_resume(resume, cfg.out, ckpt.RUNS_ROOT, cfg.preset, data=data)
    if cfg.out is not None:
        return Path(cfg.out), source
    if source is not None:
        return (source if source.is_dir() else source.parent), source
    return Path(ckpt.RUNS_ROOT) / f"{cfg.preset}-{datetime.now():%Y%m%d-%H%M%S}", None


def _load_resumed(source: Path, trust: bool, out: Path) -> tuple[Path, dict]:
    """(the file, its state); unreadable files of the run's own chain are set aside (never
    those of a directory that is only read from)."""
    if source.is_dir():
        own = source.resolve() == out.resolve()
        return ckpt.newest_loadable(source, trust, set_aside_unreadable=own)
    return source, ckpt.load_checkpoint(source, trust)


def checkpoint_bytes(cfg: TrainConfig, num_samples: int) -> int:
    """About the size of the run's checkpoint, known before any weight exists: the method
    built on the meta device (no memory, no arithmetic), every tensor of its state, the
    optimizer's per-parameter buffers (momentum: one; AdamW: two), and the archive's own
    records."""
    with torch.device("meta"):
        model = build_model(cfg, num_samples=num_samples)
    tensors = list(model.state_dict().values())
    trained = sum(p.numel() * p.element_size() for p in model.encoder_q.parameters()
                  if p.requires_grad)  # fmt: skip
    slots = 2 if cfg.optimizer == "adamw" else (1 if cfg.momentum else 0)
    held = sum(t.numel() * t.element_size() for t in tensors)
    return held + slots * trained + 64 * 1024 + 1024 * len(tensors)


def plan_run(cfg: TrainConfig, explicit, device: str, lock: ckpt.RunLock) -> RunPlan:
    """On the caller or torchrun's rank 0 only: the checks of config and data, the run
    directory (locked), the checkpoint to resume and the configuration it implies."""
    check_config(cfg)
    check_device(cfg, device)
    out, source = run_directory(cfg, explicit)
    if out.is_dir():  # someone may be writing there: own it before reading or judging it
        lock.acquire(out)
    state = None
    if source is None:
        ckpt.check_overwrite(out, cfg.force)
    else:
        path, state = _load_resumed(source, cfg.trust_checkpoint, out)
        saved = state["config"]
        cfg = resume_config(cfg, saved, explicit).replace(out=str(out))
        check_config(cfg)
        check_device(cfg, device)
        print(
            f"resume: {path} (saved after step {state['global_step']}): continuing at epoch "
            f"{state['epoch'] + 1}, step {state['step_in_epoch'] + 1}",
            flush=True,
        )
        if state["epoch"] >= cfg.epochs:
            return RunPlan(cfg, "", None, str(out), state, done=_nothing_to_train(state, cfg, out))
    cfg = cfg.replace(data=resolved(cfg.data))
    train_root, val_root, cfg, n_images = _plan_data(cfg)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:  # a read-only, foreign or full --out fails here, not at the first save hours in
        newest = ckpt.newest_complete(out)
        size = max(checkpoint_bytes(cfg, n_images), newest.stat().st_size if newest else 0)
        ckpt.check_writable(out, size, cfg.keep)
    except UsageError:
        if created:
            out.rmdir()  # nothing of ours left behind
        raise
    if lock.path is None:
        lock.acquire(out)
    ckpt.remove_stale_temps(out)
    (out / "results.pt").unlink(missing_ok=True)  # left by older versions
    if state is None:
        ckpt.clear_run_outputs(out)  # only a --force'd or never-saved run's files are left
    else:
        truncate_records(out / "metrics.jsonl", state["global_step"])
    write_config(cfg, out)  # the recipe, for --config and for the record
    return RunPlan(cfg, str(train_root), str(val_root) if val_root else None, str(out), state)


def _nothing_to_train(state: dict, cfg: TrainConfig, out: Path) -> str:
    epochs = state["epoch"]
    more = max(epochs, cfg.epochs) + 1
    return (
        f"nothing to train: the run in {out} has done {epochs} epochs and --epochs is "
        f"{cfg.epochs}; to train more, resume with a larger --epochs "
        f"(e.g. fastmoco train --resume {out} --epochs {more}). Its files are unchanged"
    )


def _plan_data(cfg: TrainConfig) -> tuple[str, str | None, TrainConfig, int]:
    """(train split, val split or None for no kNN monitor, cfg with the kNN cadence, the
    training images): the data's checks, said before anything starts."""
    train_root, val_root = data_roots(cfg)
    source = open_source(train_root)  # fails early on a missing/empty dir
    samples = source.samples
    if source.missing:  # an image list's paths, every one checked before the first step
        shown = ", ".join(source.missing[:3]) + (", ..." if len(source.missing) > 3 else "")
        if not cfg.skip_bad_images:
            raise UsageError(
                f"{len(source.missing)} of the {len(samples)} images of {train_root} do not "
                f"exist ({shown}): fix the list, or pass --skip-bad-images to skip them"
            )
        print(f"--skip-bad-images: {len(source.missing)} listed images do not exist and will "
              f"be skipped ({shown})", flush=True)  # fmt: skip
    if cfg.knn_every is None:  # automatic cadence: the monitor under 5% of the image reads
        n_val = len(open_source(val_root).samples) if val_root else 0
        n_bank = min(len(samples), cfg.knn_bank) if cfg.knn_bank > 0 else len(samples)
        cfg = cfg.replace(knn_every=knn_cadence(len(samples), n_bank, n_val))
    if cfg.knn_every > 0 and val_root is None:
        print(
            f"kNN monitor off: --data {cfg.data} has no val/ split; the monitor needs "
            "DIR/train/<class>/ and DIR/val/<class>/ folders",
            flush=True,
        )
    elif cfg.knn_every > 0 and not bank_is_labelled(source):
        print(
            f"kNN monitor off: {train_root} is unlabelled (no class subdirectories); it needs "
            "train/<class>/ and val/<class>/ folders",
            flush=True,
        )
        val_root = None
    if cfg.batch_size > len(samples):
        raise UsageError(
            f"--batch-size {cfg.batch_size} is larger than the dataset ({len(samples)} images "
            f"under {train_root}); lower --batch-size"
        )
    method_class(cfg.method).check_data(cfg, len(samples))
    return train_root, val_root, cfg, len(samples)
