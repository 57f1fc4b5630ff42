"""MoCo's two-view augmentation as an NVIDIA DALI pipeline: JPEG decode and augmentation on
the GPU (nvJPEG), batches handed to the trainer as device tensors.

One image, two views, each drawn independently from its view's row of data/recipes.py (the
table the torchvision builder, augment.py, reads too):

    paths --io.file.read--> bytes --decoders.image ("mixed": nvJPEG; "cpu" in CPU mode)
        |                                   |
        peek_image_shape (H, W)             |  decoded once, cropped twice
        |                                   v
        random_crop_generator  ---------> resize(ROI = crop window, S x S, bilinear+antialias)
          area A ~ U(crop_scale) of H*W,    -> [grayscale first] -> color jitter -> [grayscale]
          ratio r ~ logU(3/4, 4/3),         -> gaussian_blur -> solarize
          10 tries, else centre crop        -> crop_mirror_normalize (flip, (x/255 - mean)/std,
                                               fp16/fp32, CHW or HWC)

Each probability is a per-sample coin (fn.random.coin_flip) and each step it gates a
per-sample `if` (DALI conditionals: only the samples whose coin came up run the operator):
  jitter, p = jitter_p: torchvision's ColorJitter: factors U(1 - s, 1 + s) for brightness,
      contrast and saturation, a hue shift U(-h, h) turns, applied in a random order per
      view (random_order), each step rounding to uint8;
  grayscale, p = grayscale_p: ITU-R 601 luma in all channels, before or after the jitter;
  blur, p = blur_p: sigma ~ U(blur_sigma); solarize, p = solarize_p: v >= 128 -> 255 - v;
  flip, p=0.5: crop_mirror_normalize's mirror.
DALI's own colour operators differ from torchvision's (color_twist: one fixed order; its
contrast pivots on mid-grey, not the image's mean luma; fn.hsv rotates hue linearly about the
grey axis, not in HSV), so contrast and hue are written out in DALI's elementwise
arithmetic: a test matches the jitter to torchvision's functionals in all 24 orders within
0.6 % (color_twist: 25 %). What still differs is documented in docs/dali.md: decoding
(nvJPEG / libjpeg-turbo, not PIL), the resize filter, and hue in float (PIL rounds HSV to
8 bits).

Order and sharding are the torch loader's (sampler.ShardedBatchSampler): each epoch a
permutation seeded by seed + epoch, cut to full global batches and dealt round-robin, so
every image is used at most once per epoch across ranks, every rank runs the same number of
full batches, and set_epoch(epoch, start_step) resumes mid-epoch. The paths come from
Python through fn.external_source and DALI reads the files in its own threads
(fn.io.file.read). fn.readers.file would shard contiguous ranges of the file list, shuffle
within a 1024-image buffer and pad the last batch with repeats, and could not start
mid-epoch; feeding the order ourselves gives the same images to both loaders.

Randomness: DALI's random operators draw from generators seeded once, when the pipeline is
built, from (seed, rank, epoch, start_step); the pipeline then lives from epoch to epoch. A
run is deterministic per seed and rank; a resumed run sees the exact order of images but
fresh draws (the torch loader, which seeds every sample, repeats the views too).

Unreadable files: DALI's decoder error does not name the file ("nvImageCodec failure"), so on
any pipeline error the files of the batches in flight are opened with PIL; the first that
fails is named in a DataError, or with skip_bad_images it is remembered, replaced by its
readable successor as the torch loader does, counted in n_bad, and the pipeline rebuilt.
"""

import dataclasses
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fastmoco.data.augment import CROP_SCALE, IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size
from fastmoco.data.folder import _READ_ERRORS, MAX_BAD_IN_A_ROW, load_rgb, scan_image_folder
from fastmoco.data.recipes import SOLARIZE_THRESHOLD, ViewRecipe, views
from fastmoco.data.sampler import ShardedBatchSampler
from fastmoco.data.sources import is_in_memory
from fastmoco.errors import DataError, UsageError

# The ViewRecipe fields this builder implements: every one (unsupported() says which not).
IMPLEMENTED = frozenset(
    ("jitter", "jitter_p", "grayscale_p", "grayscale_first", "blur_p", "blur_sigma", "solarize_p")
)

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline, pipeline_def

    DALI_IMPORT_ERROR = None
except ImportError as e:  # the [dali] extra is optional
    DALI_IMPORT_ERROR = e

CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (width / height)
CROP_ATTEMPTS = 10  # as torchvision: then fall back to a centre crop
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601: torchvision's rgb_to_grayscale, PIL's "L"
LUMA_WEIGHTS = np.float32(LUMA)
LAYOUTS = ("NCHW", "NHWC")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The draws returned per view with debug=True (tests measure the recipe on them).
# order: the slot of (brightness, contrast, saturation, hue); factors: theirs (hue in turns);
# sigma: 0 where not blurred.
DEBUG_DRAWS = (
    "image_hw", "crop_hw", "flip", "gray", "jitter", "blur", "sigma", "order", "factors",
    "solarize",
)  # fmt: skip


def dali_available() -> bool:
    return DALI_IMPORT_ERROR is None


def unsupported(recipe: str) -> list[str]:
    """The fields of the recipe's views (data/recipes.py) that this builder does not
    implement, with a value other than their default: [] when DALI runs the recipe."""
    missing = []
    for view in views(recipe):
        for f in dataclasses.fields(ViewRecipe):
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.name not in IMPLEMENTED and getattr(view, f.name) != default:
                missing.append(f.name)
    return sorted(set(missing))


def require_dali() -> None:
    if DALI_IMPORT_ERROR is not None:
        raise UsageError(
            f"the DALI loader needs NVIDIA DALI ({DALI_IMPORT_ERROR}): install it with "
            "pip install nvidia-dali-cuda130 (or the [dali] extra), or use --loader torch"
        )


def _coin(p: float):
    """True with probability p, per sample: a predicate for the pipeline's `if`s."""
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _factor(strength: float):
    """torchvision's ColorJitter factor range, U(1 - s, 1 + s)."""
    return fn.random.uniform(range=(1 - strength, 1 + strength))


def random_order(n: int = 4) -> list:
    """A uniform random permutation per sample, as the slot (0 .. n-1) of each of n steps:
    a step's slot is the rank of its U(0, 1) key among the n keys (ties have probability 0).
    DALI has no per-sample shuffle; this is torchvision's randperm in four comparisons."""
    keys = [fn.random.uniform(range=(0.0, 1.0)) for _ in range(n)]
    less = lambda a, b: fn.cast(a < b, dtype=types.INT32)  # noqa: E731
    return [sum(less(keys[j], keys[k]) for j in range(n) if j != k) for k in range(n)]


def _hwc_uint8(x):
    """Arithmetic's float result back to an HWC uint8 image (the cast rounds to nearest and
    saturates; arithmetic drops the layout, which the conditionals' merge compares)."""
    return fn.reshape(fn.cast(x, dtype=types.UINT8), layout="HWC")


def adjust_contrast(view, factor):
    """torchvision's adjust_contrast: blend with the image's mean luma. (DALI's contrast
    arguments pivot on a fixed grey, and a per-image centre can only come from a CPU
    tensor, so the blend is written out; on the GPU it runs there.)"""
    x = fn.cast(view, dtype=types.FLOAT)
    luma = fn.reductions.sum(fn.reductions.mean(x, axes=[0, 1]) * types.Constant(LUMA_WEIGHTS))
    return _hwc_uint8(factor * x + (1 - factor) * luma)


def adjust_hue(view, turns):
    """torchvision's adjust_hue: shift the HSV hue by `turns` (of a full circle), keeping
    value and saturation. DALI's fn.hsv rotates hue linearly about the grey axis, up to ~100
    levels away from HSV's answer, so the HSV round trip is written out elementwise: hue h in
    sextants from the max channel, then channel n (5 R, 3 G, 1 B) of the result is
    max - chroma * clamp(min(k, 4 - k), 0, 1) with k = (n + h) mod 6."""
    x = fn.cast(view, dtype=types.FLOAT)
    r, g, b = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]  # (H, W, 1): broadcast against 3 below
    hi = dmath.max(dmath.max(r, g), b)
    chroma = hi - dmath.min(dmath.min(r, g), b)
    c = dmath.max(chroma, 1e-6)  # grey pixels (chroma 0) come out as `hi` whatever h is
    max_r, max_g = hi == r, (hi == g) & (hi != r)
    max_b = (hi != r) & (hi != g)
    h = (max_r * (g - b) + max_g * (b - r + 2 * c) + max_b * (r - g + 4 * c)) / c + 6 * turns
    h = h - 6 * dmath.floor(h / 6)  # [0, 6)
    k = h + types.Constant(np.float32([5, 3, 1]))  # [0, 11): one wrap at most
    k = k - 6 * (k >= 6)
    return _hwc_uint8(hi - chroma * dmath.clamp(dmath.min(k, 4 - k), 0, 1))


def grayscale(view):
    """torchvision's Grayscale(3): ITU-R 601 luma in all three channels, the same value in
    each (fn.hsv's saturation 0 leaves the channels a level apart here and there)."""
    x = fn.cast(view, dtype=types.FLOAT)
    luma = x[:, :, 0] * LUMA[0] + x[:, :, 1] * LUMA[1] + x[:, :, 2] * LUMA[2]
    return _hwc_uint8(fn.stack(luma, luma, luma, axis=2))


def solarize(view):
    """PIL's ImageOps.solarize (moco-v3's Solarize): every channel value v >= 128 becomes
    255 - v."""
    x = fn.cast(view, dtype=types.FLOAT)
    return _hwc_uint8(x + (x >= SOLARIZE_THRESHOLD) * (255 - 2 * x))


def color_jitter(view, order, factors):
    """torchvision's ColorJitter with per-sample order and factors: order[k] is the slot
    (0-3) of adjustment k of (brightness, contrast, saturation, hue), factors[k] its factor
    (hue: a shift in turns). Each adjustment rounds to uint8, as torchvision's do on PIL
    images, so the order matters (clipping; hue against saturation).

    DALI runs an `if` per sample (conditionals), but every branch is an operator in the
    graph, and the hue shift alone is ~40 elementwise operators; so hue is placed once,
    between the slots before it and the slots after it, instead of once per slot."""
    brightness, contrast, saturation, hue = factors
    for slot in range(3):
        if order[3] > slot:
            view = _linear_step(view, slot, order, brightness, contrast, saturation)
    view = adjust_hue(view, hue)
    for slot in range(1, 4):
        if order[3] < slot:
            view = _linear_step(view, slot, order, brightness, contrast, saturation)
    return view


def _linear_step(view, slot, order, brightness, contrast, saturation):
    """Whichever of brightness, contrast and saturation sits in `slot` (none: identity).
    Brightness and saturation are both one fn.hsv (value = brightness: x * b exactly, as
    torchvision's blend with black); each factor is 1 where its adjustment is elsewhere."""
    if order[1] == slot:
        view = adjust_contrast(view, contrast)
    else:
        here_b, here_s = order[0] == slot, order[2] == slot
        value = 1 + here_b * (brightness - 1)
        view = fn.hsv(view, value=value, saturation=1 + here_s * (saturation - 1))
    return view


def augment_view(
    images,
    image_hw,
    *,
    view: ViewRecipe,
    crop_size: int,
    crop_scale: tuple[float, float],
    mean: Sequence[float],
    std: Sequence[float],
    out_dtype,
    out_layout: str,
):
    """One view of a batch of decoded HWC uint8 images, by its recipe (data/recipes.py):
    (view, {draw name: per-sample draw}).

    image_hw is the (H, W, C) of every image as peek_image_shape reads it. Each call draws its
    own random numbers, so calling it twice gives two independent views. The pipeline must be
    built with enable_conditionals (the `if`s below run per sample).
    """
    anchor, crop_hw = fn.random_crop_generator(
        image_hw, random_area=crop_scale, random_aspect_ratio=CROP_RATIO, num_attempts=CROP_ATTEMPTS
    )
    start = fn.cast(anchor, dtype=types.FLOAT)  # resize wants float ROIs, (y, x) order
    out = fn.resize(
        images,
        size=[crop_size, crop_size],
        roi_start=start,
        roi_end=start + fn.cast(crop_hw, dtype=types.FLOAT),
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    bright, contrast, sat, hue = view.jitter
    jitter = _coin(view.jitter_p)
    hue_turns = fn.random.uniform(range=(-hue, hue))
    factors = (_factor(bright), _factor(contrast), _factor(sat), hue_turns)
    order = random_order()
    gray = _coin(view.grayscale_p)
    if view.grayscale_first:  # v1: RandomGrayscale, then ColorJitter
        if gray:
            out = grayscale(out)
    if jitter:
        out = color_jitter(out, order, factors)
    if not view.grayscale_first:  # v2, v3: RandomApply(ColorJitter), then RandomGrayscale
        if gray:
            out = grayscale(out)
    blur = _coin(view.blur_p)
    sigma = fn.random.uniform(range=view.blur_sigma)
    if view.blur_p > 0:
        if blur:
            out = fn.gaussian_blur(out, window_size=blur_kernel_size(crop_size), sigma=sigma)
    solar = _coin(view.solarize_p)
    if view.solarize_p > 0:
        if solar:
            out = solarize(out)
    flip = fn.random.coin_flip(probability=0.5)
    out = fn.crop_mirror_normalize(
        out,
        mirror=flip,
        mean=[255 * m for m in mean],
        std=[255 * s for s in std],
        dtype=out_dtype,
        output_layout=out_layout,
    )
    draws = dict(image_hw=image_hw, crop_hw=crop_hw, flip=flip, gray=gray, jitter=jitter)
    draws.update(blur=blur, sigma=sigma * blur, order=fn.stack(*order))
    draws.update(factors=fn.stack(*factors), solarize=solar)
    return out, draws


def _dali_reason(error: Exception) -> str:
    """The operator and the cause out of DALI's multi-line error (traceback elided)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    op = next((line.rstrip(",") for line in lines if line.startswith("Error in")), None)
    cause = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else None
    found = [x for x in (op, cause) if x]
    return ": ".join(found) if found else (lines[0] if lines else type(error).__name__)


class _PathFeeder:
    """external_source callback: the next batch's encoded paths, remembered until returned.

    todo holds batches of (epoch, index) pairs; each is resolved (known-bad files replaced)
    when DALI asks for it. An empty todo ends DALI's epoch (StopIteration).
    """

    def __init__(self, resolve):
        self.resolve = resolve
        self.todo = deque()
        self.in_flight = deque()  # (batch, paths, labels, n_bad) handed to DALI, not yet out

    def __call__(self):
        if not self.todo:
            raise StopIteration
        batch = self.todo.popleft()
        paths, labels, n_bad = self.resolve(batch)
        self.in_flight.append((batch, paths, labels, n_bad))
        return [np.frombuffer(p.encode(), dtype=np.uint8) for p in paths]


class DaliTwoViewLoader:
    """Training batches (view1, view2, target, n_bad) made by DALI, for one rank.

    The same interface as loader.TwoViewLoader: set_epoch(epoch, start_step), len() = full
    batches per epoch per rank, iteration yielding view tensors (B, 3, S, S) on `device`
    (NHWC: a channels_last view of that shape), int64 targets on `device` and n_bad, a CPU
    int64 scalar. With debug=True each item has a fifth element: per view, the random draws
    of that batch as numpy arrays (DEBUG_DRAWS).
    """

    def __init__(
        self,
        root,
        *,
        recipe: str,
        crop_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        num_threads: int = 4,
        skip_bad_images: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_scale: tuple[float, float] = CROP_SCALE,
        dtype: torch.dtype = torch.float32,
        layout: str = "NCHW",
        debug: bool = False,
    ):
        require_dali()
        missing = unsupported(recipe)
        if missing:
            raise UsageError(
                f"--loader dali does not implement {', '.join(missing)} of recipe {recipe!r}: "
                "use --loader torch (or auto)"
            )
        if layout not in LAYOUTS:
            raise UsageError(f"layout {layout!r}: choose NCHW, or NHWC for channels_last")
        if dtype not in DTYPES:
            raise UsageError(f"dtype {dtype}: choose torch.float32, float16 or bfloat16")
        if batch_size < 1:
            raise UsageError(f"batch size {batch_size} must be at least 1")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if is_in_memory(root):
            raise UsageError(
                f"--loader dali reads image files, and {root} is a data set held in memory: "
                "use --loader torch (or auto)"
            )
        self.samples, self.classes = scan_image_folder(root)
        if batch_size * world_size > len(self.samples):
            per = f" x {world_size} ranks" if world_size > 1 else ""
            raise DataError(
                f"batch size {batch_size}{per} larger than the dataset ({len(self.samples)} "
                f"images under {root}): lower --batch-size"
            )
        self.root, self.batch_size, self.seed, self.rank = root, batch_size, seed, rank
        self.batch_sampler = ShardedBatchSampler(
            len(self.samples), batch_size, seed, rank, world_size
        )
        self.views = views(recipe)
        self.view_args = dict(crop_size=crop_size, crop_scale=crop_scale, mean=mean, std=std)
        self.dtype, self.layout, self.debug = dtype, layout, debug
        self.num_threads, self.skip_bad_images = max(num_threads, 1), skip_bad_images
        self.bad: set[int] = set()  # indices of files found unreadable so far
        self._pipe, self._feeder, self._pipe_idle = None, None, False
        where = "GPU, nvJPEG decode" if self.device.type == "cuda" else "CPU mode"
        self.description = f"DALI ({where}, {self.num_threads} threads)"

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select epoch's order; the next pass starts at its batch start_step."""
        self.batch_sampler.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        """Full batches per epoch per rank (whatever start_step is)."""
        return self.batch_sampler.batches_per_epoch()

    # --- the pipeline ------------------------------------------------------------------
    def _pipeline_seed(self) -> int:
        s = self.batch_sampler
        entropy = [self.seed % 2**32, self.rank, s.epoch, s.start_step]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)  # < 2**31

    def _build(self, feeder: _PathFeeder, seed: int) -> "Pipeline":
        gpu = self.device.type == "cuda"
        # fp16 straight from DALI; DALI has no bf16, so bf16 is a cast of fp32 in torch.
        out_dtype = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT
        out_layout = "HWC" if self.layout == "NHWC" else "CHW"

        @pipeline_def(enable_conditionals=True)  # the per-sample `if`s of augment_view
        def two_views():
            paths = fn.external_source(source=feeder, batch=True, dtype=types.UINT8)
            data = fn.io.file.read(paths)
            image_hw = fn.peek_image_shape(data)  # (H, W, C); the crop uses H, W
            images = fn.decoders.image(data, device="mixed" if gpu else "cpu")
            outputs = []
            for recipe in self.views:  # two independent draws, each of its view's recipe
                view, draws = augment_view(
                    images, image_hw, view=recipe, out_dtype=out_dtype, out_layout=out_layout,
                    **self.view_args,
                )  # fmt: skip
                outputs.append(view)
                if self.debug:
                    outputs += [draws[k] for k in DEBUG_DRAWS]
            return tuple(outputs)

        pipe = two_views(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index if gpu else None,
            seed=seed,
            prefetch_queue_depth=2,
            exec_dynamic=True,  # outputs owned by their Python objects, not recycled by run()
        )
        pipe.build()
        return pipe

    def _to_torch(self, tensor_list) -> torch.Tensor:
        """One batch of views as a (B, 3, S, S) tensor on the device, copied out of DALI's
        buffers (DALI frees or reuses them): on the GPU device to device, on torch's current
        stream."""
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        if self.layout == "NHWC":
            out = out.permute(0, 3, 1, 2)  # (B, S, S, 3) memory, (B, 3, S, S) shape
        return out.to(self.dtype)

    # --- iteration -----------------------------------------------------------------------
    def _resolve(self, epoch_index: int) -> tuple[str, int, int]:
        """(path, label, bad files skipped): the sample or, past known-bad ones, its readable
        successor (the torch loader's rule)."""
        n = len(self.samples)
        for n_bad in range(min(n, MAX_BAD_IN_A_ROW)):
            i = (epoch_index + n_bad) % n
            if i not in self.bad:
                path, label = self.samples[i]
                return path, label, n_bad
        raise DataError(
            f"{min(n, MAX_BAD_IN_A_ROW)} unreadable images in a row from "
            f"{self.samples[epoch_index][0]}: the dataset under {self.root} looks broken; "
            "check that its files are intact images"
        )

    def _batch(self, indices: list[tuple[int, int]]) -> tuple[list[str], list[int], int]:
        resolved = [self._resolve(i) for _, i in indices]
        paths, labels, bad = zip(*resolved, strict=True)
        return list(paths), list(labels), sum(bad)

    def _find_bad_file(self, batches: list[list[str]], dali_error: Exception) -> None:
        """Name the unreadable file among the paths of `batches` (DataError), or remember it
        when skipping.

        Raises a DataError quoting DALI's message if PIL reads every file: the failure is then
        not a corrupt file but something DALI cannot handle.
        """
        for paths in batches:
            for path in paths:
                try:
                    load_rgb(path)
                except _READ_ERRORS as e:
                    if not self.skip_bad_images:
                        raise DataError(
                            f"cannot read image {path} ({type(e).__name__}: {e}): replace or "
                            "delete the file, or pass --skip-bad-images to skip unreadable "
                            "images"
                        ) from None
                    self.bad.add(next(i for i, s in enumerate(self.samples) if s[0] == path))
                    return
        files = [p for paths in batches for p in paths]
        where = f"images {files[0]} ... {files[-1]}" if files else "its first batch"
        raise DataError(
            f"the DALI pipeline failed on {where}, all of which PIL can read "
            f"({_dali_reason(dali_error)}): use --loader torch"
        ) from dali_error

    def __iter__(self) -> Iterator[tuple]:
        """One epoch. The pipeline lives on from epoch to epoch (a build costs the decoder's
        set-up); it is built, seeded from (seed, rank, epoch, start_step), for the first
        epoch, after an epoch left unfinished, and after an error."""
        batches = list(self.batch_sampler)  # this epoch's [(epoch, index)] from start_step
        retry = 0
        while True:
            if self._pipe is None or not self._pipe_idle:
                self._pipe = None  # free the old pipeline's buffers before the new one's
                self._feeder = _PathFeeder(self._batch)
                self._feeder.todo.extend(batches)
                self._pipe = self._build(self._feeder, self._pipeline_seed() + retry)
            else:
                self._feeder.todo.extend(batches)
                self._pipe.reset()  # DALI's epoch ended at the feeder's StopIteration
            self._pipe_idle = False
            try:
                yield from self._run()
            except RuntimeError as e:  # DALI reports operator failures as RuntimeError
                # An errored pipeline is invalid: name or skip the file, build another.
                in_flight = list(self._feeder.in_flight)
                self._pipe = None
                self._find_bad_file([paths for _, paths, _, _ in in_flight], e)
                batches = [batch for batch, *_ in in_flight] + list(self._feeder.todo)
                retry += 1
                continue
            self._pipe_idle = True
            return

    def _run(self) -> Iterator[tuple]:
        views = 1 + (len(DEBUG_DRAWS) if self.debug else 0)
        copied = None  # on the GPU: an event after the last batch's copies out of DALI
        try:
            while True:
                if copied is not None:
                    # DALI frees its output buffers, on its own stream, when `out` is dropped
                    # below; the copies out of them were queued on torch's stream: let them
                    # run first. The host stays at most about one training step ahead.
                    copied.synchronize()
                try:
                    out = self._pipe.run()
                except StopIteration:
                    return
                _, _, labels, n_bad = self._feeder.in_flight.popleft()
                view1, view2 = self._to_torch(out[0]), self._to_torch(out[views])
                target = torch.tensor(labels, dtype=torch.int64).to(self.device, non_blocking=True)
                if self.device.type == "cuda":
                    copied = torch.cuda.Event()
                    copied.record(torch.cuda.current_stream(self.device))
                item = (view1, view2, target, torch.tensor(n_bad, dtype=torch.int64))
                if self.debug:
                    item = (*item, [self._draws(out, v * views + 1) for v in range(2)])
                yield item
        finally:  # also when the consumer stops early: the same wait before `out` goes
            if copied is not None:
                copied.synchronize()

    @staticmethod
    def _draws(out, first: int) -> dict[str, np.ndarray]:
        return {k: np.asarray(out[first + j].as_array()) for j, k in enumerate(DEBUG_DRAWS)}
