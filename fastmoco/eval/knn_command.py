"""`fastmoco knn`: the kNN top-1 of a pre-trained backbone on DATA/train -> DATA/val.

--pretrained takes any layout checkpoint_io reads: a fastmoco checkpoint.pt, an official
MoCo checkpoint, a torchvision ResNet state_dict.
"""

import torch

from fastmoco.data import demo_dataset
from fastmoco.data.sources import splits
from fastmoco.engine.checkpoint_io import describe, image_settings, load_backbone
from fastmoco.errors import UsageError

from .knn import build_knn_loaders, knn_accuracy


def knn_command(
    pretrained,
    *,
    data=None,
    k=None,
    t=None,
    batch_size=256,
    workers=4,
    device="auto",
    arch=None,
    crop_size=None,
    verbose=True,
    trust=False,
) -> float:
    """kNN top-1 (%) of the checkpoint's backbone; data defaults to the demo set it names,
    k and t to its training run's monitor (fastmoco checkpoints), else InstDisc's 200 and 0.1,
    so the number equals the one the run reported."""
    backbone, _, p = load_backbone(pretrained, arch, trust)
    monitor = p.config or {}
    k = k or monitor.get("knn_k", 200)
    t = t or monitor.get("knn_t", 0.1)
    if verbose:
        print(describe(p, missing=[]), flush=True)
        print(f"kNN: k={k}, t={t}", flush=True)
    img = image_settings(p)
    root = data if data is not None else demo_dataset(seed=img["demo_seed"])
    train_split, val_split = splits(root)
    if val_split is None:
        raise UsageError(
            f"--data {root}: needs train/ and val/ subdirectories (or cifar10:DIR, "
            "cifar100:DIR, stl10:DIR)"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaders = build_knn_loaders(
        train_split,
        val_split,
        crop_size=crop_size or img["crop_size"],
        mean=img["mean"],
        std=img["std"],
        batch_size=batch_size,
        workers=workers,
    )
    classes, val_classes = loaders[0].dataset.classes, loaders[1].dataset.classes
    if classes != val_classes:  # a label index would name different classes in the splits
        raise UsageError(
            f"train/ and val/ under {root} have different classes ({len(classes)} vs "
            f"{len(val_classes)}): both need the same class subdirectories"
        )
    num_classes = len(classes)
    backbone.to(device)
    return knn_accuracy(
        backbone, *loaders, device, num_classes=num_classes, k=k, t=t, progress=verbose
    )
