"""`fastmoco knn`: the kNN top-1 of a pre-trained backbone on DATA/train -> DATA/val.

--pretrained takes any layout checkpoint_io reads: a fastmoco checkpoint.pt, an official
MoCo checkpoint, a torchvision ResNet state_dict.
"""

import argparse
from pathlib import Path

import torch

from fastmoco.data import demo_dataset
from fastmoco.errors import UsageError

from .checkpoint_io import describe, image_settings, load_backbone
from .knn import build_knn_loaders, knn_accuracy


def knn_command(
    pretrained,
    *,
    data=None,
    k=200,
    t=0.1,
    batch_size=256,
    workers=4,
    device="auto",
    arch=None,
    crop_size=None,
    verbose=True,
) -> float:
    """kNN top-1 (%) of the checkpoint's backbone; data defaults to the demo set it names."""
    backbone, _, p = load_backbone(pretrained, arch)
    if verbose:
        print(describe(p, missing=[]), flush=True)
    img = image_settings(p)
    root = Path(data) if data is not None else demo_dataset(seed=img["demo_seed"])
    train_root, val_root = root / "train", root / "val"
    for d in (train_root, val_root):
        if not d.is_dir():
            raise UsageError(f"--data {root}: needs train/ and val/ subdirectories ({d} missing)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaders = build_knn_loaders(
        train_root,
        val_root,
        crop_size=crop_size or img["crop_size"],
        mean=img["mean"],
        std=img["std"],
        batch_size=batch_size,
        workers=workers,
    )
    num_classes = len(loaders[0].dataset.classes)
    backbone.to(device)
    return knn_accuracy(
        backbone, *loaders, device, num_classes=num_classes, k=k, t=t, progress=verbose
    )


def add_knn_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "knn",
        help="weighted kNN top-1 of a checkpoint's encoder",
        description="Weighted kNN (k=200, t=0.1) of a checkpoint's query backbone: DATA/train "
        "is the memory bank, DATA/val the queries. --pretrained takes a fastmoco checkpoint.pt, "
        "an official MoCo checkpoint or a torchvision ResNet state_dict.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", help="ImageFolder root with train/ and val/ (default: the demo set)")
    p.add_argument("--pretrained", required=True, help="checkpoint file (any supported layout)")
    p.add_argument("--arch", help="backbone, for files that do not name one (inferred if absent)")
    p.add_argument("--crop-size", type=int, help="eval crop (default: the checkpoint's, else 224)")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--t", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p


def cmd_knn(args) -> int:
    top1 = knn_command(
        args.pretrained,
        data=args.data,
        k=args.k,
        t=args.t,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        arch=args.arch,
        crop_size=args.crop_size,
    )
    print(f"kNN top-1: {top1:.2f}% (k={args.k}, t={args.t}, {args.pretrained})")
    return 0
