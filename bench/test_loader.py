"""Two-view training input: images/s of DALI vs the torchvision DataLoader, MoCo v2 recipe.

Run: pytest bench/test_loader.py --benchmark-only. One timed call is one epoch of one rank:
set_epoch, then every batch (view1, view2, target, n_bad) taken, on the GPU synchronized at
the end. The JPEGs are generated once per session, ImageNet-like: 500 x 375, smooth colour
fields with fine grain, quality 90 (about 60-100 KB each), crops of 224 px.

  torch-Nw     loader.TwoViewLoader (PIL decode, torchvision v2 recipe) with N worker
               processes, N in {1, 4, all CPUs}; batches stay on the CPU (the trainer's
               copy to the GPU is not timed)
  dali-cpu-Nt  the DALI pipeline in CPU mode with N threads (CPU sizes only)
  dali-gpu-Nt  the DALI pipeline with nvJPEG decode and GPU augmentation, N CPU threads
               for file reading (CUDA only); views land on the GPU, fp16, NHWC

Sizes: without a GPU, 16 images in batches of 8 (the CPU table is a smoke test of the
pipelines at full resolution, not a measurement worth quoting); with one, 2048 images in
batches of 256. The comparison table's baseline is torch with all CPUs as workers: the
issue's goal is DALI at 5x that on an H100 machine (16 CPUs).
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastmoco.data import build_two_view_loader

dali = pytest.importorskip("fastmoco.data.dali")

CUDA = torch.cuda.is_available()
NO_GPU = pytest.mark.skipif(not CUDA, reason="no CUDA device: CPU cases only")
NO_DALI = pytest.mark.skipif(not dali.dali_available(), reason="NVIDIA DALI is not installed")
CPUS = len(os.sched_getaffinity(0))
WORKERS = sorted({1, 4, CPUS})
CROP = 224
SIZES = {"cpu": (16, 8), "cuda": (2048, 256)}  # (images, batch size)


def write_imagenet_like(root, n: int, seed: int = 0):
    """n JPEGs of 500 x 375 in 4 classes: a bicubic-upsampled 12 x 16 colour field plus grain
    (pure noise would compress far worse than photographs do)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        px = np.asarray(coarse.resize((500, 375), Image.BICUBIC), dtype=np.int16)
        px = px + rng.integers(-12, 13, px.shape, dtype=np.int16)
        Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """{device: image folder of SIZES[device][0] images}; the large one only with a GPU."""
    root = tmp_path_factory.mktemp("imagenet_like")
    sets = {"cpu": write_imagenet_like(root / "small", SIZES["cpu"][0])}
    if CUDA:
        sets["cuda"] = write_imagenet_like(root / "large", SIZES["cuda"][0])
    return sets


def _cases():
    cases = []
    for device in ("cpu", "cuda"):
        mark = [NO_GPU] if device == "cuda" else []
        for w in WORKERS:
            cases.append(pytest.param(device, "torch", w, id=f"{device}-torch-{w}w", marks=mark))
        impl = "dali-gpu" if device == "cuda" else "dali-cpu"
        for w in WORKERS if device == "cpu" else sorted({4, CPUS}):
            cases.append(
                pytest.param(device, impl, w, id=f"{device}-{impl}-{w}t", marks=[*mark, NO_DALI])
            )
    return cases


def _loader(root, device: str, impl: str, workers: int, batch_size: int):
    common = dict(recipe="v2", crop_size=CROP, batch_size=batch_size, seed=0)
    if impl == "torch":
        return build_two_view_loader(root, workers=workers, pin_memory=False, **common)
    if impl == "dali-cpu":
        return dali.DaliTwoViewLoader(root, num_threads=workers, **common)
    return dali.DaliTwoViewLoader(
        root, num_threads=workers, device="cuda", dtype=torch.float16, layout="NHWC", **common
    )


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on fewer CPUs
@pytest.mark.parametrize("device,impl,workers", _cases())
def test_two_view_loader(benchmark, env_info, report_row, jpegs, device, impl, workers):
    batch_size = SIZES[device][1]
    loader = _loader(jpegs[device], device, impl, workers, batch_size)
    epochs = iter(range(10**6))

    def epoch():
        loader.set_epoch(next(epochs))
        taken = 0
        for view1, _, _, _ in loader:
            taken += view1.shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return taken

    taken = epoch()  # warm-up: worker start-up, pipeline build, nvJPEG set-up
    group = f"two-view v2 {CROP}px {device}: {taken} images, batch {batch_size}"
    benchmark.group = group
    rounds = 5 if device == "cuda" else 2
    benchmark.pedantic(epoch, rounds=rounds, warmup_rounds=0, iterations=1)
    median = benchmark.stats.stats.median
    report_row(group, f"{impl}-{workers}{'w' if impl == 'torch' else 't'}", median,
               baseline=f"torch-{CPUS}w")  # fmt: skip
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update(
        device=device,
        loader=getattr(loader, "description", impl),
        images=taken,
        batch_size=batch_size,
        images_per_s=round(taken / median, 1),
        cpus=CPUS,
    )
