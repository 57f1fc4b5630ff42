"""The training step as one object: forward, loss, backward, optimizer step, the method's
update (momentum update + enqueue for MoCo), run eagerly or replayed as one CUDA graph.

    step = TrainStep(model, optimizer, device=..., amp_dtype=..., cuda_graph="auto")
    loss, hits = step(x_q, x_k, index, lr=lr_at(t), ema_weight=ema_weight_at(t))

Everything that changes from one step to the next lives on the device, so the same
recorded kernels serve every step:
  - the learning rate: a 0-d tensor the optimizer reads (optim.reads_lr_tensor: LARS,
    torch's fused SGD, fused AdamW); the host writes the schedule's value into it before
    each step (a host-to-device write, never a read);
  - the key-encoder update's weight 1 - m, when a schedule moves it (MoCo v3): a 0-d tensor
    likewise (1 - m rather than m: float32 keeps it exact as m nears 1);
  - the queue pointer: a device tensor the enqueue advances (fastmoco.ops.enqueue_);
  - random draws (shuffle BN's permutation, sampled negatives): the method's own
    torch.Generators, registered with the graph, so each replay draws anew as eager would.
The views come in on the host (pinned) or the device and are copied once, into the static
buffers of the graph, or to the device in the step's memory format when eager; the loss and
the top-1 hits come back as device tensors (static outputs: read or accumulate them before
the next step; hits is None for a method that reports no ranking).

The graph is captured after a few eager warm-up steps (3; 11 under DDP, as the PyTorch
CUDA-graphs notes ask) run on a side stream, which also lets the Triton kernels compile
and the momentum update build its address table. A capture that fails runs eagerly from
there with one rank under --cuda-graph auto; under DDP (or with --cuda-graph on) the ranks
agree over a gloo group of their own and every rank stops with one line, since NCCL needs
every rank of a communicator to capture alike. The trainer keeps everything that is not
the step: the loop, logging, checkpoints, kNN.
"""

import contextlib

import torch
import torch.distributed as dist

from fastmoco.errors import UsageError
from fastmoco.ops import momentum_update
from fastmoco.ops.distributed import world

from .optim import graph_capturable, reads_lr_tensor

GRAPH_MODES = ("auto", "on", "off")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_channels_last(channels_last: bool | None, amp: bool, device: torch.device) -> bool:
    """--channels-last / --no-channels-last, or by default on with --amp on CUDA: NHWC lets
    the convolutions of the AMP step use the tensor cores without layout transposes."""
    if channels_last is not None:
        return channels_last
    return amp and torch.device(device).type == "cuda"


def graph_plan(
    mode: str,
    *,
    device: torch.device,
    amp: bool,
    amp_dtype: str,
    optimizer: torch.optim.Optimizer,
    model,
    guard=None,
) -> tuple[bool, str]:
    """(capture?, why): whether this configuration runs the step as a CUDA graph.

    mode "on" raises UsageError where "auto" answers (False, the reason)."""
    if mode not in GRAPH_MODES:
        raise UsageError(f"--cuda-graph {mode!r}: choose one of {', '.join(GRAPH_MODES)}")
    if mode == "off":
        return False, "--cuda-graph off"
    reason = None
    if torch.device(device).type != "cuda":
        reason = f"CUDA graphs need a CUDA device (this run is on {torch.device(device).type})"
    elif amp and amp_dtype == "fp16":
        reason = (
            "fp16 AMP's GradScaler decides on the host whether to skip a step; use "
            "--amp-dtype bf16 (no scaler) to capture the step"
        )
    elif graph_capturable(optimizer) is not None:
        reason = graph_capturable(optimizer)
    elif getattr(guard, "mode", None) == "skip":
        reason = "--on-nonfinite skip decides on the host whether each step is dropped"
    elif model.generators() and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        reason = "this torch cannot register the method's random generators with a graph"
    if reason is None:
        return True, "the whole step is captured"
    if mode == "on":
        raise UsageError(f"--cuda-graph on: {reason}; or use --cuda-graph off")
    return False, reason


class TrainStep:
    """One training step of any method (fastmoco.models.ContrastiveMethod)."""

    def __init__(
        self,
        model,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        amp: bool = False,
        amp_dtype: str = "bf16",
        momentum_schedule: bool = False,
        cuda_graph: str = "off",
        warmup_steps: int | None = None,
        guard=None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        """momentum_schedule: the momentum changes per step (the EMA weight 1 - m is passed
        to after_step as a device tensor); otherwise the method's constant m. cuda_graph:
        auto | on | off. guard: a check of the loss and gradients inside the step (the
        non-finite guard): guard.snapshot() before the forward, ok = guard.observe(loss,
        params) after the backward (device ops only, captured with the step), and
        guard.drop(ok) -> True to drop the step before the optimizer; a guard whose `mode`
        is "skip" decides that on the host, so its steps are not captured. memory_format:
        the views' on the device (channels_last under AMP on CUDA)."""
        self.model, self.optimizer = model, optimizer
        self.device = torch.device(device)
        self.amp = amp
        self.autocast_dtype = AMP_DTYPES[amp_dtype]
        self.memory_format = memory_format
        fp16 = amp and amp_dtype == "fp16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        # the schedule's values, on the device; the host only ever writes them
        self.lr = torch.zeros((), dtype=torch.float32, device=self.device)
        self.lr_on_device = reads_lr_tensor(optimizer)
        self.bind_lr()
        self.lr_value = 0.0  # the host's copy of the last lr written, for logging
        self.ema_weight = (
            torch.zeros((), dtype=torch.float32, device=self.device) if momentum_schedule else None
        )
        self.use_graph, self.reason = graph_plan(
            cuda_graph,
            device=self.device,
            amp=amp,
            amp_dtype=amp_dtype,
            optimizer=optimizer,
            model=model,
            guard=guard,
        )
        self.strict = cuda_graph == "on"
        self.warmup_steps = warmup_steps if warmup_steps is not None else _warmup_steps()
        self.guard = guard
        self.steps_run = 0
        self._graph = None
        self._static_in = None
        self._static_out = None
        self._held = None  # what the captured kernels read by address (EMA tables)
        self._side_stream = torch.cuda.Stream(self.device) if self.use_graph else None

    def describe(self) -> str:
        """One line for the run's first lines: which step runs, and why."""
        if self.use_graph:
            return (
                f"step: CUDA graph ({self.reason}; captured after {self.warmup_steps} eager "
                "warm-up steps, then replayed)"
            )
        return f"step: eager ({self.reason})"

    def attach_guard(self, guard) -> None:
        """Check the loss and gradients with `guard` inside the step (see __init__); a guard
        that decides on the host (skip mode) turns the graph off, or stops --cuda-graph on."""
        self.guard = guard
        if self.use_graph and self._graph is None:
            self.use_graph, self.reason = graph_plan(
                "on" if self.strict else "auto",
                device=self.device,
                amp=self.amp,
                amp_dtype="fp16" if self.scaler.is_enabled() else "bf16",
                optimizer=self.optimizer,
                model=self.model,
                guard=guard,
            )

    def bind_lr(self) -> None:
        """Point the optimizer's groups at the step's lr tensor (again after the optimizer's
        load_state_dict, which puts the saved value back)."""
        if self.lr_on_device:
            for g in self.optimizer.param_groups:
                g["lr"] = self.lr

    @contextlib.contextmanager
    def ddp_context(self):
        """Where to build DDP: on the capture's side stream when the step is graphed (the
        PyTorch CUDA-graphs notes: DDP constructed in a side-stream context). DDP's
        constructor broadcasts rank 0's weights on that stream; the default stream waits
        for it on exit, so a checkpoint loaded next (on the default stream) cannot be
        overwritten by the broadcast of the initial weights landing after it."""
        if self._side_stream is None:
            yield
            return
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream(self.device).wait_stream(side)

    # --- the schedule ------------------------------------------------------------------
    def set_schedule(self, lr: float, ema_weight: float | None = None) -> None:
        """Write this step's lr (and EMA weight 1 - m, under a schedule) where the step
        reads them."""
        self.lr_value = float(lr)
        if self.lr_on_device:
            self.lr.fill_(lr)
        else:  # an optimizer that takes a Python float (eager only)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        if self.ema_weight is not None and ema_weight is not None:
            self.ema_weight.fill_(ema_weight)

    # --- running -----------------------------------------------------------------------
    def __call__(self, x_q, x_k, index=None, *, lr: float, ema_weight: float | None = None):
        """One step; returns (loss, top-1 hits or None) as device tensors, never read here."""
        self.set_schedule(lr, ema_weight)
        self.steps_run += 1
        if not self.use_graph:
            return self.body(*self._on_device(x_q, x_k, index))
        if self._graph is None and self.steps_run <= self.warmup_steps:
            with self._on_side_stream():
                return self.body(*self._on_device(x_q, x_k, index))
        if self._graph is None:
            failed = None
            try:
                self._capture(x_q, x_k, index)
            except Exception as err:
                failed = err
            failed_ranks = self._agree(failed)
            if failed_ranks:
                self._stop_or_give_up(failed, failed_ranks)
                return self.body(*self._on_device(x_q, x_k, index))
        return self._replay(x_q, x_k, index)

    def body(self, x_q, x_k, index=None):
        """The step itself, the same code eager and captured; None for a step the guard
        dropped."""
        if self.guard is not None:
            self.guard.snapshot()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.amp):
            loss, aux, pos_rank = self.model(x_q, x_k, index)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.guard is not None:
            ok = self.guard.observe(loss, self.model.encoder_q.parameters())
            if self.guard.drop(ok):
                return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.after_step(aux, index, self.ema_weight)
        hits = None if pos_rank is None else (pos_rank == 0).sum()
        return loss.detach(), hits

    def _on_device(self, x_q, x_k, index):
        mf = self.memory_format
        x_q = x_q.to(self.device, non_blocking=True, memory_format=mf)
        x_k = x_k.to(self.device, non_blocking=True, memory_format=mf)
        index = None if index is None else index.to(self.device, non_blocking=True)
        return x_q, x_k, index

    # --- the graph ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _on_side_stream(self):
        """Warm-up and capture run on a side stream (the PyTorch CUDA-graphs recipe)."""
        s = self._side_stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            yield
        torch.cuda.current_stream(self.device).wait_stream(s)

    def _capture(self, x_q, x_k, index):
        static = lambda x, **kw: torch.empty_like(x, device=self.device, **kw)  # noqa: E731
        self._static_in = [
            static(x_q, memory_format=self.memory_format).copy_(x_q),
            static(x_k, memory_format=self.memory_format).copy_(x_k),
            None if index is None else static(index).copy_(index),
        ]
        # The random streams as they were before capture: restored if it fails, so the eager
        # steps that follow draw what a run that never tried would draw.
        gens = self.model.generators()
        self._gen_states = [g.get_state() for g in gens]
        self._cuda_rng = torch.cuda.get_rng_state(self.device)
        graph = torch.cuda.CUDAGraph()
        for gen in gens:
            graph.register_generator_state(gen)
        self.optimizer.zero_grad(set_to_none=True)  # the gradients are allocated in the graph
        with self._on_side_stream():
            # thread_local: loader threads may touch CUDA while the step is being recorded
            with torch.cuda.graph(
                graph, stream=self._side_stream, capture_error_mode="thread_local"
            ):
                self._static_out = self.body(*self._static_in)
        self._graph = graph
        self._held = _hold_what_the_graph_reads()

    def _agree(self, failed: Exception | None) -> list[int]:
        """The ranks whose capture failed, the same list on every rank. Under DDP it is
        agreed over a gloo group of its own (a CPU collective), not over NCCL: a capture is
        a collective property of the NCCL operations it records, so a rank that failed
        while others recorded leaves NCCL's communicator out of step for any collective."""
        rank, world_size = world()
        if world_size == 1 or not dist.is_initialized():
            return [0] if failed is not None else []
        if getattr(self, "_agreement", None) is None:  # every rank gets here at one step
            self._agreement = dist.new_group(backend="gloo")
        flags = torch.zeros(world_size, dtype=torch.int32)
        flags[rank] = int(failed is not None)
        dist.all_reduce(flags, group=self._agreement)
        return [r for r, f in enumerate(flags.tolist()) if f]

    def _stop_or_give_up(self, failed: Exception | None, ranks: list[int]) -> None:
        """--cuda-graph on, or more than one rank: every rank stops with one line (NCCL
        must see every rank of a communicator capture alike, so no rank may go on alone,
        and an eager fallback after a partial capture is a path NCCL does not promise).
        One rank under auto: eager from here."""
        world_size = world()[1]
        if self.strict or world_size > 1:
            cause = f"{type(failed).__name__}: {failed}" if failed is not None else "see there"
            mode = "on" if self.strict else "auto"
            where = f" on rank(s) {', '.join(map(str, ranks))}" if world_size > 1 else ""
            detail = (
                "; under DDP every rank must capture alike, so every rank stops"
                if world_size > 1
                else ""
            )
            raise UsageError(
                f"--cuda-graph {mode}: the capture of the step failed{where} ({cause}){detail}: "
                "rerun with --cuda-graph off"
            ) from failed
        self._give_up_graph(failed)

    def _replay(self, x_q, x_k, index):
        sq, sk, si = self._static_in
        if x_q.shape != sq.shape or x_k.shape != sk.shape:
            raise UsageError(
                f"the captured step takes batches of shape {tuple(sq.shape)}, got "
                f"{tuple(x_q.shape)}: every batch must have the same shape (drop the last "
                "partial batch), or use --cuda-graph off"
            )
        sq.copy_(x_q, non_blocking=True)  # from the host: one copy, into the static buffer
        sk.copy_(x_k, non_blocking=True)
        if si is not None:
            si.copy_(index, non_blocking=True)
        self._graph.replay()
        return self._static_out

    def _give_up_graph(self, err: Exception) -> None:
        """After a failed capture: no graph, no gradients allocated in its pool, the random
        streams as before the attempt, and eager steps from here."""
        self.use_graph, self._graph, self._static_out, self._held = False, None, None, None
        self.optimizer.zero_grad(set_to_none=True)
        for gen, state in zip(self.model.generators(), getattr(self, "_gen_states", []),
                              strict=False):  # fmt: skip
            gen.set_state(state)
        if getattr(self, "_cuda_rng", None) is not None:
            torch.cuda.set_rng_state(self._cuda_rng, self.device)
        self.reason = f"capture failed ({type(err).__name__}: {err}); eager from here"
        if world()[0] == 0:
            print(f"step: eager ({self.reason})", flush=True)


def _hold_what_the_graph_reads():
    """References that keep alive, for the graph's life, the device memory its kernels read
    by address and that no tensor of the model holds: the momentum update's address tables
    (its caches would otherwise evict and free them while replays still read them)."""
    return momentum_update.hold_device_tables()


def _warmup_steps() -> int:
    """Eager steps before capture: 11 under DDP (its buckets are built during the first
    iterations; the PyTorch CUDA-graphs notes ask for 11), else 3."""
    return 11 if world()[1] > 1 else 3
