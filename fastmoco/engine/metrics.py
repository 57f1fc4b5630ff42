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
    history: list[dict], knn_random: float | None, path: Path, title: str
) -> Path | None:
    """Loss and kNN top-1 per epoch (with the random-init kNN as a dashed line); None without
    matplotlib (an optional extra: pip install fastmoco[train])."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no curves.png (pip install matplotlib)")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_l, ax_k) = plt.subplots(1, 2, figsize=(10, 4))
    ax_l.plot(epochs, [h["loss"] for h in history], marker="o")
    ax_l.set(xlabel="epoch", ylabel="InfoNCE loss", title="training loss")
    knn = [(h["epoch"] + 1, h["knn_top1"]) for h in history if h.get("knn_top1") is not None]
    if knn:
        ax_k.plot(*zip(*knn, strict=True), marker="o", label="trained")
    if knn_random is not None:
        ax_k.axhline(knn_random, ls="--", color="gray", label=f"random init ({knn_random:.1f})")
    ax_k.set(xlabel="epoch", ylabel="kNN top-1 (%)", title="kNN monitor (val)")
    if knn or knn_random is not None:
        ax_k.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
