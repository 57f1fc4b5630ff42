"""info_nce against the eager reference formula: median time and peak extra memory.

Run: pytest bench/ --benchmark-only. Each group compares fastmoco's info_nce with
fastmoco.ops.reference.info_nce_reference on the same inputs, in the MoCo setting: q needs
a gradient, k and the queue do not, the queue is the official (C, K) buffer passed as buf.T.
CPU cases use small sizes (absolute CPU times mean little; the ratio and the memory do);
CUDA cases, when a GPU is present, use the MoCo v2 sizes N=256, K=65536, C=128.

extra_info: peak_extra_bytes (see conftest.py for how it is measured), gflop (the model's
useful work: 2NKC forward, 4NKC forward+backward; the chunked op recomputes the logits in
backward, 6NKC, which is not counted), tflops and queue_gbps (queue bytes over the median:
the one tensor that must be streamed), plus device, versions and commit.
"""

import pytest
import torch
import torch.nn.functional as F

from fastmoco.ops import info_nce
from fastmoco.ops.reference import info_nce_reference

T = 0.2
CUDA = torch.cuda.is_available()
NO_GPU = pytest.mark.skipif(not CUDA, reason="no CUDA device: CPU cases only")

CASES = [
    pytest.param("cpu", N, K, 128, torch.float32, id=f"cpu-N{N}-K{K}-C128-fp32")
    for N in (64, 256)
    for K in (4096, 16384)
] + [
    pytest.param("cuda", 256, 65536, 128, dtype, id=f"cuda-N256-K65536-C128-{name}", marks=NO_GPU)
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32"))
]

IMPLS = {
    "fastmoco": lambda q, k, queue: info_nce(q, k, queue, T),
    "reference": lambda q, k, queue: info_nce_reference(q, k, queue, T),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("device,N,K,C,dtype", CASES)
def test_info_nce(benchmark, env_info, measure_peak, device, N, K, C, dtype, backward, impl):
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(N, C, device=device, dtype=dtype, generator=gen).requires_grad_()
    k = F.normalize(torch.randn(N, C, device=device, generator=gen), dim=1).to(dtype)
    buf = F.normalize(torch.randn(C, K, device=device, generator=gen), dim=0).to(dtype)
    fn = IMPLS[impl]

    def step():
        loss = fn(q, k, buf.T)
        if backward:
            loss.backward()
            q.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the work, not the launch

    step()  # warm-up outside the measurement (allocator, kernels, BLAS)
    peak = measure_peak(step, device)
    rounds = 30 if device.type == "cuda" else 5
    benchmark.group = f"{'fwd+bwd' if backward else 'fwd'} {device.type} N={N} K={K} C={C} {dtype}"
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)

    gflop = (4 if backward else 2) * N * K * C / 1e9
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update(
        device=str(device),
        peak_extra_bytes=peak,
        peak_extra_mib=round(peak / 2**20, 3),
        gflop=gflop,
        tflops=round(gflop / 1e3 / median, 4),
        queue_gbps=round(buf.numel() * buf.element_size() / 1e9 / median, 3),
    )
