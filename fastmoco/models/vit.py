"""Vision Transformers for MoCo v3: torchvision's ViT at moco-v3's ViT-S/16 and ViT-B/16.

torchvision ships ViT-B/16 (vit_b_16) but no ViT-S/16; both are built here from its
VisionTransformer class with the sizes of moco-v3's vits.py (ViT-S: 12 blocks, 12 heads,
width 384, MLP 1536 - the paper's choice; DeiT-S has 6 heads; ViT-B: 12 blocks, 12 heads,
width 768, MLP 3072), headless, returning the class token's features. As in moco-v3 the
position embedding is the fixed 2-d sin-cos one (not learned) and LayerNorm's eps is 1e-6
(torchvision's default too).

Initialisation is moco-v3's vits.py (VisionTransformerMoCo.__init__), not torchvision's:
  qkv (nn.MultiheadAttention's in_proj)  uniform +-sqrt(6 / (3 * width / 3 + width)): Q, K and
                                          V as three matrices, each Xavier-uniform
  every other Linear (attention output, the MLP's two layers)   Xavier-uniform
  every Linear bias                       0
  class token                             normal, std 1e-6
  patch projection                        uniform +-sqrt(6 / (3 * 16 * 16 + width)), bias 0
  LayerNorms                              weight 1, bias 0 (both libraries' default)

frozen_patch_proj: MoCo v3's "stop-grad-conv1" (Sec. 4.2 of the paper): the 16x16 patch
projection keeps its random initialisation and gets no gradient, which the paper found
removes the training instability (loss dips) of ViT under large batches.

Checkpoints: moco-v3's ViTs are timm VisionTransformers; MOCOV3_NAMES maps their state_dict
names to torchvision's one for one (timm's fused qkv is nn.MultiheadAttention's in_proj, in
the same q, k, v order and head split), so official weights load here and ours export there.
"""

import math
import re

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

# name: (layers, heads, width, mlp width); the names of moco-v3's --arch
VIT_SIZES = {
    "vit_small": (12, 12, 384, 1536),
    "vit_base": (12, 12, 768, 3072),
}
VIT_ARCHS = tuple(VIT_SIZES)
PATCH = 16

# torchvision name -> moco-v3 (timm) name; {i} is the block index.
MOCOV3_NAMES = {
    "class_token": "cls_token",
    "conv_proj.weight": "patch_embed.proj.weight",
    "conv_proj.bias": "patch_embed.proj.bias",
    "encoder.pos_embedding": "pos_embed",
    "encoder.ln.weight": "norm.weight",
    "encoder.ln.bias": "norm.bias",
}
MOCOV3_BLOCK_NAMES = {
    "ln_1": "norm1",
    "self_attention.in_proj_weight": "attn.qkv.weight",
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.0": "mlp.fc1",
    "mlp.3": "mlp.fc2",
}
_TV_BLOCK = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+?)(\.weight|\.bias)?$")
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+?)(\.weight|\.bias)?$")


def sincos_position_embedding(grid: int, width: int, temperature: float = 10000.0):
    """(1, 1 + grid^2, width): moco-v3's fixed embedding. Patch p = row * grid + col gets
    [sin(row w), cos(row w), sin(col w), cos(col w)], w = temperature^(-d / (width / 4)),
    d < width / 4; the class token gets zeros."""
    if width % 4:
        raise ValueError(f"the 2-d sin-cos embedding needs a width divisible by 4, not {width}")
    omega = temperature ** -(torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    rows = torch.arange(grid, dtype=torch.float32).repeat_interleave(grid)
    cols = torch.arange(grid, dtype=torch.float32).repeat(grid)
    r, c = rows[:, None] * omega, cols[:, None] * omega
    patches = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)
    return torch.cat([torch.zeros(1, width), patches])[None]


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
    pos = net.encoder.pos_embedding
    with torch.no_grad():
        pos.copy_(sincos_position_embedding(image_size // PATCH, width))
    pos.requires_grad_(False)
    mocov3_init_(net, width)
    if frozen_patch_proj:
        net.conv_proj.requires_grad_(False)
    return net, width


@torch.no_grad()
def mocov3_init_(net: VisionTransformer, width: int) -> None:
    """moco-v3's vits.py initialisation (module doc), on torchvision's modules."""
    for module in net.modules():
        if isinstance(module, nn.MultiheadAttention):  # vits.py's qkv Linear(width, 3 width)
            bound = math.sqrt(6.0 / float(module.in_proj_weight.shape[0] // 3 + width))
            nn.init.uniform_(module.in_proj_weight, -bound, bound)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.Linear):  # attention output and the MLP's layers
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.normal_(net.class_token, std=1e-6)
    bound = math.sqrt(6.0 / float(3 * PATCH * PATCH + width))
    nn.init.uniform_(net.conv_proj.weight, -bound, bound)  # (width, 3, 16, 16)
    nn.init.zeros_(net.conv_proj.bias)


def _rename(name: str, names: dict, blocks: dict, block: re.Pattern, prefix: str) -> str:
    if name in names:
        return names[name]
    m = block.match(name)
    if m is None:
        raise KeyError(name)
    index, module, suffix = m.group(1), m.group(2), m.group(3) or ""
    if module + suffix in blocks:  # a whole name: in_proj_weight <-> qkv.weight
        return f"{prefix}{index}.{blocks[module + suffix]}"
    if module in blocks:
        return f"{prefix}{index}.{blocks[module]}{suffix}"
    raise KeyError(name)


def vit_to_mocov3(state: dict) -> dict:
    """A build_vit state_dict in moco-v3's (timm's) names."""
    return {
        _rename(k, MOCOV3_NAMES, MOCOV3_BLOCK_NAMES, _TV_BLOCK, "blocks."): v
        for k, v in state.items()
    }


def vit_from_mocov3(state: dict) -> dict:
    """A moco-v3 (timm) ViT state_dict, without its head, in build_vit's names. KeyError
    names the first key that has no counterpart (a conv stem, a distillation token)."""
    names = {v: k for k, v in MOCOV3_NAMES.items()}
    blocks = {v: k for k, v in MOCOV3_BLOCK_NAMES.items()}
    prefix = "encoder.layers.encoder_layer_"
    return {_rename(k, names, blocks, _TIMM_BLOCK, prefix): v for k, v in state.items()}


def vit_arch_of(state: dict) -> str | None:
    """vit_small or vit_base from a build_vit state's width and depth; None if neither."""
    width = state["class_token"].shape[-1] if "class_token" in state else None
    depth = len({m.group(1) for k in state if (m := _TV_BLOCK.match(k))})
    found = [a for a, (n, _, w, _) in VIT_SIZES.items() if (n, w) == (depth, width)]
    return found[0] if found else None


def vit_image_size(state: dict) -> int:
    """The input size a ViT state was built for, from its position embedding's length."""
    grid = math.isqrt(state["encoder.pos_embedding"].shape[1] - 1)
    return grid * PATCH
