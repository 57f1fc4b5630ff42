"""Image reading with reproducible augmentation and clear errors for bad data.

What a root may be (a folder, labelled or not, an image list, a torchvision data set on
disk) is sources.py's; in an ImageFolder, classes are the sorted subdirectory names and
their position is the label (torchvision's layout).

Reproducibility: each augmented sample is a pure function of (seed, epoch, index). The CPU
random generator is forked and seeded from that triple around the transform, so the views
do not depend on the number of loader workers, on which worker loads which item, or on
what ran before; a run resumed mid-epoch sees exactly the views the uninterrupted run saw.
"""

import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from fastmoco.data.sources import IMG_EXTENSIONS, load_rgb, open_source
from fastmoco.errors import DataError

__all__ = ["IMG_EXTENSIONS", "ImageFolderDataset", "load_rgb", "scan_image_folder"]

# Consecutive unreadable files tolerated under skip_bad_images before giving up: a long run
# of them means a broken dataset, not a few bad files.
MAX_BAD_IN_A_ROW = 64
# What PIL raises on a corrupt, truncated, unsupported or vanished file.
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def scan_image_folder(root) -> tuple[list[tuple[str, int]], list[str]]:
    """(samples [(path or key, class index, -1 if unlabelled)], classes) of a split: see
    sources.open_source."""
    source = open_source(root)
    return source.samples, source.classes


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixed from the triple (SeedSequence hashes it, so nearby triples give
    unrelated streams, unlike seed + epoch + index would)."""
    entropy = [v % 2**64 for v in (seed, epoch, index)]  # SeedSequence wants v >= 0
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of a split (any sources.open_source root) whose item i is (transform(image),
    class index (-1 unlabelled), n_bad).

    n_bad is the number of unreadable files met while producing the item: 0 normally; with
    skip_bad_images, a bad file is replaced by the next readable one ((i + 1) % len, ...) so a
    batch keeps its shape, and the trainer sums n_bad to report how many were skipped.

    An index may be an int (using the epoch of set_epoch) or an (epoch, index) pair: the
    loader sends pairs because persistent workers hold their own copy of the dataset and
    never see a set_epoch made in the main process.
    """

    def __init__(
        self,
        root,
        transform: Callable[[Image.Image], object],
        skip_bad_images: bool = False,
        seed: int = 0,
    ):
        self.root = root
        self.source = open_source(root)
        self.samples, self.classes = self.source.samples, self.source.classes
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]):
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        img, target, n_bad = self._read(index)
        with torch.random.fork_rng(devices=[]):
            s = sample_seed(self.seed, epoch, index)
            torch.manual_seed(s)
            py_state = random.getstate()  # for user transforms that use `random`
            random.seed(s)
            try:
                sample = self.transform(img)
            finally:
                random.setstate(py_state)
        return sample, target, n_bad

    def _read(self, index: int) -> tuple[Image.Image, int, int]:
        """(image, its class, bad files met): the item itself, or its readable successor."""
        n = len(self.samples)
        for n_bad in range(min(n, MAX_BAD_IN_A_ROW)):
            path, target = self.samples[(index + n_bad) % n]
            try:
                return self.source.load(path), target, n_bad
            except _READ_ERRORS as e:
                if not self.skip_bad_images:
                    raise DataError(
                        f"cannot read image {path} ({type(e).__name__}: {e}): replace or "
                        "delete the file, or pass --skip-bad-images to skip unreadable images"
                    ) from e
        first = self.samples[index][0]
        raise DataError(
            f"{min(n, MAX_BAD_IN_A_ROW)} unreadable images in a row from {first}: the dataset "
            f"under {self.root} looks broken; check that its files are intact images"
        )


def unreadable_files(samples, indices, limit: int = 5) -> list[str]:
    """The unreadable files a batch of `indices` skipped (each item's file and, past it,
    the successors skip_bad_images moved on to, as ImageFolderDataset._read walks them), at
    most `limit`: names for the run's report, found by reading those files again (only for
    the rare batch that reported a skip)."""
    found, n = [], len(samples)
    for index in indices:
        for step in range(min(n, MAX_BAD_IN_A_ROW)):
            path = samples[(index + step) % n][0]
            if not isinstance(path, str):
                break  # a data set held in memory has no files to be unreadable
            try:
                load_rgb(path)
                break
            except _READ_ERRORS:
                if path not in found:
                    found.append(path)
                if len(found) >= limit:
                    return found
    return found
