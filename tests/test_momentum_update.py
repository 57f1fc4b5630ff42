"""momentum_update_ against m * t + (1 - m) * s computed in float64.

Results are compared by relative norm error, ||got - ref|| / ||ref|| (tests/helpers.py), at
a tolerance a few times the storage dtype's rounding (EMA_TOL), so that a zeroed result, a
1%-scaled one and a skipped update (got = t, off by (1 - m) ||s - t||) all fail:
test_ema_check_fails_on_wrong_results shows it for every dtype. bf16 and fp16 checks use
m <= 0.99, where a skipped update is >= 1% of the value (at m = 0.999 it would be 0.1%,
below bf16's rounding). m = 0 and m = 1 must give the source and the target exactly.
The Triton kernel (kernels/ema.py, backend="triton") runs on CPU tensors in the Triton
interpreter here (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU driver); the
interpreter's fp32 -> bf16 conversion is checked only to that same bound, the GPU tests
check bf16 on the device.
"""

import copy
import functools
import gc
import os
import weakref

import pytest
import torch
from helpers import assert_rel_close
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models import resnet18

import fastmoco.ops.momentum_update as momentum_update_module
from fastmoco.ops import momentum_update_

TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton_here = pytest.mark.skipif(
    not (TRITON_ON_CPU or torch.cuda.is_available()),
    reason="Triton needs a GPU or the interpreter (TRITON_INTERPRET=1)",
)
DEVICE = "cuda" if torch.cuda.is_available() and not TRITON_ON_CPU else "cpu"


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one intra-op thread avoids OpenMP threads contending for 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A few times each dtype's rounding; bf16 above 2^-7, the worst relative error of one
# element when the fp32 -> bf16 conversion truncates (as the interpreter's does).
EMA_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 8e-3}


def ema_reference(target, source, m) -> torch.Tensor:
    """m * target + (1 - m) * source in float64 (a tensor m as the number it holds)."""
    m = float(m)
    return target.detach().double() * m + source.detach().double() * (1.0 - m)


def check_ema(got, target, source, m, name) -> None:
    """got (the updated target) against the float64 update of its old value `target`."""
    assert got.dtype == target.dtype, f"{name}: dtype {got.dtype} != {target.dtype}"
    assert_rel_close(got, ema_reference(target, source, m), EMA_TOL[got.dtype], name)


@functools.cache
def _resnet_pair():
    torch.manual_seed(0)
    target, source = resnet18(num_classes=10), resnet18(num_classes=10)
    for model in (target, source):  # distinct BN statistics on both sides
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.uniform_(0.5, 1.5)
            else:
                buf.fill_(len(name))
    source.layer1[0].bn1.num_batches_tracked.fill_(123)
    return target, source


def two_resnets():
    """Fresh copies of one seeded pair (building resnet18 costs more than copying it)."""
    return copy.deepcopy(_resnet_pair())


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("m", [0.0, 0.5, 0.99, 0.999, 1.0])
def test_resnet18_parameter_list_matches_reference(m, as_tensor):
    target, source = two_resnets()
    targets = [p.detach() for p in target.parameters()]
    sources = [p.detach() for p in source.parameters()]
    before = [t.clone() for t in targets]
    momentum = torch.tensor(m) if as_tensor else m
    momentum_update_(targets, sources, momentum)
    assert len(targets) == 62
    for i, (got, t0, s) in enumerate(zip(targets, before, sources, strict=True)):
        check_ema(got, t0, s, momentum, name=f"param {i}")
    if m == 1.0:
        assert all(torch.equal(t, t0) for t, t0 in zip(targets, before, strict=True))
    if m == 0.0:
        assert all(torch.equal(t, s) for t, s in zip(targets, sources, strict=True))


@pytest.mark.parametrize("buffers", ["skip", "copy", "ema"])
def test_resnet18_modules_and_buffer_modes(buffers):
    target, source = two_resnets()
    m = 0.99
    before = copy.deepcopy(target)
    momentum_update_(target, source, m, buffers=buffers)

    for (name, got), t0, s in zip(
        target.named_parameters(), before.parameters(), source.parameters(), strict=True
    ):
        check_ema(got, t0, s, m, name=name)
    checked = 0
    for (name, got), t0, s in zip(
        target.named_buffers(), before.buffers(), source.buffers(), strict=True
    ):
        if buffers == "skip":
            assert torch.equal(got, t0), name
        elif buffers == "copy" or not got.is_floating_point():
            assert torch.equal(got, s), name  # integer buffers are copied in both modes
        else:
            check_ema(got, t0, s, m, name=name)
        checked += 1
    assert checked == 3 * 20  # running_mean, running_var, num_batches_tracked per BN


def test_fp64_agrees_to_rounding():
    torch.manual_seed(1)
    targets = [torch.randn(17, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    sources = [torch.randn_like(t) for t in targets]
    before = [t.clone() for t in targets]
    momentum_update_(targets, sources, 0.999)
    for i, (got, t0, s) in enumerate(zip(targets, before, sources, strict=True)):
        check_ema(got, t0, s, 0.999, name=f"fp64 tensor {i}")


def test_odd_sizes_and_mixed_dtypes_in_one_call():
    """Groups by dtype: fp32, fp64, bf16 and fp16 tensors of ragged (and empty) shapes."""
    torch.manual_seed(2)
    shapes = [(1,), (3, 5, 7), (0,), (65537,), (2, 0, 3), (129, 3)]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    targets = [torch.randn(s).to(dtypes[i % 4]) for i, s in enumerate(shapes)]
    sources = [torch.randn(s).to(t.dtype) for s, t in zip(shapes, targets, strict=True)]
    sources[3] = torch.randn(2 * 65537).to(targets[3].dtype)[::2]  # a strided source
    targets.append(torch.randn(40, 6)[:, ::2])  # a non-contiguous target
    sources.append(torch.randn(40, 3))
    before = [t.clone() for t in targets]
    momentum = torch.tensor(0.9)  # fp32 0.9 = 0.89999998; the reference takes that number
    momentum_update_(targets, sources, momentum)
    for i, (got, t0, s) in enumerate(zip(targets, before, sources, strict=True)):
        check_ema(got, t0, s, momentum, name=f"tensor {i} {t0.dtype} {tuple(t0.shape)}")


def test_tensor_momentum_equals_float_momentum():
    torch.manual_seed(3)
    a = [torch.randn(1000), torch.randn(7, 7)]
    b = [t.clone() for t in a]
    src = [torch.randn_like(t) for t in a]
    momentum_update_(a, src, 0.75)  # exact in binary, so both weights are the same number
    momentum_update_(b, src, torch.tensor(0.75))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("dtype", list(EMA_TOL), ids=str)
def test_ema_check_fails_on_wrong_results(dtype):
    """The check every EMA test (the GPU-marked ones too) uses passes the right result and
    fails a zeroed one, a 1%-scaled one and a skipped update (the old target)."""
    gen = torch.Generator().manual_seed(6)
    target = torch.randn(1000, generator=gen, dtype=torch.float64).to(dtype)
    source = torch.randn(1000, generator=gen, dtype=torch.float64).to(dtype)
    for m in (0.9, 0.5) + ((0.999,) if dtype in (torch.float32, torch.float64) else ()):
        right = ema_reference(target, source, m).to(dtype)
        check_ema(right, target, source, m, name="right")
        for wrong, what in (
            (right * 0, "zeroed"),
            (right * 1.01, "1% scaled"),
            (target, "skipped"),
        ):
            with pytest.raises(pytest.fail.Exception, match="relative error"):
                check_ema(wrong, target, source, m, name=what)


def test_empty_lists_and_empty_modules_are_no_ops():
    momentum_update_([], [], 0.9)
    momentum_update_(nn.ReLU(), nn.ReLU(), 0.9, buffers="ema")


class NoHostSync(TorchDispatchMode):
    """Fails on .item() / int(tensor): aten::_local_scalar_dense is a device sync on CUDA."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func is not torch.ops.aten._local_scalar_dense.default, "host sync"
        return func(*args, **(kwargs or {}))


def test_tensor_momentum_is_never_read_on_the_host():
    target, source = nn.Linear(5, 3), nn.Linear(5, 3)
    with NoHostSync():
        momentum_update_(target, source, torch.tensor(0.99), buffers="ema")
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        torch.tensor(0.99).item()  # the detector does detect


def _lists(n=4):
    torch.manual_seed(4)
    return [torch.randn(3, i + 1) for i in range(n)], [torch.randn(3, i + 1) for i in range(n)]


def _mismatch(kind):
    """(target, source, match) where only the last pair is wrong."""
    targets, sources = _lists()
    if kind == "count":
        return targets, sources[:-1], "target has 4 tensors but source has 3"
    if kind == "shape":
        sources[-1] = torch.randn(3, 5)
        return targets, sources, r"tensor \[3\]: target shape torch.Size\(\[3, 4\]\) differs"
    if kind == "dtype":
        sources[-1] = sources[-1].double()
        return targets, sources, r"tensor \[3\]: target dtype torch.float32 differs"
    if kind == "device":
        sources[-1] = sources[-1].to("meta")
        return targets, sources, r"tensor \[3\]: target device cpu differs from the source's meta"
    if kind == "integer":
        targets[-1], sources[-1] = torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4).long()
        return targets, sources, r"\[3\]: momentum update needs floating tensors"
    if kind == "names":
        target = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3))
        source = nn.Sequential()
        source.add_module("0", nn.Linear(2, 2))
        source.add_module("head", nn.Linear(2, 3))
        return target, source, "parameter names differ: target '1.weight' vs source 'head.weight'"
    if kind == "buffer_shape":
        target, source = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
        source.running_var = torch.ones(4)
        return target, source, "buffer running_var: target shape"
    if kind == "module_and_list":
        return nn.Linear(2, 2), sources, "both be nn.Modules or both be sequences"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["count", "shape", "dtype", "device", "integer", "names", "buffer_shape", "module_and_list"],
)
def test_mismatch_raises_and_writes_nothing(kind):
    target, source, match = _mismatch(kind)
    tensors = [*target.parameters(), *target.buffers()] if isinstance(target, nn.Module) else target
    before = [t.detach().clone() for t in tensors]
    with pytest.raises(ValueError, match=match):
        momentum_update_(target, source, 0.5, buffers="ema" if kind == "buffer_shape" else "skip")
    assert all(torch.equal(t.detach(), b) for t, b in zip(tensors, before, strict=True))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(momentum=1.5), r"momentum must be a float in \[0, 1\]"),
        (dict(momentum=-0.1), r"momentum must be a float in \[0, 1\]"),
        (dict(momentum=True), r"momentum must be a float in \[0, 1\]"),
        (dict(momentum="0.9"), r"momentum must be a float in \[0, 1\]"),
        (dict(momentum=torch.tensor([0.9])), "momentum tensor must be a 0-d floating tensor"),
        (dict(momentum=torch.tensor(1)), "momentum tensor must be a 0-d floating tensor"),
        (dict(momentum=torch.tensor(0.9, device="meta")), "momentum is on meta but the targets"),
        (dict(momentum=0.9, buffers="all"), r"buffers must be one of \('skip', 'copy', 'ema'\)"),
        (dict(momentum=0.9, buffers="ema"), "buffers='ema' only applies to nn.Modules"),
        (dict(momentum=0.9, backend="cuda"), r"backend must be None .* \('torch', 'triton'\)"),
        (dict(momentum=0.9, target=torch.randn(3)), "wrap a single tensor as \\[tensor\\]"),
        (dict(momentum=0.9, source=[1.0, 2.0, 3.0, 4.0]), r"source\[0\] is a float"),
    ],
)
def test_argument_errors_write_nothing(kwargs, match):
    targets, sources = _lists()
    target, source = kwargs.pop("target", targets), kwargs.pop("source", sources)
    before = [t.clone() for t in targets]
    with pytest.raises(ValueError, match=match):
        momentum_update_(target, source, **kwargs)
    assert all(torch.equal(t, b) for t, b in zip(targets, before, strict=True))


# ---- the Triton multi-tensor kernel (kernels/ema.py) ---------------------------------------


def _check_triton_matches_reference(targets, sources, momentum, name):
    """backend="triton" vs the official loop; then every element must be written: targets
    poisoned with 1000 and m = 0 (weight 1, so lerp returns the source exactly)."""
    before = [t.clone() for t in targets]
    momentum_update_(targets, sources, momentum, backend="triton")
    for i, (got, t0, s) in enumerate(zip(targets, before, sources, strict=True)):
        check_ema(got, t0, s, momentum, name=f"{name} tensor {i} {t0.dtype} {tuple(t0.shape)}")
    for t in targets:
        t.fill_(1000.0)
    zero = torch.zeros_like(momentum) if isinstance(momentum, torch.Tensor) else 0.0
    momentum_update_(targets, sources, zero, backend="triton")
    for i, (got, s) in enumerate(zip(targets, sources, strict=True)):
        unwritten = int((got != s).sum())
        assert unwritten == 0, f"{name} tensor {i}: {unwritten} poisoned elements not written"


@needs_triton_here
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float_m", "tensor_m"])
def test_triton_on_resnet18_parameter_list(as_tensor):
    """62 tensors, 11.2M parameters: conv weights, BN affine, fc."""
    target, source = two_resnets()
    targets = [p.detach().to(DEVICE) for p in target.parameters()]
    sources = [p.detach().to(DEVICE) for p in source.parameters()]
    momentum = torch.tensor(0.5, device=DEVICE) if as_tensor else 0.5
    _check_triton_matches_reference(targets, sources, momentum, "resnet18")


ODD_SHAPES = [(1,), (2,), (3, 5, 7), (0,), (65537,), (13, 0), (127,), (257, 3), (65536,)]


@needs_triton_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float_m", "tensor_m"])
def test_triton_odd_sizes(dtype, as_tensor):
    """1 element, primes, powers of two and one past them, empty tensors, in one launch."""
    gen = torch.Generator().manual_seed(11)
    targets = [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in ODD_SHAPES]
    sources = [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in ODD_SHAPES]
    momentum = torch.tensor(0.9, device=DEVICE) if as_tensor else 0.9
    _check_triton_matches_reference(targets, sources, momentum, f"odd {dtype}")


@needs_triton_here
def test_triton_small_chunks_cover_every_element():
    """The kernel itself with 64-element chunks: full and ragged chunks of many tensors."""
    from fastmoco.kernels.ema import build_ema_plan, ema_

    gen = torch.Generator().manual_seed(12)
    sizes = [1, 63, 64, 65, 127, 128, 129, 1031, 5]
    targets = [torch.randn(n, generator=gen).to(DEVICE) for n in sizes]
    sources = [torch.randn(n, generator=gen).to(DEVICE) for n in sizes]
    plan = build_ema_plan(targets, sources, block=64)
    assert plan.num_chunks == sum(-(-n // 64) for n in sizes) and plan.num_tensors == len(sizes)
    before = [t.clone() for t in targets]
    ema_(plan, 0.25)
    for i, (got, t0, s) in enumerate(zip(targets, before, sources, strict=True)):
        check_ema(got, t0, s, 0.25, name=f"size {sizes[i]}")
    for t in targets:
        t.fill_(1000.0)  # poison; m = 0 must write the source into every element
    ema_(plan, torch.tensor(0.0, device=DEVICE))
    for i, (got, s) in enumerate(zip(targets, sources, strict=True)):
        assert torch.equal(got, s), f"size {sizes[i]}: poisoned elements not written"


@needs_triton_here
def test_triton_mixed_dtypes_layouts_and_fallbacks():
    """fp64 (weight split in two fp32 halves), channels_last, and strided tensors that take
    the foreach path, all in one call; m = 0 copies the source, m = 1 keeps the target."""
    gen = torch.Generator().manual_seed(13)

    def pair(*shape, dtype=torch.float32):
        return (
            torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE),
            torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE),
        )

    pairs = [pair(17, 3, dtype=torch.float64), pair(1001, dtype=torch.float64), pair(33, 5)]
    t, s = pair(4, 3, 5, 5)
    pairs.append((t.to(memory_format=torch.channels_last), s.to(memory_format=torch.channels_last)))
    t, s = pair(40, 6)
    pairs.append((t[:, ::2], s[:, ::2]))  # strided: not dense
    t, s = pair(6, 5)
    pairs.append((t, s.T.contiguous().T))  # same shape, other strides than the target
    targets, sources = [t for t, _ in pairs], [s for _, s in pairs]
    before = [t.clone() for t in targets]
    momentum_update_(targets, sources, 0.999, backend="triton")
    for i, (got, t0, s) in enumerate(zip(targets, before, sources, strict=True)):
        check_ema(got, t0, s, 0.999, name=f"tensor {i} {t0.dtype}")  # fp64 to 1e-12
    for m, want_fn in ((0.0, lambda t0, s: s), (1.0, lambda t0, s: t0)):
        before = [t.clone() for t in targets]
        momentum_update_(targets, sources, torch.tensor(m, device=DEVICE), backend="triton")
        for i, (got, t0, s) in enumerate(zip(targets, before, sources, strict=True)):
            assert torch.equal(got, want_fn(t0, s)), f"m={m}, tensor {i}"


@needs_triton_here
def test_triton_float_and_tensor_momentum_agree_and_modules_work():
    target, source = (
        nn.Sequential(nn.Linear(40, 30), nn.BatchNorm1d(30)),
        nn.Sequential(nn.Linear(40, 30), nn.BatchNorm1d(30)),
    )
    target, source = target.to(DEVICE), source.to(DEVICE)
    for model in (target, source):
        model[1].running_var.uniform_(0.5, 1.5)
    twin = copy.deepcopy(target)
    momentum_update_(target, source, 0.75, buffers="ema", backend="triton")
    momentum_update_(twin, source, torch.tensor(0.75, device=DEVICE), buffers="ema")
    for (name, a), b in zip(target.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # 0.75 is exact: both weights are the same number


@needs_triton_here
def test_triton_plan_and_table_are_reused_per_structure():
    from fastmoco.ops import _ema_plan

    momentum_update_module.clear_plans()
    targets, sources = _lists(5)
    targets, sources = [t.to(DEVICE) for t in targets], [s.to(DEVICE) for s in sources]
    momentum_update_(targets, sources, 0.5, backend="triton")
    plans, tables = dict(_ema_plan._list_plans), dict(momentum_update_module._tables)
    assert len(plans) == 1 and len(tables) == 1
    momentum_update_(list(targets), list(sources), 0.9, backend="triton")  # new lists, same tensors
    assert _ema_plan._list_plans == plans and momentum_update_module._tables == tables
    others = [torch.randn(3, 2, device=DEVICE)]  # a new structure gets its own plan and table
    before = others[0].clone()
    momentum_update_(others, [sources[1]], 0.5, backend="triton")
    assert len(_ema_plan._list_plans) == 2 and len(momentum_update_module._tables) == 2
    check_ema(others[0], before, sources[1], 0.5, name="new structure")
    momentum_update_([], [], 0.5, backend="triton")  # empty lists: nothing to launch
    empty = [torch.empty(0, device=DEVICE)]
    momentum_update_(empty, empty, 0.5, backend="triton")
    momentum_update_module.clear_plans()


def _pair_of_models():
    torch.manual_seed(5)
    return (
        nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)),
        nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)),
    )


def _change(kind, target, source):
    """Change target after a cached call; return the error it must raise (None: none)."""
    if kind == "replaced_parameter":
        target[0].weight = nn.Parameter(torch.randn(3, 5))
        return r"parameter 0.weight: target shape torch.Size\(\[3, 5\]\) differs"
    if kind == "added_module":
        target.add_module("2", nn.Linear(3, 2))
        return "target has 6 parameters but source has 4"
    if kind == "removed_parameter":
        del target[0].bias
        return "parameter names differ: target '1.weight' vs source '0.bias'"
    if kind == "converted":
        target.double()  # keeps the Parameter objects, swaps their storage
        return r"parameter 0.weight: target dtype torch.float64 differs"
    if kind == "new_storage":
        with torch.no_grad():
            target[0].weight.data = torch.randn(3, 4)  # same object, new address
        return None
    if kind == "buffer_replaced":
        target[1].running_mean = torch.zeros(4)
        return r"buffer 1.running_mean: target shape"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["replaced_parameter", "added_module", "removed_parameter", "converted", "new_storage",
     "buffer_replaced"],
)  # fmt: skip
@pytest.mark.parametrize("backend", [None, pytest.param("triton", marks=needs_triton_here)])
def test_structure_changed_after_a_cached_call_is_validated_again(kind, backend):
    """The plan's signature sees the change: a mismatch raises before any write, as on a
    first call; a legal change (new storage) updates the new tensors."""
    target, source = _pair_of_models()
    update = functools.partial(momentum_update_, buffers="ema", backend=backend)
    update(target, source, 0.5)  # builds and caches the plan
    match = _change(kind, target, source)
    state = {k: v.clone() for k, v in target.state_dict().items()}
    params = [(n, p.detach().clone()) for n, p in target.named_parameters()]
    if match is not None:
        with pytest.raises(ValueError, match=match):
            update(target, source, 0.5)
        for name, value in target.state_dict().items():
            assert torch.equal(value, state[name]), f"{name} written"
        return
    update(target, source, 0.5)
    for (name, got), (_, t0), s in zip(target.named_parameters(), params, source.parameters(),
                                       strict=True):  # fmt: skip
        check_ema(got, t0, s, 0.5, name=name)


@pytest.mark.parametrize("backend", [None, pytest.param("triton", marks=needs_triton_here)])
def test_changed_list_entries_are_validated_again(backend):
    targets, sources = _lists()
    update = functools.partial(momentum_update_, backend=backend)
    update(targets, sources, 0.5)
    targets[2] = torch.randn(3, 7)  # same list object, another tensor
    with pytest.raises(ValueError, match=r"tensor \[2\]: target shape"):
        update(targets, sources, 0.5)
    targets[2] = torch.randn(3, 3)
    targets[0].set_(torch.randn(3, 1))  # same tensor object, new storage
    before = [t.clone() for t in targets]
    update(targets, sources, 0.5)
    for i, (got, t0, s) in enumerate(zip(targets, before, sources, strict=True)):
        check_ema(got, t0, s, 0.5, name=f"tensor {i}")


def test_plans_keep_no_tensor_and_no_target_module_alive():
    targets, sources = _lists()
    target, source = _pair_of_models()
    momentum_update_(targets, sources, 0.5)
    momentum_update_(target, source, 0.5)
    tensor_ref, module_ref = weakref.ref(targets[0]), weakref.ref(target)
    del targets, sources, target
    gc.collect()
    assert tensor_ref() is None, "a list plan keeps its tensors alive"
    assert module_ref() is None, "a module plan keeps its target module alive"


@needs_triton_here
def test_triton_tensor_momentum_is_never_read_on_the_host():
    targets, sources = _lists()
    targets, sources = [t.to(DEVICE) for t in targets], [s.to(DEVICE) for s in sources]
    momentum = torch.tensor(0.99, device=DEVICE)
    with NoHostSync():
        momentum_update_(targets, sources, momentum, backend="triton")


def test_triton_backend_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    from fastmoco.kernels import ema

    monkeypatch.setattr(ema, "_INTERPRET", False)
    targets, sources = _lists()
    before = [t.clone() for t in targets]
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors, got tensors"):
        momentum_update_(targets, sources, 0.9, backend="triton")
    assert all(torch.equal(t, b) for t, b in zip(targets, before, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_default_is_triton_and_captures_in_a_cuda_graph():
    """ResNet-18 on the GPU: the default backend, a momentum schedule inside a CUDA graph."""
    target, source = two_resnets()
    targets = [p.detach().cuda() for p in target.parameters()]
    sources = [p.detach().cuda() for p in source.parameters()]
    want = [t.double() for t in targets]  # the float64 reference, step by step
    momentum = torch.tensor(0.99, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        momentum_update_(targets, sources, momentum)  # warm-up: compiles, builds the table
    torch.cuda.current_stream().wait_stream(stream)
    want = [ema_reference(w, s, momentum) for w, s in zip(want, sources, strict=True)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        momentum_update_(targets, sources, momentum)
    for m in (0.9, 0.5):  # the schedule changes the tensor, not the graph
        momentum.fill_(m)
        graph.replay()
        want = [ema_reference(w, s, momentum) for w, s in zip(want, sources, strict=True)]
    torch.cuda.synchronize()
    for i, (got, w) in enumerate(zip(targets, want, strict=True)):
        assert_rel_close(got, w, EMA_TOL[got.dtype], name=f"param {i}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_capture_without_warm_up_is_a_clear_error():
    targets = [torch.randn(100, device="cuda") for _ in range(3)]
    sources = [torch.randn(100, device="cuda") for _ in range(3)]
    momentum = torch.tensor(0.9, device="cuda")  # made outside: a host copy cannot be captured
    momentum_update_module.clear_plans()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="call it once before capturing"):
        with torch.cuda.graph(graph):
            momentum_update_(targets, sources, momentum)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_triton_odd_sizes(dtype):
    gen = torch.Generator().manual_seed(14)
    targets = [torch.randn(s, generator=gen).to(dtype).cuda() for s in ODD_SHAPES]
    sources = [torch.randn(s, generator=gen).to(dtype).cuda() for s in ODD_SHAPES]
    # m = 0.9: a skipped update is 10% of the value, well above bf16's rounding
    _check_triton_matches_reference(targets, sources, 0.9, f"cuda {dtype}")


# ---- calls refused at validation: aliasing, a reversed call -------------------------------


def _aliasing(kind):
    """(target, source, match) of a call whose targets overlap each other or a source."""
    targets, sources = _lists()
    if kind == "target_twice":
        targets[3] = targets[1]
        sources[3] = sources[1]
        return targets, sources, r"target \[1\] is the same tensor as target \[3\]: it would be"
    if kind == "target_view_of_target":
        flat = torch.randn(20)
        targets[1], targets[3] = flat[:6].view(3, 2), flat[4:16].view(3, 4)  # 2 elements shared
        return targets, sources, r"target \[1\] shares memory with target \[3\]"
    if kind == "target_is_a_source":
        sources[2] = targets[2]
        return targets, sources, r"source \[2\] is the same tensor as target \[2\]: the update"
    if kind == "target_overlaps_another_source":
        flat = torch.randn(100)
        targets[1], sources[0] = flat[:6].view(3, 2), flat[4:7].view(3, 1)
        return targets, sources, r"source \[0\] shares memory with target \[1\]"
    if kind == "one_module_twice":
        target = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        return target, target, r"source (\d\.\w+) is the same tensor as target \1: the update"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["target_twice", "target_view_of_target", "target_is_a_source",
     "target_overlaps_another_source", "one_module_twice"],
)  # fmt: skip
@pytest.mark.parametrize("backend", [None, pytest.param("triton", marks=needs_triton_here)])
def test_aliased_targets_raise_and_write_nothing(kind, backend):
    """A target listed twice would be updated twice in one call; one that is (or overlaps) a
    source changes what the update reads. Refused by name, before any write."""
    target, source, match = _aliasing(kind)
    tensors = list(target.parameters()) if isinstance(target, nn.Module) else target
    before = [t.detach().clone() for t in tensors]
    with pytest.raises(ValueError, match=match):
        momentum_update_(target, source, 0.5, backend=backend)
    assert all(torch.equal(t.detach(), b) for t, b in zip(tensors, before, strict=True))


@pytest.mark.parametrize("backend", [None, pytest.param("triton", marks=needs_triton_here)])
def test_disjoint_views_and_shared_sources_are_allowed(backend):
    """Targets that are disjoint views of one flat buffer (a flat parameter store) and one
    source read by two targets are legal, and update like separate tensors."""
    flat = torch.randn(30, dtype=torch.float64)
    targets = [flat[:6].view(2, 3), flat[6:10], flat[10:30].view(4, 5)]
    shared = torch.randn(4, dtype=torch.float64)
    sources = [torch.randn(2, 3, dtype=torch.float64), shared, torch.randn(4, 5).double()]
    targets.append(torch.randn(4, dtype=torch.float64))
    sources.append(shared)
    before = [t.clone() for t in targets]
    momentum_update_(targets, sources, 0.75, backend=backend)
    for i, (got, t0, s) in enumerate(zip(targets, before, sources, strict=True)):
        check_ema(got, t0, s, 0.75, name=f"tensor {i}")
    assert flat.data_ptr() == targets[0].data_ptr()  # written in place, in the flat buffer


def test_aliasing_is_checked_once_per_structure(monkeypatch):
    """The overlap and direction checks run when a plan is validated, not on cached calls."""
    calls = []

    def counted(name):
        check = getattr(momentum_update_module, name)

        def run(*args):
            calls.append(name)
            return check(*args)

        return run

    for name in ("_check_no_aliasing", "_check_direction"):
        monkeypatch.setattr(momentum_update_module, name, counted(name))
    target, source = _pair_of_models()
    targets, sources = _lists()
    for _ in range(3):
        momentum_update_(target, source, 0.5)
        momentum_update_(targets, sources, 0.5)
    assert calls == ["_check_no_aliasing", "_check_direction"] * 2


def _online_and_ema():
    """lightly's pair: an online model that trains, its deep copy with requires_grad off."""
    torch.manual_seed(7)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    ema = copy.deepcopy(online)
    for p in ema.parameters():  # lightly.models.utils.deactivate_requires_grad
        p.requires_grad = False
    return online, ema


@pytest.mark.parametrize("as_lists", [False, True], ids=["modules", "lists"])
def test_reversed_call_is_refused_and_shows_the_right_one(as_lists):
    """Called in lightly's update_momentum(model, model_ema, m) order, the update would pull
    the trained model toward its frozen copy: refused, naming the right call."""
    online, ema = _online_and_ema()
    with torch.no_grad():  # the copy has drifted, so a reversed update would change online
        for p in ema.parameters():
            p.add_(1.0)
    target, source = online, ema
    if as_lists:
        target, source = list(online.parameters()), list(ema.parameters())
    before = [p.detach().clone() for p in online.parameters()]
    match = (
        r"looks reversed: the target's tensors require grad \((parameter 0\.weight|tensor \[0\])"
        r".*call momentum_update_\(model_ema, model, m\), the reverse of lightly's"
    )
    with pytest.raises(ValueError, match=match):
        momentum_update_(target, source, 0.9)
    assert all(torch.equal(p.detach(), b) for p, b in zip(online.parameters(), before, strict=True))
    # the right order works, and so do detached tensors (the documented way to do it anyway)
    ema_before = [p.clone() for p in ema.parameters()]
    momentum_update_(ema, online, 0.9)
    for (name, got), t0, s in zip(ema.named_parameters(), ema_before, online.parameters(),
                                  strict=True):  # fmt: skip
        check_ema(got, t0, s, 0.9, name=name)
    momentum_update_([p.detach() for p in online.parameters()], list(ema.parameters()), 0.0)
    assert all(
        torch.equal(p, q) for p, q in zip(online.parameters(), ema.parameters(), strict=True)
    )


def test_both_sides_trainable_or_frozen_are_not_called_reversed():
    """Only target-trains-but-source-does-not reads as reversed: a key encoder left trainable,
    two frozen models, or a source with some frozen layers pass."""
    online, ema = _online_and_ema()
    momentum_update_(copy.deepcopy(online), online, 0.5)  # both require grad
    momentum_update_(copy.deepcopy(ema), ema, 0.5)  # neither does
    online[0].weight.requires_grad_(False)  # a frozen layer in the trained model
    momentum_update_(ema, online, 0.5)


# ---- device tables held for a captured graph ----------------------------------------------


@needs_triton_here
@pytest.mark.parametrize("hold", [False, True], ids=["cache_only", "held"])
def test_held_device_tables_outlive_the_caches(hold):
    """A graph captured over a list update reads that list's device table by address. The
    caches keep 16 plans and tables: building 17 more frees it (the failure a replay would
    write through); hold_device_tables() keeps it until the holder is dropped."""
    momentum_update_module.clear_plans()
    targets, sources = _lists()
    momentum_update_(targets, sources, 0.5, backend="triton")
    (plan,) = momentum_update_module._tables.values()
    table = weakref.ref(plan.table)
    del plan
    held = momentum_update_module.hold_device_tables() if hold else None
    assert not hold or len(held) == 1
    others = [([torch.randn(i + 1)], [torch.randn(i + 1)]) for i in range(17)]
    for t, s in others:  # other structures: plans and tables evict the first ones
        momentum_update_(t, s, 0.5, backend="triton")
    gc.collect()
    assert (table() is not None) == hold, "the table should live exactly while it is held"
    if hold:
        before = [t.clone() for t in targets]
        from fastmoco.kernels.ema import ema_

        ema_(held.tables[0], 0.5)  # what a replay runs: the held table still addresses them
        for i, (got, t0, s) in enumerate(zip(targets, before, sources, strict=True)):
            check_ema(got, t0, s, 0.5, name=f"tensor {i} through the held table")
        del held
        gc.collect()
        assert table() is None, "dropping the holder frees the table"
    momentum_update_module.clear_plans()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_replays_after_other_plans_evict_its_table():
    """MoCo v3's call: a list rebuilt from the key encoder's parameters, captured; then more
    than 16 other structures and fresh allocations; replays still update the right tensors."""
    momentum_update_module.clear_plans()
    targets = [torch.randn(1000, device="cuda") for _ in range(5)]
    sources = [torch.randn(1000, device="cuda") for _ in range(5)]
    want = [t.double() for t in targets]
    momentum = torch.tensor(0.9, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        momentum_update_(list(targets), sources, momentum)  # warm-up: builds the table
    torch.cuda.current_stream().wait_stream(stream)
    want = [ema_reference(w, s, momentum) for w, s in zip(want, sources, strict=True)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        momentum_update_(list(targets), sources, momentum)
    held = momentum_update_module.hold_device_tables()
    for i in range(20):  # evict every cached plan and table, then reuse the freed memory
        momentum_update_([torch.randn(i + 1, device="cuda")], [torch.randn(i + 1, device="cuda")],
                         0.5)  # fmt: skip
    gc.collect()
    garbage = [torch.full((4096,), -1, dtype=torch.int64, device="cuda") for _ in range(64)]
    for _ in range(3):
        graph.replay()
        want = [ema_reference(w, s, momentum) for w, s in zip(want, sources, strict=True)]
    torch.cuda.synchronize()
    for i, (got, w) in enumerate(zip(targets, want, strict=True)):
        assert_rel_close(got, w, EMA_TOL[got.dtype], name=f"tensor {i}")
    del garbage, held, graph
    momentum_update_module.clear_plans()
