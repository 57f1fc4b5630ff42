"""momentum_update_: the key encoder's EMA over a whole model's parameter list.

Run: pytest bench/ --benchmark-only. Implementations, on the same fp32 tensor lists:

  loop          fastmoco.ops.reference.momentum_update_reference: the official per-parameter
                Python loop (`p_k.data = p_k.data * m + p_q.data * (1 - m)`), the baseline
  foreach_mul_add  torch._foreach_mul_(t, m) + torch._foreach_add_(t, s, alpha=1 - m)
  foreach_lerp  torch._foreach_lerp_(t, s, 1 - m)
  fastmoco      fastmoco.ops.momentum_update_ on the lists (validation, table look-up, then
                on CUDA the Triton kernel, forced with backend="triton" so that a kernel
                failure fails the benchmark; on CPU _foreach_lerp_)
  kernel        kernels/ema.py's ema_ with its table built once, 10 calls replayed from one
                CUDA graph (what a captured training step pays: no Python per step); CUDA
                only (on CPU it would be the interpreter)

Timing on CUDA: triton.testing.do_bench's median (CUDA events, no host sync inside the timed
region, bench/measure.py) goes into the comparison table; pytest-benchmark's own columns
come from a few host-timed rounds that end in a synchronize.

Parameter sets: torchvision ResNet-50 (161 tensors, 25.6M) and ViT-B/16 (152, 86.6M) on
CUDA; on CPU a ResNet-18 (62, 11.7M) and a small ViT (4 layers, width 192) so the suite
stays quick. Parameters only (no BN buffers), as the official update.

Bytes: lerp reads t and s and writes t, 12 bytes per fp32 parameter; that is the least any
implementation moves (mul+add moves 20, the loop 28 plus allocations). Reported: achieved
bandwidth = 12 B x params / median, and the floor = 12 B x params / the copy bandwidth
measured in the same run (a 1 GiB copy_, read + write: the `ceilings` fixture), so
"x floor" 1.25 means 80 % of the measured copy bandwidth. The table shows the floor on
CUDA only (extra_info has it on CPU too, for what a noisy shared CPU's copy is worth).
"""

import functools
import time

import pytest
import torch
from measure import graphed, median_seconds
from torchvision.models import resnet18, resnet50, vit_b_16
from torchvision.models.vision_transformer import VisionTransformer

from fastmoco.ops import momentum_update_
from fastmoco.ops.reference import momentum_update_reference

M = 0.999
CUDA = torch.cuda.is_available()
NO_GPU = pytest.mark.skipif(not CUDA, reason="no CUDA device: CPU cases only")

MODELS = {
    "resnet18": lambda: resnet18(),
    "vit-small": lambda: VisionTransformer(
        image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=192, mlp_dim=768
    ),
    "resnet50": lambda: resnet50(),
    "vit_b_16": lambda: vit_b_16(),
}
CASES = [
    pytest.param("cpu", "resnet18", id="cpu-resnet18"),
    pytest.param("cpu", "vit-small", id="cpu-vit-small"),
    pytest.param("cuda", "resnet50", id="cuda-resnet50", marks=NO_GPU),
    pytest.param("cuda", "vit_b_16", id="cuda-vit_b_16", marks=NO_GPU),
]
IMPLS = ["loop", "foreach_mul_add", "foreach_lerp", "fastmoco", "kernel"]
GRAPH_CALLS = 10  # the kernel's calls per graph replay


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def copy_bandwidth(device_type: str) -> float:
    """Bytes/s of a large copy_ (read + write counted), the best of a few, on this device:
    the fastest copy observed makes the floor a conservative (low) time."""
    device = torch.device(device_type)
    n = (256 if device.type == "cuda" else 32) * 2**20 // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    times = []
    for _ in range(10 if device.type == "cuda" else 5):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * n * 4 / min(times)


@functools.cache
def _parameters(model: str):
    torch.manual_seed(0)
    return [p.detach() for p in MODELS[model]().parameters()]


def _step(impl, targets, sources, device):
    if impl == "loop":
        return lambda: momentum_update_reference(targets, sources, M)
    if impl == "foreach_mul_add":

        def mul_add():
            torch._foreach_mul_(targets, M)
            torch._foreach_add_(targets, sources, alpha=1 - M)

        return mul_add
    if impl == "foreach_lerp":
        return lambda: torch._foreach_lerp_(targets, sources, 1 - M)
    if impl == "fastmoco":
        backend = "triton" if device.type == "cuda" else None
        return lambda: momentum_update_(targets, sources, M, backend=backend)
    if device.type != "cuda":
        pytest.skip("the Triton kernel alone is timed on CUDA only (CPU: the interpreter)")
    from fastmoco.kernels.ema import build_ema_plan, ema_

    plan = build_ema_plan(targets, sources)
    return graphed(lambda: ema_(plan, M), device, calls=GRAPH_CALLS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,model", CASES)
def test_momentum_update(
    benchmark, env_info, measure_peak, report_row, ceilings, device, model, impl
):
    device = torch.device(device)
    params = _parameters(model)
    targets = [p.to(device, copy=True) for p in params]
    sources = [(p + 0.01).to(device) for p in params]
    fn = _step(impl, targets, sources, device)

    def step():
        fn()
        _sync(device)  # time the work, not the launch

    step()  # warm-up: Triton compile, table build, allocator
    peak = measure_peak(step, device)
    numel = sum(p.numel() for p in params)
    group = f"ema {device.type} {model} ({len(params)} tensors, {numel / 1e6:.1f}M fp32)"
    benchmark.group = group
    benchmark.pedantic(step, rounds=5, warmup_rounds=2, iterations=1)

    median = benchmark.stats.stats.median
    if device.type == "cuda":  # CUDA events, no sync inside the timed region
        median = median_seconds(fn, device) / (GRAPH_CALLS if impl == "kernel" else 1)
    nbytes = 12 * numel
    bandwidth = ceilings["copy_bytes_per_s"] or copy_bandwidth(device.type)
    floor = nbytes / bandwidth
    # No floor on CPU: a shared 2-core machine's copy_ is no stable bandwidth reference.
    cuda_floor = floor if device.type == "cuda" else None
    report_row(group, impl, median, floor_s=cuda_floor, peak_bytes=peak, baseline="loop")
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update(
        device=str(device),
        tensors=len(params),
        params=numel,
        bytes_moved_min=nbytes,
        achieved_gbps=round(nbytes / median / 1e9, 2),
        copy_gbps_measured=round(bandwidth / 1e9, 2),
        floor_us=round(floor * 1e6, 2),
        pct_of_copy_bandwidth=round(100 * floor / median, 1),
        peak_extra_bytes=peak,
    )
