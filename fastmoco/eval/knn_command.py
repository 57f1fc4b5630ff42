"""`fastmoco knn`: the kNN top-1 of a pre-trained backbone on DATA/train -> DATA/val.

--pretrained takes any layout checkpoint_io reads (a fastmoco checkpoint.pt, an official
MoCo checkpoint, a torchvision ResNet state_dict, with its sidecar when it has one) or a
run directory (its newest loadable checkpoint). The evaluation takes from the file what it
records: crop size and normalisation (the eval transform), the demo set it was trained on
(without --data) and k, t of its training run's kNN monitor, so that the number equals
the one the run reported. Its first lines print each setting and where it came from; a
--crop-size that contradicts the recorded crop is refused unless
--override-checkpoint-settings.

k larger than the bank: a --k typed on the command line is refused (it cannot be honoured);
a k taken from the checkpoint or the default is clamped to the bank, with a note, as the
training monitor does (knn_predict), so the two numbers still agree.
"""

import math

import torch

from fastmoco.data import demo_dataset
from fastmoco.data.sources import splits
from fastmoco.engine.checkpoint_io import (
    Setting,
    choose_setting,
    describe,
    load_backbone,
    settings_of,
    shown,
)
from fastmoco.engine.knn import build_knn_loaders, knn_accuracy
from fastmoco.errors import UsageError


def check_knn_flags(*, k, t, batch_size, workers, crop_size) -> None:
    """The checks train applies to the same values (TrainConfig.check), before any file is
    read: a UsageError naming the flag."""
    for flag, v in (("--k", k), ("--batch-size", batch_size), ("--crop-size", crop_size)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} {v}: must be a whole number of at least 1")
    if workers < 0:
        raise UsageError(f"--workers {workers}: must be a whole number of at least 0")
    if t is not None and not (math.isfinite(t) and t > 0):
        raise UsageError(f"--t {t}: must be a finite number above 0")


def format_settings(settings: dict[str, Setting]) -> str:
    """'name value (source), ...' in the order given."""
    return ", ".join(f"{name} {shown(s.value)} ({s.source})" for name, s in settings.items())


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
    override=False,
) -> float:
    """kNN top-1 (%) of the checkpoint's backbone; data defaults to the demo set it names,
    k and t to its training run's monitor (fastmoco checkpoints and their exports), else
    InstDisc's 200 and 0.1, so the number equals the one the run reported.
    override: let --crop-size contradict the checkpoint (--override-checkpoint-settings)."""
    check_knn_flags(k=k, t=t, batch_size=batch_size, workers=workers, crop_size=crop_size)
    backbone, _, p = load_backbone(pretrained, arch, trust)
    recorded = settings_of(p)
    crop = choose_setting("--crop-size", crop_size, recorded["crop_size"], override)
    used = {
        "crop": crop,
        # below 64 px there is no resize margin to spare (build_knn_loaders)
        "resize": Setting(crop.value, "the crop: below 64 px")
        if crop.value < 64
        else Setting(round(crop.value / 0.875), "crop / 0.875"),
        "mean": recorded["mean"],
        "std": recorded["std"],
        "k": Setting(k, "flag") if k is not None else recorded["knn_k"],
        "t": Setting(t, "flag") if t is not None else recorded["knn_t"],
        "features": Setting("backbone", "always"),
    }
    if data is not None:
        root, data_source = data, "flag"
    else:
        seed = recorded["demo_seed"]
        root, data_source = demo_dataset(seed=seed.value), f"demo set, seed {shown(seed.value)}"
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
        crop_size=crop.value,
        mean=used["mean"].value,
        std=used["std"].value,
        batch_size=batch_size,
        workers=workers,
    )
    classes, val_classes = loaders[0].dataset.classes, loaders[1].dataset.classes
    if classes != val_classes:  # a label index would name different classes in the splits
        raise UsageError(
            f"train/ and val/ under {root} have different classes ({len(classes)} vs "
            f"{len(val_classes)}): both need the same class subdirectories"
        )
    n_bank, n_val = len(loaders[0].dataset), len(loaders[1].dataset)
    if used["k"].value > n_bank:
        if k is not None:
            raise UsageError(
                f"--k {k}: more neighbours than the bank holds ({n_bank} images in "
                f"{train_split}); give --k {n_bank} or less"
            )
        used["k"] = Setting(n_bank, f"{used['k'].source} {used['k'].value}, clamped to the bank")
    if verbose:
        print(describe(p, missing=[]), flush=True)
        print(f"settings: {format_settings(used)}", flush=True)
        if p.config and p.config.get("knn_features", "backbone") != "backbone":
            print(
                f"note: the run's monitor compared {p.config['knn_features']} features; this "
                "compares the backbone's, so the numbers differ",
                flush=True,
            )
        print(
            f"kNN: k={used['k'].value}, t={shown(used['t'].value)}; data {root} ({data_source}): "
            f"bank {n_bank} images, {n_val} queries, {len(classes)} classes",
            flush=True,
        )
    backbone.to(device)
    return knn_accuracy(
        backbone,
        *loaders,
        device,
        num_classes=len(classes),
        k=used["k"].value,
        t=used["t"].value,
        progress=verbose,
    )
