"""The official formulas, written plainly: the test oracle and the benchmark baseline.

Shaped like facebookresearch/moco's builder.py (paper symbols, shape comments, einsum).
Nothing here is fast or memory-frugal on purpose: InfoNCE materialises the N x (1+K)
logits, the momentum update is a Python loop over tensors, and enqueue reads the pointer
back to the host. The fast ops in this package are tested against these functions.

Symbols (MoCo, Algorithm 1): N batch, C feature dim, K queue length, T temperature,
m momentum. Our queue is (K, C), one key per row; the official buffer is (C, K), pass `.T`.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastmoco.ops._common import accumulation_dtype


def info_nce_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor | None = None,
    temperature: float = 0.2,
    normalize: bool = True,
    reduction: str = "mean",
    all_keys: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """InfoNCE of queries q against their keys k and the negatives in `queue`.

    queue given (MoCo v1/v2):  logits = [q.k+, q.queue_j] / T, label 0.
    queue None (MoCo v3, SimCLR-style in-batch negatives): logits = q @ k.T / T, label i.
    all_keys (moco-v3's contrastive_loss across ranks): logits = q @ all_keys.T / T,
    label i + offset (offset = N * rank).
    """
    logits, labels = info_nce_logits_reference(
        q, k, queue, temperature, normalize, all_keys, offset
    )
    return F.cross_entropy(logits, labels, reduction=reduction)


def info_nce_logits_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor | None = None,
    temperature: float = 0.2,
    normalize: bool = True,
    all_keys: torch.Tensor | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) exactly as info_nce_reference's cross-entropy takes them."""
    dtype = accumulation_dtype(q, k, queue, all_keys)
    q, k = q.to(dtype), k.to(dtype)
    if normalize:
        q = F.normalize(q, dim=1)  # NxC
        k = F.normalize(k, dim=1)  # NxC
    N = q.shape[0]
    if queue is None:
        keys = k if all_keys is None else all_keys.to(dtype)  # (N or M)xC
        if normalize:
            keys = F.normalize(keys, dim=1)
        logits = torch.einsum("nc,mc->nm", q, keys) / temperature  # logits: NxM
        return logits, torch.arange(N, device=q.device) + offset
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # positive logits: Nx1
    l_neg = torch.einsum("nc,kc->nk", q, queue.to(dtype))  # negative logits: NxK
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # logits: Nx(1+K)
    return logits, torch.zeros(N, dtype=torch.long, device=q.device)  # positives are the 0-th


def nt_xent_reference(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, reduction: str = "mean"
) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2N views: row i's positive is its other view, its
    negatives the remaining 2N - 2 rows (the similarity with itself is left out)."""
    dtype = accumulation_dtype(z1, z2)
    z = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # 2NxC
    N2 = z.shape[0]
    logits = torch.einsum("nc,mc->nm", z, z) / temperature  # logits: 2Nx2N
    logits = logits.masked_fill(torch.eye(N2, dtype=torch.bool, device=z.device), float("-inf"))
    labels = (torch.arange(N2, device=z.device) + N2 // 2) % N2  # the other view of the image
    return F.cross_entropy(logits, labels, reduction=reduction)


@torch.no_grad()
def momentum_update_reference(
    target_tensors: Sequence[torch.Tensor], source_tensors: Sequence[torch.Tensor], m: float
) -> None:
    """The official key-encoder update: a Python loop, one tensor at a time."""
    for param_k, param_q in zip(target_tensors, source_tensors, strict=True):
        param_k.data = param_k.data * m + param_q.data * (1.0 - m)


@torch.no_grad()
def enqueue_reference(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Write keys (B, C) into queue (K, C) from row ptr on, wrapping around; advance ptr.

    Reads the pointer on the host (a sync on CUDA), which the fast op avoids.
    """
    B, K = keys.shape[0], queue.shape[0]
    start = int(ptr)
    first = min(B, K - start)  # rows that fit before the end of the queue
    queue[start : start + first] = keys[:first].to(queue.dtype)
    queue[: B - first] = keys[first:].to(queue.dtype)  # the wrapped-around rest
    ptr[0] = (start + B) % K
    return queue


def contrastive_margin_loss_reference(
    x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """DrLIM (Hadsell et al. 2006, Eq. 4), one pair at a time, y = 0 similar, 1 dissimilar:
    L = (1 - Y) 1/2 D_W^2 + Y 1/2 {max(0, m - D_W)}^2, averaged over the pairs."""
    losses = []
    for a, b, label in zip(x1, x2, y, strict=True):
        D = torch.linalg.vector_norm(a - b)  # Euclidean distance D_W
        losses.append((1 - label) * 0.5 * D**2 + label * 0.5 * torch.clamp(margin - D, min=0) ** 2)
    return torch.stack(losses).mean()
