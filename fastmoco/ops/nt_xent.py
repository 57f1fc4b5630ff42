r"""NT-Xent, SimCLR's loss: 2N views, each view's positive is its pair, its negatives the
other 2N - 2 views.

Math. z = cat(z1, z2) (2N, C), each row L2-normalised; pair(i) = (i + N) mod 2N.

    s_ij  = <zhat_i, zhat_j> / T                  (j != i)
    L_i   = log(sum_{j != i} exp(s_ij)) - s_i,pair(i)
    loss  = mean over the 2N rows (or sum, or the (2N,) rows)

This is the in-batch InfoNCE of the 2N views against themselves with the diagonal left
out. The PyTorch path builds the (2N, 2N) similarities (in-batch, so the batch decides
the size, never the queue); CUDA tensors run the fused kernels of kernels/info_nce.py,
which never hold them.
"""

import torch
import torch.nn.functional as F

from fastmoco.ops._common import accumulation_dtype, autocast_off, check_pair_inputs, reduce_rows
from fastmoco.ops.info_nce import KERNELS, triton_loss


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.5,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent of the two views z1, z2 (N, C) of N images (SimCLR, temperature 0.5 there).

    Returns the loss over the 2N rows (fp32; (2N,) for reduction="none"), and with
    return_stats=True also rank (2N,) int64: how many of a row's 2N - 2 negatives score
    strictly above its positive. backend as in info_nce.
    """
    check_pair_inputs(z1, z2, None, temperature, reduction, names=("z1", "z2", ""), op="nt_xent")
    z = torch.cat([z1, z2], dim=0)  # 2NxC
    T = float(temperature)

    def fused():
        return triton_loss(z, z, None, T, normalize=normalize, reduction=reduction, nt_xent=True)

    def torch_path():
        rows, rank = _nt_xent_torch(z, T, normalize=normalize, want_rank=return_stats)
        return reduce_rows(rows, reduction), rank

    loss, rank = KERNELS.run(backend, (z,), fused, torch_path)
    return (loss, rank) if return_stats else loss


def _nt_xent_torch(z, temperature, *, normalize, want_rank):
    N2 = z.shape[0]
    with autocast_off(z.device.type):
        z = z.to(accumulation_dtype(z))
        if normalize:
            z = F.normalize(z, dim=1)
        logits = z @ z.T / temperature  # 2Nx2N
        self_mask = torch.eye(N2, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        pair = (torch.arange(N2, device=z.device) + N2 // 2) % N2
        rows = torch.logsumexp(logits, dim=1) - logits[torch.arange(N2), pair]
    rank = torch.zeros(0, dtype=torch.int64, device=z.device)
    if want_rank:
        rank = (logits.detach() > logits.detach()[torch.arange(N2), pair][:, None]).sum(dim=1)
    return rows, rank
