"""The fused Triton kernels of info_nce and nt_xent against the float64 reference.

Without a GPU these run the kernels themselves in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1 first); with one, on CUDA tensors. The
interpreter tiles are 16 x 16 and the stream is split in two, so ragged sizes cross tile
and split edges. bf16: the interpreter computes bf16 dots wrongly, so there the kernels load
bf16 and multiply in fp32 (the bf16 loads, strides and casts are covered; the bf16 tensor-
core dot is only covered by the gpu-marked tests).
"""

import os

import pytest
import torch
from test_info_nce import (
    Allocations,
    assert_close,
    loss_and_grads,
    make_queue,
    plain_pytorch,
)

from fastmoco.ops import info_nce, nt_xent
from fastmoco.ops.reference import (
    info_nce_logits_reference,
    info_nce_reference,
    nt_xent_reference,
)

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU run without TRITON_INTERPRET=1: the kernels cannot run (see tests/conftest.py)",
)


def fused(q, k, queue, T=0.2, **kw):
    return info_nce(q, k, queue, T, backend="triton", **kw)


def on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def check(q, k, leaf, view, dtype=torch.float32, atol=2e-5, T=0.2, **kw):
    """Loss and every gradient of the fused op (inputs in `dtype`) against fp64."""
    q, k, leaf = on_device(q, k, leaf)
    low = [t.to(dtype) for t in (q, k)] + [None if leaf is None else leaf.to(dtype)]
    reduction, normalize = kw.get("reduction", "mean"), kw.get("normalize", True)
    grad_out = torch.rand(q.shape[0], device=DEVICE) if reduction == "none" else None
    loss, grads = loss_and_grads(
        lambda a, b, c: fused(a, b, c, T, **kw), *low[:2], low[2], view, grad_out
    )

    def ref(a, b, c):
        return info_nce_reference(a, b, c, T, normalize=normalize, reduction=reduction)

    wide = [None if t is None else t.double() for t in low]
    wide_out = None if grad_out is None else grad_out.double()
    ref_loss, ref_grads = loss_and_grads(ref, *wide[:2], wide[2], view, wide_out)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, atol, atol, name="loss")
    assert len(grads) == len(ref_grads) == (2 if leaf is None else 3)
    for name, g, rg in zip(("dq", "dk", "dqueue"), grads, ref_grads, strict=False):
        assert g.dtype == dtype, name
        assert_close(g, rg, atol, atol, name=name)


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
    check(torch.randn(N, C, dtype=F64), torch.randn(N, C, dtype=F64), leaf, view)


def q_only_grad(fn, q, k, queue, grad_out=None):
    """fn's loss and dq when k and the queue need no gradient: the single-pass path."""
    q = q.detach().clone().requires_grad_()
    loss = fn(q, k, queue)
    return loss.detach(), torch.autograd.grad(loss, q, grad_out)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "N,K,C,in_batch",
    [(1, 1, 3, False), (37, 101, 40, False), (5, 300, 129, False), (40, None, 24, True)],
)
def test_single_pass_dq_when_only_q_needs_grad(N, K, C, in_batch, reduction, dtype):
    """MoCo's case (keys and queue from the key encoder): dq comes out of the forward pass."""
    torch.manual_seed(N + C)
    q, k = torch.randn(N, C, device=DEVICE), torch.randn(N, C, device=DEVICE)
    queue = None if in_batch else torch.randn(C, K, device=DEVICE).T
    q, k = q.to(dtype), k.to(dtype)
    queue = None if queue is None else queue.to(dtype)
    grad_out = torch.rand(N, device=DEVICE) if reduction == "none" else None
    loss, dq = q_only_grad(
        lambda a, b, c: fused(a, b, c, reduction=reduction), q, k, queue, grad_out
    )
    wide = [None if t is None else t.double() for t in (q, k, queue)]
    ref_loss, ref_dq = q_only_grad(
        lambda a, b, c: info_nce_reference(a, b, c, 0.2, reduction=reduction),
        *wide,
        None if grad_out is None else grad_out.double(),
    )
    assert dq.dtype == dtype
    atol = 2e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    assert_close(loss, ref_loss, 2e-5 if dtype == torch.float32 else 1e-4, name="loss")
    assert_close(dq, ref_dq, atol * max(1.0, ref_dq.abs().max().item()), name="dq")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N,C", [(1, 16), (17, 3), (40, 129)])
def test_in_batch_mode_fp32(N, C, reduction):
    torch.manual_seed(N + C)
    check(
        torch.randn(N, C, dtype=F64), torch.randn(N, C, dtype=F64), None, None, reduction=reduction
    )


@pytest.mark.parametrize("in_batch", [False, True])
def test_unnormalized_large_logits(in_batch):
    """normalize=False with big logits (|s| up to ~300): the online max keeps exp finite."""
    torch.manual_seed(3)
    N, K, C = 19, 70, 24
    q, k = 3 * torch.randn(N, C, dtype=F64), 3 * torch.randn(N, C, dtype=F64)
    leaf, view = (None, None) if in_batch else make_queue(K, C, "transposed")
    check(q, k, leaf, view, atol=1e-3, normalize=False, T=0.5)


@pytest.mark.parametrize("in_batch", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_plain_pytorch_error(dtype, in_batch):
    """The fused op in fp16/bf16 errs at most 2x what plain PyTorch errs in that dtype."""
    torch.manual_seed(5)
    N, K, C, T = 33, 200, 64, 0.2
    q, k = torch.randn(N, C).to(dtype), torch.randn(N, C).to(dtype)
    leaf, view = (None, None) if in_batch else make_queue(K, C, "transposed", dtype)
    q, k, leaf = on_device(q, k, leaf)

    def ref(a, b, c):
        return info_nce_reference(a, b, c, T)

    loss, grads = loss_and_grads(lambda a, b, c: fused(a, b, c, T), q, k, leaf, view)
    wide = [None if t is None else t.double() for t in (q, k, leaf)]
    ref_loss, ref_grads = loss_and_grads(ref, *wide[:2], wide[2], view)
    plain_loss, plain_grads = loss_and_grads(
        lambda a, b, c: plain_pytorch(a, b, c, T), q.cpu(), k.cpu(), on_cpu(leaf), view
    )
    eps = torch.finfo(dtype).eps
    names = ("loss", "dq", "dk", "dqueue")
    for name, mine, want, theirs in zip(
        names, (loss, *grads), (ref_loss, *ref_grads), (plain_loss, *plain_grads), strict=False
    ):
        assert mine.dtype == (torch.float32 if name == "loss" else dtype), name
        plain_err = (theirs.double() - want.cpu()).abs().max().item()
        atol = max(2 * plain_err, 2 * eps * want.abs().max().item())
        assert_close(mine.cpu(), want.cpu(), atol, name=f"{name} ({dtype}, plain {plain_err:.3g})")


def on_cpu(t):
    return None if t is None else t.cpu()


def test_mixed_dtypes():
    """q bf16 from an autocast head, k fp32, a fp16 queue: fp32 in registers, grads in
    each input's dtype."""
    torch.manual_seed(6)
    N, K, C = 9, 50, 16
    q = torch.randn(N, C, device=DEVICE).bfloat16().requires_grad_()
    k = torch.randn(N, C, device=DEVICE).requires_grad_()
    buf = torch.randn(C, K, device=DEVICE).half().requires_grad_()
    loss = fused(q, k, buf.T)
    loss.backward()
    assert (q.grad.dtype, k.grad.dtype, buf.grad.dtype) == (q.dtype, k.dtype, buf.dtype)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, buf)]
    ref = info_nce_reference(leaves[0], leaves[1], leaves[2].T)
    ref.backward()
    assert_close(loss.detach(), ref.detach(), 1e-5, name="loss")
    for name, t, r in zip(("dq", "dk", "dqueue"), (q, k, buf), leaves, strict=True):
        assert_close(t.grad.double(), r.grad, 2e-2 * r.grad.abs().max().item(), name=name)


def test_grads_only_where_required():
    torch.manual_seed(7)
    q = torch.randn(7, 16, device=DEVICE, requires_grad=True)
    k, queue = torch.randn(7, 16, device=DEVICE), torch.randn(40, 16, device=DEVICE)
    fused(q, k, queue).backward()
    assert q.grad is not None and k.grad is None and queue.grad is None
    want = torch.autograd.grad(info_nce_reference(q.double(), k.double(), queue.double()), q)[0]
    assert_close(q.grad, want, 1e-5, name="dq")


@pytest.mark.parametrize("N,K", [(1, 1), (7, 5), (33, 130), (33, None), (7, None)])
def test_rank_matches_materialized_logits(N, K):
    torch.manual_seed(8)
    C = 16
    q, k = torch.randn(N, C, device=DEVICE), torch.randn(N, C, device=DEVICE)
    queue = None if K is None else torch.randn(C, K, device=DEVICE).T
    loss, rank = fused(q, k, queue, return_stats=True)
    assert rank.dtype == torch.int64 and rank.shape == (N,)
    logits, labels = info_nce_logits_reference(q.double(), k.double(), queue, 0.2)
    positive = logits.gather(1, labels[:, None])
    want = (logits > positive).sum(dim=1)
    # A negative within rounding of the positive may fall either side in fp32.
    near = ((logits - positive).abs() < 1e-5).sum(dim=1) - 1
    assert ((rank - want).abs() <= near).all(), (rank, want)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    assert torch.equal(rank < 5, (top == labels[:, None]).any(dim=1))


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,K,C", [(256, 65536, 128), (300, 10007, 512), (1000, 4099, 100)])
def test_gpu_sizes_against_reference(N, K, C, dtype):
    torch.manual_seed(12)
    torch.backends.cuda.matmul.allow_tf32 = False
    q, k = torch.randn(N, C, dtype=F64), torch.randn(N, C, dtype=F64)
    leaf, view = make_queue(K, C, "transposed")
    leaf = torch.nn.functional.normalize(leaf, dim=0)  # unit keys, as MoCo keeps them
    atol = {torch.float32: 1e-5, torch.bfloat16: 3e-3, torch.float16: 1e-3}[dtype]
    check(q, k, leaf, view, dtype=dtype, atol=atol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_cuda_graph_capture():
    torch.manual_seed(13)
    q = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    queue = torch.randn(8192, 128, device="cuda", dtype=torch.bfloat16)
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
    want = info_nce_reference(q.detach().double(), k.double(), queue.double())
    assert_close(loss.detach(), want, 1e-2, name="replayed loss")


def test_auto_backend_falls_back_once_when_the_kernels_fail(monkeypatch):
    """backend=None: a kernel that fails to compile or launch warns and the PyTorch path
    answers (now and later); backend="triton" raises the error itself."""
    import sys

    op = sys.modules["fastmoco.ops.info_nce"]  # the module (the package exports the function)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(op, "select_backend", lambda backend, allowed, device: "triton")
    monkeypatch.setattr(op, "_triton_rows", broken)
    monkeypatch.setattr(op, "_TRITON_FAILED", [])
    q, k, queue = torch.randn(5, 8), torch.randn(5, 8), torch.randn(20, 8)
    with pytest.warns(RuntimeWarning, match="PyTorch path is used from now on"):
        got = info_nce(q, k, queue)
    assert_close(got, info_nce_reference(q.double(), k.double(), queue.double()), 1e-5)
    info_nce(q, k, queue)  # no second attempt
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="no kernel image"):
        info_nce(q, k, queue, backend="triton")


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


def test_kernels_compile_for_h100_without_spills():
    """The interpreter accepts code that the GPU compiler rejects: compile the four kernels
    for sm_90 (Triton's bundled ptxas, no GPU needed) in a process without
    TRITON_INTERPRET, and check the main bf16 configuration keeps everything in registers."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(root / "tools" / "kernel_report.py"), "--dtype", "bf16"]
    cmd += ["--tile", "128,64,64", "--warps", "8"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines()[2:]]
    kernels = {"_forward_kernel", "_finalize_kernel", "_dq_kernel", "_dstream_kernel"}
    assert {r[0].strip() for r in rows} == kernels
    for r in rows:
        regs, stack = int(r[5]), int(r[6])
        assert regs <= 255 and stack == 0, f"{r[0].strip()} spills: {out.stdout}"
