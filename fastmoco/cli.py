"""`fastmoco train | knn | lincls | export | compare | bench`: the whole command line.

Every parser is here, in argument groups; `fastmoco <command> --help` is each command's
manual. The flags of `train` and `lincls` are made from the fields of TrainConfig and
LinclsConfig: one flag per field, typed from its annotation, its help the field's
docstring, its choices the field's Literal or the registry that owns them
(engine.plan.CHOICES), its group the section of the dataclass it stands in. So a field is
described once, in its dataclass, and every field has a flag by construction.
"""

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

from fastmoco import __version__
from fastmoco.config import PRESETS, TrainConfig, choices_of, field_docs, field_groups
from fastmoco.config_io import read_config_file, run_dir_hint, to_yaml
from fastmoco.engine.checkpoint_io import FORMATS
from fastmoco.errors import EnvironmentFault, Interrupted, UsageError
from fastmoco.eval.lincls import PRESETS as LINCLS_PRESETS
from fastmoco.eval.lincls import LinclsConfig

DEVICES = ["auto", "cpu", "cuda"]
TRUST_HELP = "load --pretrained with full unpickling (only from a trusted source: it can run code)"
# How a value is shown in --help, where its type alone would say too little.
FIELD_METAVARS = {
    "data": "DATA",
    "out": "DIR",
    "resume": "PATH",
    "pretrained": "PATH",
    "crop_scale": ("MIN", "MAX"),
    "mean": ("R", "G", "B"),
    "std": ("R", "G", "B"),
}
METAVARS = {int: "N", float: "X", str: "NAME"}


def _flag_type(annotation) -> tuple[type, int | str | None]:
    """(element type, nargs) of a field annotation: int, str | None, tuple[float, float],
    tuple[int, ...], Literal[...] (str)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return type(typing.get_args(annotation)[0]), None
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        return args[0], ("+" if args[-1] is Ellipsis else len(args))
    return annotation, None


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def registry_choices() -> dict[str, tuple]:
    """Fields whose choices a registry owns (methods, backbones, recipes, optimizers)."""
    from fastmoco.engine.plan import CHOICES

    return {name: tuple(registry) for name, registry in CHOICES.items()}


def add_config_flags(parser, cls, shown: object, choices: dict | None = None) -> None:
    """One flag per field of dataclass cls, --field-name, in the groups of its sections
    (config.field_groups), its docstring as help, quoting the value in the preset `shown`.
    Every flag defaults to None (= keep the preset's value). Booleans get --x / --no-x."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    docs, types_ = field_docs(cls), typing.get_type_hints(cls)
    choices = dict(choices or {})
    choices["preset"] = tuple(sorted(LINCLS_PRESETS if cls is LinclsConfig else PRESETS))
    for title, names in field_groups(cls).items():
        group = parser.add_argument_group(title)
        for name in names:
            help_text = docs.get(name, "").replace("%", "%%")
            value = getattr(shown, name)
            if value is not None and name not in ("preset", "pretrained"):
                help_text += f" [{shown.preset}: {_shown(value)}]"
            kw = dict(default=None, help=help_text)
            elem, nargs = _flag_type(fields[name].type)
            options = choices.get(name) or choices_of(types_[name])
            if elem is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = elem
                if options:
                    kw["choices"] = list(options)
                else:
                    kw["metavar"] = FIELD_METAVARS.get(name, METAVARS[elem])
                if nargs is not None:
                    kw["nargs"] = nargs
            if name == "pretrained":
                kw.update(required=True)
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
        help="YAML or JSON file of fields (e.g. a run's config.yaml, which is its recipe: a new "
        "run from it; --resume DIR continues that run): the preset below it, flags over it",
    )
    g.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration as YAML and exit without training",
    )
    add_config_flags(p, TrainConfig, PRESETS["mocov2"], registry_choices())
    return p


def cmd_train(args) -> int:
    cfg = config_from_args(args, PRESETS, "mocov2")
    if args.config:
        hint = run_dir_hint(args.config)
        if hint:
            print(hint, file=sys.stderr, flush=True)
    if args.print_config:
        from fastmoco.engine.plan import check_config

        check_config(cfg)  # what is printed is a config that trains
        print(to_yaml(cfg), end="")
        return 0
    from fastmoco.engine.trainer import train

    train(cfg, explicit=given_fields(args, TrainConfig))
    return 0


# --- knn -------------------------------------------------------------------------------------

PRETRAINED_HELP = (
    "checkpoint file (fastmoco checkpoint.pt, official MoCo v1/v2/v3, torchvision ResNet, with "
    "its .fastmoco.json sidecar if any) or run directory (its newest loadable checkpoint)"
)
OVERRIDE_HELP = (
    "let a flag contradict what the checkpoint records (its crop size, normalisation, protocol); "
    "refused otherwise"
)


def _knn_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "knn",
        help="weighted kNN top-1 of a checkpoint's encoder",
        description="Weighted kNN of a checkpoint's query backbone: DATA/train is the memory "
        "bank, DATA/val the queries. Crop, normalisation, k and t come from the checkpoint "
        "(its training run's monitor) unless given; the first lines print each with its source.",
    )
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--pretrained", required=True, metavar="PATH", help=PRETRAINED_HELP)
    g.add_argument(
        "--arch", metavar="NAME", help="backbone, for files that do not name one (else inferred)"
    )
    g.add_argument("--override-checkpoint-settings", action="store_true", help=OVERRIDE_HELP)
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", metavar="DIR", help="ImageFolder root with train/ and val/ (default: demo set)"
    )
    g.add_argument(
        "--crop-size",
        type=int,
        metavar="N",
        help="eval crop (default: the checkpoint's; else 224, or 32 for a small-image stem)",
    )
    g.add_argument(
        "--batch-size", type=int, default=256, metavar="N", help="extraction batch [256]"
    )
    g.add_argument("--workers", type=int, default=4, metavar="N", help="loader processes [4]")
    g = p.add_argument_group("kNN (default: the training run's monitor, so the numbers match)")
    g.add_argument(
        "--k",
        type=int,
        metavar="N",
        help="neighbours, at most the bank's images [the checkpoint's knn_k, else 200; clamped "
        "to the bank]",
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
        override=args.override_checkpoint_settings,
    )
    print(f"kNN top-1: {top1:.2f}% ({args.pretrained})")
    return 0


# --- lincls ----------------------------------------------------------------------------------


def _lincls_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "lincls",
        help="linear classification on a frozen pre-trained backbone",
        description=(
            "Train a linear classifier on the frozen backbone of --pretrained and report "
            "top-1/top-5 on DATA/val every epoch. Without --preset the protocol is chosen from "
            "the checkpoint (a small-image model: small-images; method mocov3: moco-v3's "
            "main_lincls.py recipe; else MoCo v1/v2's), and crop size and normalisation are the "
            "checkpoint's; the first lines print every setting with its source. A flag or "
            "--preset that contradicts the checkpoint is refused unless "
            "--override-checkpoint-settings. Without --data: the checkpoint's demo set. Values "
            "in brackets are the official preset's."
        ),
    )
    add_config_flags(p, LinclsConfig, LINCLS_PRESETS["official"])
    return p


def cmd_lincls(args) -> int:
    from fastmoco.eval.lincls import lincls

    cfg = config_from_args(args, LINCLS_PRESETS, "official")
    # the flags given, and --preset if it was: the rest yields to the checkpoint
    explicit = given_fields(args, LinclsConfig) | ({"preset"} if args.preset else set())
    lincls(cfg, explicit=explicit)
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
            "module.momentum_encoder.*, module.predictor.*, plus 'arch', 'epoch'. Beside every "
            "file: OUT.fastmoco.json, the settings it was trained with (arch, stem, crop, "
            "normalisation, method, epoch, source, sha256), which knn and lincls read."
        ),
    )
    g = p.add_argument_group("export")
    g.add_argument("--pretrained", required=True, metavar="PATH", help=PRETRAINED_HELP)
    g.add_argument("--format", required=True, choices=FORMATS, dest="fmt", help="layout to write")
    g.add_argument("--out", required=True, help="file to write (and OUT.fastmoco.json beside it)")
    g.add_argument("--arch", help="architecture, for files that do not name one")
    g.add_argument("--force", action="store_true", help="replace an existing --out file")
    g.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    return p


def cmd_export(args) -> int:
    from fastmoco.engine.checkpoint_io import describe, export_checkpoint, sidecar_path

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
    print(f"wrote {sidecar_path(path)}: the settings, for fastmoco knn / lincls")
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
    from fastmoco.experiments.step_bench import parse_size, run_bench

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
        prog="fastmoco",
        description="Fast MoCo (Momentum Contrast) training engine. `fastmoco train` with no "
        "arguments trains the demo; `fastmoco COMMAND --help` is each command's manual.",
    )
    parser.add_argument("--version", action="version", version=f"fastmoco {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    for make_parser, _ in COMMANDS.values():
        make_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:  # bare `fastmoco`: the manual, not an error
        parser.print_help()
        return 0
    from fastmoco.engine.distributed import is_rank0_process
    from fastmoco.engine.guard import NonFiniteError

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
    except EnvironmentFault as e:  # disk, memory or network: requeue with --resume
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
