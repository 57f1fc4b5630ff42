"""The training loop: one process per device, torch.distributed across them.

    plan = plan_run(cfg)                        # engine/plan.py, on rank 0: checks, run dir
    for epoch:                                  # Trainer.fit
        for x_q, x_k in loader:                 # Trainer.train_epoch
            loss, hits = step(x_q, x_k, lr=lr_at(t), ema_weight=ema_weight_at(t))
            log every log_every steps; agree on stops; save every save_every steps
        kNN monitor; checkpoint

A step (MoCo paper, Algorithm 1: forward, loss, backward, optimizer, momentum update,
enqueue, for any method) is the step object of engine/step.py (eager, or one captured CUDA
graph); what a method is, needs and saves, the method says itself (models/base.py). The
step never syncs with the host: the queue pointer stays on the device and the loss is
summed on the device and read every `log_every` steps.
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from fastmoco.config import TrainConfig
from fastmoco.data import build_train_loader
from fastmoco.data.folder import unreadable_files
from fastmoco.data.loader import cpu_plan
from fastmoco.errors import Interrupted
from fastmoco.models import build_model
from fastmoco.ops.distributed import world

from . import checkpoint as ckpt
from . import faults
from .cpu_threads import ThreadTuner
from .distributed import STOP_SIGNALS, launch, local_device, resolve_device
from .guard import DroppedStepsError, NonFiniteError, NonFiniteGuard, all_finite, bn_statistics
from .knn import build_knn_loaders, knn_accuracy
from .metrics import MetricsLog, plot_curves
from .notices import startup_lines
from .optim import build_optimizer, ema_weight_at, lr_at
from .plan import RunPlan, plan_run
from .step import TrainStep, resolve_channels_last


def train(cfg: TrainConfig, *, on_step=None, explicit: set[str] | None = None) -> dict:
    """Check the config and data, then train on every rank; returns rank 0's results.

    explicit: the fields given on the command line (a resumed run takes the others from
    its checkpoint); None means all of cfg's. on_step(global_step) is called after each
    step (tests use it to send a signal).
    """
    device = resolve_device(cfg.device, cfg.gpus)
    cfg.check()
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
        step, kept = results["nonfinite"], results.get("last_checkpoint")
        if results.get("nonfinite_reason"):  # --on-nonfinite skip gave up
            raise DroppedStepsError(step, kept, results["nonfinite_reason"])
        raise NonFiniteError(step, kept)
    return results


def _train_rank(plan: RunPlan, on_step) -> dict:
    if plan.done is not None:  # a finished run: say so, write nothing
        if world()[0] == 0:
            print(plan.done, flush=True)
        return {"out": plan.out, "nothing_to_train": True, "history": plan.state["history"]}
    return Trainer(plan, on_step).fit()


def plain_lines() -> bool:
    """Output to a file or a pipe (a SLURM log): plain lines instead of progress bars."""
    return not sys.stdout.isatty()


class Trainer:
    def __init__(self, plan: RunPlan, on_step=None):
        cfg, train_root, val_root = plan.cfg, plan.train_root, plan.val_root
        self.cfg, self.out, self.on_step = cfg, Path(plan.out), on_step
        self.rank, self.world_size = world()
        self.is_main = self.rank == 0
        self.bars = cfg.progress and self.is_main and not plain_lines()
        self.device = local_device(resolve_device(cfg.device, 1))
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.channels_last = resolve_channels_last(cfg.channels_last, cfg.amp, self.device)
        self.mf = torch.channels_last if self.channels_last else torch.contiguous_format
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        workers, self.threads = cpu_plan(cfg.workers, ranks_here)
        self.thread_tuner = None
        if self.device.type == "cpu":  # the step's threads: given, or timed (cpu_threads.py)
            self.threads = cfg.cpu_threads or self.threads
            torch.set_num_threads(self.threads)
            if not cfg.cpu_threads:
                self.thread_tuner = ThreadTuner(self.threads, workers)

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

        sampler = self.loader.batch_sampler  # both loaders deal batches with it
        self.epoch_index = None  # needs_index: this rank's dataset indices of the epoch
        self.model = build_model(cfg, num_samples=sampler.num_samples).to(self.device)
        self.model.to(memory_format=self.mf)
        if self.model.sync_bn and self.world_size > 1 and self.device.type == "cuda":
            for name in ("encoder_q", "encoder_k"):  # global BN statistics (SyncBN: CUDA only)
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
            memory_format=self.mf,
        )
        self.scaler = self.train_step.scaler
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            with self.train_step.ddp_context():  # a graph captures DDP built on its stream
                self.model.encoder_q = DDP(self.model.encoder_q, device_ids=ids)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history, self.knn_random, self.bad_images, self.bad_files = [], None, 0, []
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
    def state(self) -> dict:
        m = self.model
        return {
            "config": self.cfg.recipe_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "encoder_q": m.query_encoder().state_dict(),
            **m.extra_state(),  # what the method keeps besides encoder_q (models/base.py)
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_states(*m.generators()),
            "history": self.history,
            "knn_random": self.knn_random,
            "bad_images": self.bad_images,
            "bad_files": self.bad_files,
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
        m.load_extra_state(s)
        self.optimizer.load_state_dict(s["optimizer"])
        self.train_step.bind_lr()  # the loaded groups hold the saved lr; read the step's
        self.scaler.load_state_dict(s["scaler"])
        ckpt.set_rng_states(s["rng"], *m.generators())
        self.epoch, self.step_in_epoch = s["epoch"], s["step_in_epoch"]
        self.global_step = s["global_step"]
        self.history, self.knn_random = s["history"], s["knn_random"]
        if any(h["epoch"] == 0 for h in self.history):  # written when epochs counted from 0
            self.history = [{**h, "epoch": h["epoch"] + 1} for h in self.history]
        self.bad_images, self.bad_files = s["bad_images"], s.get("bad_files", [])

    # --- evaluation --------------------------------------------------------------------
    def knn(self) -> float | None:
        """kNN top-1 (%) of the query backbone; every rank encodes its shard of the splits."""
        if self.knn_loaders is None:
            return None
        encoder = self.model.query_encoder()
        net = encoder.backbone  # --knn-features head: after the projection head
        if self.cfg.knn_features == "head":
            net = torch.nn.Sequential(encoder.backbone, encoder.head)
        return knn_accuracy(
            net,
            *self.knn_loaders,
            self.device,
            num_classes=self.num_classes,
            k=self.cfg.knn_k,
            t=self.cfg.knn_t,
            channels_last=self.channels_last,
            progress=self.bars,
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

    def step(self, im_q, im_k, index=None):
        """One step of the method (engine/step.py) at this step's lr and EMA weight; returns
        (loss, top-1 hits or None) as device tensors, never read here, or None for a step
        dropped by --on-nonfinite skip (the guard runs inside the step). index: the
        batch's dataset indices (for a method that needs_index)."""
        cfg, t, n = self.cfg, self.global_step, self.steps_per_epoch
        w = ema_weight_at(cfg, t, n) if cfg.moco_m_cos else None
        return self.train_step(im_q, im_k, index, lr=lr_at(cfg, t, n), ema_weight=w)

    def _batch_index(self) -> torch.Tensor | None:
        """Dataset indices of the batch at step_in_epoch: the loader's batch sampler is
        deterministic, so they are recomputed here rather than carried through the loader."""
        if self.epoch_index is None:
            return None
        B = self.cfg.batch_size // self.world_size
        return self.epoch_index[self.step_in_epoch * B : (self.step_in_epoch + 1) * B]

    def _log_window(self, win_loss, win_steps, n_ok, seconds) -> None:
        """The loss of the last window (the one host sync per window), to the bar, the
        metrics and, without a terminal, one plain line."""
        cfg = self.cfg
        wl = win_loss.item() / n_ok if n_ok else None
        ips = win_steps * cfg.batch_size / seconds
        lr = self.train_step.lr_value  # the host's copy: no read of the device's
        shown = "dropped" if wl is None else f"{wl:.4f}"
        if self.bar is not None:
            self.bar.set_postfix(loss=shown, lr=f"{lr:.3g}", img_s=f"{ips:.0f}")
        elif self.is_main and cfg.progress:
            print(
                f"step {self.global_step} | epoch {self.epoch + 1}/{cfg.epochs} "
                f"{self.step_in_epoch}/{self.steps_per_epoch} | loss {shown} | lr {lr:.4g} | "
                f"{ips:.0f} img/s",
                flush=True,
            )
        extra = {"skipped_steps": self.guard.skipped} if self.guard.skipped else {}
        self.log.log("step", self.global_step, loss=wl, lr=lr, images_per_s=ips, **extra)

    def train_epoch(self) -> tuple[float | None, float | None]:
        """(mean loss, pretext top-1 % on this rank) over the steps run in this epoch: None
        when no step was taken (all dropped) or the method reports no ranking."""
        cfg, dev = self.cfg, self.device
        self.model.train()
        self.loader.set_epoch(self.epoch, self.step_in_epoch)
        loss_sum = torch.zeros((), device=dev)
        hits = torch.zeros((), device=dev, dtype=torch.long)
        counted = True
        win_loss, win_steps, win_t0 = torch.zeros((), device=dev), 0, time.perf_counter()
        win_skipped0 = self.guard.skipped
        steps_done = 0
        self.bar = None
        if self.bars:
            self.bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.step_in_epoch,
                desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                leave=False,
                dynamic_ncols=True,
            )
        if self.model.needs_index:
            idx = self.loader.batch_sampler.epoch_indices()
            self.epoch_index = torch.tensor(idx, dtype=torch.long, device=dev)
        if self.thread_tuner is not None:
            self.thread_tuner.epoch_start()
        for im_q, im_k, _, n_bad in self.loader:
            stepped = self.step(im_q, im_k, self._batch_index())
            if self.thread_tuner is not None:
                self._tune_threads()
            if int(n_bad):  # a CPU tensor from the loader: no device sync
                self._note_bad_images(int(n_bad))
            if stepped is not None:  # None: dropped by --on-nonfinite skip
                loss_sum += stepped[0]
                win_loss += stepped[0]
                if stepped[1] is None:
                    counted = False
                else:
                    hits += stepped[1]
                steps_done += 1
            win_steps += 1
            self.step_in_epoch += 1
            self.global_step += 1
            if self.bar is not None:
                self.bar.update(1)
            if self.on_step is not None:
                self.on_step(self.global_step)
            save_due = cfg.save_every and self.global_step - self.last_saved_step >= cfg.save_every
            at_log = win_steps == cfg.log_every or self.step_in_epoch == self.steps_per_epoch
            if at_log:
                n_ok = win_steps - (self.guard.skipped - win_skipped0)  # steps not dropped
                self._log_window(win_loss, win_steps, n_ok, time.perf_counter() - win_t0)
                win_loss.zero_()
                win_steps, win_t0, win_skipped0 = 0, time.perf_counter(), self.guard.skipped
            # across ranks the agreement costs a collective: only at log boundaries and saves
            if self.world_size == 1 or at_log or save_due:
                sig, first_bad = self._agree(check_values=at_log or bool(save_due))
                if first_bad >= 0:
                    self._close_bar()
                    raise _NonFinite(first_bad + 1)  # counted from 1, as in metrics.jsonl
                if sig:
                    self._close_bar()
                    raise _StopRequested()
                if save_due and self.step_in_epoch < self.steps_per_epoch:
                    self.save()  # the epoch's end saves after its kNN
        self._close_bar()
        if steps_done == 0:
            return None, None
        top1 = 100.0 * hits.item() / (steps_done * cfg.batch_size // self.world_size)
        return loss_sum.item() / steps_done, top1 if counted else None

    def _tune_threads(self) -> None:
        line = self.thread_tuner.step_done()
        if line is not None:
            self.threads = torch.get_num_threads()
            if self.is_main:
                (self.bar.write if self.bar is not None else print)(line)

    def _note_bad_images(self, n_bad: int) -> None:
        """Count the batch's skipped files, and name the first few (the batch's indices come
        from the sampler both loaders deal by, so its files can be read again)."""
        self.bad_images += n_bad
        if len(self.bad_files) < 5:
            B = self.cfg.batch_size // self.world_size
            s = self.step_in_epoch
            indices = self.loader.batch_sampler.epoch_indices()[s * B : (s + 1) * B]
            for path in unreadable_files(self.loader.samples, indices, limit=5):
                if path not in self.bad_files and len(self.bad_files) < 5:
                    self.bad_files.append(path)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def fit(self) -> dict:
        handlers = {}
        for sig in STOP_SIGNALS:
            try:
                handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                pass
        try:
            return self._fit()
        except Exception as e:  # a fault of the machine: one line and exit 75 (engine/faults.py)
            kept = self.last_checkpoint or ckpt.newest_complete(self.out)
            fault = faults.as_fault(e, run_dir=self.out, kept=kept, step=self.global_step)
            if fault is None:
                raise
            raise fault from e
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            self.log.close()

    def _banner(self) -> None:
        lines = startup_lines(
            self.cfg, self.model, self.loader.description, self.train_step.describe(),
            world_size=self.world_size, device=self.device, threads=self.threads,
            steps_per_epoch=self.steps_per_epoch, out=self.out, channels_last=self.channels_last,
        )  # fmt: skip
        for line in lines:
            print(line, flush=True)

    def _fit(self) -> dict:
        cfg = self.cfg
        if self.is_main:
            self._banner()
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
                    epoch=self.epoch + 1,  # counted from 1, as the console and the curves
                    loss=loss,
                    train_top1=train_top1,
                    knn_top1=top1,
                    seconds=time.perf_counter() - t0,
                    graphed=self.train_step.use_graph,
                )
                self.history.append(rec)
                self.log.log(
                    "epoch", self.global_step, **{k: v for k, v in rec.items() if v is not None}
                )
                if self.is_main:
                    loss_s = "no step taken (all dropped)" if loss is None else f"loss {loss:.4f}"
                    knn_s = f", kNN top-1 {top1:.2f}%" if top1 is not None else ""
                    print(
                        f"epoch {self.epoch + 1}/{cfg.epochs}: {loss_s}{knn_s} "
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
            self._finish(results)
        return results

    def _finish(self, results: dict) -> None:
        cfg = self.cfg
        plot_curves(
            self.history,
            self.knn_random,
            self.out / "curves.png",
            f"fastmoco {cfg.preset}",
            loss_ceiling=self.model.loss_ceiling(cfg.batch_size // self.world_size),
        )
        if cfg.skip_bad_images and self.bad_images:
            more = ", ..." if self.bad_images > len(self.bad_files) else ""
            print(
                f"skipped {self.bad_images} reads of unreadable images: "
                f"{', '.join(self.bad_files)}{more}",
                flush=True,
            )
        if self.guard.skipped:
            print(f"dropped {self.guard.skipped} steps with NaN/inf values", flush=True)
        if results["knn_final"] is not None:
            print(
                f"kNN top-1 on the val split: trained {results['knn_final']:.2f}% "
                f"vs random init {self.knn_random:.2f}% (k={cfg.knn_k}, t={cfg.knn_t}, "
                f"{cfg.knn_features} features)",
                flush=True,
            )
        files = sorted(p.name + ("/" if p.is_dir() else "") for p in self.out.iterdir()
                       if p.name != ckpt.LOCK_NAME)  # fmt: skip
        print(f"run written to {self.out}: {', '.join(files)}", flush=True)

    def _nonfinite(self, e: "_NonFinite") -> dict:
        if self.is_main and e.detail:
            print(f"fastmoco: {e.detail}", flush=True)
        last = self.last_checkpoint
        if last is None and (self.out / ckpt.CHECKPOINT_NAME).is_file():
            last = str(self.out / ckpt.CHECKPOINT_NAME)
        return {"out": str(self.out), "nonfinite": e.step, "last_checkpoint": last,
                "nonfinite_reason": self.guard.breach}  # fmt: skip


class _StopRequested(Exception):
    pass


class _NonFinite(Exception):
    def __init__(self, step: int, detail: str = ""):
        super().__init__(step)
        self.step, self.detail = step, detail

