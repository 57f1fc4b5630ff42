"""The key encoder's momentum (EMA) update, every tensor in a handful of launches.

    theta_k <- m * theta_k + (1 - m) * theta_q      (MoCo, Eq. 2)

computed as lerp(theta_k, theta_q, 1 - m) = theta_k + (1 - m) (theta_q - theta_k): the same
value up to rounding (a few ulps), 12 bytes of traffic per fp32 parameter against 20 for a
mul then an add. The official code loops over parameters in Python, one or two kernel
launches per tensor; here torch._foreach_lerp_ takes all tensors of one (device, dtype)
group at once (CUDA fuses them into chunked multi-tensor launches).

momentum may be a Python float or a 0-d floating tensor on the target's device, so that a
momentum schedule can live on the GPU inside a captured CUDA graph: it is never read back
to the host (its range is therefore not checked). Everything is validated before the first
write, so a mismatch raises without touching any tensor.

Modules: parameters() always; floating buffers (BatchNorm running stats) per `buffers`:
"skip" (the official MoCo behaviour), "copy" (take the source's), "ema" (average like the
parameters). Integer buffers (num_batches_tracked) are copied unless buffers="skip".
"""

from collections.abc import Sequence

import torch
from torch import nn

from fastmoco.ops._backend import select_backend

_BACKENDS = ("torch",)
_BUFFER_MODES = ("skip", "copy", "ema")


def momentum_update_(
    target: nn.Module | Sequence[torch.Tensor],
    source: nn.Module | Sequence[torch.Tensor],
    momentum: float | torch.Tensor,
    *,
    buffers: str = "skip",
    backend: str | None = None,
) -> None:
    """target <- momentum * target + (1 - momentum) * source, in place, for every tensor.

    target, source: two modules with the same structure, or two sequences of tensors.
    buffers: "skip" | "copy" | "ema" for modules' floating buffers (see the module doc).
    backend: None picks per device; "torch" forces the torch._foreach path.
    """
    if buffers not in _BUFFER_MODES:
        raise ValueError(f"buffers must be one of {_BUFFER_MODES}, got {buffers!r}")
    select_backend(backend, _BACKENDS)
    ema_pairs, copy_pairs = _pairs(target, source, buffers)
    weight = _lerp_weight(momentum, {t.device for t, _ in ema_pairs})
    with torch.no_grad():
        _lerp_grouped(ema_pairs, weight)
        for t, s in copy_pairs:
            t.copy_(s)


def _pairs(target, source, buffers: str):
    """Validated (ema_pairs, copy_pairs) of (target, source) tensors; raises on mismatch."""
    if isinstance(target, nn.Module) != isinstance(source, nn.Module):
        raise ValueError(
            "target and source must both be nn.Modules or both be sequences of tensors, got "
            f"{type(target).__name__} and {type(source).__name__}"
        )
    copy = []
    if isinstance(target, nn.Module):
        ema = _matched(target.named_parameters(), source.named_parameters(), "parameter")
        if buffers != "skip":
            for name, t, s in _matched(target.named_buffers(), source.named_buffers(), "buffer"):
                (ema if t.is_floating_point() and buffers == "ema" else copy).append((name, t, s))
    else:
        if buffers != "skip":
            raise ValueError(
                f"buffers={buffers!r} only applies to nn.Modules; for tensor sequences include "
                "the buffers in the sequences and leave buffers='skip'"
            )
        ema = _matched(_indexed(target, "target"), _indexed(source, "source"), "tensor")
    for name, t, _ in ema:
        if not t.is_floating_point():
            raise ValueError(
                f"{name}: momentum update needs floating tensors, got {t.dtype}; "
                "pass only floating tensors (copy integer ones yourself)"
            )
    return [(t, s) for _, t, s in ema], [(t, s) for _, t, s in copy]


def _indexed(tensors, what: str):
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise ValueError(
            f"{what} must be an nn.Module or a sequence (list/tuple) of tensors, got "
            f"{type(tensors).__name__}; wrap a single tensor as [tensor]"
        )
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}[{i}] is a {type(t).__name__}, not a torch.Tensor")
    return [(f"[{i}]", t) for i, t in enumerate(tensors)]


def _matched(target_named, source_named, kind: str):
    """Zip named tensors, checking count, names, shapes, dtypes and devices pairwise."""
    targets, sources = list(target_named), list(source_named)
    for (t_name, t), (s_name, s) in zip(targets, sources, strict=False):
        if t_name != s_name:
            raise ValueError(
                f"{kind} names differ: target {t_name!r} vs source {s_name!r}; "
                "the two models must be built from the same architecture"
            )
        for attr in ("shape", "dtype", "device"):
            if getattr(t, attr) != getattr(s, attr):
                raise ValueError(
                    f"{kind} {t_name}: target {attr} {getattr(t, attr)} differs from the source's "
                    f"{getattr(s, attr)}; make both sides match"
                )
    if len(targets) != len(sources):
        raise ValueError(
            f"target has {len(targets)} {kind}s but source has {len(sources)}; "
            "pass two models (or lists) with the same structure"
        )
    return [(name, t, s) for (name, t), (_, s) in zip(targets, sources, strict=True)]


def _lerp_weight(momentum, devices: set):
    """1 - m as a Python float, or as a 0-d tensor computed on the device (no host sync)."""
    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0 or not momentum.is_floating_point():
            raise ValueError(
                f"momentum tensor must be a 0-d floating tensor, got shape "
                f"{tuple(momentum.shape)} and dtype {momentum.dtype}"
            )
        if devices - {momentum.device}:
            raise ValueError(
                f"momentum is on {momentum.device} but the targets are on "
                f"{sorted(map(str, devices))}: keep the momentum tensor on the model's device "
                "(or pass a float when the model spans several devices)"
            )
        return 1.0 - momentum
    bad_type = isinstance(momentum, bool) or not isinstance(momentum, (int, float))
    if bad_type or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a float in [0, 1] (e.g. 0.999), got {momentum!r}")
    return 1.0 - float(momentum)


def _lerp_grouped(pairs, weight) -> None:
    """torch._foreach_lerp_ per (device, dtype) group, the fused lists PyTorch wants.

    A tensor weight goes through the List overload (one 0-d weight per tensor, broadcast),
    present since torch 2.0: the Scalar overload would call .item() on it, a host sync.
    """
    groups: dict[tuple, tuple[list, list]] = {}
    for t, s in pairs:
        targets, sources = groups.setdefault((t.device, t.dtype), ([], []))
        targets.append(t)
        sources.append(s)
    for (_, dtype), (targets, sources) in groups.items():
        if isinstance(weight, torch.Tensor):
            w = weight.to(dtype)  # lerp wants the weight in the tensors' dtype
            torch._foreach_lerp_(targets, sources, [w] * len(targets))
        else:
            torch._foreach_lerp_(targets, sources, weight)
