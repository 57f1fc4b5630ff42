"""Collectives the MoCo step needs, as no-op passthroughs when not distributed.

None is differentiable: they move keys and key images, which never need a
gradient (the key encoder is updated by momentum, not by backprop).
"""

import torch
import torch.distributed as dist

from fastmoco.ops.enqueue import enqueue_


def world() -> tuple[int, int]:
    """(rank, world_size), (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# torch 2.14 deprecates all_gather_into_tensor (a FutureWarning on every rank) for
# all_gather_single, which torch 2.11 does not have yet: the same collective, either name.
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank along dim 0, rank order, into one buffer.

    Every rank must pass the same shape (the trainer's loader drops the last partial batch
    for that reason).
    """
    _, world_size = world()
    if world_size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _gather_into(out, x)
    return out


@torch.no_grad()
def gather_and_enqueue_(
    queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """MoCo's dequeue-and-enqueue across ranks: all_gather the keys (B, C) of every rank into
    one (world_size * B, C) buffer, rank order, and enqueue them all on every rank, so that
    all queues and pointers stay identical without broadcasting the queue.
    Every rank must pass the same B; world_size * B <= K.
    """
    return enqueue_(queue, ptr, all_gather_cat(keys.detach()), backend=backend)
