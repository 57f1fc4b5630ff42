"""The MoCo training loop: one process per device, torch.distributed across them.

A step (MoCo paper, Algorithm 1): two views -> loss = InfoNCE(f_q(x_q), f_k(x_k), queue)
-> backward -> SGD step -> momentum update of f_k -> enqueue the global batch's keys, for
any method, is the step object of engine/step.py (eager, or one captured CUDA graph). The
trainer keeps the loop, logging, checkpoints and kNN. The step never syncs with the host:
the queue pointer stays on the device and the loss is summed on the device and read every
`log_every` steps.
"""

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from fastmoco.config import TrainConfig, check_numbers
from fastmoco.config_io import write_config
from fastmoco.data import build_train_loader, demo_dataset
from fastmoco.data.augment import RECIPES
from fastmoco.data.loader import cpu_plan
from fastmoco.data.sources import bank_is_labelled, open_source, splits
from fastmoco.errors import UsageError
from fastmoco.eval.knn import build_knn_loaders, knn_accuracy, knn_cadence
from fastmoco.models import ALL_ARCHS, METHODS, MoCo, build_model
from fastmoco.ops.distributed import world

from . import checkpoint as ckpt
from .distributed import STOP_SIGNALS, launch, local_device, resolve_device
from .guard import NonFiniteError, NonFiniteGuard, all_finite, bn_statistics
from .metrics import MetricsLog, plot_curves
from .notices import startup_notices
from .optim import OPTIMIZERS, build_optimizer
from .resume import resume_config, truncate_records
from .step import GRAPH_MODES, TrainStep, resolve_channels_last


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM/SIGUSR1 after saving a checkpoint."""

    def __init__(self, signum: int, path: Path):
        super().__init__(f"stopped by signal {signum}; checkpoint saved to {path}")
        self.signum, self.path = signum, path


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """cfg.effective_lr() (--lr-scaling), with linear warm-up, then cosine (v2) or x0.1 steps
    (v1)."""
    base = cfg.effective_lr()
    e = step / steps_per_epoch
    if e < cfg.warmup_epochs:
        return base * (e + 1 / steps_per_epoch) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
        return base * 0.5 * (1 + math.cos(math.pi * (e - cfg.warmup_epochs) / span))
    return base * 0.1 ** sum(e >= s for s in cfg.lr_steps)


def momentum_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Key-encoder momentum for the update after `step`: constant, or with moco_m_cos (v3)
    m = 1 - 0.5 (1 + cos(pi t / epochs)) (1 - m0), t the epoch (fraction) of the next step,
    the value the official code uses at the start of that step."""
    if not cfg.moco_m_cos:
        return cfg.moco_m
    t = (step + 1) / steps_per_epoch
    return 1 - 0.5 * (1 + math.cos(math.pi * t / cfg.epochs)) * (1 - cfg.moco_m)


def check_config(cfg: TrainConfig) -> None:
    """Errors a user can fix, raised before any process or file is made."""
    check_numbers(cfg)
    if cfg.arch not in ALL_ARCHS:
        raise UsageError(f"--arch {cfg.arch!r}: choose one of {', '.join(ALL_ARCHS)}")
    if cfg.method not in METHODS:
        raise UsageError(f"--method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise UsageError(f"--optimizer {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if cfg.arch.startswith("vit") and cfg.method != "mocov3":
        raise UsageError(f"--arch {cfg.arch} is for --method mocov3 (or --preset mocov3-vit)")
    if cfg.arch.startswith("vit") and cfg.crop_size % 16:
        raise UsageError(f"--arch {cfg.arch} cuts 16x16 patches: --crop-size must be a multiple")
    if cfg.recipe not in RECIPES:
        raise UsageError(f"--recipe {cfg.recipe!r}: choose one of {', '.join(RECIPES)}")
    if cfg.schedule not in ("cosine", "step"):
        raise UsageError(f"--schedule {cfg.schedule!r}: choose cosine or step")
    if cfg.lr_scaling not in ("linear", "none"):
        raise UsageError(f"--lr-scaling {cfg.lr_scaling!r}: choose linear or none")
    if cfg.method == "moco" and cfg.queue_size <= cfg.batch_size:
        raise UsageError(
            f"--queue-size {cfg.queue_size} must be larger than --batch-size {cfg.batch_size} "
            "(the queue holds the keys of many past batches); raise --queue-size"
        )
    if cfg.batch_size % cfg.gpus:
        raise UsageError(
            f"--batch-size {cfg.batch_size} is global and must divide evenly over --gpus {cfg.gpus}"
        )
    per_rank = cfg.batch_size // cfg.gpus
    if cfg.bn_splits > 1 and per_rank % cfg.bn_splits:
        raise UsageError(f"--bn-splits {cfg.bn_splits} must divide the per-device batch {per_rank}")
    if cfg.amp and cfg.amp_dtype not in ("bf16", "fp16"):
        raise UsageError(f"--amp-dtype {cfg.amp_dtype!r}: choose bf16 or fp16")
    if cfg.cuda_graph not in GRAPH_MODES:
        raise UsageError(f"--cuda-graph {cfg.cuda_graph!r}: choose one of {', '.join(GRAPH_MODES)}")
    if cfg.queue_dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError(f"--queue-dtype {cfg.queue_dtype!r}: choose fp32, bf16 or fp16")


def data_roots(cfg: TrainConfig) -> tuple[str, str | None]:
    """(train split, val split or None) of --data (data/sources.py: a folder with or without
    train/ and val/, an image list, cifar10:DIR, ...). Without --data, the embedded demo set
    (made once)."""
    if cfg.data is None:
        root = demo_dataset(seed=cfg.demo_seed, progress=cfg.progress)
        return str(root / "train"), str(root / "val")
    return splits(cfg.data)


def check_queue_vs_data(cfg: TrainConfig, n_images: int, log=print) -> None:
    """MoCo v1/v2's queue against the training set: an image's own key from its previous
    appearance sits among its negatives once K nears the set's size."""
    if cfg.method != "moco":
        return
    share = cfg.queue_size / n_images
    if cfg.queue_size >= n_images and not cfg.allow_repeated_negatives:
        raise UsageError(
            f"--queue-size {cfg.queue_size} is at least the {n_images} training images: every "
            "image's own key from its last appearance would be among its negatives, and the "
            f"pretext task stops being learnable; use --queue-size below {n_images // 4} "
            "(or pass --allow-repeated-negatives)"
        )
    if share > 0.25:
        log(
            f"warning: --queue-size {cfg.queue_size} is {share:.0%} of the {n_images} training "
            "images; above a quarter, stale keys of the same images crowd the negatives and "
            f"the loss can climb toward ln K (the official CIFAR demo uses 8%)",
            flush=True,
        )


@dataclass
class RunPlan:
    """What rank 0 decided before training, sent to every rank."""

    cfg: TrainConfig
    train_root: str
    val_root: str | None
    out: str
    state: dict | None  # the checkpoint to resume, loaded


def plan_run(cfg: TrainConfig, explicit, device: str, lock: ckpt.RunLock) -> RunPlan:
    """On the caller or torchrun's rank 0 only: the run directory (locked), the checkpoint
    to resume and the configuration it implies, and the checks of config and data."""
    out, resume_from = ckpt.prepare_run_dir(cfg.out, cfg.resume, cfg.preset)
    lock.acquire(out)
    ckpt.remove_stale_temps(out)
    state = None
    if resume_from is None:
        ckpt.check_overwrite(out, cfg.force)
    else:
        state = ckpt.load_resumable(resume_from, cfg.trust_checkpoint)
    if state is not None:
        cfg = resume_config(cfg, state["config"], explicit).replace(out=str(out))
    check_config(cfg)
    if cfg.method == "membank" and cfg.loader == "auto":
        cfg = cfg.replace(loader="torch")  # the bank needs the torch sampler's indices
    if cfg.amp and cfg.amp_dtype == "fp16" and device != "cuda":
        raise UsageError("--amp-dtype fp16 needs CUDA (GradScaler); use bf16 on the CPU")
    if cfg.cuda_graph == "on" and device != "cuda":
        raise UsageError("--cuda-graph on needs CUDA (this run is on the CPU); use auto or off")
    if cfg.cuda_graph == "on" and cfg.amp and cfg.amp_dtype == "fp16":
        raise UsageError(
            "--cuda-graph on with --amp-dtype fp16: the GradScaler decides on the host whether "
            "to skip a step, so that step is not captured; use --amp-dtype bf16 or --cuda-graph off"
        )
    train_root, val_root = data_roots(cfg)
    source = open_source(train_root)  # fails early on a missing/empty dir
    samples = source.samples
    if cfg.knn_every is None:  # automatic cadence: the monitor under 5% of the image reads
        n_val = len(open_source(val_root).samples) if val_root else 0
        n_bank = min(len(samples), cfg.knn_bank) if cfg.knn_bank > 0 else len(samples)
        cfg = cfg.replace(knn_every=knn_cadence(len(samples), n_bank, n_val))
    if val_root is not None and cfg.knn_every > 0 and not bank_is_labelled(source):
        print(
            f"kNN monitor off: {train_root} is unlabelled (no class subdirectories); it needs "
            "train/<class>/ and val/<class>/ folders",
            flush=True,
        )
        val_root = None
    if cfg.batch_size > len(samples):
        raise UsageError(
            f"--batch-size {cfg.batch_size} is larger than the dataset ({len(samples)} images "
            f"under {train_root}); lower --batch-size"
        )
    check_queue_vs_data(cfg, len(samples))
    if state is None:
        ckpt.clear_run_outputs(out)  # only a --force'd or never-saved run's files are left
    else:
        truncate_records(out / "metrics.jsonl", state["global_step"])
    write_config(cfg, out)  # the resolved config, for --config and for the record
    return RunPlan(cfg, str(train_root), str(val_root) if val_root else None, str(out), state)


def train(cfg: TrainConfig, *, on_step=None, explicit: set[str] | None = None) -> dict:
    """Check the config and data, then train on every rank; returns rank 0's results.

    explicit: the fields given on the command line (a resumed run takes the others from
    its checkpoint); None means all of cfg's. on_step(global_step) is called after each
    step (tests use it to send a signal).
    """
    device = resolve_device(cfg.device, cfg.gpus)
    check_numbers(cfg)
    lock = ckpt.RunLock()
    try:
        results = launch(
            _train_rank,
            (on_step,),
            nprocs=cfg.gpus,
            device=device,
            prepare=lambda: plan_run(cfg, explicit, device, lock),
        )
    finally:
        lock.release()
    if results.get("interrupted"):
        raise Interrupted(results["interrupted"], Path(results["out"]) / ckpt.CHECKPOINT_NAME)
    if results.get("nonfinite") is not None:
        raise NonFiniteError(results["nonfinite"], results.get("last_checkpoint"))
    return results


def _train_rank(plan: RunPlan, on_step) -> dict:
    return Trainer(plan, on_step).fit()


class Trainer:
    def __init__(self, plan: RunPlan, on_step=None):
        cfg, train_root, val_root = plan.cfg, plan.train_root, plan.val_root
        self.cfg, self.out, self.on_step = cfg, Path(plan.out), on_step
        self.rank, self.world_size = world()
        self.is_main = self.rank == 0
        self.device = local_device(resolve_device(cfg.device, 1))
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.channels_last = resolve_channels_last(cfg.channels_last, cfg.amp, self.device)
        self.mf = torch.channels_last if self.channels_last else torch.contiguous_format
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        workers, self.threads = cpu_plan(cfg.workers, ranks_here)
        if self.device.type == "cpu":  # the model's operators share the cores with the workers
            torch.set_num_threads(self.threads)

        self.loader = build_train_loader(
            train_root,
            loader=cfg.loader,  # DALI hands over views on the device, in the autocast dtype
            device=self.device,
            dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[cfg.amp_dtype]
            if cfg.amp
            else torch.float32,
            channels_last=self.channels_last,
            recipe=cfg.recipe,
            crop_size=cfg.crop_size,
            crop_scale=cfg.crop_scale,
            batch_size=cfg.batch_size // self.world_size,
            workers=workers,
            seed=cfg.seed,
            rank=self.rank,
            world_size=self.world_size,
            skip_bad_images=cfg.skip_bad_images,
            mean=cfg.mean,
            std=cfg.std,
        )
        self.steps_per_epoch = len(self.loader)
        self.knn_loaders = None
        if val_root and cfg.knn_every > 0:
            self.knn_loaders = build_knn_loaders(
                train_root,
                val_root,
                crop_size=cfg.crop_size,
                mean=cfg.mean,
                std=cfg.std,
                workers=workers,
                bank_size=cfg.knn_bank,
                seed=cfg.seed,
                skip_bad_images=cfg.skip_bad_images,
                cache=True,  # small splits decoded once, not at every evaluation
            )
            self.num_classes = len(self.knn_loaders[0].dataset.classes)

        sampler = getattr(self.loader, "batch_sampler", None)
        self.epoch_index = None  # membank: this rank's dataset indices of the epoch, in order
        if cfg.method == "membank" and sampler is None:
            raise UsageError("--method membank needs each sample's index: use --loader torch")
        num_samples = sampler.num_samples if sampler is not None else 1
        self.model = build_model(cfg, num_samples=num_samples).to_device(self.device)
        self.model.to(memory_format=self.mf)
        self.is_moco = isinstance(self.model, MoCo)  # checkpoints: the official v1/v2 layout
        if cfg.method == "mocov3" and self.world_size > 1 and self.device.type == "cuda":
            # global BN statistics, as the official v3 (SyncBN needs CUDA)
            for name in ("encoder_q", "encoder_k"):
                bn = torch.nn.SyncBatchNorm.convert_sync_batchnorm(getattr(self.model, name))
                setattr(self.model, name, bn)
        self.optimizer = build_optimizer(
            cfg.optimizer,
            self.model.encoder_q.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            graph_safe=cfg.cuda_graph != "off",
        )
        self.train_step = TrainStep(
            self.model,
            self.optimizer,
            device=self.device,
            amp=cfg.amp,
            amp_dtype=cfg.amp_dtype,
            momentum_schedule=cfg.moco_m_cos,
            cuda_graph=cfg.cuda_graph,
        )
        self.scaler = self.train_step.scaler
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            with self.train_step.ddp_context():  # a graph captures DDP built on its stream
                self.model.encoder_q = DDP(self.model.encoder_q, device_ids=ids)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history, self.knn_random, self.bad_images = [], None, 0
        if plan.state is not None:
            self.load(plan.state)
        resumed_at = self.global_step + 1 if plan.state is not None else None
        self.log = MetricsLog(self.out, enabled=self.is_main, purge_step=resumed_at)
        self._stop_signal = None
        self.guard = NonFiniteGuard(
            self.device,
            cfg.on_nonfinite,
            self.global_step,
            check_grads=not self.scaler.is_enabled(),  # fp16: the scaler drops overflows
            buffers=bn_statistics(self.model),
        )
        self.train_step.attach_guard(self.guard)  # checked inside the step (captured with it)
        self.last_saved_step = self.global_step
        self.last_checkpoint = None

    # --- checkpoints -------------------------------------------------------------------
    def _generators(self) -> list[torch.Generator]:
        """The model's own random streams (shuffle BN, negatives sampling), for exact resume."""
        return self.model.generators()

    def _model_state(self) -> dict:
        """MoCo v1/v2: the official pieces by name; other methods: everything but encoder_q
        (key encoder, memory bank) as one state dict."""
        m = self.model
        if self.is_moco:
            return {
                "encoder_k": m.encoder_k.state_dict(),
                "queue": m.queue,
                "queue_ptr": m.queue_ptr,
            }
        rest = {k: v for k, v in m.state_dict().items() if not k.startswith("encoder_q.")}
        return {"model": rest}

    def state(self) -> dict:
        m = self.model
        return {
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "encoder_q": m.query_encoder().state_dict(),
            **self._model_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_states(*self._generators()),
            "history": self.history,
            "knn_random": self.knn_random,
            "bad_images": self.bad_images,
        }

    def save(self) -> Path:
        """Rank 0 writes the checkpoint (rotating the older ones), never a non-finite one."""
        path = self.out / ckpt.CHECKPOINT_NAME
        if self.is_main:
            state = self.state()
            bad = all_finite(state)
            if bad is not None:  # e.g. BN statistics of a skipped NaN batch
                raise _NonFinite(self.global_step, f"{bad} holds NaN or inf")
            ckpt.save_checkpoint(state, self.out, keep=self.cfg.keep)
            self.last_checkpoint = str(path)
        self.last_saved_step = self.global_step
        return path

    def load(self, s: dict) -> None:
        m = self.model
        m.query_encoder().load_state_dict(s["encoder_q"])
        if self.is_moco:
            m.encoder_k.load_state_dict(s["encoder_k"])
            m.queue.copy_(s["queue"])
            m.queue_ptr.copy_(s["queue_ptr"])
        else:
            missing, unexpected = m.load_state_dict(s["model"], strict=False)
            missing = [k for k in missing if not k.startswith("encoder_q.")]
            if missing or unexpected:
                raise UsageError(
                    "the checkpoint was written by another method or model (missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}); resume with the config it was trained with"
                )
        self.optimizer.load_state_dict(s["optimizer"])
        self.train_step.bind_lr()  # the loaded groups hold the saved lr; read the step's
        self.scaler.load_state_dict(s["scaler"])
        ckpt.set_rng_states(s["rng"], *self._generators())
        self.epoch, self.step_in_epoch = s["epoch"], s["step_in_epoch"]
        self.global_step = s["global_step"]
        self.history, self.knn_random = s["history"], s["knn_random"]
        self.bad_images = s["bad_images"]

    # --- evaluation --------------------------------------------------------------------
    def knn(self) -> float | None:
        """kNN top-1 (%) of the query backbone; every rank encodes its shard of the splits."""
        if self.knn_loaders is None:
            return None
        return knn_accuracy(
            self.model.query_encoder().backbone,
            *self.knn_loaders,
            self.device,
            num_classes=self.num_classes,
            k=self.cfg.knn_k,
            t=self.cfg.knn_t,
            channels_last=self.channels_last,
            progress=self.cfg.progress and self.is_main,
        )

    # --- the loop ----------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def _agree(self, check_values: bool) -> tuple[int | None, int]:
        """(stop signal seen by any rank, first non-finite step or -1), the same on every
        rank so all stop at one step. check_values reads the guard's flag (a host sync)."""
        if self.world_size == 1:
            return self._stop_signal, self.guard.first_bad_step() if check_values else -1
        bad = self.guard.first_bad if check_values else self.guard.first_bad.new_tensor(-1)
        flags = torch.stack([torch.tensor(self._stop_signal or 0, device=self.device), bad])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        sig, first_bad = flags.tolist()
        return sig or None, first_bad

    def step(
        self, im_q: torch.Tensor, im_k: torch.Tensor, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One step of the method (engine/step.py) at this step's lr and momentum; returns
        (loss, top-1 hits) as device tensors, never read here, or None for a step dropped by
        --on-nonfinite skip (the guard runs inside the step). index: the batch's dataset
        indices (the memory bank needs them)."""
        cfg, t, n = self.cfg, self.global_step, self.steps_per_epoch
        m = momentum_at(cfg, t, n) if cfg.moco_m_cos else None
        return self.train_step(im_q, im_k, index, lr=lr_at(cfg, t, n), momentum=m)

    def _batch_index(self) -> torch.Tensor | None:
        """Dataset indices of the batch at step_in_epoch: the loader's batch sampler is
        deterministic, so they are recomputed here rather than carried through the loader."""
        if self.epoch_index is None:
            return None
        B = self.cfg.batch_size // self.world_size
        return self.epoch_index[self.step_in_epoch * B : (self.step_in_epoch + 1) * B]

    def train_epoch(self) -> tuple[float, float]:
        """(mean loss, pretext top-1 % on this rank) over the steps run in this epoch."""
        cfg, dev = self.cfg, self.device
        self.model.train()
        self.loader.set_epoch(self.epoch, self.step_in_epoch)
        loss_sum = torch.zeros((), device=dev)
        hits = torch.zeros((), device=dev, dtype=torch.long)
        win_loss, win_steps, win_t0 = torch.zeros((), device=dev), 0, time.perf_counter()
        win_skipped0 = self.guard.skipped
        steps_done = 0
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            disable=not (self.is_main and cfg.progress),
            leave=False,
            dynamic_ncols=True,
        )
        if self.model.needs_index:
            idx = self.loader.batch_sampler.epoch_indices()
            self.epoch_index = torch.tensor(idx, dtype=torch.long, device=dev)
        for im_q, im_k, _, n_bad in self.loader:
            im_q = im_q.to(dev, non_blocking=True, memory_format=self.mf)
            im_k = im_k.to(dev, non_blocking=True, memory_format=self.mf)
            stepped = self.step(im_q, im_k, self._batch_index())
            self.bad_images += int(n_bad)  # a CPU tensor from the loader: no device sync
            if stepped is not None:  # None: dropped by --on-nonfinite skip
                loss_sum += stepped[0]
                win_loss += stepped[0]
                hits += stepped[1]
                steps_done += 1
            win_steps += 1
            self.step_in_epoch += 1
            self.global_step += 1
            bar.update(1)
            if self.on_step is not None:
                self.on_step(self.global_step)
            save_due = cfg.save_every and self.global_step - self.last_saved_step >= cfg.save_every
            at_log = win_steps == cfg.log_every or self.step_in_epoch == self.steps_per_epoch
            if at_log:
                n_ok = win_steps - (self.guard.skipped - win_skipped0)  # steps not dropped
                wl = win_loss.item() / n_ok if n_ok else None  # the one host sync per window
                ips = win_steps * cfg.batch_size / (time.perf_counter() - win_t0)
                lr = self.train_step.lr_value  # the host's copy: no read of the device's
                shown = "dropped" if wl is None else f"{wl:.3f}"
                bar.set_postfix(loss=shown, lr=f"{lr:.3g}", img_s=f"{ips:.0f}")
                extra = {"skipped_steps": self.guard.skipped} if self.guard.skipped else {}
                self.log.log("step", self.global_step, loss=wl, lr=lr, images_per_s=ips, **extra)
                win_loss.zero_()
                win_steps, win_t0, win_skipped0 = 0, time.perf_counter(), self.guard.skipped
            # across ranks the agreement costs a collective: only at log boundaries and saves
            if self.world_size == 1 or at_log or save_due:
                sig, first_bad = self._agree(check_values=at_log or bool(save_due))
                if first_bad >= 0:
                    bar.close()
                    raise _NonFinite(first_bad + 1)  # counted from 1, as in metrics.jsonl
                if sig:
                    bar.close()
                    raise _StopRequested()
                if save_due and self.step_in_epoch < self.steps_per_epoch:
                    self.save()  # the epoch's end saves after its kNN
        bar.close()
        n = max(steps_done, 1)
        top1 = 100.0 * hits.item() / (n * cfg.batch_size // self.world_size)
        return loss_sum.item() / n, top1

    def fit(self) -> dict:
        handlers = {}
        for sig in STOP_SIGNALS:
            try:
                handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                pass
        try:
            return self._fit()
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            self.log.close()

    def _fit(self) -> dict:
        cfg = self.cfg
        if self.is_main:
            n = self.world_size
            print(
                f"fastmoco: {cfg.preset} {cfg.arch} on {n} x {self.device.type}, "
                f"batch {cfg.batch_size}, K={cfg.queue_size}, {self.steps_per_epoch} steps/epoch, "
                f"out {self.out}",
                flush=True,
            )
            threads = f", {self.threads} intra-op threads" if self.device.type == "cpu" else ""
            print(f"loader: {self.loader.description}{threads}", flush=True)
            for line in startup_notices(cfg, self.world_size, self.loader.description):
                print(line, flush=True)
            print(self.train_step.describe(), flush=True)
            print(precision_line(cfg, self.channels_last, self.model), flush=True)
        if self.knn_random is None and self.global_step == 0:
            self.knn_random = self.knn()
            if self.is_main and self.knn_random is not None:
                print(f"kNN top-1 at random init: {self.knn_random:.2f}%", flush=True)
        t_start = time.perf_counter()
        try:
            while self.epoch < cfg.epochs:
                t0 = time.perf_counter()
                loss, train_top1 = self.train_epoch()
                top1 = None
                last = self.epoch + 1 == cfg.epochs
                if cfg.knn_every > 0 and ((self.epoch + 1) % cfg.knn_every == 0 or last):
                    top1 = self.knn()
                rec = dict(
                    epoch=self.epoch,
                    loss=loss,
                    train_top1=train_top1,
                    knn_top1=top1,
                    seconds=time.perf_counter() - t0,
                )
                self.history.append(rec)
                self.log.log(
                    "epoch", self.global_step, **{k: v for k, v in rec.items() if v is not None}
                )
                if self.is_main:
                    knn_s = f", kNN top-1 {top1:.2f}%" if top1 is not None else ""
                    print(
                        f"epoch {self.epoch + 1}/{cfg.epochs}: loss {loss:.4f}{knn_s} "
                        f"({rec['seconds']:.1f} s)",
                        flush=True,
                    )
                self.epoch += 1
                self.step_in_epoch = 0
                self.save()
        except _StopRequested:
            try:
                path = self.save()
            except _NonFinite as e:
                return self._nonfinite(e)
            if self.is_main:
                print(f"\ninterrupted: checkpoint saved to {path}", flush=True)
            return {"out": str(self.out), "interrupted": self._stop_signal or signal.SIGTERM}
        except _NonFinite as e:
            return self._nonfinite(e)
        results = {
            "out": str(self.out),
            "knn_random": self.knn_random,
            "knn_final": next(
                (h["knn_top1"] for h in reversed(self.history) if h["knn_top1"] is not None), None
            ),
            "history": self.history,
            "seconds": time.perf_counter() - t_start,
            "bad_images": self.bad_images,
            "skipped_steps": self.guard.skipped,
        }
        if self.is_main:
            plot_curves(
                self.history,
                self.knn_random,
                self.out / "curves.png",
                f"fastmoco {cfg.preset}",
                loss_ceiling=math.log(cfg.queue_size + 1) if self.is_moco else None,
            )
            if cfg.skip_bad_images and self.bad_images:
                print(f"skipped {self.bad_images} unreadable image reads", flush=True)
            if self.guard.skipped:
                print(f"dropped {self.guard.skipped} steps with NaN/inf values", flush=True)
            if results["knn_final"] is not None:
                print(
                    f"kNN top-1 on the val split: trained {results['knn_final']:.2f}% "
                    f"vs random init {self.knn_random:.2f}% (k={cfg.knn_k}, t={cfg.knn_t})",
                    flush=True,
                )
            print(f"run written to {self.out} (checkpoint.pt, metrics.jsonl, tb/, curves.png)")
        return results

    def _nonfinite(self, e: "_NonFinite") -> dict:
        if self.is_main and e.detail:
            print(f"fastmoco: {e.detail}", flush=True)
        last = self.last_checkpoint
        if last is None and (self.out / ckpt.CHECKPOINT_NAME).is_file():
            last = str(self.out / ckpt.CHECKPOINT_NAME)
        return {"out": str(self.out), "nonfinite": e.step, "last_checkpoint": last}


def precision_line(cfg: TrainConfig, channels_last: bool, model) -> str:
    """AMP, memory format and queue dtype, said once at the start of a run."""
    amp = f"AMP {cfg.amp_dtype} autocast" if cfg.amp else "fp32 (no AMP)"
    how = "given" if cfg.channels_last is not None else "default: on with --amp on CUDA"
    fmt = f"channels_last {'on' if channels_last else 'off'} ({how})"
    queue = getattr(model, "queue", None)
    q = f", queue {str(queue.dtype).removeprefix('torch.')}" if queue is not None else ""
    return f"precision: {amp}, {fmt}{q}"


class _StopRequested(Exception):
    pass


class _NonFinite(Exception):
    def __init__(self, step: int, detail: str = ""):
        super().__init__(step)
        self.step, self.detail = step, detail
