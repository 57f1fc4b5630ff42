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
one-time warning, when the extension was not built. Neither reads a CUDA pointer on the host.

The pointer must lie in [0, K): enqueue_ keeps it there, so a pointer outside was set or
restored by hand (a checkpoint of a queue of another size), and wrapping it modulo K would
hide that. On CPU tensors (host memory, reading it is no sync) both backends raise
ValueError before any write. On CUDA tensors the check runs on the device, the pointer is
never read back: the extension's kernel prints the value and stops with a device-side
assert, the torch path's torch._assert_async likewise; the next synchronising call then
raises "device-side assert triggered" and the CUDA context is lost (restart the process).
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

    ptr: 1-element int64 tensor on the queue's device, in [0, K), updated in place to
    (ptr + B) % K. A pointer outside [0, K) raises ValueError on CPU tensors, before any
    write; on CUDA tensors it stops the kernel with a device-side assert (a CUDA error at
    the next sync, the context lost), since reading it on the host would be a sync.
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
        _check_pointer(ptr, K)
        rows = (ptr.reshape(()) + torch.arange(B, device=queue.device)) % K  # B rows, on device
        queue.index_copy_(0, rows, _as_queue_dtype(keys, queue))
        ptr.add_(B).remainder_(K)
    return queue


# What to do about a pointer outside [0, K); csrc/enqueue.h's FASTMOCO_POINTER_FIX says the same.
_POINTER_FIX = (
    "the pointer is the queue row the next key goes to and enqueue_ keeps it in range, so it "
    "was set or restored elsewhere (e.g. with a queue of another size K); reset it with "
    "ptr.zero_() or set it below K"
)


def _check_pointer(ptr: torch.Tensor, K: int) -> None:
    """0 <= ptr < K for the torch path: read and checked here for CPU tensors (ValueError),
    else asserted on the device (never read back: no sync, capturable in a CUDA graph)."""
    if _host_readable(ptr):
        # Host memory, read like the extension's CPU kernel reads it: straight from memory,
        # not through aten::_local_scalar_dense (the device read that sync detectors watch
        # for; the tests run the step on CPU as a stand-in for CUDA, where nothing is read).
        value = int(ptr.numpy().reshape(-1)[0])
        if not 0 <= value < K:
            raise ValueError(f"ptr = {value} is outside [0, K) = [0, {K}): {_POINTER_FIX}")
        return
    _assert_pointer_on_device(ptr, K)


def _host_readable(ptr: torch.Tensor) -> bool:
    """ptr is read directly: a CPU tensor in eager mode (torch.compile cannot trace a read)."""
    return ptr.device.type == "cpu" and not torch.compiler.is_compiling()


def _assert_pointer_on_device(ptr: torch.Tensor, K: int) -> None:
    """torch._assert_async(0 <= ptr < K): on CUDA a kernel that fails on the device, the
    pointer never read back; on CPU (and under torch.compile) a RuntimeError at once.
    floor(ptr / K) == 0 is the range test in one op."""
    in_range = ptr.reshape(()).div(K, rounding_mode="floor") == 0
    torch._assert_async(in_range, f"enqueue_: ptr is outside [0, K) = [0, {K}): {_POINTER_FIX}")


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
