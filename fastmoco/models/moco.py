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

symmetric (the official CIFAR-10 demo's --symmetric): both views serve as queries,
loss = InfoNCE(q1, k2, queue) + InfoNCE(q2, k1, queue) against the same queue, and both key
sets, cat([k1, k2]), are enqueued.

The momentum update runs after the optimizer step rather than before the next key forward:
the same sequence of updates, since at step 0 both encoders are equal. The queue is a plain
buffer of this module, not of the DDP-wrapped encoder, so DDP never re-broadcasts it.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastmoco.errors import UsageError
from fastmoco.ops import info_nce, momentum_update_
from fastmoco.ops.distributed import all_gather_cat, gather_and_enqueue_, world

from .backbones import backbone_from
from .base import ContrastiveMethod

QUEUE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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

    def __init__(
        self, arch, *, dim, mlp_hidden, small_images, bn_splits, feat_dim=None,
        zero_init_residual=False,
    ):  # fmt: skip
        super().__init__()
        self.backbone, feat_dim = backbone_from(
            arch,
            small_images=small_images,
            bn_splits=bn_splits,
            feat_dim=feat_dim,
            zero_init_residual=zero_init_residual,
        )
        self.feat_dim = feat_dim
        self.head = projection_head(feat_dim, dim, mlp_hidden)

    def forward(self, x):
        return self.head(self.backbone(x))


def encoder_args(cfg) -> dict:
    """Encoder's arguments from a TrainConfig, for the methods with one network (SimCLR,
    DrLIM, the memory bank)."""
    return dict(
        dim=cfg.dim, mlp_hidden=cfg.mlp_hidden, small_images=cfg.small_images,
        bn_splits=cfg.bn_splits,
    )  # fmt: skip


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
        symmetric: bool = False,
        zero_init_residual: bool = False,
    ):
        """arch: a backbone name, or an nn.Module mapping images to (N, D) features (timm,
        torchvision without fc, your own), D = feat_dim or found by one forward; the key
        encoder gets a copy. dim: feature dimension C; K: queue size; m: key-encoder
        momentum; T: temperature; mlp_hidden: 0 for v1's fc head, None for v2's MLP head of
        the backbone's width (or a width); bn_splits: BN groups per device, so shuffle BN is
        faithful on one device (8 simulates 8 GPUs); queue_dtype: float32, or bfloat16 under
        AMP (the fused InfoNCE then runs on bf16 tensor cores); symmetric: the CIFAR demo's
        two-way loss (module doc)."""
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.shuffle_bn, self.bn_splits, self.symmetric = shuffle_bn, bn_splits, symmetric
        enc = dict(dim=dim, mlp_hidden=mlp_hidden, small_images=small_images, bn_splits=bn_splits)
        enc["zero_init_residual"] = zero_init_residual
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
        # without the broadcast the official code does; .to() moves it.
        self.shuffle_gen = torch.Generator().manual_seed(seed)

    # --- the registry's questions ----------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, *, num_samples: int = 1) -> "MoCo":
        queue_dtype = cfg.queue_dtype
        if queue_dtype == "auto":  # the AMP dtype under --amp, else the official fp32
            queue_dtype = cfg.amp_dtype if cfg.amp else "fp32"
        return cls(
            cfg.arch,
            dim=cfg.dim,
            K=cfg.queue_size,
            m=cfg.moco_m,
            T=cfg.temperature,
            mlp_hidden=cfg.mlp_hidden,
            small_images=cfg.small_images,
            shuffle_bn=cfg.shuffle_bn,
            bn_splits=cfg.bn_splits,
            seed=cfg.seed,
            queue_dtype=QUEUE_DTYPES[queue_dtype],
            symmetric=cfg.symmetric,
            zero_init_residual=cfg.zero_init_residual,
        )

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        per_step = cfg.batch_size * (2 if cfg.symmetric else 1)  # keys enqueued per step
        if cfg.queue_size <= per_step:
            raise UsageError(
                f"--queue-size {cfg.queue_size} must be larger than the {per_step} keys a step "
                f"enqueues (--batch-size {cfg.batch_size}"
                f"{', twice with --symmetric' if cfg.symmetric else ''}): the queue holds the "
                "keys of many past batches; raise --queue-size"
            )

    @classmethod
    def check_data(cls, cfg, n_images: int, log=print) -> None:
        """The queue against the training set: an image's own key from its previous
        appearance sits among its negatives once K nears the set's size."""
        share = cfg.queue_size / n_images
        if cfg.queue_size >= n_images and not cfg.allow_repeated_negatives:
            raise UsageError(
                f"--queue-size {cfg.queue_size} is at least the {n_images} training images: "
                "every image's own key from its last appearance would be among its negatives, "
                f"and the pretext task stops being learnable; use --queue-size below "
                f"{n_images // 4} (or pass --allow-repeated-negatives)"
            )
        if share > 0.25:
            log(
                f"warning: --queue-size {cfg.queue_size} is {share:.0%} of the {n_images} "
                "training images; above a quarter, stale keys of the same images crowd the "
                "negatives and the loss can climb toward ln K (the official CIFAR demo uses 8%)",
                flush=True,
            )

    def summary(self) -> str:
        return f"K={self.K} queue{', symmetric loss' if self.symmetric else ''}"

    def notices(self, world_size: int) -> list[str]:
        """Shuffle BN mixes keys across BN groups; one device with one group has nothing to
        mix, so the keys' statistics are the queries' batch's: the leak it exists to stop."""
        if not self.shuffle_bn or world_size > 1 or self.bn_splits > 1:
            return []
        return [
            "warning: shuffle BN on one device with one BN group shuffles nothing; pass "
            "--bn-splits 8 to simulate 8 GPUs as the official CIFAR-10 demo does (or "
            "--no-shuffle-bn to say it is meant)"
        ]

    def loss_ceiling(self, batch_size: int) -> float:
        return (2 if self.symmetric else 1) * math.log(self.K + 1)

    def extra_state(self) -> dict:
        """The official v1/v2 pieces by name (checkpoint_io reads and writes them)."""
        return {"encoder_k": self.encoder_k.state_dict(), "queue": self.queue,
                "queue_ptr": self.queue_ptr}  # fmt: skip

    def load_extra_state(self, state: dict) -> None:
        self.encoder_k.load_state_dict(state["encoder_k"])
        self.queue.copy_(state["queue"])
        self.queue_ptr.copy_(state["queue_ptr"])

    # --- Algorithm 1 -----------------------------------------------------------------------
    @torch.no_grad()
    def momentum_update_key_encoder(self, ema_weight: float | torch.Tensor | None = None) -> None:
        """f_k <- m f_k + (1 - m) f_q; ema_weight: 1 - m, None for this model's m."""
        if ema_weight is None:
            momentum_update_(self.encoder_k, self.query_encoder(), self.m)
        else:  # a schedule's 1 - m, passed as it is (exact as m nears 1)
            momentum_update_(self.encoder_k, self.query_encoder(), ema_weight=ema_weight)

    @torch.no_grad()
    def dequeue_and_enqueue(self, k: torch.Tensor) -> None:
        """Every rank enqueues the keys of the whole global batch, so queues stay identical."""
        gather_and_enqueue_(self.queue, self.queue_ptr, k)

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

    def _loss(self, im_q: torch.Tensor, k: torch.Tensor):
        """(InfoNCE of f_q(im_q) against k and the queue, the positives' ranks)."""
        q = self.encoder_q(im_q)  # queries: N x C
        if self.queue.dtype != torch.float32:
            # a bf16 (fp16) queue: queries and keys in its dtype too, so that the fused
            # InfoNCE multiplies on the tensor cores rather than in its mixed-dtype fp32 path
            q, k = q.to(self.queue.dtype), k.to(self.queue.dtype)
        return info_nce(q, k, self.queue, self.T, return_stats=True)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, index=None):
        """Returns (loss, keys, pos_rank): the InfoNCE loss, this rank's unit keys to
        enqueue after the optimizer step (N x C, or 2N x C when symmetric, in the queue's
        dtype), and each query's positive rank among the negatives (0: a top-1 hit;
        symmetric: the first view's) without materialising the N x (1+K) logits."""
        if not self.symmetric:
            k = self._keys(im_k)  # keys: N x C
            loss, pos_rank = self._loss(im_q, k)
            return loss, k.to(self.queue.dtype), pos_rank
        k1, k2 = self._keys(im_q), self._keys(im_k)
        loss_12, pos_rank = self._loss(im_q, k2)
        loss_21, _ = self._loss(im_k, k1)
        return loss_12 + loss_21, torch.cat([k1, k2]).to(self.queue.dtype), pos_rank

    @torch.no_grad()
    def after_step(self, k: torch.Tensor, index=None, ema_weight=None) -> None:
        """The paper's last two lines: momentum update of f_k, then enqueue the keys."""
        self.momentum_update_key_encoder(ema_weight)
        self.dequeue_and_enqueue(k)
