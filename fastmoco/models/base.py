"""The one interface every method implements, which the training step and the trainer drive.

    method = Method.from_config(cfg, num_samples=...)   # the registry in models/__init__.py
    loss, aux, pos_rank = method(x_q, x_k, index)       # forward, under autocast
    loss.backward(); optimizer.step()                    # the step object (engine/step.py)
    method.after_step(aux, index, ema_weight)            # key encoder / queue / bank update

forward returns the loss, whatever the method keeps for its update after the optimizer
step (MoCo: the keys to enqueue; the memory bank: the features to store; others: None),
and each query's positive rank among its negatives (pos_rank == 0 is a top-1 hit), or None
for a method that has no ranking to report.

Everything the engine must know about a method is said here, on the class, so that the
trainer, the step, the CLI and checkpoint I/O never name a method (solo-learn's pattern):
  check_config(cfg)      errors a user can fix in the config, before anything starts
  check_data(cfg, n)     errors and warnings that need the training set's size
  needs_index            forward reads each sample's dataset index (the memory bank)
  sync_bn                both encoders use SyncBatchNorm across CUDA ranks (MoCo v3)
  extra_state() / load_extra_state(state)   what a checkpoint keeps besides encoder_q
  summary(), notices(world_size), loss_ceiling(batch_size)   what the run prints and plots
Random streams (shuffle BN's permutation, sampled negatives) are torch.Generators named in
`random_streams`: `.to(device)` moves them (re-seeded from their seed), checkpoints save
them, and a captured CUDA graph registers them so each replay draws anew.
"""

import torch
from torch import nn

from fastmoco.errors import UsageError

from .backbones import ARCHS


class ContrastiveMethod(nn.Module):
    """Base of every method: encoder_q holds every trained parameter (the trainer wraps it
    in DDP); subclasses define from_config(), forward() and, when they keep state,
    after_step()."""

    needs_index: bool = False
    sync_bn: bool = False
    archs: tuple[str, ...] = ARCHS  # the backbone names it builds
    random_streams: tuple[str, ...] = ()  # attribute names of torch.Generator members

    # --- built from a TrainConfig --------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, *, num_samples: int = 1) -> "ContrastiveMethod":
        """The method as the config describes it, on the CPU. num_samples: the training
        set's size (the memory bank's rows)."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise a UsageError for a config this method cannot train."""
        if cfg.arch not in cls.archs:
            from fastmoco.models import METHODS  # the registry, which imports this module

            others = [name for name, m in METHODS.items() if cfg.arch in m.archs]
            where = f"; {cfg.arch} is for --method {' or '.join(others)}" if others else ""
            raise UsageError(
                f"--arch {cfg.arch}: --method {cfg.method} builds {', '.join(cls.archs)}{where}"
            )

    @classmethod
    def check_data(cls, cfg, n_images: int, log=print) -> None:
        """Checks that need the training set's size (n_images)."""

    # --- what the run says about it --------------------------------------------------------
    def summary(self) -> str:
        """The negatives, for the run's first line."""
        return ""

    def notices(self, world_size: int) -> list[str]:
        """Warnings about this configuration, printed before the first step."""
        return []

    def loss_ceiling(self, batch_size: int) -> float | None:
        """The loss of features that tell nothing apart (ln of the candidates), for the
        curves; None when the loss has no such level. batch_size: per rank."""
        return None

    # --- checkpoints ---------------------------------------------------------------------
    def extra_state(self) -> dict:
        """What a checkpoint keeps besides encoder_q: by default every other tensor of the
        module (key encoder, bank) as one state dict under "model"."""
        rest = {k: v for k, v in self.state_dict().items() if not k.startswith("encoder_q.")}
        return {"model": rest} if rest else {}

    def load_extra_state(self, state: dict) -> None:
        """Load what extra_state() saved; a mismatch is a UsageError naming the keys."""
        saved = state.get("model", {})
        missing, unexpected = self.load_state_dict(saved, strict=False)
        missing = [k for k in missing if not k.startswith("encoder_q.")]
        if missing or unexpected:
            raise UsageError(
                f"the checkpoint was written by another method or model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); resume with the config it was trained with"
            )

    # --- the step --------------------------------------------------------------------------
    def query_encoder(self) -> nn.Module:
        """encoder_q without a DDP wrapper: kNN, export and checkpoints use it."""
        return getattr(self.encoder_q, "module", self.encoder_q)

    def generators(self) -> list[torch.Generator]:
        return [getattr(self, name) for name in self.random_streams]

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor, index: torch.Tensor | None = None):
        """(loss, aux for after_step, rank of each positive or None); see the module doc."""
        raise NotImplementedError

    def after_step(self, aux, index=None, ema_weight: float | torch.Tensor | None = None) -> None:
        """The method's update after the optimizer step. ema_weight: 1 - m of the momentum
        update, None for the method's own constant m (a 0-d device tensor when a schedule
        moves it: held as 1 - m, which float32 keeps exact as m nears 1). Default: nothing."""

    # --- devices ---------------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        """.to(), .cuda(), .cpu() move parameters and buffers (nn.Module) and then the random
        streams to their device, re-seeded from their seed (a generator cannot move)."""
        out = super()._apply(fn, *args, **kwargs)
        tensor = next(iter(self.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.buffers()), None)
        if tensor is not None:
            for name in self.random_streams:
                gen = getattr(self, name, None)
                if gen is not None and gen.device != tensor.device:
                    seeded = torch.Generator(device=tensor.device).manual_seed(gen.initial_seed())
                    setattr(self, name, seeded)
        return out

    def to_device(self, device: torch.device):
        """self.to(device): kept for code written before .to() moved the random streams."""
        return self.to(device)
