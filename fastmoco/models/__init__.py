from .backbones import ARCHS, SplitBatchNorm2d, TinyResNet, build_backbone
from .moco import MoCo, projection_head

__all__ = ["ARCHS", "MoCo", "SplitBatchNorm2d", "TinyResNet", "build_backbone", "projection_head"]
