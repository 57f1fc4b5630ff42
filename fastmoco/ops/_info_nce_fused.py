"""The fused InfoNCE kernels (kernels/info_nce.py) as a differentiable op.

Two wrappers over the same kernels and the same backward:

  eager        _FusedInfoNCE, a plain autograd.Function: the least host time per call
               (at N = 256 the GPU work is tens of microseconds, so in eager use the Python
               around the launches decides the speed; the dispatcher of a custom op adds
               about as much as everything else together)
  torch.compile the custom ops below, which the compiler treats as opaque calls (no graph
               break; a fake implementation gives the output shapes):

    fastmoco::info_nce_fwd(q, pos, stream, ...) -> (rows, lse, rank, dq_unit)
    fastmoco::info_nce_bwd(grad_rows, q, pos, stream, lse, rows, ...) -> (dq, dpos, dstream)

Both capture in a CUDA graph (no host sync inside: the splits are merged on the device).
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
from fastmoco.ops._common import reduce_rows, unit_rows, unit_rows_backward

_LIB = "fastmoco"
_NOT_FUSED = (
    "info_nce: the single-pass backward only gives dq; call the op with k and the queue "
    "requiring grad at forward time to get their gradients"
)


def _forward(
    q, pos, stream, temperature, normalize, normalize_stream, excl_self, shift, fuse_dq,
    dq_scale=1.0,
):  # fmt: skip
    return kernels.forward(
        q, pos, stream, 1.0 / temperature, norm_qp=normalize, norm_s=normalize_stream,
        excl_self=excl_self, shift=shift, fuse_dq=fuse_dq, dq_scale=dq_scale,
    )  # fmt: skip


def _backward_impl(grad_rows, q, pos, stream, lse, rows, args, need_q, need_pos, need_stream):
    """(dq, dpos, dstream), None where not needed, by recomputing the logits."""
    temperature, normalize, normalize_stream, excl_self, shift = args
    inv_T = 1.0 / temperature
    modes = dict(norm_qp=normalize, norm_s=normalize_stream, excl_self=excl_self, shift=shift)
    g = grad_rows.float().contiguous()
    dq = dpos = dstream = None
    if need_q or need_pos:
        q_hat, q_norm = unit_rows(q, torch.float32, normalize)
        p_hat, p_norm = unit_rows(pos, torch.float32, normalize)
        # The positive: dL_i/ds_i+ = p_i+ - 1, with s_i+ = lse_i - L_i.
        w_pos = (torch.exp(-rows) - 1.0) * g * inv_T  # N
        if need_q:
            stream_part = kernels.backward_dq(q, stream, lse, inv_T, **modes)
            d_qhat = (g * inv_T)[:, None] * stream_part + w_pos[:, None] * p_hat
            dq = unit_rows_backward(d_qhat, q_hat, q_norm).to(q.dtype)
        if need_pos:
            dpos = unit_rows_backward(w_pos[:, None] * q_hat, p_hat, p_norm).to(pos.dtype)
    if need_stream:
        dstream = kernels.backward_dstream(q, stream, lse, g, inv_T, **modes)
    return dq, dpos, dstream


def _fused_dq(grad_rows, dq_unit, dtype):
    return (grad_rows.to(torch.float32)[:, None] * dq_unit).to(dtype)


class _FusedInfoNCE(torch.autograd.Function):
    """The eager wrapper, reduction included (one autograd node per call, not two):
    outputs (loss: () or (N,) fp32, rank (N,) int64).

    Host work per call (bench/test_host_overhead.py): forward is the launcher (one plan
    look-up, five allocations, two launches) and the reduction; backward of the single
    pass is one multiplication (and a cast for 16-bit q). Gradients are not materialised:
    rank's, always None, would otherwise cost a zero-filled (N,) tensor per backward."""

    @staticmethod
    def forward(ctx, q, pos, stream, args, fuse_dq, reduction):
        temperature, normalize, normalize_stream, excl_self, shift = args
        # the mean's 1/N goes into dq_unit: backward is then one multiplication
        dq_scale = 1.0 / q.shape[0] if reduction == "mean" else 1.0
        rows, lse, rank, dq_unit = kernels.forward(
            q, pos, stream, 1.0 / temperature, norm_qp=normalize, norm_s=normalize_stream,
            excl_self=excl_self, shift=shift, fuse_dq=fuse_dq, dq_scale=dq_scale,
        )  # fmt: skip
        ctx.set_materialize_grads(False)
        ctx.fused, ctx.args, ctx.q_dtype, ctx.reduction = fuse_dq, args, q.dtype, reduction
        if fuse_dq:  # backward needs nothing else: the stream need not be kept
            ctx.save_for_backward(dq_unit)
        else:
            ctx.save_for_backward(q, pos, stream, lse, rows)
        ctx.mark_non_differentiable(rank)
        return reduce_rows(rows, reduction), rank

    @staticmethod
    def backward(ctx, grad_loss, _grad_rank):
        if grad_loss is None:  # only rank was used (not materialised: see the class doc)
            return None, None, None, None, None, None
        if ctx.fused:
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                raise RuntimeError(_NOT_FUSED)
            (dq_unit,) = ctx.saved_tensors
            if ctx.reduction == "none":
                dq = _fused_dq(grad_loss, dq_unit, ctx.q_dtype)
            else:  # a scalar (fp32, the loss's dtype) times dq_unit (1/N already in)
                dq = dq_unit * grad_loss
                if ctx.q_dtype != torch.float32:
                    dq = dq.to(ctx.q_dtype)
            return dq, None, None, None, None, None
        need_q, need_pos, need_stream = ctx.needs_input_grad[:3]
        q, pos, stream, lse, rows = ctx.saved_tensors
        grad_rows = grad_loss
        if ctx.reduction != "none":  # d loss / d L_i: 1/N for the mean, 1 for the sum
            grad_rows = grad_loss.expand(rows.shape[0])
            if ctx.reduction == "mean":
                grad_rows = grad_rows / rows.shape[0]
        grads = _backward_impl(
            grad_rows, q, pos, stream, lse, rows, ctx.args, need_q, need_pos, need_stream
        )
        return (*grads, None, None, None)


# ------------------------------------------------------------ the custom ops (torch.compile)


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
    return _forward(
        q, pos, stream, temperature, normalize, normalize_stream, excl_self, shift, fuse_dq
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
    args = (temperature, normalize, normalize_stream, excl_self, shift)
    grads = _backward_impl(
        grad_rows, q, pos, stream, lse, rows, args, need_q, need_pos, need_stream
    )
    # distinct empty tensors for the gradients not asked for: outputs may not alias
    return tuple(q.new_empty(0) if g is None else g for g in grads)


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
    if fuse_dq:
        ctx.save_for_backward(dq_unit)
    else:
        ctx.save_for_backward(q, pos, stream, lse, rows)
    ctx.args = (temperature, normalize, normalize_stream, excl_self, shift)
    ctx.mark_non_differentiable(lse, rank, dq_unit)


def _backward(ctx, grad_rows, _grad_lse, _grad_rank, _grad_dq_unit):
    need_q, need_pos, need_stream = ctx.needs_input_grad[:3]
    if ctx.fused:
        if need_pos or need_stream:
            raise RuntimeError(_NOT_FUSED)
        return (_fused_dq(grad_rows, ctx.saved_tensors[0], ctx.q_dtype),) + (None,) * 8
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


def fused_loss(
    q, pos, stream, temperature, *, normalize, normalize_stream, excl_self, shift=-1,
    reduction="mean",
):  # fmt: skip
    """The loss (reduced as asked, fp32) and ranks (N,) int64 from the fused kernels."""
    fuse_dq = (
        q.requires_grad
        and not pos.requires_grad
        and not stream.requires_grad
        and torch.is_grad_enabled()
    )
    args = (float(temperature), normalize, normalize_stream, excl_self, shift)
    if torch.compiler.is_compiling():
        rows, _lse, rank, _dq_unit = info_nce_fwd(q, pos, stream, *args, fuse_dq)
        return reduce_rows(rows, reduction), rank
    return _FusedInfoNCE.apply(q, pos, stream, args, fuse_dq, reduction)
