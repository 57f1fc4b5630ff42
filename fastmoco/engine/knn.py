"""Weighted kNN monitor (Wu et al. 2018, InstDisc), as used by MoCo's CIFAR demo: the
trainer's monitor, and `fastmoco knn`'s (eval/knn_command.py).

Features are L2-normalised backbone outputs. Each val sample's k nearest train samples by
cosine similarity vote for their class with weight exp(sim / t); the top vote is the
prediction. k=200, t=0.1 are the InstDisc values.

Under torch.distributed each rank encodes its shard of both splits and the features are
all-gathered, so every rank computes the same accuracy and none idles at a barrier for
the length of a whole extraction (which at ImageNet size can outlast NCCL's timeout).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastmoco.data import build_eval_loader
from fastmoco.data.sources import bank_split
from fastmoco.ops.distributed import all_gather_cat, world

# A split whose eval tensors fit in this many bytes is decoded once and kept in memory: the
# eval transform is deterministic, so every kNN pass would decode the same tensors again
# (the demo's 2,000 images at 32 px are 25 MB; ImageNet's are 30 GB and stream as before).
CACHE_BYTES = 256 * 2**20


class CachedBatches(list):
    """A loader's (images, targets) batches, read once; .dataset as the loader's."""

    def __init__(self, loader):
        super().__init__(loader)
        self.dataset = loader.dataset


# The monitor's share of training's image reads that the automatic cadence keeps below.
KNN_SHARE = 0.05


def knn_cadence(n_train: int, n_bank: int, n_val: int) -> int:
    """Epochs between kNN runs so that the monitor reads at most KNN_SHARE as many images as
    training does (bank + val per run against n_train per epoch). Image reads bound the cost
    from above: training also runs 3 of its 4 forward-equivalents per image (backward, the key
    encoder) that the monitor does not. ImageNet (bank 100k of 1.28M, 50k val): every 3
    epochs, 3.9 %."""
    return max(1, math.ceil((n_bank + n_val) / (KNN_SHARE * n_train)))


def bank_indices(n: int, bank_size: int, seed: int = 0) -> list[int] | None:
    """A fixed random subset of bank_size of range(n), sorted; None (all) when it fits."""
    if bank_size <= 0 or n <= bank_size:
        return None
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:bank_size].tolist())


def build_knn_loaders(
    train_root,
    val_root,
    *,
    crop_size,
    mean,
    std,
    batch_size=256,
    workers=4,
    bank_size=0,
    seed=0,
    skip_bad_images=False,
    cache=False,
):
    """(bank loader over train, query loader over val), this rank's shard of each. The bank
    is the labelled part of the train split (sources.bank_split: all of it, but STL-10's
    train split without its unlabeled images), at most bank_size of its images (a subset
    fixed by seed; 0: all). skip_bad_images: as in training, an unreadable image is
    replaced by its readable successor.

    Below 64 px there is no resize margin to spare (the CIFAR demo's convention): the whole
    image is resized to the crop. With cache (the trainer's monitor, which passes over the
    splits again and again), a split small enough (CACHE_BYTES) comes back as a list of its
    (images, targets) batches, read once here, so later passes cost the forward pass only.
    """
    rank, world_size = world()
    ev = dict(
        crop_size=crop_size,
        batch_size=batch_size,
        workers=workers,
        mean=mean,
        std=std,
        rank=rank,
        world_size=world_size,
        skip_bad_images=skip_bad_images,
    )
    if crop_size < 64:
        ev["resize_size"] = crop_size
    bank = build_eval_loader(bank_split(train_root), **ev)
    subset = bank_indices(len(bank.dataset), bank_size, seed)
    if subset is not None:
        bank = build_eval_loader(bank_split(train_root), indices=subset, **ev)
    nbytes = 4 * 3 * crop_size**2
    return tuple(
        CachedBatches(loader) if cache and len(loader.sampler) * nbytes <= CACHE_BYTES else loader
        for loader in (bank, build_eval_loader(val_root, **ev))
    )


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x along dim 0 when the ranks hold different row counts."""
    _, world_size = world()
    if world_size == 1:
        return x
    counts = all_gather_cat(torch.tensor([x.shape[0]], device=x.device)).tolist()
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    rows = all_gather_cat(padded).view(world_size, max(counts), *x.shape[1:])
    return torch.cat([rows[r, :n] for r, n in enumerate(counts)])


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader,
    device,
    *,
    channels_last=False,
    progress=False,
    desc="features",
    gather=True,
    dtype=torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features N x D unit rows in dtype, labels N), backbone in eval mode: every rank's
    shard (gather) or this rank's only."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    mf = torch.channels_last if channels_last else torch.contiguous_format
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x, y = batch[0], batch[1]
        x = x.to(device, non_blocking=True, memory_format=mf)
        feats.append(F.normalize(backbone(x).float(), dim=1).to(dtype))
        labels.append(y.to(device))
    backbone.train(was_training)
    feats, labels = torch.cat(feats), torch.cat(labels)
    return (gather_rows(feats), gather_rows(labels)) if gather else (feats, labels)


def _top_k(query, bank, bank_labels, k, bank_chunk=65536):
    """(similarities, labels) of each query row's k nearest bank rows (k <= len(bank)); the
    bank may be fp16: it is read in fp32 chunks, so the product is fp32 throughout."""
    best_sim = best_lab = None
    for start in range(0, bank.shape[0], bank_chunk):
        part = bank[start : start + bank_chunk].float()
        sim = query.float() @ part.T
        labels = bank_labels[start : start + bank_chunk].expand(query.shape[0], -1)
        if best_sim is not None:
            sim, labels = torch.cat([best_sim, sim], 1), torch.cat([best_lab, labels], 1)
        best_sim, idx = sim.topk(min(k, sim.shape[1]), dim=1)
        best_lab = labels.gather(1, idx)
    return best_sim, best_lab


def _votes(top_sim, top_lab, num_classes, t):
    votes = torch.zeros(top_sim.shape[0], num_classes, device=top_sim.device)
    votes.scatter_add_(1, top_lab, (top_sim / t).exp())
    return votes.argmax(1)


@torch.no_grad()
def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted class per query row (unit features); chunked so memory is chunk x len(bank)."""
    k = min(k, bank.shape[0])
    preds = []
    for qc in query.split(chunk):
        preds.append(_votes(*_top_k(qc, bank, bank_labels, k), num_classes, t))
    return torch.cat(preds)


@torch.no_grad()
def knn_predict_sharded(
    query: torch.Tensor,
    bank_shard: torch.Tensor,
    shard_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """knn_predict with the bank split across ranks (each holds its shard; query is the same
    on all): every rank finds its shard's k nearest, the candidates are all-gathered and
    the k best of them vote. No rank ever holds the whole bank."""
    _, world_size = world()
    n = shard_labels.new_tensor([bank_shard.shape[0]])
    k = min(k, int(all_gather_cat(n).sum()))
    preds = []
    for qc in query.split(chunk):
        sim, lab = _top_k(qc, bank_shard, shard_labels, k)
        if sim.shape[1] < k:  # a shard smaller than k: pad with never-chosen candidates
            pad = k - sim.shape[1]
            sim = torch.cat([sim, sim.new_full((sim.shape[0], pad), -float("inf"))], 1)
            lab = torch.cat([lab, lab.new_zeros((lab.shape[0], pad))], 1)
        if world_size > 1:  # (W * Q) x k -> Q x (W * k)
            sim = all_gather_cat(sim).view(world_size, *sim.shape).transpose(0, 1).flatten(1)
            lab = all_gather_cat(lab).view(world_size, *lab.shape).transpose(0, 1).flatten(1)
        top_sim, idx = sim.topk(k, dim=1)
        preds.append(_votes(top_sim, lab.gather(1, idx), num_classes, t))
    return torch.cat(preds)


@torch.no_grad()
def knn_accuracy(
    backbone: nn.Module,
    train_loader,
    val_loader,
    device,
    *,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    channels_last: bool = False,
    progress: bool = False,
) -> float:
    """Top-1 accuracy in percent of the weighted kNN classifier on the val split. The bank
    stays sharded across ranks, in fp16 on CUDA (ImageNet's 1.28M x 2048 would be 10 GB per
    rank gathered in fp32); the queries are gathered."""
    bank, bank_labels = extract_features(
        backbone,
        train_loader,
        device,
        channels_last=channels_last,
        progress=progress,
        desc="kNN bank",
        gather=False,
        dtype=torch.float16 if torch.device(device).type == "cuda" else torch.float32,
    )
    query, labels = extract_features(
        backbone,
        val_loader,
        device,
        channels_last=channels_last,
        progress=progress,
        desc="kNN val",
    )
    pred = knn_predict_sharded(query, bank, bank_labels, num_classes, k, t)
    return 100.0 * (pred == labels).float().mean().item()
