"""What a run prints before its first step about choices that silently change results:
the learning rate actually used, shuffle BN that shuffles nothing, a DALI augmentation that
is not torchvision's."""

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
        "note: DALI runs torchvision's augmentation recipe, but its pixels differ from "
        f"torchvision's: {DALI_DIFFERENCES}; --loader torch runs torchvision's"
    )


def startup_notices(cfg: TrainConfig, world_size: int, loader_description: str) -> list[str]:
    notes = [
        lr_notice(cfg),
        shuffle_bn_notice(cfg, world_size),
        loader_notice(loader_description),
    ]
    return [n for n in notes if n]
