"""Host (Python + dispatch) time of one call, with the GPU kernel launches stubbed.

At MoCo's sizes the device work of the momentum update and of info_nce is tens of
microseconds, so in eager training the host decides the step time. This file times the
public ops with every Triton launch replaced by a no-op, so that on any machine (the CPU CI
included) it measures exactly what the host does per call, beside the PyTorch baselines on
the same machine in the same run.

Run: pytest bench/test_host_overhead.py --benchmark-only (part of `pytest bench/`).

What is stubbed, and only that: the `run` method of every Triton kernel object
(triton.runtime.KernelInterface: @triton.jit functions, autotuners, heuristics) found in
the modules of fastmoco.kernels, i.e. what `kernel[grid](*args)` calls:
Triton's argument binding, autotune look-up and driver launch. Everything before it runs:
input checks, structure checks, plan look-up, the custom-op dispatch, autograd, output
allocation, dtype casts. Triton's own launch costs, on a GPU machine, come on top (they
are the same for any Triton kernel and are not measured here). Each case first checks
that a call does reach the stub, so a fallback to the PyTorch path cannot be timed.

Inputs (the tensors are tiny, so the PyTorch baselines measure their dispatch, not compute):
  momentum_update_: the 161 parameters of torchvision's ResNet-50, each reshaped to one
    element with its rank kept (a conv weight becomes 1x1x1x1); the module tree is
    ResNet-50's. Rows: `loop` (the official per-parameter loop,
    fastmoco.ops.reference.momentum_update_reference), `foreach_lerp`
    (torch._foreach_lerp_(t, s, 1 - m), the baseline), `fastmoco lists` and
    `fastmoco modules` (momentum_update_ with backend="triton" on the lists and on the two
    modules), `ema_ (plan held)` (kernels/ema.py's ema_ with its plan built once: the floor
    of the public op's path).
  info_nce: MoCo's call (q needs a gradient; k and the queue do not), N = 256, K = 65536,
    C = 128, fp32, queue = buf.T of the official (C, K) buffer, backend="triton":
    `forward` and `forward+backward`.
On a CPU machine the tensors are CPU tensors (the kernels' CPU path is the Triton
interpreter, which the stub replaces); on a GPU machine, CUDA tensors.
"""

import copy
import functools
import importlib
import os
import pkgutil

import pytest
import torch
from torchvision.models import resnet50

from fastmoco.ops import info_nce, momentum_update_
from fastmoco.ops.reference import momentum_update_reference

M = 0.999
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no GPU and no Triton interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
ROUNDS, ITERATIONS = 300, 1  # one call per round: the median skips rounds another job preempted


class StubbedLaunches:
    """Replaces the `run` of every Triton kernel object in the fastmoco.kernels modules by
    a counter: `kernel[grid](*args)` then launches nothing and counts one."""

    def __init__(self, monkeypatch):
        import triton.runtime

        import fastmoco.kernels

        self.launches = 0
        self.names = []
        for info in pkgutil.iter_modules(fastmoco.kernels.__path__):
            module = importlib.import_module(f"fastmoco.kernels.{info.name}")
            for name, obj in vars(module).items():
                if isinstance(obj, triton.runtime.KernelInterface):
                    monkeypatch.setattr(obj, "run", self._launch)
                    self.names.append(f"{info.name}.{name}")

    def _launch(self, *args, grid, warmup, **kwargs):
        self.launches += 1


@pytest.fixture
def stubbed_launches(monkeypatch):
    stub = StubbedLaunches(monkeypatch)
    assert "ema._ema_kernel" in stub.names, stub.names  # the stub reaches the kernels
    return stub


def _tiny(model: torch.nn.Module) -> torch.nn.Module:
    """model with every parameter replaced by a 1-element tensor of the same rank."""
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                tiny = torch.randn([1] * p.dim(), generator=gen).to(DEVICE)
                module._parameters[name] = torch.nn.Parameter(tiny)
    return model.to(DEVICE)


@functools.cache
def _resnet50_pair():
    target = _tiny(resnet50())
    source = copy.deepcopy(target)
    return target, source


def _ema_call(impl: str):
    target, source = _resnet50_pair()
    targets = [p.detach() for p in target.parameters()]
    sources = [p.detach() for p in source.parameters()]
    assert len(targets) == 161
    if impl == "loop":
        return lambda: momentum_update_reference(targets, sources, M)
    if impl == "foreach_lerp":
        return lambda: torch._foreach_lerp_(targets, sources, 1.0 - M)
    if impl == "fastmoco lists":
        return lambda: momentum_update_(targets, sources, M, backend="triton")
    if impl == "fastmoco modules":
        return lambda: momentum_update_(target, source, M, backend="triton")
    if impl == "ema_ (plan held)":
        from fastmoco.kernels.ema import build_ema_plan, ema_

        plan = build_ema_plan(targets, sources)
        return lambda: ema_(plan, M)
    raise AssertionError(impl)


def _time(benchmark, fn, group, impl, report_row, env_info, baseline):
    fn()  # warm-up: plan build, first dispatch
    benchmark.group = group
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=2)
    report_row(group, impl, benchmark.stats.stats.median, baseline=baseline)
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update(device=DEVICE, launches="stubbed")


EMA_IMPLS = ["loop", "foreach_lerp", "fastmoco lists", "fastmoco modules", "ema_ (plan held)"]


@pytest.mark.parametrize("impl", EMA_IMPLS)
def test_momentum_update_host(benchmark, stubbed_launches, report_row, env_info, impl):
    group = f"host, launch stubbed: momentum_update_ ResNet-50 (161 tensors, {DEVICE})"
    fn = _ema_call(impl)
    fn()  # warm-up: plan build, first dispatch
    if impl.startswith(("fastmoco", "ema_")):  # the kernel path, not a fallback, is timed
        before = stubbed_launches.launches
        fn()
        assert stubbed_launches.launches == before + 1
    with torch.no_grad():
        _time(benchmark, fn, group, impl, report_row, env_info, "foreach_lerp")


@functools.cache
def _info_nce_inputs(n=256, k=65536, c=128):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(n, c, generator=gen).to(DEVICE).requires_grad_(True)
    key = torch.randn(n, c, generator=gen).to(DEVICE)
    buf = torch.randn(c, k, generator=gen).to(DEVICE)  # the official (C, K) buffer
    return q, key, buf.T


@pytest.mark.parametrize("impl", ["forward", "forward+backward"])
def test_info_nce_host(benchmark, stubbed_launches, report_row, env_info, impl):
    q, key, queue = _info_nce_inputs()

    def forward():
        return info_nce(q, key, queue, 0.2, backend="triton")

    def forward_backward():
        forward().backward()

    fn = forward if impl == "forward" else forward_backward
    fn()  # warm-up
    before = stubbed_launches.launches
    fn()
    assert stubbed_launches.launches > before, "info_nce did not take the Triton kernels"
    group = f"host, launch stubbed: info_nce N=256 K=65536 C=128 fp32 ({DEVICE})"
    _time(benchmark, fn, group, impl, report_row, env_info, None)
    if impl == "forward+backward":
        assert q.grad is not None and q.grad.shape == q.shape  # backward did run
