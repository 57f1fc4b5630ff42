"""Input pipeline: ImageFolder reading, the MoCo augmentation recipes, loaders (torchvision
DataLoader or DALI, see data/dali.py), demo dataset.

The demo names are imported on first use (module __getattr__) so that
`python -m fastmoco.data.demo` does not find its own module already imported by the package.
"""

from fastmoco.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    blur_kernel_size,
    eval_transform,
    two_view_transform,
)
from fastmoco.data.folder import IMG_EXTENSIONS, ImageFolderDataset, scan_image_folder
from fastmoco.data.loader import (
    LOADERS,
    TwoViewLoader,
    build_eval_loader,
    build_train_loader,
    build_two_view_loader,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "LOADERS",
    "DemoSpec",
    "ImageFolderDataset",
    "TwoViewLoader",
    "blur_kernel_size",
    "build_eval_loader",
    "build_train_loader",
    "build_two_view_loader",
    "demo_contact_sheet",
    "demo_dataset",
    "eval_transform",
    "scan_image_folder",
    "two_view_transform",
    "write_demo",
]

_DEMO_NAMES = ("DemoSpec", "demo_contact_sheet", "demo_dataset", "write_demo")


def __getattr__(name):
    if name in _DEMO_NAMES:
        from fastmoco.data import demo

        return getattr(demo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
