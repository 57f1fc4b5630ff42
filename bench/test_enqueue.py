"""enqueue_: writing B keys into the (K, C) queue at a device-resident pointer.

Run: pytest bench/ --benchmark-only. Implementations, same queue and keys:

  slice         fastmoco.ops.reference.enqueue_reference: the official slice assignment,
                `ptr = int(queue_ptr)` on the host (a device sync on CUDA), the baseline
  index_copy    index_copy_ at rows (ptr + arange(B)) % K computed on the device: the
                torch path of fastmoco.ops.enqueue_ (backend="torch")
  fastmoco      fastmoco.ops.enqueue_ with its default on CUDA, the extension's CUDA kernel;
                on CPU forced to backend="cuda", the extension's CPU kernel
  op            torch.ops.fastmoco.enqueue_ called directly (no Python checks)

Sizes: K = 65536, C = 128 (MoCo v2) with B = 256 (one GPU's batch) and B = 4096 (a
16-GPU global batch), fp32 and bf16 on CUDA; fp32 and B = 256 / 4096 on CPU. The pointer
starts near the end of the queue so every call wraps around.

Bytes: the keys read once and B rows of the queue written once, 2 B C sizeof(dtype); the
floor is those bytes over the copy bandwidth measured in the same run. At these sizes
(128 KiB to 2 MiB) the CUDA times are launch-bound: a few microseconds whatever the bytes.

Timing on CUDA (bench/measure.py): the device-pointer implementations as 100 calls captured
in one CUDA graph, the replay timed with CUDA events and divided by 100 (what a captured
training step pays); `slice` reads the pointer on the host, so it cannot be captured and is
timed call by call with events. pytest-benchmark's own columns come from host-timed rounds
that end in a synchronize.
"""

import functools
import time

import pytest
import torch
from measure import graphed, median_seconds

from fastmoco.ops import enqueue_
from fastmoco.ops.enqueue import extension_has_cuda, extension_op
from fastmoco.ops.reference import enqueue_reference

K, C = 65536, 128
CUDA = torch.cuda.is_available()
NO_GPU = pytest.mark.skipif(not CUDA, reason="no CUDA device: CPU cases only")
CASES = [pytest.param("cpu", B, torch.float32, id=f"cpu-B{B}-fp32") for B in (256, 4096)] + [
    pytest.param("cuda", B, dtype, id=f"cuda-B{B}-{name}", marks=NO_GPU)
    for B in (256, 4096)
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
]
IMPLS = ["slice", "index_copy", "fastmoco", "op"]
GRAPH_CALLS = 100


@functools.cache
def copy_bandwidth(device_type: str) -> float:
    """Bytes/s of a 64 MiB copy_ (read + write), the best of a few."""
    device = torch.device(device_type)
    n = 16 * 2**20
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    best = float("inf")
    for _ in range(10):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def _impl(name, device):
    if name == "slice":
        return enqueue_reference
    if name == "index_copy":
        return lambda q, p, k: enqueue_(q, p, k, backend="torch")
    if extension_op() is None or (device.type == "cuda" and not extension_has_cuda()):
        pytest.skip("fastmoco._C not built (with CUDA)")
    if name == "fastmoco":
        return lambda q, p, k: enqueue_(q, p, k, backend="cuda")
    return torch.ops.fastmoco.enqueue_


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,B,dtype", CASES)
def test_enqueue(benchmark, env_info, measure_peak, report_row, ceilings, device, B, dtype, impl):
    device = torch.device(device)
    fn = _impl(impl, device)
    queue = torch.randn(K, C, device=device).to(dtype)
    keys = torch.randn(B, C, device=device).to(dtype)
    ptr = torch.tensor([K - B // 2], device=device)  # every call wraps

    def run():
        ptr.fill_(K - B // 2)
        fn(queue, ptr, keys)

    def step():
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    peak = measure_peak(step, device)
    group = f"enqueue {device.type} K={K} C={C} B={B} {dtype}"
    benchmark.group = group
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)

    median = benchmark.stats.stats.median
    if device.type == "cuda" and impl == "slice":  # CUDA events; the host sync is its own
        median = median_seconds(run, device)
    elif device.type == "cuda":
        median = median_seconds(graphed(run, device, calls=GRAPH_CALLS), device) / GRAPH_CALLS
    nbytes = 2 * B * C * keys.element_size()
    floor = nbytes / (ceilings["copy_bytes_per_s"] or copy_bandwidth(device.type))
    cuda_floor = floor if device.type == "cuda" else None  # CPU copies: no stable reference
    report_row(group, impl, median, floor_s=cuda_floor, peak_bytes=peak, baseline="slice")
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update(
        device=str(device),
        bytes_moved=nbytes,
        achieved_gbps=round(nbytes / median / 1e9, 2),
        floor_us=round(floor * 1e6, 2),
        peak_extra_bytes=peak,
    )
