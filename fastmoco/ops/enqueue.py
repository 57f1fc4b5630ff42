"""MoCo's dequeue-and-enqueue as one in-place circular write with a device-resident pointer.

    queue[(ptr + b) % K] = keys[b]   for b = 0..B-1,   then   ptr = (ptr + B) % K

The official code reads `int(queue_ptr)` on the host every step (a device sync that also
forbids CUDA-graph capture) and asserts K % B == 0. Here the row indices are computed on the
device from ptr, so nothing is read back, and any 1 <= B <= K works: a batch that runs past
the end of the queue wraps around to its start. B <= K keeps the indices distinct, so the
write is well defined. keys are cast to the queue's dtype (an fp32 queue fed bf16 keys).
The queue may be any (K, C) view, e.g. `buf.T` of the official (C, K) buffer.

Backends: "cuda" is the C++/CUDA extension op torch.ops.fastmoco.enqueue_ (csrc/: a CPU
kernel always, a CUDA kernel when built with CUDA), the default for CUDA tensors; "torch" is
index_copy_ with device-computed rows, the default for CPU tensors and the fallback, with a
one-time warning, when the extension was not built. Both run without a host sync.
"""

import functools
import warnings

import torch

from fastmoco.ops._common import select_backend

_BACKENDS = ("torch", "cuda")


def _load_extension():
    """torch.ops.fastmoco.enqueue_ from the built extension (fastmoco._C), or None.

    Run once at import, so the fake kernel is registered before anything is traced or
    compiled, and so that torch.compile finds plain module constants here, not calls.
    """
    try:
        import fastmoco._C  # noqa: F401  (loading it registers the op)
    except ImportError:
        return None

    # The fake (meta) kernel torch.compile traces with: the op only mutates its inputs.
    @torch.library.register_fake("fastmoco::enqueue_")
    def _(queue, ptr, keys):
        return None

    return torch.ops.fastmoco.enqueue_.default


_OP = _load_extension()
_OP_HAS_CUDA = _OP is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastmoco::enqueue_", "CUDA"
)


def extension_op():
    """torch.ops.fastmoco.enqueue_.default, or None when fastmoco._C is not built."""
    return _OP


def extension_has_cuda() -> bool:
    """The extension was built with its CUDA kernel (FASTMOCO_WITH_CUDA)."""
    return _OP_HAS_CUDA


@functools.cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(
        f"fastmoco: {reason}; enqueue_ uses the PyTorch path (index_copy_) instead. Rebuild "
        'with: pip install --no-build-isolation -e ".[dev]" (see setup.py for the CUDA switch)',
        RuntimeWarning,
        stacklevel=3,
    )


def enqueue_(
    queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Write keys (B, C) into queue (K, C) at rows ptr, ptr+1, ... modulo K; advance ptr.

    ptr: 1-element int64 tensor on the queue's device, updated in place to (ptr + B) % K.
    backend: None picks per device (CUDA: "cuda", CPU: "torch"); "cuda" forces the extension
    op (its CPU kernel for CPU tensors), "torch" the index_copy_ path. Returns queue.
    Keys beyond the range of a narrower queue dtype (fp32 keys into an fp16 queue) are
    clamped to its largest finite value rather than becoming inf (checking them would need
    a host sync); MoCo's keys are unit vectors, far inside every range.
    """
    _check_inputs(queue, ptr, keys)
    if _extension_usable(select_backend(backend, _BACKENDS, queue.device), queue.device):
        extension_op()(queue, ptr, _as_queue_dtype(keys, queue))
        return queue
    K, B = queue.shape[0], keys.shape[0]
    with torch.no_grad():
        rows = (ptr.reshape(()) + torch.arange(B, device=queue.device)) % K  # B rows, on device
        queue.index_copy_(0, rows, _as_queue_dtype(keys, queue))
        ptr.add_(B).remainder_(K)
    return queue


def _as_queue_dtype(keys: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """keys cast to the queue's dtype, clamped into its finite range when that is narrower."""
    keys = keys.detach()
    if keys.is_floating_point() and queue.is_floating_point():
        top = torch.finfo(queue.dtype).max
        if torch.finfo(keys.dtype).max > top:
            keys = keys.clamp(-top, top)
    return keys.to(queue.dtype)


def _extension_usable(backend: str, device: torch.device) -> bool:
    """backend == "cuda" and the extension can run on device; else warn once (torch path)."""
    if backend != "cuda":
        return False
    if extension_op() is None:
        _warn_fallback("the C++/CUDA extension fastmoco._C is not built")
        return False
    if device.type == "cuda" and not extension_has_cuda():
        _warn_fallback("the extension fastmoco._C was built without its CUDA kernel")
        return False
    return device.type in ("cpu", "cuda")


def _check_inputs(queue, ptr, keys) -> None:
    for name, t in (("queue", queue), ("ptr", ptr), ("keys", keys)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if queue.dim() != 2:
        raise ValueError(
            f"queue must be 2-D (K, C), one key per row, got shape {tuple(queue.shape)}; "
            "for the official (C, K) buffer pass buf.T"
        )
    if keys.dim() != 2:
        raise ValueError(
            f"keys must be 2-D (B, C), got shape {tuple(keys.shape)}; reshape it to (B, C)"
        )
    K, C = queue.shape
    B = keys.shape[0]
    if K == 0:
        raise ValueError("queue has no rows (K = 0): allocate it as (K, C) with K >= 1")
    if keys.shape[1] != C:
        raise ValueError(
            f"keys have C = {keys.shape[1]} columns but the queue has C = {C}: "
            "keys must be (B, C) like the queue's rows"
        )
    if B > K:
        raise ValueError(
            f"keys has B = {B} rows but the queue holds only K = {K}: enqueue at most K keys "
            "at a time (use a larger queue or a smaller batch)"
        )
    if ptr.dtype != torch.int64 or ptr.numel() != 1:
        raise ValueError(
            f"ptr must be a 1-element int64 tensor, got dtype {ptr.dtype} and shape "
            f"{tuple(ptr.shape)}: use torch.zeros(1, dtype=torch.long, device=queue.device)"
        )
    if ptr.device != queue.device:
        raise ValueError(
            f"ptr is on {ptr.device} but the queue is on {queue.device}: keep ptr on the "
            "queue's device (register it as a buffer next to the queue)"
        )
    if keys.device != queue.device:
        raise ValueError(
            f"keys are on {keys.device} but the queue is on {queue.device}: move them first"
        )
    if not (keys.is_floating_point() and queue.is_floating_point()):
        raise ValueError(
            f"queue and keys must be floating tensors, got {queue.dtype} and {keys.dtype}"
        )
