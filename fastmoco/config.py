"""Training configuration: one dataclass whose fields describe themselves; presets are
instances derived from each other; flags override them.

Each field's docstring (the string under it) is its one description: `fastmoco train
--help` prints it, and `Literal[...]` annotations are its choices. Choices that a registry
owns (methods, backbones, recipes, optimizers) are checked against that registry by the run
planner (engine/plan.py). `check()` holds every range check.

Four fields say what this invocation does with a run rather than what is trained
(COMMAND_LINE_ONLY): they come from the command line alone, never from a config file or a
checkpoint, and the config.yaml a run writes leaves them out. A config file is something
people share and download; only the command line may lower a safety guard (trust a
checkpoint's pickle), name a file to load, or let a run be overwritten.
"""

import ast
import dataclasses
import functools
import inspect
import math
import typing
from dataclasses import dataclass
from typing import Literal

from fastmoco.errors import UsageError

# Fields about this invocation, not the recipe: command line only (module docstring).
COMMAND_LINE_ONLY = ("out", "resume", "force", "trust_checkpoint")
FP32_MAX = 3.4028234663852886e38
# Fields added after checkpoints were first written: what a config saved without them meant.
SAVED_BEFORE = {
    "lr_update": "step",
    "symmetric": False,
    "zero_init_residual": False,
    "knn_features": "backbone",
}


@dataclass
class TrainConfig:
    # --- what to train ------------------------------------------------------------------
    preset: str = "mocov2"
    """configuration that sets every other value (default: demo without --data, mocov2 with it)"""
    method: str = "moco"
    """moco (v1/v2: queue + momentum key encoder), mocov3 (symmetric, in-batch negatives,
    predictor), simclr (end-to-end), membank (memory bank, Wu et al. 2018), drlim (margin loss
    on pairs)"""
    arch: str = "resnet50"
    """backbone: resnet18, resnet34, resnet50, resnet-tiny; vit_small, vit_base with mocov3"""
    small_images: bool = False
    """3x3 stem without max-pool, for 32-64 px images (the official CIFAR-10 demo's ResNet)"""
    zero_init_residual: bool = False
    """ResNet: start the last BN of every residual block at gamma 0 (moco-v3's main_moco.py
    builds its ResNet so; v1/v2 do not)"""
    frozen_patch_proj: bool = False
    """ViT: keep the random patch projection frozen (moco-v3's --stop-grad-conv1)"""
    dim: int = 128
    """output feature dimension C (v1/v2: 128; v3: 256)"""
    mlp_hidden: int | None = None
    """hidden width of the projection head; default: the backbone's feature width, as the
    official v2 (2048 for ResNet-50, 512 for ResNet-18), 4096 for v3; 0: v1's fc head"""

    # --- contrastive loss ---------------------------------------------------------------
    queue_size: int = 65536
    """K, negatives in the queue (membank: negatives drawn from the bank)"""
    moco_m: float = 0.999
    """key-encoder momentum m (its start value with --moco-m-cos)"""
    moco_m_cos: bool = False
    """raise the momentum from --moco-m to 1 on a half cosine over training (mocov3)"""
    temperature: float = 0.2
    """T, the softmax temperature (v1: 0.07, v2: 0.2, the CIFAR demo: 0.1, v3 ResNet: 1.0)"""
    symmetric: bool = False
    """queue methods: both views serve as queries, loss = loss(q1, k2) + loss(q2, k1) against
    the same queue, and both views' keys are enqueued (the official CIFAR-10 demo's
    --symmetric, 85.3 vs 82.6 % kNN after 200 epochs)"""
    shuffle_bn: bool = True
    """shuffle BN: encode the keys in a shuffled order across BN groups (MoCo Sec. 3.3)"""
    bn_splits: int = 1
    """BN groups per device for shuffle BN (8 simulates 8 GPUs on one, as the official
    CIFAR-10 demo); with 1 group on one device shuffle BN does nothing, and training warns"""
    bank_m: float = 0.5
    """membank: momentum of a stored feature's update (InstDisc's 0.5)"""
    margin: float = 1.0
    """drlim: how far apart dissimilar pairs are pushed, on the unit sphere (at most 2)"""

    # --- data and augmentation ----------------------------------------------------------
    data: str | None = None
    """DIR/train and DIR/val (kNN monitor), or DIR as the train set: an ImageFolder
    (DIR/<class>/<image>) or any folder of images (unlabelled; flat or nested); a text file
    of image paths; cifar10:DIR, cifar100:DIR, stl10:DIR for torchvision's files on disk
    (default: the embedded demo set). Stored resolved, so a run resumes from any folder"""
    demo_seed: int = 0
    """which demo dataset to draw (without --data)"""
    recipe: str = "v2"
    """augmentation (fastmoco/data/recipes.py): v1, v2 (aug+: jitter p=0.8, blur), v3
    (BYOL's asymmetric pair: blur, solarize), cifar (v2 without blur, the official CIFAR-10
    demo's)"""
    crop_size: int = 224
    """training crop in pixels"""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop's area range (v1/v2 and moco-v3's ResNet commands: 0.2-1)"""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """normalisation mean per channel"""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """normalisation std per channel"""
    loader: Literal["auto", "dali", "torch"] = "auto"
    """input pipeline: DALI (GPU decode + augmentation; CPU mode without CUDA) or the
    torchvision DataLoader. auto: DALI on CUDA when installed, for files (not cifar10:DIR and
    the like); the run prints which loader runs"""
    workers: int = 8
    """data-loading processes per rank; -1: chosen from the cores this process may use"""
    cpu_threads: int = 0
    """on a CPU, the step's intra-op threads per rank; 0: all of the rank's cores, or the
    cores the loader workers leave when the first steps time that faster (a close call
    can differ between runs, and so can their rounding: give a count for repeatable runs)"""
    skip_bad_images: bool = False
    """count and skip unreadable images instead of stopping at the first"""

    # --- optimisation -------------------------------------------------------------------
    epochs: int = 200
    """epochs"""
    batch_size: int = 256
    """global batch over all GPUs"""
    lr: float = 0.03
    """learning rate; the rate used is printed at start (see --lr-scaling)"""
    lr_scaling: Literal["linear", "none"] = "linear"
    """linear: the rate used is lr x batch-size / 256 (moco-v3's rule); none: lr as given
    (official v1/v2: their --lr 0.03 is for batch 256, --lr 0.015 for 128)"""
    optimizer: str = "sgd"
    """sgd (v1/v2), lars (v3 ResNet), adamw (v3 ViT)"""
    momentum: float = 0.9
    """SGD/LARS momentum"""
    weight_decay: float = 1e-4
    """weight decay"""
    schedule: Literal["cosine", "step"] = "cosine"
    """cosine (v2, v3) or step (v1: x0.1 at --lr-steps)"""
    lr_steps: tuple[int, ...] = (120, 160)
    """epochs where --schedule step multiplies the lr by 0.1"""
    lr_update: Literal["epoch", "step"] = "epoch"
    """when the schedule moves the lr: at each epoch's start (official v1/v2 main_moco.py and
    the CIFAR-10 demo) or at every step, at its fractional epoch (moco-v3)"""
    warmup_epochs: float = 0.0
    """linear warm-up from 0 over this many epochs (moco-v3: 10 ResNet, 40 ViT)"""
    amp: bool = False
    """mixed precision (autocast); on CUDA it implies --channels-last unless
    --no-channels-last is given"""
    amp_dtype: Literal["bf16", "fp16"] = "bf16"
    """bf16 needs no scaler; fp16 uses a GradScaler (CUDA only, not captured)"""
    channels_last: bool | None = None
    """NHWC memory format (default: on with --amp on CUDA, where it lets cuDNN run the AMP
    convolutions on tensor cores without transposes; off otherwise)"""
    queue_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """dtype of the MoCo queue: auto = the AMP dtype under --amp (the fused InfoNCE then
    reads bf16 keys on tensor cores), else fp32 (the official queue's)"""
    cuda_graph: Literal["auto", "on", "off"] = "auto"
    """run the whole step as one captured CUDA graph: auto = on CUDA when the configuration
    allows it (the run's first lines say which step runs and why), on = stop if it cannot,
    off = eager (docs/step.md)"""

    # --- kNN monitor (weighted kNN on DIR/val, bank = DIR/train) -------------------------
    knn_every: int | None = None
    """epochs between kNN evaluations; 0: off; default: the fewest that keep the monitor
    under 5 % of the images training reads (every 3 epochs on ImageNet)"""
    knn_bank: int = 100_000
    """bank size: at most this many train images, a fixed random subset (0: all)"""
    knn_k: int = 200
    """neighbours (InstDisc's 200)"""
    knn_t: float = 0.1
    """temperature of the neighbours' votes (InstDisc's 0.1)"""
    knn_features: Literal["backbone", "head"] = "backbone"
    """the features the monitor compares: the backbone's (what linear evaluation and export
    use) or the projection head's output (the official CIFAR-10 demo's monitor, whose 82.6 %
    is measured so)"""

    # --- run ----------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when visible"""
    gpus: int = 1
    """local processes, one per GPU; under torchrun the environment decides"""
    out: str | None = None
    """run directory (default runs/<preset>-<date-time>); command line only"""
    resume: str | None = None
    """checkpoint file, run directory, or 'auto' (newest run of the preset on the same
    data); command line only"""
    seed: int = 0
    """seed of weights, data order, augmentation and shuffle BN"""
    log_every: int = 10
    """steps between reads of the loss (each read is a host sync); without a terminal
    (a log file) one line is printed at each"""
    progress: bool = True
    """progress bars (on a terminal; a log file gets plain lines instead)"""

    # --- fault tolerance (docs/reliability.md) -------------------------------------------
    save_every: int = 1000
    """steps between checkpoints besides each epoch's end (0: epoch ends only); 1000 bounds
    what a crash loses to about a fifth of an ImageNet epoch at batch 256"""
    keep: int = 2
    """checkpoints kept: checkpoint.pt, checkpoint.prev.pt, checkpoint.prev2.pt, ..."""
    force: bool = False
    """start over in an --out that holds a run, replacing its outputs; command line only"""
    trust_checkpoint: bool = False
    """load --resume files with full unpickling (only from a trusted source: it can run
    code); command line only"""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """NaN/inf loss or gradient: stop (exit code 3, last good checkpoint kept) or skip the
    step (and stop when most steps are dropped)"""
    allow_repeated_negatives: bool = False
    """allow --queue-size >= the training images (v1/v2), which puts an image's own stale key
    among its negatives"""

    def effective_lr(self) -> float:
        """The learning rate the schedule starts from (after warm-up)."""
        return self.lr * self.batch_size / 256 if self.lr_scaling == "linear" else self.lr

    def replace(self, **changes) -> "TrainConfig":
        """A copy with the given fields changed; None values are ignored (= keep)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def recipe_dict(self) -> dict:
        """The fields that describe the run (to_dict without COMMAND_LINE_ONLY): what
        config.yaml and a checkpoint's "config" hold."""
        return {k: v for k, v in self.to_dict().items() if k not in COMMAND_LINE_ONLY}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From a saved dict; unknown and command-line-only keys are dropped (older
        checkpoints recorded them), and fields added since take SAVED_BEFORE's values, the
        behaviour of the code that saved it."""
        names = {f.name for f in dataclasses.fields(cls)} - set(COMMAND_LINE_ONLY)
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**{**SAVED_BEFORE, **d})

    def check(self) -> None:
        """Every field of the right type and in its range; a UsageError names the flag."""
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name), field_types(type(self))[f.name])
        at_least_1 = ("epochs", "batch_size", "crop_size", "dim", "queue_size", "log_every")
        at_least_1 += ("keep", "gpus", "knn_k", "bn_splits")
        for name in at_least_1:
            if getattr(self, name) < 1:
                raise _bad(name, getattr(self, name), "a whole number of at least 1")
        for name in ("mlp_hidden", "knn_every", "knn_bank", "save_every", "cpu_threads"):
            v = getattr(self, name)
            if v is not None and v < 0:  # None: chosen automatically
                raise _bad(name, v, "a whole number of at least 0")
        if self.workers < -1:
            raise _bad("workers", self.workers, "a count >= 0, or -1: chosen from the cores")
        for name in ("lr", "temperature", "knn_t"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise _bad(name, v, "a finite number above 0")
        if 1 / self.temperature > FP32_MAX:  # the logits q.k / T would overflow fp32
            raise _bad("temperature", self.temperature, "one whose 1/T fits in float32")
        for name in ("weight_decay", "warmup_epochs", "margin"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise _bad(name, v, "a finite number of at least 0")
        for name in ("moco_m", "momentum", "bank_m"):
            v = getattr(self, name)
            if not 0 <= v <= 1:  # NaN fails every comparison
                raise _bad(name, v, "a number in [0, 1]")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise _bad("crop_scale", f"{lo} {hi}", "MIN MAX with 0 < MIN <= MAX <= 1")
        if not all(math.isfinite(m) for m in self.mean):
            raise _bad("mean", " ".join(map(str, self.mean)), "three finite numbers")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise _bad("std", " ".join(map(str, self.std)), "three finite numbers above 0")
        if self.warmup_epochs and self.lr_update == "epoch":
            raise UsageError(
                f"--warmup-epochs {self.warmup_epochs} needs --lr-update step: a warm-up set once "
                "per epoch would train its whole first epoch at lr 0"
            )
        if self.warmup_epochs > self.epochs:
            raise _bad("warmup_epochs", self.warmup_epochs, f"at most --epochs {self.epochs}")
        if any(e < 0 for e in self.lr_steps):
            raise _bad("lr_steps", " ".join(map(str, self.lr_steps)), "epochs of at least 0")
        if self.batch_size % self.gpus:
            raise UsageError(
                f"--batch-size {self.batch_size} is global and must divide evenly over "
                f"--gpus {self.gpus}"
            )
        per_rank = self.batch_size // self.gpus
        if self.bn_splits > 1 and per_rank % self.bn_splits:
            raise UsageError(
                f"--bn-splits {self.bn_splits} must divide the per-device batch {per_rank}"
            )


def flag(name: str) -> str:
    """The command-line flag of a field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def _bad(name: str, value, need: str) -> UsageError:
    return UsageError(f"{flag(name)} {value}: must be {need}")


# --- what the fields say about themselves ----------------------------------------------------


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """{field: its docstring, on one line}: the string literal under each field of a
    dataclass (the convention of torchtitan's and tyro's configs), read from the source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and is_doc and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@functools.cache
def field_groups(cls) -> dict[str, list[str]]:
    """{section title: its fields}: the `# --- title ---` comments of a dataclass's source,
    each heading the fields below it (the --help groups)."""
    groups: dict[str, list[str]] = {}
    title = "other"
    fields = {f.name for f in dataclasses.fields(cls)}
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("# ---"):
            title = text.strip("# -")
        elif ":" in text and text.split(":")[0].strip() in fields and not text.startswith('"'):
            groups.setdefault(title, []).append(text.split(":")[0].strip())
    return groups


@functools.cache
def field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def choices_of(annotation) -> tuple | None:
    """The values a Literal[...] (or Literal[...] | None) annotation allows, else None."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def check_type(name: str, value, annotation, where: str | None = None) -> None:
    """A UsageError unless value has the annotated type (bools are not numbers, ints are
    floats, tuples have their length). where: the file and key, for a config file."""
    what = where or flag(name)
    want = _type_name(annotation)
    if not _has_type(value, annotation):
        raise UsageError(f"{what}: {value!r} is not {want}")


def _has_type(value, annotation) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return value in args
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_has_type(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if args[-1] is Ellipsis:
            return all(_has_type(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_has_type, value, args))
    return True


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if annotation is type(None):
        return "null"
    if origin is not None and origin is not tuple:  # X | None
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        plural = {int: "whole numbers", float: "numbers", str: "strings"}[args[0]]
        return f"a list of {plural}" if args[-1] is Ellipsis else f"a list of {len(args)} {plural}"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[
        annotation
    ]


def coerce(name: str, value, annotation, where: str):
    """A config file's value as the field's type: YAML lists become tuples, numbers written
    as strings ("1e-3", which YAML 1.1 reads as a string) become numbers, ints become
    floats; anything else that does not fit is a UsageError naming the file and key."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if value is None or origin is Literal:
        check_type(name, value, annotation, where)
        return value
    if origin is not None and origin is not tuple:  # X | None: the non-None member
        (annotation,) = [a for a in args if a is not type(None)]
        return coerce(name, value, annotation, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            check_type(name, value, annotation, where)
        elems = args[:1] * len(value) if args[-1] is Ellipsis else args
        if len(elems) != len(value):
            check_type(name, tuple(value), annotation, where)
        return tuple(coerce(name, v, a, where) for v, a in zip(value, elems, strict=True))
    if annotation in (int, float) and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            check_type(name, value, annotation, where)
        if annotation is int:
            if not number.is_integer():
                check_type(name, value, annotation, where)
            return int(number)
        return number
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    check_type(name, value, annotation, where)
    return value


# --- presets ---------------------------------------------------------------------------------
# Each preset is the recipe of its source, derived from the one it differs least from;
# docs/methods.md lists, per preset, every remaining difference from the official code.

# MoCo v2 (Chen et al. 2020; facebookresearch/moco main_moco.py --mlp --aug-plus --cos):
# MLP head, T=0.2, aug+ (blur), cosine lr set at each epoch's start, --lr as given.
_MOCOV2 = TrainConfig(preset="mocov2", lr_scaling="none")

# MoCo v3 (Chen, Xie, He 2021), the ResNet-50 100-epoch command of moco-v3's CONFIG.md:
# projector 2048-4096-256, predictor 256-4096-256, T=1.0, m 0.99 -> 1 (cosine), LARS lr
# 0.6 x batch/256, wd 1e-6, batch 4096, 10 warm-up epochs, crops 0.2-1 (--crop-min=.2),
# zero-init residual BN, the lr moved every step, AMP.
_MOCOV3 = TrainConfig(
    preset="mocov3",
    method="mocov3",
    zero_init_residual=True,
    dim=256,
    mlp_hidden=4096,
    temperature=1.0,
    moco_m=0.99,
    moco_m_cos=True,
    shuffle_bn=False,
    optimizer="lars",
    lr=0.6,
    weight_decay=1e-6,
    batch_size=4096,
    epochs=100,
    warmup_epochs=10,
    lr_update="step",
    recipe="v3",
    amp=True,
)

PRESETS: dict[str, TrainConfig] = {
    # MoCo v1 (He et al. 2019; main_moco.py without --mlp --aug-plus --cos): fc head,
    # T=0.07, aug without blur, lr x0.1 at epochs 120 and 160.
    "mocov1": _MOCOV2.replace(
        preset="mocov1", mlp_hidden=0, temperature=0.07, recipe="v1", schedule="step"
    ),
    "mocov2": _MOCOV2,
    # The official MoCo CIFAR-10 demo (facebookresearch/moco, colab/moco_cifar10_demo.ipynb):
    # ResNet-18 with the 3x3 stem, fc head, shuffle BN over 8 simulated GPUs (SplitBatchNorm
    # 8), K=4096, m=0.99, T=0.1, SGD lr 0.06 at batch 512 as given, wd 5e-4, cosine set per
    # epoch, 200 epochs, v2's jitter without blur on 0.08-1 crops, CIFAR's mean/std, kNN
    # k=200 t=0.1 every epoch on encoder_q's output (after the fc head; train split as the
    # bank, test split as queries). Its log: 82.6 % kNN top-1 (85.3 % with --symmetric).
    "cifar": _MOCOV2.replace(
        preset="cifar",
        arch="resnet18",
        small_images=True,
        mlp_hidden=0,
        queue_size=4096,
        moco_m=0.99,
        temperature=0.1,
        bn_splits=8,
        recipe="cifar",
        crop_size=32,
        crop_scale=(0.08, 1.0),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
        batch_size=512,
        lr=0.06,
        weight_decay=5e-4,
        knn_every=1,
        knn_features="head",
    ),
    "mocov3": _MOCOV3,
    # MoCo v3 ViT-S/16 (CONFIG.md's ViT-Small commands): AdamW lr 1.5e-4 x batch/256, wd
    # 0.1, T=0.2, 300 epochs with 40 of warm-up, frozen random patch projection
    # (--stop-grad-conv1), crops 0.08-1 (no --crop-min there: main_moco.py's default).
    "mocov3-vit": _MOCOV3.replace(
        preset="mocov3-vit",
        arch="vit_small",
        frozen_patch_proj=True,
        temperature=0.2,
        optimizer="adamw",
        lr=1.5e-4,
        weight_decay=0.1,
        epochs=300,
        warmup_epochs=40,
        crop_scale=(0.08, 1.0),
    ),
    # The embedded demo (docs/demo.md has the runs behind each choice): a few minutes on 2
    # CPU cores. A narrow ResNet at 32 px (throughput buys epochs); m=0.99 as the official
    # CIFAR demo (m=0.9 let the key encoder track the query encoder so closely that instance
    # discrimination decayed after epoch 2 and the loss climbed toward ln K); K=256, a sixth
    # of the 1,500 images; batch 64 for 23 steps an epoch and a one-epoch warm-up with the lr
    # moved every step; shuffle BN over 2 simulated GPUs of 32; crops of at least half the
    # image so both views show the shape; kNN with k=20 (50 val images per class), every 2nd
    # epoch on cached eval tensors; loader workers and threads from the cores.
    "demo": _MOCOV2.replace(
        preset="demo",
        arch="resnet-tiny",
        small_images=True,
        mlp_hidden=512,
        queue_size=256,
        moco_m=0.99,
        bn_splits=2,
        crop_size=32,
        crop_scale=(0.5, 1.0),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        workers=-1,
        epochs=20,
        batch_size=64,
        lr=0.06,
        lr_scaling="linear",
        lr_update="step",
        warmup_epochs=1,
        weight_decay=5e-4,
        knn_k=20,
        knn_every=2,
        save_every=0,  # a short run: the checkpoint at each epoch's end is enough
    ),
}
