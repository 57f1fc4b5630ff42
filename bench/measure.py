"""How the benchmarks time and what they compare against, in one place (bench/device_check.py
and the pytest-benchmark suite both use it).

- median_seconds: on CUDA, triton.testing.do_bench's median (CUDA events around each call,
  L2 flushed between calls, many calls): no host sync inside the timed region. On CPU,
  perf_counter around plain calls.
- graphed: many calls of a small op captured in one CUDA graph, so a replay measures the
  GPU work and not the Python and launch overhead between calls.
- copy_rate, matmul_rate: the ceilings measured in the same run (bytes read + written by a
  large device copy; a bf16 matmul on random data, never zeros, which run faster).
- algorithm1: MoCo's loss as its paper's Algorithm 1 and the official builder.py write it,
  run the way a user runs it: under bf16 autocast (tensor-core matmuls).
- git_commit: the commit measured, for the results' environment rows.
"""

import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, grad_to_none=None, cpu_reps: int = 1) -> float:
    """Median seconds of one call of fn (module doc)."""
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(
            fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"
        )
        return ms / 1e3
    fn()  # warm-up
    times = []
    for _ in range(cpu_reps):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def graphed(fn, device: torch.device, calls: int = 1):
    """A callable replaying `calls` calls of fn captured in one CUDA graph (warmed up on a
    side stream first, as torch.cuda.graph asks); on CPU, the calls themselves."""
    if device.type != "cuda":
        return lambda: [fn() for _ in range(calls)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def copy_rate(device: torch.device, nbytes: int) -> tuple[float, float]:
    """(bytes/s read + written, median seconds) of copying nbytes of fp32 on device."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device)
    return 2 * n * 4 / seconds, seconds


def matmul_rate(device: torch.device, size: int) -> tuple[float, float]:
    """(flop/s, median seconds) of a size^3 bf16 matmul on random data."""
    a = torch.randn(size, size, device=device).bfloat16()
    b = torch.randn(size, size, device=device).bfloat16()
    seconds = median_seconds(lambda: a @ b, device)
    return 2 * size**3 / seconds, seconds


def algorithm1(q, k, buf, temperature):
    """MoCo's Algorithm 1 (the official builder.py's loss lines) under bf16 autocast:
    normalised features, einsum logits against a clone of the (C, K) queue buffer,
    concatenation, cross-entropy with label 0."""
    with torch.autocast(q.device.type, dtype=torch.bfloat16):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, buf.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels)


def info_nce_floor(N, K, C, dtype, copy_bytes_per_s, flops_per_s) -> float:
    """Least time for info_nce forward + single-pass dq: the queue, q and k read and dq
    written once, against 4NKC flops (logits, then dq: backward is one multiplication)."""
    size = torch.finfo(dtype).bits // 8
    nbytes = (K * C + 3 * N * C) * size
    return max(nbytes / copy_bytes_per_s, 4 * N * K * C / flops_per_s)


def git_commit() -> str:
    """The short hash of this checkout's HEAD, or "unknown" (no git, not a checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
