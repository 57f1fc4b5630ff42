"""`fastmoco compare`: the three contrastive mechanisms of MoCo's Fig. 2 on one engine.

    end-to-end (SimCLR): negatives are the batch's other views, K = 2N - 2 (batch N = K/2 + 1)
    memory bank (InstDisc): K negatives sampled from a bank of stored features
    MoCo (v2):             K negatives from the queue of a momentum key encoder

For every K each mechanism pre-trains for the same number of epochs on the same data
(the embedded demo set unless --data), then the kNN top-1 of its backbone on the val split
is plotted against K (the shape of MoCo's Fig. 3, which uses linear accuracy on ImageNet),
and the time and peak memory of one training step are tabulated (the shape of MoCo v2's
Table 3). Step time and memory are measured apart from training, on random batches of the
training shape, so data loading does not enter them: median of timed steps after warm-up
(CUDA: 5 after 2, CPU: 3 after 1); memory is CUDA's peak allocation, or on the CPU the peak
bytes of live tensors created during the step (a lower bound of the process's growth; see
fastmoco/experiments/measure.py).

Everything else is held equal: backbone, head, augmentation, temperature, learning-rate
rule (base lr x batch/256, cosine), epochs. End-to-end at large K means a large batch and
therefore few steps per epoch: the constraint MoCo was designed to remove.
"""

import json
import time
from pathlib import Path

import torch

from fastmoco.config import PRESETS, TrainConfig
from fastmoco.engine.optim import build_optimizer
from fastmoco.engine.step import TrainStep
from fastmoco.errors import UsageError
from fastmoco.models import build_model

from .measure import peak_extra_bytes, time_calls

MECHANISMS = {"end-to-end": "simclr", "memory bank": "membank", "moco": "moco"}
CPU_KS = (256, 1024, 4096)
GPU_KS = (256, 1024, 4096, 16384, 65536)


def mechanism_config(base: TrainConfig, mechanism: str, K: int) -> TrainConfig:
    """base with the mechanism's method and the batch / queue size that give K negatives.
    The sweep reaches K near or above a small set's size on purpose (the paper's figure spans
    K = 256 to 65536), so the trainer's guard against repeated negatives is lifted here."""
    method = MECHANISMS[mechanism]
    base = base.replace(allow_repeated_negatives=True)
    if method == "simclr":  # K = 2N - 2: the batch is the only knob
        return base.replace(method=method, batch_size=K // 2 + 1, bn_splits=1, queue_size=K)
    return base.replace(method=method, queue_size=K)


def measure_step(
    cfg: TrainConfig, device: torch.device, *, num_samples: int, steps: int = 5, warmup: int = 2
) -> tuple[float, int]:
    """(median seconds per training step, peak extra bytes of one step) on random batches,
    the trainer's step object (engine/step.py) run eagerly, whatever the method."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_samples=num_samples).to(device).train()
    opt = build_optimizer(
        cfg.optimizer,
        model.encoder_q.parameters(),
        lr=1e-3,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    step = TrainStep(model, opt, device=device, amp=cfg.amp, amp_dtype=cfg.amp_dtype)
    N, s = cfg.batch_size, cfg.crop_size
    im_q, im_k = (torch.randn(N, 3, s, s, device=device) for _ in range(2))
    index = torch.randperm(num_samples, device=device)[:N] if model.needs_index else None

    def one_step():
        step(im_q, im_k, index, lr=1e-3)

    t = time_calls(one_step, device, steps=steps, warmup=warmup)
    return t.median, peak_extra_bytes(one_step, device)


def run_comparison(
    base: TrainConfig,
    ks,
    out: Path,
    *,
    mechanisms=tuple(MECHANISMS),
    train_fn=None,
    num_samples: int,
) -> list[dict]:
    """Train and measure every (mechanism, K); returns one row per pair, also written to
    out/compare.json as it goes (a long comparison can be inspected half-way)."""
    from fastmoco.engine.plan import check_config
    from fastmoco.engine.trainer import train

    train_fn = train_fn or train
    device = torch.device("cuda" if base.device != "cpu" and torch.cuda.is_available() else "cpu")
    rows = []
    for K in ks:
        for mech in mechanisms:
            cfg = mechanism_config(base, mech, K).replace(out=str(out / "runs" / f"{mech}-K{K}"))
            cfg = cfg.replace(out=cfg.out.replace(" ", "-"))
            row = dict(mechanism=mech, K=K, batch=cfg.batch_size, epochs=cfg.epochs)
            if cfg.batch_size > num_samples:
                row["skipped"] = f"batch {cfg.batch_size} > {num_samples} training images"
                rows.append(row)
                continue
            check_config(cfg)
            if base.progress:
                print(f"compare: {mech}, K={K}, batch {cfg.batch_size}", flush=True)
            n = (5, 2) if device.type == "cuda" else (3, 1)  # big CPU batches take seconds
            sec, peak = measure_step(cfg, device, num_samples=num_samples, steps=n[0], warmup=n[1])
            t0 = time.perf_counter()
            res = train_fn(cfg)
            row.update(
                step_ms=1000 * sec,
                peak_mib=peak / 2**20,
                knn_top1=res["knn_final"],
                knn_random=res["knn_random"],
                train_seconds=time.perf_counter() - t0,
            )
            rows.append(row)
            (out / "compare.json").write_text(json.dumps(rows, indent=1))
    return rows


def markdown_table(rows: list[dict], device: str) -> str:
    """MoCo v2 Table 3's shape: mechanism, batch, K, memory and time per step, accuracy."""
    lines = [
        f"Device: {device}. kNN top-1 on the val split after {rows[0]['epochs']} epochs "
        "(random init in parentheses).",
        "",
        "| mechanism | batch | K | peak memory / step (MiB) | time / step (ms) | kNN top-1 (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['mechanism']} | {r['batch']} | {r['K']} | - | - | {r['skipped']} |")
            continue
        lines.append(
            f"| {r['mechanism']} | {r['batch']} | {r['K']} | {r['peak_mib']:.0f} | "
            f"{r['step_ms']:.0f} | {r['knn_top1']:.2f} ({r['knn_random']:.2f}) |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_k(rows: list[dict], path: Path, title: str) -> Path:
    """kNN top-1 against K (log scale), one line per mechanism: MoCo's Fig. 3 shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    styles = {"end-to-end": "s-", "memory bank": "^-", "moco": "o-"}
    for mech in MECHANISMS:
        pts = [(r["K"], r["knn_top1"]) for r in rows if r["mechanism"] == mech and "knn_top1" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), styles[mech], label=mech)
    randoms = [r["knn_random"] for r in rows if r.get("knn_random") is not None]
    if randoms:
        ax.axhline(randoms[0], ls="--", color="gray", label=f"random init ({randoms[0]:.1f})")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="K (number of negatives)", ylabel="kNN top-1 (%)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(
    *,
    data=None,
    preset=None,
    ks=None,
    epochs=None,
    arch=None,
    batch_size=None,
    workers=None,
    out="runs/compare",
    device="auto",
    seed=0,
    progress=True,
) -> list[dict]:
    """`fastmoco compare`: train every mechanism at every K, write compare.{md,png,json} under
    out and return the rows. None means the preset's value (preset: demo without data, else
    mocov2; epochs: 3 on the CPU, 20 on CUDA; ks: CPU_KS or GPU_KS)."""
    from fastmoco.data import scan_image_folder
    from fastmoco.engine.plan import data_roots

    cuda = device != "cpu" and torch.cuda.is_available()
    preset = preset or ("demo" if data is None else "mocov2")
    epochs = epochs or (20 if cuda else 3)
    ks = list(ks) if ks else list(GPU_KS if cuda else CPU_KS)
    base = PRESETS[preset].replace(
        data=data,
        epochs=epochs,
        knn_every=epochs,  # kNN at random init and after the last epoch only
        arch=arch,
        batch_size=batch_size,
        workers=workers,
        device=device,
        seed=seed,
        progress=progress,
        loader="torch",  # the memory bank needs the torch sampler's indices; same for all
    )
    train_root, val_root = data_roots(base)
    if val_root is None:
        raise UsageError(f"--data {data}: compare needs a val/ split for the kNN accuracy")
    num_samples = len(scan_image_folder(train_root)[0])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run_comparison(base, ks, out, num_samples=num_samples)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    table = markdown_table(rows, device)
    (out / "compare.md").write_text(table)
    plot_accuracy_vs_k(rows, out / "compare.png", f"{base.arch}, {epochs} epochs, {preset} data")
    print(table)
    print(f"written: {out / 'compare.md'}, {out / 'compare.png'}, {out / 'compare.json'}")
    return rows
