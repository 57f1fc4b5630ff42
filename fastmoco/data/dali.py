"""MoCo's two-view augmentation as an NVIDIA DALI pipeline: JPEG decode and augmentation on
the GPU (nvJPEG), batches handed to the trainer as device tensors.

One image, two views, each drawn independently from the recipe of augment.py:

    paths --io.file.read--> bytes --decoders.image ("mixed": nvJPEG; "cpu" in CPU mode)
        |                                   |
        peek_image_shape (H, W)             |  decoded once, cropped twice
        |                                   v
        random_crop_generator  ---------> resize(ROI = crop window, S x S, bilinear+antialias)
          area A ~ U(0.2, 1) of H*W,        -> color_twist (jitter; grayscale = saturation 0)
          ratio r ~ logU(3/4, 4/3),         -> gaussian_blur (v2)
          10 tries, else centre crop        -> crop_mirror_normalize (flip, (x/255 - mean)/std,
                                               fp16/fp32, CHW or HWC)

Each probability is a per-sample coin (fn.random.coin_flip) folded into the operator's
per-sample arguments, since DALI operators apply to a whole batch:
  jitter, p=0.8 (v2; v1 always): factor = on * U(0.6, 1.4) + (1 - on) for brightness,
      contrast and saturation; hue shift = on * U(-h, h) * 360 degrees (h = 0.1 v2, 0.4 v1);
  grayscale, p=0.2: saturation *= 1 - gray (DALI's saturation 0 is the ITU-R 601 luma, the
      same weights as torchvision's Grayscale);
  blur, p=0.5 (v2): sigma = on * U(0.1, 2.0) + (1 - on) * 0.05; at sigma 0.05 a neighbour
      weighs exp(-1 / (2 * 0.05^2)) = exp(-200), 0 in float32, so the blur is the identity;
  flip, p=0.5: crop_mirror_normalize's mirror.
Where DALI differs from torchvision (documented in docs/dali.md): the jitter's four
adjustments come in one fixed order (torchvision shuffles them per view), contrast scales
around mid-grey rather than the image mean, and hue is rotated in YIQ space rather than HSV.
v1 grayscales before the jitter in torchvision; with saturation folded into one twist the
order does not matter (a grey image stays grey under brightness, contrast and hue).

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

from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fastmoco.data.augment import (
    CROP_SCALE,
    GRAYSCALE_P,
    IMAGENET_MEAN,
    IMAGENET_STD,
    V1_JITTER,
    V2_BLUR_P,
    V2_BLUR_SIGMA,
    V2_JITTER,
    V2_JITTER_P,
    blur_kernel_size,
)
from fastmoco.data.folder import _READ_ERRORS, MAX_BAD_IN_A_ROW, load_rgb, scan_image_folder
from fastmoco.data.sampler import ShardedBatchSampler
from fastmoco.data.sources import is_in_memory
from fastmoco.errors import DataError, UsageError

RECIPES = ("v1", "v2")  # v3's asymmetric pair (solarize) runs on the DataLoader path only

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    DALI_IMPORT_ERROR = None
except ImportError as e:  # the [dali] extra is optional
    DALI_IMPORT_ERROR = e

CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (width / height)
CROP_ATTEMPTS = 10  # as torchvision: then fall back to a centre crop
IDENTITY_SIGMA = 0.05  # a "blur" that leaves every pixel as it is (module docstring)
LAYOUTS = ("NCHW", "NHWC")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The draws returned per view with debug=True (tests measure the recipe on them).
DEBUG_DRAWS = ("image_hw", "crop_hw", "flip", "gray", "jitter", "blur", "sigma")


def dali_available() -> bool:
    return DALI_IMPORT_ERROR is None


def require_dali() -> None:
    if DALI_IMPORT_ERROR is not None:
        raise UsageError(
            f"the DALI loader needs NVIDIA DALI ({DALI_IMPORT_ERROR}): install it with "
            "pip install nvidia-dali-cuda130 (or the [dali] extra), or use --loader torch"
        )


def _coin(p: float):
    """1.0 with probability p, else 0.0, per sample (coin_flip only makes ints)."""
    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)


def _jitter_factor(strength: float, on):
    """U(1 - s, 1 + s) where on, 1 (no change) where not: torchvision's factor range."""
    return on * fn.random.uniform(range=(1 - strength, 1 + strength)) + (1 - on)


def augment_view(
    images,
    image_hw,
    *,
    recipe: str,
    crop_size: int,
    crop_scale: tuple[float, float],
    mean: Sequence[float],
    std: Sequence[float],
    out_dtype,
    out_layout: str,
):
    """One view of a batch of decoded HWC uint8 images: (view, {draw name: per-sample draw}).

    image_hw is the (H, W, C) of every image as peek_image_shape reads it. Each call draws its
    own random numbers, so calling it twice gives two independent views.
    """
    anchor, crop_hw = fn.random_crop_generator(
        image_hw, random_area=crop_scale, random_aspect_ratio=CROP_RATIO, num_attempts=CROP_ATTEMPTS
    )
    start = fn.cast(anchor, dtype=types.FLOAT)  # resize wants float ROIs, (y, x) order
    view = fn.resize(
        images,
        size=[crop_size, crop_size],
        roi_start=start,
        roi_end=start + fn.cast(crop_hw, dtype=types.FLOAT),
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    if recipe == "v1":
        (bright, contrast, sat, hue), jitter = V1_JITTER, _coin(1.0)
    else:
        (bright, contrast, sat, hue), jitter = V2_JITTER, _coin(V2_JITTER_P)
    gray = _coin(GRAYSCALE_P)
    view = fn.color_twist(
        view,
        brightness=_jitter_factor(bright, jitter),
        contrast=_jitter_factor(contrast, jitter),
        saturation=_jitter_factor(sat, jitter) * (1 - gray),
        hue=jitter * fn.random.uniform(range=(-hue * 360, hue * 360)),  # turns -> degrees
    )
    if recipe == "v2":
        blur = _coin(V2_BLUR_P)
        sigma = blur * fn.random.uniform(range=V2_BLUR_SIGMA) + (1 - blur) * IDENTITY_SIGMA
        view = fn.gaussian_blur(view, window_size=blur_kernel_size(crop_size), sigma=sigma)
    else:
        blur = sigma = _coin(0.0)
    flip = fn.random.coin_flip(probability=0.5)
    view = fn.crop_mirror_normalize(
        view,
        mirror=flip,
        mean=[255 * m for m in mean],
        std=[255 * s for s in std],
        dtype=out_dtype,
        output_layout=out_layout,
    )
    draws = dict(image_hw=image_hw, crop_hw=crop_hw, flip=flip, gray=gray, jitter=jitter)
    return view, {**draws, "blur": blur, "sigma": sigma}


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
        if recipe not in RECIPES:
            raise UsageError(f"augmentation recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
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
        self.view_args = dict(
            recipe=recipe, crop_size=crop_size, crop_scale=crop_scale, mean=mean, std=std
        )
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
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index if gpu else None,
            seed=seed,
            prefetch_queue_depth=2,
            exec_dynamic=True,  # outputs owned by their Python objects, not recycled by run()
        )
        with pipe:
            paths = fn.external_source(source=feeder, batch=True, dtype=types.UINT8)
            data = fn.io.file.read(paths)
            image_hw = fn.peek_image_shape(data)  # (H, W, C); the crop uses H, W
            images = fn.decoders.image(data, device="mixed" if gpu else "cpu")
            outputs = []
            for _ in range(2):  # two independent draws of the same recipe
                view, draws = augment_view(
                    images,
                    image_hw,
                    out_dtype=out_dtype,
                    out_layout="HWC" if self.layout == "NHWC" else "CHW",
                    **self.view_args,
                )
                outputs.append(view)
                if self.debug:
                    outputs += [draws[k] for k in DEBUG_DRAWS]
            pipe.set_outputs(*outputs)
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
