"""What a run prints before its first step about choices that silently change results:
the learning rate actually used, shuffle BN that shuffles nothing, a DALI augmentation that
is not torchvision's."""

from fastmoco.config import TrainConfig

# Where the DALI recipe differs from torchvision's (data/dali.py; docs/dali.md).
DALI_DIFFERENCES = (
    "jitter adjustments in one fixed order (torchvision shuffles them per view), contrast "
    "around mid-grey (torchvision: the image mean), hue rotated in YIQ (torchvision: HSV)"
)


def lr_notice(cfg: TrainConfig) -> str:
    if cfg.lr_scaling == "linear":
        return (
            f"learning rate {cfg.effective_lr():g} = --lr {cfg.lr:g} x batch {cfg.batch_size} "
            "/ 256 (--lr-scaling linear; --lr-scaling none takes --lr as given)"
        )
    return f"learning rate {cfg.effective_lr():g} = --lr as given (--lr-scaling none)"


def shuffle_bn_notice(cfg: TrainConfig, world_size: int) -> str | None:
    """Shuffle BN mixes keys across BN groups; one device with one group has nothing to mix,
    so the keys' statistics are the queries' batch's: the leak shuffle BN exists to stop."""
    if cfg.method != "moco" or not cfg.shuffle_bn or world_size > 1 or cfg.bn_splits > 1:
        return None
    return (
        "warning: shuffle BN on one device with one BN group shuffles nothing; pass "
        "--bn-splits 8 to simulate 8 GPUs as the official CIFAR-10 demo does (or "
        "--no-shuffle-bn to say it is meant)"
    )


def loader_notice(description: str) -> str | None:
    if not description.startswith("DALI"):
        return None
    return (
        f"note: the DALI augmentation differs from torchvision's: {DALI_DIFFERENCES}; "
        "--loader torch runs torchvision's"
    )


def startup_notices(cfg: TrainConfig, world_size: int, loader_description: str) -> list[str]:
    notes = [
        lr_notice(cfg),
        shuffle_bn_notice(cfg, world_size),
        loader_notice(loader_description),
    ]
    return [n for n in notes if n]
