r"""DrLIM's margin contrastive loss (Hadsell, Chopra, LeCun 2006), the pair loss that
contrastive learning started from.

Math. Pairs (x1_i, x2_i) of embeddings (N, C) with labels y_i, the paper's convention:
y = 0 for a similar pair, y = 1 for a dissimilar one. D_i = ||x1_i - x2_i||_2.

    L_i  = (1 - y_i) * D_i^2 / 2  +  y_i * max(0, margin - D_i)^2 / 2
    loss = mean over the N pairs (or sum, or the (N,) terms)

Similar pairs are pulled together without limit; dissimilar pairs are pushed apart only
until they are `margin` away, which is what keeps the embedding from collapsing or
exploding. Gradients:

    dL_i/dx1_i = (1 - y_i) (x1_i - x2_i) - y_i max(0, margin - D_i) (x1_i - x2_i) / D_i
    dL_i/dx2_i = -dL_i/dx1_i

The similar term uses D^2 directly (no square root, so its gradient is defined at D = 0);
the hinge takes the root of D^2 clamped at 1e-12, so two identical dissimilar points get a
zero gradient instead of NaN. O(N*C) work: plain PyTorch, autograd does the backward.
"""

import torch

_EPS = 1e-12  # lower bound of D^2 under the square root
_REDUCTIONS = ("mean", "sum", "none")


def contrastive_margin_loss(
    x1: torch.Tensor,
    x2: torch.Tensor,
    y: torch.Tensor,
    margin: float = 1.0,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """DrLIM loss of the pairs (x1_i, x2_i), y_i = 0 similar / 1 dissimilar (float or bool).

    x1, x2: (N, C) on one device; y: (N,). Accumulates in fp32 (fp64 for fp64 inputs) and
    returns the mean over pairs (scalar), their sum, or the (N,) terms (reduction="none").
    """
    _check_inputs(x1, x2, y, margin, reduction)
    dtype = torch.float64 if torch.float64 in (x1.dtype, x2.dtype) else torch.float32
    diff = x1.to(dtype) - x2.to(dtype)  # NxC
    sq_dist = (diff * diff).sum(dim=1)  # D^2: N
    dist = sq_dist.clamp_min(_EPS).sqrt()  # D: N
    y = y.to(dtype)
    terms = 0.5 * ((1 - y) * sq_dist + y * (margin - dist).clamp_min(0) ** 2)
    if reduction == "mean":
        return terms.mean()
    if reduction == "sum":
        return terms.sum()
    return terms


def _check_inputs(x1, x2, y, margin, reduction):
    if x1.dim() != 2 or x1.shape != x2.shape:
        raise ValueError(
            f"contrastive_margin_loss: x1 and x2 must both be (N, C), got {tuple(x1.shape)} "
            f"and {tuple(x2.shape)}"
        )
    if y.shape != (x1.shape[0],):
        raise ValueError(
            f"contrastive_margin_loss: y must be ({x1.shape[0]},), one label per pair "
            f"(0 similar, 1 dissimilar), got {tuple(y.shape)}"
        )
    if not (x1.device == x2.device == y.device):
        raise ValueError(
            f"contrastive_margin_loss: x1, x2, y on different devices "
            f"({x1.device}, {x2.device}, {y.device}); move them to one"
        )
    if not (x1.is_floating_point() and x2.is_floating_point()):
        raise ValueError("contrastive_margin_loss: x1 and x2 must be floating point")
    if margin <= 0:
        raise ValueError(f"contrastive_margin_loss: margin must be positive, got {margin}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
