"""`fastmoco knn`: the kNN top-1 of a checkpoint's query backbone on DATA/train -> DATA/val."""

from pathlib import Path

import torch

from fastmoco.config import TrainConfig
from fastmoco.data import demo_dataset
from fastmoco.engine.checkpoint import load_checkpoint
from fastmoco.errors import UsageError
from fastmoco.models.moco import Encoder

from .knn import build_knn_loaders, knn_accuracy


def encoder_from_checkpoint(path: str | Path) -> tuple[Encoder, TrainConfig]:
    """The query encoder of a fastmoco checkpoint, weights loaded, and its training config."""
    s = load_checkpoint(path)
    if "encoder_q" not in s or "config" not in s:
        raise UsageError(
            f"{path} is not a fastmoco checkpoint (no 'encoder_q'/'config' entries); "
            "give the checkpoint.pt of a fastmoco run"
        )
    cfg = TrainConfig.from_dict(s["config"])
    enc = Encoder(
        cfg.arch,
        dim=cfg.dim,
        mlp_hidden=cfg.mlp_hidden,
        small_images=cfg.small_images,
        bn_splits=1,
    )
    enc.load_state_dict(s["encoder_q"])
    return enc, cfg


def knn_command(pretrained, *, data=None, k=200, t=0.1, batch_size=256, workers=4, device="auto"):
    enc, cfg = encoder_from_checkpoint(pretrained)
    root = Path(data) if data is not None else demo_dataset(seed=cfg.demo_seed)
    train_root, val_root = root / "train", root / "val"
    for p in (train_root, val_root):
        if not p.is_dir():
            raise UsageError(f"--data {root}: needs train/ and val/ subdirectories ({p} missing)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaders = build_knn_loaders(
        train_root,
        val_root,
        crop_size=cfg.crop_size,
        mean=cfg.mean,
        std=cfg.std,
        batch_size=batch_size,
        workers=workers,
    )
    num_classes = len(loaders[0].dataset.classes)
    enc.to(device)
    return knn_accuracy(
        enc.backbone, *loaders, device, num_classes=num_classes, k=k, t=t, progress=True
    )
