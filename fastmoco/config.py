"""Training configuration: one dataclass, presets are instances of it, CLI flags override.

The resolved config is saved in every checkpoint and in the run directory.
"""

import dataclasses
import math
from dataclasses import dataclass

from fastmoco.errors import UsageError


@dataclass
class TrainConfig:
    preset: str = "mocov2"
    # moco (v1/v2: queue + key encoder), mocov3 (symmetric, in-batch, predictor), simclr
    # (end-to-end, nt_xent), membank (Wu et al. 2018), drlim (margin loss on pairs)
    method: str = "moco"
    # --- method (MoCo v2 paper values unless noted) ---
    arch: str = "resnet50"
    small_images: bool = False  # 3x3 stem, no max-pool: the CIFAR variant for 32-64 px
    dim: int = 128  # C, feature dimension
    # v2's MLP head width; None: the backbone's feature width, as the official v2 (dim_mlp =
    # fc.in_features: 2048 for ResNet-50, 512 for ResNet-18/34); 0: v1's fc head
    mlp_hidden: int | None = None
    queue_size: int = 65536  # K
    moco_m: float = 0.999  # m, key-encoder momentum
    temperature: float = 0.2  # T (v1: 0.07)
    shuffle_bn: bool = True
    bn_splits: int = 1  # BN groups per device; 8 simulates 8 GPUs on one (official CIFAR demo)
    moco_m_cos: bool = False  # v3: m rises from moco_m to 1 on a half cosine over training
    bank_m: float = 0.5  # membank: momentum of a stored feature's update (InstDisc)
    margin: float = 1.0  # drlim: distance dissimilar pairs are pushed to (unit embeddings)
    frozen_patch_proj: bool = False  # ViT: keep the random patch projection (v3's stop-grad)
    # --- data ---
    data: str | None = (
        None  # ImageFolder root (with train/ and val/ inside, or itself the train set)
    )
    recipe: str = "v2"  # augmentation: v1, v2 (aug+ with blur) or v3 (BYOL's pair)
    crop_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    workers: int = 8  # loader processes per rank; -1: half the cores this process may use
    skip_bad_images: bool = False
    loader: str = "auto"  # auto (DALI on CUDA when installed, else torch), dali, torch
    demo_seed: int = 0  # which procedurally drawn demo set, when --data is not given
    # --- optimisation ---
    epochs: int = 200
    batch_size: int = 256  # global, over all ranks
    lr: float = 0.03  # base lr; the lr used is effective_lr()
    # linear: lr x batch_size / 256 (Goyal et al. 2017, as moco-v3 does); none: lr as given
    # (the official v1/v2 main_moco.py, whose 0.03 is for batch 256)
    lr_scaling: str = "linear"
    optimizer: str = "sgd"  # sgd (v1/v2), lars (v3 ResNet), adamw (v3 ViT)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine (v2) or step (v1: x0.1 at lr_steps)
    lr_steps: tuple[int, ...] = (120, 160)
    warmup_epochs: float = 0.0
    amp: bool = False
    amp_dtype: str = "bf16"  # bf16, or fp16 with GradScaler (CUDA only)
    # None: on with --amp on CUDA (the mission pairs channels-last with AMP; NHWC lets
    # cuDNN run the AMP convolutions on tensor cores without transposes)
    channels_last: bool | None = None
    # the MoCo queue's dtype: auto = the AMP dtype under --amp (the fused InfoNCE then reads
    # bf16 keys on tensor cores), else fp32 (the official queue's dtype)
    queue_dtype: str = "auto"
    # auto: capture the step as one CUDA graph when the config allows (engine/step.py)
    cuda_graph: str = "auto"
    # --- evaluation: weighted kNN (InstDisc) on the val split ---
    knn_k: int = 200
    knn_t: float = 0.1
    # epochs between kNN runs; 0: off; None: the fewest epochs that keep the monitor's
    # images (bank + val) under 5% of the images training reads (eval.knn.knn_cadence)
    knn_every: int | None = None
    # the bank: at most this many train images, a fixed random subset (0: all); with
    # ImageNet's 50k val images a run reads 150k images, not 1.33M
    knn_bank: int = 100_000
    # --- run ---
    device: str = "auto"  # auto, cpu, cuda
    gpus: int = 1  # local processes, one per GPU (--gpus N spawns N ranks)
    out: str | None = None  # run directory; default runs/<preset>-<time>
    resume: str | None = None  # checkpoint path, a run directory, or "auto"
    seed: int = 0
    log_every: int = 10  # steps between reads of the loss (each read is a host sync)
    progress: bool = True
    # --- fault tolerance (docs/reliability.md) ---
    # steps between checkpoints besides each epoch's end (0: epoch ends only). 1000 bounds
    # what a crash loses to about a fifth of an ImageNet epoch (5005 steps at batch 256).
    save_every: int = 1000
    keep: int = 2  # checkpoints kept: checkpoint.pt, checkpoint.prev.pt, checkpoint.prev2.pt..
    trust_checkpoint: bool = False  # load --resume files with full unpickling (can run code)
    on_nonfinite: str = "stop"  # NaN/inf loss or gradient: stop (exit 3), or skip the step
    force: bool = False  # start over in an --out that holds a run, replacing it
    # K >= the training images puts an image's own stale key among its negatives (point of
    # docs/reliability.md, "small data"); refused unless allowed
    allow_repeated_negatives: bool = False

    def effective_lr(self) -> float:
        """The learning rate the schedule starts from (after warm-up)."""
        return self.lr * self.batch_size / 256 if self.lr_scaling == "linear" else self.lr

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**d)


PRESETS: dict[str, TrainConfig] = {
    # MoCo v1 (He et al. 2019): fc head, T=0.07, aug without blur, step LR at 120/160; the
    # official main_moco.py takes --lr as given.
    "mocov1": TrainConfig(
        preset="mocov1",
        mlp_hidden=0,
        temperature=0.07,
        recipe="v1",
        schedule="step",
        lr_scaling="none",
    ),
    # MoCo v2 (Chen et al. 2020): MLP head, T=0.2, aug+ (blur), cosine LR, --lr as given.
    "mocov2": TrainConfig(preset="mocov2", lr_scaling="none"),
    # The official MoCo CIFAR-10 demo (facebookresearch/moco, colab/moco_cifar10_demo.ipynb):
    # ResNet-18 with the 3x3 stem, fc head, shuffle BN over 8 simulated GPUs (SplitBatchNorm
    # 8), K=4096, m=0.99, T=0.1, SGD lr 0.06 at batch 512 as given, wd 5e-4, cosine, 200
    # epochs, v2's jitter without blur on 0.08-1 crops, CIFAR's mean/std, kNN k=200 t=0.1
    # every epoch (train split as the bank, test split as queries). Its log: 82.6% kNN top-1.
    "cifar": TrainConfig(
        preset="cifar",
        arch="resnet18",
        small_images=True,
        mlp_hidden=0,
        queue_size=4096,
        moco_m=0.99,
        temperature=0.1,
        bn_splits=8,
        recipe="cifar",
        crop_size=32,
        crop_scale=(0.08, 1.0),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
        epochs=200,
        batch_size=512,
        lr=0.06,
        lr_scaling="none",
        weight_decay=5e-4,
        knn_k=200,
        knn_t=0.1,
    ),
    # MoCo v3 (Chen et al. 2021), ResNet-50 recipe of the official code: projector
    # 2048-4096-256, predictor 256-4096-256, T=1.0, m 0.99 -> 1 (cosine), LARS lr 0.6 x
    # batch/256, wd 1e-6, batch 4096, 100 epochs with 10 of warm-up, crops 0.08-1, AMP.
    "mocov3": TrainConfig(
        preset="mocov3",
        method="mocov3",
        dim=256,
        mlp_hidden=4096,
        temperature=1.0,
        moco_m=0.99,
        moco_m_cos=True,
        shuffle_bn=False,
        optimizer="lars",
        lr=0.6,
        weight_decay=1e-6,
        batch_size=4096,
        epochs=100,
        warmup_epochs=10,
        crop_scale=(0.08, 1.0),
        recipe="v3",
        amp=True,
    ),
    # MoCo v3 ViT-S/16 (official README): AdamW lr 1.5e-4 x batch/256, wd 0.1, T=0.2,
    # 300 epochs with 40 of warm-up, frozen random patch projection (--stop-grad-conv1).
    "mocov3-vit": TrainConfig(
        preset="mocov3-vit",
        method="mocov3",
        arch="vit_small",
        dim=256,
        mlp_hidden=4096,
        temperature=0.2,
        moco_m=0.99,
        moco_m_cos=True,
        shuffle_bn=False,
        frozen_patch_proj=True,
        optimizer="adamw",
        lr=1.5e-4,
        weight_decay=0.1,
        batch_size=4096,
        epochs=300,
        warmup_epochs=40,
        crop_scale=(0.08, 1.0),
        recipe="v3",
        amp=True,
    ),
    # The embedded demo (docs/demo.md has the runs behind each choice): under 300 s on 2 CPU
    # cores with one of them busy. A narrow ResNet at 32 px (throughput buys epochs);
    # m=0.99 as the official CIFAR demo (m=0.9 let the key encoder track the query encoder
    # so closely that instance discrimination decayed after epoch 2 and the loss climbed
    # toward ln K); K=256, a sixth of the 1,500 images; batch 64 for 23 steps an epoch and
    # a one-epoch warm-up; shuffle BN over 2 simulated GPUs of 32; crops of at least half
    # the image so both views show the shape; kNN with k=20 (50 val images per class),
    # every 2nd epoch on cached eval tensors; loader workers and threads from the cores.
    "demo": TrainConfig(
        preset="demo",
        arch="resnet-tiny",
        small_images=True,
        mlp_hidden=512,
        queue_size=256,
        moco_m=0.99,
        temperature=0.2,
        bn_splits=2,
        crop_size=32,
        crop_scale=(0.5, 1.0),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        workers=-1,
        epochs=20,
        batch_size=64,
        lr=0.06,
        warmup_epochs=1,
        weight_decay=5e-4,
        knn_k=20,
        knn_every=2,
        save_every=0,  # a short run: the checkpoint at each epoch's end is enough
    ),
}


def _bad(name: str, value, need: str) -> UsageError:
    return UsageError(f"--{name.replace('_', '-')} {value}: must be {need}")


def check_numbers(cfg: TrainConfig) -> None:
    """Every numeric field in its range, as a one-line error naming the flag."""
    at_least_1 = ("epochs", "batch_size", "crop_size", "dim", "queue_size", "log_every")
    at_least_1 += ("keep", "gpus", "knn_k", "bn_splits")
    at_least_0 = ("workers", "mlp_hidden", "knn_every", "knn_bank", "save_every")
    for name in at_least_1 + at_least_0:
        v, low = getattr(cfg, name), 1 if name in at_least_1 else 0
        if v is None and name in ("knn_every", "mlp_hidden"):  # None: chosen automatically
            continue
        if name == "workers" and v == -1:  # -1: chosen from the cores (data.loader.cpu_plan)
            continue
        if not isinstance(v, int) or v < low:
            auto = " (or -1: chosen from the cores)" if name == "workers" else ""
            raise _bad(name, v, f"a whole number of at least {low}{auto}")
    for name in ("lr", "temperature", "knn_t"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v > 0):
            raise _bad(name, v, "a finite number above 0")
    for name in ("weight_decay", "warmup_epochs", "margin"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            raise _bad(name, v, "a finite number of at least 0")
    for name in ("moco_m", "momentum", "bank_m"):
        v = getattr(cfg, name)
        if not 0 <= v <= 1:  # NaN fails every comparison
            raise _bad(name, v, "a number in [0, 1]")
    lo, hi = cfg.crop_scale
    if not 0 < lo <= hi <= 1:
        raise _bad("crop_scale", f"{lo} {hi}", "MIN MAX with 0 < MIN <= MAX <= 1")
    if not all(math.isfinite(m) for m in cfg.mean) or len(cfg.mean) != 3:
        raise _bad("mean", " ".join(map(str, cfg.mean)), "three finite numbers")
    if not all(math.isfinite(s) and s > 0 for s in cfg.std) or len(cfg.std) != 3:
        raise _bad("std", " ".join(map(str, cfg.std)), "three finite numbers above 0")
    if any(e < 0 for e in cfg.lr_steps):
        raise _bad("lr_steps", " ".join(map(str, cfg.lr_steps)), "epochs of at least 0")
    if cfg.on_nonfinite not in ("stop", "skip"):
        raise _bad("on_nonfinite", cfg.on_nonfinite, "stop or skip")
