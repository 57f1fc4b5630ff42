"""What a run prints before its first step: what runs where (method, data, loader, step,
precision), and the choices that silently change results: the learning rate actually used,
a DALI augmentation that is not torchvision's, and what the method itself warns about
(its notices(): shuffle BN that shuffles nothing, say)."""

from fastmoco.config import TrainConfig

# Where DALI's pixels differ from torchvision's (data/dali.py; docs/dali.md).
# The recipe itself (crop, jitter order and factors, grayscale, blur, flip) is torchvision's.
DALI_DIFFERENCES = (
    "JPEGs decoded by nvJPEG/libjpeg-turbo (not PIL; EXIF orientation applied), DALI's "
    "antialiased resize, hue shifted in float (PIL rounds HSV to 8 bits)"
)


def lr_notice(cfg: TrainConfig) -> str:
    if cfg.lr_scaling == "linear":
        return (
            f"learning rate {cfg.effective_lr():g} = --lr {cfg.lr:g} x batch {cfg.batch_size} "
            "/ 256 (--lr-scaling linear; --lr-scaling none takes --lr as given)"
        )
    return f"learning rate {cfg.effective_lr():g} = --lr as given (--lr-scaling none)"


def loader_notice(description: str) -> str | None:
    if not description.startswith("DALI"):
        return None
    return (
        "note: DALI runs torchvision's augmentation recipe, but its pixels differ from "
        f"torchvision's: {DALI_DIFFERENCES}; --loader torch runs torchvision's"
    )


def startup_notices(cfg: TrainConfig, loader_description: str) -> list[str]:
    notes = [lr_notice(cfg), loader_notice(loader_description)]
    return [n for n in notes if n]


def precision_line(cfg: TrainConfig, channels_last: bool, model) -> str:
    """AMP, memory format and queue dtype, said once at the start of a run."""
    amp = f"AMP {cfg.amp_dtype} autocast" if cfg.amp else "fp32 (no AMP)"
    how = "given" if cfg.channels_last is not None else "default: on with --amp on CUDA"
    fmt = f"channels_last {'on' if channels_last else 'off'} ({how})"
    queue = getattr(model, "queue", None)
    q = f", queue {str(queue.dtype).removeprefix('torch.')}" if queue is not None else ""
    return f"precision: {amp}, {fmt}{q}"


def startup_lines(
    cfg: TrainConfig, model, loader_description: str, step_description: str, *, world_size,
    device, threads, steps_per_epoch, out, channels_last,
) -> list[str]:  # fmt: skip
    """The run's first lines, in order: what trains on what, the loader, the notices, the
    step (eager or graph, and why), the precision."""
    summary = model.summary()
    lines = [
        f"fastmoco: {cfg.preset} ({cfg.method}) {cfg.arch} on {world_size} x {device.type}, "
        f"batch {cfg.batch_size}{', ' + summary if summary else ''}, {steps_per_epoch} "
        f"steps/epoch, out {out}",
        f"loader: {loader_description}"
        + (f", {threads} intra-op threads" if device.type == "cpu" else ""),
    ]
    lines += startup_notices(cfg, loader_description) + model.notices(world_size)
    return lines + [step_description, precision_line(cfg, channels_last, model)]
