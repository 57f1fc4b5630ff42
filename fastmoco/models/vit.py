"""Vision Transformers for MoCo v3: torchvision's ViT at ViT-S/16 and ViT-B/16 sizes.

torchvision ships ViT-B/16 (vit_b_16) but no ViT-S/16; both are built here from its
VisionTransformer class with the sizes of MoCo v3's vits.py (ViT-S: 12 blocks, 6 heads,
width 384, MLP 1536; ViT-B: 12 blocks, 12 heads, width 768, MLP 3072), headless, returning
the class token's features.

frozen_patch_proj: MoCo v3's "stop-grad-conv1" (Sec. 4.2 of the paper): the 16x16 patch
projection keeps its random initialisation and gets no gradient, which the paper found
removes the training instability (loss dips) of ViT under large batches. As in the
official code the projection is then initialised Xavier-uniform over its fan-in 3*16*16
and fan-out. Differences to the official ViT: torchvision's learned position embedding
instead of the fixed 2-d sin-cos one.
"""

import math

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

# name: (layers, heads, width, mlp width); the names of moco-v3's --arch
VIT_SIZES = {
    "vit_small": (12, 6, 384, 1536),
    "vit_base": (12, 12, 768, 3072),
}
VIT_ARCHS = tuple(VIT_SIZES)
PATCH = 16


def build_vit(
    arch: str, *, image_size: int = 224, frozen_patch_proj: bool = False
) -> tuple[nn.Module, int]:
    """A headless ViT-S/16 or ViT-B/16 for image_size px inputs, and its feature width."""
    if arch not in VIT_SIZES:
        raise ValueError(f"unknown ViT {arch!r}: choose one of {', '.join(VIT_ARCHS)}")
    if image_size % PATCH:
        raise ValueError(
            f"{arch} cuts {PATCH}x{PATCH} patches: --crop-size {image_size} must be a multiple "
            f"of {PATCH}"
        )
    layers, heads, width, mlp = VIT_SIZES[arch]
    net = VisionTransformer(
        image_size=image_size,
        patch_size=PATCH,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=width,
        mlp_dim=mlp,
    )
    net.heads = nn.Identity()  # the class token's features are the representation
    if frozen_patch_proj:
        w = net.conv_proj.weight  # (width, 3, 16, 16)
        bound = math.sqrt(6.0 / float(3 * PATCH * PATCH + width))
        with torch.no_grad():
            nn.init.uniform_(w, -bound, bound)
            nn.init.zeros_(net.conv_proj.bias)
        net.conv_proj.requires_grad_(False)
    return net, width
