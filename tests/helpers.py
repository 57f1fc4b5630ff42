"""Helpers shared by the tests: one mismatch printer, the relative-error check, and the
allocation tracker (built on fastmoco.experiments.measure, which the benchmarks use too).

Comparisons against a float64 reference use the relative norm error
||out - ref|| / ||ref||: an all-zero or uniformly scaled result fails it, where an
absolute tolerance sized for the largest element can let a tiny gradient through.
"""

import pytest
import torch

from fastmoco.experiments.measure import LiveStorageBytes


def mismatch_report(actual, expected, bad, name, show=5) -> str:
    """The first `show` elements where `bad` is set, with got / want / difference."""
    a, e = actual.double(), expected.double()
    lines = [
        f"  {tuple(i.tolist())}: got {a[tuple(i)].item():.10g}, want {e[tuple(i)].item():.10g}, "
        f"diff {(a - e)[tuple(i)].abs().item():.3g}"
        for i in bad.nonzero()[:show]
    ]
    return f"{name}: {int(bad.sum())}/{bad.numel()} elements off; first:\n" + "\n".join(lines)


def assert_close(actual, expected, atol=0.0, rtol=0.0, name="tensor", show=5):
    """Element-wise |actual - expected| <= atol + rtol |expected| (atol = rtol = 0: equal),
    NaN never passes; a failure lists the first mismatching elements."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a, e = actual.double().cpu(), expected.double().cpu()
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())
    if bad.any():
        pytest.fail(
            f"(atol={atol:.3g}, rtol={rtol:.3g}, max diff {err.max().item():.3g}) "
            + mismatch_report(a, e, bad, name, show)
        )


def rel_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (||out|| when ref is all zero); inf for NaN."""
    out, ref = torch.as_tensor(out).double().cpu(), torch.as_tensor(ref).double().cpu()
    diff = torch.linalg.vector_norm(out - ref).item()
    scale = torch.linalg.vector_norm(ref).item()
    err = diff / scale if scale > 0 else diff
    return err if err == err else float("inf")


def rel_mismatch(out, ref, bound, name="tensor", show=5) -> str | None:
    """None if out matches ref within a relative norm error `bound`, else a report naming
    the error and the elements that are furthest off. The GPU tests and their CPU
    counterparts (which also show that it rejects wrong results) share this check."""
    out, ref = torch.as_tensor(out), torch.as_tensor(ref)
    if out.shape != ref.shape:
        return f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_error(out, ref)
    if err <= bound:
        return None
    a, e = out.double().cpu(), ref.double().cpu()
    diff = (a - e).abs().nan_to_num(float("inf"))
    worst = diff.flatten().topk(min(show, diff.numel())).indices
    bad = torch.zeros(diff.numel(), dtype=torch.bool)
    bad[worst] = True
    return f"relative error {err:.3g} > {bound:.3g}; " + mismatch_report(
        a, e, bad.view(diff.shape), name, show
    )


def assert_rel_close(out, ref, bound, name="tensor"):
    report = rel_mismatch(out, ref, bound, name)
    if report is not None:
        pytest.fail(report)


class Allocations(LiveStorageBytes):
    """LiveStorageBytes (peak live bytes of new storages) plus the largest allocation of
    any one op and the host syncs (.item(), int(t))."""

    def __init__(self):
        super().__init__()
        self.largest = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        before = self.live
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.largest = max(self.largest, self.live - before)
        return out
