"""fastmoco against lightly's MoCo example loop on a CPU, the two commands paired.

The run: scikit-learn's digits as 32-px JPEGs (1,408 train images, a fixed split), a
ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), MoCo v2 with an MLP head
(512-512-128), batch 128, K=1024 negatives, no blur, one loader worker.

  python bench/pair_lightly.py make-digits /tmp/digits        # needs scikit-learn
  python bench/pair_lightly.py pair /tmp/digits --epochs 2 --pairs 3

`pair` runs the two commands in turn (A B A B ...), each as a fresh process, and prints
each run's training images/s (its own count: images trained over the seconds of the
training loop, start-up excluded), each run's wall seconds, and the ratio fastmoco /
lightly pair by pair, so that a machine whose speed drifts still gives a fair ratio.

A (fastmoco): `fastmoco train --preset cifar` with the sizes above, `--workers 1`,
no kNN monitor (lightly's loop has none).
B (lightly-style): `python bench/pair_lightly.py lightly DIR`, lightly's
examples/pytorch/moco.py loop with what it imports written out in plain PyTorch (the same
semantics as tests/test_ops_in_other_trainers.py documents: update_momentum of backbone
and head with a cosine momentum 0.996 -> 1 per epoch, NTXentLoss with a (K, C) memory bank,
SGD lr 0.06), lightly's MoCoV2Transform at 32 px without blur, `num_workers=1` and
`torch.set_num_threads(2)`, as the issue that asked for this pairing ran it. lightly itself
is not needed; its loop is a few lines of PyTorch.
"""

import argparse
import copy
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN_IMAGES = 1408
BATCH, K, DIM, HIDDEN = 128, 1024, 128, 512


def make_digits(out: Path) -> None:
    """digits' 8x8 images, bicubic to 32 px, JPEG; train/ (1,408) and val/ (389), a fixed
    permutation (seed 0)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    for rank, i in enumerate(order):
        split = "train" if rank < TRAIN_IMAGES else "val"
        folder = out / split / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(pixels).convert("RGB").resize((32, 32), Image.BICUBIC)
        image.save(folder / f"{i:04d}.jpg", quality=95)
    print(f"{out}: {TRAIN_IMAGES} train, {len(order) - TRAIN_IMAGES} val images")


def lightly_loop(data: Path, epochs: int) -> None:
    import torch
    import torch.nn.functional as F
    import torchvision.transforms as T
    from torch import nn
    from torchvision.datasets import ImageFolder
    from torchvision.models import resnet18

    torch.set_num_threads(2)
    torch.manual_seed(0)
    view = T.Compose([
        T.RandomResizedCrop(32, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])  # fmt: skip
    dataset = ImageFolder(str(data / "train"), transform=lambda im: (view(im), view(im)))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=1
    )

    resnet = resnet18()
    resnet.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    resnet.maxpool = nn.Identity()
    resnet.fc = nn.Identity()
    backbone, head = (
        resnet,
        nn.Sequential(nn.Linear(512, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, DIM)),
    )
    backbone_m, head_m = copy.deepcopy(backbone), copy.deepcopy(head)
    for p in [*backbone_m.parameters(), *head_m.parameters()]:
        p.requires_grad = False
    bank = F.normalize(torch.randn(K, DIM), dim=1)
    ptr = 0
    params = [*backbone.parameters(), *head.parameters()]
    ema = [*backbone_m.parameters(), *head_m.parameters()]
    opt = torch.optim.SGD(params, lr=0.06)

    images, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        cos = torch.cos(torch.tensor(torch.pi * epoch / max(epochs - 1, 1))).item()
        m = 1 - (1 - 0.996) * (cos + 1) / 2 if epoch < epochs - 1 else 1.0
        for (x_q, x_k), _ in loader:
            with torch.no_grad():
                torch._foreach_mul_(ema, m)
                torch._foreach_add_(ema, params, alpha=1 - m)
            q = F.normalize(head(backbone(x_q)), dim=1)
            with torch.no_grad():
                k = F.normalize(head_m(backbone_m(x_k)), dim=1)
            negatives = bank.clone()
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], 1) / 0.1
            loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
            bank[ptr : ptr + len(k)] = k  # K is a multiple of the batch: no wrap to handle
            ptr = (ptr + len(k)) % K
            opt.zero_grad()
            loss.backward()
            opt.step()
            images += len(q)
    seconds = time.perf_counter() - t0
    print(f"lightly-style: {images} images in {seconds:.1f} s, {images / seconds:.1f} img/s")


def fastmoco_command(data: Path, epochs: int, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "fastmoco.cli", "train", "--preset", "cifar",
        "--data", str(data / "train"), "--mlp-hidden", str(HIDDEN), "--dim", str(DIM),
        "--batch-size", str(BATCH), "--queue-size", str(K), "--epochs", str(epochs),
        "--workers", "1", "--knn-every", "0", "--no-progress", "--out", str(out), "--force",
    ]  # fmt: skip


def _run(cmd: list[str]) -> tuple[float, float, str]:
    """(training img/s as the run printed it, wall seconds, output)."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    found = re.findall(r"([0-9.]+) img/s", done.stdout)
    if found:
        return float(found[-1]), wall, done.stdout
    # fastmoco prints each epoch's seconds ("epoch 1/2: loss 6.1 (41.3 s)")
    seconds = [
        float(s) for s in re.findall(r"^epoch \d+/\d+: .*\(([0-9.]+) s\)$", done.stdout, re.M)
    ]
    if not seconds:
        sys.exit(f"no img/s or epoch times in the output of {' '.join(cmd)}:\n{done.stdout}")
    images = len(seconds) * (TRAIN_IMAGES // BATCH) * BATCH
    return images / sum(seconds), wall, done.stdout


def pair(data: Path, epochs: int, pairs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        a_cmd = fastmoco_command(data, epochs, Path(tmp) / "run")
        b_cmd = [sys.executable, __file__, "lightly", str(data), "--epochs", str(epochs)]
        print("A:", " ".join(a_cmd))
        print("B:", " ".join(b_cmd))
        print("| pair | A fastmoco img/s | B lightly-style img/s | A / B | A wall s | B wall s |")
        print("|---:|---:|---:|---:|---:|---:|")
        ratios = []
        for i in range(pairs):
            a, a_wall, _ = _run(a_cmd)
            b, b_wall, _ = _run(b_cmd)
            ratios.append(a / b)
            print(f"| {i + 1} | {a:.1f} | {b:.1f} | {a / b:.2f} | {a_wall:.0f} | {b_wall:.0f} |")
            sys.stdout.flush()
        print(f"median A / B over {pairs} pairs: {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("make-digits").add_argument("out", type=Path)
    for name in ("lightly", "pair"):
        p = sub.add_parser(name)
        p.add_argument("data", type=Path, help="a folder made by make-digits")
        p.add_argument("--epochs", type=int, default=5)
        if name == "pair":
            p.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    if args.command == "make-digits":
        make_digits(args.out)
    elif args.command == "lightly":
        lightly_loop(args.data, args.epochs)
    else:
        pair(args.data, args.epochs, args.pairs)


if __name__ == "__main__":
    main()
