r"""MoCo v3 (Chen, Xie, He 2021), shaped like the official moco-v3 builder.

    f_k.params = f_q.params
    for x in loader:
        x1, x2 = aug(x), aug(x)
        q1, q2 = g(f_q(x1)), g(f_q(x2))          # f_q: backbone + projector, g: predictor
        k1, k2 = f_k(x1), f_k(x2)                # momentum encoder, no gradient
        loss = ctr(q1, k2) + ctr(q2, k1)         # symmetric
        loss.backward(); update(f_q, g)          # LARS (ResNet) or AdamW (ViT)
        f_k = m * f_k + (1 - m) * f_q            # m: 0.99 -> 1 on a cosine (the trainer)

    ctr(q, k) = CrossEntropy(q_hat @ k_hat_all.T / T, labels = arange(N) + N * rank) * 2T

k_hat_all are the unit keys of the whole global batch (all ranks, gathered without
gradient): in-batch negatives, no queue. The 2T factor makes the gradient's scale
independent of T (the paper's Algorithm 1). ctr is fastmoco.ops.info_nce with queue=None
and, across ranks, the gathered keys as `all_keys` with this rank's rows at
offset = N * rank (fused on CUDA, logits never built). The keys are cast to the queries'
dtype (bf16 under AMP), so the fused kernel multiplies on the tensor cores.

Heads (official code, where it differs from the paper's "3-layer projector" for both):
ResNet: projector 2 layers 2048-4096-256, predictor 2 layers 256-4096-256 without a last BN;
ViT: projector 3 layers width-4096-4096-256, predictor 2 layers with a last BN. Linear
layers have no bias; BN + ReLU between layers; the projector ends in a BN without affine
(SimCLR's design). The momentum update runs after the optimizer step, with the momentum
of the next step: the same sequence as the official update at the start of each forward.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastmoco.errors import UsageError
from fastmoco.ops import info_nce, momentum_update_
from fastmoco.ops.distributed import all_gather_cat, world

from .backbones import ARCHS, backbone_from
from .base import ContrastiveMethod
from .vit import PATCH, VIT_ARCHS, build_vit


def build_mlp(num_layers: int, in_dim: int, mlp_dim: int, out_dim: int, last_bn: bool = True):
    """Linear (no bias) -> BN -> ReLU, num_layers times, the last one without BN/ReLU but
    with a BN without affine when last_bn (moco-v3's _build_mlp)."""
    layers = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else mlp_dim
        d_out = out_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


class ProjectedEncoder(nn.Module):
    """backbone -> projector: v3's momentum encoder f_k (kNN and export use `backbone`)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(x))


class PredictorEncoder(ProjectedEncoder):
    """backbone -> projector -> predictor: v3's query side, every trained parameter."""

    def __init__(self, backbone: nn.Module, head: nn.Module, predictor: nn.Module):
        super().__init__(backbone, head)
        self.predictor = predictor

    def forward(self, x):
        return self.predictor(self.head(self.backbone(x)))

    def base_parameters(self) -> list[torch.Tensor]:
        """backbone + projector, in encoder_k's order: the source of the momentum update."""
        return [p for n, p in self.named_parameters() if not n.startswith("predictor.")]


def v3_encoders(
    arch, *, dim, mlp_dim, small_images, image_size, frozen_patch_proj, zero_init_residual=False
) -> tuple[PredictorEncoder, ProjectedEncoder]:
    """(query encoder with predictor, momentum encoder), the latter a copy without predictor."""
    if isinstance(arch, str) and arch in VIT_ARCHS:
        backbone, feat = build_vit(arch, image_size=image_size, frozen_patch_proj=frozen_patch_proj)
        proj_layers, pred_last_bn = 3, True
    else:  # a ResNet name, or an nn.Module backbone (ResNet-style heads)
        backbone, feat = backbone_from(
            arch, small_images=small_images, image_size=image_size,
            zero_init_residual=zero_init_residual,
        )  # fmt: skip
        proj_layers, pred_last_bn = 2, False
    projector = build_mlp(proj_layers, feat, mlp_dim, dim)
    predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=pred_last_bn)
    enc_q = PredictorEncoder(backbone, projector, predictor)
    enc_k = ProjectedEncoder(copy.deepcopy(backbone), copy.deepcopy(projector))  # f_k = f_q
    enc_k.requires_grad_(False)
    return enc_q, enc_k


class MoCoV3(ContrastiveMethod):
    archs = ARCHS + VIT_ARCHS
    sync_bn = True  # global BN statistics across CUDA ranks, as the official code

    def __init__(
        self,
        arch: str = "resnet50",
        *,
        dim: int = 256,
        mlp_dim: int = 4096,
        m: float = 0.99,
        T: float = 1.0,
        small_images: bool = False,
        image_size: int = 224,
        frozen_patch_proj: bool = False,
        zero_init_residual: bool = False,
    ):
        """dim: output of projector and predictor; mlp_dim: their hidden width; m: initial
        momentum (the trainer's cosine schedule raises it to 1); T: 1.0 ResNet, 0.2 ViT;
        zero_init_residual: moco-v3 builds its ResNet so (the preset sets it). BN here is
        per device; the trainer converts both encoders to SyncBN on several CUDA ranks, as
        the official code does (sync_bn)."""
        super().__init__()
        self.m, self.T = m, T
        self.encoder_q, self.encoder_k = v3_encoders(
            arch,
            dim=dim,
            mlp_dim=mlp_dim,
            small_images=small_images,
            image_size=image_size,
            frozen_patch_proj=frozen_patch_proj,
            zero_init_residual=zero_init_residual,
        )

    # --- the registry's questions ----------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, *, num_samples: int = 1) -> "MoCoV3":
        return cls(
            cfg.arch,
            dim=cfg.dim,
            mlp_dim=4096 if cfg.mlp_hidden is None else cfg.mlp_hidden,  # v3's width
            m=cfg.moco_m,
            T=cfg.temperature,
            small_images=cfg.small_images,
            image_size=cfg.crop_size,
            frozen_patch_proj=cfg.frozen_patch_proj,
            zero_init_residual=cfg.zero_init_residual,
        )

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.arch in VIT_ARCHS and cfg.crop_size % PATCH:
            raise UsageError(
                f"--arch {cfg.arch} cuts {PATCH}x{PATCH} patches: --crop-size must be a multiple"
            )

    def summary(self) -> str:
        return "in-batch negatives (the global batch's keys), symmetric loss"

    def loss_ceiling(self, batch_size: int) -> float:
        """Each ctr of two is 2T ln(M) for M = the global batch's keys (module doc)."""
        return 2 * 2 * self.T * math.log(batch_size * world()[1])

    def extra_state(self) -> dict:
        """The momentum encoder by name, as the MoCo layout keeps encoder_k (export writes
        it as moco-v3's momentum_encoder)."""
        return {"encoder_k": self.encoder_k.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "encoder_k" in state:
            self.encoder_k.load_state_dict(state["encoder_k"])
        else:  # checkpoints written before: everything but encoder_q under "model"
            super().load_extra_state(state)

    # --- the algorithm ---------------------------------------------------------------------
    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor):
        """ctr(q, k) * 2T over the global batch's keys; (loss, rank of each positive)."""
        process_rank, world_size = world()
        k = k.to(q.dtype)  # bf16 queries under AMP: bf16 keys, so the dots use tensor cores
        if world_size == 1:
            loss, pos_rank = info_nce(q, k, None, self.T, return_stats=True)
        else:
            loss, pos_rank = info_nce(
                q, k, None, self.T, all_keys=all_gather_cat(k), offset=q.shape[0] * process_rank,
                return_stats=True,
            )  # fmt: skip
        return loss * (2 * self.T), pos_rank

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, index=None):
        """(loss, None, rank of q1's positives); nothing to keep for after_step."""
        q1, q2 = self.encoder_q(x1), self.encoder_q(x2)  # predictions: N x dim
        with torch.no_grad():
            k1 = F.normalize(self.encoder_k(x1).float(), dim=1)  # keys: N x dim
            k2 = F.normalize(self.encoder_k(x2).float(), dim=1)
        loss12, pos_rank = self.contrastive_loss(q1, k2)
        loss21, _ = self.contrastive_loss(q2, k1)
        return loss12 + loss21, None, pos_rank

    @torch.no_grad()
    def after_step(self, aux, index=None, ema_weight=None) -> None:
        """f_k <- m f_k + (1 - m) f_q (backbone and projector; the predictor has no twin)."""
        source = self.query_encoder().base_parameters()
        target = list(self.encoder_k.parameters())
        if ema_weight is None:
            momentum_update_(target, source, self.m)
        else:  # the schedule's 1 - m as it is: exact in float32 as m nears 1
            momentum_update_(target, source, ema_weight=ema_weight)
