"""The loaders the trainer uses: two augmented views per image for training, plain for eval.

build_train_loader is the one seam between the trainer and its input pipeline: it picks
the torchvision DataLoader (build_two_view_loader) or the DALI pipeline (dali.py), which
share one interface: set_epoch(epoch, start_step), len() = full batches per epoch per rank,
iteration yielding (view1, view2, target, n_bad), and a `description` the trainer prints.

Order and sharding: sampler.ShardedBatchSampler.
"""

import atexit
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit handler before ours below
import os
import signal
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from fastmoco.data.augment import (
    CROP_SCALE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    two_view_transform,
)
from fastmoco.data.folder import ImageFolderDataset
from fastmoco.data.sampler import ShardedBatchSampler
from fastmoco.data.sources import is_in_memory
from fastmoco.errors import DataError, UsageError

AUTO_WORKERS = -1  # --workers -1: choose from the cores this process may run on


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask (taskset, cgroups' cpusets, a
    scheduler's allocation), which os.cpu_count() ignores."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_plan(workers: int, ranks_here: int = 1) -> tuple[int, int]:
    """(loader worker processes, torch intra-op threads to start with) for one rank on a
    CPU device.

    The cores are shared by every rank on this machine: each rank gets its share, all of
    it for the step's intra-op threads to start with; the trainer then times the step with
    the cores the workers leave and keeps the faster (engine/cpu_threads.py). Ranks are not
    oversubscribed: more runnable step threads than cores makes them preempt each other,
    and an intra-op thread preempted mid-operator stalls its siblings at the operator's
    end. workers=AUTO_WORKERS gives half of a rank's cores to the workers (1 of 2 on a
    2-core machine); a given count is kept.
    """
    cores = max(usable_cores() // max(ranks_here, 1), 1)
    if workers == AUTO_WORKERS:
        workers = cores // 2
    if workers < 0:
        raise UsageError(f"--workers {workers}: give a count >= 0, or -1 to choose from the cores")
    return workers, cores


def collate_two_views(items):
    """[((v1, v2), target, n_bad)] -> (V1 (B,3,H,W), V2, targets int64 (B,), n_bad int64 ())."""
    views, targets, bad = zip(*items, strict=True)
    v1, v2 = zip(*views, strict=True)
    return (
        torch.stack(v1),
        torch.stack(v2),
        torch.tensor(targets, dtype=torch.int64),
        torch.tensor(sum(bad), dtype=torch.int64),
    )


def collate_eval(items):
    """[(image, target, n_bad)] -> (images (B,3,H,W), targets int64 (B,))."""
    images, targets, _ = zip(*items, strict=True)
    return torch.stack(images), torch.tensor(targets, dtype=torch.int64)


def _plain_data_error(e: DataError) -> DataError:
    """A DataError raised in a loader worker comes back with the worker's traceback folded
    into its message; keep only the original message, which is what the user needs."""
    msg = str(e)
    marker = "DataError: "
    if "Original Traceback" in msg and marker in msg:
        msg = msg[msg.rindex(marker) + len(marker) :].strip()
    return DataError(msg)


def _private_generator(seed: int) -> torch.Generator:
    """DataLoader draws a worker base seed per iterator from this generator, by default the
    global one: a draw per epoch would shift the trainer's random stream (shuffle BN, ...)
    between a run and its resumed copy. The base seed is unused anyway (items seed
    themselves)."""
    return torch.Generator().manual_seed(seed)


def leave_signals_to_main(worker_id: int) -> None:
    """Loader workers ignore the stop signals: SIGTERM or SIGINT sent to the whole process
    group (a scheduler, a terminal) must reach the main process, which saves and stops,
    rather than kill the workers first and the run with them."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


@atexit.register
def _kill_loader_workers() -> None:
    """At exit multiprocessing ends its daemonic children (the loader workers) with SIGTERM,
    which they ignore (above), then joins them: the process would never exit while a loader
    is still referenced (persistent workers, a traceback holding an iterator). End them with
    SIGKILL first; atexit runs handlers last-in first-out, so this runs before its handler."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


class TwoViewLoader:
    """Training batches (view1, view2, target, n_bad) over an ImageFolder, for one rank."""

    def __init__(
        self,
        dataset: ImageFolderDataset,
        batch_size: int,
        workers: int,
        seed: int,
        rank: int,
        world_size: int,
        pin_memory: bool,
    ):
        self.dataset = dataset
        self.description = f"torch DataLoader ({workers} worker{'' if workers == 1 else 's'})"
        self.batch_sampler = ShardedBatchSampler(len(dataset), batch_size, seed, rank, world_size)
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.batch_sampler,
            num_workers=workers,
            collate_fn=collate_two_views,
            pin_memory=pin_memory,
            persistent_workers=workers > 0,
            generator=_private_generator(seed),
            worker_init_fn=leave_signals_to_main,
        )

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    @property
    def samples(self) -> list[tuple[object, int]]:
        return self.dataset.samples

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select epoch's order; the next pass starts at its batch start_step."""
        self.dataset.set_epoch(epoch)
        self.batch_sampler.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        """Full batches per epoch per rank (whatever start_step is)."""
        return self.batch_sampler.batches_per_epoch()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        try:
            yield from self.loader
        except DataError as e:
            raise _plain_data_error(e) from None


def build_two_view_loader(
    root,
    *,
    recipe: str,
    crop_size: int,
    batch_size: int,
    workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    skip_bad_images: bool = False,
    pin_memory: bool | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_scale: tuple[float, float] = CROP_SCALE,
) -> TwoViewLoader:
    """MoCo training batches for rank `rank` of `world_size`; batch_size is per rank."""
    transform = two_view_transform(recipe, crop_size, mean, std, crop_scale)
    dataset = ImageFolderDataset(root, transform, skip_bad_images=skip_bad_images, seed=seed)
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be at least 1")
    if batch_size * world_size > len(dataset):
        per = f" x {world_size} ranks" if world_size > 1 else ""
        raise DataError(
            f"batch size {batch_size}{per} larger than the dataset ({len(dataset)} images "
            f"under {root}): lower --batch-size"
        )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return TwoViewLoader(dataset, batch_size, workers, seed, rank, world_size, pin_memory)


LOADERS = ("auto", "dali", "torch")


def build_train_loader(
    root,
    *,
    loader: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    **kwargs,
):
    """The training loader for `device`: DALI or the torchvision DataLoader.

    loader="auto" takes DALI when the device is CUDA and DALI is installed, else the
    DataLoader; "dali" forces DALI (its CPU mode on a CPU device), "torch" the DataLoader.
    kwargs are build_two_view_loader's. DALI hands over views already on the device in
    `dtype` and, with channels_last, in NHWC memory; the DataLoader gives float32 CPU
    tensors that the trainer moves. The loader's `description` says which one runs and why.
    """
    from fastmoco.data import dali

    if loader not in LOADERS:
        raise UsageError(f"--loader {loader!r}: choose one of {', '.join(LOADERS)}")
    device = torch.device(device)
    why = ""
    missing = dali.unsupported(kwargs["recipe"])
    if loader == "dali" and missing:
        raise UsageError(
            f"--loader dali does not implement {', '.join(missing)} of recipe "
            f"{kwargs['recipe']!r}: use --loader torch (or auto)"
        )
    if loader == "auto":
        if is_in_memory(root):
            loader, why = "torch", "auto: DALI reads files; this data set is held in memory"
        elif missing:
            loader, why = "torch", f"auto: DALI does not implement {', '.join(missing)}"
        elif device.type != "cuda":
            loader, why = "torch", "auto: DALI is used on CUDA; --loader dali for its CPU mode"
        elif not dali.dali_available():
            loader, why = "torch", "auto: DALI not installed; pip install nvidia-dali-cuda130"
        else:
            loader = "dali"
    if loader == "torch":
        built = build_two_view_loader(root, **kwargs)
    else:
        dali.require_dali()
        built = dali.DaliTwoViewLoader(
            root,
            recipe=kwargs["recipe"],
            crop_size=kwargs["crop_size"],
            batch_size=kwargs["batch_size"],
            seed=kwargs["seed"],
            rank=kwargs.get("rank", 0),
            world_size=kwargs.get("world_size", 1),
            device=device,
            num_threads=max(kwargs.get("workers", 4), 1),  # DALI's own threads, >= 1
            skip_bad_images=kwargs.get("skip_bad_images", False),
            mean=kwargs.get("mean", IMAGENET_MEAN),
            std=kwargs.get("std", IMAGENET_STD),
            crop_scale=kwargs.get("crop_scale", CROP_SCALE),
            dtype=dtype,
            layout="NHWC" if channels_last else "NCHW",
        )
    if why:
        built.description += f" [{why}]"
    return built


def build_eval_loader(
    root,
    *,
    crop_size: int,
    batch_size: int,
    workers: int,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    rank: int = 0,
    world_size: int = 1,
    indices: Sequence[int] | None = None,
    skip_bad_images: bool = False,
) -> DataLoader:
    """(images, targets) in file order, every image once (of `indices` when given); rank r
    gets images r, r + W, ...

    No padding and no drop_last, so the kNN bank and queries are exactly the split (ranks may
    differ by one image in count).
    """
    transform = eval_transform(crop_size, resize_size, mean, std)
    # skip_bad_images: an unreadable file is replaced by its readable successor
    dataset = ImageFolderDataset(root, transform, skip_bad_images=skip_bad_images)
    order = range(len(dataset)) if indices is None else indices
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order[rank::world_size],
        num_workers=workers,
        collate_fn=collate_eval,
        pin_memory=torch.cuda.is_available(),
        generator=_private_generator(0),
        worker_init_fn=leave_signals_to_main,
    )
