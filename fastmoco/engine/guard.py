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
  price GradScaler pays too.

With an fp16 GradScaler the scaled gradients may overflow by design (the scaler skips
those steps itself), so only the loss is checked then.
"""

import torch

MODES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training produced NaN or inf; the run stopped without saving it."""

    exit_code = 3

    def __init__(self, step: int, checkpoint: str | None):
        kept = (
            f"the last good checkpoint, {checkpoint}, is kept"
            if checkpoint
            else "no checkpoint was written"
        )
        super().__init__(
            f"non-finite loss or gradient at step {step}; stopped without saving ({kept}). "
            "Likely causes: a learning rate too high for the batch (lower --lr or add "
            "--warmup-epochs), fp16 overflow (use --amp-dtype bf16), or NaN/inf in the input "
            "data. --on-nonfinite skip drops such steps instead of stopping"
        )
        self.step, self.checkpoint = step, checkpoint


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
    ):
        self.mode, self.check_grads = mode, check_grads
        self.buffers = list(buffers) if mode == "skip" else []
        self.saved = [torch.empty_like(b) for b in self.buffers]
        # the index of the next step, kept on the device so recording it needs no sync
        self.step_t = torch.tensor(first_step, dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.skipped = 0

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
        """skip mode: whether this step must be dropped (a host sync); stop mode: never."""
        if self.mode != "skip" or bool(ok):
            return False
        self.skipped += 1
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved)
        self.first_bad.fill_(-1)  # a dropped step leaves nothing behind to stop for
        return True

    def first_bad_step(self) -> int:
        """The first non-finite step since the start (-1 when none): a host sync."""
        return int(self.first_bad.item())
