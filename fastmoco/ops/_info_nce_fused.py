"""The fused InfoNCE kernels (kernels/info_nce.py) as torch.library custom ops.

Registered ops, so that torch.compile treats them as opaque calls (no graph break, a fake
implementation gives the output shapes) and a CUDA graph can capture them (no host sync
inside: the splits are merged with device ops):

    fastmoco::info_nce_fwd(q, pos, stream, ...) -> (rows, lse, rank, dq_unit)
    fastmoco::info_nce_bwd(grad_rows, q, pos, stream, lse, rows, ...) -> (dq, dpos, dstream)

One pair covers the three modes through `excl_self` and `shift` (see the kernel file):
queue (pos = k, stream = queue), in-batch (pos = k, stream = k, excl_self) and NT-Xent
(pos = the paired views, stream = z, excl_self and shift = N). Gradients not asked for come
back as empty tensors (a custom op cannot return None) and become None in autograd.

When only q needs a gradient (MoCo: the keys and the queue come from the key encoder),
the forward pass also produces dq per unit of dLoss/dL_i (flash attention's trick: dq is
a softmax-weighted sum of the keys), and backward is one multiplication: the stream is
read once per step instead of twice.
"""

import torch

from fastmoco.kernels import info_nce as kernels
from fastmoco.ops.info_nce import _unit_rows_backward

_LIB = "fastmoco"


@torch.library.custom_op(f"{_LIB}::info_nce_fwd", mutates_args=())
def info_nce_fwd(
    q: torch.Tensor,
    pos: torch.Tensor,
    stream: torch.Tensor,
    temperature: float,
    normalize: bool,
    normalize_stream: bool,
    excl_self: bool,
    shift: int,
    fuse_dq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels.forward(
        q, pos, stream, 1.0 / temperature, normalize, normalize_stream, excl_self, shift, fuse_dq
    )


@info_nce_fwd.register_fake
def _(q, pos, stream, temperature, normalize, normalize_stream, excl_self, shift, fuse_dq):
    N = q.shape[0]
    rows = q.new_empty(N, dtype=torch.float32)
    dq_unit = q.new_empty((N, q.shape[1]) if fuse_dq else (0,), dtype=torch.float32)
    return rows, torch.empty_like(rows), q.new_empty(N, dtype=torch.int64), dq_unit


@torch.library.custom_op(f"{_LIB}::info_nce_bwd", mutates_args=())
def info_nce_bwd(
    grad_rows: torch.Tensor,
    q: torch.Tensor,
    pos: torch.Tensor,
    stream: torch.Tensor,
    lse: torch.Tensor,
    rows: torch.Tensor,
    temperature: float,
    normalize: bool,
    normalize_stream: bool,
    excl_self: bool,
    shift: int,
    need_q: bool,
    need_pos: bool,
    need_stream: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inv_T = 1.0 / temperature
    g = grad_rows.float().contiguous()
    dq, dpos, dstream = (q.new_empty(0) for _ in range(3))  # distinct: outputs may not alias
    if need_q or need_pos:
        q32, pos32 = q.float(), pos.float()
        q_norm = q32.norm(dim=1, keepdim=True) if normalize else None
        p_norm = pos32.norm(dim=1, keepdim=True) if normalize else None
        q_hat = q32 / q_norm.clamp_min(1e-12) if normalize else q32
        p_hat = pos32 / p_norm.clamp_min(1e-12) if normalize else pos32
        # The positive: dL_i/ds_i+ = p_i+ - 1, with s_i+ = lse_i - L_i.
        w_pos = (torch.exp(-rows) - 1.0) * g * inv_T  # N
        if need_q:
            stream_part = kernels.backward_dq(
                q, stream, lse, inv_T, normalize, normalize_stream, excl_self, shift
            )
            d_qhat = (g * inv_T)[:, None] * stream_part + w_pos[:, None] * p_hat
            dq = _unit_rows_backward(d_qhat, q_hat, q_norm).to(q.dtype)
        if need_pos:
            dpos = _unit_rows_backward(w_pos[:, None] * q_hat, p_hat, p_norm).to(pos.dtype)
    if need_stream:
        dstream = kernels.backward_dstream(
            q, stream, lse, g, inv_T, normalize, normalize_stream, excl_self, shift
        )
    return dq, dpos, dstream


@info_nce_bwd.register_fake
def _(grad_rows, q, pos, stream, lse, rows, temperature, normalize, normalize_stream,
      excl_self, shift, need_q, need_pos, need_stream):  # fmt: skip
    return (
        torch.empty_like(q) if need_q else q.new_empty(0),
        torch.empty_like(pos) if need_pos else q.new_empty(0),
        torch.empty_like(stream, memory_format=torch.contiguous_format)
        if need_stream
        else q.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    q, pos, stream, temperature, normalize, normalize_stream, excl_self, shift, fuse_dq = inputs
    rows, lse, rank, dq_unit = output
    ctx.fused = fuse_dq
    ctx.q_dtype = q.dtype
    if fuse_dq:  # backward needs nothing else: the stream need not be kept
        ctx.save_for_backward(dq_unit)
    else:
        ctx.save_for_backward(q, pos, stream, lse, rows)
    ctx.args = (temperature, normalize, normalize_stream, excl_self, shift)
    ctx.mark_non_differentiable(lse, rank, dq_unit)


def _backward(ctx, grad_rows, _grad_lse, _grad_rank, _grad_dq_unit):
    need_q, need_pos, need_stream = ctx.needs_input_grad[:3]
    if ctx.fused:
        (dq_unit,) = ctx.saved_tensors
        if need_pos or need_stream:
            raise RuntimeError(
                "info_nce: the single-pass backward only gives dq; call the op with k and "
                "the queue requiring grad at forward time to get their gradients"
            )
        dq = (grad_rows.float()[:, None] * dq_unit).to(ctx.q_dtype)
        return (dq, None, None) + (None,) * 6
    q, pos, stream, lse, rows = ctx.saved_tensors
    dq, dpos, dstream = info_nce_bwd(
        grad_rows, q, pos, stream, lse, rows, *ctx.args, need_q, need_pos, need_stream
    )
    return (
        dq if need_q else None,
        dpos if need_pos else None,
        dstream if need_stream else None,
    ) + (None,) * 6


info_nce_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_rows(q, pos, stream, temperature, normalize, normalize_stream, excl_self, shift=-1):
    """Per-row losses (N,) fp32 and ranks (N,) int64 from the fused kernels."""
    fuse_dq = (
        torch.is_grad_enabled()
        and q.requires_grad
        and not pos.requires_grad
        and not stream.requires_grad
    )
    rows, _lse, rank, _dq_unit = info_nce_fwd(
        q, pos, stream, float(temperature), normalize, normalize_stream, excl_self, shift, fuse_dq
    )
    return rows, rank
