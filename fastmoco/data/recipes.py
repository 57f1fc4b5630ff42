"""The augmentation recipes as data: one row per view, read by both pipeline builders
(augment.py: torchvision on the CPU; dali.py: NVIDIA DALI on the GPU).

Every view is RandomResizedCrop (area range: the run's crop_scale) -> the steps below ->
horizontal flip (p=0.5) -> ToTensor + Normalize. A recipe is a pair of ViewRecipes, one per
view: the same one twice for v1, v2 and cifar (two independent draws), two different ones
for v3 (BYOL's asymmetric pair). Adding a recipe is one row here; a builder supports a
recipe when it implements every field of its views (dali.unsupported says which it does
not), and the trainer's loader choice asks it.

Sources, each recipe as its official code composes it:
  v1    facebookresearch/moco main_moco.py (no --aug-plus): RandomGrayscale(0.2) then
        ColorJitter(0.4, 0.4, 0.4, 0.4), always applied.
  v2    main_moco.py --aug-plus (MoCo v2's "aug+", after SimCLR): RandomApply(ColorJitter(
        0.4, 0.4, 0.4, 0.1), p=0.8), RandomGrayscale(0.2), RandomApply(GaussianBlur(sigma
        U[0.1, 2]), p=0.5).
  cifar the official CIFAR-10 demo (colab/moco_cifar10_demo.ipynb): v2 without the blur.
  v3    facebookresearch/moco-v3 main_moco.py (BYOL's recipe): ColorJitter(0.4, 0.4, 0.2,
        0.1) p=0.8, RandomGrayscale(0.2), GaussianBlur p=1.0 (view 1) / 0.1 (view 2),
        Solarize (threshold 128) p=0 (view 1) / 0.2 (view 2).
The blur's kernel is SimCLR's, about 10 % of the crop (augment.blur_kernel_size); the
official code blurs with PIL's ImageFilter.GaussianBlur(radius=sigma) (docs/methods.md
says how the two compare).
"""

from dataclasses import dataclass

from fastmoco.errors import UsageError


@dataclass(frozen=True)
class ViewRecipe:
    """One view's colour and blur steps, applied in this order: [grayscale if
    grayscale_first], jitter, [grayscale], blur, solarize."""

    jitter: tuple[float, float, float, float]
    """ColorJitter's brightness, contrast, saturation and hue strengths"""
    jitter_p: float
    """probability that the jitter is applied (RandomApply; 1.0: always, as v1)"""
    grayscale_p: float
    """RandomGrayscale's probability"""
    grayscale_first: bool = False
    """grayscale before the jitter (v1's order) rather than after it"""
    blur_p: float = 0.0
    """probability of the Gaussian blur"""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """the blur's sigma range, drawn uniformly (SimCLR's)"""
    solarize_p: float = 0.0
    """probability of solarizing (inverting every channel value >= 128, PIL's threshold)"""


SOLARIZE_THRESHOLD = 128  # PIL's ImageOps.solarize default, which moco-v3's Solarize uses

_V1 = ViewRecipe(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, grayscale_p=0.2, grayscale_first=True)
_V2 = ViewRecipe(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
_CIFAR = ViewRecipe(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2)
_V3 = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2)

# name -> (view 1, view 2): the names of --recipe
RECIPES: dict[str, tuple[ViewRecipe, ViewRecipe]] = {
    "v1": (_V1, _V1),
    "v2": (_V2, _V2),
    "v3": (ViewRecipe(**_V3, blur_p=1.0), ViewRecipe(**_V3, blur_p=0.1, solarize_p=0.2)),
    "cifar": (_CIFAR, _CIFAR),
}


def views(recipe: str) -> tuple[ViewRecipe, ViewRecipe]:
    """The two views of a recipe name; a UsageError names the choices."""
    if recipe not in RECIPES:
        raise UsageError(f"augmentation recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    return RECIPES[recipe]
