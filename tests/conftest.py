"""Shared fixtures: tiny ImageFolder trees drawn on the fly (fast, no demo generation)."""

import os
import shutil

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any
# test module imports fastmoco.kernels. Without a GPU driver the kernels run in the
# interpreter on CPU tensors (backend="triton"); with one they compile for the GPU.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fastmoco.config import TrainConfig

torch.set_num_threads(2)


def write_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 24, seed=0):
    """A class-separable set: class c draws c+1 bars, on a noisy background."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            bg = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
            img = Image.fromarray(bg)
            draw = ImageDraw.Draw(img)
            for b in range(c + 1):
                x = 2 + b * (size // (classes + 1))
                draw.rectangle([x, 3, x + 2, size - 4], fill=(230, 230, 230))
            img.save(d / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """DIR with train/ (3 x 12 images) and val/ (3 x 4 images)."""
    write_image_folder(tmp_path / "data" / "train", per_class=12, seed=0)
    write_image_folder(tmp_path / "data" / "val", per_class=4, seed=1)
    return tmp_path / "data"


def tiny_train_config(data, out, **kw) -> TrainConfig:
    """A run that trains in seconds on tiny_data: resnet-tiny at 16 px, 2 epochs of
    batch 8, K=64, shuffle BN over 2 groups; kw overrides any field."""
    base = TrainConfig(
        preset="test",
        arch="resnet-tiny",
        small_images=True,
        dim=16,
        mlp_hidden=32,
        queue_size=64,
        moco_m=0.9,
        temperature=0.2,
        bn_splits=2,
        crop_size=16,
        workers=0,
        epochs=2,
        batch_size=8,
        lr=0.06,
        knn_k=5,
        knn_every=1,
        data=str(data),
        out=str(out),
        progress=False,
        log_every=2,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        device="cpu",
        # K=64 over 36 images: the tests want the queue to wrap within a few steps
        allow_repeated_negatives=True,
    )
    return base.replace(**kw)
