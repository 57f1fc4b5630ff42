"""Every method: MoCo v1/v2/v3, SimCLR end-to-end, memory bank, DrLIM, and the registry.

Each method is one file and one line of METHODS. A method is a ContrastiveMethod (base.py):
it builds itself from a TrainConfig (from_config), checks what it needs (check_config,
check_data), says what the run prints and plots about it, and what its checkpoint keeps.
The training step (fastmoco/engine/step.py), the trainer, the CLI and checkpoint I/O read
METHODS and those answers; none of them names a method.
"""

from fastmoco.errors import UsageError

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

# name -> method: the names of --method
METHODS: dict[str, type[ContrastiveMethod]] = {
    "moco": MoCo,
    "mocov3": MoCoV3,
    "simclr": SimCLR,
    "membank": MemoryBank,
    "drlim": DrLIM,
}
ALL_ARCHS = ARCHS + VIT_ARCHS


def method_class(name: str) -> type[ContrastiveMethod]:
    if name not in METHODS:
        raise UsageError(f"--method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


def build_model(cfg, *, num_samples: int = 1) -> ContrastiveMethod:
    """The method of a TrainConfig (cfg.method), on the CPU. num_samples: training-set size,
    the memory bank's rows (other methods ignore it)."""
    return method_class(cfg.method).from_config(cfg, num_samples=num_samples)


__all__ = [
    "ALL_ARCHS",
    "ARCHS",
    "METHODS",
    "VIT_ARCHS",
    "ContrastiveMethod",
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
    "method_class",
    "probe_feature_dim",
    "projection_head",
]
