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

import contextlib
import math
import warnings

import torch
from torch.autograd.function import once_differentiable

from fastmoco.ops._backend import select_backend

_BACKENDS = ("torch", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_C = 1024
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
_NORM_EPS = 1e-12  # F.normalize's default


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

    queue=None uses the other keys of the batch as negatives (labels arange(N)).
    Returns the loss (fp32, fp64 for fp64 inputs; scalar or (N,) for reduction="none"),
    and with return_stats=True also rank (N,) int64: how many negatives score strictly
    above the positive. backend: None picks per device, "torch" forces the chunked
    PyTorch path. chunk_size: negatives per streamed chunk (memory N x chunk_size).
    """
    _check_inputs(q, k, queue, temperature, reduction, chunk_size)
    rows = None
    if use_triton(backend, q, k, queue):
        try:
            rows, rank = _triton_rows(q, k, queue, float(temperature), normalize)
        except Exception as err:
            fall_back_or_raise(backend, err)
    if rows is None:
        rows, rank = _InfoNCETorch.apply(
            q, k, queue, float(temperature), normalize, chunk_size, return_stats
        )
    loss = reduce_rows(rows, reduction)
    return (loss, rank) if return_stats else loss


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """The per-row losses reduced as asked: "mean", "sum" or "none"."""
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def _check_inputs(q, k, queue, temperature, reduction, chunk_size) -> None:
    named = [("q", q), ("k", k)] + ([] if queue is None else [("queue", queue)])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            layout = "(K, C), one key per row (for the official (C, K) buffer pass buf.T)"
            want = layout if name == "queue" else "(N, C)"
            raise ValueError(
                f"{name} must be 2-D {want}, got shape {tuple(t.shape)}; reshape it to {want}"
            )
        if t.dtype not in _DTYPES:
            raise ValueError(
                f"{name} has dtype {t.dtype}; info_nce takes float16, bfloat16, float32 or "
                f"float64: cast it, e.g. {name}.float()"
            )
        if t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}: move all inputs to one device"
            )
    N, C = q.shape
    if k.shape != q.shape:
        raise ValueError(
            f"k must have q's shape (N, C) = {tuple(q.shape)}, got {tuple(k.shape)}: "
            "pass one key per query"
        )
    if N == 0 or C == 0:
        raise ValueError(f"q is empty (shape {tuple(q.shape)}): pass at least one query of C >= 1")
    if queue is not None and queue.shape[1] != C:
        raise ValueError(
            f"queue must be (K, C) with C = {C} like q, got shape {tuple(queue.shape)}; "
            "for the official (C, K) buffer pass buf.T"
        )
    bad_type = isinstance(temperature, bool) or not isinstance(temperature, (int, float))
    if bad_type or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature must be a positive finite Python float (e.g. 0.2), got {temperature!r}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (e.g. 4096), got {chunk_size!r}")


_TRITON_FAILED: list[str] = []  # set once the kernels failed on this machine


def use_triton(backend, *tensors) -> bool:
    """Whether a call runs the fused kernels: backend="triton", or backend=None on CUDA
    tensors the kernels take (fp64 and very wide features go to the PyTorch path), unless
    they already failed to compile or launch here."""
    if select_backend(backend, _BACKENDS, tensors[0].device) != "triton":
        return False
    return backend is not None or (_triton_takes(*tensors) and not _TRITON_FAILED)


def fall_back_or_raise(backend, err: Exception) -> None:
    """With backend=None a kernel failure (an unsupported GPU, a Triton too old) is a
    warning and the PyTorch path serves this and every later call; bad input is raised."""
    if backend is not None or isinstance(err, ValueError):
        raise err
    _TRITON_FAILED.append(repr(err))
    warnings.warn(
        f"fastmoco: the Triton InfoNCE kernels failed on this machine ({err!r}); the PyTorch "
        "path is used from now on. Call with backend='triton' to see the full error.",
        RuntimeWarning,
        stacklevel=3,
    )


def _triton_takes(*tensors) -> bool:
    named = [t for t in tensors if t is not None]
    return all(t.dtype in _TRITON_DTYPES for t in named) and named[0].shape[1] <= _TRITON_MAX_C


def _triton_rows(q, k, queue, temperature, normalize, nt_xent=False):
    """Per-row losses and ranks from the fused kernels (queue, in-batch or NT-Xent mode)."""
    if not _triton_takes(q, k, queue):
        raise ValueError(
            f"backend='triton' takes float16/bfloat16/float32 inputs with C <= {_TRITON_MAX_C}; "
            "cast the inputs or use backend='torch'"
        )
    import os

    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {q.device}); on a CPU run it under "
            "Triton's interpreter: set TRITON_INTERPRET=1 before anything imports triton"
        )
    from fastmoco.ops._info_nce_fused import fused_rows

    if nt_xent:  # q holds the 2N views; the positive of row i is row (i + N) mod 2N
        half = q.shape[0] // 2
        pairs = torch.cat([q[half:], q[:half]])
        return fused_rows(q, pairs, q, temperature, normalize, normalize, True, half)
    if queue is None:
        return fused_rows(q, k, k, temperature, normalize, normalize, True)
    return fused_rows(q, k, queue, temperature, normalize, False, False)


def _accumulation_dtype(*tensors) -> torch.dtype:
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _autocast_off(device_type: str):
    """Inside the op every matmul must run in the accumulation dtype, whatever the caller's
    autocast says (autocast would otherwise run them in bf16/fp16)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _unit_rows(x: torch.Tensor, dtype: torch.dtype, normalize: bool):
    """(x / max(||x||, eps), ||x||) per row in `dtype`; (x, None) when not normalizing."""
    x = x.to(dtype)
    if not normalize:
        return x, None
    norm = x.norm(dim=1, keepdim=True)
    return x / norm.clamp_min(_NORM_EPS), norm


def _unit_rows_backward(d_unit: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor | None):
    """Gradient through x -> x / max(||x||, eps): project out the radial part, divide by
    the norm; rows whose norm was clamped to eps are a plain division by eps."""
    if norm is None:
        return d_unit
    radial = (unit * d_unit).sum(dim=1, keepdim=True)
    radial = torch.where(norm > _NORM_EPS, radial, torch.zeros_like(radial))
    return (d_unit - unit * radial) / norm.clamp_min(_NORM_EPS)


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
        dtype = _accumulation_dtype(q, k, queue)
        in_batch = queue is None
        with _autocast_off(q.device.type):
            qn, _ = _unit_rows(q, dtype, normalize)  # NxC
            kn, _ = _unit_rows(k, dtype, normalize)  # NxC
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
        with _autocast_off(q.device.type):
            qn, q_norm = _unit_rows(q, dtype, normalize)
            kn, k_norm = _unit_rows(k, dtype, normalize)
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
            d_q = _unit_rows_backward(d_qn, qn, q_norm).to(q.dtype) if need_q else None
            d_k = _unit_rows_backward(d_kn, kn, k_norm).to(k.dtype) if need_k else None
        return d_q, d_k, d_queue, None, None, None, None
