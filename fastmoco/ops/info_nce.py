r"""InfoNCE (MoCo's contrastive loss) without materialising the N x (1+K) logits.

Math. Queries q (N, C), their keys k (N, C), negatives n_j (K rows of C): the queue rows,
or for queue=None the keys themselves (in-batch negatives, label i for row i). With
normalize=True, q_i and k_i are first divided by their L2 norm (F.normalize, eps 1e-12);
the queue is used as given (MoCo keeps unit keys in it).

    s_i+  = <q_i, k_i> / T                       (positive logit)
    s_ij  = <q_i, n_j> / T                       (negatives; in-batch: j = 0..N-1, j = i is s_i+)
    lse_i = log(exp(s_i+) + sum_j exp(s_ij))     (in-batch: log sum_j exp(s_ij))
    L_i   = lse_i - s_i+                         reduction: mean, sum or none over i
    rank_i = #{j negative : s_ij > s_i+}         top-1 hit iff rank_i == 0, top-5 iff rank_i < 5

Gradients, with p_ij = exp(s_ij - lse_i), p_i+ = exp(s_i+ - lse_i), g_i = dLoss/dL_i:

    dL/dqhat_i = g_i / T * (sum_j p_ij n_j + (p_i+ - 1) khat_i)
    dL/dkhat_i = g_i / T * (p_i+ - 1) qhat_i     (queue mode; in-batch: the column sum below)
    dL/dn_j    = 1/T * sum_i g_i p_ij qhat_i     (in-batch: p_ij - [i == j] in place of p_ij)
    dL/dq_i    = (dqhat_i - qhat_i <qhat_i, dqhat_i>) / ||q_i||   (the normalisation Jacobian)

Algorithm (this file is the readable spec of a future fused kernel, kernels/info_nce.py).
Forward streams the negatives in chunks of `chunk_size` rows and keeps an online
logsumexp per row: a running maximum mx_i and a sum S_i of exp(s - mx_i), started at the
positive logit (mx_i = s_i+, so S_i >= 1 and log(S_i) never sees an underflow). Merging a
chunk rescales S_i by exp(mx_i - mx_new); merging two partial (mx, S) pairs works the same
way, so splits along K combine. For unit queue rows and normalize=True every logit is at
most 1/T and a kernel may pin mx_i = 1/T so partial sums simply add; this path keeps the
running max because the queue's norms are the caller's business, and because for T < 0.025
exp(-2/T) underflows fp32. Only the inputs and lse (N,) are saved; backward recomputes each
chunk's logits, turns them into p_ij and accumulates dqhat (N, C) while writing each
chunk's dn_j rows once.

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

import os

import torch
from torch.autograd.function import once_differentiable

from fastmoco.ops._common import (
    KernelFallback,
    accumulation_dtype,
    autocast_off,
    check_pair_inputs,
    reduce_rows,
    select_backend,
    unit_rows,
    unit_rows_backward,
)

_BACKENDS = ("torch", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_C = 1024
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once: Triton does the same
FALLBACK = KernelFallback("InfoNCE")  # shared with nt_xent: the same kernels


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor | None = None,
    temperature: float = 0.2,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE loss of queries q (N, C) against keys k (N, C) and negatives queue (K, C).

    queue=None uses the other keys of the batch as negatives (labels arange(N)). An empty
    queue (K = 0) is valid: each row's loss is then that of its positive alone, 0.
    Returns the loss (fp32, fp64 for fp64 inputs; scalar or (N,) for reduction="none"),
    and with return_stats=True also rank (N,) int64: how many negatives score strictly
    above the positive. backend: None picks per device, "torch" forces the chunked
    PyTorch path, "triton" the fused kernels (errors raise). chunk_size: negatives per
    streamed chunk of the PyTorch path (memory N x chunk_size).
    """
    check_pair_inputs(q, k, queue, temperature, reduction)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (e.g. 4096), got {chunk_size!r}")
    if use_triton(backend, q, k, queue):
        try:
            loss, rank = triton_loss(
                q, k, queue, float(temperature), normalize=normalize, reduction=reduction
            )
            return (loss, rank) if return_stats else loss
        except Exception as err:  # noqa: BLE001 - FALLBACK re-raises all but kernel failures
            FALLBACK.handle(backend, kernel_kind(q, k, queue), err)
    rows, rank = _InfoNCETorch.apply(
        q, k, queue, float(temperature), normalize, chunk_size, return_stats
    )
    loss = reduce_rows(rows, reduction)
    return (loss, rank) if return_stats else loss


def kernel_kind(*tensors) -> tuple:
    """What a kernel failure is remembered for: device, dtypes and feature width."""
    named = [t for t in tensors if t is not None]
    return (str(named[0].device), *(str(t.dtype) for t in named), named[0].shape[1])


def use_triton(backend, *tensors) -> bool:
    """Whether a call runs the fused kernels: backend="triton", or backend=None on CUDA
    tensors the kernels take (fp64 and very wide features go to the PyTorch path), unless
    the kernels already failed to compile or launch here for this kind of input."""
    if select_backend(backend, _BACKENDS, tensors[0].device) != "triton":
        return False
    if backend is not None:
        return True
    return _triton_takes(*tensors) and FALLBACK.usable(kernel_kind(*tensors))


def _triton_takes(*tensors) -> bool:
    named = [t for t in tensors if t is not None]
    return all(t.dtype in _TRITON_DTYPES for t in named) and named[0].shape[1] <= _TRITON_MAX_C


def triton_loss(q, k, queue, temperature, *, normalize, reduction, nt_xent=False):
    """The reduced loss and ranks from the fused kernels (queue, in-batch or NT-Xent mode)."""
    if not _triton_takes(q, k, queue):
        raise ValueError(
            f"backend='triton' takes float16/bfloat16/float32 inputs with C <= {_TRITON_MAX_C}; "
            "cast the inputs or use backend='torch'"
        )
    if not _INTERPRET and q.device.type != "cuda":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {q.device}); on a CPU run it under "
            "Triton's interpreter: set TRITON_INTERPRET=1 before anything imports triton"
        )
    from fastmoco.ops._info_nce_fused import fused_loss  # imports Triton: only when used

    modes = dict(normalize=normalize, reduction=reduction)
    if nt_xent:  # q holds the 2N views; the positive of row i is row (i + N) mod 2N
        half = q.shape[0] // 2
        pairs = torch.cat([q[half:], q[:half]])
        return fused_loss(
            q, pairs, q, temperature, normalize_stream=normalize, excl_self=True, shift=half,
            **modes,
        )  # fmt: skip
    if queue is None:
        return fused_loss(q, k, k, temperature, normalize_stream=normalize, excl_self=True, **modes)
    return fused_loss(q, k, queue, temperature, normalize_stream=False, excl_self=False, **modes)


def _chunks(length: int, chunk_size: int):
    for start in range(0, length, chunk_size):
        yield start, min(start + chunk_size, length)


def _chunk_logits(q_over_T, negatives, j0, j1, dtype):
    """s_ij for j in [j0, j1): one (N, C) x (C, chunk) product, the same in forward and
    backward, so backward's p_ij are exactly the forward's."""
    return q_over_T @ negatives[j0:j1].to(dtype).T  # Nx(j1-j0)


class _InfoNCETorch(torch.autograd.Function):
    """Chunked PyTorch implementation; outputs (per-row loss (N,), rank (N,) or empty)."""

    @staticmethod
    def forward(ctx, q, k, queue, temperature, normalize, chunk_size, want_rank):
        dtype = accumulation_dtype(q, k, queue)
        in_batch = queue is None
        with autocast_off(q.device.type):
            qn, _ = unit_rows(q, dtype, normalize)  # NxC
            kn, _ = unit_rows(k, dtype, normalize)  # NxC
            negatives = kn if in_batch else queue  # (N or K)xC, any strides
            q_over_T = qn / temperature
            N = qn.shape[0]
            l_pos = (q_over_T * kn).sum(dim=1)  # positive logits: N
            # Online logsumexp, started at the positive logit: mx is a shift, S >= 1 in
            # queue mode (the positive's term) and in in-batch mode (it reappears as s_ii).
            mx = l_pos.clone()
            S = torch.zeros_like(l_pos) if in_batch else torch.ones_like(l_pos)
            rank = torch.zeros(N if want_rank else 0, dtype=torch.int64, device=q.device)
            for j0, j1 in _chunks(negatives.shape[0], chunk_size):
                logits = _chunk_logits(q_over_T, negatives, j0, j1, dtype)
                if want_rank:
                    above = logits > l_pos[:, None]
                    if in_batch:  # s_ii is the positive, not a negative
                        cols = torch.arange(j0, j1, device=q.device)
                        above &= cols[None, :] != torch.arange(N, device=q.device)[:, None]
                    rank += above.sum(dim=1)
                mx_new = torch.maximum(mx, logits.amax(dim=1))
                S = S * torch.exp(mx - mx_new) + logits.sub_(mx_new[:, None]).exp_().sum(dim=1)
                mx = mx_new
            lse = mx + torch.log(S)
        ctx.save_for_backward(q, k, queue, lse)
        ctx.temperature, ctx.normalize, ctx.chunk_size = temperature, normalize, chunk_size
        ctx.mark_non_differentiable(rank)
        return lse - l_pos, rank

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows, _grad_rank):
        q, k, queue, lse = ctx.saved_tensors
        need_q, need_k, need_queue = ctx.needs_input_grad[:3]
        T, normalize = ctx.temperature, ctx.normalize
        dtype, in_batch = lse.dtype, queue is None
        with autocast_off(q.device.type):
            qn, q_norm = unit_rows(q, dtype, normalize)
            kn, k_norm = unit_rows(k, dtype, normalize)
            negatives = kn if in_batch else queue
            q_over_T = qn / T
            g = grad_rows.to(dtype) / T  # N: dLoss/dL_i times the 1/T inside every logit
            d_qn = torch.zeros_like(qn)
            d_kn = torch.zeros_like(kn) if need_k else None
            d_queue = None
            if need_queue:  # written chunk by chunk, in the queue's dtype (the copy casts)
                d_queue = torch.empty_like(queue, memory_format=torch.contiguous_format)
            for j0, j1 in _chunks(negatives.shape[0], ctx.chunk_size):
                logits = _chunk_logits(q_over_T, negatives, j0, j1, dtype)
                w = logits.sub_(lse[:, None]).exp_().mul_(g[:, None])  # g_i p_ij / T: NxChunk
                if in_batch:  # softmax minus one-hot: the label of row i is column i
                    diag = torch.arange(j1 - j0, device=q.device)
                    w[j0 + diag, diag] -= g[j0:j1]
                d_qn += w @ negatives[j0:j1].to(dtype)
                if in_batch and need_k:
                    d_kn[j0:j1] = w.T @ qn
                if need_queue:
                    d_queue[j0:j1] = w.T @ qn
            if not in_batch:  # the positive: coefficient g_i (p_i+ - 1) / T
                l_pos = (q_over_T * kn).sum(dim=1)
                w_pos = (torch.exp(l_pos - lse) - 1.0) * g
                d_qn += w_pos[:, None] * kn
                if need_k:
                    d_kn = w_pos[:, None] * qn
            d_q = unit_rows_backward(d_qn, qn, q_norm).to(q.dtype) if need_q else None
            d_k = unit_rows_backward(d_kn, kn, k_norm).to(k.dtype) if need_k else None
        return d_q, d_k, d_queue, None, None, None, None
