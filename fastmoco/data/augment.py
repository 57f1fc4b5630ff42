"""The MoCo augmentation recipes as torchvision transforms, built from data/recipes.py.

Each training image gives two views, each drawn from its ViewRecipe (the same one twice but
for v3's asymmetric pair); the positive pair of the contrastive loss is (view1, view2).

The transforms draw their randomness from torch's global CPU generator only, so the
dataset can make every view a pure function of (seed, epoch, index) by seeding that
generator around the call (see folder.ImageFolderDataset).
"""

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from fastmoco.data.recipes import RECIPES, SOLARIZE_THRESHOLD, ViewRecipe, views
from fastmoco.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# RandomResizedCrop area range of v1/v2: "scale=(0.2, 1.)" (torchvision's default 0.08 is
# the supervised ImageNet one); a run's crop_scale sets it.
CROP_SCALE = (0.2, 1.0)
# SimCLR's blur kernel is 10% of the image side, made odd: 23 px at 224.
BLUR_KERNEL_FRACTION = 0.1
# Eval: Resize(256) + CenterCrop(224), i.e. the crop covers 87.5% of the resized side.
EVAL_CROP_FRACTION = 0.875

__all__ = ["RECIPES", "TwoViews", "blur_kernel_size", "eval_transform", "two_view_transform"]


def blur_kernel_size(crop_size: int) -> int:
    """SimCLR's rule: about 10% of the crop side, odd, at least 3 (23 at 224, 3 at 32).

    The kernel shrinks with the crop so that a blurred 32-px view loses as much of its
    structure, relative to its size, as a blurred 224-px view does.
    """
    k = int(BLUR_KERNEL_FRACTION * crop_size)
    k += 1 - k % 2
    return max(k, 3)


def view_steps(view: ViewRecipe, crop_size: int, blur_kernel: int | None = None) -> list:
    """The colour and blur steps of one view, in the recipe's order (recipes.ViewRecipe)."""
    jitter = T.ColorJitter(*view.jitter)
    gray = T.RandomGrayscale(p=view.grayscale_p)
    steps = [gray] if view.grayscale_first else []
    steps.append(jitter if view.jitter_p >= 1 else T.RandomApply([jitter], p=view.jitter_p))
    if not view.grayscale_first:
        steps.append(gray)
    if view.blur_p > 0:
        kernel = blur_kernel or blur_kernel_size(crop_size)
        if kernel < 1 or kernel % 2 == 0:
            raise UsageError(f"blur kernel {kernel}: must be an odd positive number of pixels")
        # RandomApply even at p=1, as moco-v3 composes its view 1 (it draws one number)
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=view.blur_sigma)], p=view.blur_p))
    if view.solarize_p > 0:
        steps.append(T.RandomSolarize(SOLARIZE_THRESHOLD, p=view.solarize_p))
    return steps


def view_transform(
    recipe: str,
    crop_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_scale: tuple[float, float] = CROP_SCALE,
    blur_kernel: int | None = None,
    view: int = 0,
) -> T.Compose:
    """One augmented view (0 or 1) of a recipe: PIL RGB image -> normalised float tensor
    (3, crop_size, crop_size)."""
    steps = view_steps(views(recipe)[view], crop_size, blur_kernel)
    return T.Compose(
        [
            T.RandomResizedCrop(crop_size, scale=crop_scale),
            *steps,
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


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
    """The training transform of a recipe (data/recipes.py): img -> (view1, view2).

    blur_kernel (the recipes with a blur) defaults to blur_kernel_size(crop_size).
    """
    one, two = views(recipe)
    args = (recipe, crop_size, mean, std, crop_scale, blur_kernel)
    first = view_transform(*args, view=0)
    return TwoViews(first, None if two == one else view_transform(*args, view=1))


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
