r"""InfoNCE (MoCo's contrastive loss) without materialising the N x (1+K) logits.

Math. Queries q (N, C), their keys k (N, C), negatives n_j (K rows of C): the queue rows,
or for queue=None the keys themselves (in-batch negatives, label i for row i), or, across
ranks, the keys of the whole global batch `all_keys` (M rows) with row i's positive at
column offset + i (MoCo v3: offset = N * rank). With normalize=True, q_i and k_i (and the
in-batch keys) are first divided by their L2 norm (F.normalize, eps 1e-12); the queue is
used as given: MoCo keeps unit keys in it, so a caller who fills its own queue must
enqueue normalised keys.

    s_i+  = <q_i, k_i> / T                       (positive logit)
    s_ij  = <q_i, n_j> / T                       (negatives; in-batch: j = 0..M-1, j = offset + i
                                                  is s_i+)
    lse_i = log(exp(s_i+) + sum_j exp(s_ij))     (in-batch: log sum_j exp(s_ij))
    L_i   = lse_i - s_i+                         reduction: mean, sum or none over i
    rank_i = #{j negative : s_ij > s_i+}         top-1 hit iff rank_i == 0, top-5 iff rank_i < 5

Gradients, with p_ij = exp(s_ij - lse_i), p_i+ = exp(s_i+ - lse_i), g_i = dLoss/dL_i:

    dL/dqhat_i = g_i / T * (sum_j p_ij n_j + (p_i+ - 1) khat_i)
    dL/dkhat_i = g_i / T * (p_i+ - 1) qhat_i     (queue mode; in-batch: the column sum below)
    dL/dn_j    = 1/T * sum_i g_i p_ij qhat_i     (in-batch: p_ij - [j == offset + i] for p_ij)
    dL/dq_i    = (dqhat_i - qhat_i <qhat_i, dqhat_i>) / ||q_i||   (the normalisation Jacobian)

Algorithm: this file's PyTorch path (CPU tensors, fp64, and any input the kernels do not
take) is the readable spec of the fused kernels of kernels/info_nce.py (CUDA). Forward
streams the negatives in chunks of `chunk_size` rows and keeps an online logsumexp per
row: a running maximum mx_i and a sum S_i of exp(s - mx_i), started at the positive logit
(mx_i = s_i+, so S_i >= 1 and log(S_i) never sees an underflow). Merging a chunk rescales
S_i by exp(mx_i - mx_new); merging two partial (mx, S) pairs works the same way, so splits
along K combine. For unit queue rows and normalize=True every logit is at most 1/T and a
kernel may pin mx_i = 1/T so partial sums simply add; this path keeps the running max
because the queue's norms are the caller's business, and because for T < 0.025 exp(-2/T)
underflows fp32. Only the inputs and lse (N,) are saved; backward recomputes each chunk's
logits, turns them into p_ij and accumulates dqhat (N, C) while writing each chunk's dn_j
rows once.

Cost model, one call (F = N*K*C):  forward 2F flops + N*K exp, reads the queue once;
backward 2F (recompute) + 2F (dq) + 2F (dqueue or in-batch dk, only when asked).
Extra memory: O(N*C + N*chunk_size + chunk_size*C) (the last only when the queue is cast
to the accumulation dtype), never N x K; the eager formula peaks at three N x (1+K)
tensors in forward and keeps one of them for backward.

Precision: accumulates in fp32 (fp64 if any input is fp64); returns an fp32 (fp64) loss;
gradients come back in each input's dtype. Autocast is switched off inside.
Inputs may be non-contiguous: the queue in particular may be `buf.T` of the official
(C, K) buffer, and is read chunk by chunk through its strides, never copied whole.
"""

import functools
import os

import torch
from torch.autograd.function import once_differentiable

from fastmoco.ops._common import (
    FusedKernels,
    accumulation_dtype,
    autocast_off,
    check_pair_inputs,
    reduce_rows,
    unit_rows,
    unit_rows_backward,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once: Triton does the same
# The fused InfoNCE kernels, shared with nt_xent; C above 1024 takes the PyTorch path.
KERNELS = FusedKernels("InfoNCE", (torch.float16, torch.bfloat16, torch.float32), 1024)


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor | None = None,
    temperature: float = 0.2,
    *,
    all_keys: torch.Tensor | None = None,
    offset: int = 0,
    normalize: bool = True,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE loss of queries q (N, C) against keys k (N, C) and negatives queue (K, C).

    queue=None uses the other keys of the batch as negatives (labels arange(N)). An empty
    queue (K = 0) is valid: each row's loss is then that of its positive alone, 0.
    all_keys (M, C), with queue=None: the keys of the whole global batch gathered from every
    rank (no gradient), whose rows offset .. offset + N - 1 are k; row i's negatives are
    every other row (MoCo v3 across ranks: CE(q @ all_keys.T / T, labels arange(N) + offset)).
    Returns the loss (fp32, fp64 for fp64 inputs; scalar or (N,) for reduction="none"),
    and with return_stats=True also rank (N,) int64: how many negatives score strictly
    above the positive. backend: None picks per device, "torch" forces the chunked
    PyTorch path, "triton" the fused kernels (errors raise). chunk_size: negatives per
    streamed chunk of the PyTorch path (memory N x chunk_size). NaN or inf inputs give a
    NaN loss: no value is read on the host to check them.
    """
    check_pair_inputs(q, k, queue, temperature, reduction)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (e.g. 4096), got {chunk_size!r}")
    if all_keys is not None:
        _check_all_keys(q, k, queue, all_keys, offset)
    T = float(temperature)

    def fused():
        return triton_loss(
            q, k, queue, T, normalize=normalize, reduction=reduction, all_keys=all_keys,
            offset=offset,
        )  # fmt: skip

    def torch_path():
        in_batch = queue is None
        stream = queue if not in_batch else (k if all_keys is None else all_keys)
        rows, rank = _InfoNCETorch.apply(
            q, k, stream, in_batch, offset, T, normalize, chunk_size, return_stats
        )
        return reduce_rows(rows, reduction), rank

    loss, rank = KERNELS.run(backend, (q, k, queue if all_keys is None else all_keys),
                             fused, torch_path)  # fmt: skip
    return (loss, rank) if return_stats else loss


def _check_all_keys(q, k, queue, all_keys, offset) -> None:
    if queue is not None:
        raise ValueError("all_keys is the in-batch form's (queue=None); pass one of the two")
    if not isinstance(all_keys, torch.Tensor) or all_keys.dim() != 2:
        raise ValueError("all_keys must be a 2-D (M, C) tensor: every rank's keys, gathered")
    if all_keys.shape[1] != q.shape[1] or all_keys.device != q.device:
        raise ValueError(
            f"all_keys must be (M, C) with C = {q.shape[1]} on {q.device}, got shape "
            f"{tuple(all_keys.shape)} on {all_keys.device}"
        )
    N, M = q.shape[0], all_keys.shape[0]
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= M - N:
        raise ValueError(
            f"offset {offset!r}: this rank's keys are rows offset .. offset + N - 1 of all_keys, "
            f"so it must be an int in [0, {M - N}] (MoCo v3: N * rank)"
        )
    if k.requires_grad or all_keys.requires_grad:
        raise ValueError(
            "the gathered form gives no gradient to k or all_keys (gathered keys have none): "
            "pass them detached"
        )


def triton_loss(
    q, k, queue, temperature, *, normalize, reduction, nt_xent=False, all_keys=None, offset=0
):
    """The reduced loss and ranks from the fused kernels (queue, in-batch, gathered in-batch
    or NT-Xent mode)."""
    if not KERNELS.takes(q, k, queue):
        raise ValueError(
            f"backend='triton' takes float16/bfloat16/float32 inputs with C <= "
            f"{KERNELS.max_width}; cast the inputs or use backend='torch'"
        )
    if not _INTERPRET and q.device.type != "cuda":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {q.device}); on a CPU run it under "
            "Triton's interpreter: set TRITON_INTERPRET=1 before anything imports triton"
        )
    fused_loss = _fused_loss()
    modes = dict(normalize=normalize, reduction=reduction)
    if nt_xent:  # q holds the 2N views; the positive of row i is row (i + N) mod 2N
        half = q.shape[0] // 2
        pairs = torch.cat([q[half:], q[:half]])
        return fused_loss(
            q, pairs, q, temperature, normalize_stream=normalize, excl_self=True, shift=half,
            **modes,
        )  # fmt: skip
    if all_keys is not None:  # the positive from k, its column offset + i of the stream excluded
        return fused_loss(
            q, k, all_keys, temperature, normalize_stream=normalize, excl_self=False,
            shift=offset, **modes,
        )  # fmt: skip
    if queue is None:
        return fused_loss(q, k, k, temperature, normalize_stream=normalize, excl_self=True, **modes)
    return fused_loss(q, k, queue, temperature, normalize_stream=False, excl_self=False, **modes)


@functools.cache
def _fused_loss():
    """_info_nce_fused.fused_loss, imported on first use (it imports Triton), once."""
    from fastmoco.ops._info_nce_fused import fused_loss

    return fused_loss


def _chunks(length: int, chunk_size: int):
    for start in range(0, length, chunk_size):
        yield start, min(start + chunk_size, length)


def _chunk_logits(q_over_T, negatives, j0, j1, dtype):
    """s_ij for j in [j0, j1): one (N, C) x (C, chunk) product, the same in forward and
    backward, so backward's p_ij are exactly the forward's."""
    return q_over_T @ negatives[j0:j1].to(dtype).T  # Nx(j1-j0)


class _InfoNCETorch(torch.autograd.Function):
    """Chunked PyTorch implementation; outputs (per-row loss (N,), rank (N,) or empty).

    Queue mode: the positive of row i is k_i, the negatives the stream (the queue, as given).
    In-batch mode: the stream is the keys (k itself, or every rank's `all_keys`),
    normalised like k, and the positive of row i is its column offset + i."""

    @staticmethod
    def forward(ctx, q, k, stream, in_batch, offset, temperature, normalize, chunk_size, want_rank):
        dtype = accumulation_dtype(q, k, stream)
        with autocast_off(q.device.type):
            qn, _ = unit_rows(q, dtype, normalize)  # NxC
            N = qn.shape[0]
            if in_batch:  # (M, C) unit keys; row i's positive is column offset + i
                negatives, _ = unit_rows(stream, dtype, normalize)
                positives = negatives[offset : offset + N]
            else:
                positives, _ = unit_rows(k, dtype, normalize)
                negatives = stream  # KxC, any strides
            q_over_T = qn / temperature
            l_pos = (q_over_T * positives).sum(dim=1)  # positive logits: N
            # Online logsumexp, started at the positive logit: mx is a shift, S >= 1 in
            # queue mode (the positive's term) and in in-batch mode (it reappears as s_ii).
            mx = l_pos.clone()
            S = torch.zeros_like(l_pos) if in_batch else torch.ones_like(l_pos)
            rank = torch.zeros(N if want_rank else 0, dtype=torch.int64, device=q.device)
            label = torch.arange(N, device=q.device) + offset
            for j0, j1 in _chunks(negatives.shape[0], chunk_size):
                logits = _chunk_logits(q_over_T, negatives, j0, j1, dtype)
                if want_rank:
                    above = logits > l_pos[:, None]
                    if in_batch:  # s_i,offset+i is the positive, not a negative
                        cols = torch.arange(j0, j1, device=q.device)
                        above &= cols[None, :] != label[:, None]
                    rank += above.sum(dim=1)
                mx_new = torch.maximum(mx, logits.amax(dim=1))
                S = S * torch.exp(mx - mx_new) + logits.sub_(mx_new[:, None]).exp_().sum(dim=1)
                mx = mx_new
            lse = mx + torch.log(S)
        ctx.save_for_backward(q, k, stream, lse)
        ctx.in_batch, ctx.offset = in_batch, offset
        ctx.temperature, ctx.normalize, ctx.chunk_size = temperature, normalize, chunk_size
        ctx.mark_non_differentiable(rank)
        return lse - l_pos, rank

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows, _grad_rank):
        q, k, stream, lse = ctx.saved_tensors
        need_q, need_k, need_stream = ctx.needs_input_grad[:3]
        T, normalize, in_batch, offset = ctx.temperature, ctx.normalize, ctx.in_batch, ctx.offset
        dtype = lse.dtype
        with autocast_off(q.device.type):
            qn, q_norm = unit_rows(q, dtype, normalize)
            N = qn.shape[0]
            if in_batch:
                negatives, s_norm = unit_rows(stream, dtype, normalize)
            else:
                kn, k_norm = unit_rows(k, dtype, normalize)
                negatives = stream
            q_over_T = qn / T
            g = grad_rows.to(dtype) / T  # N: dLoss/dL_i times the 1/T inside every logit
            d_qn = torch.zeros_like(qn)
            d_neg = None
            if need_stream:  # written chunk by chunk (in the queue's dtype in queue mode)
                like = negatives if in_batch else stream
                d_neg = torch.empty_like(like, memory_format=torch.contiguous_format)
            for j0, j1 in _chunks(negatives.shape[0], ctx.chunk_size):
                logits = _chunk_logits(q_over_T, negatives, j0, j1, dtype)
                w = logits.sub_(lse[:, None]).exp_().mul_(g[:, None])  # g_i p_ij / T: NxChunk
                lo, hi = max(j0 - offset, 0), min(j1 - offset, N)  # rows labelled in chunk
                if in_batch and lo < hi:  # softmax minus one-hot: row i's label is offset + i
                    rows = torch.arange(lo, hi, device=q.device)
                    w[rows, rows + offset - j0] -= g[lo:hi]
                d_qn += w @ negatives[j0:j1].to(dtype)
                if need_stream:
                    d_neg[j0:j1] = w.T @ qn
            d_k = None
            if not in_batch:  # the positive: coefficient g_i (p_i+ - 1) / T
                l_pos = (q_over_T * kn).sum(dim=1)
                w_pos = (torch.exp(l_pos - lse) - 1.0) * g
                d_qn += w_pos[:, None] * kn
                if need_k:
                    d_k = unit_rows_backward(w_pos[:, None] * qn, kn, k_norm).to(k.dtype)
            elif need_stream:
                d_neg = unit_rows_backward(d_neg, negatives, s_norm).to(stream.dtype)
            d_q = unit_rows_backward(d_qn, qn, q_norm).to(q.dtype) if need_q else None
        return d_q, d_k, d_neg, None, None, None, None, None, None
