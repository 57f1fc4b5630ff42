"""Public, differentiable, device-dispatching MoCo ops.

    info_nce(q, k, queue, temperature)     fused normalize + logits + InfoNCE, fwd and bwd
    momentum_update_(target, source, m)    key-encoder EMA over every tensor at once
    enqueue_(queue, ptr, keys)             circular queue write, pointer stays on the device
    nt_xent(z1, z2, temperature)           SimCLR's loss over 2N views, same kernels as info_nce
    contrastive_margin_loss(x1, x2, y, m)  DrLIM's pair loss: pull similar, push dissimilar to m

`fastmoco.ops.reference` holds the plain official formulas these are tested against.
"""

from . import reference
from .contrastive_margin_loss import contrastive_margin_loss
from .enqueue import enqueue_
from .info_nce import info_nce
from .momentum_update import momentum_update_
from .nt_xent import nt_xent

__all__ = [
    "contrastive_margin_loss",
    "enqueue_",
    "info_nce",
    "momentum_update_",
    "nt_xent",
    "reference",
]
