"""Run records on rank 0: metrics.jsonl, TensorBoard, and a PNG of the curves at the end."""

import json
import math
import time
from pathlib import Path


def _json_safe(values: dict) -> dict:
    """NaN/inf are not JSON: write null, and name the fields in "nonfinite"."""
    bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return values
    return {**{k: (None if k in bad else v) for k, v in values.items()}, "nonfinite": bad}


class MetricsLog:
    """purge_step: a resumed run's first step; TensorBoard drops the events logged after
    it by the interrupted run (metrics.jsonl is trimmed the same way at resume)."""

    def __init__(self, out: Path, enabled: bool = True, purge_step: int | None = None):
        self.enabled = enabled
        self.out = Path(out)
        self.tb = None
        if enabled:
            self.out.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(self.out / "metrics.jsonl", "a")
            try:  # an optional extra: pip install fastmoco[train]
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("TensorBoard not installed: metrics.jsonl only (pip install tensorboard)")
            else:
                self.tb = SummaryWriter(str(self.out / "tb"), purge_step=purge_step)

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **_json_safe(values)}
        self.jsonl.write(json.dumps(rec, allow_nan=False) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            if self.tb is not None and isinstance(v, int | float) and k != "epoch":
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def plot_curves(
    history: list[dict],
    knn_random: float | None,
    path: Path,
    title: str,
    loss_ceiling: float | None = None,
) -> Path | None:
    """Three panels per epoch, what an expert reads a contrastive run by: the InfoNCE loss
    (against loss_ceiling, ln(K+1), the loss of features that tell nothing apart), the
    pretext top-1 (the positive ranked first among the K+1 logits: instance discrimination)
    and the kNN top-1 on the val split against the random-init encoder's. None without
    matplotlib (an optional extra: pip install fastmoco[train])."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no curves.png (pip install matplotlib)")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]  # counted from 1
    fig, (ax_l, ax_p, ax_k) = plt.subplots(1, 3, figsize=(14, 4))
    losses = [math.nan if h["loss"] is None else h["loss"] for h in history]  # None: no step
    ax_l.plot(epochs, losses, marker="o", label="trained")
    if loss_ceiling is not None:
        ax_l.axhline(loss_ceiling, ls="--", color="gray", label=f"ln(K+1) = {loss_ceiling:.2f}")
        ax_l.legend()
    ax_l.set(xlabel="epoch", ylabel="InfoNCE loss (epoch mean)", title="training loss")
    pretext = [(h["epoch"], h["train_top1"]) for h in history if h.get("train_top1") is not None]
    if pretext:
        ax_p.plot(*zip(*pretext, strict=True), marker="o", color="tab:green")
    ax_p.set(
        xlabel="epoch",
        ylabel="pretext top-1 (%)",
        title="instance discrimination (positive ranked first)",
    )
    knn = [(h["epoch"], h["knn_top1"]) for h in history if h.get("knn_top1") is not None]
    if knn:
        ax_k.plot(*zip(*knn, strict=True), marker="o", color="tab:orange", label="trained")
    if knn_random is not None:
        ax_k.axhline(knn_random, ls="--", color="gray", label=f"random init ({knn_random:.1f})")
    ax_k.set(xlabel="epoch", ylabel="kNN top-1 (%)", title="kNN monitor (val split)")
    if knn or knn_random is not None:
        ax_k.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_l, ax_p, ax_k):
        ax.set_xlim(0.5, max(epochs, default=1) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def learning_checks(history: list[dict], knn_random: float | None, knn_gain: float = 10.0):
    """Does a run's history look like learning? {name: (passed, what was seen)} for the
    three readings an expert makes of a contrastive run's curves:

    - loss: the last epoch's loss is below epoch 1's, and the loss falls over the second
      half of the run (least-squares slope over its epochs < 0, last below its start);
    - pretext: the last epoch's pretext top-1 is at least 0.8 x the best epoch's (instance
      discrimination does not decay);
    - knn: the best kNN top-1 of the last quarter of the epochs is within 1 point of the
      run's best, and the last is ahead of random init by at least knn_gain points.
    """
    import numpy as np

    losses = [h["loss"] for h in history]
    half = losses[len(losses) // 2 :]
    slope = np.polyfit(np.arange(len(half)), half, 1)[0] if len(half) > 1 else 0.0
    loss_ok = losses[-1] < losses[0] and slope < 0 and half[-1] < half[0]
    top1 = [h["train_top1"] for h in history]
    pretext_ok = top1[-1] >= 0.8 * max(top1)
    knn = [(h["epoch"], h["knn_top1"]) for h in history if h.get("knn_top1") is not None]
    n = len(history)
    quarter_start = history[0]["epoch"] + n - max(n // 4, 1)  # first epoch of the last quarter
    best = max((v for _, v in knn), default=float("nan"))
    best_late = max((v for e, v in knn if e >= quarter_start), default=float("nan"))
    last = knn[-1][1] if knn else float("nan")
    knn_ok = bool(knn) and knn_random is not None
    knn_ok = knn_ok and best_late >= best - 1.0 and last >= knn_random + knn_gain
    return {
        "loss": (
            bool(loss_ok),
            f"epoch 1 {losses[0]:.3f} -> last {losses[-1]:.3f}; second half from "
            f"{half[0]:.3f}, slope {slope:+.4f}/epoch",
        ),
        "pretext": (bool(pretext_ok), f"best {max(top1):.1f}%, last {top1[-1]:.1f}%"),
        "knn": (
            bool(knn_ok),
            f"random {knn_random if knn_random is None else round(knn_random, 1)}%, best "
            f"{best:.1f}%, best of the last quarter {best_late:.1f}%, last {last:.1f}%",
        ),
    }
