"""The MoCo augmentation recipes as torchvision transforms, with the papers' parameters.

MoCo v1 (He et al. 2019, "Momentum Contrast for Unsupervised Visual Representation
Learning", sec. 3.3 and the official main_moco.py) and MoCo v2's "aug+" (Chen et al. 2020,
"Improved Baselines with Momentum Contrastive Learning", sec. 2, which borrows SimCLR's
blur). Each training image gives two views, each drawn independently from the same
distribution; the positive pair of the contrastive loss is (view1, view2).

The transforms draw their randomness from torch's global CPU generator only, so the
dataset can make every view a pure function of (seed, epoch, index) by seeding that
generator around the call (see folder.ImageFolderDataset).
"""

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from fastmoco.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# RandomResizedCrop area range, both papers: "scale=(0.2, 1.)" (torchvision's default 0.08 is
# the supervised ImageNet one).
CROP_SCALE = (0.2, 1.0)
GRAYSCALE_P = 0.2  # v1 and v2
# v1: ColorJitter(0.4, 0.4, 0.4, 0.4) applied to every view.
V1_JITTER = (0.4, 0.4, 0.4, 0.4)
# v2 aug+: brightness, contrast, saturation 0.4, hue 0.1, applied with p=0.8 (SimCLR's "strong"
# jitter is 0.8/0.8/0.8/0.2; MoCo v2 keeps the milder v1 strengths).
V2_JITTER = (0.4, 0.4, 0.4, 0.1)
V2_JITTER_P = 0.8
# v2 aug+: Gaussian blur, sigma ~ U[0.1, 2.0], p=0.5 (SimCLR appendix A).
V2_BLUR_SIGMA = (0.1, 2.0)
V2_BLUR_P = 0.5
# SimCLR's kernel is 10% of the image side, made odd: 23 px at 224.
BLUR_KERNEL_FRACTION = 0.1

# Eval: Resize(256) + CenterCrop(224), i.e. the crop covers 87.5% of the resized side.
EVAL_CROP_FRACTION = 0.875

RECIPES = ("v1", "v2")


def blur_kernel_size(crop_size: int) -> int:
    """SimCLR's rule: about 10% of the crop side, odd, at least 3 (23 at 224, 3 at 32).

    The kernel shrinks with the crop so that a blurred 32-px view loses as much of its
    structure, relative to its size, as a blurred 224-px view does.
    """
    k = int(BLUR_KERNEL_FRACTION * crop_size)
    k += 1 - k % 2
    return max(k, 3)


def view_transform(
    recipe: str,
    crop_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_scale: tuple[float, float] = CROP_SCALE,
    blur_kernel: int | None = None,
) -> T.Compose:
    """One augmented view: PIL RGB image -> normalised float tensor (3, crop_size, crop_size)."""
    crop = T.RandomResizedCrop(crop_size, scale=crop_scale)
    tail = [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    if recipe == "v1":
        # Order as in the official v1 code: grayscale before jitter.
        middle = [T.RandomGrayscale(p=GRAYSCALE_P), T.ColorJitter(*V1_JITTER)]
    elif recipe == "v2":
        kernel = blur_kernel or blur_kernel_size(crop_size)
        if kernel < 1 or kernel % 2 == 0:
            raise UsageError(f"blur kernel {kernel}: must be an odd positive number of pixels")
        middle = [
            T.RandomApply([T.ColorJitter(*V2_JITTER)], p=V2_JITTER_P),
            T.RandomGrayscale(p=GRAYSCALE_P),
            T.RandomApply([T.GaussianBlur(kernel, sigma=V2_BLUR_SIGMA)], p=V2_BLUR_P),
        ]
    else:
        raise UsageError(f"augmentation recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    return T.Compose([crop, *middle, *tail])


class TwoViews:
    """img -> (view1, view2): the same transform applied twice, each call drawing afresh."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]):
        self.transform = transform

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(img), self.transform(img)

    def __repr__(self) -> str:
        return f"TwoViews({self.transform!r})"


def two_view_transform(
    recipe: str,
    crop_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_scale: tuple[float, float] = CROP_SCALE,
    blur_kernel: int | None = None,
) -> TwoViews:
    """The training transform of MoCo v1 ("v1") or v2 ("v2", aug+): img -> (view1, view2).

    blur_kernel (v2 only) defaults to blur_kernel_size(crop_size).
    """
    return TwoViews(view_transform(recipe, crop_size, mean, std, crop_scale, blur_kernel))


def eval_transform(
    crop_size: int = 224,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """Resize the short side, center-crop, normalise: the linear-eval / kNN val transform.

    resize_size defaults to round(crop_size / 0.875) (256 for 224); pass crop_size itself for
    small images that have no margin to spare (the CIFAR demo's convention).
    """
    resize = resize_size or round(crop_size / EVAL_CROP_FRACTION)
    return T.Compose(
        [T.Resize(resize), T.CenterCrop(crop_size), T.ToTensor(), T.Normalize(mean, std)]
    )
