"""The kNN monitor at scale: an automatic cadence under 5% of training's image reads, a
fixed random subset as the bank, the bank sharded across ranks in fp16."""

import torch
import torch.nn.functional as F

from fastmoco.config import TrainConfig
from fastmoco.engine.knn import (
    KNN_SHARE,
    _top_k,
    bank_indices,
    build_knn_loaders,
    knn_cadence,
    knn_predict,
    knn_predict_sharded,
)


def test_default_cadence_keeps_the_monitor_under_five_percent():
    cfg = TrainConfig()
    assert cfg.knn_every is None and cfg.knn_bank == 100_000
    n_train, n_val = 1_281_167, 50_000  # ImageNet
    every = knn_cadence(n_train, cfg.knn_bank, n_val)
    assert every == 3
    assert (cfg.knn_bank + n_val) / (every * n_train) < KNN_SHARE
    assert (cfg.knn_bank + n_val) / ((every - 1) * n_train) > KNN_SHARE  # the fewest epochs
    assert knn_cadence(100, 100, 0) == 20  # a bank as large as the set: every 20 epochs


def test_bank_subset_is_fixed_and_sized(tiny_data):
    assert bank_indices(36, 0) is None and bank_indices(36, 36) is None
    sub = bank_indices(36, 10, seed=3)
    assert len(sub) == 10 == len(set(sub)) and sub == sorted(sub) == bank_indices(36, 10, seed=3)
    kw = dict(crop_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=4, workers=0)
    bank, val = build_knn_loaders(tiny_data / "train", tiny_data / "val", bank_size=10, **kw)
    assert sum(len(y) for _, y in bank) == 10 and sum(len(y) for _, y in val) == 12
    whole, _ = build_knn_loaders(tiny_data / "train", tiny_data / "val", **kw)
    assert sum(len(y) for _, y in whole) == 36


def _clusters(n, d=32, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, d, generator=g), dim=1)
    labels = torch.arange(n) % classes
    x = F.normalize(centres[labels] + 0.3 * torch.randn(n, d, generator=g), dim=1)
    return x, labels


def _reference(query, bank, labels, num_classes, k, t):
    """float64, whole bank, no chunks."""
    sim = query.double() @ bank.double().T
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(query.shape[0], num_classes, dtype=torch.float64)
    votes.scatter_add_(1, labels[idx], (top / t).exp())
    return votes.argmax(1)


def test_sharded_fp16_bank_predicts_as_the_float64_reference():
    bank, labels = _clusters(3000)
    query, _ = _clusters(200, seed=1)
    want = _reference(query, bank, labels, 4, 20, 0.1)
    assert torch.equal(knn_predict(query, bank, labels, 4, k=20, t=0.1, chunk=64), want)
    got = knn_predict_sharded(query, bank.half(), labels, 4, k=20, t=0.1, chunk=64)
    assert (got == want).float().mean() >= 0.99  # fp16 storage may swap a near tie
    sim, lab = _top_k(query, bank.half(), labels, 20, bank_chunk=700)  # 5 chunks, merged
    ref_sim = (query.double() @ bank.double().T).topk(20, dim=1).values
    assert ((sim.double() - ref_sim).norm() / ref_sim.norm()) < 1e-3
    # a shard smaller than k
    small = knn_predict_sharded(query, bank[:7], labels[:7], 4, k=20, t=0.1)
    assert torch.equal(small, _reference(query, bank[:7], labels[:7], 4, 7, 0.1))
