"""The one interface every method implements, which the training step drives.

    loss, aux, rank = method(x_q, x_k, index)      # forward, under autocast
    loss.backward(); optimizer.step()              # the step object (engine/step.py)
    method.after_step(aux, index, momentum)        # key encoder / queue / bank update

forward returns the loss, whatever the method keeps for its update after the optimizer
step (MoCo: the keys to enqueue; the memory bank: the features to store; others: None),
and each query's positive rank among its negatives (rank == 0 is a top-1 hit).
`needs_index`: the method reads each sample's dataset index (the memory bank); the step
then passes it, else None. Random streams (shuffle BN's permutation, sampled negatives)
are torch.Generators named in `random_streams`: to_device moves them, checkpoints save
them, and a captured CUDA graph registers them so each replay draws anew.
"""

import torch
from torch import nn


class ContrastiveMethod(nn.Module):
    """Base of every method: encoder_q holds every trained parameter (the trainer wraps it
    in DDP); subclasses define forward() and, when they keep state, after_step()."""

    needs_index: bool = False
    random_streams: tuple[str, ...] = ()  # attribute names of torch.Generator members

    def query_encoder(self) -> nn.Module:
        """encoder_q without a DDP wrapper: kNN, export and checkpoints use it."""
        return getattr(self.encoder_q, "module", self.encoder_q)

    def to_device(self, device: torch.device):
        """Move parameters, buffers and the random streams (re-seeded with their seed)."""
        self.to(device)
        for name in self.random_streams:
            gen = getattr(self, name)
            if gen.device != torch.device(device):
                setattr(self, name, torch.Generator(device=device).manual_seed(gen.initial_seed()))
        return self

    def generators(self) -> list[torch.Generator]:
        return [getattr(self, name) for name in self.random_streams]

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor, index: torch.Tensor | None = None):
        """(loss, aux for after_step, rank of each positive); see the module doc."""
        raise NotImplementedError

    def after_step(self, aux, index=None, momentum: float | torch.Tensor | None = None) -> None:
        """The method's update after the optimizer step; momentum None: the method's own m
        (a 0-d device tensor when a schedule changes it). Default: nothing to update."""
