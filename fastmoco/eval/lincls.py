"""`fastmoco lincls`: linear classification on a frozen pre-trained backbone.

The protocol of MoCo v1/v2 (facebookresearch/moco main_lincls.py):

    backbone <- pre-trained query encoder without its head, frozen, kept in eval mode
    fc       <- Linear(feat_dim, classes), weight ~ N(0, 0.01^2), bias 0   (re-initialised)
    for epoch in 1..100:                       # lr 30, x0.1 at epochs 60 and 80
        for x, y in train (RandomResizedCrop(224) + flip), batch 256:
            loss = CE(fc(backbone(x)), y)      # SGD on fc only: momentum 0.9, wd 0
        top-1 / top-5 on val (Resize 256 + CenterCrop 224)

moco-v3's main_lincls.py is the same loop with other numbers: 90 epochs, batch 1024, lr
0.1 x batch/256 (ViT: 3 x batch/256, its CONFIG.md), the lr set at each epoch's start on a
half cosine, lr(e) = lr0 * (1 + cos(pi * e / epochs)) / 2. A small-image protocol (32-px
crops of half the image or more, lr 0.3, 15 epochs; docs/eval.md has the runs behind it)
serves models of 32-64 px images.

The checkpoint decides (resolve_config): without --preset the protocol is chosen from what
it records (a small-image model -> small-images, method mocov3 -> mocov3 or mocov3-vit,
else official), and crop size and normalisation are the checkpoint's whenever it records
them (the preset's only for files that record nothing). The first lines print the
protocol and every setting with its source; a flag or --preset that contradicts the
checkpoint is refused unless --override-checkpoint-settings.

Eval mode matters: BatchNorm in train mode would rewrite its running statistics from the
new data even without gradients, and they are part of the pre-trained model. After the
last epoch every backbone tensor is compared with the loaded one (the official
sanity_check). With --lr-scaling none (v1/v2) the lr is used as given, not scaled with the
batch (as in the official code).

Engineering, where it changes nothing in the result: the backbone runs under no_grad
(no activations kept for a backward it never gets), under autocast with --amp, and only
fc is wrapped in DDP, so only fc's gradients are all-reduced. fc itself stays fp32, so fp16
AMP needs no GradScaler. Each epoch drops the last partial global batch (every rank takes
the same number of full batches, as in training); the official sampler keeps it.
"""

import dataclasses
import math
import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchvision import transforms as T
from tqdm import tqdm

from fastmoco.config_io import write_config
from fastmoco.data import ImageFolderDataset, build_eval_loader, demo_dataset
from fastmoco.data.loader import collate_eval
from fastmoco.data.sampler import ShardedBatchSampler
from fastmoco.data.sources import ImageSource, bank_split, open_source, splits
from fastmoco.engine import checkpoint as ckpt
from fastmoco.engine.checkpoint_io import (
    OVERRIDE_FLAG,
    Pretrained,
    Setting,
    build_pretrained_backbone,
    choose_setting,
    describe,
    read_pretrained,
    settings_of,
    shown,
)
from fastmoco.engine.distributed import launch, local_device, resolve_device
from fastmoco.engine.metrics import MetricsLog
from fastmoco.errors import UsageError
from fastmoco.models import VIT_ARCHS
from fastmoco.ops.distributed import world

FC_KEYS = ["fc.weight", "fc.bias"]
# Fields about this invocation, not the protocol: left out of the run's config.yaml.
COMMAND_LINE_ONLY = ("out", "resume", "trust_checkpoint", "override_checkpoint_settings")


@dataclass
class LinclsConfig:
    # --- what to evaluate ----------------------------------------------------------------
    preset: str = "official"
    """protocol that sets every value below: official (MoCo v1/v2), mocov3, mocov3-vit,
    small-images (demo: its old name); default: chosen from the checkpoint (a small-image
    model: small-images; method mocov3: mocov3 or mocov3-vit; else official)"""
    pretrained: str | None = None
    """checkpoint file (fastmoco checkpoint.pt, official MoCo v1/v2/v3, torchvision ResNet
    with or without its .fastmoco.json sidecar) or run directory (its newest loadable
    checkpoint)"""
    arch: str | None = None
    """backbone, for files that do not name one (read off the keys if absent)"""
    override_checkpoint_settings: bool = False
    """let --preset, --crop-size, --mean, --std contradict what the checkpoint records
    (refused otherwise: a 32-px model probed at 224 px measures nothing)"""

    # --- data ----------------------------------------------------------------------------
    data: str | None = None
    """DIR with labelled train/ and val/ (ImageFolders: a subdirectory per class), or
    cifar10:DIR, cifar100:DIR, stl10:DIR (train -> test; STL-10's labelled train) for
    torchvision's files on disk (default: the checkpoint's demo set)"""
    crop_size: int = 224
    """train RandomResizedCrop and val CenterCrop size (default: the checkpoint's, else the
    protocol's)"""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """train RandomResizedCrop's area range (torchvision's default, as the official)"""
    resize_size: int | None = None
    """val Resize before the center crop (default crop/0.875; below 64 px the crop itself)"""
    mean: tuple[float, float, float] | None = None
    """normalisation mean (default: the checkpoint's, else ImageNet's)"""
    std: tuple[float, float, float] | None = None
    """normalisation std (default: the checkpoint's, else ImageNet's)"""
    workers: int = 8
    """data-loading processes per rank"""

    # --- optimisation (SGD on the linear layer only) ---------------------------------------
    epochs: int = 100
    """epochs"""
    batch_size: int = 256
    """global batch over all GPUs"""
    lr: float = 30.0
    """learning rate (see --lr-scaling)"""
    lr_scaling: Literal["none", "linear"] = "none"
    """none: lr as given (v1/v2 main_lincls.py); linear: lr x batch-size / 256 (moco-v3's)"""
    schedule: Literal["step", "cosine"] = "step"
    """step: x0.1 at --lr-steps (v1/v2); cosine: a half cosine to 0, set at each epoch's
    start (moco-v3)"""
    lr_steps: tuple[int, ...] = (60, 80)
    """epochs where --schedule step multiplies the lr by 0.1"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 0.0
    """weight decay"""
    amp: bool = False
    """backbone under autocast (fc stays fp32)"""
    amp_dtype: Literal["bf16", "fp16"] = "bf16"
    """fp16: CUDA only"""
    channels_last: bool = False
    """NHWC memory format"""

    # --- run -----------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when visible"""
    gpus: int = 1
    """local processes, one per GPU; under torchrun the environment decides"""
    out: str | None = None
    """run directory (default runs/lincls-<preset>-<date-time>)"""
    resume: str | None = None
    """checkpoint file, run directory, or 'auto' (newest lincls run of the protocol on the
    same data)"""
    seed: int = 0
    """seed of fc's init, data order and augmentation"""
    progress: bool = True
    """progress bar"""
    trust_checkpoint: bool = False
    """load --pretrained with full unpickling (only from a trusted source: it can run code)"""

    def replace(self, **changes) -> "LinclsConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def recipe_dict(self) -> dict:
        """What the run's config.yaml holds: to_dict without COMMAND_LINE_ONLY."""
        return {k: v for k, v in self.to_dict().items() if k not in COMMAND_LINE_ONLY}

    def base_lr(self) -> float:
        """The lr the schedule starts from."""
        return self.lr * self.batch_size / 256 if self.lr_scaling == "linear" else self.lr


# moco-v3 main_lincls.py (ResNet-50): 90 epochs, batch 1024, lr 0.1 x batch/256 on a
# cosine set per epoch, wd 0; RandomResizedCrop(224) + flip, Resize 256 + CenterCrop 224.
_MOCOV3 = LinclsConfig(
    preset="mocov3",
    epochs=90,
    batch_size=1024,
    lr=0.1,
    lr_scaling="linear",
    schedule="cosine",
    lr_steps=(),
)
# The small-image protocol: the demo set (32-px crops of 64-px images, 10 classes, 1,500
# train images) in about a minute on 2 CPU cores. Crops of at least half the image as in
# the demo pre-training (smaller ones often miss the shape, the only class cue); measured
# choices in docs/eval.md.
_SMALL = LinclsConfig(
    preset="small-images",
    epochs=15,
    lr_steps=(9, 12),
    batch_size=128,
    lr=0.3,
    crop_size=32,
    crop_scale=(0.5, 1.0),
    workers=2,
)
PRESETS: dict[str, LinclsConfig] = {
    # MoCo v1/v2 linear classification on ImageNet (main_lincls.py).
    "official": LinclsConfig(preset="official"),
    "mocov3": _MOCOV3,
    # moco-v3's CONFIG.md for ViT-S/16 and ViT-B/16: main_lincls.py -a vit_small --lr=3
    "mocov3-vit": _MOCOV3.replace(preset="mocov3-vit", lr=3.0),
    "small-images": _SMALL,
    "demo": _SMALL.replace(preset="demo"),  # small-images under its old name
}
# Presets that are the same protocol under two names.
SAME_PROTOCOL = {"demo": "small-images"}


def lr_at(cfg: LinclsConfig, epoch: int) -> float:
    """The lr of an epoch: x0.1 per --lr-steps passed (step), or
    base * (1 + cos(pi * epoch / epochs)) / 2 (cosine, moco-v3's adjust_learning_rate)."""
    if cfg.schedule == "cosine":
        return cfg.base_lr() * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return cfg.base_lr() * 0.1 ** sum(epoch >= s for s in cfg.lr_steps)


def check_config(cfg: LinclsConfig) -> None:
    if not cfg.pretrained:
        raise UsageError("--pretrained is required: the checkpoint whose backbone to evaluate")
    for name in ("epochs", "batch_size", "crop_size", "gpus"):
        v = getattr(cfg, name)
        if v < 1:
            raise UsageError(
                f"--{name.replace('_', '-')} {v}: must be a whole number of at least 1"
            )
    if cfg.workers < 0:
        raise UsageError(f"--workers {cfg.workers}: must be a whole number of at least 0")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UsageError(f"--lr {cfg.lr}: must be a finite number above 0")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise UsageError(f"--weight-decay {cfg.weight_decay}: must be a finite number >= 0")
    if not 0 <= cfg.momentum <= 1:
        raise UsageError(f"--momentum {cfg.momentum}: must be a number in [0, 1]")
    if cfg.batch_size % cfg.gpus:
        raise UsageError(
            f"--batch-size {cfg.batch_size} is global and must divide evenly over --gpus {cfg.gpus}"
        )
    if cfg.amp and cfg.amp_dtype not in ("bf16", "fp16"):
        raise UsageError(f"--amp-dtype {cfg.amp_dtype!r}: choose bf16 or fp16")


# --- the checkpoint decides --------------------------------------------------------------------


def choose_protocol(p: Pretrained, recorded: dict[str, Setting]) -> tuple[str, str, bool]:
    """(preset, why, whether the checkpoint records the reason). The image size decides
    first: a model of small images gets the small-image protocol whatever its method,
    since the ImageNet protocols' batch (256, 1024) and epochs (90-100) are ImageNet's and
    their lr (30 for v1/v2) is tuned for ResNet-50 features at 224 px. Then the method:
    moco-v3's own main_lincls.py recipe for its checkpoints. Else MoCo v1/v2's."""
    crop, small, method = recorded["crop_size"], recorded["small_images"], recorded["method"]
    if small.value and p.arch != "resnet-tiny":
        return "small-images", f"small-image stem ({small.source}), crop {crop.value}", True
    if small.value:
        return "small-images", f"{p.arch}, crop {crop.value}", True
    if crop.value < 64:
        return "small-images", f"crop {crop.value} ({crop.source})", crop.recorded
    if method.value == "mocov3":
        name = "mocov3-vit" if p.arch in VIT_ARCHS else "mocov3"
        return name, f"method mocov3 ({method.source}), {p.arch}", True
    if method.recorded:
        return "official", f"method {method.value} ({method.source}), crop {crop.value}", True
    return "official", "nothing recorded: an ImageNet model at 224 px by convention", False


def resolve_config(
    cfg: LinclsConfig, p: Pretrained, explicit: Collection[str] | None = None
) -> tuple[LinclsConfig, list[str]]:
    """(the config to run, the lines that say what it is and where each value came from).

    explicit: the fields the user set (flags); the others come from the protocol, which is
    --preset when "preset" is among them, else chosen from the checkpoint. None: every field
    of cfg that is not None counts as set (an API caller's complete config). Crop size,
    mean and std: a set value must agree with what the checkpoint records (else
    UsageError naming OVERRIDE_FLAG); unset, the checkpoint's, else the protocol's."""
    given_source = "flag" if explicit is not None else "given"
    if explicit is None:
        explicit = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) is not None}
    explicit = set(explicit)
    override = cfg.override_checkpoint_settings
    recorded = settings_of(p)
    chosen, why, binding = choose_protocol(p, recorded)
    if "preset" in explicit:
        name = SAME_PROTOCOL.get(cfg.preset, cfg.preset)
        if name in PRESETS and name != chosen and binding and not override:
            raise UsageError(
                f"--preset {cfg.preset} contradicts the checkpoint, whose protocol is {chosen} "
                f"({why}); drop --preset to use it, or pass {OVERRIDE_FLAG} to run "
                f"{cfg.preset} anyway"
            )
        protocol = f"protocol: {cfg.preset} ({given_source})"
        if name != chosen:
            protocol += f"; the checkpoint's would be {chosen} ({why})"
        base = cfg  # a preset of the caller's own (the tests' "test"): cfg is all of it
        if cfg.preset in PRESETS:
            base = PRESETS[cfg.preset].replace(**{k: getattr(cfg, k) for k in explicit})
    else:
        protocol = f"protocol: {chosen} (from the checkpoint: {why})"
        base = PRESETS[chosen].replace(**{k: getattr(cfg, k) for k in explicit})
    source = {
        f.name: given_source if f.name in explicit else "preset" for f in dataclasses.fields(base)
    }

    def pick(name: str, flag: str) -> Setting:
        rec = recorded[name]
        if name in explicit and getattr(base, name) is not None:
            return choose_setting(flag, getattr(base, name), rec, override, given_source)
        if rec.recorded or name != "crop_size":  # mean, std: the checkpoint's or ImageNet's
            return rec
        return Setting(base.crop_size, "preset")

    crop, mean, std = pick("crop_size", "--crop-size"), pick("mean", "--mean"), pick("std", "--std")
    resolved = base.replace(arch=p.arch, crop_size=crop.value, mean=mean.value, std=std.value)
    resolved = dataclasses.replace(resolved, pretrained=p.path)  # a run dir's file, fixed now
    if resolved.resize_size is not None:
        resize = Setting(resolved.resize_size, source["resize_size"])
    elif crop.value < 64:
        resize = Setting(crop.value, "the crop: below 64 px")
    else:
        resize = Setting(round(crop.value / 0.875), "crop / 0.875")
    seed = recorded["demo_seed"]
    data = (
        f"data {resolved.data} ({source['data']})"
        if resolved.data is not None
        else f"data the demo set, seed {seed.value} ({seed.source})"
    )

    def item(label: str, name: str) -> str:
        return f"{label} {shown(getattr(resolved, name))} ({source[name]})"

    lr = f"{item('lr', 'lr')}, {item('lr scaling', 'lr_scaling')}"
    if resolved.lr_scaling == "linear":
        lr += f": x batch/256 = {shown(resolved.base_lr())}"
    schedule = item("schedule", "schedule")
    if resolved.schedule == "step":
        steps = shown(resolved.lr_steps) or "none"
        schedule += f" x0.1 at epochs {steps} ({source['lr_steps']})"
    lines = [
        protocol,
        f"settings: {data}; crop {shown(crop.value)} ({crop.source}), val resize "
        f"{resize.value} ({resize.source}), {item('crop scale', 'crop_scale')}, mean "
        f"{shown(mean.value)} ({mean.source}), std {shown(std.value)} ({std.source})",
        f"optimisation: SGD on fc, {item('epochs', 'epochs')}, {item('batch', 'batch_size')}, "
        f"{lr}, {schedule}, {item('momentum', 'momentum')}, {item('wd', 'weight_decay')}, "
        f"{item('seed', 'seed')}",
    ]
    return resolved, lines


def lincls(cfg: LinclsConfig, explicit: Collection[str] | None = None) -> dict:
    """Check the inputs, resolve the config against the checkpoint (resolve_config: explicit
    names the fields the user set; None: all of cfg's), then train fc on every rank;
    returns rank 0's results."""
    device = resolve_device(cfg.device, cfg.gpus)
    check_config(cfg)
    if cfg.amp and cfg.amp_dtype == "fp16" and device != "cuda":
        raise UsageError("--amp-dtype fp16 needs CUDA; use bf16 on the CPU")
    p = read_pretrained(cfg.pretrained, cfg.arch, cfg.trust_checkpoint)  # fails early if bad
    build_pretrained_backbone(p)
    cfg, lines = resolve_config(cfg, p, explicit)
    check_config(cfg)
    main = os.environ.get("RANK", "0") == "0"  # under torchrun every process gets here
    if main:
        print(describe(p, missing=FC_KEYS) + " (re-initialised: N(0, 0.01^2), bias 0)", flush=True)
        print("\n".join(lines), flush=True)
    root = (
        cfg.data if cfg.data is not None else demo_dataset(seed=settings_of(p)["demo_seed"].value)
    )
    train, val = labelled_splits(root)
    if cfg.batch_size > len(train.samples):
        raise UsageError(
            f"--batch-size {cfg.batch_size} is larger than the train split "
            f"({len(train.samples)} images in {train.spec}); lower --batch-size"
        )
    out, resume_path = ckpt.prepare_run_dir(
        cfg.out, cfg.resume, f"lincls-{cfg.preset}", data=cfg.data
    )
    if main:  # what --resume auto matches runs by (their data)
        write_config(cfg, out)
    args = (cfg, (train.spec, val.spec), str(out), resume_path)
    return launch(_lincls_rank, args, nprocs=cfg.gpus, device=device)  # rank 0's results


def labelled_splits(data) -> tuple[ImageSource, ImageSource]:
    """(train, val) sources of --data for a linear probe: both must carry labels. A named
    set's train split is its labelled one (STL-10: train, not train+unlabeled)."""
    train_split, val_split = splits(data)
    if val_split is None:
        raise UsageError(
            f"--data {data}: linear evaluation needs labelled train/ and val/ subdirectories "
            "(ImageFolders: one subdirectory per class), or cifar10:DIR, cifar100:DIR, "
            "stl10:DIR"
        )
    sources = open_source(bank_split(train_split)), open_source(val_split)
    for source in sources:
        if not source.labelled:
            raise UsageError(
                f"--data {data}: {source.spec} has no class labels (a flat or nested folder "
                "of images, or unlabelled images beside the class subdirectories); linear "
                "evaluation needs one subdirectory per class"
            )
    return sources


def _lincls_rank(cfg, split_specs, out, resume_path) -> dict:
    return LinearProbe(cfg, split_specs, Path(out), resume_path).fit()


def train_transform(cfg: LinclsConfig) -> T.Compose:
    """RandomResizedCrop + flip, nothing else (main_lincls.py)."""
    return T.Compose(
        [
            T.RandomResizedCrop(cfg.crop_size, scale=cfg.crop_scale),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]
    )


class LinearProbe:
    def __init__(self, cfg: LinclsConfig, split_specs, out: Path, resume_path=None):
        """split_specs: the (train, val) specs of labelled_splits' sources; a root DIR (with
        train/ and val/) is taken too."""
        if isinstance(split_specs, (str, Path)):
            split_specs = tuple(source.spec for source in labelled_splits(split_specs))
        train_split, val_split = split_specs
        self.pretrained = read_pretrained(cfg.pretrained, cfg.arch, cfg.trust_checkpoint)
        settings = settings_of(self.pretrained)  # lincls() resolved cfg; a direct caller may not
        cfg = cfg.replace(
            arch=self.pretrained.arch,
            mean=cfg.mean or settings["mean"].value,
            std=cfg.std or settings["std"].value,
        )
        self.cfg, self.out = cfg, out
        self.rank, self.world_size = world()
        self.is_main = self.rank == 0
        self.device = local_device(resolve_device(cfg.device, 1))
        self.mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.amp_dtype = torch.float16 if cfg.amp_dtype == "fp16" else torch.bfloat16

        per_rank = cfg.batch_size // self.world_size
        dataset = ImageFolderDataset(train_split, train_transform(cfg), seed=cfg.seed)
        self.sampler = ShardedBatchSampler(
            len(dataset), per_rank, cfg.seed, self.rank, self.world_size
        )
        self.train_loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=cfg.workers,
            collate_fn=collate_eval,
            pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.workers > 0,
        )
        resize = cfg.resize_size or (cfg.crop_size if cfg.crop_size < 64 else None)
        self.val_loader = build_eval_loader(
            val_split,
            crop_size=cfg.crop_size,
            resize_size=resize,
            batch_size=per_rank,
            workers=cfg.workers,
            mean=cfg.mean,
            std=cfg.std,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.num_classes = len(dataset.classes)
        val_classes = self.val_loader.dataset.classes
        if val_classes != dataset.classes:
            raise UsageError(
                f"{train_split} and {val_split} have different classes "
                f"({len(dataset.classes)} vs {len(val_classes)}): both need the same class "
                "subdirectories"
            )

        backbone, feat_dim = build_pretrained_backbone(self.pretrained)
        self.backbone = backbone.to(self.device, memory_format=self.mf).requires_grad_(False)
        self.backbone.eval()
        torch.manual_seed(cfg.seed)  # the same fc on every rank
        fc = nn.Linear(feat_dim, self.num_classes)
        nn.init.normal_(fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(fc.bias)
        self.fc = fc.to(self.device)
        self.optimizer = torch.optim.SGD(
            self.fc.parameters(), cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.fc_ddp = self.fc
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.fc_ddp = DDP(self.fc, device_ids=ids)

        self.epoch, self.history, self.best_top1 = 0, [], 0.0
        if resume_path is not None:
            self.load(resume_path)
        self.log = MetricsLog(out, enabled=self.is_main)

    # --- checkpoints -------------------------------------------------------------------
    def state(self) -> dict:
        """A whole classifier: backbone keys + fc.weight/fc.bias (for torchvision archs,
        a torchvision ResNet state_dict with num_classes outputs), and what resume needs."""
        sd = {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()}
        sd.update({f"fc.{k}": v.detach().cpu() for k, v in self.fc.state_dict().items()})
        return {
            "config": self.cfg.to_dict(),
            "arch": self.pretrained.arch,
            "epoch": self.epoch,
            "state_dict": sd,
            "optimizer": self.optimizer.state_dict(),
            "best_acc1": self.best_top1,
            "history": self.history,
        }

    def load(self, path: Path) -> None:
        s = ckpt.load_resumable(path, self.cfg.trust_checkpoint)  # a file, or a run dir's newest
        if "state_dict" not in s or "history" not in s or "fc.weight" not in s["state_dict"]:
            raise UsageError(f"--resume {path}: not a fastmoco lincls checkpoint")
        self.fc.load_state_dict({k[3:]: v for k, v in s["state_dict"].items() if k in FC_KEYS})
        self.optimizer.load_state_dict(s["optimizer"])
        self.epoch, self.history, self.best_top1 = s["epoch"], s["history"], s["best_acc1"]

    # --- the loop ----------------------------------------------------------------------
    def logits(self, x: torch.Tensor, fc: nn.Module) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True, memory_format=self.mf)
        with (
            torch.no_grad(),
            torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.cfg.amp),
        ):
            feats = self.backbone(x)
        return fc(feats.float())

    def train_epoch(self) -> tuple[float, float]:
        """(mean loss, train top-1 %) of this rank over the epoch."""
        cfg, dev = self.cfg, self.device
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(cfg, self.epoch)
        self.train_loader.dataset.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch)
        self.backbone.eval()  # never train mode: BN statistics are part of the frozen model
        loss_sum = torch.zeros((), device=dev)
        hits, n = torch.zeros((), device=dev, dtype=torch.long), 0
        bar = tqdm(
            self.train_loader,
            desc=f"lincls {self.epoch + 1}/{cfg.epochs}",
            disable=not (self.is_main and cfg.progress),
            leave=False,
            dynamic_ncols=True,
        )
        for i, (x, y) in enumerate(bar):
            y = y.to(dev, non_blocking=True)
            out = self.logits(x, self.fc_ddp)
            loss = F.cross_entropy(out, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach()
            hits += (out.argmax(1) == y).sum()
            n += y.numel()
            if cfg.progress and self.is_main and (i + 1) % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / (i + 1):.3f}")
        steps = max(len(self.train_loader), 1)
        return loss_sum.item() / steps, 100.0 * hits.item() / max(n, 1)

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """(top-1 %, top-5 %) over the whole val split, counts summed over ranks."""
        counts = torch.zeros(3, device=self.device, dtype=torch.long)  # top1, top5, n
        k = min(5, self.num_classes)
        for x, y in self.val_loader:
            y = y.to(self.device, non_blocking=True)
            top = self.logits(x, self.fc).topk(k, dim=1).indices
            hit = top == y[:, None]
            counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), counts.new_tensor(len(y))])
        if self.world_size > 1:
            dist.all_reduce(counts)
        top1, top5, n = counts.tolist()
        return 100.0 * top1 / n, 100.0 * top5 / n

    def sanity_check(self) -> None:
        """The official sanity_check: the backbone is bit-identical to the loaded weights."""
        for k, v in self.backbone.state_dict().items():
            if not torch.equal(v.cpu(), self.pretrained.backbone[k]):
                raise RuntimeError(f"lincls changed the frozen backbone: {k} differs")

    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            self.log.close()

    def _fit(self) -> dict:
        cfg = self.cfg
        if self.is_main:
            print(
                f"fastmoco lincls: {cfg.preset} on {self.world_size} x {self.device.type}, "
                f"{self.pretrained.arch} -> {self.num_classes} classes, batch {cfg.batch_size}, "
                f"{len(self.train_loader)} steps/epoch, lr {shown(cfg.base_lr())}, out {self.out}",
                flush=True,
            )
        t_start = time.perf_counter()
        while self.epoch < cfg.epochs:
            t0 = time.perf_counter()
            loss, train_top1 = self.train_epoch()
            top1, top5 = self.validate()
            self.best_top1 = max(self.best_top1, top1)
            rec = dict(
                epoch=self.epoch,
                loss=loss,
                train_top1=train_top1,
                top1=top1,
                top5=top5,
                lr=lr_at(cfg, self.epoch),
                seconds=time.perf_counter() - t0,
            )
            self.history.append(rec)
            self.log.log("epoch", self.epoch + 1, **rec)
            if self.is_main:
                print(
                    f"epoch {self.epoch + 1}/{cfg.epochs}: loss {loss:.4f}, val top-1 "
                    f"{top1:.2f}%, top-5 {top5:.2f}% ({rec['seconds']:.1f} s)",
                    flush=True,
                )
            self.epoch += 1
            if self.is_main:
                ckpt.save_atomic(self.state(), self.out / ckpt.CHECKPOINT_NAME)
        self.sanity_check()
        last = self.history[-1] if self.history else {}
        results = {
            "out": str(self.out),
            "top1": last.get("top1"),
            "top5": last.get("top5"),
            "best_top1": self.best_top1,
            "history": self.history,
            "seconds": time.perf_counter() - t_start,
        }
        if self.is_main:
            print(
                f"linear classification on the val split: top-1 {results['top1']:.2f}%, "
                f"top-5 {results['top5']:.2f}% (best top-1 {self.best_top1:.2f}%); "
                f"backbone unchanged; run written to {self.out}",
                flush=True,
            )
        return results  # launch() hands rank 0's to the caller
