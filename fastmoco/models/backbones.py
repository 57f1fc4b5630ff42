"""Backbones: torchvision ResNets (optionally with a small-image stem) and SplitBatchNorm.

Every backbone is returned headless (its classifier replaced by Identity) together with its
feature width, so the MoCo builder can put the paper's head on top.
"""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet-tiny")


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are taken over `num_splits` groups of the batch.

    One device then behaves like `num_splits` GPUs, GPU g normalising the g-th contiguous
    slice of the batch: what shuffle BN relies on (the official CIFAR demo simulates 8 GPUs
    this way). Running statistics are the mean over the groups, so eval mode is an ordinary
    BatchNorm.
    """

    def __init__(self, num_features: int, num_splits: int = 1, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)
        N, C, H, W = x.shape
        if N % s:
            raise ValueError(
                f"SplitBatchNorm2d: batch {N} is not divisible by num_splits={s}; "
                "choose a batch size that is a multiple of --bn-splits"
            )
        mean_s = self.running_mean.repeat(s)
        var_s = self.running_var.repeat(s)
        # (N, C, H, W) -> (N/s, s*C, H, W), channel block g = batch slice g; one batch_norm
        # call then normalises every slice on its own.
        grouped = x.reshape(s, N // s, C, H, W).transpose(0, 1).reshape(N // s, s * C, H, W)
        y = F.batch_norm(
            grouped,
            mean_s,
            var_s,
            self.weight.repeat(s),
            self.bias.repeat(s),
            True,
            self.momentum,
            self.eps,
        )
        with torch.no_grad():
            self.running_mean.copy_(mean_s.view(s, C).mean(0))
            self.running_var.copy_(var_s.view(s, C).mean(0))
            self.num_batches_tracked.add_(1)
        y = y.reshape(N // s, s, C, H, W).transpose(0, 1).reshape(N, C, H, W)
        return y.contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def norm_layer_for(bn_splits: int) -> Callable[[int], nn.Module]:
    return nn.BatchNorm2d if bn_splits <= 1 else partial(SplitBatchNorm2d, num_splits=bn_splits)


class TinyResNet(nn.Module):
    """A narrow 4-stage ResNet (one BasicBlock per stage) for CPU demos at 32-64 px.

    At widths 16-128 it trains about 4x faster on 2 CPU cores than at 32-256 (940 vs 240
    images/s for the MoCo step at 32 px), which buys the demo more epochs in its 5 minutes.
    """

    def __init__(
        self, widths=(16, 32, 64, 128), norm_layer=nn.BatchNorm2d, zero_init_residual=False
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or cin != w:
                down = nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False), norm_layer(w))
            stages.append(BasicBlock(cin, w, stride, down, norm_layer=norm_layer))
            cin = w
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = cin
        if zero_init_residual:  # as torchvision's ResNet: each block starts as the identity
            for block in stages:
                nn.init.zeros_(block.bn2.weight)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_backbone(
    arch: str, *, small_images: bool = False, bn_splits: int = 1, zero_init_residual: bool = False
) -> tuple[nn.Module, int]:
    """A headless backbone and its feature width.

    small_images: the CIFAR variant of the MoCo demo (3x3 stride-1 stem, no max-pool) for
    32-64 px inputs, where the ImageNet stem would shrink the image 4x before any block.
    zero_init_residual: the last BN of every residual block starts at gamma 0 (torchvision's
    option, which moco-v3's main_moco.py sets).
    """
    norm_layer = norm_layer_for(bn_splits)
    if arch == "resnet-tiny":
        net = TinyResNet(norm_layer=norm_layer, zero_init_residual=zero_init_residual)
        return net, net.out_dim
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(
        weights=None, norm_layer=norm_layer, zero_init_residual=zero_init_residual
    )
    if small_images:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def probe_feature_dim(backbone: nn.Module, image_size: int = 224) -> int:
    """D of a backbone mapping (N, 3, H, W) images to (N, D) features, read off one forward
    of two blank images in eval mode (BatchNorm statistics untouched)."""
    param = next(backbone.parameters(), None)
    kw = dict(device=param.device, dtype=param.dtype) if param is not None else {}
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(2, 3, image_size, image_size, **kw))
    backbone.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"the backbone returns {shape}, not (N, D) features: drop its classifier (timm: "
            "num_classes=0; torchvision: model.fc = nn.Identity())"
        )
    return int(out.shape[1])


def backbone_from(
    backbone: str | nn.Module,
    *,
    small_images: bool = False,
    bn_splits: int = 1,
    feat_dim: int | None = None,
    image_size: int = 224,
    zero_init_residual: bool = False,
) -> tuple[nn.Module, int]:
    """(backbone, feature width) of an arch name (build_backbone) or of an nn.Module used as
    it is (a timm model with num_classes=0, a torchvision ResNet with fc = Identity, your own
    network): its width is feat_dim, else probe_feature_dim at image_size."""
    if isinstance(backbone, str):
        return build_backbone(
            backbone,
            small_images=small_images,
            bn_splits=bn_splits,
            zero_init_residual=zero_init_residual,
        )
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone: an arch name or an nn.Module, not {type(backbone).__name__}")
    if bn_splits > 1:
        raise ValueError(
            "bn_splits splits the BatchNorm of the backbones fastmoco builds: give an arch "
            "name, or build your module with fastmoco.models.SplitBatchNorm2d layers"
        )
    return backbone, feat_dim or probe_feature_dim(backbone, image_size)
