"""fastmoco.data: scanning and its errors, bad images, augmentation statistics, loader order
(determinism, resume, sharding), and the demo dataset (determinism, cache, atomicity)."""

import os
import shutil
import time

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image

from fastmoco.data import (
    DemoSpec,
    ImageFolderDataset,
    blur_kernel_size,
    build_eval_loader,
    build_two_view_loader,
    demo_contact_sheet,
    demo_dataset,
    eval_transform,
    scan_image_folder,
    two_view_transform,
)
from fastmoco.data import demo as demo_mod
from fastmoco.errors import DataError, UsageError

SMALL = DemoSpec(image_size=32, n_train_per_class=4, n_val_per_class=2, classes=("ring", "star"))
PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # views in [0, 1], as drawn


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMOCO_CACHE", str(tmp_path / "cache"))


def loader(root, **kw):
    args = dict(recipe="v2", crop_size=16, batch_size=4, workers=0, seed=0, **PLAIN)
    return build_two_view_loader(root, **{**args, **kw})


def batches(ld, epoch, start_step=0):
    ld.set_epoch(epoch, start_step)
    return list(ld)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            assert torch.equal(u, v)


# --- scanning ------------------------------------------------------------------------------


def test_scan_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="nope does not exist"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "file.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="file.jpg is an image file, not a folder"):
        scan_image_folder(tmp_path / "file.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no images"):
        scan_image_folder(tmp_path / "empty")
    write_image_folder(tmp_path / "d", classes=2, per_class=2)
    (tmp_path / "d" / "cat").mkdir()
    (tmp_path / "d" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class dir '.*d/cat' has no images \(.jpg/.*remove"):
        scan_image_folder(tmp_path / "d")


def test_scan_is_sorted_nested_and_case_insensitive(tmp_path):
    img = Image.new("RGB", (8, 8))
    for rel in ["b/x.JPG", "b/sub/a.png", "b/.hidden.jpg", "a/z.webp", "a/y.Jpeg", "a/n.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            (tmp_path / rel).write_text("x")
        else:
            img.save(tmp_path / rel, format="PNG")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    samples, classes = scan_image_folder(tmp_path)
    assert classes == ["a", "b"]
    names = [(os.path.relpath(p, tmp_path), t) for p, t in samples]
    assert names == [("a/y.Jpeg", 0), ("a/z.webp", 0), ("b/sub/a.png", 1), ("b/x.JPG", 1)]


# --- bad images ----------------------------------------------------------------------------


@pytest.fixture
def corrupt_data(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=2, per_class=8, size=20)
    bad = root / "class1" / "003.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    return root, bad


def test_corrupt_image_raises_naming_the_file(corrupt_data):
    root, bad = corrupt_data
    ds = ImageFolderDataset(root, transform=lambda im: im)
    i = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(DataError, match=r"cannot read image .*class1/003.jpg.*--skip-bad-images"):
        ds[i]
    ld = loader(root, batch_size=16, workers=1)  # the worker's traceback is stripped
    with pytest.raises(DataError, match=r"^cannot read image .*003.jpg.*--skip-bad-images"):
        batches(ld, 0)


def test_skip_bad_images_substitutes_and_counts(corrupt_data):
    root, bad = corrupt_data
    ds = ImageFolderDataset(root, transform=lambda im: im, skip_bad_images=True)
    i = [p for p, _ in ds.samples].index(str(bad))
    img, target, n_bad = ds[i]
    assert n_bad == 1 and img.size == (20, 20)
    assert (target, ds[i + 1][2]) == (ds.samples[i + 1][1], 0)
    out = batches(loader(root, batch_size=8, skip_bad_images=True), 0)
    assert len(out) == 2 and sum(int(b[3]) for b in out) == 1  # batch 8 x 2 uses every image
    for v1, v2, t, n in out:
        assert v1.shape == v2.shape == (8, 3, 16, 16) and t.shape == (8,) and n.shape == ()


def test_all_bad_gives_up(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=1, per_class=3)
    for p in (root / "class0").iterdir():
        p.write_bytes(b"garbage")
    ds = ImageFolderDataset(root, transform=lambda im: im, skip_bad_images=True)
    with pytest.raises(DataError, match="3 unreadable images in a row"):
        ds[0]


# --- augmentation --------------------------------------------------------------------------


def test_recipe_parameters():
    assert [blur_kernel_size(s) for s in (224, 96, 64, 32, 16)] == [23, 9, 7, 3, 3]
    with pytest.raises(UsageError, match="recipe 'v4'"):
        two_view_transform("v4")
    with pytest.raises(UsageError, match="odd"):
        two_view_transform("v2", blur_kernel=4)
    x = eval_transform(crop_size=28)(Image.new("RGB", (50, 40)))
    assert x.shape == (3, 28, 28)
    assert eval_transform(224).transforms[0].size == 256


def test_two_views_differ(tiny_data):
    img = Image.open(next((tiny_data / "train" / "class1").iterdir())).convert("RGB")
    v1, v2 = two_view_transform("v2", crop_size=16)(img)
    assert v1.shape == v2.shape == (3, 16, 16) and v1.dtype == torch.float32
    assert not torch.equal(v1, v2)


def flip_gray_image(n=32):
    """Left half black, right half orange: flips show as a brighter left half, grayscale as
    equal channels (jitter keeps the order of the halves and never removes the colour)."""
    a = np.zeros((n, n, 3), np.uint8)
    a[:, n // 2 :] = (255, 128, 0)
    return Image.fromarray(a)


def blur_image(n=32):
    """Top half a 1-px checkerboard, bottom half two 8-px stripes, both of the values 96 and
    160. Jitter and grayscale are pointwise, so they scale both contrasts alike; only blur
    lowers the checkerboard's contrast relative to the stripes'."""
    y, x = np.mgrid[0:n, 0:n]
    a = np.where((x + y) % 2 == 0, 96, 160)
    a[n // 2 :] = np.where(y[n // 2 :] < 3 * n // 4, 96, 160)
    return Image.fromarray(np.repeat(a[..., None], 3, 2).astype(np.uint8))


def blur_ratio(v):
    g = v.mean(0)
    checker = (g[2:13, 2:29] - g[2:13, 3:30]).abs().mean()
    stripes = g[26:30].mean() - g[18:22].mean()
    return float(checker / stripes)


@pytest.mark.parametrize("recipe", ["v1", "v2"])
def test_augmentation_statistics(recipe):
    torch.manual_seed(0)
    tf = two_view_transform(recipe, crop_size=32, crop_scale=(1.0, 1.0), **PLAIN)
    views = [v for _ in range(300) for v in tf(flip_gray_image())]
    gray = np.mean(
        [float((v[0] - v[1]).abs().max() + (v[1] - v[2]).abs().max()) == 0 for v in views]
    )
    flipped = np.mean([float(v[:, :, :16].sum() > v[:, :, 16:].sum()) for v in views])
    ratios = np.array([blur_ratio(v) for _ in range(300) for v in tf(blur_image())])
    assert 0.13 < gray < 0.27  # RandomGrayscale p=0.2
    assert 0.42 < flipped < 0.58  # RandomHorizontalFlip p=0.5
    if recipe == "v1":
        assert np.all(np.abs(ratios - 1) < 1e-5)  # no blur in v1
    else:
        # Blur with p=0.5; sigma ~ U[0.1, 2] below about 0.27 leaves a 3-px kernel's output
        # unchanged after rounding, so about 0.5 * 0.91 of the views show it.
        assert 0.37 < np.mean(ratios < 0.99) < 0.55
        assert np.all(ratios < 1 + 1e-5)


# --- the training loader -------------------------------------------------------------------


def test_batches_shapes_and_dtypes(tiny_data):
    ld = loader(tiny_data / "train", recipe="v1", batch_size=5)
    assert len(ld) == 36 // 5 and ld.classes == ["class0", "class1", "class2"]
    out = batches(ld, 0)
    assert len(out) == 7
    for v1, v2, t, n_bad in out:
        assert v1.shape == v2.shape == (5, 3, 16, 16) and v1.dtype == v2.dtype == torch.float32
        assert t.dtype == n_bad.dtype == torch.int64 and t.shape == (5,) and n_bad.shape == ()
        assert not torch.equal(v1, v2)


def test_views_depend_only_on_seed_epoch_index(tiny_data):
    root = tiny_data / "train"
    state = torch.random.get_rng_state()
    a = batches(loader(root, workers=0), epoch=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is untouched
    b = batches(loader(root, workers=2), epoch=1)
    assert_same_batches(a, b)
    ds = loader(root).dataset
    assert torch.equal(ds[(1, 5)][0][0], ds[(1, 5)][0][0])
    assert not torch.equal(ds[(1, 5)][0][0], ds[(2, 5)][0][0])
    c = batches(loader(root, workers=0), epoch=2)
    assert not torch.equal(a[0][0], c[0][0])
    d = batches(loader(root, workers=0, seed=1), epoch=1)
    assert not torch.equal(a[0][0], d[0][0])


def test_start_step_yields_the_tail_without_loading_the_head(tiny_data):
    ld = loader(tiny_data / "train", batch_size=5)
    full = batches(ld, epoch=3)
    calls = []
    inner = ld.dataset.transform
    ld.dataset.transform = lambda img: calls.append(1) or inner(img)
    tail = batches(ld, epoch=3, start_step=4)
    assert len(calls) == 5 * 3 and len(ld) == 7  # len() stays the full epoch
    assert_same_batches(full[4:], tail)
    assert batches(ld, epoch=3, start_step=7) == []
    assert len(batches(ld, epoch=4)) == 7  # the next epoch is whole again


def test_sharding_over_two_ranks(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=2, per_class=13, size=12)  # 26 images
    lds = [loader(root, batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 1):
        shards = []
        for ld in lds:
            ld.set_epoch(epoch)
            shards.append([i for b in ld.batch_sampler for e, i in b])
        assert len(lds[0]) == len(lds[1]) == 3  # 26 // (2 * 4)
        assert len(shards[0]) == len(shards[1]) == 12
        assert not set(shards[0]) & set(shards[1])
    assert len(batches(lds[1], 0)) == 3


def test_batch_larger_than_dataset(tiny_data):
    with pytest.raises(DataError, match=r"batch size 37 larger than the dataset \(36 images"):
        loader(tiny_data / "train", batch_size=37)
    with pytest.raises(DataError, match=r"batch size 20 x 2 ranks larger.*lower --batch-size"):
        loader(tiny_data / "train", batch_size=20, world_size=2)
    with pytest.raises(DataError, match="does not exist"):
        loader(tiny_data / "nope")


def test_eval_loader_in_order_without_drop_last(tiny_data):
    root = tiny_data / "val"
    samples, _ = scan_image_folder(root)
    ld = build_eval_loader(root, crop_size=16, resize_size=16, batch_size=5, workers=0)
    out = list(ld)
    assert [len(y) for _, y in out] == [5, 5, 2]
    assert torch.cat([y for _, y in out]).tolist() == [t for _, t in samples]
    assert out[0][0].shape == (5, 3, 16, 16) and out[0][1].dtype == torch.int64
    assert torch.equal(out[0][0], next(iter(ld))[0])  # no randomness
    kw = dict(crop_size=16, batch_size=5, workers=0, world_size=2)
    r0, r1 = (torch.cat([y for _, y in build_eval_loader(root, rank=r, **kw)]) for r in (0, 1))
    assert len(r0) + len(r1) == 12


# --- the demo dataset ----------------------------------------------------------------------


def tree_bytes(root):
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, fs in os.walk(root)
        for f in fs
    }


def test_demo_is_deterministic_and_cached(tmp_path, monkeypatch):
    root = demo_dataset(seed=0, spec=SMALL, progress=False)
    assert root.parent == tmp_path / "cache"
    assert root.name.startswith("demo-v2-seed0-32px-2x4+2-")
    for split, n in (("train", 8), ("val", 4)):
        samples, classes = scan_image_folder(root / split)
        assert len(samples) == n and classes == ["ring", "star"]
    assert Image.open(samples[0][0]).size == (32, 32)
    first = tree_bytes(root)
    mtimes = {p: os.stat(root / p).st_mtime_ns for p in first}

    def no_drawing(*a):
        raise AssertionError("a cached dataset was drawn again")

    monkeypatch.setattr(demo_mod, "_draw_all", no_drawing)
    assert demo_dataset(seed=0, spec=SMALL, progress=False) == root
    assert {p: os.stat(root / p).st_mtime_ns for p in first} == mtimes
    monkeypatch.undo()

    again = demo_mod.write_demo(tmp_path / "again", seed=0, spec=SMALL, progress=False)
    assert tree_bytes(again) == first
    monkeypatch.setattr(demo_mod, "_workers", lambda n: 2)  # a process pool: same bytes
    pooled = demo_mod.write_demo(tmp_path / "pooled", seed=0, spec=SMALL, progress=False)
    assert tree_bytes(pooled) == first
    other = demo_dataset(seed=1, spec=SMALL, progress=False)
    assert other != root and other.name.startswith("demo-v2-seed1-")
    other_bytes = tree_bytes(other)
    assert other_bytes.keys() == first.keys()
    assert all(other_bytes[p] != first[p] for p in first if p.endswith(".jpg"))
    bigger = demo_dataset(seed=0, spec=SMALL.__class__(**{**SMALL.__dict__, "noise_std": 0}))
    assert bigger != root  # any spec field changes the folder


def test_demo_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real, count = demo_mod._draw_to_file, []

    def dies_midway(job):
        count.append(1)
        if len(count) == 5:
            raise KeyboardInterrupt
        real(job)

    monkeypatch.setattr(demo_mod, "_draw_to_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        demo_dataset(seed=0, spec=SMALL, progress=False)
    assert os.listdir(tmp_path / "cache") == []  # no dataset, no temp dir
    monkeypatch.undo()
    root = demo_dataset(seed=0, spec=SMALL, progress=False)
    assert len(scan_image_folder(root / "train")[0]) == 8


def test_demo_killed_leftovers_and_races(tmp_path, monkeypatch):
    dest = tmp_path / "cache" / SMALL.folder_name(0)
    stale = dest.parent / f".{dest.name}.tmp-killed"
    (stale / "train" / "ring").mkdir(parents=True)
    old = time.time() - 2 * demo_mod.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    live = dest.parent / f".{dest.name}.tmp-live"
    live.mkdir()
    assert demo_dataset(seed=0, spec=SMALL, progress=False) == dest
    assert not stale.exists() and live.exists()  # a young temp dir may belong to a live run
    assert demo_mod.is_complete(dest)

    # Another process completes first: its copy is kept, ours is dropped.
    real = demo_mod._draw_all

    def loses_race(tmp, seed, spec, progress):
        real(tmp, seed, spec, progress)
        shutil.copytree(dest, tmp_path / "winner")

    monkeypatch.setattr(demo_mod, "_draw_all", loses_race)
    winner = tmp_path / "winner"
    assert demo_mod.write_demo(winner, seed=0, spec=SMALL, progress=False) == winner
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".winner")] == []

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(DataError, match="not a complete demo dataset"):
        demo_mod.write_demo(tmp_path / "junk", spec=SMALL, progress=False)


def test_demo_command_and_contact_sheet(tmp_path, capsys):
    demo_mod.main(["--out", str(tmp_path / "demo"), "--seed", "3", "--no-progress"])
    out = capsys.readouterr().out
    assert "train: 1500 images in 10 classes" in out and "val: 500 images in 10 classes" in out
    png = demo_contact_sheet(tmp_path / "demo", tmp_path / "sheet.png", per_class=4)
    assert Image.open(png).size == (80 + 4 * 128, 10 * 128)


def test_v3_recipe_is_asymmetric():
    """moco-v3's pair: view 1 always blurred and never solarized; view 2 blurred with
    p=0.1 and solarized with p=0.2; both jitter 0.4/0.4/0.2/0.1 with p=0.8."""
    from torchvision import transforms as T

    from fastmoco.data.augment import two_view_transform

    pair = two_view_transform("v3", crop_size=32, crop_scale=(0.08, 1.0))
    steps = [pair.transform.transforms, pair.transform2.transforms]

    def find(view, kind):
        for step in steps[view]:
            inner = step.transforms[0] if isinstance(step, T.RandomApply) else step
            if isinstance(inner, kind):
                return step
        return None

    for view, blur_p, solarize_p in ((0, 1.0, None), (1, 0.1, 0.2)):
        assert find(view, T.GaussianBlur).p == blur_p
        solarize = find(view, T.RandomSolarize)  # view 1 has none, as moco-v3's augmentation1
        assert (solarize and solarize.p) == solarize_p
        jitter = find(view, T.ColorJitter)
        assert jitter.p == 0.8
        assert jitter.transforms[0].saturation == (0.8, 1.2)  # strength 0.2, not v2's 0.4
        assert find(view, T.RandomResizedCrop).scale == (0.08, 1.0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    v1, v2 = pair(img)
    assert v1.shape == v2.shape == (3, 32, 32)


def test_process_exits_with_a_loader_still_holding_workers(tiny_data):
    """Workers ignore SIGTERM (stop signals are the main process's), which is how
    multiprocessing ends daemonic children at exit: a process still holding a loader with
    live workers (persistent workers, a traceback keeping an iterator) must exit anyway."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from fastmoco.data.loader import build_two_view_loader\n"
        "ld = build_two_view_loader(sys.argv[1], recipe='v2', crop_size=16, batch_size=4,\n"
        "                           workers=2, seed=0)\n"
        "ld.set_epoch(0)\n"
        "it = iter(ld)\n"
        "next(it)\n"
        "print('batch read', flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tiny_data / "train")],
        capture_output=True,
        text=True,
        timeout=180,  # before the fix it waited for its workers forever
    )
    assert done.returncode == 0 and "batch read" in done.stdout, done.stderr
