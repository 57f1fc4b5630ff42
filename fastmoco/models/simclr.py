r"""One network for both views: SimCLR end-to-end (Chen et al. 2020) and DrLIM (Hadsell,
Chopra, LeCun 2006), the two methods here without a key encoder or a store of keys.

SimCLR ("end-to-end" in MoCo's Fig. 2a): both views go through the same encoder (backbone +
MLP head) with gradients, and each view's negatives are the other 2N - 2 views of the batch
(nt_xent). The number of negatives K = 2N - 2 is tied to the batch: the limit MoCo's queue
removes. Negatives are those of this device's batch (the official SimCLR gathers views from
all devices with gradient; here each rank's loss sees its own N images).

DrLIM: the same encoder, unit embeddings z; positives are the two views of an image (y=0),
negatives pair view 1 of image i with view 2 of image (i + s) mod N for a random shift
s in 1..N-1 (y=1), so every image is in one pair of each kind; loss =
contrastive_margin_loss over the 2N pairs with the paper's margin.
"""

import math

import torch
import torch.nn.functional as F

from fastmoco.ops import contrastive_margin_loss, nt_xent

from .base import ContrastiveMethod
from .moco import Encoder, encoder_args


class SimCLR(ContrastiveMethod):
    def __init__(
        self,
        arch: str = "resnet50",
        *,
        dim: int = 128,
        T: float = 0.5,
        mlp_hidden: int = 2048,
        small_images: bool = False,
        bn_splits: int = 1,
    ):
        """T: 0.5 in SimCLR; mlp_hidden: the head's hidden width (SimCLR's 2-layer head)."""
        super().__init__()
        self.T = T
        self.encoder_q = Encoder(
            arch, dim=dim, mlp_hidden=mlp_hidden, small_images=small_images, bn_splits=bn_splits
        )

    @classmethod
    def from_config(cls, cfg, *, num_samples: int = 1) -> "SimCLR":
        return cls(cfg.arch, T=cfg.temperature, **encoder_args(cfg))

    def summary(self) -> str:
        return "in-batch negatives: the other 2N - 2 views"

    def loss_ceiling(self, batch_size: int) -> float:
        return math.log(2 * batch_size - 1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, index=None):
        """(loss over the 2N views, None, rank of view 1's positives among 2N - 2)."""
        z1, z2 = self.encoder_q(x1), self.encoder_q(x2)  # N x dim each
        loss, pos_rank = nt_xent(z1, z2, self.T, return_stats=True)
        return loss, None, pos_rank[: x1.shape[0]]


class DrLIM(ContrastiveMethod):
    random_streams = ("gen",)

    def __init__(
        self,
        arch: str = "resnet50",
        *,
        dim: int = 128,
        margin: float = 1.0,
        mlp_hidden: int = 2048,
        small_images: bool = False,
        bn_splits: int = 1,
        seed: int = 0,
    ):
        """margin: how far apart (on the unit sphere, at most 2) dissimilar pairs are pushed."""
        super().__init__()
        self.margin = margin
        self.encoder_q = Encoder(
            arch, dim=dim, mlp_hidden=mlp_hidden, small_images=small_images, bn_splits=bn_splits
        )
        self.gen = torch.Generator().manual_seed(seed)  # the negative pairs' shift

    @classmethod
    def from_config(cls, cfg, *, num_samples: int = 1) -> "DrLIM":
        return cls(cfg.arch, margin=cfg.margin, seed=cfg.seed, **encoder_args(cfg))

    def summary(self) -> str:
        return f"pairs: view 2 of another image as the dissimilar one, margin {self.margin}"

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, index=None):
        """(loss over N similar + N dissimilar pairs, None, 1 where the negative is closer)."""
        N = x1.shape[0]
        z1 = F.normalize(self.encoder_q(x1).float(), dim=1)  # N x dim
        z2 = F.normalize(self.encoder_q(x2).float(), dim=1)
        # a device-side shift: no host sync
        shift = torch.randint(1, max(N, 2), (1,), device=z1.device, generator=self.gen)
        other = (torch.arange(N, device=z1.device) + shift) % N
        z2_neg = z2[other]  # view 2 of another image
        y = torch.cat([z1.new_zeros(N), z1.new_ones(N)])  # 0: similar, 1: dissimilar
        loss = contrastive_margin_loss(torch.cat([z1, z1]), torch.cat([z2, z2_neg]), y, self.margin)
        with torch.no_grad():  # 1 where the dissimilar pair is the closer: a pair-ranking miss
            pos_rank = ((z1 - z2_neg).norm(dim=1) < (z1 - z2).norm(dim=1)).long()
        return loss, None, pos_rank
