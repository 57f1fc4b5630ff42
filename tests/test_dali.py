"""The DALI two-view pipeline in CPU mode: layouts and dtypes, the recipes' statistics measured
on the pipeline's own random draws, agreement with the torchvision path, sharding, resume,
corrupt files, and the trainer running on it.

Every image of the synthetic set has its own width, so the image size DALI reports for a
sample (a debug draw) says which file it was: that is how coverage and order are checked.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install -e .[dali])")

from fastmoco.data import build_train_loader, build_two_view_loader  # noqa: E402
from fastmoco.data.dali import DaliTwoViewLoader  # noqa: E402
from fastmoco.errors import DataError, UsageError  # noqa: E402

N_IMAGES = 48  # 3 classes x 16
HEIGHT = 40
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def width_of(i: int) -> int:
    return 40 + i  # unique per image: 40 .. 87


def write_sized_folder(root: Path, classes: int = 3) -> Path:
    """Colour-noise JPEGs with bars, image i (in sorted file order) of width 40 + i."""
    rng = np.random.default_rng(0)
    per_class = N_IMAGES // classes
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            w = width_of(c * per_class + j)
            px = rng.integers(0, 256, size=(HEIGHT, w, 3), dtype=np.uint8)
            px[:, 5 + 8 * c : 10 + 8 * c] = (230, 40, 40)  # a class-dependent red bar
            Image.fromarray(px).save(root / f"class{c}" / f"{j:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def sized_data(tmp_path_factory) -> Path:
    return write_sized_folder(tmp_path_factory.mktemp("dali") / "train")


def dali(root, **kw) -> DaliTwoViewLoader:
    args = dict(recipe="v2", crop_size=32, batch_size=8, seed=0, num_threads=2, debug=True)
    return DaliTwoViewLoader(root, **{**args, **kw})


def epoch_batches(loader, epoch: int, start_step: int = 0) -> list:
    loader.set_epoch(epoch, start_step)
    return list(loader)


def image_ids(batch) -> list[int]:
    """Which images a batch holds: the width DALI read, minus 40."""
    return [int(w) - 40 for w in batch[4][0]["image_hw"][:, 1]]


def draws(loader, epochs: int) -> dict[str, np.ndarray]:
    """Every debug draw of both views over `epochs` epochs, concatenated per name."""
    out: dict[str, list] = {}
    for e in range(epochs):
        for batch in epoch_batches(loader, e):
            for view in batch[4]:
                for k, v in view.items():
                    out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shapes_dtypes_layouts(sized_data, layout, dtype):
    loader = dali(sized_data, dtype=dtype, layout=layout, crop_size=24)
    assert len(loader) == N_IMAGES // 8
    batches = epoch_batches(loader, 0)
    assert len(batches) == len(loader)
    v1, v2, target, n_bad, _ = batches[0]
    for v in (v1, v2):
        assert v.shape == (8, 3, 24, 24) and v.dtype == dtype and v.device.type == "cpu"
        fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
        assert v.is_contiguous(memory_format=fmt)
        assert torch.isfinite(v.float()).all()
    assert target.dtype == torch.int64 and target.shape == (8,)
    assert int(n_bad) == 0
    ids = image_ids(batches[0])
    assert target.tolist() == [i // 16 for i in ids]  # the label of the very image


def test_layouts_hold_the_same_pixels(sized_data):
    """NHWC is a memory layout, not other numbers: same seed, same views in both."""
    a = epoch_batches(dali(sized_data, layout="NCHW"), 1)[0]
    b = epoch_batches(dali(sized_data, layout="NHWC"), 1)[0]
    torch.testing.assert_close(a[0], b[0])
    h = epoch_batches(dali(sized_data, layout="NHWC", dtype=torch.float16), 1)[0]
    torch.testing.assert_close(h[0].float(), a[0], atol=4e-3, rtol=2e-3)


def crop_area_mean_torchvision(image_hw: np.ndarray, seed: int = 0) -> float:
    """E[crop area / image area] of torchvision's RandomResizedCrop on the same image sizes."""
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(seed)
    areas = []
    for h, w in image_hw[:, :2]:
        img = torch.empty(3, int(h), int(w))
        _, _, ch, cw = RandomResizedCrop.get_params(img, (0.2, 1.0), (3 / 4, 4 / 3))
        areas.append(ch * cw / (h * w))
    return float(np.mean(areas))


@pytest.mark.parametrize("recipe", ["v1", "v2"])
def test_recipe_statistics(sized_data, recipe):
    """Probabilities and ranges of the recipe, over 2 views x 48 images x 8 epochs = 768."""
    d = draws(dali(sized_data, recipe=recipe), epochs=8)
    n = len(d["flip"])
    assert n == 768

    def close(p_hat, p):  # 4.5 binomial standard deviations
        return abs(p_hat - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9

    assert close(d["flip"].mean(), 0.5)
    assert close(d["gray"].mean(), 0.2)
    assert close(d["jitter"].mean(), 0.8 if recipe == "v2" else 1.0)
    assert close(d["blur"].mean(), 0.5 if recipe == "v2" else 0.0)
    if recipe == "v2":
        sigma = d["sigma"][d["blur"] == 1]
        assert sigma.min() >= 0.1 and sigma.max() <= 2.0
        assert abs(sigma.mean() - 1.05) < 0.1  # U(0.1, 2.0)
        np.testing.assert_array_equal(d["sigma"][d["blur"] == 0], 0)
    # jitter: each view's order a permutation, the 24 equally likely (chi-square, 23 dof:
    # 60 is beyond its 99.99th percentile); factors in torchvision's ranges
    order, factors = d["order"], d["factors"]
    assert (np.sort(order, axis=1) == np.arange(4)).all()
    codes = order @ np.array([64, 16, 4, 1])
    counts = np.array([(codes == c).sum() for c in np.unique(codes)])
    assert len(counts) == 24
    assert ((counts - n / 24) ** 2 / (n / 24)).sum() < 60
    hue = 0.1 if recipe == "v2" else 0.4
    assert (np.abs(factors[:, :3] - 1) <= 0.4 + 1e-6).all() and factors[:, :3].std() > 0.2
    assert (np.abs(factors[:, 3]) <= hue + 1e-6).all() and np.abs(factors[:, 3]).max() > hue / 2
    # the draws are independent of each other (same-seeded coins would be correlated)
    coins = np.stack([d[k].astype(float) for k in ("flip", "gray", "jitter", "blur")])
    corr = np.corrcoef(coins[np.std(coins, axis=1) > 0])
    assert np.abs(corr - np.eye(len(corr))).max() < 0.15

    crop_h, crop_w = d["crop_hw"][:, 0], d["crop_hw"][:, 1]
    h, w = d["image_hw"][:, 0], d["image_hw"][:, 1]
    area = crop_h * crop_w / (h * w)
    # integer rounding of the window moves the area by a pixel row or column at most
    slack = (crop_h + crop_w + 1) / (h * w)
    assert (area >= 0.2 - slack).all() and (area <= 1.0).all()
    ratio = crop_w / crop_h
    assert (ratio >= 3 / 4 * (1 - 2 / crop_w)).all() and (ratio <= 4 / 3 * (1 + 2 / crop_h)).all()
    # the same distribution as torchvision's sampler (mean 0.6 before its retries)
    expected = crop_area_mean_torchvision(d["image_hw"])
    assert abs(area.mean() - expected) < 0.03, (area.mean(), expected)
    assert area.std() > 0.15  # spread over the range, not stuck at one size


def unnormalize(v: torch.Tensor) -> torch.Tensor:
    return v.float() * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_draws_take_effect_on_pixels(sized_data):
    """Gray views have R = G = B; blurred views lose high-frequency energy; flipped views are
    mirror images of an unflipped rendering with the same draws otherwise."""
    loader = dali(sized_data, recipe="v2", mean=MEAN, std=STD)
    views, gray, blur = [], [], []
    for e in range(3):
        for batch in epoch_batches(loader, e):
            for v, d in zip(batch[:2], batch[4], strict=True):
                views.append(unnormalize(v))
                gray.append(d["gray"])
                blur.append(d["blur"])
    x, gray, blur = torch.cat(views), np.concatenate(gray) == 1, np.concatenate(blur) == 1
    spread = (x.max(dim=1).values - x.min(dim=1).values).mean(dim=(1, 2))  # per image
    assert gray.sum() > 10 and (~gray).sum() > 10
    assert spread[gray].max() < 0.01  # grey to rounding
    assert spread[~gray].min() > 0.02  # colour noise keeps some colour, even desaturated
    # neighbour differences: blur (sigma >= 0.1 over a 3-px window) smooths the noise
    tv = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    assert tv[blur].mean() < 0.8 * tv[~blur].mean()


def run_on_images(images: list[np.ndarray], graph, *columns: list) -> list[np.ndarray]:
    """graph(images, *columns) in a one-batch CPU pipeline with conditionals: images are HWC
    uint8 arrays (any sizes), each column one per-sample scalar per image."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    def feed(batch):  # a named closure per column: autograph rewrites lambdas' defaults
        return lambda: batch

    @pipeline_def(enable_conditionals=True, batch_size=len(images), num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=feed(images), batch=True, layout="HWC")
        return graph(x, *[fn.external_source(source=feed(c), batch=True) for c in columns])

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.asarray(out[i]) for i in range(len(images))]


def jitter_test_images(n: int) -> list[np.ndarray]:
    """Colour noise of ragged sizes with a saturated red bar (clipping and hue both matter)."""
    rng = np.random.default_rng(3)
    images = []
    for i in range(n):
        img = rng.integers(0, 256, size=(9 + i % 5, 11 + 2 * (i % 4), 3), dtype=np.uint8)
        img[:, :4] = (230, 40, 40)
        images.append(img)
    return images


def torchvision_jitter(img: np.ndarray, order, factors) -> torch.Tensor:
    """torchvision's ColorJitter functionals in float64 (no rounding between steps)."""
    import torchvision.transforms.functional as F

    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    x = torch.from_numpy(img).permute(2, 0, 1).double() / 255
    for k in order:
        x = adjust[k](x, float(factors[k]))
    return x * 255


def rel_err(out: list, ref: list) -> float:
    out = torch.cat([torch.as_tensor(o, dtype=torch.float64).flatten() for o in out])
    ref = torch.cat([r.flatten() for r in ref])
    return float((out - ref).norm() / ref.norm())


def test_color_jitter_matches_torchvision_in_every_order():
    """DALI's jitter against torchvision's ColorJitter, per image, for all 24 orders of the
    four adjustments with random factors (hue up to v1's 0.4 turns): within 0.6 % relative
    error (uint8 rounding after each step), where DALI's color_twist (one fixed order,
    contrast about mid-grey, hue in YIQ) was 25 % off. The same outputs are ~8 % off
    torchvision applied in the reverse order, so the check sees order; it also fails a
    zeroed or 1 %-scaled output."""
    from itertools import permutations

    from fastmoco.data.dali import color_jitter

    orders = [np.array(p) for p in permutations(range(4))]  # adjustment applied k-th
    images = jitter_test_images(len(orders))
    rng = np.random.default_rng(4)
    factors = np.stack(
        [rng.uniform(0.6, 1.4, len(orders)) for _ in range(3)]
        + [rng.uniform(-0.4, 0.4, len(orders))],
        axis=1,
    ).astype(np.float32)
    slots = [np.argsort(o).astype(np.int32) for o in orders]  # slot of adjustment k
    columns = [[s[k] for s in slots] for k in range(4)] + [list(factors[:, k]) for k in range(4)]
    out = run_on_images(images, lambda x, *c: color_jitter(x, c[:4], c[4:]), *columns)

    ref = [
        torchvision_jitter(img, o, f).permute(1, 2, 0)
        for img, o, f in zip(images, orders, factors, strict=True)
    ]
    tol = 6e-3
    assert rel_err(out, ref) < tol
    assert rel_err([0 * o.astype(float) for o in out], ref) > tol
    assert rel_err([0.99 * o.astype(float) for o in out], ref) > tol
    reverse = [
        torchvision_jitter(img, o[::-1], f).permute(1, 2, 0)
        for img, o, f in zip(images, orders, factors, strict=True)
    ]
    assert rel_err(out, reverse) > 5 * tol


def test_color_jitter_identity_and_grayscale_is_luma():
    """Factors 1, 1, 1 and hue 0 leave every pixel as it is, in any order (the HSV round trip
    included); grayscale is torchvision's rgb_to_grayscale (ITU-R 601) in all three
    channels, to rounding."""
    import torchvision.transforms.functional as F

    from fastmoco.data.dali import color_jitter, grayscale

    images = jitter_test_images(6)
    rng = np.random.default_rng(5)
    slots = [rng.permutation(4).astype(np.int32) for _ in images]
    identity = [np.float32(1), np.float32(1), np.float32(1), np.float32(0)]
    columns = [[s[k] for s in slots] for k in range(4)] + [[f] * len(images) for f in identity]
    out = run_on_images(images, lambda x, *c: color_jitter(x, c[:4], c[4:]), *columns)
    for o, img in zip(out, images, strict=True):
        np.testing.assert_array_equal(o, img)
    gray = run_on_images(images, grayscale)
    ref = [
        F.rgb_to_grayscale(torch.from_numpy(i).permute(2, 0, 1).double(), 3).permute(1, 2, 0)
        for i in images
    ]
    assert rel_err(gray, ref) < 5e-3
    assert all((g == g[:, :, :1]).all() for g in gray)


@pytest.mark.parametrize("recipe", ["v1", "v2"])
def test_pixel_statistics_match_torchvision(sized_data, recipe):
    """Per-channel mean and std of the views over 3 epochs: DALI vs the torchvision loader."""

    def stats(loader):
        xs = []
        for e in range(3):
            loader.set_epoch(e)
            xs += [t for b in loader for t in b[:2]]
        x = torch.cat(xs).float()
        return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)), x.std(dim=(2, 3)).mean()

    common = dict(recipe=recipe, crop_size=32, batch_size=8, seed=0, mean=MEAN, std=STD)
    m_d, s_d, local_d = stats(DaliTwoViewLoader(sized_data, num_threads=2, **common))
    m_t, s_t, local_t = stats(build_two_view_loader(sized_data, workers=0, **common))
    torch.testing.assert_close(m_d, m_t, atol=0.08, rtol=0)
    torch.testing.assert_close(s_d, s_t, atol=0.1, rtol=0.1)
    assert abs(local_d - local_t) < 0.1 * local_t


def test_two_views_differ_and_seed_determines(sized_data):
    a = epoch_batches(dali(sized_data), 0)
    b = epoch_batches(dali(sized_data), 0)
    c = epoch_batches(dali(sized_data, seed=1), 0)
    v1, v2 = a[0][0], a[0][1]
    assert ((v1 - v2).abs().flatten(1).amax(dim=1) > 0.1).all()  # every pair differs
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x[0], y[0], rtol=0, atol=0)
        torch.testing.assert_close(x[1], y[1], rtol=0, atol=0)
    assert not torch.equal(a[0][0], c[0][0])
    # a new epoch is a new order and new draws
    e1 = epoch_batches(dali(sized_data), 1)
    assert [image_ids(x) for x in a] != [image_ids(x) for x in e1]


def test_batches_own_their_memory(sized_data):
    """DALI reuses its output buffers: every batch handed over must be a copy."""
    loader = dali(sized_data)
    loader.set_epoch(0)
    batches = iter(loader)
    first = next(batches)
    snapshot = first[0].clone()
    rest = list(batches)
    assert len(rest) == len(loader) - 1
    torch.testing.assert_close(first[0], snapshot, rtol=0, atol=0)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.gpu
@CUDA
def test_gpu_pipeline_matches_cpu_mode(sized_data):
    """The GPU variant ("mixed" nvJPEG decode, GPU operators) draws the same random numbers as
    the CPU mode (the draws are CPU operators seeded alike), so the views agree up to the
    decoders' and resamplers' rounding; they arrive on the GPU in the asked dtype/layout."""
    kw = dict(recipe="v2", mean=MEAN, std=STD)
    cpu = epoch_batches(dali(sized_data, **kw), 0)
    gpu = epoch_batches(
        dali(sized_data, device="cuda", dtype=torch.float16, layout="NHWC", **kw), 0
    )
    assert len(gpu) == len(cpu) == N_IMAGES // 8
    for c, g in zip(cpu, gpu, strict=True):
        v = g[0]
        assert v.device.type == "cuda" and v.dtype == torch.float16
        assert v.shape == (8, 3, 32, 32) and v.is_contiguous(memory_format=torch.channels_last)
        assert g[2].device.type == "cuda" and torch.equal(g[2].cpu(), c[2])
        for k in ("crop_hw", "flip", "gray", "blur"):
            np.testing.assert_array_equal(g[4][0][k], c[4][0][k])
        diff = (unnormalize(g[0].float().cpu()) - unnormalize(c[0])).abs()
        assert diff.mean() < 0.03, diff.mean()  # pixel values in [0, 1]


@pytest.mark.parametrize("batch_size", [8, 5])
def test_two_ranks_cover_each_epoch_once(sized_data, batch_size):
    """2 simulated ranks: disjoint, together every image once per epoch (48 = 2 x 3 x 8); with
    B=5 the 8 images past the last full global batch of 10 are left out, as in the torch loader.
    """
    used = 2 * batch_size * (N_IMAGES // (2 * batch_size))
    ranks = [dali(sized_data, rank=r, world_size=2, batch_size=batch_size) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == N_IMAGES // (2 * batch_size)
    torch_order = build_two_view_loader(
        sized_data,
        recipe="v2",
        crop_size=32,
        batch_size=batch_size,
        workers=0,
        seed=0,
        rank=1,
        world_size=2,
    ).batch_sampler
    for epoch in range(2):
        seen = [[i for b in epoch_batches(r, epoch) for i in image_ids(b)] for r in ranks]
        assert len(seen[0]) == len(seen[1]) == used // 2
        assert not set(seen[0]) & set(seen[1])
        assert len(set(seen[0]) | set(seen[1])) == used
        torch_order.set_epoch(epoch)
        assert seen[1] == torch_order.epoch_indices()  # the very order of the torch loader


def test_resume_mid_epoch_continues_the_order(sized_data):
    loader = dali(sized_data)
    full = [image_ids(b) for b in epoch_batches(loader, 2)]
    tail = [image_ids(b) for b in epoch_batches(loader, 2, start_step=4)]
    assert tail == full[4:]
    assert len(loader) == 6  # whatever start_step was


def test_epochs_left_unfinished_or_empty(sized_data):
    """A pass broken off (the trainer stopping) or starting past the end leaves the next
    epoch whole and in order: the pipeline lives on only across finished epochs."""
    loader, fresh = dali(sized_data), dali(sized_data)
    loader.set_epoch(0)
    for step, _ in enumerate(loader):
        if step == 1:
            break
    expected = [image_ids(b) for b in epoch_batches(fresh, 1)]
    assert [image_ids(b) for b in epoch_batches(loader, 1)] == expected
    assert epoch_batches(loader, 2, start_step=len(loader)) == []
    assert [image_ids(b) for b in epoch_batches(loader, 1)] == expected


def test_corrupt_jpeg_named_or_counted(tmp_path):
    root = write_sized_folder(tmp_path / "train")
    bad = root / "class1" / "003.jpg"  # image 19
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 20)
    with pytest.raises(DataError, match=r"cannot read image .*class1/003\.jpg.*--skip-bad-images"):
        epoch_batches(dali(root), 0)

    loader = dali(root, skip_bad_images=True)
    for epoch in range(2):
        batches = epoch_batches(loader, epoch)
        assert len(batches) == len(loader) == 6
        assert sum(int(b[3]) for b in batches) == 1  # one skip per epoch
        ids = [i for b in batches for i in image_ids(b)]
        assert 19 not in ids and ids.count(20) == 2  # replaced by its successor
        assert all(b[0].shape == (8, 3, 32, 32) for b in batches)


def test_dali_failure_on_readable_files_is_explained(sized_data):
    """When PIL reads every file in flight, the error quotes DALI's operator and cause."""
    loader = dali(sized_data)
    paths = [[loader.samples[0][0], loader.samples[1][0]]]
    error = RuntimeError(
        "Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\n"
        "which was used in the pipeline definition with the following traceback:\n\n"
        '  File "x.py", line 1\n\nencountered:\n\nnvImageCodec failure: #3\n'
        "Current pipeline object is no longer valid.\n"
    )
    match = r"failed on images .*000\.jpg \.\.\. .*001\.jpg, all of which PIL can read "
    match += r"\(Error in CPU operator `nvidia\.dali\.fn\.decoders\.image`: nvImageCodec failure"
    with pytest.raises(DataError, match=match):
        loader._find_bad_file(paths, error)


def test_bad_arguments_are_named(sized_data):
    with pytest.raises(UsageError, match="layout"):
        dali(sized_data, layout="CHW")
    with pytest.raises(UsageError, match="recipe"):
        dali(sized_data, recipe="v9")
    with pytest.raises(UsageError, match="dtype"):
        dali(sized_data, dtype=torch.int8)
    with pytest.raises(DataError, match="lower --batch-size"):
        dali(sized_data, batch_size=32, world_size=2)


def test_build_train_loader_picks_and_says(sized_data):
    kw = dict(recipe="v2", crop_size=32, batch_size=8, workers=0, seed=0)
    auto = build_train_loader(sized_data, loader="auto", device="cpu", **kw)
    assert "torch DataLoader" in auto.description and "auto" in auto.description
    forced = build_train_loader(sized_data, loader="dali", device="cpu", channels_last=True, **kw)
    assert isinstance(forced, DaliTwoViewLoader) and forced.layout == "NHWC"
    assert "DALI (CPU mode" in forced.description
    assert "torch" in build_train_loader(sized_data, loader="torch", **kw).description
    with pytest.raises(UsageError, match="--loader 'fast'"):
        build_train_loader(sized_data, loader="fast", **kw)


def test_trainer_runs_on_dali(sized_data, tmp_path, capsys):
    from fastmoco.config import PRESETS
    from fastmoco.engine.trainer import train

    cfg = PRESETS["demo"].replace(
        data=str(sized_data),
        loader="dali",
        epochs=2,
        batch_size=16,
        queue_size=64,
        allow_repeated_negatives=True,  # 48 images: the run checks the loader, not learning
        bn_splits=2,
        knn_every=0,
        workers=2,
        device="cpu",
        channels_last=True,
        progress=False,
        out=str(tmp_path / "run"),
    )
    results = train(cfg)
    assert "loader: DALI (CPU mode, 2 threads)" in capsys.readouterr().out
    assert len(results["history"]) == 2
    assert all(math.isfinite(h["loss"]) for h in results["history"])
