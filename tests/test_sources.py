"""--data in all its forms: unlabelled folders (flat, nested), image lists, every format
torchvision's ImageFolder reads, and torchvision's CIFAR / STL-10 files on disk."""

import pickle

import numpy as np
import pytest
import torch
from conftest import tiny_train_config, write_image_folder
from PIL import Image

from fastmoco.cli import main
from fastmoco.data import ImageFolderDataset
from fastmoco.data.sources import IMG_EXTENSIONS, bank_split, open_source, splits
from fastmoco.engine import train
from fastmoco.errors import DataError


def _train_briefly(data, out, capsys, **kw):
    cfg = tiny_train_config(data, out, epochs=1, **kw)
    res = train(cfg)
    return res, capsys.readouterr().out


def _move_all_into(src, dst, nested=False):
    """Flatten an ImageFolder tree into dst (or into dst/a/b/ subfolders of any depth)."""
    dst.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(src.rglob("*.jpg"))):
        d = dst / "a" / f"b{i % 3}" / "c" if nested and i % 2 else dst
        d.mkdir(parents=True, exist_ok=True)
        f.rename(d / f"{f.parent.name}_{f.name}")


def test_flat_folder_trains_unlabelled(tmp_path, capsys):
    write_image_folder(tmp_path / "tree", classes=3, per_class=12)
    _move_all_into(tmp_path / "tree", tmp_path / "flat")
    src = open_source(tmp_path / "flat")
    assert len(src.samples) == 36 and src.classes == [] and not src.labelled
    assert {t for _, t in src.samples} == {-1}
    res, out = _train_briefly(tmp_path / "flat", tmp_path / "run", capsys)
    assert len(res["history"]) == 1 and np.isfinite(res["history"][0]["loss"])
    assert res["knn_final"] is None


def test_nested_unlabelled_train_with_val_skips_knn_with_a_message(tmp_path, capsys):
    """DIR/train holds images at several depths beside loose ones (unlabelled), DIR/val is
    labelled: training runs, the kNN monitor is skipped and says why."""
    write_image_folder(tmp_path / "tree", classes=3, per_class=12)
    _move_all_into(tmp_path / "tree", tmp_path / "d" / "train", nested=True)
    write_image_folder(tmp_path / "d" / "val", classes=3, per_class=4)
    src = open_source(tmp_path / "d" / "train")
    assert len(src.samples) == 36 and not src.labelled
    assert any("/a/b" in p for p, _ in src.samples)  # the nested ones are found
    res, out = _train_briefly(tmp_path / "d", tmp_path / "run", capsys)
    assert res["knn_final"] is None
    assert "kNN monitor off" in out and "unlabelled" in out


def test_image_list_trains(tmp_path, capsys):
    write_image_folder(tmp_path / "imgs", classes=3, per_class=12)
    files = sorted((tmp_path / "imgs").rglob("*.jpg"))
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    rel = [f"../imgs/{f.parent.name}/{f.name}" for f in files[:20]]  # relative to the list
    lst.write_text("# my list\n" + "\n".join(rel + [str(f) for f in files[20:]]) + "\n\n")
    src = open_source(lst)
    assert len(src.samples) == 36 and not src.labelled
    assert splits(lst) == (str(lst), None)
    res, _ = _train_briefly(lst, tmp_path / "run", capsys)
    assert len(res["history"]) == 1 and np.isfinite(res["history"][0]["loss"])


def test_image_list_errors(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("nope/a.jpg\n")
    with pytest.raises(DataError, match="none of its 1 paths exists.*list.s folder"):
        open_source(lst)
    lst.write_text("# nothing\n")
    with pytest.raises(DataError, match="empty"):
        open_source(lst)
    blob = tmp_path / "x.bin"
    blob.write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match="not a text list"):
        open_source(blob)


@pytest.mark.parametrize("ext", [".tif", ".TIFF", ".ppm", ".pgm", ".webp", ".JPG", ".PNG", ".bmp"])
def test_torchvision_image_formats(tmp_path, ext):
    assert set(IMG_EXTENSIONS) >= {".tif", ".tiff", ".ppm", ".pgm", ".webp"}
    d = tmp_path / "data" / "c0"
    d.mkdir(parents=True)
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    fmt = {".jpg": "JPEG", ".pgm": "PPM", ".ppm": "PPM", ".tif": "TIFF"}.get(ext.lower())
    (img.convert("L") if ext.lower() == ".pgm" else img).save(d / f"x{ext}", format=fmt)
    ds = ImageFolderDataset(
        tmp_path / "data", transform=lambda im: torch.tensor(im.getpixel((0, 0)))
    )
    assert len(ds) == 1
    pixel, target, n_bad = ds[0]
    assert target == 0 and n_bad == 0 and pixel.tolist()[0] in range(195, 206)


# --- torchvision's on-disk formats, written small -------------------------------------------


def write_cifar10(root, n_train=40, n_test=12, seed=0):
    """cifar-10-batches-py as torchvision reads it: 5 pickled train batches, test_batch,
    batches.meta. Class c draws c+1 bright bars (as conftest's folders)."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)

    def batch(n):
        labels = [int(i % 3) for i in range(n)]
        images = rng.integers(0, 80, size=(n, 32, 32, 3), dtype=np.uint8)
        for i, c in enumerate(labels):
            for b in range(c + 1):
                images[i, 3:29, 2 + 8 * b : 5 + 8 * b] = 230
        return {"data": images.transpose(0, 3, 1, 2).reshape(n, -1), "labels": labels}

    for i in range(5):
        with open(d / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump(batch(n_train // 5), f)
    with open(d / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship"]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names + ["truck"]}, f)
    return root


def _skip_md5(monkeypatch):
    """torchvision checks the published md5 of every file; these tiny ones have their own."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.stl10 as stl10

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(stl10, "check_integrity", lambda *a, **k: True)


def test_cifar10_files_on_disk_train_with_knn(tmp_path, capsys, monkeypatch):
    _skip_md5(monkeypatch)
    write_cifar10(tmp_path / "cifar")
    data = f"cifar10:{tmp_path / 'cifar'}"
    train_spec, val_spec = splits(data)
    tr, va = open_source(train_spec), open_source(val_spec)
    assert (len(tr.samples), len(va.samples)) == (40, 12) and tr.labelled and tr.in_memory
    assert tr.classes[:2] == ["airplane", "automobile"]
    img = tr.load(0)
    assert img.size == (32, 32) and img.getpixel((3, 5)) == (230, 230, 230)  # bar of class 0
    res, out = _train_briefly(data, tmp_path / "run", capsys, batch_size=8, knn_k=5)
    assert res["knn_final"] is not None and "kNN top-1" in out
    assert "torch DataLoader" in out  # in-memory arrays: the torch loader


def test_stl10_trains_on_train_plus_unlabeled_with_the_labelled_bank(tmp_path, monkeypatch):
    _skip_md5(monkeypatch)
    d = tmp_path / "stl" / "stl10_binary"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n, labelled in [("train", 6, True), ("test", 4, True), ("unlabeled", 10, False)]:
        rng.integers(0, 255, size=(n, 3, 96, 96), dtype=np.uint8).tofile(d / f"{name}_X.bin")
        if labelled:
            np.array([1 + i % 10 for i in range(n)], np.uint8).tofile(d / f"{name}_y.bin")
    (d / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    train_spec, val_spec = splits(f"stl10:{tmp_path / 'stl'}")
    tr = open_source(train_spec)
    assert len(tr.samples) == 16 and not tr.labelled  # train + unlabeled
    bank = open_source(bank_split(train_spec))
    assert len(bank.samples) == 6 and bank.labelled
    assert len(open_source(val_spec).samples) == 4
    assert tr.load(7).size == (96, 96)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_named_set_missing_says_where_to_get_it(tmp_path, capsys, name):
    code = main(["train", "--data", f"{name}:{tmp_path / 'none'}", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "not found" in err and "tar xzf" in err and "://" in err


def test_dali_refuses_in_memory_sets(tmp_path):
    pytest.importorskip("nvidia.dali")
    from fastmoco.data import build_train_loader
    from fastmoco.errors import UsageError

    with pytest.raises(UsageError, match="--loader torch"):
        build_train_loader(
            "cifar10:/nowhere#train", loader="dali", device="cpu", recipe="v2", crop_size=32,
            batch_size=4, workers=0, seed=0,
        )  # fmt: skip
