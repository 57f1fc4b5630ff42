"""MoCo v1/v2 (He et al. 2019; Chen et al. 2020), shaped like the paper's Algorithm 1.

    f_k.params = f_q.params                      # __init__
    for x in loader:
        x_q, x_k = aug(x), aug(x)
        q = f_q.forward(x_q)                     # forward(): queries, NxC
        k = f_k.forward(x_k).detach()            # _keys(): shuffle BN, keys, NxC
        loss = InfoNCE(q, k, queue, T)           # fastmoco.ops.info_nce, logits never built
        loss.backward(); update(f_q.params)      # the trainer
        f_k.params = m*f_k.params + (1-m)*f_q.params   # momentum_update_key_encoder()
        enqueue(queue, k); dequeue(queue)        # dequeue_and_enqueue()

The momentum update runs after the optimizer step rather than before the next key forward:
the same sequence of updates, since at step 0 both encoders are equal. The queue is a plain
buffer of this module, not of the DDP-wrapped encoder, so DDP never re-broadcasts it.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fastmoco.ops import enqueue_, info_nce, momentum_update_
from fastmoco.ops.distributed import all_gather_cat, world

from .backbones import backbone_from
from .base import ContrastiveMethod


def projection_head(in_dim: int, dim: int, mlp_hidden: int | None) -> nn.Module:
    """v1 (mlp_hidden 0): one fc layer to `dim`; v2: fc-ReLU-fc, no BN (MoCo v2, Sec. 2), of
    hidden width mlp_hidden, None = in_dim (the official v2's dim_mlp = fc.in_features:
    2048 for ResNet-50, 512 for ResNet-18/34)."""
    mlp_hidden = in_dim if mlp_hidden is None else mlp_hidden
    if mlp_hidden <= 0:
        return nn.Linear(in_dim, dim)
    return nn.Sequential(
        nn.Linear(in_dim, mlp_hidden), nn.ReLU(inplace=True), nn.Linear(mlp_hidden, dim)
    )


class Encoder(nn.Module):
    """backbone -> projection head; kNN and linear eval use `backbone` alone. arch: a name,
    or an nn.Module used as the backbone (see backbones.backbone_from)."""

    def __init__(self, arch, *, dim, mlp_hidden, small_images, bn_splits, feat_dim=None):
        super().__init__()
        self.backbone, feat_dim = backbone_from(
            arch, small_images=small_images, bn_splits=bn_splits, feat_dim=feat_dim
        )
        self.feat_dim = feat_dim
        self.head = projection_head(feat_dim, dim, mlp_hidden)

    def forward(self, x):
        return self.head(self.backbone(x))


class MoCo(ContrastiveMethod):
    random_streams = ("shuffle_gen",)

    def __init__(
        self,
        arch: str | nn.Module = "resnet50",
        *,
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.07,
        mlp_hidden: int | None = 0,
        small_images: bool = False,
        shuffle_bn: bool = True,
        bn_splits: int = 1,
        seed: int = 0,
        feat_dim: int | None = None,
        queue_dtype: torch.dtype = torch.float32,
    ):
        """arch: a backbone name, or an nn.Module mapping images to (N, D) features (timm,
        torchvision without fc, your own), D = feat_dim or found by one forward; the key
        encoder gets a copy. dim: feature dimension C; K: queue size; m: key-encoder
        momentum; T: temperature; mlp_hidden: 0 for v1's fc head, None for v2's MLP head of
        the backbone's width (or a width); bn_splits: BN groups per device, so shuffle BN is
        faithful on one device (8 simulates 8 GPUs); queue_dtype: float32, or bfloat16 under
        AMP (the fused InfoNCE then runs on bf16 tensor cores)."""
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.shuffle_bn = shuffle_bn
        enc = dict(dim=dim, mlp_hidden=mlp_hidden, small_images=small_images, bn_splits=bn_splits)
        self.encoder_q = Encoder(arch, feat_dim=feat_dim, **enc)
        feat_dim = self.encoder_q.feat_dim  # probed once
        key_arch = copy.deepcopy(arch) if isinstance(arch, nn.Module) else arch
        self.encoder_k = Encoder(key_arch, feat_dim=feat_dim, **enc)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        self.encoder_k.requires_grad_(False)

        # queue: K x C of unit keys (the paper's C x K, transposed so that rows are keys)
        queue = F.normalize(torch.randn(K, dim), dim=1).to(queue_dtype)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # Seeded identically on every rank, so all ranks draw the same shuffle permutation
        # without the broadcast the official code does; to_device() moves it.
        self.shuffle_gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def momentum_update_key_encoder(self, m: float | torch.Tensor | None = None) -> None:
        momentum_update_(self.encoder_k, self.query_encoder(), self.m if m is None else m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, k: torch.Tensor) -> None:
        """Every rank enqueues the keys of the whole global batch, so queues stay identical."""
        enqueue_(self.queue, self.queue_ptr, all_gather_cat(k))

    @torch.no_grad()
    def _keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Shuffle BN: encode the key images in a random order across all devices' BN groups.

        The permutation is over the global batch (gather, permute, take this rank's slice),
        so no BN group sees the same samples as the query encoder's groups and the model
        cannot cheat through batch statistics (MoCo Sec. 3.3).
        """
        if not self.shuffle_bn:
            return F.normalize(self.encoder_k(im_k).float(), dim=1)
        rank, world_size = world()
        B = im_k.shape[0]
        x_all = all_gather_cat(im_k)
        perm = torch.randperm(x_all.shape[0], device=im_k.device, generator=self.shuffle_gen)
        mine = perm.view(world_size, B)[rank]
        k_mine = F.normalize(self.encoder_k(x_all[mine]).float(), dim=1)
        k_all = all_gather_cat(k_mine)  # k_all[j] is the key of sample perm[j]
        unshuffle = torch.argsort(perm)
        return k_all[unshuffle].view(world_size, B, -1)[rank]

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, index=None):
        """Returns (loss, k, rank): the InfoNCE loss, this rank's unit keys (N x C, in the
        queue's dtype, to enqueue after the optimizer step), and the positive's rank among
        the negatives (rank == 0 is a top-1 hit) without materialising the N x (1+K) logits."""
        q = self.encoder_q(im_q)  # queries: N x C
        k = self._keys(im_k)  # keys: N x C
        if self.queue.dtype != torch.float32:
            # a bf16 (fp16) queue: queries and keys in its dtype too, so that the fused
            # InfoNCE multiplies on the tensor cores rather than in its mixed-dtype fp32 path
            q, k = q.to(self.queue.dtype), k.to(self.queue.dtype)
        loss, rank = info_nce(q, k, self.queue, self.T, return_stats=True)
        return loss, k, rank

    @torch.no_grad()
    def after_step(self, k: torch.Tensor, index=None, momentum=None) -> None:
        """The paper's last two lines: momentum update of f_k, then enqueue the keys."""
        self.momentum_update_key_encoder(momentum)
        self.dequeue_and_enqueue(k)
