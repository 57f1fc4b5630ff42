r"""Memory bank (Wu, Xiong, Yu, Lin 2018, "InstDisc"), the mechanism of MoCo's Fig. 2b.

    bank: one unit feature v_i per dataset sample, random at start
    for x, i in loader:
        q = normalize(f_q(aug(x)))                   # N x C, the only encoder
        k+ = bank[i]                                 # positive: the sample's stored feature
        negatives = bank[randint(num_samples, K)]    # K rows sampled uniformly
        loss = InfoNCE(q, k+, negatives, T)          # fastmoco.ops.info_nce
        loss.backward(); update(f_q)
        bank[i] = normalize(m * bank[i] + (1 - m) * q)   # m = 0.5, after the step

There is no key encoder: the keys are the encoder's own features from the last time each
sample was seen, up to an epoch old, which is the inconsistency MoCo's key encoder fixes.
Wu et al. train with NCE; as in MoCo's comparison the loss here is InfoNCE over K sampled
negatives. The second view of the two-view loader is not used (one view per sample per
step, as in InstDisc). The bank is a buffer: checkpoints carry it; under DDP every rank
applies the update of the whole global batch (gathered), so the banks stay identical.
"""

import math

import torch
import torch.nn.functional as F

from fastmoco.ops import info_nce
from fastmoco.ops.distributed import all_gather_cat

from .base import ContrastiveMethod
from .moco import Encoder, encoder_args


class MemoryBank(ContrastiveMethod):
    needs_index = True  # the step passes each batch's dataset indices
    random_streams = ("gen",)  # the sampled negatives

    def __init__(
        self,
        arch: str = "resnet50",
        *,
        num_samples: int,
        dim: int = 128,
        K: int = 4096,
        bank_m: float = 0.5,
        T: float = 0.07,
        mlp_hidden: int = 0,
        small_images: bool = False,
        bn_splits: int = 1,
        seed: int = 0,
    ):
        """num_samples: rows of the bank (the training set's size); K: negatives per step;
        bank_m: momentum of a row's update (InstDisc's 0.5); T: InstDisc's 0.07."""
        super().__init__()
        self.K, self.bank_m, self.T = K, bank_m, T
        self.encoder_q = Encoder(
            arch, dim=dim, mlp_hidden=mlp_hidden, small_images=small_images, bn_splits=bn_splits
        )
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("bank", F.normalize(torch.randn(num_samples, dim, generator=g), dim=1))
        # Seeded identically on every rank: all ranks sample the same negatives.
        self.gen = torch.Generator().manual_seed(seed + 1)

    @classmethod
    def from_config(cls, cfg, *, num_samples: int = 1) -> "MemoryBank":
        return cls(
            cfg.arch, num_samples=num_samples, K=cfg.queue_size, bank_m=cfg.bank_m,
            T=cfg.temperature, seed=cfg.seed, **encoder_args(cfg),
        )  # fmt: skip

    def summary(self) -> str:
        return f"K={self.K} negatives sampled from a bank of {self.bank.shape[0]} features"

    def loss_ceiling(self, batch_size: int) -> float:
        return math.log(self.K + 1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, index: torch.Tensor | None = None):
        """(loss, unit features q to store in after_step, rank of the positive among K)."""
        q = self.encoder_q(x1)  # N x C
        positives = self.bank[index]  # N x C, a copy: the update cannot reach it
        draw = torch.randint(
            0, self.bank.shape[0], (self.K,), device=self.bank.device, generator=self.gen
        )
        negatives = self.bank[draw]  # K x C
        loss, pos_rank = info_nce(q, positives, negatives, self.T, return_stats=True)
        return loss, F.normalize(q.detach().float(), dim=1), pos_rank

    @torch.no_grad()
    def after_step(self, q: torch.Tensor, index: torch.Tensor, ema_weight=None) -> None:
        """bank[i] <- normalize(bank_m * bank[i] + (1 - bank_m) * q_i) for the global batch."""
        q, index = all_gather_cat(q), all_gather_cat(index)
        mixed = self.bank[index] * self.bank_m + q * (1 - self.bank_m)
        self.bank[index] = F.normalize(mixed, dim=1)
