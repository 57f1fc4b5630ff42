"""The fused Triton kernels of info_nce and nt_xent against the float64 reference.

Without a GPU these run the kernels themselves in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1 first); with one, on CUDA tensors. The
interpreter tiles are 16 x 16 and the stream is split in two, so ragged sizes cross tile
and split edges. bf16: the interpreter computes bf16 dots wrongly, so there the kernels load
bf16 and multiply in fp32 (the bf16 loads, strides and casts are covered; the bf16 tensor-
core dot is only covered by the gpu-marked tests).

Tests that mirror the PyTorch path's (rank, mixed dtypes, low precision, ...) are one
check parametrised by backend in tests/test_info_nce.py. The gpu-marked tests compare by
relative norm error against fp64 (fused_against_fp64); test_gpu_checks_reject_wrong_results
runs the very same checks here, through the interpreter, on zeroed and 1%-scaled results.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import Allocations, assert_close, rel_mismatch
from test_info_nce import loss_and_grads, make_queue

from fastmoco.kernels import _info_nce_tiles as tiles
from fastmoco.kernels import info_nce as kernels
from fastmoco.ops import info_nce, nt_xent
from fastmoco.ops.reference import info_nce_reference, nt_xent_reference

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU run without TRITON_INTERPRET=1: the kernels cannot run (see tests/conftest.py)",
)
gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
ROOT = Path(__file__).resolve().parents[1]


def fused(q, k, queue, T=0.2, **kw):
    return info_nce(q, k, queue, T, backend="triton", **kw)


def on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def fused_against_fp64(q, k, leaf, view, dtype, bound, *, q_only=False, tamper=None, **kw):
    """Reports (an empty list when right) on the fused op's loss and gradients for inputs
    rounded to `dtype`, by relative norm error against the fp64 reference on the same
    rounded inputs: value, dq, and unless q_only (MoCo's single pass) dk and dqueue.
    tamper(name, tensor) may replace a result before the comparison: the CPU tests use it
    to show that a zeroed or 1%-scaled gradient is rejected."""
    T, reduction = kw.pop("T", 0.2), kw.get("reduction", "mean")
    q, k, leaf = on_device(q, k, leaf)
    low = [t.to(dtype) for t in (q, k)] + [None if leaf is None else leaf.to(dtype)]
    grad_out = torch.rand(q.shape[0], device=DEVICE) if reduction == "none" else None

    def run(fn, tensors, g):
        if not q_only:
            return loss_and_grads(fn, *tensors[:2], tensors[2], view, g)
        qq = tensors[0].detach().clone().requires_grad_()
        queue = None if tensors[2] is None else view(tensors[2])
        loss = fn(qq, tensors[1], queue)
        return loss.detach(), torch.autograd.grad(loss, qq, g)

    loss, grads = run(lambda a, b, c: fused(a, b, c, T, **kw), low, grad_out)
    wide = [None if t is None else t.double() for t in low]
    ref_kw = dict(normalize=kw.get("normalize", True), reduction=reduction)
    g64 = None if grad_out is None else grad_out.double()
    ref_loss, ref_grads = run(lambda a, b, c: info_nce_reference(a, b, c, T, **ref_kw), wide, g64)
    reports = [] if loss.dtype == torch.float32 else [f"loss dtype {loss.dtype}"]
    names = ("loss", "dq", "dk", "dqueue")
    for name, got, want in zip(names, (loss, *grads), (ref_loss, *ref_grads), strict=False):
        if name != "loss" and got.dtype != dtype:
            reports.append(f"{name} dtype {got.dtype}, want {dtype}")
        if tamper is not None:
            got = tamper(name, got)
        reports.append(rel_mismatch(got, want, bound, name=f"{name} ({dtype})"))
    return [r for r in reports if r is not None]


def check(q, k, leaf, view, dtype=torch.float32, bound=1e-4, **kw):
    reports = fused_against_fp64(q, k, leaf, view, dtype, bound, **kw)
    assert not reports, "\n".join(reports)


@pytest.mark.parametrize(
    "N,K,C,layout",
    [
        (1, 1, 3, "contiguous"),
        (17, 20, 16, "transposed"),
        (37, 101, 40, "transposed"),
        (37, 101, 40, "strided"),
        (5, 300, 129, "contiguous"),
        (40, 33, 7, "strided"),
    ],
)
def test_queue_mode_fp32(N, K, C, layout):
    torch.manual_seed(N * 1000 + K)
    leaf, view = make_queue(K, C, layout)
    # N = K = 1: loss and gradients ~4e-4 are differences of terms ~5 (the positive
    # dominates): fp32 rounding of those terms is then ~3e-4 of the result
    bound = 1e-3 if N == 1 else 1e-4
    check(torch.randn(N, C, dtype=F64), torch.randn(N, C, dtype=F64), leaf, view, bound=bound)


# Relative norm error bounds. 16-bit: the outputs' own rounding is ~1e-3 (rms of 2**-9
# relative); 5e-3 leaves room for the kernels' bf16 probabilities and still rejects a
# result that is 1% off (test_gpu_checks_reject_wrong_results), which 1e-2 would not.
BOUND = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "N,K,C,in_batch",
    [(1, 1, 3, False), (37, 101, 40, False), (5, 300, 129, False), (40, None, 24, True)],
)
def test_single_pass_dq_when_only_q_needs_grad(N, K, C, in_batch, reduction, dtype):
    """MoCo's case (keys and queue from the key encoder): dq comes out of the forward pass."""
    torch.manual_seed(N + C)
    q, k = torch.randn(N, C), torch.randn(N, C)
    leaf, view = (None, None) if in_batch else make_queue(K, C, "transposed", torch.float32)
    check(q, k, leaf, view, dtype, BOUND[dtype], q_only=True, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N,C", [(1, 16), (17, 3), (40, 129)])
def test_in_batch_mode_fp32(N, C, reduction):
    torch.manual_seed(N + C)
    check(
        torch.randn(N, C, dtype=F64), torch.randn(N, C, dtype=F64), None, None, reduction=reduction
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("N,C", [(1, 8), (9, 16), (20, 33)])
def test_nt_xent_matches_reference(N, C, reduction):
    torch.manual_seed(N * C)
    z = [torch.randn(N, C, dtype=F64, device=DEVICE) for _ in range(2)]

    def ours(a, b, _):
        return nt_xent(a, b, 0.5, reduction=reduction, backend="triton")

    def ref(a, b, _):
        return nt_xent_reference(a, b, 0.5, reduction=reduction)

    g_out = torch.rand(2 * N, device=DEVICE, dtype=F64) if reduction == "none" else None
    z32 = [t.float() for t in z]
    loss, grads = loss_and_grads(ours, *z32, None, None, None if g_out is None else g_out.float())
    ref_loss, ref_grads = loss_and_grads(ref, *[t.double() for t in z32], None, None, g_out)
    assert_close(loss, ref_loss, 2e-5, 2e-5, name="loss")
    for name, g, rg in zip(("dz1", "dz2"), grads, ref_grads, strict=True):
        assert_close(g, rg, 2e-5, 2e-5, name=name)
    torch_loss = nt_xent(z[0], z[1], 0.5, reduction=reduction, backend="torch")
    assert_close(torch_loss, nt_xent_reference(z[0], z[1], 0.5, reduction=reduction), 1e-10)
    _, rank = nt_xent(z[0].float(), z[1].float(), 0.5, return_stats=True, backend="triton")
    _, torch_rank = nt_xent(z[0], z[1], 0.5, return_stats=True, backend="torch")
    assert rank.shape == (2 * N,) and (rank - torch_rank).abs().max() <= 1


def test_no_n_by_k_tensor():
    """The launcher allocates O(N * splits * C) at most; the kernels hold tiles only."""
    if DEVICE != "cpu":
        pytest.skip("the allocation tracker sees CPU storages; the GPU bench measures memory")
    torch.manual_seed(10)
    N, K, C = 32, 2048, 8
    q = torch.randn(N, C, requires_grad=True)
    k, buf = torch.randn(N, C), torch.randn(C, K, requires_grad=True)
    with Allocations() as fwd:
        loss = fused(q, k, buf.T)
    with Allocations() as bwd:
        loss.backward()
    assert fwd.largest < N * K * 4 // 8, fwd.largest
    assert bwd.largest <= K * C * 4, bwd.largest  # dqueue itself is K x C
    assert fwd.syncs == bwd.syncs == 0


def test_registered_op_passes_opcheck_and_compiles_without_graph_breaks():
    from fastmoco.ops._info_nce_fused import info_nce_fwd

    torch.manual_seed(11)
    q = torch.randn(9, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(9, 16, device=DEVICE, requires_grad=True)
    queue = torch.randn(16, 40, device=DEVICE).T.requires_grad_()
    q_only = q.detach().requires_grad_()
    samples = (
        (q, k, queue, 0.2, True, False, False, -1, False),  # queue, every gradient
        (q_only, k.detach(), queue.detach(), 0.2, True, False, False, -1, True),  # one pass
        (q, k, k, 0.2, True, True, True, -1, False),  # in-batch
    )
    for args in samples:
        torch.library.opcheck(
            info_nce_fwd,
            args,
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )

    def step(q, k, queue):
        return fused(q, k, queue, 0.1) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, queue)
    got.backward()
    dq = q.grad.clone()
    q.grad = None
    want = step(q, k, queue)
    want.backward()
    assert_close(got.detach(), want.detach(), 1e-6, name="compiled loss")
    assert_close(dq, q.grad, 1e-6, name="compiled dq")


def test_backend_triton_errors_name_the_fix():
    q = torch.randn(4, 8, dtype=F64)
    with pytest.raises(ValueError, match="backend='torch'"):
        info_nce(q, q, None, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        info_nce(q, q, None, backend="cuda")


# ------------------------------------------------------------------ the GPU checks
# Each is a function returning mismatch reports, so that the CPU test below can run the
# very same check on tampered results. Sizes: the goal shapes of the issue (MoCo single
# pass N=256, K=65536, C=128; general N=300, K=10007, C=512) on the GPU, tiny ones on CPU.


def general_path_reports(N, K, C, dtype, tamper=None):
    """Every gradient (dq, dk, dqueue) and the value, unit queue rows, official buf.T."""
    torch.manual_seed(N + K + C)
    q, k = torch.randn(N, C, dtype=F64), torch.randn(N, C, dtype=F64)
    leaf, view = make_queue(K, C, "transposed")
    leaf = torch.nn.functional.normalize(leaf, dim=0)  # unit keys, as MoCo keeps them
    return fused_against_fp64(q, k, leaf, view, dtype, BOUND[dtype], tamper=tamper)


def single_pass_reports(N, K, C, dtype, layout, tamper=None):
    """MoCo's step: only q needs a gradient, so loss and dq come from one pass."""
    torch.manual_seed(N + K + C + 1)
    q, k = torch.randn(N, C, dtype=F64), torch.randn(N, C, dtype=F64)
    leaf, view = make_queue(K, C, layout)
    leaf = torch.nn.functional.normalize(leaf, dim=1 if layout == "contiguous" else 0)
    return fused_against_fp64(q, k, leaf, view, dtype, BOUND[dtype], q_only=True, tamper=tamper)


def graph_replay_reports(N, K, C, tamper=None):
    """Loss and dq of a CUDA-graph replay on new inputs (captured once, bf16)."""
    torch.manual_seed(13)
    q = torch.randn(N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
    queue = torch.nn.functional.normalize(torch.randn(K, C, device="cuda"), dim=1).bfloat16()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: autotuning and compilation happen here
            q.grad = None
            fused(q, k, queue).backward()
    torch.cuda.current_stream().wait_stream(side)
    q.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = fused(q, k, queue)
        loss.backward()
    with torch.no_grad():
        q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    q64 = q.detach().double().requires_grad_()
    want = info_nce_reference(q64, k.double(), queue.double())
    want.backward()
    got = {"loss": loss.detach(), "dq": q.grad}
    if tamper is not None:
        got = {name: tamper(name, t) for name, t in got.items()}
    bound = BOUND[torch.bfloat16]
    reports = [rel_mismatch(got["loss"], want.detach(), bound, "replayed loss")]
    reports.append(rel_mismatch(got["dq"], q64.grad, bound, "replayed dq"))
    return [r for r in reports if r is not None]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,K,C", [(256, 65536, 128), (300, 10007, 512), (1000, 4099, 100)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_general_path_against_reference(N, K, C, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # restored after
    reports = general_path_reports(N, K, C, dtype)
    assert not reports, "\n".join(reports)


@pytest.mark.parametrize("layout", ["transposed", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_moco_single_pass_against_reference(dtype, layout, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    reports = single_pass_reports(256, 65536, 128, dtype, layout)
    assert not reports, "\n".join(reports)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_cuda_graph_capture():
    reports = graph_replay_reports(256, 8192, 128)
    assert not reports, "\n".join(reports)


TAMPERS = {
    "zeroed": lambda t: torch.zeros_like(t),
    "scaled by 1.01": lambda t: t * 1.01,
    "scaled by 0.99": lambda t: t * 0.99,
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
@pytest.mark.parametrize(
    "check_name,dtype",
    [
        ("general", torch.float32),
        ("general", torch.bfloat16),
        ("single_pass", torch.float32),
        ("single_pass", torch.bfloat16),
    ],
)
def test_gpu_checks_reject_wrong_results(check_name, dtype, tamper):
    """The checks of the gpu-marked tests, run here at small sizes: right results pass,
    and a result zeroed or off by 1% fails, for every output they compare."""
    if DEVICE != "cpu":
        pytest.skip("the CPU counterpart of the gpu-marked checks")

    def run(target=None):
        change = (
            None
            if target is None
            else (lambda name, t: TAMPERS[tamper](t) if name == target else t)
        )
        if check_name == "general":
            return general_path_reports(37, 101, 40, dtype, tamper=change)
        return single_pass_reports(37, 101, 40, dtype, "transposed", tamper=change)

    assert run() == []
    outputs = ("loss", "dq", "dk", "dqueue") if check_name == "general" else ("loss", "dq")
    for name in outputs:
        reports = run(name)
        assert len(reports) == 1 and reports[0].startswith("relative error"), (name, reports)
        assert f"{name} (" in reports[0]


def test_gpu_graph_check_rejects_wrong_results(monkeypatch):
    """graph_replay_reports compares loss and dq the same way (rel_mismatch, 5e-3): a
    zeroed or 1%-scaled dq fails it. Without CUDA, its comparison is run on the
    interpreter's result of the same computation (no graph)."""
    if DEVICE != "cpu":
        pytest.skip("the CPU counterpart of the gpu-marked check")
    torch.manual_seed(13)
    q = torch.randn(24, 16, requires_grad=True)
    k, queue = torch.randn(24, 16), torch.nn.functional.normalize(torch.randn(50, 16), dim=1)
    fused(q, k, queue).backward()
    q64 = q.detach().double().requires_grad_()
    info_nce_reference(q64, k.double(), queue.double()).backward()
    bound = BOUND[torch.bfloat16]
    assert rel_mismatch(q.grad, q64.grad, bound) is None
    for change in TAMPERS.values():
        assert rel_mismatch(change(q.grad), q64.grad, bound) is not None


def test_auto_backend_falls_back_only_on_kernel_failures(monkeypatch):
    """backend=None: a Triton compile or launch error warns once, with its cause, and the
    PyTorch path answers for that kind of input (now and later); an out-of-memory error,
    bad input or any other exception propagates and changes nothing. backend="triton"
    raises every error."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from fastmoco.ops import _common
    from fastmoco.ops._common import FusedKernels, is_kernel_failure

    op = sys.modules["fastmoco.ops.info_nce"]  # the module (the package exports the function)
    errors = []

    def broken(*args, **kwargs):
        raise errors[-1]

    monkeypatch.setattr(_common, "select_backend", lambda backend, allowed, device: "triton")
    monkeypatch.setattr(op, "triton_loss", broken)
    # a fresh rule (registered in a copy of the list, which the monkeypatch puts back)
    monkeypatch.setattr(FusedKernels, "instances", list(FusedKernels.instances))
    fresh = FusedKernels("InfoNCE", op.KERNELS.dtypes, op.KERNELS.max_width)
    monkeypatch.setattr(op, "KERNELS", fresh)
    q, k, queue = torch.randn(5, 8), torch.randn(5, 8), torch.randn(20, 8)
    want = info_nce_reference(q.double(), k.double(), queue.double())

    for err in (
        ZeroDivisionError("integer division or modulo by zero"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        ValueError("q must be 2-D"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
    ):
        assert not is_kernel_failure(err)
        errors.append(err)
        with pytest.raises(type(err)):
            info_nce(q, k, queue)
        assert op.KERNELS.failed == {}  # not remembered: the next call tries again

    errors.append(OutOfResources(262400, 232448, "shared memory"))
    with pytest.warns(RuntimeWarning, match="out of resource: shared memory") as warned:
        got = info_nce(q, k, queue)
    assert len(warned) == 1
    assert_close(got, want, 1e-6, 1e-6, name="fallback loss")
    errors.append(AssertionError("a second attempt must not happen"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no attempt, no second warning
        assert_close(info_nce(q, k, queue), want, 1e-6, 1e-6)
    with pytest.raises(AssertionError):
        info_nce(q, k, queue, backend="triton")
    assert is_kernel_failure(CompilationError.__new__(CompilationError))
    assert is_kernel_failure(RuntimeError("Triton Error [CUDA]: no kernel image is available"))


def test_a_kernel_failure_while_capturing_raises_and_is_not_remembered(monkeypatch):
    """Inside a CUDA-graph capture a fallback would record the PyTorch path into the graph
    (or half of each): the kernel failure propagates, so the capture fails as a whole and
    the step's own rule decides (eager, or every rank stops); nothing is remembered."""
    from triton.runtime.errors import OutOfResources

    from fastmoco.ops import _common
    from fastmoco.ops._common import FusedKernels

    op = sys.modules["fastmoco.ops.info_nce"]

    def broken(*args, **kwargs):
        raise OutOfResources(262400, 232448, "shared memory")

    monkeypatch.setattr(_common, "select_backend", lambda backend, allowed, device: "triton")
    monkeypatch.setattr(op, "triton_loss", broken)
    monkeypatch.setattr(FusedKernels, "instances", list(FusedKernels.instances))
    monkeypatch.setattr(
        op, "KERNELS", FusedKernels("InfoNCE", op.KERNELS.dtypes, op.KERNELS.max_width)
    )
    q, k, queue = torch.randn(5, 8), torch.randn(5, 8), torch.randn(20, 8)
    monkeypatch.setattr(_common, "_capturing", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        with pytest.raises(OutOfResources):
            info_nce(q, k, queue)
    assert op.KERNELS.failed == {}
    monkeypatch.setattr(_common, "_capturing", lambda: False)  # outside a capture: the rule
    with pytest.warns(RuntimeWarning, match="out of resource"):
        info_nce(q, k, queue)
    assert len(op.KERNELS.failed) == 1


def test_training_steps_match_the_reference():
    """A few SGD steps of a linear encoder with a MoCo-style queue: the fused loss and the
    reference give the same losses step by step and the same weights at the end."""
    torch.manual_seed(14)
    N, D, C, K = 24, 20, 16, 60
    x = torch.randn(6, N, D, device=DEVICE)
    weights, losses = [], []
    for loss_fn in (fused, lambda q, k, queue: info_nce_reference(q, k, queue, 0.2)):
        torch.manual_seed(15)
        enc = torch.nn.Linear(D, C).to(DEVICE)
        opt = torch.optim.SGD(enc.parameters(), lr=0.5)
        queue = torch.nn.functional.normalize(torch.randn(K, C, device=DEVICE), dim=1)
        run = []
        for step in range(6):
            q = enc(x[step])
            with torch.no_grad():
                k = torch.nn.functional.normalize(enc(x[step] + 0.1), dim=1)
            loss = loss_fn(q, k, queue)
            opt.zero_grad()
            loss.backward()
            opt.step()
            queue = torch.cat([k, queue[:-N]])  # newest keys first, oldest dropped
            run.append(loss.item())
        losses.append(run)
        weights.append(enc.weight.detach().clone())
    assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), 1e-5, name="losses")
    assert_close(weights[0], weights[1], 1e-5, name="weights")


def test_kernels_compile_launch_like_for_h100():
    """The interpreter accepts code that the GPU compiler rejects: compile every kernel for
    sm_90 as a launch at the goal shapes would, with every tile the autotuner would try
    there (tools/kernel_report.py --all-tiles, in a process without TRITON_INTERPRET;
    Triton's bundled ptxas, no GPU needed) and check that each fits the shared memory of
    sm_90 (fp32 at C = 512 did not), that no tile of any kernel spills, in bf16 or fp32
    (fp32 at C = 512 spilled 7-8 KB per thread before it ran in feature chunks), and that
    the official buf.T queue in bf16 is read with async copies and no scalar 16-bit loads
    (a non-contiguous index gave those)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTMOCO_PIN_TILES")
    }
    cmd = [sys.executable, str(ROOT / "tools" / "kernel_report.py"), "--all-tiles"]
    cmd += ["--case", "moco", "--case", "general", "--dtype", "bf16", "--dtype", "fp32"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    header, _, *lines = out.stdout.splitlines()
    columns = [c.strip() for c in header.split("|")[1:-1]]
    rows = [
        dict(zip(columns, (c.strip() for c in line.split("|")[1:-1]), strict=True))
        for line in lines
    ]
    launches = {(r["kernel"], r["case"], r["dtype"]) for r in rows}
    names = {"_forward_kernel", "_finalize_kernel", "_dq_kernel", "_dstream_kernel"}
    want = {
        (k, "moco", d) for k in ("_forward_kernel", "_finalize_kernel") for d in ("bf16", "fp32")
    }
    want |= {(k, "general", d) for k in names for d in ("bf16", "fp32")}
    assert launches == want, out.stdout  # moco: forward + finalize; general: all four
    for r in rows:
        name = f"{r['kernel']} {r['case']} {r['dtype']} {r['BLOCK_N x BLOCK_K']} w{r['warps']}"
        assert int(r["shared (B)"]) <= tiles.SHARED_LIMIT, f"{name} cannot launch"
        assert int(r["stack (spills)"]) == 0, f"{name} spills:\n{out.stdout}"
        wide = r["dtype"] == "fp32" and r["C"] == "512" and r["kernel"] != "_finalize_kernel"
        assert (r["CHUNK_C / OUT_C"] != "-") == wide, f"{name}: feature chunks for fp32 at C=512"
    moco_bf16 = [
        r
        for r in rows
        if r["case"] == "moco" and r["kernel"] == "_forward_kernel" and r["dtype"] == "bf16"
    ]
    # the first tile (FASTMOCO_PIN_TILES's) and most others read buf.T with async copies
    assert int(moco_bf16[0]["LDGSTS"]) > 0, out.stdout
    assert all(int(r["LDG.U16"]) == 0 for r in moco_bf16), out.stdout


def test_no_dot_operand_transposes_an_accumulator():
    """Hopper miscompile (fla-org/flash-linear-attention issues 640 and 984, PR 826):
    tl.dot(tl.trans(x), y) with x derived from a dot accumulator gives wrong results with
    Triton >= 3.4. Every tl.trans inside a tl.dot of kernels/info_nce.py must wrap a tile
    loaded from memory (kt, q), never the logits or probabilities."""
    import ast

    tree = ast.parse((ROOT / "kernels" / "info_nce.py").read_text())
    loaded = {"kt", "q", "n"}
    dots = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "tl.dot":
            dots += 1
            for operand in node.args[:2]:
                if isinstance(operand, ast.Call) and ast.unparse(operand.func) == "tl.trans":
                    inner = operand.args[0]
                    while isinstance(inner, ast.Call):  # x.to(dtype) -> x
                        inner = inner.func.value if isinstance(inner.func, ast.Attribute) else None
                    assert isinstance(inner, ast.Name) and inner.id in loaded, ast.unparse(node)
    assert dots >= 8  # every dot of the four kernels was looked at


def test_dot_flags_follow_the_inputs():
    """One dtype: dots in that dtype (a bug once made every bf16 dot fp32); mixed dtypes:
    fp32 in registers; fp32 operands: tf32x3 unless TF32 is allowed, as torch.matmul."""
    table = kernels._flag_table.__wrapped__
    modes = (True, False, False, False)
    for dtype in (torch.float16, torch.float32):
        assert table(dtype, dtype, dtype, *modes, False, 128, False)["DOT_F32"] is False
    assert table(torch.float16, torch.float32, torch.float16, *modes, False, 128, False)["DOT_F32"]
    f32 = torch.float32
    assert table(f32, f32, f32, *modes, False, 128, False)["PRECISION"] == kernels.FP32_PRECISION
    assert table(f32, f32, f32, *modes, True, 128, False)["PRECISION"] == "tf32"
    half = torch.float16
    assert table(half, half, half, *modes, False, 128, False)["PRECISION"] == "tf32"  # unused
    # feature chunks: fp32 operands wider than 128 features, nothing else
    wide = table(f32, f32, f32, *modes, False, 512, False)
    assert (wide["CHUNK_C"], wide["OUT_C"], wide["BLOCK_C"]) == (32, 128, 512)
    for dtype, C in ((f32, 128), (half, 512)):
        flags = table(dtype, dtype, dtype, *modes, False, C, False)
        assert flags["CHUNK_C"] == flags["OUT_C"] == flags["BLOCK_C"] == C, (dtype, C)


def test_autotune_key_includes_the_dot_precision():
    """A tile tuned with TF32 on must not be reused after allow_tf32=False: the precision
    is part of every autotuning key. (The gpu-marked tests change allow_tf32 only through
    monkeypatch, which restores it.)"""
    for name in ("_forward_kernel", "_dq_kernel", "_dstream_kernel"):
        keys = getattr(kernels, name).keys
        assert {"PRECISION", "PROB_PRECISION", "DOT_F32", "INT64"} <= set(keys), (name, keys)


@pytest.fixture
def fresh_plans():
    """Launch plans and constexprs forgotten before and after the test: one that changes
    what they are computed from (a monkeypatched helper or constant) must neither see
    stale ones nor leave its own behind."""
    caches = (kernels._forward_plan, kernels._backward_plan, kernels._flag_table)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def test_int64_offsets_when_the_queue_is_huge(monkeypatch, fresh_plans):
    """K * C >= 2**31 (here K = 2**24, C = 128: meta tensors, no memory) switches the
    address arithmetic to int64; the int64 variant gives the same results."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    q, big = torch.empty(256, 128, **meta), torch.empty(128, 2**24, **meta).T
    small = torch.empty(65536, 128, **meta)
    out = torch.empty(0, device="meta")
    assert kernels._flags(q, q, big, True, False, False, -1, out)["INT64"]
    assert not kernels._flags(q, q, small, True, False, False, -1, out)["INT64"]
    torch.manual_seed(16)
    q, k = torch.randn(37, 40, device=DEVICE), torch.randn(37, 40, device=DEVICE)
    leaf, view = make_queue(101, 40, "transposed", torch.float32)
    want = fused_against_fp64(q, k, leaf, view, torch.float32, 1e-5)
    monkeypatch.setattr(kernels, "_last_offset", lambda *a: 2**31)  # force the int64 variant
    kernels._forward_plan.cache_clear()  # made with int32 offsets for these shapes
    kernels._backward_plan.cache_clear()
    plan = kernels._forward_plan(
        kernels._signature(q, k, view(leaf)), True, False, False, -1, False
    )
    assert plan.flags["INT64"] and plan.finalize_flags["INT64"]
    assert want == [] and fused_against_fp64(q, k, leaf, view, torch.float32, 1e-5) == []
    assert fused_against_fp64(q, k, leaf, view, torch.float32, 1e-5, q_only=True) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feature_chunks_match_the_reference(monkeypatch, fresh_plans, dtype):
    """fp32 operands at C > 128 run in feature chunks (the logits' dot CHUNK_C features at
    a time, OUT_C features of dq or dstream per program). Here the chunks are made small
    (8 and 16 features) so that small C crosses several of them, ragged ones included:
    every mode and gradient matches the reference as the whole-row kernels do. (Under the
    interpreter bf16 dots run in fp32, so bf16 inputs take the chunks too.)"""
    monkeypatch.setattr(kernels, "FP32_CHUNK_C", 8)
    monkeypatch.setattr(kernels, "FP32_OUT_C", 16)
    if DEVICE != "cpu" and dtype != torch.float32:
        pytest.skip("on a GPU only fp32 operands take the chunks")
    for C in (40, 17):
        flags = kernels._flag_table(dtype, dtype, dtype, True, False, False, False, False, C, False)
        assert flags["CHUNK_C"] == 8 and flags["OUT_C"] == 16 < flags["BLOCK_C"], (C, flags)
    torch.manual_seed(17)
    bound = BOUND[dtype]
    q, k = torch.randn(19, 40, dtype=F64), torch.randn(19, 40, dtype=F64)
    leaf, view = make_queue(50, 40, "transposed")
    check(q, k, leaf, view, dtype, bound)  # forward, dq and dstream kernels
    leaf, view = make_queue(50, 40, "contiguous")
    check(q, k, leaf, view, dtype, bound, q_only=True)  # the single pass
    q, k = torch.randn(21, 17, dtype=F64), torch.randn(21, 17, dtype=F64)
    check(q, k, None, None, dtype, bound, reduction="none")  # in-batch: dstream's Jacobian
    z = [torch.randn(9, 17, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2)]
    zz = [t.detach().double().requires_grad_() for t in z]
    got = nt_xent(*z, 0.5, backend="triton")
    want = nt_xent_reference(*zz, 0.5)
    torch.autograd.backward([got, want])
    assert rel_mismatch(got.detach(), want.detach(), bound) is None
    for a, b in zip(z, zz, strict=True):
        assert rel_mismatch(a.grad, b.grad, bound) is None


def test_pinned_tiles_keep_one_config_per_kernel(monkeypatch):
    """FASTMOCO_PIN_TILES=1 (read at import) reduces each autotune list to its first
    fitting tile, so a device check compiles one variant per kernel and shape."""
    q = torch.empty(1, 1, device="meta", dtype=torch.bfloat16)
    assert len(tiles.prune(tiles.GPU_ROW_CONFIGS, {"Q": q}, BLOCK_C=128)) > 1
    monkeypatch.setattr(tiles, "PIN_TILES", True)
    for configs in (tiles.GPU_ROW_CONFIGS, tiles.GPU_KEY_CONFIGS):
        for C in (128, 512, 1024):
            assert len(tiles.prune(configs, {"Q": q}, BLOCK_C=C)) == 1
    env = {**os.environ, "FASTMOCO_PIN_TILES": "1"}
    code = "from fastmoco.kernels import _info_nce_tiles as t; print(t.PIN_TILES)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_fp32_wide_features_fit_shared_memory():
    """fp32 at C = 512 (and 1024): every tile kept fits sm_90's shared memory by the
    estimate (which the launch-like compile test checks against real sizes)."""
    f32 = torch.empty(1, 1, device="meta", dtype=torch.float32)
    for configs, extra in ((tiles.GPU_ROW_CONFIGS, {}), (tiles.GPU_KEY_CONFIGS, {"DS": 1})):
        for C in (128, 512):
            for c in tiles.prune(configs, {"Q": f32, **extra}, BLOCK_C=C):
                assert tiles.shared_bytes(c, C, 4) <= tiles.SHARED_LIMIT, (C, c)
