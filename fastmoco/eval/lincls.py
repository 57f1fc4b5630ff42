"""`fastmoco lincls`: linear classification on a frozen pre-trained backbone.

The protocol of MoCo v1/v2 (facebookresearch/moco main_lincls.py):

    backbone <- pre-trained query encoder without its head, frozen, kept in eval mode
    fc       <- Linear(feat_dim, classes), weight ~ N(0, 0.01^2), bias 0   (re-initialised)
    for epoch in 1..100:                       # lr 30, x0.1 at epochs 60 and 80
        for x, y in train (RandomResizedCrop(224) + flip), batch 256:
            loss = CE(fc(backbone(x)), y)      # SGD on fc only: momentum 0.9, wd 0
        top-1 / top-5 on val (Resize 256 + CenterCrop 224)

Eval mode matters: BatchNorm in train mode would rewrite its running statistics from the
new data even without gradients, and they are part of the pre-trained model. After the
last epoch every backbone tensor is compared with the loaded one (the official
sanity_check). The lr is used as given, not scaled with the batch (as in the official
code).

Engineering, where it changes nothing in the result: the backbone runs under no_grad
(no activations kept for a backward it never gets), under autocast with --amp, and only
fc is wrapped in DDP, so only fc's gradients are all-reduced. fc itself stays fp32, so fp16
AMP needs no GradScaler. Each epoch drops the last partial global batch (every rank takes
the same number of full batches, as in training); the official sampler keeps it.
"""

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchvision import transforms as T
from tqdm import tqdm

from fastmoco.data import ImageFolderDataset, build_eval_loader, demo_dataset
from fastmoco.data.loader import collate_eval
from fastmoco.data.sampler import ShardedBatchSampler
from fastmoco.data.sources import ImageSource, bank_split, open_source, splits
from fastmoco.engine import checkpoint as ckpt
from fastmoco.engine.checkpoint_io import (
    Pretrained,
    build_pretrained_backbone,
    describe,
    image_settings,
    read_pretrained,
)
from fastmoco.engine.distributed import launch, local_device, resolve_device
from fastmoco.engine.metrics import MetricsLog
from fastmoco.errors import UsageError
from fastmoco.ops.distributed import world

FC_KEYS = ["fc.weight", "fc.bias"]


@dataclass
class LinclsConfig:
    preset: str = "official"
    pretrained: str | None = None  # checkpoint of any layout checkpoint_io reads
    arch: str | None = None  # for files that name none (else read off the keys)
    # DIR with labelled train/ and val/ (ImageFolders), or cifar10:DIR, cifar100:DIR,
    # stl10:DIR (train -> test); None: the demo set
    data: str | None = None
    # --- protocol (main_lincls.py defaults) ---
    epochs: int = 100
    batch_size: int = 256  # global, over all ranks
    lr: float = 30.0  # used as given, not scaled by batch/256
    lr_steps: tuple[int, ...] = (60, 80)  # x0.1 at these epochs
    momentum: float = 0.9
    weight_decay: float = 0.0
    crop_size: int = 224  # train RandomResizedCrop and val CenterCrop
    crop_scale: tuple[float, float] = (0.08, 1.0)  # torchvision's default, as the official
    resize_size: int | None = None  # val Resize; None: crop/0.875 (256), the crop below 64 px
    mean: tuple[float, float, float] | None = None  # None: the checkpoint's, else ImageNet
    std: tuple[float, float, float] | None = None
    workers: int = 8
    # --- run ---
    amp: bool = False  # the backbone under autocast; fc stays fp32
    amp_dtype: str = "bf16"
    channels_last: bool = False
    device: str = "auto"
    gpus: int = 1
    out: str | None = None  # default runs/lincls-<preset>-<time>
    resume: str | None = None  # checkpoint path, run directory, or "auto"
    seed: int = 0
    progress: bool = True
    trust_checkpoint: bool = (
        False  # unpickle --pretrained fully (can run code: docs/reliability.md)
    )

    def replace(self, **changes) -> "LinclsConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, LinclsConfig] = {
    # MoCo v1/v2 linear classification on ImageNet (main_lincls.py).
    "official": LinclsConfig(preset="official"),
    # The demo set (32-px crops of 64-px images, 10 classes, 1,500 train images): about a
    # minute on 2 CPU cores. Crops of at least half the image as in the demo pre-training
    # (smaller ones often miss the shape, the only class cue); measured choices in
    # docs/eval.md.
    "demo": LinclsConfig(
        preset="demo",
        epochs=15,
        lr_steps=(9, 12),
        batch_size=128,
        lr=0.3,
        crop_size=32,
        crop_scale=(0.5, 1.0),
        workers=2,
    ),
}


def lr_at(cfg: LinclsConfig, epoch: int) -> float:
    return cfg.lr * 0.1 ** sum(epoch >= s for s in cfg.lr_steps)


def check_config(cfg: LinclsConfig) -> None:
    if not cfg.pretrained:
        raise UsageError("--pretrained is required: the checkpoint whose backbone to evaluate")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise UsageError("--epochs and --batch-size must be at least 1")
    if cfg.lr <= 0:
        raise UsageError(f"--lr {cfg.lr}: must be positive")
    if cfg.batch_size % cfg.gpus:
        raise UsageError(
            f"--batch-size {cfg.batch_size} is global and must divide evenly over --gpus {cfg.gpus}"
        )
    if cfg.amp and cfg.amp_dtype not in ("bf16", "fp16"):
        raise UsageError(f"--amp-dtype {cfg.amp_dtype!r}: choose bf16 or fp16")


def resolve_config(cfg: LinclsConfig, p: Pretrained) -> LinclsConfig:
    """The arch, and the normalisation the encoder was trained with unless given."""
    img = image_settings(p)
    return cfg.replace(arch=p.arch, mean=cfg.mean or img["mean"], std=cfg.std or img["std"])


def lincls(cfg: LinclsConfig) -> dict:
    """Check the inputs, then train fc on every rank; returns rank 0's results."""
    device = resolve_device(cfg.device, cfg.gpus)
    check_config(cfg)
    if cfg.amp and cfg.amp_dtype == "fp16" and device != "cuda":
        raise UsageError("--amp-dtype fp16 needs CUDA; use bf16 on the CPU")
    p = read_pretrained(cfg.pretrained, cfg.arch, cfg.trust_checkpoint)  # fails early if bad
    build_pretrained_backbone(p)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process gets here
        print(describe(p, missing=FC_KEYS) + " (re-initialised: N(0, 0.01^2), bias 0)", flush=True)
    cfg = resolve_config(cfg, p)
    root = cfg.data if cfg.data is not None else demo_dataset(seed=image_settings(p)["demo_seed"])
    train, val = labelled_splits(root)
    if cfg.batch_size > len(train.samples):
        raise UsageError(
            f"--batch-size {cfg.batch_size} is larger than the train split "
            f"({len(train.samples)} images in {train.spec}); lower --batch-size"
        )
    out, resume_path = ckpt.prepare_run_dir(cfg.out, cfg.resume, f"lincls-{cfg.preset}")
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
        cfg = resolve_config(cfg, self.pretrained)
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
                f"{len(self.train_loader)} steps/epoch, lr {cfg.lr}, out {self.out}",
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
