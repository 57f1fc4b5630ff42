"""Builders of every method: MoCo v1/v2/v3, SimCLR end-to-end, memory bank, DrLIM.

Every method is a ContrastiveMethod (base.py), the one interface the training step
(fastmoco/engine/step.py) drives without knowing which method it runs: encoder_q (every
trained parameter; the trainer wraps it in DDP), query_encoder() (it, unwrapped;
`.backbone` is what kNN, linear eval and export use), to_device(device), forward(x_q, x_k,
index=None) -> (loss, aux, rank), after_step(aux, index, momentum) after the optimizer
step, needs_index, and the random streams a CUDA graph registers.
"""

import torch

from .backbones import (
    ARCHS,
    SplitBatchNorm2d,
    TinyResNet,
    backbone_from,
    build_backbone,
    probe_feature_dim,
)
from .base import ContrastiveMethod
from .membank import MemoryBank
from .moco import MoCo, projection_head
from .mocov3 import MoCoV3
from .simclr import DrLIM, SimCLR
from .vit import VIT_ARCHS, build_vit

METHODS = ("moco", "mocov3", "simclr", "membank", "drlim")
ALL_ARCHS = ARCHS + VIT_ARCHS


def queue_dtype(cfg) -> torch.dtype:
    """--queue-dtype: fp32, bf16 or fp16; auto is the AMP dtype under --amp, else fp32."""
    name = cfg.queue_dtype
    if name == "auto":
        name = cfg.amp_dtype if cfg.amp else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


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
            queue_dtype=queue_dtype(cfg),
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
    "ContrastiveMethod",
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
