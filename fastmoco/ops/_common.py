"""What the ops share: the backend choice (select_backend, for every op), the rule of the
ops with fused kernels (FusedKernels: fused or PyTorch, and what a kernel failure does),
input checks, the accumulation dtype, autocast handling, unit-row normalisation and its
backward, reduce_rows.

Imports go one way: info_nce.py, nt_xent.py, _info_nce_fused.py, reference.py and the other
ops import this module; it imports none of them.
"""

import contextlib
import functools
import math
import warnings

import torch

NORM_EPS = 1e-12  # F.normalize's default
REDUCTIONS = ("mean", "sum", "none")
PAIR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------ backend choice


@functools.cache
def triton_usable() -> bool:
    """Triton imports (it compiles for this machine's GPU, or runs the interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(
    backend: str | None, allowed: tuple[str, ...], device: torch.device | None = None
) -> str:
    """backend=None picks per device: the first GPU backend of `allowed` ("triton", then
    "cuda") for CUDA tensors, "torch" otherwise. A name must be in `allowed`."""
    if backend is None:
        if device is not None and torch.device(device).type == "cuda":
            if "triton" in allowed and triton_usable():
                return "triton"
            if "cuda" in allowed:
                return "cuda"
        return "torch"
    if backend not in allowed:
        raise ValueError(
            f"backend must be None (pick per device) or one of {allowed}, got {backend!r}"
        )
    return backend


# ------------------------------------------------------------------------ fused or PyTorch


def _triton_error_types() -> tuple[type, ...]:
    """Triton's own compile and resource errors (TritonError covers CompilationError,
    OutOfResources and PTXASError; older Triton lacks the common base class)."""
    try:
        from triton.errors import TritonError

        return (TritonError,)
    except ImportError:
        pass
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources

        return (CompilationError, OutOfResources)
    except ImportError:
        return ()


def is_kernel_failure(err: BaseException) -> bool:
    """A Triton compile error, a resource error, or a failed launch: the kernels cannot
    run on this machine. An out-of-memory error, bad input (ValueError, TypeError) or any
    other bug is not one of them."""
    if isinstance(err, torch.OutOfMemoryError):
        return False
    if isinstance(err, _triton_error_types()):
        return True
    # The CUDA launcher reports driver failures as RuntimeError("Triton Error [CUDA]: ...").
    return isinstance(err, RuntimeError) and str(err).startswith("Triton Error")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class FusedKernels:
    """The one rule for an op that has fused Triton kernels and a PyTorch path.

    Which runs (`chooses`): backend="triton" always the kernels (errors raise),
    backend="torch" the PyTorch path, backend=None the kernels for CUDA tensors they take
    (dtypes, feature width) unless they already failed here for that kind of input.
    What a kernel failure does (`run`): with backend=None it warns once, with its cause,
    and the PyTorch path serves that kind of input (device, dtypes, width) from then on;
    every other exception propagates. Never while a CUDA stream is capturing a graph: the
    failure is raised there, since falling back would record the slow path into the graph
    with only a warning to show for it. Every fallback is kept in `failed` (and listed by
    kernel_failures()), so a benchmark can refuse to report a row that took it.
    """

    instances: list["FusedKernels"] = []

    def __init__(self, op: str, dtypes: tuple[torch.dtype, ...], max_width: int):
        self.op, self.dtypes, self.max_width = op, dtypes, max_width
        self.failed: dict[tuple, str] = {}
        FusedKernels.instances.append(self)

    @staticmethod
    def kind(*tensors) -> tuple:
        """What a failure is remembered for: device, dtypes and feature width."""
        named = [t for t in tensors if t is not None]
        return (str(named[0].device), *(str(t.dtype) for t in named), named[0].shape[1])

    def takes(self, *tensors) -> bool:
        named = [t for t in tensors if t is not None]
        return all(t.dtype in self.dtypes for t in named) and named[0].shape[1] <= self.max_width

    def chooses(self, backend: str | None, *tensors) -> bool:
        if select_backend(backend, ("torch", "triton"), tensors[0].device) != "triton":
            return False
        if backend is not None:
            return True
        return self.takes(*tensors) and self.kind(*tensors) not in self.failed

    def run(self, backend: str | None, tensors: tuple, fused, torch_path):
        """fused() when chosen, else (or after a kernel failure, by the rule) torch_path()."""
        if self.chooses(backend, *tensors):
            try:
                return fused()
            except Exception as err:  # noqa: BLE001 - _fall_back re-raises all but kernel failures
                self._fall_back(backend, self.kind(*tensors), err)
        return torch_path()

    def _fall_back(self, backend: str | None, kind: tuple, err: BaseException) -> None:
        if backend is not None or not is_kernel_failure(err) or _capturing():
            raise err
        cause = f"{type(err).__name__}: {err}"
        self.failed[kind] = cause
        warnings.warn(
            f"fastmoco: the Triton {self.op} kernels cannot run here for {kind} ({cause}); "
            "the PyTorch path serves these inputs from now on. Call with backend='triton' "
            "to see the full error.",
            RuntimeWarning,
            stacklevel=4,
        )


def kernel_failures() -> dict[str, dict[tuple, str]]:
    """{op: {kind of input: cause}} of every kernel failure this process fell back from."""
    return {k.op: dict(k.failed) for k in FusedKernels.instances if k.failed}


# ------------------------------------------------------------------------ checks, dtypes


def check_pair_inputs(
    q, k, queue, temperature, reduction, *, names=("q", "k", "queue"), op="info_nce"
) -> None:
    """Raise a ValueError naming the problem and the fix for q, k (N, C) and queue (K, C)."""
    qn, kn, queuen = names
    named = [(qn, q), (kn, k)] + ([] if queue is None else [(queuen, queue)])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            layout = "(K, C), one key per row (for the official (C, K) buffer pass buf.T)"
            want = layout if t is queue else "(N, C)"
            raise ValueError(
                f"{name} must be 2-D {want}, got shape {tuple(t.shape)}; reshape it to {want}"
            )
        if t.dtype not in PAIR_DTYPES:
            raise ValueError(
                f"{name} has dtype {t.dtype}; {op} takes float16, bfloat16, float32 or "
                f"float64: cast it, e.g. {name}.float()"
            )
        if t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but {qn} is on {q.device}: move all inputs to one device"
            )
    N, C = q.shape
    if k.shape != q.shape:
        raise ValueError(
            f"{kn} must have {qn}'s shape (N, C) = {tuple(q.shape)}, got {tuple(k.shape)}: "
            "pass one key per query"
        )
    if N == 0 or C == 0:
        raise ValueError(f"{qn} is empty (shape {tuple(q.shape)}): pass at least one row of C >= 1")
    if queue is not None and queue.shape[1] != C:
        raise ValueError(
            f"{queuen} must be (K, C) with C = {C} like {qn}, got shape "
            f"{tuple(queue.shape)}; for the official (C, K) buffer pass buf.T"
        )
    bad_type = isinstance(temperature, bool) or not isinstance(temperature, (int, float))
    if bad_type or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature must be a positive finite Python float (e.g. 0.2), got {temperature!r}"
        )
    top = _largest(accumulation_dtype(q, k, queue))
    if 1.0 / temperature > top:  # the logits q.k / T overflow what they accumulate in
        raise ValueError(
            f"temperature {temperature!r} is too small: 1/T = {1.0 / temperature:.3g} overflows "
            f"the logits' dtype (largest {top:.3g}); use a T of a sensible size, e.g. 0.07-1"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


@functools.cache
def _largest(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: what the ops (and the reference) accumulate in."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def autocast_off(device_type: str):
    """Inside an op every matmul runs in the accumulation dtype, whatever the caller's
    autocast says (autocast would otherwise run them in bf16/fp16)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def unit_rows(x: torch.Tensor, dtype: torch.dtype, normalize: bool):
    """(x / max(||x||, eps), ||x||) per row in `dtype`; (x, None) when not normalizing."""
    x = x.to(dtype)
    if not normalize:
        return x, None
    norm = x.norm(dim=1, keepdim=True)
    return x / norm.clamp_min(NORM_EPS), norm


def unit_rows_backward(d_unit: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor | None):
    """Gradient through x -> x / max(||x||, eps): project out the radial part, divide by
    the norm; rows whose norm was clamped to eps are a plain division by eps."""
    if norm is None:
        return d_unit
    radial = (unit * d_unit).sum(dim=1, keepdim=True)
    radial = torch.where(norm > NORM_EPS, radial, torch.zeros_like(radial))
    return (d_unit - unit * radial) / norm.clamp_min(NORM_EPS)


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """The per-row losses reduced as asked: "mean", "sum" or "none"."""
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows
