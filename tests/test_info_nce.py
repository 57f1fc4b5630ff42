"""info_nce against the official formula (fastmoco.ops.reference), forward and every gradient.

fp64 runs must agree with the fp64 reference to 1e-10. Lower precisions are held to the
error that plain PyTorch makes when it runs the same formula in that dtype (Liger-style
bounds), measured on the same inputs against the fp64 reference.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import Allocations, assert_close, assert_rel_close, rel_error

from fastmoco.ops import info_nce
from fastmoco.ops.reference import info_nce_logits_reference, info_nce_reference

F64 = torch.float64
CUDA = torch.cuda.is_available()
# The fused kernels run on CUDA, or on CPU tensors in Triton's interpreter (conftest.py).
TRITON_DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no CUDA device and no TRITON_INTERPRET=1: the kernels cannot run",
)
# Tests that hold both implementations to the same check: the chunked PyTorch path in
# float64 (or the dtype under test) and the fused kernels (float32 or lower; Triton takes
# no float64) on the device where they run.
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def backend_setup(backend):
    """(device, the widest dtype the backend takes) for the mirrored tests."""
    return (TRITON_DEVICE, torch.float32) if backend == "triton" else ("cpu", F64)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one intra-op thread is faster, and avoids OpenMP threads
    spinning against each other when the two cores are shared (seen: 1000x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_queue(K, C, layout, dtype=F64):
    """(leaf, view): the (K, C) queue as `layout` over a leaf buffer that gets the grads."""
    if layout == "contiguous":
        leaf = torch.randn(K, C, dtype=dtype)
        return leaf, lambda b: b
    if layout == "transposed":  # the official (C, K) buffer, passed as buf.T
        leaf = torch.randn(C, K, dtype=dtype)
        return leaf, lambda b: b.T
    leaf = torch.randn(2 * K, C + 3, dtype=dtype)  # "strided": every other row, inner columns
    return leaf, lambda b: b[1::2, 2 : C + 2]


def loss_and_grads(fn, q, k, leaf, view, grad_out=None):
    """fn(q, k, queue) and the gradients for q, k and the queue's leaf (when given)."""
    inputs = [t.detach().clone().requires_grad_() for t in (q, k)]
    queue = None
    if leaf is not None:
        inputs.append(leaf.detach().clone().requires_grad_())
        queue = view(inputs[2])
    loss = fn(inputs[0], inputs[1], queue)
    grads = torch.autograd.grad(loss, inputs, grad_out)
    return loss.detach(), grads


def check_against_reference(q, k, leaf, view, *, atol, reduction="mean", grad_out=None, **kw):
    T = kw.pop("temperature", 0.2)
    normalize = kw.pop("normalize", True)

    def ours(q, k, queue):
        return info_nce(q, k, queue, T, normalize=normalize, reduction=reduction, **kw)

    def ref(q, k, queue):
        return info_nce_reference(q, k, queue, T, normalize=normalize, reduction=reduction)

    loss, grads = loss_and_grads(ours, q, k, leaf, view, grad_out)
    ref_loss, ref_grads = loss_and_grads(ref, q, k, leaf, view, grad_out)
    assert loss.dtype == ref_loss.dtype
    assert_close(loss, ref_loss, atol, atol, name="loss")
    assert len(grads) == len(ref_grads) == (2 if leaf is None else 3)
    for name, g, rg in zip(("dq", "dk", "dqueue"), grads, ref_grads, strict=False):
        assert_close(g, rg, atol, atol, name=name)


def check_rel(backend, q, k, leaf, view, bound, dtype=None, grad_out=None, **kw):
    """Loss and every gradient of info_nce(backend=...) on inputs cast to `dtype` (the
    backend's widest by default), against the fp64 reference on the same rounded inputs,
    by relative norm error."""
    device, widest = backend_setup(backend)
    dtype = dtype or widest
    low = [None if t is None else t.to(device, dtype) for t in (q, k, leaf)]
    T, normalize = kw.pop("temperature", 0.2), kw.pop("normalize", True)
    reduction = kw.pop("reduction", "mean")
    args = dict(normalize=normalize, reduction=reduction)
    g = None if grad_out is None else grad_out.to(device)

    def ours(a, b, c):
        return info_nce(a, b, c, T, backend=backend, **args, **kw)

    def ref(a, b, c):
        return info_nce_reference(a, b, c, T, **args)

    loss, grads = loss_and_grads(ours, *low[:2], low[2], view, None if g is None else g.float())
    wide = [None if t is None else t.double() for t in low]
    ref_loss, ref_grads = loss_and_grads(ref, *wide[:2], wide[2], view, g)
    assert loss.dtype == (F64 if dtype == F64 else torch.float32)
    assert_rel_close(loss, ref_loss, bound, name=f"{backend} loss")
    assert len(grads) == len(ref_grads) == (2 if leaf is None else 3)
    for name, got, want in zip(("dq", "dk", "dqueue"), grads, ref_grads, strict=False):
        assert got.dtype == dtype, name
        assert_rel_close(got, want, bound, name=f"{backend} {name}")


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("C", [3, 16, 129])
@pytest.mark.parametrize("K", [1, 5, 130, 1000])
@pytest.mark.parametrize("N", [1, 7, 33])
def test_queue_fp64_matches_reference(N, K, C, layout):
    torch.manual_seed(0)
    q, k = torch.randn(N, C, dtype=F64), torch.randn(N, C, dtype=F64)
    if layout == "strided":  # non-contiguous queries and keys too
        q, k = torch.randn(N, 2 * C, dtype=F64)[:, ::2], torch.randn(2 * N, C, dtype=F64)[::2]
    leaf, view = make_queue(K, C, layout)
    check_against_reference(q, k, leaf, view, atol=1e-10, chunk_size=64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [4, 4096])
@pytest.mark.parametrize("C", [3, 16, 129])
@pytest.mark.parametrize("N", [1, 7, 33])
def test_in_batch_fp64_matches_reference(N, C, chunk_size, reduction):
    torch.manual_seed(1)
    q, k = torch.randn(N, C, dtype=F64), torch.randn(N, C, dtype=F64)
    grad_out = torch.randn(N, dtype=F64) if reduction == "none" else None
    check_against_reference(
        q, k, None, None, atol=1e-10, reduction=reduction, grad_out=grad_out, chunk_size=chunk_size
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 4096])
def test_queue_reductions_and_chunks(reduction, chunk_size):
    torch.manual_seed(2)
    N, K, C = 33, 130, 16
    q, k = torch.randn(N, C, dtype=F64), torch.randn(N, C, dtype=F64)
    leaf, view = make_queue(K, C, "transposed")
    grad_out = torch.randn(N, dtype=F64) if reduction == "none" else None
    check_against_reference(
        q, k, leaf, view, atol=1e-10, reduction=reduction, grad_out=grad_out, chunk_size=chunk_size
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_batch", [False, True])
def test_unnormalized_large_logits(in_batch, backend):
    """normalize=False with large logits (hundreds in fp32, thousands in fp64): only a
    running max keeps exp finite."""
    torch.manual_seed(3)
    N, K, C = 19, 130, 16
    scale, T, bound = (8, 0.05, 1e-9) if backend == "torch" else (3, 0.5, 1e-4)
    q, k = scale * torch.randn(N, C, dtype=F64), scale * torch.randn(N, C, dtype=F64)
    leaf, view = (None, None) if in_batch else make_queue(K, C, "transposed")
    if leaf is not None:
        leaf = scale * leaf
    check_rel(backend, q, k, leaf, view, bound, normalize=False, temperature=T)


def test_tiny_temperature_and_long_queue_rows_stay_finite():
    """T = 0.005 (exp(-2/T) underflows fp32) and queue rows of norm 30 (logits far above
    1/T): a fixed shift of 1/T would give inf or nan here; the op must not."""
    torch.manual_seed(4)
    N, K, C = 33, 1000, 16
    q, k = torch.randn(N, C), torch.randn(N, C)
    queue = 30 * F.normalize(torch.randn(K, C), dim=1)
    for T, Q in ((0.005, F.normalize(queue, dim=1)), (0.07, queue)):
        loss = info_nce(q, k, Q, T, chunk_size=128)
        ref = info_nce_reference(q.double(), k.double(), Q.double(), T)
        assert torch.isfinite(loss)
        assert_close(loss, ref, atol=1e-4, rtol=1e-5, name=f"loss T={T}")


def plain_pytorch(q, k, queue, temperature, reduction="mean"):
    """The official formula run entirely in the inputs' dtype: what an unfused user gets."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    if queue is None:
        logits, labels = q @ k.T / temperature, torch.arange(q.shape[0])
    else:
        l_pos = (q * k).sum(dim=1, keepdim=True)
        logits = torch.cat([l_pos, q @ queue.T], dim=1) / temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long)
    return F.cross_entropy(logits, labels, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_batch", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_within_plain_pytorch_error(dtype, in_batch, backend):
    """In each dtype the op errs (relative norm error against fp64 on the same rounded
    inputs) at most 2x what plain PyTorch errs running the formula in that dtype."""
    torch.manual_seed(5)
    N, K, C, T = 33, 200, 64, 0.2
    device, _ = backend_setup(backend)
    q, k = torch.randn(N, C).to(device, dtype), torch.randn(N, C).to(device, dtype)
    leaf, view = (None, None) if in_batch else make_queue(K, C, "transposed", dtype)
    leaf = None if leaf is None else leaf.to(device)

    def ours(a, b, c):
        return info_nce(a, b, c, T, backend=backend)

    def ref(a, b, c):  # fp64 on the very same (rounded) inputs
        return info_nce_reference(a, b, c, T)

    loss, grads = loss_and_grads(ours, q, k, leaf, view)
    wide = [None if t is None else t.cpu().double() for t in (q, k, leaf)]
    ref_loss, ref_grads = loss_and_grads(ref, *wide[:2], wide[2], view)
    cpu = [None if t is None else t.cpu() for t in (q, k, leaf)]
    plain_loss, plain_grads = loss_and_grads(
        lambda a, b, c: plain_pytorch(a, b, c, T), *cpu[:2], cpu[2], view
    )
    assert loss.dtype == torch.float32
    outputs = zip(
        ("loss", "dq", "dk", "dqueue")[: 1 + len(grads)],
        (loss, *grads),
        (ref_loss, *ref_grads),
        (plain_loss, *plain_grads),
        strict=True,
    )
    floor = 4 * torch.finfo(dtype).eps  # where plain PyTorch happens to be exact
    for name, mine, want, theirs in outputs:
        assert mine.dtype == (torch.float32 if name == "loss" else dtype), name
        plain_err = rel_error(theirs, want)
        bound = max(2 * plain_err, floor)
        label = f"{backend} {name} ({dtype}, plain {plain_err:.3g})"
        assert_rel_close(mine, want, bound, name=label)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_accumulate_in_fp32_and_return_input_dtypes(backend):
    """q bf16 from an autocast head, k fp32, a fp16 queue: fp32 accumulation, gradients in
    each input's dtype."""
    torch.manual_seed(6)
    N, K, C = 9, 130, 16
    device, _ = backend_setup(backend)
    q = torch.randn(N, C, device=device).bfloat16().requires_grad_()
    k = torch.randn(N, C, device=device).requires_grad_()
    buf = torch.randn(C, K, device=device).half().requires_grad_()
    loss = info_nce(q, k, buf.T, chunk_size=32, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32
    assert (q.grad.dtype, k.grad.dtype, buf.grad.dtype) == (q.dtype, k.dtype, buf.dtype)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, buf)]
    ref = info_nce_reference(leaves[0], leaves[1], leaves[2].T)
    ref.backward()
    assert_rel_close(loss.detach(), ref.detach(), 1e-6, name="loss")
    for name, t, r in zip(("dq", "dk", "dqueue"), (q, k, buf), leaves, strict=True):
        assert_rel_close(t.grad, r.grad, 1e-2, name=name)  # rounded to bf16 / fp16
    if backend == "torch":
        f64 = info_nce(q.detach(), k.detach().double(), buf.detach().T, chunk_size=32)
        assert f64.dtype == F64  # any fp64 input makes the accumulation fp64


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_only_where_required(backend):
    torch.manual_seed(7)
    device, dtype = backend_setup(backend)
    q = torch.randn(7, 16, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(7, 16, device=device, dtype=dtype)
    queue = torch.randn(130, 16, device=device, dtype=dtype)
    info_nce(q, k, queue, chunk_size=32, backend=backend).backward()
    assert q.grad is not None and k.grad is None and queue.grad is None
    want = torch.autograd.grad(info_nce_reference(q.double(), k.double(), queue.double()), q)
    assert_rel_close(q.grad, want[0], 1e-10 if dtype == F64 else 1e-5, name="dq")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_batch", [False, True])
def test_empty_queue_is_the_positive_alone(in_batch, backend):
    """K = 0 is valid input: each row's loss is that of its positive alone, log(e^s/e^s)
    = 0, its rank 0, and the gradients are zero; never a ZeroDivisionError. (In-batch
    mode has no queue: there K = 0 means a batch of one, the positive alone too.)"""
    device, dtype = backend_setup(backend)
    N = 1 if in_batch else 5
    q = torch.randn(N, 16, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(N, 16, device=device, dtype=dtype, requires_grad=True)
    buf = torch.randn(16, 0, device=device, dtype=dtype, requires_grad=True)
    queue = None if in_batch else buf.T
    loss, rank = info_nce(q, k, queue, return_stats=True, backend=backend)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and rank.tolist() == [0] * N
    wide = [None if t is None else t.detach().double() for t in (q, k, queue)]
    assert info_nce_reference(*wide).item() == 0.0
    assert q.grad.abs().max() < 1e-6 and k.grad.abs().max() < 1e-6
    if not in_batch:
        assert buf.grad is not None and buf.grad.shape == (16, 0)


@pytest.mark.parametrize(
    "backend,chunk_size",
    [("torch", 3), ("torch", 64), ("torch", 4096), pytest.param("triton", 0, marks=needs_triton)],
)
@pytest.mark.parametrize("N,K", [(1, 1), (7, 5), (33, 130), (33, 1000), (33, None), (7, None)])
def test_rank_matches_materialized_logits(N, K, chunk_size, backend):
    torch.manual_seed(8)
    C = 16
    device, dtype = backend_setup(backend)
    q, k = torch.randn(N, C, dtype=F64), torch.randn(N, C, dtype=F64)
    queue = None if K is None else torch.randn(C, K, dtype=F64).T
    q, k = q.to(device, dtype).requires_grad_(), k.to(device, dtype)
    queue = None if queue is None else queue.to(device, dtype)
    chunks = dict(chunk_size=chunk_size) if backend == "torch" else {}
    loss, rank = info_nce(q, k, queue, 0.2, return_stats=True, backend=backend, **chunks)
    assert rank.dtype == torch.int64 and rank.shape == (N,) and not rank.requires_grad
    wide = [None if t is None else t.detach().cpu().double() for t in (q, k, queue)]
    if dtype == F64:  # (in fp32 the loss at N = K = 1 is a difference of terms ~5: ~1e-7)
        assert_rel_close(loss, info_nce_reference(*wide, 0.2), 1e-10)

    logits, labels = info_nce_logits_reference(*wide, 0.2)
    positive = logits.gather(1, labels[:, None])
    want = (logits > positive).sum(dim=1)  # the positive is never above itself
    # fp64: exact. fp32: a negative within rounding of the positive may fall either side.
    near = ((logits - positive).abs() < (1e-5 if dtype != F64 else 0)).sum(dim=1)
    assert ((rank.cpu() - want).abs() <= near).all(), (rank, want)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    if dtype == F64:
        assert torch.equal(rank == 0, logits.argmax(dim=1) == labels)
        assert torch.equal(rank < 5, (top == labels[:, None]).any(dim=1))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("in_batch", [False, True])
def test_gradcheck(in_batch, normalize, reduction):
    torch.manual_seed(9)
    N, K, C = 4, 7, 5
    q = torch.randn(N, C, dtype=F64, requires_grad=True)
    k = torch.randn(N, C, dtype=F64, requires_grad=True)
    buf = torch.randn(C, K, dtype=F64, requires_grad=True)

    def fn(q, k, buf):
        queue = None if in_batch else buf.T
        return info_nce(q, k, queue, 0.5, normalize=normalize, reduction=reduction, chunk_size=3)

    assert torch.autograd.gradcheck(fn, (q, k, buf))


def test_no_n_by_k_tensor_in_forward_backward_or_saved():
    torch.manual_seed(10)
    N, K, C, chunk = 64, 8192, 8, 256
    q = torch.randn(N, C, requires_grad=True)
    k = torch.randn(N, C)
    buf = torch.randn(C, K, requires_grad=True)  # the official layout, used as buf.T
    n_by_k = N * K * 4
    fwd_bound = 4 * max(N * chunk, chunk * C, N * C)  # bytes of the largest chunk temporary
    # Saved for backward: the inputs themselves and nothing bigger than (N,) beyond them.
    saved = []

    def pack(t):
        saved.append(t)
        return t

    for fn, fits in ((info_nce, True), (info_nce_reference, False)):
        saved.clear()
        with Allocations() as fwd, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(q, k, buf.T, 0.2, chunk_size=chunk) if fits else fn(q, k, buf.T, 0.2)
        with Allocations() as bwd:
            loss.backward()
        inputs = {q.untyped_storage().data_ptr(), buf.untyped_storage().data_ptr()}
        inputs.add(k.untyped_storage().data_ptr())
        extra_saved = [t.numel() for t in saved if t.untyped_storage().data_ptr() not in inputs]
        if fits:
            assert fwd.largest <= fwd_bound, (fwd.largest, fwd_bound)
            assert fwd.peak <= 4 * fwd_bound, (fwd.peak, fwd_bound)
            assert max(extra_saved) <= N, extra_saved
            assert bwd.largest <= max(fwd_bound, 4 * K * C), bwd.largest  # dqueue is K x C
            assert fwd.syncs == bwd.syncs == 0  # graph-capturable: no host reads
        else:  # the detector does see the reference's N x (1+K) logits
            assert fwd.largest >= n_by_k and max(extra_saved) >= N * K
        q.grad = buf.grad = None


def test_autocast_does_not_lower_the_accumulation():
    torch.manual_seed(11)
    q, k, queue = torch.randn(33, 16), torch.randn(33, 16), torch.randn(130, 16)
    want = info_nce(q, k, queue, chunk_size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = info_nce(q, k, queue, chunk_size=32)
    assert got.dtype == torch.float32
    assert_close(got, want, 1e-6, name="loss under autocast")


def test_backend_torch_is_the_default_path_on_cpu():
    torch.manual_seed(12)
    q, k, queue = torch.randn(7, 16), torch.randn(7, 16), torch.randn(130, 16)
    assert torch.equal(info_nce(q, k, queue), info_nce(q, k, queue, backend="torch"))


def _inputs(**override):
    args = dict(q=torch.randn(4, 8), k=torch.randn(4, 8), queue=torch.randn(10, 8))
    args.update(override)
    return args


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (_inputs(q=[[1.0]]), {}, "q must be a torch.Tensor"),
        (_inputs(q=torch.randn(8)), {}, r"q must be 2-D \(N, C\)"),
        (_inputs(k=torch.randn(4, 8, 1)), {}, r"k must be 2-D \(N, C\)"),
        (_inputs(k=torch.randn(5, 8)), {}, r"k must have q's shape \(N, C\) = \(4, 8\)"),
        (_inputs(queue=torch.randn(80)), {}, r"queue must be 2-D \(K, C\).*buf\.T"),
        (_inputs(queue=torch.randn(8, 10)), {}, r"queue must be \(K, C\) with C = 8.*buf\.T"),
        (_inputs(q=torch.ones(4, 8, dtype=torch.long)), {}, "q has dtype torch.int64.*cast"),
        (_inputs(k=torch.ones(4, 8, dtype=torch.bool)), {}, "k has dtype torch.bool"),
        (
            _inputs(queue=torch.zeros(10, 8, dtype=torch.float8_e4m3fn)),
            {},
            "queue has dtype torch.float8_e4m3fn; info_nce takes float16, bfloat16",
        ),
        (_inputs(k=torch.randn(4, 8, device="meta")), {}, "k is on meta but q is on cpu"),
        (_inputs(queue=torch.randn(10, 8, device="meta")), {}, "queue is on meta.*one device"),
        (_inputs(q=torch.randn(0, 8), k=torch.randn(0, 8)), {}, r"q is empty \(shape \(0, 8\)\)"),
        (_inputs(), dict(temperature=0.0), "temperature must be a positive finite"),
        (_inputs(), dict(temperature=-0.2), "temperature must be a positive finite"),
        (_inputs(), dict(temperature=math.inf), "temperature must be a positive finite"),
        (_inputs(), dict(temperature=math.nan), "temperature must be a positive finite"),
        (_inputs(), dict(temperature="0.2"), "temperature must be a positive finite"),
        (_inputs(), dict(temperature=True), "temperature must be a positive finite"),
        (_inputs(), dict(temperature=torch.tensor(0.2)), "temperature must be a positive"),
        (_inputs(), dict(reduction="avg"), r"reduction must be one of \('mean', 'sum', 'none'\)"),
        (_inputs(), dict(backend="cuda"), r"backend must be None .* \(.torch., .triton.\)"),
        (_inputs(), dict(chunk_size=0), "chunk_size must be a positive int"),
        (_inputs(), dict(chunk_size=2.5), "chunk_size must be a positive int"),
    ],
)
def test_validation_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        info_nce(args["q"], args["k"], args["queue"], **kwargs)


@pytest.mark.parametrize("dtype, T", [(torch.float32, 1e-45), (torch.bfloat16, 1e-39)])
def test_a_temperature_whose_inverse_overflows_is_refused(dtype, T):
    """T = 1e-45 is positive and finite, but q.k / T overflows float32 (the loss was NaN):
    refused by name, for both forms; a small but sane T still runs."""
    q = F.normalize(torch.randn(4, 8), dim=1).to(dtype)
    queue = F.normalize(torch.randn(16, 8), dim=1).to(dtype)
    for k, keys in ((q, queue), (q, None)):
        with pytest.raises(ValueError, match="too small: 1/T"):
            info_nce(q, k, keys, T)
    assert torch.isfinite(info_nce(q.float(), q.float(), queue.float(), 1e-3))
