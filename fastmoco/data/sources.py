"""What `--data` names, and the images, labels and splits behind it.

    DIR                    a folder of images. With class subdirectories and no images of
                           its own it is torchvision's ImageFolder (DIR/<class>/**/<image>,
                           labelled); a folder with images of its own, flat or nested at any
                           depth, is an unlabelled set (label -1).
    DIR with train/ (val/) the splits: train/ for training (and the kNN bank), val/ for the
                           kNN queries and linear evaluation.
    LIST                   a text file of image paths, one a line (blank lines and '#'
                           comments skipped; relative paths are relative to the list's
                           folder), as clusters often keep: an unlabelled train set.
    cifar10:DIR, cifar100:DIR, stl10:DIR
                           torchvision's on-disk formats (download=False): CIFAR's
                           python pickles under DIR/cifar-10-batches-py or
                           DIR/cifar-100-python, STL-10's binaries under DIR/stl10_binary.
                           Training uses the train split (STL-10: train+unlabeled, the
                           105,000 images SSL methods pre-train on); the kNN bank is the
                           labelled train split and the queries the test split.

Labels serve only evaluation: an unlabelled train set trains, and the kNN monitor is then
skipped with a message. A split is passed between processes as its spec string, e.g.
"/data/imagenet/train" or "cifar10:/data/cifar#test".
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS as TORCHVISION_EXTENSIONS

from fastmoco.errors import DataError

IMG_EXTENSIONS = TORCHVISION_EXTENSIONS  # what torchvision's ImageFolder accepts, any case

# name -> (torchvision class, folder inside DIR, train split, bank split, val split, where to
# get the files)
NAMED_SETS = {
    "cifar10": (
        "CIFAR10",
        "cifar-10-batches-py",
        "train",
        "train",
        "test",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": (
        "CIFAR100",
        "cifar-100-python",
        "train",
        "train",
        "test",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
    "stl10": (
        "STL10",
        "stl10_binary",
        "train+unlabeled",
        "train",
        "test",
        "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
    ),
}
_NAMED = re.compile(rf"^({'|'.join(NAMED_SETS)}):(.+?)(?:#([\w+]+))?$")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def load_rgb(path: str) -> Image.Image:
    """Decode the whole file now (PIL is lazy) so that corruption shows up here."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


@dataclass
class ImageSource:
    """The images of one split: samples [(key, class index or -1)], classes ([] when
    unlabelled), and load(key) -> RGB image. key is a file path, or an index into `arrays`
    (a torchvision data set held in memory)."""

    spec: str
    samples: list[tuple[object, int]]
    classes: list[str]
    arrays: object = field(default=None, repr=False)
    missing: list[str] = field(default_factory=list)  # an image list's paths that do not exist

    @property
    def labelled(self) -> bool:
        return bool(self.classes) and all(target >= 0 for _, target in self.samples)

    @property
    def in_memory(self) -> bool:
        return self.arrays is not None

    def load(self, key) -> Image.Image:
        return self.arrays[key][0].convert("RGB") if self.in_memory else load_rgb(key)


def parse_named(spec) -> tuple[str, Path, str | None] | None:
    """(name, DIR, split or None) of 'cifar10:DIR[#split]', else None."""
    m = _NAMED.match(str(spec))
    return (m.group(1), Path(m.group(2)), m.group(3)) if m else None


def resolved(spec) -> str | None:
    """A --data value with its path absolute (a named set's DIR, its name and split kept),
    so that a saved recipe names the same data from any working directory; None stays None
    (the embedded demo set)."""
    if spec is None:
        return None
    named = parse_named(spec)
    if named is not None:
        name, root, split = named
        return f"{name}:{Path(root).expanduser().resolve()}" + (f"#{split}" if split else "")
    return str(Path(spec).expanduser().resolve())


def is_in_memory(spec) -> bool:
    """Whether spec names a torchvision data set (read into memory, no image files)."""
    return parse_named(spec) is not None


def splits(data) -> tuple[str, str | None]:
    """(train spec, val spec or None) of a --data value (see the module docstring)."""
    named = parse_named(data)
    if named is not None:
        name, root, _ = named
        _, _, train, _, val, _ = NAMED_SETS[name]
        return f"{name}:{root}#{train}", f"{name}:{root}#{val}"
    root = Path(data)
    if (root / "train").is_dir():
        val = root / "val"
        return str(root / "train"), str(val) if val.is_dir() else None
    return str(root), None


def bank_split(train_spec) -> str:
    """The labelled split the kNN monitor uses as its bank: the train split itself, except
    for STL-10, whose train+unlabeled bank would be mostly unlabelled."""
    named = parse_named(train_spec)
    if named is None:
        return str(train_spec)
    name, root, _ = named
    return f"{name}:{root}#{NAMED_SETS[name][3]}"


def bank_is_labelled(train: ImageSource) -> bool:
    """Whether the kNN monitor has labels for the bank of this train split (named sets
    always: their bank is the labelled train split)."""
    return train.labelled or is_in_memory(train.spec)


def open_source(spec) -> ImageSource:
    """The ImageSource of a split spec: a folder, a list file or a named torchvision set."""
    named = parse_named(spec)
    if named is not None:
        return _open_named(*named)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data {path} does not exist: check the --data path")
    if path.is_file():
        return _open_list(path)
    return _open_folder(path)


def _walk_images(root: Path) -> list[str]:
    """Every image under root at any depth, sorted; hidden entries (editors, notebooks and
    macOS leave '.ipynb_checkpoints' directories and '._x.jpg' resource forks) skipped."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if d[0] != "."]
        files += [os.path.join(dirpath, f) for f in filenames if _is_image(f)]
    return sorted(files)


def _open_folder(root: Path) -> ImageSource:
    entries = [e for e in os.scandir(root) if e.name[0] != "."]
    classes = sorted(e.name for e in entries if e.is_dir())
    own_images = any(e.is_file() and _is_image(e.name) for e in entries)
    if own_images:  # a flat or nested unlabelled set
        return ImageSource(str(root), [(f, -1) for f in _walk_images(root)], [])
    if not classes:
        raise DataError(
            f"data directory {root} holds no images ({'/'.join(IMG_EXTENSIONS)}): point "
            "--data at a folder of images, an ImageFolder root/<class>/<image>, or a list file"
        )
    samples = []
    for label, name in enumerate(classes):
        files = _walk_images(root / name)
        if not files:
            raise DataError(
                f"class dir '{root / name}' has no images ({'/'.join(IMG_EXTENSIONS)}): add "
                "images or remove the directory"
            )
        samples += [(f, label) for f in files]
    return ImageSource(str(root), samples, classes)


def _open_list(path: Path) -> ImageSource:
    if _is_image(path.name):
        raise DataError(
            f"{path} is an image file, not a folder or an image list: point --data at the "
            "folder that holds the images, or at a text file listing them"
        )
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise DataError(
            f"--data {path} is a file but not a text list of image paths (one a line): pass a "
            "folder of images, a list file, or cifar10:DIR / cifar100:DIR / stl10:DIR"
        ) from None
    base = path.parent
    files = [
        str(base / line) if not os.path.isabs(line) else line
        for line in (raw.strip() for raw in lines)
        if line and not line.startswith("#")
    ]
    if not files:
        raise DataError(f"image list {path} is empty: write one image path a line")
    missing = _missing_files(path, tuple(files))
    if len(missing) == len(files):
        raise DataError(
            f"image list {path}: none of its {len(files)} paths exists (the first: {files[0]}; "
            f"relative paths are read from the list's folder {base}): fix the paths or write "
            "absolute ones"
        )
    return ImageSource(str(path), [(f, -1) for f in files], [], missing=missing)


_MISSING_CACHE: dict[tuple, list[str]] = {}


def _missing_files(path: Path, files: tuple[str, ...]) -> list[str]:
    """The listed files that do not exist, every one checked (2M paths take about 12 s), once
    per process for a given list file and its modification time: a run opens its list
    several times (the planner, each loader)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _MISSING_CACHE:
        _MISSING_CACHE[key] = [f for f in files if not os.path.isfile(f)]
    return _MISSING_CACHE[key]


def _open_named(name: str, root: Path, split: str | None) -> ImageSource:
    import torchvision.datasets as tvd

    cls_name, folder, train_split, _, _, url = NAMED_SETS[name]
    split = split or train_split
    if root.name == folder:  # DIR given as the unpacked folder itself
        root = root.parent
    try:
        if name == "stl10":
            ds = tvd.STL10(str(root), split=split, download=False)
        else:
            ds = getattr(tvd, cls_name)(str(root), train=split == "train", download=False)
    except RuntimeError as e:
        raise DataError(
            f"{name}:{root}: torchvision's {cls_name} files not found or corrupted under "
            f"{root / folder} ({e}). Download {url} and unpack it into {root} "
            f"(tar xzf {url.rsplit('/', 1)[1]} -C {root}), so that {root / folder} holds "
            f'the files, or let torchvision fetch them: python -c "import torchvision; '
            f"torchvision.datasets.{cls_name}('{root}', download=True)\""
        ) from None
    targets = [int(t) for t in (ds.labels if name == "stl10" else ds.targets)]
    classes = list(getattr(ds, "classes", None) or map(str, range(max(targets) + 1)))
    return ImageSource(f"{name}:{root}#{split}", list(enumerate(targets)), classes, ds)
