"""Builders of every method: MoCo v1/v2/v3, SimCLR end-to-end, memory bank, DrLIM.

Each method is an nn.Module with the same small interface, which the trainer drives:
encoder_q (every trained parameter; the trainer wraps it in DDP), query_encoder() (it,
unwrapped; `.backbone` is what kNN, linear eval and export use), to_device(device), and a
step as forward(view1, view2[, index]) -> (loss, aux, rank) followed, after the optimizer
step, by the method's update (MoCo v1/v2: momentum update + enqueue; the others:
after_step(aux, index, m)).
"""

from .backbones import (
    ARCHS,
    SplitBatchNorm2d,
    TinyResNet,
    backbone_from,
    build_backbone,
    probe_feature_dim,
)
from .membank import MemoryBank
from .moco import MoCo, projection_head
from .mocov3 import MoCoV3
from .simclr import DrLIM, SimCLR
from .vit import VIT_ARCHS, build_vit

METHODS = ("moco", "mocov3", "simclr", "membank", "drlim")
ALL_ARCHS = ARCHS + VIT_ARCHS


def build_model(cfg, *, num_samples: int = 1):
    """The method of a TrainConfig (cfg.method), on the CPU. num_samples: training-set size,
    the memory bank's rows (other methods ignore it)."""
    common = dict(small_images=cfg.small_images)
    if cfg.method == "moco":
        return MoCo(
            cfg.arch,
            dim=cfg.dim,
            K=cfg.queue_size,
            m=cfg.moco_m,
            T=cfg.temperature,
            mlp_hidden=cfg.mlp_hidden,
            shuffle_bn=cfg.shuffle_bn,
            bn_splits=cfg.bn_splits,
            seed=cfg.seed,
            **common,
        )
    if cfg.method == "mocov3":
        return MoCoV3(
            cfg.arch,
            dim=cfg.dim,
            mlp_dim=4096 if cfg.mlp_hidden is None else cfg.mlp_hidden,  # v3's width
            m=cfg.moco_m,
            T=cfg.temperature,
            image_size=cfg.crop_size,
            frozen_patch_proj=cfg.frozen_patch_proj,
            **common,
        )
    one_net = dict(dim=cfg.dim, mlp_hidden=cfg.mlp_hidden, bn_splits=cfg.bn_splits, **common)
    if cfg.method == "simclr":
        return SimCLR(cfg.arch, T=cfg.temperature, **one_net)
    if cfg.method == "membank":
        return MemoryBank(
            cfg.arch,
            num_samples=num_samples,
            K=cfg.queue_size,
            bank_m=cfg.bank_m,
            T=cfg.temperature,
            seed=cfg.seed,
            **one_net,
        )
    if cfg.method == "drlim":
        return DrLIM(cfg.arch, margin=cfg.margin, seed=cfg.seed, **one_net)
    raise ValueError(f"unknown method {cfg.method!r}: choose one of {', '.join(METHODS)}")


__all__ = [
    "ALL_ARCHS",
    "ARCHS",
    "METHODS",
    "VIT_ARCHS",
    "DrLIM",
    "MemoryBank",
    "MoCo",
    "MoCoV3",
    "SimCLR",
    "SplitBatchNorm2d",
    "TinyResNet",
    "backbone_from",
    "build_backbone",
    "build_model",
    "build_vit",
    "probe_feature_dim",
    "projection_head",
]
