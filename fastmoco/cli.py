"""`fastmoco train | knn | lincls | export | compare | bench`: the whole command line.

Every parser is here, in argument groups; `fastmoco <command> --help` is each command's
manual. The flags of `train` and `lincls` are made from the fields of TrainConfig and
LinclsConfig (one flag per field, typed from its annotation), so every field has a flag by
construction; TRAIN_FLAGS and LINCLS_FLAGS give each one its group and help.
"""

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

from fastmoco.config import PRESETS, TrainConfig
from fastmoco.config_io import read_config_file, to_yaml
from fastmoco.data.augment import RECIPES
from fastmoco.engine.checkpoint_io import FORMATS
from fastmoco.engine.notices import DALI_DIFFERENCES
from fastmoco.errors import UsageError
from fastmoco.eval.lincls import PRESETS as LINCLS_PRESETS
from fastmoco.eval.lincls import LinclsConfig

DEVICES = ["auto", "cpu", "cuda"]
TRUST_HELP = "load --pretrained with full unpickling (only from a trusted source: it can run code)"

# group title -> {field: help, or (help, extra add_argument keywords)}. Fields left out
# still get a flag (in "other"); tests/test_cli.py asserts that none is left out.
TRAIN_FLAGS: dict[str, dict[str, str | tuple[str, dict]]] = {
    "what to train": {
        "preset": (
            "configuration that sets every value below (default: demo without --data, "
            "mocov2 with it)",
            dict(choices=sorted(PRESETS)),
        ),
        "method": (
            "moco (v1/v2), mocov3 (set by --preset mocov3), simclr (end-to-end), membank "
            "(memory bank, --queue-size negatives), drlim (margin loss on pairs)",
            dict(choices=["moco", "mocov3", "simclr", "membank", "drlim"]),
        ),
        "arch": "backbone: resnet18, resnet34, resnet50, resnet-tiny; vit_small, vit_base "
        "with mocov3",
        "small_images": "3x3 stem without max-pool, for 32-64 px images",
        "frozen_patch_proj": "ViT: keep the random patch projection frozen (mocov3-vit)",
        "dim": "output feature dimension C (mocov3: 256)",
        "mlp_hidden": "hidden width of the MLP head (default: the backbone's feature width, "
        "as the official v2; v3: 4096); 0 = v1's fc head",
    },
    "contrastive loss": {
        "queue_size": "K, negatives in the queue (membank: negatives drawn from the bank)",
        "moco_m": "key-encoder momentum m",
        "moco_m_cos": "raise the momentum from --moco-m to 1 on a half cosine (mocov3)",
        "temperature": "T (mocov1: 0.07)",
        "shuffle_bn": "shuffle BN: encode keys in a shuffled order across BN groups",
        "bn_splits": "BN groups per device for shuffle BN (8 simulates 8 GPUs on one, as the "
        "official CIFAR-10 demo). With 1 group on one device shuffle BN does nothing, and "
        "training warns",
        "bank_m": "membank: momentum of the stored features",
        "margin": "drlim: margin of dissimilar pairs",
    },
    "data and augmentation": {
        "data": (
            "DIR/train and DIR/val (kNN monitor), or DIR as the train set: an ImageFolder "
            "(DIR/<class>/<image>) or any folder of images (unlabelled; flat or nested); a "
            "text file of image paths; cifar10:DIR, cifar100:DIR, stl10:DIR for "
            "torchvision's files on disk (default: the embedded demo set)",
            dict(metavar="DATA"),
        ),
        "demo_seed": "which demo dataset to draw (without --data)",
        "recipe": (
            "augmentation: v1, v2 (adds blur), v3 (BYOL's asymmetric pair, solarize), cifar "
            "(v2 without blur, the official CIFAR-10 demo's)",
            dict(choices=list(RECIPES)),
        ),
        "crop_size": "training crop in pixels",
        "crop_scale": ("RandomResizedCrop's area range", dict(metavar=("MIN", "MAX"))),
        "mean": ("normalisation mean per channel", dict(metavar=("R", "G", "B"))),
        "std": ("normalisation std per channel", dict(metavar=("R", "G", "B"))),
        "loader": (
            "input pipeline: DALI (GPU decode + augmentation; CPU mode without CUDA) or the "
            "torchvision DataLoader. auto: DALI on CUDA when installed, for files (not "
            "cifar10:DIR and the like). DALI runs torchvision's recipe (random jitter order, "
            f"contrast about the mean luma, HSV hue); its pixels differ by {DALI_DIFFERENCES}; "
            "the run prints which loader runs",
            dict(choices=["auto", "dali", "torch"]),
        ),
        "workers": "data-loading processes per rank; -1: half the cores this process may use",
        "skip_bad_images": "count and skip unreadable images instead of stopping at the first",
    },
    "optimisation": {
        "epochs": "epochs",
        "batch_size": "global batch over all GPUs",
        "lr": "learning rate; the rate used is printed at start (see --lr-scaling)",
        "lr_scaling": (
            "linear: the rate used is lr x batch-size / 256 (moco-v3's rule); none: lr as "
            "given (official v1/v2: their --lr 0.03 is for batch 256, --lr 0.015 for 128)",
            dict(choices=["linear", "none"]),
        ),
        "optimizer": (
            "sgd (v1/v2), lars (v3 ResNet), adamw (v3 ViT)",
            dict(choices=["sgd", "lars", "adamw"]),
        ),
        "momentum": "SGD/LARS momentum",
        "weight_decay": "weight decay",
        "schedule": (
            "cosine (v2) or step (v1: x0.1 at --lr-steps)",
            dict(choices=["cosine", "step"]),
        ),
        "lr_steps": "epochs where --schedule step multiplies the lr by 0.1",
        "warmup_epochs": "linear warm-up epochs",
        "amp": "mixed precision (autocast); on CUDA it implies --channels-last unless "
        "--no-channels-last is given",
        "amp_dtype": (
            "bf16 needs no scaler; fp16 uses a GradScaler (CUDA only, not captured)",
            dict(choices=["bf16", "fp16"]),
        ),
        "channels_last": "NHWC memory format (default: on with --amp on CUDA, off otherwise)",
        "queue_dtype": (
            "dtype of the MoCo queue: auto = the AMP dtype under --amp (the fused InfoNCE "
            "then reads bf16 keys on tensor cores), else fp32",
            dict(choices=["auto", "fp32", "bf16", "fp16"]),
        ),
        "cuda_graph": (
            "run the whole step as one captured CUDA graph: auto = on CUDA when the "
            "configuration allows it (the run's first lines say which step runs and why), "
            "on = stop if it cannot, off = eager (docs/step.md)",
            dict(choices=["auto", "on", "off"]),
        ),
    },
    "kNN monitor (weighted kNN on DIR/val, bank = DIR/train)": {
        "knn_every": "epochs between kNN evaluations; 0: off; default: the fewest that keep "
        "the monitor under 5%% of the images training reads (every 3 epochs on ImageNet)",
        "knn_bank": "bank size: at most this many train images, a fixed random subset (0: all)",
        "knn_k": "neighbours",
        "knn_t": "temperature of the neighbours' votes",
    },
    "run": {
        "device": ("auto: CUDA when visible", dict(choices=DEVICES)),
        "gpus": "local processes, one per GPU; under torchrun the environment decides",
        "out": ("run directory (default runs/<preset>-<date-time>)", dict(metavar="DIR")),
        "resume": (
            "checkpoint file, run directory, or 'auto' (newest run of the preset)",
            dict(metavar="PATH"),
        ),
        "seed": "seed of weights, data order, augmentation and shuffle BN",
        "log_every": "steps between reads of the loss (each read is a host sync)",
        "progress": "progress bars",
    },
    "fault tolerance (docs/reliability.md)": {
        "save_every": "steps between checkpoints besides each epoch's end (0: epoch ends only)",
        "keep": "checkpoints kept: checkpoint.pt, checkpoint.prev.pt, checkpoint.prev2.pt, ...",
        "force": "start over in an --out that holds a run, replacing its outputs",
        "trust_checkpoint": "load --resume files with full unpickling (only from a trusted source: "
        "it can run code)",
        "on_nonfinite": (
            "NaN/inf loss or gradient: stop (exit code 3, last good checkpoint kept) or skip "
            "the step",
            dict(choices=["stop", "skip"]),
        ),
        "allow_repeated_negatives": "allow --queue-size >= the training images (v1/v2)",
    },
}

LINCLS_FLAGS: dict[str, dict[str, str | tuple[str, dict]]] = {
    "what to evaluate": {
        "preset": (
            "configuration that sets every value below (default: demo without --data, "
            "official with it)",
            dict(choices=sorted(LINCLS_PRESETS)),
        ),
        "pretrained": (
            "checkpoint file: fastmoco checkpoint.pt, official MoCo, torchvision ResNet",
            dict(required=True, metavar="FILE"),
        ),
        "arch": "backbone, for files that do not name one (read off the keys if absent)",
    },
    "data": {
        "data": (
            "DIR with labelled train/ and val/ (ImageFolders: a subdirectory per class), or "
            "cifar10:DIR, cifar100:DIR, stl10:DIR (train -> test; STL-10's labelled train) "
            "for torchvision's files on disk (default: the checkpoint's demo set)",
            dict(metavar="DATA"),
        ),
        "crop_size": "train RandomResizedCrop and val CenterCrop size",
        "crop_scale": ("train RandomResizedCrop's area range", dict(metavar=("MIN", "MAX"))),
        "resize_size": "val Resize before the center crop (default crop/0.875)",
        "mean": ("normalisation mean (default: the checkpoint's)", dict(metavar=("R", "G", "B"))),
        "std": ("normalisation std (default: the checkpoint's)", dict(metavar=("R", "G", "B"))),
        "workers": "data-loading processes per rank",
    },
    "optimisation (SGD on the linear layer only)": {
        "epochs": "epochs",
        "batch_size": "global batch over all GPUs",
        "lr": "learning rate, used as given (not scaled by batch)",
        "lr_steps": "epochs where the lr drops x0.1",
        "momentum": "SGD momentum",
        "weight_decay": "weight decay",
        "amp": "backbone under autocast (fc stays fp32)",
        "amp_dtype": ("fp16: CUDA only", dict(choices=["bf16", "fp16"])),
        "channels_last": "NHWC memory format",
    },
    "run": {
        "device": ("auto: CUDA when visible", dict(choices=DEVICES)),
        "gpus": "local processes, one per GPU; under torchrun the environment decides",
        "out": ("run directory (default runs/lincls-<preset>-<date-time>)", dict(metavar="DIR")),
        "resume": (
            "checkpoint file, run directory, or 'auto' (newest lincls run)",
            dict(metavar="PATH"),
        ),
        "seed": "seed of fc's init, data order and augmentation",
        "progress": "progress bar",
        "trust_checkpoint": "load --pretrained with full unpickling (only from a trusted "
        "source: it can run code)",
    },
}


def _flag_type(annotation) -> tuple[type, int | str | None]:
    """(element type, nargs) of a field annotation: int, str | None, tuple[float, float],
    tuple[int, ...]."""
    if isinstance(annotation, types.UnionType):  # X | None
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        return args[0], ("+" if args[-1] is Ellipsis else len(args))
    return annotation, None


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


METAVARS = {int: "N", float: "X", str: "NAME"}


def add_config_flags(parser, cls, groups: dict, shown: object) -> None:
    """One flag per field of dataclass cls, --field-name, in the argument groups of `groups`.
    Every flag defaults to None (= keep the preset's value); help quotes the value in the
    preset `shown`. Booleans get --x / --no-x."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unlisted = {name: "" for name in fields if not any(name in g for g in groups.values())}
    for title, flags in {**groups, "other": unlisted}.items():
        if not flags:
            continue
        group = parser.add_argument_group(title)
        for name, spec in flags.items():
            help_text, extra = spec if isinstance(spec, tuple) else (spec, {})
            value = getattr(shown, name)
            if value is not None and name not in ("preset", "pretrained"):
                help_text += f" [{shown.preset}: {_shown(value)}]"
            kw = dict(default=None, help=help_text, **extra)
            elem, nargs = _flag_type(fields[name].type)
            if elem is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = elem
                if "choices" not in extra:
                    kw.setdefault("metavar", METAVARS[elem])
                if nargs is not None:
                    kw["nargs"] = nargs
            group.add_argument("--" + name.replace("_", "-"), **kw)


def config_from_args(args: argparse.Namespace, presets: dict, preset_with_data: str):
    """Flags over --config FILE over a preset. The preset: --preset, else the file's, else
    'demo' without --data and preset_with_data with it; a file naming no known preset (a
    run's config.yaml from a custom config) sets its fields over the dataclass defaults."""
    cls = type(next(iter(presets.values())))
    from_file = read_config_file(args.config, cls) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(cls)} - {"preset"}
    flags = {k: v for k, v in vars(args).items() if k in names}
    flags = {k: tuple(v) if isinstance(v, list) else v for k, v in flags.items()}
    data = flags.get("data") or from_file.get("data")
    preset = args.preset or from_file.get("preset")
    if preset is None:
        preset = "demo" if data is None else preset_with_data
    base = presets[preset] if preset in presets else cls(preset=preset)
    return base.replace(**from_file).replace(**flags)


def given_fields(args: argparse.Namespace, cls) -> set[str]:
    """The fields set by a flag or by --config FILE: what a resumed run takes from this
    command line rather than from its checkpoint."""
    names = {f.name for f in dataclasses.fields(cls)} - {"preset"}
    given = {k for k in names if getattr(args, k, None) is not None}
    if getattr(args, "config", None):
        given |= set(read_config_file(args.config, cls)) & names
    return given


# --- train -----------------------------------------------------------------------------------


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="pre-train an encoder (MoCo v1/v2/v3, SimCLR, memory bank, DrLIM)",
        description=(
            "Pre-train an encoder with MoCo v1/v2/v3 or one of the baselines of --method. "
            "Without --data, trains the 'demo' preset on the embedded procedurally drawn "
            "dataset (made once in the cache dir) and reports the kNN top-1 of the trained "
            "encoder beside the same encoder at random init. A preset sets every value "
            "below; flags override it. Values in brackets are the mocov2 preset's."
        ),
    )
    g = p.add_argument_group("configuration file")
    g.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of fields (e.g. a run's config.yaml): the preset below it, "
        "flags over it",
    )
    g.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration as YAML and exit without training",
    )
    add_config_flags(p, TrainConfig, TRAIN_FLAGS, PRESETS["mocov2"])
    return p


def cmd_train(args) -> int:
    cfg = config_from_args(args, PRESETS, "mocov2")
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from fastmoco.engine.trainer import train

    train(cfg, explicit=given_fields(args, TrainConfig))
    return 0


# --- knn -------------------------------------------------------------------------------------


def _knn_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "knn",
        help="weighted kNN top-1 of a checkpoint's encoder",
        description="Weighted kNN of a checkpoint's query backbone: DATA/train is the memory "
        "bank, DATA/val the queries.",
    )
    g = p.add_argument_group("what to evaluate")
    g.add_argument(
        "--pretrained",
        required=True,
        metavar="FILE",
        help="checkpoint file: fastmoco checkpoint.pt, official MoCo, torchvision ResNet",
    )
    g.add_argument(
        "--arch", metavar="NAME", help="backbone, for files that do not name one (else inferred)"
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", metavar="DIR", help="ImageFolder root with train/ and val/ (default: demo set)"
    )
    g.add_argument(
        "--crop-size", type=int, metavar="N", help="eval crop (default: the checkpoint's, else 224)"
    )
    g.add_argument(
        "--batch-size", type=int, default=256, metavar="N", help="extraction batch [256]"
    )
    g.add_argument("--workers", type=int, default=4, metavar="N", help="loader processes [4]")
    g = p.add_argument_group("kNN (default: the training run's monitor, so the numbers match)")
    g.add_argument(
        "--k", type=int, metavar="N", help="neighbours [the checkpoint's knn_k, else 200]"
    )
    g.add_argument(
        "--t", type=float, metavar="X", help="vote temperature [the checkpoint's knn_t, else 0.1]"
    )
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when visible")
    g.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    return p


def cmd_knn(args) -> int:
    from fastmoco.eval.knn_command import knn_command

    top1 = knn_command(
        args.pretrained,
        data=args.data,
        k=args.k,
        t=args.t,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        arch=args.arch,
        crop_size=args.crop_size,
        trust=args.trust_checkpoint,
    )
    print(f"kNN top-1: {top1:.2f}% ({args.pretrained})")
    return 0


# --- lincls ----------------------------------------------------------------------------------


def _lincls_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "lincls",
        help="linear classification on a frozen pre-trained backbone",
        description=(
            "Train a linear classifier on the frozen backbone of --pretrained with the MoCo "
            "protocol, and report top-1/top-5 on DATA/val every epoch. Without --data: the "
            "'demo' preset on the embedded demo set. A preset sets every value below; flags "
            "override it. Values in brackets are the official preset's."
        ),
    )
    add_config_flags(p, LinclsConfig, LINCLS_FLAGS, LINCLS_PRESETS["official"])
    return p


def cmd_lincls(args) -> int:
    from fastmoco.eval.lincls import lincls

    lincls(config_from_args(args, LINCLS_PRESETS, "official"))
    return 0


# --- export ----------------------------------------------------------------------------------


def _export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="write a checkpoint's encoder as a torchvision, official MoCo or moco-v3 file",
        description=(
            "Export the query encoder of a checkpoint (fastmoco, official MoCo v1/v2/v3 or "
            "torchvision layout). torchvision: the backbone as a state_dict (fc missing). "
            "moco: facebookresearch/moco's layout, 'state_dict' with module.encoder_q.* (head "
            "as fc.*), module.encoder_k.*, module.queue, plus 'arch', 'epoch', 'optimizer'. "
            "mocov3: facebookresearch/moco-v3's layout for its main_lincls.py, 'state_dict' "
            "with module.base_encoder.* (ViT in timm's names; projector as fc.* or head.*), "
            "module.momentum_encoder.*, module.predictor.*, plus 'arch', 'epoch'."
        ),
    )
    g = p.add_argument_group("export")
    g.add_argument("--pretrained", required=True, help="checkpoint file to read")
    g.add_argument("--format", required=True, choices=FORMATS, dest="fmt", help="layout to write")
    g.add_argument("--out", required=True, help="file to write")
    g.add_argument("--arch", help="architecture, for files that do not name one")
    g.add_argument("--force", action="store_true", help="replace an existing --out file")
    g.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    return p


def cmd_export(args) -> int:
    from fastmoco.engine.checkpoint_io import describe, export_checkpoint

    path, p, note = export_checkpoint(
        args.pretrained,
        args.fmt,
        args.out,
        args.arch,
        force=args.force,
        trust=args.trust_checkpoint,
    )
    print(describe(p))
    print(f"wrote {path} ({args.fmt} layout, {p.arch}): {note}")
    return 0


# --- compare ---------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: comma-separated integers, e.g. 256,1024"
        ) from None


def _compare_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "compare",
        help="end-to-end vs memory bank vs MoCo at several K (MoCo Fig. 3, v2 Table 3)",
        description=(
            "Pre-train end-to-end (SimCLR), memory bank and MoCo at equal epochs for several "
            "numbers of negatives K; write compare.png (kNN top-1 vs K), compare.md (time and "
            "peak memory per step) and compare.json under --out. Without --data: the demo "
            "preset on the embedded demo set (CPU: 3 epochs, K 256/1024/4096; a few minutes)."
        ),
    )
    g = p.add_argument_group("what to compare")
    g.add_argument("--data", help="ImageFolder root with train/ and val/ (default: the demo set)")
    g.add_argument(
        "--preset", choices=sorted(PRESETS), help="base config (default: demo, mocov2 with --data)"
    )
    g.add_argument(
        "--ks",
        type=_int_list,
        help="comma-separated K (default CPU: 256,1024,4096; CUDA: up to 65536)",
    )
    g.add_argument("--epochs", type=int, help="epochs per run (default: 3 on the CPU, 20 on CUDA)")
    g.add_argument("--arch", help="backbone (default: the preset's)")
    g.add_argument("--batch-size", type=int, help="batch of memory bank and MoCo (the preset's)")
    g.add_argument("--workers", type=int, help="data-loading processes (default: the preset's)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/compare", help="output directory (runs/compare)")
    g.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when visible")
    g.add_argument("--seed", type=int, default=0, help="seed of every run (0)")
    g.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars"
    )
    return p


def cmd_compare(args) -> int:
    from fastmoco.experiments.compare import compare

    compare(
        data=args.data,
        preset=args.preset,
        ks=args.ks,
        epochs=args.epochs,
        arch=args.arch,
        batch_size=args.batch_size,
        workers=args.workers,
        out=args.out,
        device=args.device,
        seed=args.seed,
        progress=args.progress,
    )
    return 0


# --- bench -----------------------------------------------------------------------------------


def _bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="images/s and peak memory of one training step, fastmoco vs the official step",
        description=(
            "Time one MoCo v2 training step on device-resident random images: the official "
            "main_moco.py step (fp32, reproduced) as the baseline, fastmoco's step eager "
            "(AMP bf16, channels_last on CUDA) and as a CUDA graph, each with an fp32 and a "
            "bf16 queue, and the networks alone (the floor). --data adds a row fed by the "
            "real loader. CUDA: ResNet-50 224 px at batch 32 and 256, ResNet-18 32 px at "
            "batch 512, K 65536; CPU: a tiny size (docs/step.md)."
        ),
    )
    g = p.add_argument_group("what to measure")
    g.add_argument(
        "--size",
        action="append",
        metavar="ARCH:CROP:BATCH",
        help="e.g. resnet50:224:32; repeat for several (default: the sizes above)",
    )
    g.add_argument("--queue-size", type=int, metavar="K", help="K (65536 on CUDA, 4096 on CPU)")
    g.add_argument("--data", metavar="DIR", help="ImageFolder (or DIR/train) for the loader row")
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int, help="timed steps per row (20 on CUDA, 3 on the CPU)")
    g.add_argument("--warmup", type=int, help="untimed steps first (5 on CUDA, 1 on the CPU)")
    g.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when visible")
    g.add_argument("--out", metavar="FILE", help="also write the table there (markdown)")
    return p


def cmd_bench(args) -> int:
    from fastmoco.engine.step_bench import parse_size, run_bench

    try:
        sizes = [parse_size(s) for s in args.size] if args.size else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    data = None
    if args.data is not None:
        data = Path(args.data)
        data = data / "train" if (data / "train").is_dir() else data
        if not data.is_dir():
            raise UsageError(f"--data {args.data}: not a directory")
    _, table = run_bench(
        args.device, sizes=sizes, K=args.queue_size, steps=args.steps, warmup=args.warmup,
        data=None if data is None else str(data),
    )  # fmt: skip
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


# --- main ------------------------------------------------------------------------------------

COMMANDS = {
    "train": (_train_parser, cmd_train),
    "knn": (_knn_parser, cmd_knn),
    "lincls": (_lincls_parser, cmd_lincls),
    "export": (_export_parser, cmd_export),
    "compare": (_compare_parser, cmd_compare),
    "bench": (_bench_parser, cmd_bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmoco", description="Fast MoCo (Momentum Contrast) training engine."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for make_parser, _ in COMMANDS.values():
        make_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from fastmoco.engine.distributed import is_rank0_process
    from fastmoco.engine.guard import NonFiniteError
    from fastmoco.engine.trainer import Interrupted

    # under torchrun every process runs this: rank 0 alone speaks for the run
    say = is_rank0_process()
    try:
        return COMMANDS[args.cmd][1](args)
    except UsageError as e:
        if not getattr(e, "quiet", False):  # quiet: another rank's error, printed there
            print(f"fastmoco {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        if say:
            print(f"fastmoco {args.cmd}: error: {e}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        if say:
            print(
                f"fastmoco {args.cmd}: {e}; continue with --resume {Path(e.path).parent}",
                file=sys.stderr,
            )
        return 128 + int(e.signum)


if __name__ == "__main__":
    raise SystemExit(main())
