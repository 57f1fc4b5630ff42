"""`fastmoco train | knn | lincls | export | compare`: the command line.

`fastmoco <command> --help` is the manual of each command.
"""

import argparse
import sys
from pathlib import Path

from fastmoco.config import PRESETS, TrainConfig
from fastmoco.errors import UsageError

D = TrainConfig()  # for the defaults quoted in --help


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="pre-train a MoCo encoder",
        description=(
            "Pre-train a MoCo v1/v2 encoder. Without --data, trains the 'demo' preset on the "
            "embedded procedurally drawn dataset (made once in the cache dir) and reports the "
            "kNN top-1 of the trained encoder beside the same encoder at random init. "
            "A preset sets every value below; flags override it."
        ),
    )
    a = p.add_argument
    a(
        "--preset",
        choices=sorted(PRESETS),
        help="configuration (default: demo without --data, mocov2 with it)",
    )
    a("--data", help="ImageFolder root: DIR/train and DIR/val (kNN monitor), or DIR as train set")
    a(
        "--arch",
        help=f"backbone (mocov2: {D.arch}; resnet18, resnet34, resnet50, resnet-tiny; "
        "vit_small, vit_base with mocov3)",
    )
    a(
        "--small-images",
        action="store_true",
        default=None,
        help="3x3 stem without max-pool, for 32-64 px images",
    )
    a("--epochs", type=int, help=f"epochs (mocov2: {D.epochs})")
    a("--batch-size", type=int, help=f"global batch over all GPUs (mocov2: {D.batch_size})")
    a(
        "--lr",
        type=float,
        help=f"base learning rate for batch 256, scaled by batch/256 (mocov2: {D.lr})",
    )
    a("--schedule", choices=["cosine", "step"], help="cosine (v2) or x0.1 at 120/160 (v1)")
    a("--warmup-epochs", type=float, help="linear warm-up epochs (default 0)")
    a("--weight-decay", type=float, help=f"(mocov2: {D.weight_decay})")
    a("--queue-size", type=int, help=f"K, negatives in the queue (mocov2: {D.queue_size})")
    a("--moco-m", type=float, help=f"key-encoder momentum m (mocov2: {D.moco_m})")
    a("--temperature", type=float, help=f"T (mocov1: 0.07, mocov2: {D.temperature})")
    a(
        "--method",
        choices=["moco", "mocov3", "simclr", "membank", "drlim"],
        help="moco (v1/v2, default), mocov3 (set by --preset mocov3), simclr (end-to-end), "
        "membank (memory bank, --queue-size negatives), drlim (margin loss on pairs)",
    )
    a("--dim", type=int, help=f"output feature dimension (mocov2: {D.dim}, mocov3: 256)")
    a(
        "--moco-m-cos",
        action="store_true",
        default=None,
        help="raise the momentum from --moco-m to 1 on a half cosine (mocov3)",
    )
    a("--optimizer", choices=["sgd", "lars", "adamw"], help="sgd (v1/v2), lars, adamw (v3 ViT)")
    a("--bank-m", type=float, help=f"membank: momentum of the stored features ({D.bank_m})")
    a("--margin", type=float, help=f"drlim: margin of dissimilar pairs ({D.margin})")
    a(
        "--frozen-patch-proj",
        action="store_true",
        default=None,
        help="ViT: keep the random patch projection frozen (mocov3-vit)",
    )
    a("--mlp-hidden", type=int, help="hidden width of the MLP head; 0 = v1's fc head")
    a(
        "--recipe",
        choices=["v1", "v2", "v3"],
        help="augmentation: v1, v2 (adds blur), v3 (BYOL's asymmetric pair, solarize)",
    )
    a("--crop-size", type=int, help=f"training crop in pixels (mocov2: {D.crop_size})")
    a("--bn-splits", type=int, help="BN groups per device for shuffle BN (8 simulates 8 GPUs)")
    a(
        "--no-shuffle-bn",
        dest="shuffle_bn",
        action="store_false",
        default=None,
        help="encode keys in batch order (shuffle BN off)",
    )
    a(
        "--gpus",
        type=int,
        help="local processes, one per GPU (default 1); under torchrun the environment decides",
    )
    a("--device", choices=["auto", "cpu", "cuda"], help="default auto: CUDA when visible")
    a("--amp", action="store_true", default=None, help="mixed precision (bf16 autocast)")
    a("--amp-dtype", choices=["bf16", "fp16"], help="fp16 uses a GradScaler, CUDA only")
    a("--channels-last", action="store_true", default=None, help="NHWC memory format")
    a("--workers", type=int, help=f"data-loading processes per rank (mocov2: {D.workers})")
    a(
        "--loader",
        choices=["auto", "dali", "torch"],
        help="input pipeline: DALI (GPU decode + augmentation; CPU mode without CUDA) or the "
        "torchvision DataLoader (default auto: DALI on CUDA when installed)",
    )
    a(
        "--skip-bad-images",
        action="store_true",
        default=None,
        help="count and skip unreadable images instead of stopping at the first",
    )
    a("--knn-every", type=int, help="epochs between kNN evaluations (0: off)")
    a("--knn-k", type=int, help=f"neighbours of the kNN monitor (mocov2: {D.knn_k})")
    a("--out", help="run directory (default runs/<preset>-<date-time>)")
    a("--resume", help="checkpoint file, run directory, or 'auto' (newest run of the preset)")
    a("--seed", type=int, help="seed of weights, data order, augmentation and shuffle BN")
    a("--demo-seed", type=int, help="which demo dataset to draw (without --data)")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    preset = args.preset or ("demo" if args.data is None else "mocov2")
    overrides = {k: v for k, v in vars(args).items() if k not in ("cmd", "preset")}
    return PRESETS[preset].replace(**overrides)


def cmd_train(args) -> int:
    from fastmoco.engine.trainer import train

    train(config_from_args(args))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastmoco", description="Fast MoCo (Momentum Contrast) training engine."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    _train_parser(sub)
    from fastmoco.eval.checkpoint_io import add_export_parser, cmd_export
    from fastmoco.eval.compare import add_compare_parser, cmd_compare
    from fastmoco.eval.knn_command import add_knn_parser, cmd_knn
    from fastmoco.eval.lincls import add_lincls_parser, cmd_lincls

    add_knn_parser(sub)
    add_lincls_parser(sub)
    add_export_parser(sub)
    add_compare_parser(sub)
    args = parser.parse_args(argv)
    from fastmoco.engine.trainer import Interrupted

    try:
        commands = {"knn": cmd_knn, "lincls": cmd_lincls, "export": cmd_export}
        commands["compare"] = cmd_compare
        return {"train": cmd_train, **commands}[args.cmd](args)
    except UsageError as e:
        print(f"fastmoco {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(
            f"fastmoco {args.cmd}: {e}; continue with --resume {Path(e.path).parent}",
            file=sys.stderr,
        )
        return 128 + int(e.signum)


if __name__ == "__main__":
    raise SystemExit(main())
