r"""Optimizers: SGD (MoCo v1/v2), LARS (MoCo v3, ResNet) and AdamW (MoCo v3, ViT), and the
schedules of the learning rate and of the key encoder's momentum.

LARS (You et al. 2017) as MoCo v3's official code writes it, per parameter tensor w with
gradient g, for tensors with more than one dimension (weights of convs and linears):

    d     = g + wd * w
    ratio = eta * ||w|| / ||d||     (1 where ||w|| or ||d|| is 0; eta = trust_coefficient)
    d     = ratio * d
and for 1-d tensors (biases, BN/LN gammas and betas) d = g: neither the trust ratio nor
weight decay (the paper's exclusion). Then heavy-ball momentum and the step:

    mu = momentum * mu + d;   w = w - lr * mu

Every line runs as one torch._foreach_* call over all tensors of a group (the norms of all
tensors in one kernel, the ratios as one stacked tensor), not a Python loop per tensor.

The learning rate may be a 0-d tensor on the parameters' device (the training step keeps
it there, so a schedule changes it without a host read and a CUDA graph can replay the
step): LARS multiplies by it; on CUDA, SGD and AdamW are torch's fused implementations,
which read a tensor lr on the device (the foreach SGD would turn it into a Python scalar)
and keep AdamW's step count there. `reads_lr_tensor` says whether an optimizer does.
apex's fused SGD/Adam, which take a Python lr, are used only with graph_safe=False.

Schedules, as the official scripts compute them (the values the step writes each step):

    lr(e) = base * e / warmup                                   e < warmup
          = base * 0.5 (1 + cos(pi (e - warmup) / (epochs - warmup)))   cosine
          = base * 0.1 ^ #{s in lr_steps : e >= s}             step
    e = the epoch at the start of the step: whole (main_moco.py of v1/v2 and the CIFAR demo
        set the lr once per epoch) or fractional, step / steps_per_epoch (moco-v3's
        adjust_learning_rate(epoch + i / iters_per_epoch)); so the first step's lr is 0 in a
        warm-up. base: TrainConfig.effective_lr() (--lr-scaling).
    1 - m(t) = 0.5 (1 + cos(pi t / epochs)) (1 - m0)            moco-v3's momentum schedule
             = cos^2(pi t / (2 epochs)) (1 - m0)                  (computed so: no cancellation)
    t = the fractional epoch of the next step (the update runs after this step's optimizer
        step; moco-v3 runs it at the start of the next). The EMA weight 1 - m is what the
        step holds on the device: in float32 it is exact to 2^-24 of itself, where m
        rounds to 1.0 once 1 - m < 2^-25 and stops the update early.
"""

import math

import torch

OPTIMIZERS = ("sgd", "lars", "adamw")


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        if (
            (not isinstance(lr, torch.Tensor) and lr < 0)
            or weight_decay < 0
            or not 0 <= momentum < 1
            or trust_coefficient <= 0
        ):
            raise ValueError(
                f"LARS: need lr >= 0, weight_decay >= 0, 0 <= momentum < 1, trust_coefficient "
                f"> 0; got {lr}, {weight_decay}, {momentum}, {trust_coefficient}"
            )
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            adapt = [p for p in params if p.ndim > 1]
            plain = [p for p in params if p.ndim <= 1]
            updates = [p.grad for p in plain]  # 1-d tensors: the raw gradient
            if adapt:
                updates = self._adapted([p.grad for p in adapt], adapt, group) + updates
            mus = [self._momentum_buffer(p) for p in adapt + plain]
            torch._foreach_mul_(mus, group["momentum"])
            torch._foreach_add_(mus, updates)
            # lr * mu, then subtract: lr may be a float or a 0-d device tensor, same rounding
            torch._foreach_sub_(adapt + plain, torch._foreach_mul(mus, group["lr"]))
        return loss

    @staticmethod
    def _adapted(grads, params, group):
        """d = ratio * (g + wd * w) for the >1-d tensors, all at once."""
        d = list(torch._foreach_add(grads, params, alpha=group["weight_decay"]))
        w_norm = torch.stack(torch._foreach_norm(params))
        d_norm = torch.stack(torch._foreach_norm(d))
        ones = torch.ones_like(w_norm)
        ratio = torch.where(
            w_norm > 0,
            torch.where(d_norm > 0, group["trust_coefficient"] * w_norm / d_norm, ones),
            ones,
        )
        torch._foreach_mul_(d, list(ratio.unbind()))
        return d

    def _momentum_buffer(self, p):
        state = self.state[p]
        if "mu" not in state:
            state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["mu"]


def _apex_optimizers():
    try:
        import apex.optimizers
    except ImportError:
        return None
    return apex.optimizers


def build_optimizer(
    name: str, params, *, lr: float, momentum: float, weight_decay: float, graph_safe: bool = True
) -> torch.optim.Optimizer:
    """The optimizer of a method: sgd (v1/v2), lars (v3 ResNet), adamw (v3 ViT).

    graph_safe: on CUDA, implementations that read a tensor lr on the device and never sync
    (torch's fused SGD/AdamW); False allows apex's, which read a Python lr."""
    params = [p for p in params if p.requires_grad]  # a frozen patch projection stays out
    on_cuda = bool(params) and params[0].is_cuda
    apex = _apex_optimizers() if on_cuda and not graph_safe else None
    if name == "sgd":
        if apex is not None:
            return apex.FusedSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=on_cuda or None
        )
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        if apex is not None:
            return apex.FusedAdam(params, lr=lr, weight_decay=weight_decay, adam_w_mode=True)
        # capturable: the step count stays on the device and a graph may record the step
        return torch.optim.AdamW(
            params, lr=lr, weight_decay=weight_decay, fused=on_cuda or None, capturable=on_cuda
        )
    raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def reads_lr_tensor(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step reads a 0-d tensor lr on the device, with no host read:
    LARS (here), torch's fused SGD, and Adam/AdamW fused or capturable. The others (foreach
    or per-tensor SGD, apex) take a Python float, which a captured graph would freeze."""
    if isinstance(optimizer, LARS):
        return True
    groups = optimizer.param_groups
    if isinstance(optimizer, torch.optim.SGD):
        return all(g.get("fused") for g in groups)
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return all(g.get("fused") or g.get("capturable") for g in groups)
    return False


def graph_capturable(optimizer: torch.optim.Optimizer) -> str | None:
    """Why a CUDA graph cannot record this optimizer's step, or None when it can: the lr
    must be a device tensor (reads_lr_tensor), and Adam/AdamW need capturable=True (their
    step count on the device: torch's capture health check refuses them otherwise)."""
    if not reads_lr_tensor(optimizer):
        return (
            f"{type(optimizer).__name__} reads its learning rate as a Python float, which a "
            "graph would freeze (torch's fused SGD/AdamW and LARS read a device tensor)"
        )
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        if not all(g.get("capturable") for g in optimizer.param_groups):
            return (
                f"{type(optimizer).__name__} without capturable=True keeps its step count on the "
                "host, which torch's graph capture refuses"
            )
    return None


def lr_at(cfg, step: int, steps_per_epoch: int) -> float:
    """The learning rate of global step `step` (0-based) under cfg's schedule (module doc)."""
    base = cfg.effective_lr()
    e = step / steps_per_epoch if cfg.lr_update == "step" else step // steps_per_epoch
    if e < cfg.warmup_epochs:
        return base * e / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
        return base * 0.5 * (1 + math.cos(math.pi * (e - cfg.warmup_epochs) / span))
    return base * 0.1 ** sum(e >= s for s in cfg.lr_steps)


def ema_weight_at(cfg, step: int, steps_per_epoch: int) -> float:
    """1 - m for the momentum update after step `step`: constant 1 - moco_m, or with
    moco_m_cos 0.5 (1 + cos(pi t / epochs)) (1 - moco_m) at t = (step + 1) / steps_per_epoch,
    the value moco-v3 uses at the start of the next step (module doc)."""
    if not cfg.moco_m_cos:
        return 1 - cfg.moco_m
    t = (step + 1) / steps_per_epoch
    # 0.5 (1 + cos x) = cos^2(x / 2): the same value without the cancellation of 1 + cos x
    # as x nears pi, where 1 - m is smallest and float64 would lose its leading digits
    return math.cos(math.pi * t / cfg.epochs / 2) ** 2 * (1 - cfg.moco_m)


def momentum_at(cfg, step: int, steps_per_epoch: int) -> float:
    """m = 1 - ema_weight_at(...): the momentum itself, as the official code writes it."""
    return 1 - ema_weight_at(cfg, step, steps_per_epoch)
