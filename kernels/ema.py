"""Multi-tensor EMA: the key encoder's momentum update over a whole model in one launch.

    theta_k <- m * theta_k + (1 - m) * theta_q  =  lerp(theta_k, theta_q, w),   w = 1 - m

for every tensor pair of one dtype. A model is ~150 tensors of very different sizes
(ResNet-50: 161 tensors, 64 to 2.4M elements), so one launch per tensor is latency-bound.
As in multi-tensor-apply (and Triton's grouped-GEMM tutorial), the tensors are cut into
chunks of BLOCK elements and a small device table says, per program, which tensor and
which chunk it owns:

    tensor table (T rows):   target address, source address, numel
    chunk table (n rows):    tensor index, first element          (n = sum ceil(numel / BLOCK))

The table is built once per model (EmaPlan, cached by the caller on the tensors' addresses)
and reused every step, with the launch's arguments precomputed, so a step is one launch
with no host work but the launch itself. Each table segment starts 16-byte aligned.

lerp is computed the way torch.lerp does, so w = 0 leaves theta_k exactly and w = 1 gives
theta_q exactly:  w < 0.5:  t + w (s - t);   else  s - (s - t)(1 - w).  Arithmetic runs in
fp32 (fp64 for fp64 tensors) whatever the storage dtype. The weight w = 1 - m comes either
as a float or as a 0-d tensor on the device read by every program (no host sync, so a
momentum schedule works inside a CUDA graph). A caller that holds w itself passes it as it
is: near m = 1, w is exact in float32 to 2^-24 of itself, where 1 - (m rounded to float32)
is not (m rounds to 1.0 once w < 2^-25).

Cost model: 12 bytes per fp32 parameter (read t, read s, write t), e.g. ResNet-50's 25.6M
parameters move 307 MB: ~0.10 ms at 3 TB/s. The table adds 16 bytes per chunk (0.4% at
BLOCK = 4096 fp32).

Caveats: tensors must be dense with identical strides on both sides (the caller falls back
to torch._foreach_lerp_ for the others); under TRITON_INTERPRET=1 the table's addresses are
dereferenced on the host, so only CPU tensors work there (which is how the tests run).
"""

import functools
import os
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The one config: no autotuning (a streaming kernel at 12 B per element has no tile to
# tune), so FASTMOCO_PIN_TILES=1, the device check's "one config per kernel" switch, has
# nothing to pin here. Variants compiled: one per (dtype, momentum as a float or a tensor,
# addresses 16-byte aligned or not). The interpreter runs programs one at a time with
# numpy: fewer, larger chunks are faster there.
BLOCK = 65536 if _INTERPRET else 4096
NUM_WARPS = 8

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


@triton.jit
def _ema_kernel(
    # tables (int64): per tensor, then per chunk
    target_addrs_ptr,
    source_addrs_ptr,
    numels_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    # the weight w = 1 - m: a 0-d tensor (WEIGHT_IN_TENSOR) or split as w_hi + w_lo
    weight_ptr,
    w_hi,
    w_lo,
    # meta-parameters
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    WEIGHT_IN_TENSOR: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.load(chunk_tensor_ptr + pid)
    start = tl.load(chunk_start_ptr + pid)
    numel = tl.load(numels_ptr + i)
    t_ptr = tl.load(target_addrs_ptr + i).to(tl.pointer_type(DTYPE))
    s_ptr = tl.load(source_addrs_ptr + i).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every address is 16-byte aligned: lets the compiler use 128-bit accesses
        t_ptr = tl.multiple_of(t_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
    if WEIGHT_IN_TENSOR:
        w = tl.load(weight_ptr).to(COMPUTE)
    else:  # two fp32 halves, so an fp64 group gets its weight to ~48 bits
        w = tl.cast(w_hi, COMPUTE) + tl.cast(w_lo, COMPUTE)

    offs = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:  # a full chunk: no mask, so loads and stores stay vectorised
        t = tl.load(t_ptr + offs).to(COMPUTE)
        s = tl.load(s_ptr + offs).to(COMPUTE)
        diff = s - t
        out = tl.where(w < 0.5, t + w * diff, s - diff * (1.0 - w))
        tl.store(t_ptr + offs, out.to(DTYPE))
    else:  # the tensor's ragged last chunk
        mask = offs < numel
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        diff = s - t
        out = tl.where(w < 0.5, t + w * diff, s - diff * (1.0 - w))
        tl.store(t_ptr + offs, out.to(DTYPE), mask=mask)


@dataclass(frozen=True)
class EmaPlan:
    """The device tables for one list of (target, source) tensors of one dtype and device,
    with everything a launch needs precomputed (ema_ adds only the momentum).

    Holds addresses, not tensors: the caller keys its cache on those addresses (and sizes),
    so a plan is reused exactly while the model's storage stays where it was.
    """

    table: torch.Tensor  # int64 on the tensors' device: the five segments below, padded
    segments: tuple  # views of table: target addrs, source addrs, numels, chunk tensor, start
    num_tensors: int
    num_chunks: int
    dtype: torch.dtype
    aligned: bool
    block: int
    meta: dict  # the launch's constexprs and num_warps


def _padded(values: list[int]) -> list[int]:
    """values with a 0 appended to an odd length: every segment then starts 16-byte aligned,
    so Triton compiles one variant for all five table pointers (it specialises on that)."""
    return values + [0] * (len(values) % 2)


def build_ema_plan(targets, sources, block: int = BLOCK) -> EmaPlan:
    """Pack addresses and sizes of equally shaped, dense target/source pairs into a table.

    All tensors must share one floating dtype and one device; empty tensors are dropped.
    """
    pairs = [(t, s) for t, s in zip(targets, sources, strict=True) if t.numel() > 0]
    dtype = targets[0].dtype if targets else torch.float32
    device = targets[0].device if targets else torch.device("cpu")
    t_addrs = [t.data_ptr() for t, _ in pairs]
    s_addrs = [s.data_ptr() for _, s in pairs]
    numels = [t.numel() for t, _ in pairs]
    chunk_tensor, chunk_start = [], []
    for i, n in enumerate(numels):
        starts = range(0, n, block)
        chunk_tensor.extend([i] * len(starts))
        chunk_start.extend(starts)
    columns = [t_addrs, s_addrs, numels, chunk_tensor, chunk_start]
    host = torch.tensor([v for col in columns for v in _padded(col)], dtype=torch.int64)
    table = host.to(device)
    segments, offset = [], 0
    for col in columns:
        segments.append(table[offset : offset + len(col)])
        offset += len(_padded(col))
    aligned = all(a % 16 == 0 for a in t_addrs + s_addrs)
    meta = dict(
        DTYPE=_TL_DTYPES[dtype],
        COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
        ALIGNED=aligned,
        BLOCK=block,
        num_warps=NUM_WARPS,
    )
    return EmaPlan(table, tuple(segments), len(pairs), len(chunk_tensor), dtype, aligned, block,
                   meta)  # fmt: skip


@functools.lru_cache(maxsize=64)
def _weight_halves(w: float) -> tuple[float, float]:
    """w as w_hi (w rounded to fp32) + w_lo, so an fp64 group gets ~48 bits of w."""
    w_hi = struct.unpack("f", struct.pack("f", w))[0]
    return w_hi, w - w_hi


def ema_(plan: EmaPlan, momentum: float | torch.Tensor | None = None, *, weight=None) -> None:
    """One launch: target <- lerp(target, source, w) over every tensor of plan, w = 1 -
    momentum or the given weight (a float, or a 0-d floating tensor on the plan's device,
    read on the device)."""
    if plan.num_chunks == 0:
        return
    if weight is None and isinstance(momentum, torch.Tensor):
        # 1 - m in the kernel's arithmetic dtype, as the kernel itself would compute it
        compute = torch.float64 if plan.dtype == torch.float64 else torch.float32
        weight = 1.0 - momentum.to(compute)
    elif weight is None:
        weight = 1.0 - float(momentum)
    if isinstance(weight, torch.Tensor):
        _ema_kernel[(plan.num_chunks,)](
            *plan.segments, weight, 0.0, 0.0, WEIGHT_IN_TENSOR=True, **plan.meta
        )
    else:  # plan.table: an unused pointer argument
        w_hi, w_lo = _weight_halves(float(weight))
        _ema_kernel[(plan.num_chunks,)](
            *plan.segments, plan.table, w_hi, w_lo, WEIGHT_IN_TENSOR=False, **plan.meta
        )
