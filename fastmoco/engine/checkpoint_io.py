"""Pre-trained weights in and out: fastmoco, official MoCo and torchvision checkpoint layouts.

What `--pretrained` accepts (the layout is detected from the keys, never from the file name):

    fastmoco     our checkpoint.pt: 'config', 'encoder_q' {backbone.*, head.*}, 'encoder_k',
                 'queue' (K x C), 'queue_ptr', 'optimizer', 'epoch', ...
    moco         facebookresearch/moco main_moco.py: 'state_dict' {module.encoder_q.*,
                 module.encoder_k.*, module.queue (C x K), module.queue_ptr}, 'arch', 'epoch',
                 'optimizer'. The projection head is encoder_q.fc: fc.weight for v1's linear
                 head, fc.0/fc.2 for v2's Linear-ReLU-Linear (the builder wraps the old fc).
    mocov3       facebookresearch/moco-v3: 'state_dict' {module.base_encoder.*,
                 module.momentum_encoder.*, module.predictor.*}, 'arch', 'epoch'. The
                 projector is base_encoder.fc (ResNet) or base_encoder.head (ViT: a timm
                 VisionTransformer, renamed to torchvision's by models.vit.vit_from_mocov3).
    torchvision  a ResNet state_dict (conv1.weight, layer1.0..., fc.*), bare or under
                 'state_dict', with or without DDP's 'module.' prefix; fc.* is dropped.

Every layout is read into one `Pretrained` record whose `backbone` dict has exactly the keys
of `build_backbone(arch)`: for torchvision ResNets that is torchvision's own naming minus
fc, which is why export to torchvision is a plain copy and re-import is bit-exact.
The architecture comes from the file (fastmoco's config, MoCo's 'arch'), else from --arch,
else from the keys themselves (block counts per stage, bottleneck or basic blocks); the
small-image stem (3x3 conv1, no max-pool) is read off conv1's kernel.
"""

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastmoco.data import IMAGENET_MEAN, IMAGENET_STD
from fastmoco.engine.checkpoint import load_checkpoint, remove_stale_temps, save_atomic
from fastmoco.engine.guard import all_finite
from fastmoco.errors import UsageError
from fastmoco.models import ALL_ARCHS, VIT_ARCHS, build_backbone, build_vit
from fastmoco.models.vit import vit_arch_of, vit_from_mocov3, vit_image_size, vit_to_mocov3

LAYOUTS = ("fastmoco", "moco", "mocov3", "torchvision")
FORMATS = ("torchvision", "moco", "mocov3")

# (bottleneck blocks, blocks per stage) -> torchvision architecture
_RESNET_SHAPES = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
}


@dataclass
class Pretrained:
    """One pre-trained encoder, whatever file it came from, in fastmoco's naming.

    backbone: state of build_backbone(arch, small_images); head: state of the projection
    head (projection_head(): 'weight' or '0.weight', '2.weight', ...) or None; encoder_k:
    the key encoder as {backbone.*, head.*} or None; predictor: MoCo v3's or None; queue:
    K x C unit keys or None.
    dropped: why -> keys of the file that the backbone does not use.
    """

    path: str
    layout: str
    arch: str
    small_images: bool
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] | None = None
    encoder_k: dict[str, torch.Tensor] | None = None
    predictor: dict[str, torch.Tensor] | None = None
    queue: torch.Tensor | None = None
    queue_ptr: torch.Tensor | None = None
    optimizer: dict | None = None
    epoch: int | None = None
    config: dict | None = None  # fastmoco TrainConfig as a dict, when the file has one
    dropped: dict[str, list[str]] = field(default_factory=dict)


# --- reading ---------------------------------------------------------------------------------


def _strip(state: Mapping, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _split_head(encoder: Mapping, head_prefix: str) -> tuple[dict, dict]:
    """(backbone, head) of an encoder state whose head lives under head_prefix."""
    head = _strip(encoder, head_prefix)
    backbone = {k: v for k, v in encoder.items() if not k.startswith(head_prefix)}
    return backbone, head


def _unwrap(state: Mapping) -> dict:
    """Drop the 'module.' prefix that DDP/DataParallel put in front of every key."""
    if state and all(k.startswith("module.") for k in state):
        return _strip(state, "module.")
    return dict(state)


def detect_layout(obj) -> str:
    """Which of LAYOUTS a loaded checkpoint object is; UsageError when none."""
    if isinstance(obj, Mapping):
        if "encoder_q" in obj and "config" in obj:
            return "fastmoco"
        inner = obj.get("state_dict", obj)
        if isinstance(inner, Mapping) and all(isinstance(v, torch.Tensor) for v in inner.values()):
            keys = set(_unwrap(inner))
            if any(k.startswith("encoder_q.") for k in keys):
                return "moco"
            if any(k.startswith("base_encoder.") for k in keys):
                return "mocov3"
            if "conv1.weight" in keys or "layers.0.conv1.weight" in keys:
                return "torchvision"
    top = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise UsageError(
        f"unrecognised checkpoint layout (top-level: {top}): --pretrained takes a fastmoco "
        "checkpoint.pt, an official MoCo v1/v2/v3 checkpoint or a torchvision ResNet state_dict"
    )


def infer_arch(backbone: Mapping) -> tuple[str, bool]:
    """(arch, small_images) read off a backbone state's keys and conv1's kernel size."""
    if "layers.0.conv1.weight" in backbone:
        return "resnet-tiny", True
    if "class_token" in backbone:
        arch = vit_arch_of(backbone)
        if arch is None:
            raise UsageError(
                f"a ViT of width {backbone['class_token'].shape[-1]} is neither vit_small "
                "(12 blocks, 384) nor vit_base (12 blocks, 768); fastmoco cannot build it"
            )
        return arch, False
    if "layer1.0.conv1.weight" not in backbone or "conv1.weight" not in backbone:
        raise UsageError("cannot tell the architecture from the keys: pass --arch")
    bottleneck = "layer1.0.conv3.weight" in backbone
    blocks = tuple(
        len({m.group(1) for k in backbone if (m := re.match(rf"layer{i}\.(\d+)\.", k))})
        for i in range(1, 5)
    )
    arch = _RESNET_SHAPES.get((bottleneck, blocks))
    if arch is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise UsageError(
            f"a ResNet with {kind} blocks {'-'.join(map(str, blocks))} per stage is none of "
            f"{', '.join(_RESNET_SHAPES.values())}; fastmoco cannot build it"
        )
    return arch, backbone["conv1.weight"].shape[-1] == 3


def _check_arch(found: str | None, arch: str | None, path) -> str | None:
    """The file's arch, else the flag's; both given and different is an error."""
    if found and arch and found != arch:
        raise UsageError(f"--arch {arch} disagrees with {path}, which holds a {found}; drop --arch")
    return found or arch


def read_pretrained(path: str | Path, arch: str | None = None, trust: bool = False) -> Pretrained:
    """Read any supported checkpoint file into a Pretrained record (see the module doc).
    trust: unpickle fully (--trust-checkpoint); otherwise tensors and containers only."""
    obj = load_checkpoint(path, trust)
    layout = detect_layout(obj)
    fields: dict = {"dropped": {}}
    if layout == "fastmoco":
        cfg = obj["config"]
        found = _check_arch(cfg.get("arch"), arch, path)
        backbone = _strip(obj["encoder_q"], "backbone.")
        head = _strip(obj["encoder_q"], "head.")
        predictor = _strip(obj["encoder_q"], "predictor.")
        fields.update(
            head=head,
            encoder_k=obj.get("encoder_k"),
            predictor=predictor or None,
            queue=obj.get("queue"),
            queue_ptr=obj.get("queue_ptr"),
            optimizer=obj.get("optimizer"),
            epoch=obj.get("epoch"),
            config=cfg,
        )
        fields["dropped"] = {
            "projection head": [f"encoder_q.head.{k}" for k in head],
            "predictor": [f"encoder_q.predictor.{k}" for k in predictor],
            # whatever else a method puts after the backbone
            "not part of backbone or head": [
                f"encoder_q.{k}"
                for k in obj["encoder_q"]
                if not k.startswith(("backbone.", "head.", "predictor."))
            ],
            "key encoder": [f"encoder_k.{k}" for k in obj.get("encoder_k") or {}],
            "queue": [k for k in ("queue", "queue_ptr") if obj.get(k) is not None],
        }
    else:
        raw = obj.get("state_dict", obj)
        wrapped = all(k.startswith("module.") for k in raw)
        state = _unwrap(raw)
        pre = "module." if wrapped else ""
        found = _check_arch(obj.get("arch") if "state_dict" in obj else None, arch, path)
        extra = obj.get("fastmoco_config") if isinstance(obj.get("fastmoco_config"), dict) else None
        if layout == "moco":
            backbone, head = _split_head(_strip(state, "encoder_q."), "fc.")
            key_backbone, key_head = _split_head(_strip(state, "encoder_k."), "fc.")
            enc_k = {f"backbone.{k}": v for k, v in key_backbone.items()}
            enc_k.update({f"head.{k}": v for k, v in key_head.items()})
            queue = state.get("queue")
            fields.update(
                head=head,
                encoder_k=enc_k or None,
                queue=queue.t() if queue is not None else None,  # C x K -> K x C
                queue_ptr=state.get("queue_ptr"),
                optimizer=obj.get("optimizer"),
                epoch=obj.get("epoch"),
                config=extra,
            )
            fields["dropped"] = {
                "projection head": [f"{pre}encoder_q.fc.{k}" for k in head],
                "key encoder": [f"{pre}{k}" for k in state if k.startswith("encoder_k.")],
                "queue": [f"{pre}{k}" for k in ("queue", "queue_ptr") if k in state],
            }
            used = {k for k in state if k.startswith(("encoder_q.", "encoder_k.", "queue"))}
        elif layout == "mocov3":
            base = _strip(state, "base_encoder.")
            linear = "head." if "cls_token" in base else "fc."  # ViT or ResNet
            backbone, head = _split_head(base, linear)
            key_backbone, key_head = _split_head(_strip(state, "momentum_encoder."), linear)
            if linear == "head.":
                backbone, key_backbone = (
                    _mocov3_vit(b, path, pre) for b in (backbone, key_backbone)
                )
            enc_k = {f"backbone.{k}": v for k, v in key_backbone.items()}
            enc_k.update({f"head.{k}": v for k, v in key_head.items()})
            predictor = _strip(state, "predictor.")
            fields.update(
                head=head,
                encoder_k=enc_k or None,
                predictor=predictor or None,
                epoch=obj.get("epoch"),
                config=extra,
            )
            fields["dropped"] = {
                "projector": [f"{pre}base_encoder.{linear}{k}" for k in head],
                "momentum encoder": [
                    f"{pre}{k}" for k in state if k.startswith("momentum_encoder.")
                ],
                "predictor": [f"{pre}predictor.{k}" for k in predictor],
            }
            used = {
                k
                for k in state
                if k.startswith(("base_encoder.", "momentum_encoder.", "predictor."))
            }
        else:  # torchvision
            backbone, head = _split_head(state, "fc.")
            fields.update(epoch=obj.get("epoch") if "state_dict" in obj else None)
            fields["dropped"] = {"classifier": [f"{pre}fc.{k}" for k in head]}
            used = set(state)
        other = [f"{pre}{k}" for k in state if k not in used]
        if other:
            fields["dropped"]["not part of the query encoder"] = other
        if found is None and extra is not None:
            found = extra.get("arch")
    if found is None:
        found, small = infer_arch(backbone)
    elif layout == "fastmoco":
        small = bool(obj["config"].get("small_images", False))
    elif found == "resnet-tiny":
        small = True
    else:
        small = "conv1.weight" in backbone and backbone["conv1.weight"].shape[-1] == 3
    if found not in ALL_ARCHS:
        raise UsageError(
            f"{path}: arch {found!r} is none of {', '.join(ALL_ARCHS)}; fastmoco cannot build it"
        )
    fields["dropped"] = {k: v for k, v in fields["dropped"].items() if v}
    bad = all_finite(backbone)
    if bad is not None:  # a diverged run's weights: any accuracy measured on them is noise
        raise UsageError(
            f"{path}: the backbone holds NaN or inf values ({bad}); it comes from a run that "
            "diverged: use an earlier checkpoint (checkpoint.prev.pt)"
        )
    return Pretrained(str(path), layout, found, small, backbone, **fields)


def _mocov3_vit(state: dict, path, pre: str) -> dict:
    """moco-v3's timm ViT names -> build_vit's; a conv stem (vit_conv_*) has no counterpart."""
    try:
        return vit_from_mocov3(state)
    except KeyError as e:
        raise UsageError(
            f"{path}: {pre}base_encoder.{e.args[0]} has no counterpart in fastmoco's ViT: "
            "vit_small and vit_base with the 16x16 patch projection read, moco-v3's conv-stem "
            "ViTs (vit_conv_small, vit_conv_base) do not"
        ) from None


def _vit_input_size(p: Pretrained) -> int:
    """The image size a ViT's position embedding was made for (else its config's crop)."""
    if "encoder.pos_embedding" in p.backbone:
        return vit_image_size(p.backbone)
    return (p.config or {}).get("crop_size", 224)


def build_pretrained_backbone(p: Pretrained) -> tuple[nn.Module, int]:
    """build_backbone(p.arch) with p.backbone loaded; every key must match, shapes too."""
    if p.arch in VIT_ARCHS:
        net, feat_dim = build_vit(p.arch, image_size=_vit_input_size(p))
    else:
        net, feat_dim = build_backbone(p.arch, small_images=p.small_images)
    want = net.state_dict()
    missing = sorted(set(want) - set(p.backbone))
    unexpected = sorted(set(p.backbone) - set(want))
    if missing or unexpected:
        raise UsageError(
            f"{p.path} does not fit a {p.arch}{' (small-image stem)' if p.small_images else ''}"
            f" backbone: missing {_short(missing)}, unexpected {_short(unexpected)}; "
            "pass the --arch the file was trained with"
        )
    bad = [k for k in want if want[k].shape != p.backbone[k].shape]
    if bad:
        k = bad[0]
        raise UsageError(
            f"{p.path}: {k} has shape {tuple(p.backbone[k].shape)}, a {p.arch} wants "
            f"{tuple(want[k].shape)} ({len(bad)} such keys); pass the --arch the file was "
            "trained with"
        )
    net.load_state_dict(p.backbone)
    return net, feat_dim


def _short(keys: list[str], n: int = 6) -> str:
    if not keys:
        return "none"
    if len(keys) <= n:
        return ", ".join(keys)
    prefix = os.path.commonprefix(keys).rpartition(".")[0]
    if prefix:
        return f"{prefix}.* ({len(keys)} keys)"
    return f"{len(keys)} keys ({', '.join(keys[:3])}, ...)"


def describe(p: Pretrained, missing: list[str] | None = None) -> str:
    """What was read from where; with `missing` (the keys the model had to initialise), also
    which keys of the file the backbone dropped."""
    stem = ", small-image stem" if p.small_images and p.arch != "resnet-tiny" else ""
    epoch = f", epoch {p.epoch}" if p.epoch is not None else ""
    lines = [
        f"=> {p.path}: {p.layout} layout, {p.arch}{stem}{epoch}; {len(p.backbone)} backbone tensors"
    ]
    if missing is None:
        return lines[0]
    for why, keys in p.dropped.items():
        lines.append(f"   dropped ({why}): {_short(keys)}")
    lines.append(f"   missing: {', '.join(missing) if missing else 'none'}")
    return "\n".join(lines)


def image_settings(p: Pretrained) -> dict:
    """crop_size, mean, std (and demo_seed) the encoder was trained with: its config's, else
    the ImageNet values the official and torchvision checkpoints use (a ViT's crop: the size
    its position embedding was made for)."""
    c = p.config or {}
    return dict(
        crop_size=c.get("crop_size", _vit_input_size(p) if p.arch in VIT_ARCHS else 224),
        mean=tuple(c.get("mean", IMAGENET_MEAN)),
        std=tuple(c.get("std", IMAGENET_STD)),
        demo_seed=c.get("demo_seed", 0),
    )


def load_backbone(
    path: str | Path, arch: str | None = None, trust: bool = False
) -> tuple[nn.Module, int, Pretrained]:
    """(backbone with the pre-trained weights, its feature width, the record) of any layout."""
    p = read_pretrained(path, arch, trust)
    net, feat_dim = build_pretrained_backbone(p)
    return net, feat_dim, p


# --- writing ---------------------------------------------------------------------------------


def to_torchvision(p: Pretrained) -> dict[str, torch.Tensor]:
    """The query backbone as a state_dict; for torchvision archs, torchvision's naming."""
    return dict(p.backbone)


def to_moco(p: Pretrained) -> dict:
    """The official MoCo v1/v2 checkpoint layout (main_moco.py's save_checkpoint).

    The head becomes encoder_q.fc.*, as the official builder names it; the queue goes back to
    the official C x K buffer. 'fastmoco_config' (ignored by the official code) keeps what a
    round trip needs: crop size, normalisation, the small-image stem.
    """
    sd = {f"module.encoder_q.{k}": v for k, v in p.backbone.items()}
    sd.update({f"module.encoder_q.fc.{k}": v for k, v in (p.head or {}).items()})
    for k, v in (p.encoder_k or {}).items():
        name = "fc." + k[len("head.") :] if k.startswith("head.") else k[len("backbone.") :]
        sd[f"module.encoder_k.{name}"] = v
    if p.queue is not None:
        sd["module.queue"] = p.queue.t().contiguous()  # K x C -> the official C x K
    if p.queue_ptr is not None:
        sd["module.queue_ptr"] = p.queue_ptr
    out = {
        "epoch": p.epoch or 0,
        "arch": p.arch,
        "state_dict": sd,
        "optimizer": p.optimizer if p.optimizer is not None else {"state": {}, "param_groups": []},
    }
    config = dict(p.config or {})
    config.update(arch=p.arch, small_images=p.small_images)
    out["fastmoco_config"] = config
    return out


def to_mocov3(p: Pretrained) -> dict:
    """facebookresearch/moco-v3's checkpoint layout (main_moco.py's save_checkpoint), for its
    main_lincls.py: module.base_encoder.* (ViT in vits.py's timm names; the projector as
    fc.* for ResNet, head.* for ViT), module.momentum_encoder.*, module.predictor.*, 'arch',
    'epoch'. No optimizer or GradScaler state: main_moco.py cannot resume from it.
    'fastmoco_config' (ignored there) keeps crop size, normalisation and the stem."""
    vit = p.arch in VIT_ARCHS
    linear, names = ("head", vit_to_mocov3) if vit else ("fc", dict)

    def encoder(prefix: str, backbone: dict, head: dict | None) -> dict:
        sd = {f"{prefix}{k}": v for k, v in names(backbone).items()}
        sd.update({f"{prefix}{linear}.{k}": v for k, v in (head or {}).items()})
        return sd

    sd = encoder("module.base_encoder.", p.backbone, p.head)
    if p.encoder_k:
        key_backbone, key_head = _split_head(p.encoder_k, "head.")
        sd.update(encoder("module.momentum_encoder.", _strip(key_backbone, "backbone."), key_head))
    sd.update({f"module.predictor.{k}": v for k, v in (p.predictor or {}).items()})
    config = dict(p.config or {})
    config.update(arch=p.arch, small_images=p.small_images)
    return {"epoch": p.epoch or 0, "arch": p.arch, "state_dict": sd, "fastmoco_config": config}


def compatibility_note(p: Pretrained, fmt: str) -> str:
    """How to load an exported file outside fastmoco, when it is not a plain torchvision one."""
    official = p.arch in VIT_ARCHS or (p.arch == "resnet50" and not p.small_images)
    if fmt == "mocov3" and official:
        return (
            f"loads in moco-v3's main_lincls.py -a {p.arch} --pretrained FILE (the backbone; "
            "projector, momentum encoder and predictor under moco-v3's names)"
        )
    if p.arch in VIT_ARCHS:
        return (
            f"{p.arch}: torchvision's VisionTransformer(patch_size=16, ...) with the sizes of "
            "fastmoco.models.vit.VIT_SIZES, heads = Identity (vit_base is torchvision's vit_b_16)"
        )
    if p.arch == "resnet-tiny":
        return (
            "resnet-tiny has no torchvision counterpart: the weights load into "
            "fastmoco.models.TinyResNet() (or build_backbone('resnet-tiny'))"
        )
    if p.small_images:
        return (
            f"small-image stem: build torchvision.models.{p.arch}(), then set "
            "model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and "
            "model.maxpool = nn.Identity() before load_state_dict(..., strict=False)"
        )
    if fmt == "torchvision":
        return (
            f"loads with torchvision.models.{p.arch}().load_state_dict(sd, strict=False); "
            "only fc.weight and fc.bias are missing"
        )
    return f"loads like an official MoCo {p.arch} checkpoint (main_lincls.py --pretrained)"


def export_checkpoint(
    pretrained: str | Path,
    fmt: str,
    out: str | Path,
    arch: str | None = None,
    *,
    force: bool = False,
    trust: bool = False,
) -> tuple[Path, Pretrained, str]:
    """Write `pretrained` (any layout) as fmt (FORMATS); (path, record, note).
    An existing out is refused unless force; out is never the input file."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and out.resolve() == Path(pretrained).resolve():
        raise UsageError(f"--out {out} is the --pretrained file itself; write to another path")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give the path of the file to write")
    if out.exists() and not force:
        raise UsageError(f"--out {out} exists; pass --force to replace it, or choose another")
    remove_stale_temps(out.parent, name=out.name)  # left by a killed export
    p = read_pretrained(pretrained, arch, trust)
    build_pretrained_backbone(p)  # refuse to export weights that would not load back
    obj = {"torchvision": to_torchvision, "moco": to_moco, "mocov3": to_mocov3}[fmt](p)
    return save_atomic(obj, out), p, compatibility_note(p, fmt)
