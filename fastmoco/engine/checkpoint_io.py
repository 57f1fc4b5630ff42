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

`--pretrained` also takes a run directory: its newest checkpoint that loads (the chain
checkpoint.pt, checkpoint.prev.pt, ..., as --resume walks it; nothing there is renamed,
since a run may still own the directory).

Every layout is read into one `Pretrained` record whose `backbone` dict has exactly the keys
of `build_backbone(arch)`: for torchvision ResNets that is torchvision's own naming minus
fc, which is why export to torchvision is a plain copy and re-import is bit-exact.
The architecture comes from the file (fastmoco's config, MoCo's 'arch'), else from --arch,
else from the keys themselves (block counts per stage, bottleneck or basic blocks); the
small-image stem (3x3 conv1, no max-pool) is read off conv1's kernel.

Settings (`settings_of`): what the file records about how its encoder was trained (crop
size, normalisation, stem, method, the run's kNN monitor) and where that came from, so
that knn and lincls evaluate it as it was trained and say so. A fastmoco checkpoint.pt
records them in its 'config'; the moco and mocov3 exports in 'fastmoco_config'; a
torchvision export is a plain state_dict and carries them in a sidecar, FILE.fastmoco.json,
which `export` writes beside every file it writes. The sidecar is read only for files that
carry no settings inside, and is input like any other: every field is type- and
range-checked, its arch and stem must be the weights' own, and its sha256 must be the
file's (a file replaced after export is not described by the old sidecar).
"""

import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastmoco.config import check_type
from fastmoco.data import IMAGENET_MEAN, IMAGENET_STD
from fastmoco.engine.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    existing_chain,
    load_checkpoint,
    newest_loadable,
    remove_stale_temps,
    save_atomic,
)
from fastmoco.engine.guard import all_finite
from fastmoco.errors import UsageError
from fastmoco.models import ALL_ARCHS, METHODS, VIT_ARCHS, build_backbone, build_vit
from fastmoco.models.vit import vit_arch_of, vit_from_mocov3, vit_image_size, vit_to_mocov3

LAYOUTS = ("fastmoco", "moco", "mocov3", "torchvision")
FORMATS = ("torchvision", "moco", "mocov3")
SIDECAR_SUFFIX = ".fastmoco.json"
SIDECAR_VERSION = 1
# The flag that lets a flag or preset contradict what the checkpoint records.
OVERRIDE_FLAG = "--override-checkpoint-settings"

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
    config_source: str | None = None  # "checkpoint" or "sidecar" (where config came from)
    requested: str | None = None  # the run directory --pretrained named, if it was one


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


def open_pretrained(path: str | Path, trust: bool = False) -> tuple[Path, dict]:
    """(file, loaded object) of --pretrained: a checkpoint file, or a run directory's newest
    checkpoint that loads (those skipped are named on stderr with their reason; none is set
    aside: the directory may belong to a run still writing it)."""
    path = Path(path)
    if not path.is_dir():
        return path, load_checkpoint(path, trust)
    if not existing_chain(path):
        raise UsageError(
            f"--pretrained {path}: a directory with no {CHECKPOINT_NAME} (nor an older "
            "checkpoint.prev*.pt); give a checkpoint file, or the directory of a run that saved one"
        )

    def log(*args, **kw):  # every line about the chain to stderr: stdout is the report
        print(*args, **{**kw, "file": sys.stderr})

    try:
        return newest_loadable(path, trust, log=log, set_aside_unreadable=False)
    except CheckpointError:  # one needs --trust-checkpoint: its message says so
        raise
    except UsageError:
        raise UsageError(
            f"--pretrained {path}: none of its checkpoints loads (each is named above with "
            "why); give a readable checkpoint file"
        ) from None


def read_pretrained(path: str | Path, arch: str | None = None, trust: bool = False) -> Pretrained:
    """Read any supported checkpoint file (or a run directory's newest) into a Pretrained
    record (see the module doc), its settings from the file, else from its sidecar.
    trust: unpickle fully (--trust-checkpoint); otherwise tensors and containers only."""
    requested = str(path) if Path(path).is_dir() else None
    path, obj = open_pretrained(path, trust)
    layout = detect_layout(obj)
    fields: dict = {"dropped": {}, "requested": requested}
    if layout == "fastmoco":
        cfg = checked_settings(obj["config"], f"{path}: config")
        fields["config_source"] = "checkpoint"
        found = _check_arch(cfg.get("arch"), arch, path)
        backbone = _strip(obj["encoder_q"], "backbone.")
        head = _strip(obj["encoder_q"], "head.")
        predictor = _strip(obj["encoder_q"], "predictor.")
        # the key (momentum) encoder: by name, or inside "model" in v3 checkpoints of before
        encoder_k = obj.get("encoder_k") or _strip(obj.get("model") or {}, "encoder_k.") or None
        fields.update(
            head=head,
            encoder_k=encoder_k,
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
            "key encoder": [f"encoder_k.{k}" for k in encoder_k or {}],
            "queue": [k for k in ("queue", "queue_ptr") if obj.get(k) is not None],
        }
    else:
        raw = obj.get("state_dict", obj)
        wrapped = all(k.startswith("module.") for k in raw)
        state = _unwrap(raw)
        pre = "module." if wrapped else ""
        found = _check_arch(obj.get("arch") if "state_dict" in obj else None, arch, path)
        extra = obj.get("fastmoco_config") if isinstance(obj.get("fastmoco_config"), dict) else None
        if extra is not None:
            extra = checked_settings(extra, f"{path}: fastmoco_config")
            fields["config_source"] = "checkpoint"
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
        if extra is None:  # a file without settings inside: its sidecar's, if any
            extra = read_sidecar(path, backbone)
            if extra is not None:
                fields.update(config=extra, config_source="sidecar")
                if fields.get("epoch") is None:
                    fields["epoch"] = extra.get("epoch")
                found = _check_arch(found or extra.get("arch"), arch, path)
        if found is None and extra is not None:
            found = extra.get("arch")
    if found is None:
        found, small = infer_arch(backbone)
    elif found == "resnet-tiny":  # it has no other stem, whatever a config says
        small = True
    elif layout == "fastmoco":
        small = bool(fields["config"].get("small_images", False))
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


# --- settings: what a file records, validated --------------------------------------------

# The settings knn and lincls take from a file, with the TrainConfig field type they must have.
SETTING_TYPES = {
    "arch": str,
    "method": str,
    "small_images": bool,
    "crop_size": int,
    "mean": tuple[float, float, float],
    "std": tuple[float, float, float],
    "knn_k": int,
    "knn_t": float,
    "demo_seed": int,
}


def checked_settings(values: Mapping, where: str) -> dict:
    """values (a checkpoint's config, an export's fastmoco_config, a sidecar) with the
    SETTING_TYPES fields type- and range-checked (lists as tuples, ints as floats where a
    float is wanted); the other keys as they are. A file is input: a bad value is refused
    naming where it is, never used."""
    if not isinstance(values, Mapping):
        raise UsageError(f"{where}: not a mapping of settings ({type(values).__name__})")
    out = dict(values)
    for name, annotation in SETTING_TYPES.items():
        if name not in out or out[name] is None:
            out.pop(name, None)
            continue
        v = out[name]
        if isinstance(v, list):
            v = tuple(v)
        if annotation is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if isinstance(v, tuple):
            v = tuple(float(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v)
        check_type(name, v, annotation, f"{where} {name}")
        problem = _setting_problem(name, v)
        if problem:
            raise UsageError(f"{where} {name}: {v!r} is not {problem}")
        out[name] = v
    return out


def _setting_problem(name: str, v) -> str | None:
    """What a setting's value must be, when it is not; None when it is fine."""
    if name == "arch" and v not in ALL_ARCHS:
        return f"one of {', '.join(ALL_ARCHS)}"
    if name == "method" and v not in METHODS:
        return f"one of {', '.join(METHODS)}"
    if name in ("crop_size", "knn_k") and v < 1:
        return "a whole number of at least 1"
    if name == "demo_seed" and v < 0:
        return "a whole number of at least 0"
    if name == "knn_t" and not (math.isfinite(v) and v > 0):
        return "a finite number above 0"
    if name == "mean" and not all(math.isfinite(x) for x in v):
        return "three finite numbers"
    if name == "std" and not all(math.isfinite(x) and x > 0 for x in v):
        return "three finite numbers above 0"
    return None


def sidecar_path(path: str | Path) -> Path:
    """FILE.fastmoco.json: the settings of FILE, beside it."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# The sidecar's fields besides SETTING_TYPES: bookkeeping, never a setting.
_SIDECAR_INFO = {"fastmoco_sidecar", "file", "sha256", "format", "epoch", "source"}


def read_sidecar(path: str | Path, backbone: Mapping) -> dict | None:
    """The settings of FILE from FILE.fastmoco.json (None without one), checked: known
    fields only, each of its type and range, arch and stem those of the weights
    (`backbone`), and the sha256 the file's own. It can set what the file does not record,
    nothing else: no field of it loads code, skips a check or names another file."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    where = f"sidecar {side}"
    try:
        values = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(
            f"{where}: not readable JSON ({e}); export the file again, or delete the sidecar"
        ) from None
    if not isinstance(values, dict) or values.get("fastmoco_sidecar") != SIDECAR_VERSION:
        raise UsageError(
            f"{where}: not a fastmoco sidecar of version {SIDECAR_VERSION} (no "
            '"fastmoco_sidecar": 1); export the file again, or delete the sidecar'
        )
    unknown = sorted(set(values) - set(SETTING_TYPES) - _SIDECAR_INFO)
    if unknown:
        raise UsageError(
            f"{where}: unknown field {unknown[0]!r}; a sidecar holds "
            f"{', '.join(sorted(set(SETTING_TYPES) | _SIDECAR_INFO))}"
        )
    epoch = values.get("epoch")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
        raise UsageError(f"{where} epoch: {epoch!r} is not a whole number of at least 0")
    digest = values.get("sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise UsageError(f"{where} sha256: {digest!r} is not a sha256 hex digest")
    if digest != file_sha256(path):
        raise UsageError(
            f"{where} does not describe {path}: the file's sha256 differs from the one recorded "
            "at export (the file was replaced since); export it again, or delete the sidecar "
            "and give the settings as flags"
        )
    settings = checked_settings(values, where)
    weights_arch, weights_small = infer_arch(backbone)
    if settings.get("arch", weights_arch) != weights_arch:
        raise UsageError(
            f"{where} says arch {settings['arch']}, but the weights in {path} are a "
            f"{weights_arch}; export the file again, or delete the sidecar"
        )
    if settings.get("small_images", weights_small) != weights_small:
        stem = "3x3" if weights_small else "7x7"
        raise UsageError(
            f"{where} says small_images {settings['small_images']}, but the weights in {path} "
            f"have a {stem} conv1; export the file again, or delete the sidecar"
        )
    return settings


def sidecar_for(p: "Pretrained", fmt: str, out: Path) -> dict:
    """The sidecar of an export of p: the settings p records (not the defaults that stand
    in for what it does not), its method, epoch, source, and the written file's sha256."""
    recorded = {k: s.value for k, s in settings_of(p).items() if s.recorded}
    return {
        "fastmoco_sidecar": SIDECAR_VERSION,
        "file": out.name,
        "format": fmt,
        "sha256": file_sha256(out),
        "arch": p.arch,
        "small_images": p.small_images,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in recorded.items()},
        "epoch": p.epoch,
        "source": p.path,
    }


def write_sidecar(values: dict, out: Path) -> Path:
    """FILE.fastmoco.json beside out, written to a temp file, fsynced, then renamed: never
    half a file (a killed export leaves .NAME.tmpPID, which the next export removes)."""
    side = sidecar_path(out)
    tmp = side.with_name(f".{side.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(values, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, side)
    finally:
        tmp.unlink(missing_ok=True)
    return side


@dataclass(frozen=True)
class Setting:
    """One evaluation setting: its value, where it came from (as printed), whether the file
    records it (a flag that differs contradicts the checkpoint) and whether nothing can
    change it (a ViT's input size is its position embedding's)."""

    value: object
    source: str
    recorded: bool = False
    fixed: bool = False


def settings_of(p: "Pretrained") -> dict[str, Setting]:
    """crop_size, mean, std, small_images, method, knn_k, knn_t, demo_seed of p: the ones its
    file (or sidecar) records, else what the weights say (a ViT's input size, a 3x3 stem),
    else the conventions of files that record nothing (ImageNet's 224 px and normalisation;
    32 px for a small-image stem; InstDisc's kNN k=200, t=0.1)."""
    c, where = p.config or {}, p.config_source or "checkpoint"

    def rec(name, default: Setting, source=where) -> Setting:
        return Setting(c[name], source, recorded=True) if name in c else default

    if p.arch in VIT_ARCHS and "encoder.pos_embedding" in p.backbone:
        crop = Setting(vit_image_size(p.backbone), "position embedding", True, fixed=True)
    elif p.small_images:
        crop = rec("crop_size", Setting(32, "default for a small-image stem; none recorded"))
    else:
        crop = rec("crop_size", Setting(224, "default: ImageNet's; none recorded"))
    method = {"moco": "moco", "mocov3": "mocov3"}.get(p.layout)
    if p.layout == "fastmoco":
        method = "moco"  # checkpoints from before the method field were MoCo's
    method_default = Setting(method, f"{p.layout} layout" if method else "unknown", bool(method))
    imagenet = "default: ImageNet's; none recorded"
    monitor = "checkpoint's monitor" if where == "checkpoint" else f"{where}: the run's monitor"
    return {
        "crop_size": crop,
        "mean": rec("mean", Setting(tuple(IMAGENET_MEAN), imagenet)),
        "std": rec("std", Setting(tuple(IMAGENET_STD), imagenet)),
        "small_images": Setting(
            p.small_images, where if "small_images" in c else "the weights' conv1", True
        ),
        "method": rec("method", method_default),
        "knn_k": rec("knn_k", Setting(200, "InstDisc's default"), monitor),
        "knn_t": rec("knn_t", Setting(0.1, "InstDisc's default"), monitor),
        "demo_seed": rec("demo_seed", Setting(0, "default")),
    }


def shown(value) -> str:
    """A setting as printed: tuples comma-separated, floats without trailing zeros."""
    if isinstance(value, tuple):
        return ",".join(shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def choose_setting(
    flag: str, given, setting: Setting, override: bool, given_source: str = "flag"
) -> Setting:
    """The setting used: `given` (a flag's value; None: not given) unless it contradicts a
    value the checkpoint records, which is refused unless override (OVERRIDE_FLAG); a
    fixed one (a ViT's input size) cannot be overridden."""
    if given is None:
        return setting
    if isinstance(given, list):
        given = tuple(given)
    if not setting.recorded or given == setting.value:
        return Setting(given, given_source, setting.recorded)
    if setting.fixed:
        raise UsageError(
            f"{flag} {shown(given)}: the checkpoint's network takes {shown(setting.value)} "
            f"only ({setting.source}); drop {flag}"
        )
    if not override:
        raise UsageError(
            f"{flag} {shown(given)} contradicts the checkpoint, which was trained with "
            f"{shown(setting.value)} ({setting.source}); drop {flag} to use that, or pass "
            f"{OVERRIDE_FLAG} to evaluate with {shown(given)} anyway"
        )
    return Setting(given, f"{given_source}, {OVERRIDE_FLAG}", True)


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
    side = f"; settings from {sidecar_path(p.path).name}" if p.config_source == "sidecar" else ""
    lines = [
        f"=> {p.path}: {p.layout} layout, {p.arch}{stem}{epoch}; {len(p.backbone)} backbone "
        f"tensors{side}"
    ]
    if p.requested is not None:
        lines.insert(0, f"=> --pretrained {p.requested}: its newest loadable checkpoint")
    if missing is None:
        return "\n".join(lines)
    for why, keys in p.dropped.items():
        lines.append(f"   dropped ({why}): {_short(keys)}")
    lines.append(f"   missing: {', '.join(missing) if missing else 'none'}")
    return "\n".join(lines)


def image_settings(p: Pretrained) -> dict:
    """crop_size, mean, std (and demo_seed) the encoder was trained with: settings_of's
    values (recorded, else the weights', else the conventions)."""
    s = settings_of(p)
    return {name: s[name].value for name in ("crop_size", "mean", "std", "demo_seed")}


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
    An existing out is refused unless force; out is never the input file (nor, for a run
    directory, one of its checkpoints). FILE.fastmoco.json, the settings, is written beside
    out for every format (the torchvision file stays a plain state_dict)."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    inputs = existing_chain(pretrained) if Path(pretrained).is_dir() else [Path(pretrained)]
    if out.exists() and any(out.resolve() == p.resolve() for p in inputs):
        raise UsageError(f"--out {out} is the --pretrained file itself; write to another path")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give the path of the file to write")
    if out.exists() and not force:
        raise UsageError(f"--out {out} exists; pass --force to replace it, or choose another")
    for name in (out.name, sidecar_path(out).name):  # left by a killed export
        remove_stale_temps(out.parent, name=name)
    p = read_pretrained(pretrained, arch, trust)
    build_pretrained_backbone(p)  # refuse to export weights that would not load back
    obj = {"torchvision": to_torchvision, "moco": to_moco, "mocov3": to_mocov3}[fmt](p)
    path = save_atomic(obj, out)
    write_sidecar(sidecar_for(p, fmt, path), path)
    return path, p, compatibility_note(p, fmt)
