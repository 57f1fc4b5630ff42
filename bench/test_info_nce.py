"""info_nce: fused (fastmoco) vs the eager reference vs the reference under torch.compile.

Run: pytest bench/ --benchmark-only. The MoCo setting: q needs a gradient, k and the queue
do not, the queue is the official (C, K) buffer passed as buf.T, unit rows.

  fastmoco   fastmoco.ops.info_nce: the Triton kernels on CUDA, the chunked PyTorch path
             on CPU
  eager      fastmoco.ops.reference.info_nce_reference (the official formula, logits N x (1+K))
  compiled   the same reference under torch.compile (Inductor fuses what it can)

CUDA sizes: N in {256, 1024, 4096} x K in {16384, 65536, 262144, 1048576}, C = 128, bf16
and fp32, forward and forward+backward. A case that runs out of memory is reported as OOM
in the table (and skipped), not failed. CPU (no GPU): N in {64, 256}, K in {4096, 16384},
fp32, with `compiled` at the smallest size only (Inductor's CPU compile takes a while).

The floor printed beside each row: max(bytes / bandwidth, flops / throughput) with the
H100 figures of ../shared/REFERENCES.md (3.0 TB/s; 800 TFLOP/s bf16 dense, 400 fp32 as
TF32 or 60 as IEEE fp32); bytes = the queue read once (plus q and k), flops = 2NKC forward,
+4NKC for backward (the logits recomputed, then dq). On CPU no floor is printed.
q requires a gradient in both modes (the training forward), so on CUDA `fastmoco` runs its
single-pass kernel there: the "fwd" row already includes dq's GEMM (about 2x the forward's
work) and the backward of "fwd+bwd" is one multiplication.
"""

import pytest
import torch
import torch.nn.functional as F

from fastmoco.ops import info_nce
from fastmoco.ops.reference import info_nce_reference

T = 0.2
CUDA = torch.cuda.is_available()
NO_GPU = pytest.mark.skipif(not CUDA, reason="no CUDA device: CPU cases only")
BANDWIDTH = 3.0e12  # bytes/s, H100 copy, measured (REFERENCES.md)
RATE = {torch.bfloat16: 800e12, torch.float16: 800e12, torch.float32: 60e12}  # flop/s


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


def _impl(name):
    global _compiled_reference
    if name == "fastmoco":
        return lambda q, k, queue: info_nce(q, k, queue, T)
    if name == "eager":
        return lambda q, k, queue: info_nce_reference(q, k, queue, T)
    if _compiled_reference is None:
        # dynamic: one compile serves the whole N x K grid (static shapes would recompile
        # for each of its 24 sizes, minutes of Inductor time in a 10-minute GPU call).
        _compiled_reference = torch.compile(info_nce_reference, dynamic=True)
    return lambda q, k, queue: _compiled_reference(q, k, queue, T)


def floor_seconds(N, K, C, dtype, backward):
    if not CUDA:
        return None
    size = torch.finfo(dtype).bits // 8
    bytes_moved = (K * C + 2 * N * C) * size
    flops = (6 if backward else 2) * N * K * C
    rate = RATE[dtype]
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        rate = 400e12
    return max(bytes_moved / BANDWIDTH, flops / rate)


@pytest.mark.parametrize("impl", ["fastmoco", "eager", "compiled"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("device,N,K,C,dtype", _cases())
def test_info_nce(
    benchmark, env_info, measure_peak, report_row, device, N, K, C, dtype, backward, impl
):
    if impl == "compiled" and device == "cpu" and (N, K) != (64, 4096):
        pytest.skip("Inductor's CPU compile is slow: compiled runs at the smallest CPU size")
    device = torch.device(device)
    group = f"{'fwd+bwd' if backward else 'fwd'} {device.type} N={N} K={K} C={C} {dtype}"
    floor = floor_seconds(N, K, C, dtype, backward)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(N, C, device=device, dtype=dtype, generator=gen).requires_grad_()
    k = F.normalize(torch.randn(N, C, device=device, generator=gen), dim=1).to(dtype)
    buf = F.normalize(torch.randn(C, K, device=device, generator=gen), dim=0).to(dtype)
    fn = _impl(impl)

    def step():
        loss = fn(q, k, buf.T)
        if backward:
            loss.backward()
            q.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the work, not the launch

    try:
        step()  # warm-up outside the measurement (autotune, compile, allocator)
        peak = measure_peak(step, device)
    except torch.OutOfMemoryError:
        q.grad = None
        torch.cuda.empty_cache()
        report_row(group, impl, None, floor, None)
        pytest.skip(f"{impl} runs out of memory at N={N} K={K} {dtype}")
    rounds = 30 if device.type == "cuda" else 5
    benchmark.group = group
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)

    median = benchmark.stats.stats.median
    report_row(group, impl, median, floor, peak)
    gflop = (4 if backward else 2) * N * K * C / 1e9
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update(
        device=str(device),
        peak_extra_bytes=peak,
        peak_extra_mib=round(peak / 2**20, 3),
        gflop=gflop,
        tflops=round(gflop / 1e3 / median, 4),
        queue_gbps=round(buf.numel() * buf.element_size() / 1e9 / median, 3),
        floor_us=None if floor is None else round(floor * 1e6, 2),
        times_floor=None if floor is None else round(median / floor, 2),
    )
