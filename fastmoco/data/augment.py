"""The MoCo augmentation recipes as torchvision transforms, with the papers' parameters.

MoCo v1 (He et al. 2019, "Momentum Contrast for Unsupervised Visual Representation
Learning", sec. 3.3 and the official main_moco.py) and MoCo v2's "aug+" (Chen et al. 2020,
"Improved Baselines with Momentum Contrastive Learning", sec. 2, which borrows SimCLR's
blur): each training image gives two views, each drawn independently from the same
distribution; the positive pair of the contrastive loss is (view1, view2).
MoCo v3 (Chen, Xie, He 2021; the official moco-v3 main_moco.py) takes BYOL's asymmetric
pair: both views jitter 0.4/0.4/0.2/0.1 (p=0.8) and grayscale (p=0.2); view 1 is always
blurred, view 2 blurred with p=0.1 and solarized with p=0.2. Its crop scale, 0.08-1, is
the preset's crop_scale.

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

# v3 (BYOL's recipe in moco-v3): jitter strengths, blur and solarize p per view.
V3_JITTER = (0.4, 0.4, 0.2, 0.1)
V3_BLUR_P = (1.0, 0.1)
V3_SOLARIZE_P = (0.0, 0.2)
SOLARIZE_THRESHOLD = 128  # PIL's ImageOps.solarize default, as moco-v3's Solarize uses

# cifar: v2 without the blur, the official MoCo CIFAR-10 demo's augmentation (a 3-px blur
# would erase much of a 32-px image).
RECIPES = ("v1", "v2", "v3", "cifar")


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
    view: int = 0,
) -> T.Compose:
    """One augmented view: PIL RGB image -> normalised float tensor (3, crop_size, crop_size).

    view (0 or 1) only matters for v3, whose two views follow different recipes."""
    crop = T.RandomResizedCrop(crop_size, scale=crop_scale)
    tail = [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    if recipe not in RECIPES:
        raise UsageError(f"augmentation recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    if recipe == "v1":
        # Order as in the official v1 code: grayscale before jitter.
        return T.Compose([crop, T.RandomGrayscale(p=GRAYSCALE_P), T.ColorJitter(*V1_JITTER), *tail])
    kernel = blur_kernel or blur_kernel_size(crop_size)
    if kernel < 1 or kernel % 2 == 0:
        raise UsageError(f"blur kernel {kernel}: must be an odd positive number of pixels")
    blur = T.GaussianBlur(kernel, sigma=V2_BLUR_SIGMA)  # sigma U[0.1, 2] in v2 and v3
    if recipe in ("v2", "cifar"):
        middle = [
            T.RandomApply([T.ColorJitter(*V2_JITTER)], p=V2_JITTER_P),
            T.RandomGrayscale(p=GRAYSCALE_P),
        ]
        if recipe == "v2":
            middle.append(T.RandomApply([blur], p=V2_BLUR_P))
    else:
        middle = [
            T.RandomApply([T.ColorJitter(*V3_JITTER)], p=V2_JITTER_P),
            T.RandomGrayscale(p=GRAYSCALE_P),
            T.RandomApply([blur], p=V3_BLUR_P[view]),
            T.RandomSolarize(SOLARIZE_THRESHOLD, p=V3_SOLARIZE_P[view]),
        ]
    return T.Compose([crop, *middle, *tail])


class TwoViews:
    """img -> (view1, view2): transform1 then transform2 (the same one unless the recipe is
    asymmetric), each call drawing afresh."""

    def __init__(
        self,
        transform: Callable[[Image.Image], torch.Tensor],
        transform2: Callable[[Image.Image], torch.Tensor] | None = None,
    ):
        self.transform = transform
        self.transform2 = transform2 or transform

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(img), self.transform2(img)

    def __repr__(self) -> str:
        if self.transform2 is self.transform:
            return f"TwoViews({self.transform!r})"
        return f"TwoViews({self.transform!r}, {self.transform2!r})"


def two_view_transform(
    recipe: str,
    crop_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_scale: tuple[float, float] = CROP_SCALE,
    blur_kernel: int | None = None,
) -> TwoViews:
    """The training transform of MoCo v1 ("v1"), v2 ("v2", aug+) or v3 ("v3", BYOL's
    asymmetric pair): img -> (view1, view2).

    blur_kernel (v2, v3) defaults to blur_kernel_size(crop_size).
    """
    first = view_transform(recipe, crop_size, mean, std, crop_scale, blur_kernel, view=0)
    if recipe != "v3":
        return TwoViews(first)
    return TwoViews(first, view_transform(recipe, crop_size, mean, std, crop_scale, blur_kernel, 1))


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
