"""info_nce: fused (fastmoco) vs MoCo's Algorithm 1 under bf16 autocast vs the fp32 eager
reference vs that reference under torch.compile.

Run: pytest bench/ --benchmark-only. The MoCo setting: q needs a gradient, k and the queue
do not, the queue is the official (C, K) buffer passed as buf.T, unit rows.

  fastmoco   fastmoco.ops.info_nce: backend="triton" on CUDA (a kernel failure fails the
             benchmark instead of timing the PyTorch fallback), the chunked path on CPU
  autocast   Algorithm 1 as a user runs it: the official loss lines under bf16 autocast
             (bench/measure.py's algorithm1: tensor-core matmuls, logits N x (1+K))
  eager      fastmoco.ops.reference.info_nce_reference, the official formula in fp32
  compiled   the same reference under torch.compile (Inductor fuses what it can)

CUDA sizes: N in {256, 1024, 4096} x K in {16384, 65536, 262144, 1048576}, C = 128, bf16
and fp32, forward and forward+backward. A case that runs out of memory is reported as OOM
in the table (and skipped), not failed. CPU (no GPU): N in {64, 256}, K in {4096, 16384},
fp32, with `compiled` at the smallest size only (Inductor's CPU compile takes a while).

Timing on CUDA: triton.testing.do_bench's median (CUDA events, no host sync inside the timed
region) goes into the comparison table and extra_info["event_median_s"]; pytest-benchmark's
own columns come from a few host-timed rounds that end in a synchronize, and include Python.

The floor beside each CUDA row: max(bytes / copy bandwidth, flops / bf16 matmul rate), both
measured in the same run (the `ceilings` fixture); bytes = the queue read once plus q, k and
dq; flops = 2NKC forward, 4NKC forward+backward (forward and single-pass dq: q requires a
gradient in both modes, so on CUDA `fastmoco` runs its single-pass kernel and the "fwd" row
already holds dq's GEMM; the backward of "fwd+bwd" is one multiplication). The speed-up
column gives both ratios, against autocast and against eager. On CPU no floor is printed.
"""

import pytest
import torch
import torch.nn.functional as F
from measure import algorithm1, median_seconds

from fastmoco.ops import info_nce
from fastmoco.ops.reference import info_nce_reference

T = 0.2
CUDA = torch.cuda.is_available()
NO_GPU = pytest.mark.skipif(not CUDA, reason="no CUDA device: CPU cases only")


def _cases():
    cases = []
    for N in (64, 256):
        for K in (4096, 16384):
            cases.append(pytest.param("cpu", N, K, 128, torch.float32, id=f"cpu-N{N}-K{K}-fp32"))
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for N in (256, 1024, 4096):
            for K in (16384, 65536, 262144, 1048576):
                case_id = f"cuda-N{N}-K{K}-{name}"
                cases.append(pytest.param("cuda", N, K, 128, dtype, id=case_id, marks=NO_GPU))
    return cases


_compiled_reference = None


def _impl(name, device):
    global _compiled_reference
    if name == "fastmoco":
        backend = "triton" if device.type == "cuda" else None
        return lambda q, k, buf: info_nce(q, k, buf.T, T, backend=backend)
    if name == "autocast":
        return lambda q, k, buf: algorithm1(q, k, buf, T)
    if name == "eager":
        return lambda q, k, buf: info_nce_reference(q, k, buf.T, T)
    if _compiled_reference is None:
        # dynamic: one compile serves the whole N x K grid (static shapes would recompile
        # for each of its 24 sizes, minutes of Inductor time in a 10-minute GPU call).
        _compiled_reference = torch.compile(info_nce_reference, dynamic=True)
    return lambda q, k, buf: _compiled_reference(q, k, buf.T, T)


def floor_seconds(N, K, C, dtype, ceilings):
    """Forward and single-pass dq (module doc): the same work in both modes on CUDA."""
    if not CUDA:
        return None
    nbytes = (K * C + 3 * N * C) * (torch.finfo(dtype).bits // 8)
    flops = 4 * N * K * C
    return max(nbytes / ceilings["copy_bytes_per_s"], flops / ceilings["bf16_flops_per_s"])


@pytest.mark.parametrize("impl", ["fastmoco", "autocast", "eager", "compiled"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("device,N,K,C,dtype", _cases())
def test_info_nce(
    benchmark, env_info, measure_peak, report_row, ceilings, device, N, K, C, dtype, backward,
    impl,
):  # fmt: skip
    if impl == "compiled" and device == "cpu" and (N, K) != (64, 4096):
        pytest.skip("Inductor's CPU compile is slow: compiled runs at the smallest CPU size")
    device = torch.device(device)
    group = f"{'fwd+bwd' if backward else 'fwd'} {device.type} N={N} K={K} C={C} {dtype}"
    floor = floor_seconds(N, K, C, dtype, ceilings)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(N, C, device=device, dtype=dtype, generator=gen).requires_grad_()
    k = F.normalize(torch.randn(N, C, device=device, generator=gen), dim=1).to(dtype)
    buf = F.normalize(torch.randn(C, K, device=device, generator=gen), dim=0).to(dtype)
    fn = _impl(impl, device)

    def run():
        loss = fn(q, k, buf)
        if backward:
            loss.backward()
            q.grad = None

    def step():  # pytest-benchmark's host-timed rounds
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        step()  # warm-up outside the measurement (autotune, compile, allocator)
        peak = measure_peak(step, device)
    except torch.OutOfMemoryError:
        q.grad = None
        torch.cuda.empty_cache()
        report_row(group, impl, None, floor, None, baseline=("autocast", "eager"))
        pytest.skip(f"{impl} runs out of memory at N={N} K={K} {dtype}")
    rounds = 5
    benchmark.group = group
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)

    median = benchmark.stats.stats.median
    if device.type == "cuda":  # CUDA events, no sync inside the timed region
        median = median_seconds(run, device)
    report_row(group, impl, median, floor, peak, baseline=("autocast", "eager"))
    gflop = (4 if backward else 2) * N * K * C / 1e9
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update(
        device=str(device),
        peak_extra_bytes=peak,
        peak_extra_mib=round(peak / 2**20, 3),
        gflop=gflop,
        tflops=round(gflop / 1e3 / median, 4),
        queue_gbps=round(buf.numel() * buf.element_size() / 1e9 / median, 3),
        event_median_s=median if device.type == "cuda" else None,
        floor_us=None if floor is None else round(floor * 1e6, 2),
        times_floor=None if floor is None else round(median / floor, 2),
    )
