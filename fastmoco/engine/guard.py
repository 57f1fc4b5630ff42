"""Non-finite guard: a NaN or inf loss or gradient is caught within log_every steps.

The step stays free of host syncs: each step folds "was the loss or the gradient norm
non-finite" into a device flag (the first such step, -1 while none), and the trainer reads
it where it reads the loss anyway, at log boundaries, and before every checkpoint, so a
checkpoint never holds non-finite values. Then, by --on-nonfinite:

- stop (default): the run ends with NonFiniteError (exit code 3); the last good
  checkpoint stays the newest.
- skip: a step with a non-finite loss or gradient is dropped before the optimizer, the
  momentum update and the enqueue see it, as torch.amp.GradScaler drops an overflowing
  step, and counted. Deciding to drop needs the flag on the host: one sync per step, the
  price GradScaler pays too. Skipping is for rare bad batches: when the drops pass the
  limits of DropLimits (a share of a window, or a run in a row), the guard sets the flag
  as in stop mode, and the run ends with DroppedStepsError (exit code 3), "dropped X of
  the last Y steps", instead of reporting success over steps it never took.

With an fp16 GradScaler the scaled gradients may overflow by design (the scaler skips
those steps itself), so only the loss is checked then.
"""

from collections import deque
from dataclasses import dataclass

import torch

_CAUSES = (
    "Likely causes: a learning rate too high for the batch (lower --lr or add "
    "--warmup-epochs), fp16 overflow (use --amp-dtype bf16), or NaN/inf in the input data"
)


def _kept(checkpoint: str | None) -> str:
    if checkpoint:
        return f"the last good checkpoint, {checkpoint}, is kept"
    return "no checkpoint was written"


class NonFiniteError(RuntimeError):
    """Training produced NaN or inf; the run stopped without saving it."""

    exit_code = 3

    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(
            f"non-finite loss or gradient at step {step}; stopped without saving "
            f"({_kept(checkpoint)}). {_CAUSES}. --on-nonfinite skip drops such steps instead "
            "of stopping"
        )
        self.step, self.checkpoint = step, checkpoint


class DroppedStepsError(NonFiniteError):
    """--on-nonfinite skip gave up: the drops passed DropLimits (reason says which)."""

    def __init__(self, step: int, checkpoint: str | None, reason: str):
        RuntimeError.__init__(
            self,
            f"--on-nonfinite skip {reason} by step {step}; skipping is for rare bad batches, "
            f"so the run stopped without saving ({_kept(checkpoint)}). {_CAUSES}",
        )
        self.step, self.checkpoint, self.reason = step, checkpoint, reason


@dataclass(frozen=True)
class DropLimits:
    """When --on-nonfinite skip stops dropping and ends the run (exit code 3).

    - max_consecutive (10) drops in a row. A dropped step changes nothing, so once the
      weights themselves give NaN/inf every later step is dropped too, for ever; bad
      batches that come independently, at a rate p, come 10 in a row with probability
      p^10 (1e-10 at p = 10%, already a broken data set), so a healthy run is not stopped.
    - more than max_share (1/2) of the last `window` (100) steps, judged once min_steps
      (10) were seen (the last min(window, seen) then). Beyond half, most of the compute
      is thrown away and the steps kept are a biased sample of the data; an every-other-
      step failure, which never makes 10 in a row, is caught here, and a short run such
      as 9 drops of 10 steps too.
    """

    window: int = 100
    max_share: float = 0.5
    min_steps: int = 10
    max_consecutive: int = 10

    def __post_init__(self):
        if not (self.window >= 1 and 1 <= self.min_steps and self.max_consecutive >= 1):
            raise ValueError(f"DropLimits needs positive counts, got {self}")
        if not 0 < self.max_share < 1:
            raise ValueError(f"DropLimits.max_share must lie in (0, 1), got {self.max_share}")

    def check(self, dropped_in_window: int, seen_in_window: int, in_a_row: int) -> str | None:
        """Why the run must stop ("dropped X of the last Y steps"), or None."""
        if in_a_row >= self.max_consecutive:
            return f"dropped {in_a_row} steps in a row (the limit is {self.max_consecutive})"
        judged = seen_in_window >= min(self.min_steps, self.window)
        if judged and dropped_in_window > self.max_share * seen_in_window:
            return (
                f"dropped {dropped_in_window} of the last {seen_in_window} steps (more than "
                f"{self.max_share:.0%})"
            )
        return None


def bn_statistics(model: torch.nn.Module) -> list[torch.Tensor]:
    """The running statistics batch norm updates during the forward pass: a dropped step
    must leave them as they were too."""
    return [
        t
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
        for t in (m.running_mean, m.running_var)
        if t is not None
    ]


def all_finite(state, path: str = "") -> str | None:
    """The name of the first floating tensor in a (nested) state holding NaN or inf."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            return path or "a tensor"
        return None
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, list | tuple):
        items = enumerate(state)
    else:
        return None
    for k, v in items:
        bad = all_finite(v, f"{path}.{k}" if path else str(k))
        if bad is not None:
            return bad
    return None


class NonFiniteGuard:
    def __init__(
        self,
        device: torch.device,
        mode: str,
        first_step: int,
        check_grads: bool,
        buffers: list[torch.Tensor] = (),
        limits: DropLimits = DropLimits(),
    ):
        self.mode, self.check_grads, self.limits = mode, check_grads, limits
        self.buffers = list(buffers) if mode == "skip" else []
        self.saved = [torch.empty_like(b) for b in self.buffers]
        # the index of the next step, kept on the device so recording it needs no sync
        self.step_t = torch.tensor(first_step, dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.skipped = 0
        # skip mode, on the host (drop() syncs anyway): the last steps' outcomes
        self.first_step, self.seen = first_step, 0
        self.recent: deque[bool] = deque(maxlen=limits.window)  # True: dropped
        self.dropped_in_window = self.in_a_row = 0
        self.breach: str | None = None  # why the drops passed the limits (then sticky)
        self.breach_step: int | None = None  # the step it happened at, counted from 1

    def snapshot(self) -> None:
        """skip mode: copy the BN statistics before the forward pass (device copies)."""
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def observe(self, loss: torch.Tensor, params) -> torch.Tensor:
        """Fold this step's loss and gradients into the flag; returns "all finite" as a
        device bool (read only in skip mode). Call after backward, before the optimizer."""
        ok = torch.isfinite(loss.detach().float()).all()
        if self.check_grads:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                ok = ok & torch.isfinite(torch.stack([n.float() for n in norms]).sum())
        # in place: the same tensor across steps, as a captured CUDA graph needs
        self.first_bad.copy_(torch.where((self.first_bad < 0) & ~ok, self.step_t, self.first_bad))
        self.step_t += 1
        return ok

    def drop(self, ok: torch.Tensor) -> bool:
        """skip mode: whether this step must be dropped (a host sync); stop mode: never.

        When the drops pass the limits the flag is set to this step, as a non-finite step
        sets it in stop mode: the trainer stops where it reads the flag (log boundaries,
        before a save; all ranks together), and `breach` says why."""
        if self.mode != "skip":
            return False
        dropped = not bool(ok)
        self._count(dropped)
        if dropped:
            self.skipped += 1
            if self.buffers:
                torch._foreach_copy_(self.buffers, self.saved)
        if self.breach is None:
            self.breach = self.limits.check(self.dropped_in_window, len(self.recent), self.in_a_row)
            if self.breach is not None:
                self.breach_step = self.first_step + self.seen
                self.first_bad.fill_(self.breach_step - 1)  # an index, as observe records
            elif dropped:
                self.first_bad.fill_(-1)  # a dropped step leaves nothing behind to stop for
        return dropped

    def _count(self, dropped: bool) -> None:
        """The window's running count and the run of drops in a row, with this step."""
        if len(self.recent) == self.recent.maxlen:
            self.dropped_in_window -= self.recent[0]
        self.recent.append(dropped)
        self.dropped_in_window += dropped
        self.in_a_row = self.in_a_row + 1 if dropped else 0
        self.seen += 1

    def first_bad_step(self) -> int:
        """The first non-finite step since the start (-1 when none): a host sync."""
        return int(self.first_bad.item())
