"""The embedded demo dataset: procedurally drawn shapes, made once and cached.

`fastmoco train` with no --data trains on this, so that a first run needs no download and
shows, within minutes on a CPU, an encoder learning: the InfoNCE loss falls, instance
discrimination improves, and kNN on the classes pulls away from a random encoder.

Ten classes of shapes (circle, ring, triangle, ...): shape is the class cue, shared by
every image of a class. Each image is also an instance no other image is, in ways MoCo's
augmentations keep (crops of at least half the image, flips, colour jitter, grayscale,
blur), so that instance discrimination, the pretext task, stays learnable:
- a background pattern (stripes, checker or dots) of its own orientation, period and
  phase, at a contrast that survives jitter and grayscale (luminance, not hue);
- its own warp of the shape's outline, plus rotation, stretch, position and size;
- colours from a small palette shared by all classes, so colour tells neither the class
  nor, alone, the instance.
docs/demo.md tells how the design was reached and what each part does to the curves.

Every image is a pure function of (seed, split, class, index) through its own PCG64 stream,
and is written as a JPEG of fixed quality, so a seed always gives the same bytes (with the
same Pillow/libjpeg). The dataset appears atomically: it is drawn into a temporary
directory beside its destination and renamed into place when complete, so a concurrent or
interrupted run never leaves a partial dataset that would later be taken as complete.

    python -m fastmoco.data.demo --out DIR --seed 0 [--contact-sheet sheet.png]
"""

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from fastmoco.data.folder import scan_image_folder
from fastmoco.errors import DataError

# Bump when the drawing changes: the cache folder name carries it, so old caches are not
# mistaken for new ones.
GENERATOR_VERSION = 2  # 2: instance identity (background patterns, warped outlines)
MANIFEST = "demo.json"  # written last inside the temp dir: its presence means complete
STALE_TEMP_SECONDS = 3600  # temp dirs older than this are leftovers of killed runs
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges
SPLITS = ("train", "val")

# Shared by all classes. Mid-saturation colours of distinct hue and luminance, so that a
# shape stays visible in most fg/bg pairs, also after RandomGrayscale.
PALETTE = (
    (220, 60, 60),  # red
    (60, 110, 200),  # blue
    (60, 170, 90),  # green
    (235, 200, 80),  # yellow
    (240, 240, 235),  # white
    (35, 35, 40),  # black
    (240, 140, 50),  # orange
    (140, 70, 190),  # purple
)
TEXTURES = ("flat", "stripes", "checker", "dots", "blotches")


# --- shapes: lists of (polygon in unit coordinates, fill 1 = shape or 0 = hole) ------------


def _ngon(radius, n, cx=0.0, cy=0.0, start=-np.pi / 2):
    a = start + 2 * np.pi * np.arange(n) / n
    return np.stack([cx + radius * np.cos(a), cy + radius * np.sin(a)], 1)


def _rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def _star():
    outer, inner = _ngon(1.0, 5), _ngon(0.42, 5, start=-np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], 1).reshape(10, 2)


# y points down, as in images. Each shape spans roughly the unit disk.
SHAPES = {
    "circle": [(_ngon(0.9, 48), 1)],
    "ring": [(_ngon(1.0, 48), 1), (_ngon(0.55, 48), 0)],
    "triangle": [(_ngon(1.1, 3), 1)],
    "square": [(_rect(-0.75, -0.75, 0.75, 0.75), 1)],
    "star": [(_star(), 1)],
    "cross": [(_rect(-1, -0.3, 1, 0.3), 1), (_rect(-0.3, -1, 0.3, 1), 1)],
    "crescent": [(_ngon(1.0, 48), 1), (_ngon(0.85, 48, cx=0.45, cy=-0.15), 0)],
    "arrow": [
        (_rect(-1.0, -0.22, 0.15, 0.22), 1),
        (np.array([[0.05, -0.7], [1.0, 0.0], [0.05, 0.7]]), 1),
    ],
    "heart": [
        (_ngon(0.5, 32, cx=-0.45, cy=-0.3), 1),
        (_ngon(0.5, 32, cx=0.45, cy=-0.3), 1),
        (np.array([[-0.93, -0.12], [0.93, -0.12], [0.0, 0.95]]), 1),
    ],
    "tee": [(_rect(-0.9, -0.9, 0.9, -0.45), 1), (_rect(-0.22, -0.9, 0.22, 0.95), 1)],
}


@dataclass(frozen=True)
class DemoSpec:
    """What the generator draws; every field changes the cache folder (via its hash).

    Defaults: the demo preset's data (docs/demo.md has the runs behind them). 1,500 train
    images keep a 20-epoch run within the CPU budget, and K=256 a small fraction of them.
    """

    image_size: int = 64  # pixels; the demo preset trains on 32-px crops of these
    n_train_per_class: int = 150
    n_val_per_class: int = 50
    classes: tuple[str, ...] = tuple(SHAPES)
    palette: tuple[tuple[int, int, int], ...] = PALETTE  # RGB colours shared by all classes
    palette_size: int = 4  # use the first N colours of the palette
    # background patterns, shared by all classes; their orientation, period and phase are
    # the image's own, the instance cue that crops, flips and colour jitter keep
    textures: tuple[str, ...] = ("stripes", "checker", "dots")
    texture_contrast: float = 0.4  # 0 = flat background, 1 = full two-colour pattern
    texture_period: tuple[float, float] = (0.12, 0.3)  # pattern period / image side
    shape_radius: tuple[float, float] = (0.35, 0.5)  # shape radius / image side
    max_rotation_deg: float = 30.0  # uniform in +-this
    aspect: tuple[float, float] = (0.8, 1.25)  # x/y stretch, log-uniform
    noise_std: float = 6.0  # Gaussian pixel noise, in 0..255 units
    jpeg_quality: int = 90
    warp: float = 0.05  # amplitude of each harmonic of the instance's radial warp
    warp_harmonics: int = 3  # harmonics 2, 3, ... of the warp

    def __post_init__(self):
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            raise ValueError(f"unknown demo classes {unknown}: choose from {list(SHAPES)}")
        # three distinct colours per image: the shape and the background's two
        if not 3 <= self.palette_size <= len(self.palette):
            raise ValueError(f"palette_size must lie in 3..{len(self.palette)}")
        if any(t not in TEXTURES for t in self.textures) or not self.textures:
            raise ValueError(f"textures must be a non-empty subset of {TEXTURES}")

    def folder_name(self, seed: int) -> str:
        """Generator version, seed, sizes, and a hash of every field."""
        digest = hashlib.sha1(repr(dataclasses.asdict(self)).encode()).hexdigest()[:8]
        n_cls = len(self.classes)
        return (
            f"demo-v{GENERATOR_VERSION}-seed{seed}-{self.image_size}px-"
            f"{n_cls}x{self.n_train_per_class}+{self.n_val_per_class}-{digest}"
        )

    def count(self, split: str) -> int:
        return self.n_train_per_class if split == "train" else self.n_val_per_class


# --- drawing one image ---------------------------------------------------------------------


def image_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    """The image's own stream: independent of drawing order, worker count, other images."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, SPLITS.index(split), class_index, index]))
    )


def _texture(rng, spec: DemoSpec, n: int) -> np.ndarray:
    """(n, n) pattern in [0, 1], computed at 2x and averaged down to soften aliasing."""
    kind = spec.textures[rng.integers(len(spec.textures))]
    period = rng.uniform(*spec.texture_period) * 2 * n
    angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 1, 2)
    y, x = np.mgrid[0 : 2 * n, 0 : 2 * n].astype(np.float64)
    u = (x * np.cos(angle) + y * np.sin(angle)) / period + phase[0]
    v = (-x * np.sin(angle) + y * np.cos(angle)) / period + phase[1]
    if kind == "flat":
        return np.zeros((n, n))
    if kind == "stripes":
        p = (u % 1.0) < 0.5
    elif kind == "checker":
        p = (np.floor(u) + np.floor(v)) % 2 == 0
    elif kind == "dots":
        p = (u % 1.0 - 0.5) ** 2 + (v % 1.0 - 0.5) ** 2 < 0.3**2
    else:  # blotches: smooth low-frequency noise, thresholded
        coarse = Image.fromarray(rng.uniform(0, 255, (5, 5)).astype(np.uint8))
        p = np.asarray(coarse.resize((2 * n, 2 * n), Image.BICUBIC)) > 128
    p = p.astype(np.float64)
    return p.reshape(n, 2, n, 2).mean((1, 3))


def _densify(poly: np.ndarray, step: float = 0.05) -> np.ndarray:
    """The polygon with extra points along its edges, so a warp bends the edges too."""
    out = []
    for a, b in zip(poly, np.roll(poly, -1, 0), strict=True):
        n = max(int(np.ceil(np.hypot(*(b - a)) / step)), 1)
        out.append(a + (b - a) * (np.arange(n)[:, None] / n))
    return np.concatenate(out)


def _warp(rng, spec: DemoSpec):
    """This instance's own smooth radial warp of the plane: p -> p (1 + sum_j a_j cos(j phi +
    b_j)), phi the angle of p. Harmonics 2-4 bend the outline into a form no other image of
    its class has, which crops, flips and colour changes keep."""
    harmonics = np.arange(2, 2 + spec.warp_harmonics)
    amp = rng.uniform(-spec.warp, spec.warp, len(harmonics))
    phase = rng.uniform(0, 2 * np.pi, len(harmonics))

    def warp(pts: np.ndarray) -> np.ndarray:
        phi = np.arctan2(pts[:, 1], pts[:, 0])[:, None]
        return pts * (1 + (amp * np.cos(harmonics * phi + phase)).sum(1, keepdims=True))

    return warp


def _shape_mask(rng, spec: DemoSpec, name: str) -> np.ndarray:
    """(n, n) coverage in [0, 1] of a randomly warped, placed, scaled, rotated, stretched
    shape."""
    n, big = spec.image_size, spec.image_size * SUPERSAMPLE
    warp = _warp(rng, spec)
    radius = rng.uniform(*spec.shape_radius) * n
    cx, cy = rng.uniform(0.85 * radius, n - 0.85 * radius, 2)
    theta = np.deg2rad(rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg))
    stretch = np.exp(rng.uniform(*np.log(spec.aspect)))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    affine = rot @ np.diag([stretch, 1 / stretch]) * radius * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for poly, fill in SHAPES[name]:
        pts = warp(_densify(poly)) @ affine.T + np.array([cx, cy]) * SUPERSAMPLE
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255 * fill)
    return np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float64) / 255.0


def draw_image(spec: DemoSpec, seed: int, split: str, class_index: int, index: int):
    """The (image_size, image_size) RGB image number `index` of a class in a split."""
    rng = image_rng(seed, split, class_index, index)
    palette = np.array(spec.palette[: spec.palette_size], dtype=np.float64)
    fg, bg1, bg2 = palette[rng.choice(spec.palette_size, 3, replace=False)]
    n = spec.image_size
    pattern = spec.texture_contrast * _texture(rng, spec, n)[..., None]
    background = bg1 * (1 - pattern) + bg2 * pattern
    m = _shape_mask(rng, spec, spec.classes[class_index])[..., None]
    img = background * (1 - m) + fg * m + rng.normal(0, spec.noise_std, (n, n, 3))
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def _draw_to_file(job) -> None:
    spec, seed, split, class_index, index, path = job
    img = draw_image(spec, seed, split, class_index, index)
    img.save(path, format="JPEG", quality=spec.jpeg_quality)


# --- the dataset on disk -------------------------------------------------------------------


def cache_dir() -> Path:
    """$FASTMOCO_CACHE, else $XDG_CACHE_HOME/fastmoco, else ~/.cache/fastmoco."""
    if os.environ.get("FASTMOCO_CACHE"):
        return Path(os.environ["FASTMOCO_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastmoco"


def is_complete(dest: Path) -> bool:
    return (Path(dest) / MANIFEST).is_file()


def _workers(n_images: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1 if n_images < 400 else max(1, min(cpus or 1, 8))


def _draw_all(tmp: Path, seed: int, spec: DemoSpec, progress: bool) -> None:
    jobs = []
    for split in SPLITS:
        for c, name in enumerate(spec.classes):
            (tmp / split / name).mkdir(parents=True)
            for i in range(spec.count(split)):
                jobs.append((spec, seed, split, c, i, tmp / split / name / f"{i:04d}.jpg"))
    bar = tqdm(total=len(jobs), desc="drawing the demo dataset", unit="img", disable=not progress)
    with bar:
        workers = _workers(len(jobs))
        if workers == 1:
            for job in jobs:
                _draw_to_file(job)
                bar.update()
            return
        # fork: children need only numpy and PIL, and start in milliseconds.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ctx.Pool(workers) as pool:
            for _ in pool.imap_unordered(_draw_to_file, jobs, chunksize=32):
                bar.update()


def _remove_stale_temps(dest: Path) -> None:
    """Temp dirs of runs that were killed mid-way (a live run's is much younger)."""
    for old in dest.parent.glob(f".{dest.name}.tmp-*"):
        if time.time() - old.stat().st_mtime > STALE_TEMP_SECONDS:
            shutil.rmtree(old, ignore_errors=True)


def write_demo(dest, seed: int = 0, spec: DemoSpec = DemoSpec(), progress: bool = True) -> Path:
    """Draw the demo dataset into dest (train/ and val/ inside), unless already complete there.

    Atomic: drawn into a temp dir beside dest and renamed into place. When two processes race,
    both draw; the first rename wins and the other discards its identical copy.
    """
    dest = Path(dest)
    if is_complete(dest):
        return dest
    if dest.exists() and any(dest.iterdir()):
        raise DataError(
            f"{dest} exists but is not a complete demo dataset (no {MANIFEST}): delete it, "
            "or choose another directory"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a dataset is for reading
        _draw_all(tmp, seed, spec, progress)
        manifest = {
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "spec": dataclasses.asdict(spec),
            "counts": {s: spec.count(s) * len(spec.classes) for s in SPLITS},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.rename(tmp, dest)  # replaces an empty dest; fails on a non-empty one
        except OSError:
            if not is_complete(dest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def demo_dataset(
    seed: int = 0, root=None, progress: bool = True, spec: DemoSpec = DemoSpec()
) -> Path:
    """Directory with train/ and val/ ImageFolder trees of the demo set; drawn on first use.

    It lives in root (default: cache_dir()) under a name that encodes the generator
    version, the seed and the spec, so a changed spec or generator never reuses a stale copy.
    """
    parent = Path(root) if root is not None else cache_dir()
    return write_demo(parent / spec.folder_name(seed), seed, spec, progress)


def demo_contact_sheet(
    root, path_png, per_class: int = 8, split: str = "train", view_size=None, zoom: int = 2
) -> Path:
    """A PNG grid, one row per class, of the first per_class images of a split.

    view_size shows the images as a model sees them at that resolution (e.g. 32, the demo
    preset's crop size): downsampled, then zoomed back up like the rest.
    """
    samples, classes = scan_image_folder(Path(root) / split)
    rows = [[p for p, t in samples if t == c][:per_class] for c in range(len(classes))]
    cell = Image.open(rows[0][0]).size[0] * zoom
    label_w = 80
    sheet = Image.new("RGB", (label_w + per_class * cell, len(classes) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, paths) in enumerate(zip(classes, rows, strict=True)):
        draw.text((4, r * cell + cell // 2 - 5), name, fill="black")
        for k, p in enumerate(paths):
            img = Image.open(p).convert("RGB")
            if view_size:
                img = img.resize((view_size, view_size), Image.BILINEAR)
            sheet.paste(img.resize((cell, cell), Image.NEAREST), (label_w + k * cell, r * cell))
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path_png)
    return path_png


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m fastmoco.data.demo", description="Write the fastmoco demo dataset."
    )
    ap.add_argument("--out", help="directory to write (default: the cache, as training uses)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--contact-sheet", metavar="PNG", help="also save a grid of examples")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.out:
        root = write_demo(args.out, args.seed, progress=not args.no_progress)
    else:
        root = demo_dataset(args.seed, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    for split in SPLITS:
        samples, classes = scan_image_folder(root / split)
        print(f"{root / split}: {len(samples)} images in {len(classes)} classes")
    print(f"ready in {seconds:.1f} s")
    if args.contact_sheet:
        print(f"contact sheet: {demo_contact_sheet(root, args.contact_sheet)}")


if __name__ == "__main__":
    main()
