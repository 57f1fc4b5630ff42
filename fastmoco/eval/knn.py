"""Weighted kNN monitor (Wu et al. 2018, InstDisc), as used by MoCo's CIFAR demo.

Features are L2-normalised backbone outputs. Each val sample's k nearest train samples by
cosine similarity vote for their class with weight exp(sim / t); the top vote is the
prediction. k=200, t=0.1 are the InstDisc values.

Under torch.distributed each rank encodes its shard of both splits and the features are
all-gathered, so every rank computes the same accuracy and none idles at a barrier for
the length of a whole extraction (which at ImageNet size can outlast NCCL's timeout).
"""

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastmoco.data import build_eval_loader
from fastmoco.data.sources import bank_split
from fastmoco.ops.distributed import all_gather_cat, world


def build_knn_loaders(train_root, val_root, *, crop_size, mean, std, batch_size=256, workers=4):
    """(bank loader over train, query loader over val), this rank's shard of each. The bank
    is the labelled part of the train split (sources.bank_split: all of it, but STL-10's
    train split without its unlabeled images).

    Below 64 px there is no resize margin to spare (the CIFAR demo's convention): the whole
    image is resized to the crop.
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
    )
    if crop_size < 64:
        ev["resize_size"] = crop_size
    return build_eval_loader(bank_split(train_root), **ev), build_eval_loader(val_root, **ev)


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
    backbone: nn.Module, loader, device, *, channels_last=False, progress=False, desc="features"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features N x D unit rows, labels N) of every rank's shard, backbone in eval mode."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    mf = torch.channels_last if channels_last else torch.contiguous_format
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x, y = batch[0], batch[1]
        x = x.to(device, non_blocking=True, memory_format=mf)
        feats.append(F.normalize(backbone(x).float(), dim=1))
        labels.append(y.to(device))
    backbone.train(was_training)
    return gather_rows(torch.cat(feats)), gather_rows(torch.cat(labels))


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
        sim = qc @ bank.T  # chunk x M
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(qc.shape[0], num_classes, device=qc.device, dtype=sim.dtype)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sim / t).exp())
        preds.append(votes.argmax(1))
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
    """Top-1 accuracy in percent of the weighted kNN classifier on the val split."""
    bank, bank_labels = extract_features(
        backbone,
        train_loader,
        device,
        channels_last=channels_last,
        progress=progress,
        desc="kNN bank",
    )
    query, labels = extract_features(
        backbone,
        val_loader,
        device,
        channels_last=channels_last,
        progress=progress,
        desc="kNN val",
    )
    pred = knn_predict(query, bank, bank_labels, num_classes, k, t)
    return 100.0 * (pred == labels).float().mean().item()
