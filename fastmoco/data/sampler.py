"""The order of training images, shared by the torch loader (loader.py) and DALI (dali.py).

Order: each epoch shuffles all images with a generator seeded by seed + epoch (as
DistributedSampler does), keeps the first world_size * B * (M // (world_size * B)) of them
and deals them round-robin to the ranks, so every rank gets the same number of full
batches and no image appears twice in an epoch.
"""

from collections.abc import Iterator

import torch

from fastmoco.errors import UsageError


class ShardedBatchSampler:
    """Batches of (epoch, index) pairs for one rank; see the module docstring for the order.

    set_epoch(epoch, start_step) makes the next pass start at batch start_step of that
    epoch's order, without touching the skipped images: exact mid-epoch resume for free.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} outside 0..{world_size - 1}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if start_step < 0:
            raise UsageError(f"start_step {start_step} must be >= 0")
        self.epoch, self.start_step = epoch, start_step

    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.world_size * self.batch_size)

    def epoch_indices(self) -> list[int]:
        """This rank's indices for the whole epoch, in order (start_step ignored)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)
        used = self.batches_per_epoch() * self.batch_size * self.world_size
        return order[:used][self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start_step, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        idx, B = self.epoch_indices(), self.batch_size
        for step in range(self.start_step, self.batches_per_epoch()):
            yield [(self.epoch, i) for i in idx[step * B : (step + 1) * B]]
