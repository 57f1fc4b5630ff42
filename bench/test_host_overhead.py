"""Host (Python + dispatch) time of one call, with the GPU kernel launches stubbed.

At MoCo's sizes the device work of the momentum update and of info_nce is tens of
microseconds, so in eager training the host decides the step time. This file times the
public ops with every Triton launch replaced by a no-op, so that on any machine (the CPU CI
included) it measures what the host does per call, beside the PyTorch baselines on the
same machine in the same run.

Run: pytest bench/test_host_overhead.py --benchmark-only (part of `pytest bench/`).

What is stubbed, and only that: the `run` method of every Triton kernel object
(triton.runtime.KernelInterface: @triton.jit functions, autotuners, heuristics) found in
the modules of fastmoco.kernels, i.e. what `kernel[grid](*args)` calls:
Triton's argument binding, autotune look-up and driver launch. Everything before it runs:
input checks, structure checks, plan look-up, the custom-op dispatch, autograd, output
allocation, dtype casts. Triton's own launch costs, on a GPU machine, come on top (they
are the same for any Triton kernel and are not measured here). Each case first checks
that a call does reach the stub, so a fallback to the PyTorch path cannot be timed.

Host work, not the CPU doing the GPU's work. On a CPU machine the tensors are CPU tensors
(the kernels' CPU path is the Triton interpreter, which the stub replaces), so every aten
op around the launches (an allocation, a reduction, backward's multiplication, the
gradient's accumulation) also does its arithmetic on the CPU, work that a GPU does
asynchronously after a launch of a few microseconds. So the timed calls use tiny tensors
(the "host" groups): the same code path, decision for decision, whose aten ops cost their
dispatch and allocation but next to no arithmetic; each row's name counts the launches one
call makes on a GPU (Triton kernels, and aten ops other than allocations and views,
counted once per case with a TorchDispatchMode), since each adds a launch's host time on a
GPU that the CPU run cannot show. A group at MoCo's real sizes on CPU tensors shows what
that arithmetic adds on this CPU (for info_nce; Algorithm 1 there would time a
256 x 65536 matmul, not host work).

Inputs (the PyTorch baselines measure their dispatch, not compute):
  momentum_update_: the 161 parameters of torchvision's ResNet-50, each reshaped to one
    element with its rank kept (a conv weight becomes 1x1x1x1); the module tree is
    ResNet-50's. Rows: `loop` (the official per-parameter loop,
    fastmoco.ops.reference.momentum_update_reference), `foreach_lerp`
    (torch._foreach_lerp_(t, s, 1 - m), the baseline), `fastmoco lists` and
    `fastmoco modules` (momentum_update_ with backend="triton" on the lists and on the two
    modules), `ema_ (plan held)` (kernels/ema.py's ema_ with its plan built once: the floor
    of the public op's path).
  info_nce: MoCo's call (q needs a gradient; k and the queue do not; queue = buf.T of the
    official (C, K) buffer, fp32, T = 0.2), backend="triton", forward and forward+backward
    (q.grad set to None before each call, as zero_grad does: in training q is the
    encoder's output and no gradient accumulates into it). Host group: N = 8, K = 64,
    C = 16, beside MoCo's Algorithm 1 on the same tensors, the official builder's loss
    lines (normalize, einsum against a clone of the buffer, cat, cross-entropy) in fp32 and
    under bf16 autocast (bench/measure.py's algorithm1). CPU-arithmetic group: N = 256,
    K = 65536, C = 128.
On a GPU machine the tensors are CUDA tensors (there the aten ops are real launches).
"""

import copy
import functools
import importlib
import os
import pkgutil

import pytest
import torch
from measure import algorithm1
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


# aten ops that launch nothing on a GPU: allocations and views
_NO_LAUNCH = {
    "empty", "empty_strided", "empty_like", "view", "_unsafe_view", "as_strided", "detach",
    "alias", "t", "transpose", "unsqueeze", "squeeze", "expand", "permute", "slice", "select",
    "split", "split_with_sizes", "unbind", "lift_fresh",
}  # fmt: skip


def device_launches(fn, stub) -> tuple[int, int]:
    """(Triton launches, launching aten ops) of one call of fn."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in _NO_LAUNCH:
                Count.ops += 1
            return func(*args, **(kwargs or {}))

    before = stub.launches
    with Count():
        fn()
    return stub.launches - before, Count.ops


@functools.cache
def _info_nce_inputs(n, k, c):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(n, c, generator=gen).to(DEVICE).requires_grad_(True)
    key = torch.nn.functional.normalize(torch.randn(n, c, generator=gen), dim=1).to(DEVICE)
    buf = torch.nn.functional.normalize(torch.randn(c, k, generator=gen), dim=0).to(DEVICE)
    return q, key, buf  # buf: the official (C, K) buffer


def algorithm1_fp32(q, k, buf, temperature):
    """MoCo's Algorithm 1 as the official builder.py writes it (fp32, no autocast)."""
    q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, buf.clone().detach())
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=q.device)
    return torch.nn.functional.cross_entropy(logits, labels)


INFO_NCE_IMPLS = {
    "fastmoco": lambda q, k, buf: info_nce(q, k, buf.T, 0.2, backend="triton"),
    "Algorithm 1": lambda q, k, buf: algorithm1_fp32(q, k, buf, 0.2),
    "Algorithm 1, bf16 autocast": lambda q, k, buf: algorithm1(q, k, buf, 0.2),
}
HOST_SIZES, MOCO_SIZES = (8, 64, 16), (256, 65536, 128)


def _info_nce_call(impl, pass_, sizes):
    q, key, buf = _info_nce_inputs(*(HOST_SIZES if sizes == "host" else MOCO_SIZES))
    loss_fn = INFO_NCE_IMPLS[impl]

    def forward():
        return loss_fn(q, key, buf)

    def forward_backward():
        q.grad = None
        forward().backward()

    return forward if pass_ == "forward" else forward_backward


_ROW_NAMES: dict[tuple, str] = {}


def _row_name(impl, pass_, sizes, stub) -> str:
    """impl with the launches one call makes on a GPU, counted once (after a warm-up)."""
    if (impl, pass_, sizes) not in _ROW_NAMES:
        fn = _info_nce_call(impl, pass_, sizes)
        fn()  # warm-up: plans, first dispatch
        triton_launches, aten_launches = device_launches(fn, stub)
        if impl == "fastmoco":
            assert triton_launches > 0, "info_nce did not take the Triton kernels"
        name = f"{impl} ({triton_launches} Triton + {aten_launches} aten launches)"
        _ROW_NAMES[impl, pass_, sizes] = name
    return _ROW_NAMES[impl, pass_, sizes]


@pytest.mark.parametrize("impl", list(INFO_NCE_IMPLS))
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize("sizes", ["host", "moco"])
def test_info_nce_host(benchmark, stubbed_launches, report_row, env_info, sizes, pass_, impl):
    if sizes == "moco" and impl != "fastmoco":
        pytest.skip("Algorithm 1 at MoCo's sizes on the CPU times a matmul, not host work")
    N, K, C = HOST_SIZES if sizes == "host" else MOCO_SIZES
    fn = _info_nce_call(impl, pass_, sizes)
    name = _row_name(impl, pass_, sizes, stubbed_launches)
    if sizes == "host":
        group = f"host, launch stubbed: info_nce {pass_}, N={N} K={K} C={C} fp32 ({DEVICE})"
        baseline = _row_name("Algorithm 1", pass_, sizes, stubbed_launches)
    else:
        group = f"info_nce {pass_} N={N} K={K} C={C} fp32 ({DEVICE}, with the arithmetic)"
        baseline = None
    _time(benchmark, fn, group, name, report_row, env_info, baseline)
    if pass_ == "forward+backward":
        q = _info_nce_inputs(N, K, C)[0]
        assert q.grad is not None and q.grad.shape == q.shape  # backward did run
