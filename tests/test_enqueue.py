"""enqueue_ against the host-pointer reference (fastmoco.ops.reference): a copy, so exact.

The torch path (default on CPU) and the C++ extension's op torch.ops.fastmoco.enqueue_
(backend="cuda": its CPU kernel here, its CUDA kernel on a GPU) run the same checks.
"""

import random
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastmoco.ops.enqueue as enqueue_module
from fastmoco.ops import enqueue_
from fastmoco.ops.reference import enqueue_reference

HAS_EXT = enqueue_module.extension_op() is not None
needs_ext = pytest.mark.skipif(
    not HAS_EXT, reason='fastmoco._C not built (pip install --no-build-isolation -e ".[dev]")'
)
needs_cuda_ext = pytest.mark.skipif(
    not (torch.cuda.is_available() and enqueue_module.extension_has_cuda()),
    reason="no CUDA device, or fastmoco._C built without its CUDA kernel",
)


def assert_equal(actual, expected, name, show=5):
    """Exact equality; lists the first mismatching rows."""
    if torch.equal(actual, expected):
        return
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    bad_rows = (actual != expected).reshape(actual.shape[0], -1).any(dim=1).nonzero().flatten()
    rows = [f"  row {r}: got {actual[r].tolist()}, want {expected[r].tolist()}" for r in bad_rows]
    pytest.fail(f"{name}: {len(bad_rows)} rows differ; first:\n" + "\n".join(rows[:show]))


def make_queue(K, C, layout, dtype=torch.float32):
    if layout == "transposed":  # the official (C, K) buffer, used as buf.T
        return torch.zeros(C, K, dtype=dtype).T
    return torch.zeros(K, C, dtype=dtype)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("C", [3, 16])
@pytest.mark.parametrize("K", [1, 5, 7, 64])
def test_random_batch_sizes_wrap_around_like_the_reference(K, C, layout):
    rng = random.Random(K * 1000 + C)
    torch.manual_seed(K * 1000 + C)
    queue, want = make_queue(K, C, layout), make_queue(K, C, layout)
    ptr, want_ptr = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    sizes = [K, 1, K, 1] + [rng.randint(1, K) for _ in range(20)]  # B == K and B == 1 included
    for step, B in enumerate(sizes):
        keys = torch.randn(B, C)
        assert enqueue_(queue, ptr, keys) is queue
        enqueue_reference(want, want_ptr, keys)
        assert_equal(queue, want, name=f"queue after step {step} (B={B})")
        assert_equal(ptr, want_ptr, name=f"ptr after step {step} (B={B})")
        assert 0 <= int(ptr) < K


def test_wraps_a_batch_that_crosses_the_end():
    queue = torch.zeros(5, 2)
    ptr = torch.tensor([3])
    enqueue_(queue, ptr, torch.arange(8.0).reshape(4, 2))  # rows 3, 4, 0, 1
    want = torch.tensor([[4.0, 5], [6, 7], [0, 0], [0, 1], [2, 3]])
    assert_equal(queue, want, "queue")
    assert ptr.tolist() == [2]


def test_keys_are_cast_to_the_queue_dtype():
    torch.manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        queue, ptr = torch.zeros(7, 4, dtype=dtype), torch.zeros(1, dtype=torch.long)
        keys = torch.randn(3, 4)
        enqueue_(queue, ptr, keys)
        assert queue.dtype == dtype
        assert_equal(queue[:3], keys.to(dtype), f"{dtype} rows")
        assert_equal(queue[3:], torch.zeros(4, 4, dtype=dtype), f"{dtype} untouched rows")


def test_empty_batch_and_0d_pointer():
    queue, ptr = torch.ones(4, 2), torch.tensor(3)  # a 0-d pointer is 1 element too
    enqueue_(queue, ptr, torch.empty(0, 2))
    assert torch.equal(queue, torch.ones(4, 2)) and int(ptr) == 3
    enqueue_(queue, ptr, torch.zeros(2, 2))
    assert int(ptr) == 1 and queue[3].eq(0).all() and queue[0].eq(0).all()


def test_keys_that_require_grad_leave_no_graph():
    queue, ptr = torch.zeros(4, 2), torch.zeros(1, dtype=torch.long)
    keys = torch.randn(2, 2, requires_grad=True)
    enqueue_(queue, ptr, keys * 2)
    assert not queue.requires_grad and queue.grad_fn is None


class NoHostSync(TorchDispatchMode):
    """Fails on .item() / int(tensor): aten::_local_scalar_dense is a device sync on CUDA."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func is not torch.ops.aten._local_scalar_dense.default, "host sync"
        return func(*args, **(kwargs or {}))


def test_device_pointer_is_never_read_on_the_host(monkeypatch):
    """The torch path as it runs on CUDA tensors (the pointer checked by torch._assert_async,
    not read), here on CPU tensors by taking the device branch. A CPU pointer is read from
    host memory, like the extension's CPU kernel does: no aten read either."""
    queue, ptr = torch.zeros(8, 3), torch.zeros(1, dtype=torch.long)
    want, want_ptr = torch.zeros(8, 3), torch.zeros(1, dtype=torch.long)
    monkeypatch.setattr(enqueue_module, "_host_readable", lambda ptr: False)
    for B in (3, 5, 8, 1):
        keys = torch.randn(B, 3)
        with NoHostSync():
            enqueue_(queue, ptr, keys)
        enqueue_reference(want, want_ptr, keys)  # reads the pointer: outside the detector
        assert_equal(queue, want, f"queue (B={B})")
        assert_equal(ptr, want_ptr, f"ptr (B={B})")
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        enqueue_reference(queue, ptr, torch.randn(2, 3))  # the detector does detect
    monkeypatch.undo()
    with NoHostSync():
        enqueue_(queue, ptr, torch.randn(2, 3))
    assert int(ptr) == 3  # (3 + 5 + 8 + 1 + 2) % 8


BAD_POINTERS = [8, 9, -1, -8, 2**40]  # K = 8


@pytest.mark.parametrize("backend", ["torch", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_EXT, reason="fastmoco._C not built"))])  # fmt: skip
@pytest.mark.parametrize("value", BAD_POINTERS)
def test_pointer_outside_the_queue_raises_and_writes_nothing(value, backend):
    """On CPU tensors both paths (the torch one, the extension's CPU kernel) refuse a pointer
    outside [0, K), naming it, instead of taking it modulo K."""
    queue, ptr = torch.zeros(8, 4), torch.tensor([value])
    match = rf"ptr = {value} is outside \[0, K\) = \[0, 8\).*reset it with ptr\.zero_\(\)"
    for B in (3, 0, 8):
        with pytest.raises(ValueError, match=match):
            enqueue_(queue, ptr, torch.ones(B, 4), backend=backend)
        assert queue.eq(0).all() and ptr.tolist() == [value], f"B={B}: written"


@pytest.mark.parametrize("value", BAD_POINTERS)
def test_device_side_pointer_check_fails_on_a_pointer_outside_the_queue(value):
    """The check the torch path runs for CUDA tensors: torch._assert_async, which on CPU
    raises at once (on CUDA it fails in the kernel), and passes every pointer in range."""
    for good in range(8):
        enqueue_module._assert_pointer_on_device(torch.tensor([good]), 8)
    with pytest.raises(RuntimeError, match=r"ptr is outside \[0, K\) = \[0, 8\)"):
        enqueue_module._assert_pointer_on_device(torch.tensor([value]), 8)


def _args(**override):
    args = dict(
        queue=torch.zeros(8, 4), ptr=torch.zeros(1, dtype=torch.long), keys=torch.ones(3, 4)
    )
    args.update(override)
    return args


@pytest.mark.parametrize(
    "args,match",
    [
        (_args(keys=torch.ones(9, 4)), "keys has B = 9 rows but the queue holds only K = 8"),
        (_args(keys=torch.ones(3, 5)), "keys have C = 5 columns but the queue has C = 4"),
        (_args(queue=torch.zeros(32)), r"queue must be 2-D \(K, C\).*buf\.T"),
        (_args(queue=torch.zeros(2, 8, 4)), r"queue must be 2-D \(K, C\)"),
        (_args(keys=torch.ones(12)), r"keys must be 2-D \(B, C\)"),
        (_args(queue=torch.zeros(0, 4), keys=torch.ones(0, 4)), r"queue has no rows \(K = 0\)"),
        (_args(ptr=torch.zeros(1, dtype=torch.int32)), "ptr must be a 1-element int64 tensor"),
        (_args(ptr=torch.zeros(2, dtype=torch.long)), "ptr must be a 1-element int64 tensor"),
        (_args(ptr=torch.zeros(1)), "ptr must be a 1-element int64 tensor, got dtype torch.float"),
        (_args(ptr=torch.zeros(1, dtype=torch.long, device="meta")), "ptr is on meta but the q"),
        (_args(keys=torch.ones(3, 4, device="meta")), "keys are on meta but the queue is on cpu"),
        (_args(keys=torch.ones(3, 4, dtype=torch.long)), "queue and keys must be floating"),
        (_args(ptr=0), "ptr must be a torch.Tensor, got int"),
    ],
)
def test_errors_write_nothing(args, match):
    queue_before = args["queue"].clone() if isinstance(args["queue"], torch.Tensor) else None
    ptr_before = args["ptr"].clone() if isinstance(args["ptr"], torch.Tensor) else None
    with pytest.raises(ValueError, match=match):
        enqueue_(args["queue"], args["ptr"], args["keys"])
    assert queue_before is None or torch.equal(args["queue"], queue_before)
    if ptr_before is not None and ptr_before.device.type != "meta":
        assert torch.equal(args["ptr"], ptr_before)


def test_bad_backend():
    with pytest.raises(ValueError, match=r"backend must be None .* \('torch', 'cuda'\)"):
        enqueue_(**_args(), backend="triton")


# ---- the C++/CUDA extension op ------------------------------------------------------------


def _check_against_reference(device, K, C, dtype, layout, backend, seed, sizes=(), offset=0):
    """Random batch sizes, B == K and B == 1 included (then `sizes`), vs the reference:
    exact. offset > 0 starts the keys that many elements into their buffer (unaligned)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    queue = make_queue(K, C, layout, dtype).to(device)
    want = make_queue(K, C, layout, dtype)
    ptr = torch.zeros(1, dtype=torch.long, device=device)
    want_ptr = torch.zeros(1, dtype=torch.long)
    queue.fill_(float("nan"))  # poison: every row must be written by the time it is compared
    want.fill_(float("nan"))
    sizes = [K, 1, max(K - 1, 1), min(2, K)] + [rng.randint(1, K) for _ in range(12)] + [*sizes]
    for step, B in enumerate(sizes):
        keys = torch.randn(B, C).to(dtype)
        buffer = torch.empty(offset + B * C, dtype=dtype, device=device)
        on_device = buffer[offset:].view(B, C).copy_(keys)
        enqueue_(queue, ptr, on_device, backend=backend)
        enqueue_reference(want, want_ptr, keys)
        got = queue.cpu()
        assert torch.equal(got.isnan(), want.isnan()), f"step {step} (B={B}): rows written"
        assert_equal(got.nan_to_num(), want.nan_to_num(), name=f"queue after step {step} (B={B})")
        assert_equal(ptr.cpu(), want_ptr, name=f"ptr after step {step} (B={B})")


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,C", [(1, 4), (7, 3), (64, 16)])
def test_extension_cpu_op_matches_reference(K, C, dtype, layout):
    _check_against_reference("cpu", K, C, dtype, layout, "cuda", seed=K * 100 + C)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,C", [(1, 4), (7, 3), (4096, 128)])
def test_extension_cuda_op_matches_reference(K, C, dtype, layout):
    _check_against_reference("cuda", K, C, dtype, layout, "cuda", seed=K * 100 + C)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned_keys"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extension_cuda_op_both_launch_paths(dtype, offset):
    """Keys of 128 KiB take the one-block launch, one row more the multi-block copy and the
    pointer launch (csrc/enqueue_cuda.cu); aligned keys the 16-byte vector copy, keys one
    element into their buffer the element-wise one; wrapping batches in each."""
    rows = (128 << 10) // (128 * torch.empty(0, dtype=dtype).element_size())
    sizes = [rows, rows + 1, rows, rows + 1, 3 * rows]
    _check_against_reference("cuda", 4 * rows - 3, 128, dtype, "contiguous", "cuda", seed=7,
                             sizes=sizes, offset=offset)  # fmt: skip


def test_exact_checks_fail_on_zeroed_or_scaled_rows():
    """The enqueue checks compare exactly (a copy): a zeroed or a 1%-scaled row fails."""
    want = torch.randn(6, 4)
    for wrong in (want * 0, want * 1.01, torch.cat([want[:5], want[5:] * 1.01])):
        with pytest.raises(pytest.fail.Exception, match="rows differ"):
            assert_equal(wrong, want, "queue")


@pytest.mark.gpu
@needs_cuda_ext
def test_extension_cuda_op_passes_opcheck():
    for args in _op_samples("cuda"):
        torch.library.opcheck(torch.ops.fastmoco.enqueue_.default, args)


def _op_samples(device):
    gen = torch.Generator().manual_seed(5)
    for K, C, B, start, dtype in [
        (8, 4, 3, 0, torch.float32),
        (8, 4, 5, 6, torch.float32),  # wraps
        (8, 4, 8, 3, torch.bfloat16),  # B == K
        (5, 2, 1, 4, torch.float16),
    ]:
        queue = torch.randn(K, C, generator=gen).to(dtype).to(device)
        keys = torch.randn(B, C, generator=gen).to(dtype).to(device)
        yield queue, torch.tensor([start], device=device), keys
    buf = torch.randn(4, 9, generator=gen).to(device)  # the official (C, K) layout, as buf.T
    yield buf.T, torch.tensor([7], device=device), torch.randn(4, 4, generator=gen).to(device)


@needs_ext
def test_extension_op_passes_opcheck():
    """Schema (mutated args), fake kernel, autograd registration, aot_dispatch: for compile."""
    for args in _op_samples("cpu"):
        torch.library.opcheck(torch.ops.fastmoco.enqueue_.default, args)


@needs_ext
@pytest.mark.parametrize("call", ["op", "enqueue_"])
def test_extension_op_under_torch_compile(call):
    """fullgraph: the public op, checks included, traces without a graph break."""

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(queue, ptr, keys):
        if call == "op":
            torch.ops.fastmoco.enqueue_(queue, ptr, keys * 2)
        else:
            enqueue_(queue, ptr, keys * 2, backend="cuda")

    _check_compiled_enqueues(step)


@needs_ext
@pytest.mark.parametrize(
    "queue,ptr,keys,match",
    [
        (torch.zeros(8, 4), torch.tensor([8]), torch.ones(3, 4), r"ptr = 8 is outside \[0, K\)"),
        (torch.zeros(8, 4), torch.tensor([-3]), torch.ones(3, 4), r"ptr = -3 is outside \[0"),
        (torch.zeros(8, 4), torch.zeros(1, dtype=torch.long), torch.ones(9, 4), "B = 9 rows but"),
        (torch.zeros(8, 4), torch.zeros(1, dtype=torch.long), torch.ones(3, 5), "C = 5 columns"),
        (torch.zeros(8, 4), torch.zeros(1, dtype=torch.long), torch.ones(3, 4).half(), "dtype"),
        (torch.zeros(8, 4), torch.zeros(1, dtype=torch.int32), torch.ones(3, 4), "1-element int64"),
        (torch.zeros(8, 4), torch.zeros(2, dtype=torch.long), torch.ones(3, 4), "1-element int64"),
        (torch.zeros(32), torch.zeros(1, dtype=torch.long), torch.ones(3, 4), "2-D"),
        (torch.zeros(0, 4), torch.zeros(1, dtype=torch.long), torch.ones(0, 4), "K = 0"),
    ],
)
def test_extension_op_rejects_bad_input_and_writes_nothing(queue, ptr, keys, match):
    """The op checks its input itself (for callers that skip enqueue_'s Python checks)."""
    queue_before, ptr_before = queue.clone(), ptr.clone()
    with pytest.raises(ValueError, match=match):
        torch.ops.fastmoco.enqueue_(queue, ptr, keys)
    assert torch.equal(queue, queue_before) and torch.equal(ptr, ptr_before)


@needs_ext
def test_extension_backend_reports_wrong_pointer_device():
    with pytest.raises(ValueError, match="ptr is on meta but the queue is on cpu"):
        enqueue_(**_args(ptr=torch.zeros(1, dtype=torch.long, device="meta")), backend="cuda")


@needs_ext
def test_extension_pointer_is_never_read_on_the_host():
    queue, ptr = torch.zeros(8, 3), torch.zeros(1, dtype=torch.long)
    with NoHostSync():  # the op is one dispatcher call; its kernel reads ptr in C++
        for B in (3, 5, 8):
            enqueue_(queue, ptr, torch.randn(B, 3), backend="cuda")
    assert int(ptr) == 0


def test_torch_path_under_torch_compile():
    """fullgraph: the torch path traces (its pointer check becomes torch._assert_async, which
    raises at run time on a pointer outside the queue)."""

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(queue, ptr, keys):
        enqueue_(queue, ptr, keys * 2, backend="torch")

    queue = _check_compiled_enqueues(step)
    want = queue.clone()  # equal to the reference (checked above)
    with pytest.raises(RuntimeError, match=r"ptr is outside \[0, K\) = \[0, 7\)"):
        step(queue, torch.tensor([7]), torch.randn(2, 3))
    assert_equal(queue, want, "queue after the refused call")


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(enqueue_module, "extension_op", lambda: None)
    enqueue_module._warn_fallback.cache_clear()
    queue, ptr = torch.zeros(5, 2), torch.tensor([3])
    with pytest.warns(RuntimeWarning, match="fastmoco._C is not built"):
        enqueue_(queue, ptr, torch.arange(8.0).reshape(4, 2), backend="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        enqueue_(queue, ptr, torch.zeros(1, 2), backend="cuda")
    want = torch.tensor([[4.0, 5], [6, 7], [0, 0], [0, 1], [2, 3]])
    want[2] = 0
    assert_equal(queue, want, "queue")
    assert ptr.tolist() == [3]
    enqueue_module._warn_fallback.cache_clear()


BAD_POINTER_SCRIPT = """
import sys, torch
from fastmoco.ops import enqueue_
queue, ptr = torch.zeros(8, 4, device="cuda"), torch.tensor([9], device="cuda")
enqueue_(queue, ptr, torch.ones(3, 4, device="cuda"), backend=sys.argv[1])
torch.cuda.synchronize()
print("no error")
"""


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_cuda_pointer_outside_the_queue_stops_with_a_device_assert(backend):
    """On CUDA the pointer is checked on the device: a device-side assert, reported at the
    next sync. It leaves the CUDA context unusable, so it runs in a subprocess."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", BAD_POINTER_SCRIPT, backend], env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "no error" not in proc.stdout, out[-3000:]
    assert "device-side assert" in out, out[-3000:]
    if backend == "cuda":  # the extension's kernel prints the value and the fix
        assert "ptr = 9 is outside [0, K) = [0, 8)" in out, out[-3000:]


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("backend", [None, "torch"])
def test_cuda_default_backend_captures_in_a_cuda_graph(backend):
    """The pointer lives on the device: replaying one captured step keeps advancing it (the
    torch path's device-side pointer check is captured too)."""
    K, C, B = 10, 4, 3
    queue = torch.zeros(K, C, device="cuda")
    ptr = torch.zeros(1, dtype=torch.long, device="cuda")
    keys = torch.zeros(B, C, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        enqueue_(queue, ptr, keys, backend=backend)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    queue.zero_(), ptr.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        enqueue_(queue, ptr, keys, backend=backend)
    want, want_ptr = torch.zeros(K, C), torch.zeros(1, dtype=torch.long)
    for _ in range(7):
        new_keys = torch.randn(B, C)
        keys.copy_(new_keys)
        graph.replay()
        enqueue_reference(want, want_ptr, new_keys)
    torch.cuda.synchronize()
    assert_equal(queue.cpu(), want, "queue after 7 replays")
    assert_equal(ptr.cpu(), want_ptr, "ptr after 7 replays")


def test_the_install_built_the_extension():
    """The README's install line builds fastmoco._C (its CPU part needs only a compiler), so
    the extension tests above must not be silently skipped: a failed build fails here.
    FASTMOCO_BUILD_EXT=0 is the one documented way to install without it."""
    import os

    if os.environ.get("FASTMOCO_BUILD_EXT") == "0":
        pytest.skip("FASTMOCO_BUILD_EXT=0: installed without the extension on purpose")
    assert HAS_EXT, (
        "fastmoco._C is missing: reinstall with "
        'pip install --no-build-isolation -e ".[dev]" and read the compiler errors'
    )


def _check_compiled_enqueues(step) -> torch.Tensor:
    """step(queue, ptr, keys) enqueues keys * 2: three batches that wrap a K=7 queue, each
    equal to the reference; returns the queue."""
    queue, ptr = torch.zeros(7, 3), torch.tensor([5])
    want, want_ptr = torch.zeros(7, 3), torch.tensor([5])
    for B in (4, 7, 2):
        keys = torch.randn(B, 3)
        step(queue, ptr, keys)
        enqueue_reference(want, want_ptr, keys * 2)
        assert_equal(queue, want, f"compiled, B={B}")
        assert_equal(ptr, want_ptr, f"compiled ptr, B={B}")
    return queue
