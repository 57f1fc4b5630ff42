"""The key encoder's momentum (EMA) update, every tensor in a handful of launches.

    theta_k <- m * theta_k + (1 - m) * theta_q      (MoCo, Eq. 2)

computed as lerp(theta_k, theta_q, 1 - m) = theta_k + (1 - m) (theta_q - theta_k): the same
value up to rounding (a few ulps), 12 bytes of traffic per fp32 parameter against 20 for a
mul then an add. The official code loops over parameters in Python, one or two kernel
launches per tensor. Here each (device, dtype) group is one call:
  backend "triton" (the default for CUDA tensors): kernels/ema.py, one launch over a table
    of the group's addresses, built on the first call and cached on those addresses (warm
    up once before capturing a CUDA graph: building the table copies it to the device);
  backend "torch" (the default for CPU tensors): torch._foreach_lerp_ over the group
    (CUDA fuses it into chunked multi-tensor launches).
Tensors that are not dense, or whose source has other strides, take the torch path.

Argument order: the target is what is written (the EMA: MoCo's key encoder, BYOL's "target
network"), the source what is read (the trained model): momentum_update_(encoder_k,
encoder_q, m), in the order of dst.copy_(src) and torch.lerp(target, source, w). lightly's
update_momentum(model, model_ema, m) takes them the other way round; called that way this
op would pull the trained model toward its copy, so validation refuses a call whose target
has tensors that require grad while its source has none (a key encoder is never trained).

Validation also refuses a target that appears twice or shares memory with another target
(it would be updated twice in one call) or with a source (the update would read what it
writes); sources may share memory among themselves.

momentum may be a Python float or a 0-d floating tensor on the target's device, so that a
momentum schedule can live on the GPU inside a captured CUDA graph: it is never read back
to the host (its range is therefore not checked). Everything is validated before the first
write, so a mismatch raises without touching any tensor.

Host time: the first call for a structure validates it (names, shapes, dtypes, devices,
memory overlaps, the direction above) and keeps a plan (fastmoco/ops/_ema_plan.py: what to
launch, with a signature of the structure); later calls check that signature, a few tens
of microseconds for ResNet-50, and launch. A changed structure is validated again, so it
still raises before any write.

Modules: parameters() always; floating buffers (BatchNorm running stats) per `buffers`:
"skip" (the official MoCo behaviour), "copy" (take the source's), "ema" (average like the
parameters). Integer buffers (num_batches_tracked) are copied unless buffers="skip".

CUDA graphs: a captured EMA launch reads its device table by address, and the table lives
in caches that evict (16 entries); hold_device_tables() keeps every cached table alive for
as long as a graph needs it (call it right after the capture, keep it with the graph).
"""

from collections.abc import Sequence
from itertools import chain

import torch
from torch import nn

from fastmoco.ops import _ema_plan
from fastmoco.ops._common import select_backend
from fastmoco.ops._ema_plan import ListPlan, ModulePlan, Work

_BACKENDS = ("torch", "triton")
_BUFFER_MODES = ("skip", "copy", "ema")
_TABLES_KEPT = 16  # device tables (address lists) kept, e.g. for lists rebuilt every step
_tables: dict[tuple, object] = {}  # (device, dtype, addresses and sizes) -> kernels' EmaPlan


def momentum_update_(
    target: nn.Module | Sequence[torch.Tensor],
    source: nn.Module | Sequence[torch.Tensor],
    momentum: float | torch.Tensor | None = None,
    *,
    ema_weight: float | torch.Tensor | None = None,
    buffers: str = "skip",
    backend: str | None = None,
) -> None:
    """target <- momentum * target + (1 - momentum) * source, in place, for every tensor.

    Give momentum m, or ema_weight w = 1 - m instead (a float, or a 0-d tensor on the
    device): a schedule that drives m toward 1 (MoCo v3) keeps w exact that way, where
    1 - m of an m rounded to float32 is off by up to 2^-25 absolute (and 0 once w < 2^-25).

    target: the EMA that is written (MoCo's key encoder), source: the trained model it
    follows (the query encoder); two modules with the same structure, or two sequences of
    tensors. A target whose tensors require grad with a source whose tensors do not is
    refused as a reversed call (lightly's update_momentum takes (model, model_ema, m)); a
    target listed twice, or sharing memory with another target or with a source, too.
    buffers: "skip" | "copy" | "ema" for modules' floating buffers (see the module doc).
    backend: None picks per device (CUDA: "triton", CPU: "torch"); "triton" or "torch" forces
    one ("triton" on CPU tensors only under TRITON_INTERPRET=1, as the tests run it).
    """
    plan = _ema_plan.cached_plan(target, source)
    tensors = None if plan is None else plan.current(target, source, buffers, backend)
    if tensors is None:  # first call for this structure, or it changed: validate it all
        plan, tensors = _build_plan(target, source, buffers, backend)
    if (momentum is None) == (ema_weight is None):
        raise ValueError(
            "give the momentum m or ema_weight = 1 - m (exactly one), e.g. "
            "momentum_update_(key_encoder, query_encoder, 0.999)"
        )
    _check_momentum(momentum if ema_weight is None else ema_weight, plan.work.devices,
                    "momentum" if ema_weight is None else "ema_weight")  # fmt: skip
    plan.work.run(tensors, momentum, ema_weight)


def clear_plans() -> None:
    """Forget every cached plan and device table (the next call validates and rebuilds).
    Tables held by hold_device_tables() stay alive while their holder does."""
    _tables.clear()
    _ema_plan.clear()


class HeldTables:
    """kernels/ema.py plans (each with its int64 device table), kept alive while this lives."""

    def __init__(self, tables):
        self.tables = tuple(tables)

    def __len__(self) -> int:
        return len(self.tables)


def hold_device_tables() -> HeldTables:
    """Keep every device table that momentum_update_ has cached alive until the returned
    object is dropped; call it right after capturing a CUDA graph and keep it with the graph.

    A captured EMA launch reads its table (the tensors' addresses and sizes) by pointer,
    and the table lives only in caches: the plans of tensor lists (16 kept) and the tables
    cached on addresses (16 kept). A process that builds more plans while the graph lives
    evicts and frees the table, its memory is reused, and replays write through garbage
    addresses. The tables a capture launches are all cached when it ends (building one
    during a capture raises), so holding them all then holds what the graph reads:

        with torch.cuda.graph(graph):
            step()                        # calls momentum_update_ (warmed up before)
        held = hold_device_tables()       # keep as long as graph; drop them together

    The tensors the tables point to (the model's, and a momentum tensor) are the caller's
    to keep, as for any captured kernel. Costs nothing per step: the object only holds.
    """
    plans = chain(_tables.values(), *(plan.work.kernels for plan in _ema_plan.plans()))
    return HeldTables({id(table): table for table in plans}.values())


def _build_plan(target, source, buffers, backend):
    """(plan, flat tensors): everything validated (raises before any write), then cached."""
    if buffers not in _BUFFER_MODES:
        raise ValueError(f"buffers must be one of {_BUFFER_MODES}, got {buffers!r}")
    select_backend(backend, _BACKENDS)
    ema_pairs, copy_pairs = _pairs(target, source, buffers)
    if isinstance(target, nn.Module):  # pair j at (2 j, 2 j + 1)
        tensors = [t for pair in ema_pairs + copy_pairs for t in pair]
        index = [(2 * j, 2 * j + 1) for j in range(len(ema_pairs) + len(copy_pairs))]
    else:  # flat = [*target, *source]; _pairs keeps the sequences' order
        tensors = [*target, *source]
        index = [(j, len(target) + j) for j in range(len(target))]
    kernels, foreach = [], []
    for (device, _), pair_ids in _grouped(ema_pairs).items():
        if _group_backend(backend, device) == "triton":
            table, pair_ids = _triton_table(ema_pairs, pair_ids)
            kernels += [] if table is None else [table]
        if pair_ids:
            foreach.append(([index[j][0] for j in pair_ids], [index[j][1] for j in pair_ids]))
    copies = [index[len(ema_pairs) + j] for j in range(len(copy_pairs))]
    work = Work(kernels, foreach, copies, frozenset(t.device for t, _ in ema_pairs))
    if isinstance(target, nn.Module):
        plan = ModulePlan(target, source, buffers, backend, work, tensors)
    else:
        plan = ListPlan(target, source, buffers, backend, work)
    _ema_plan.remember(target, plan)
    return plan, tensors


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
    _check_no_aliasing(ema + copy)
    _check_direction(ema, "parameter" if isinstance(target, nn.Module) else "tensor")
    return [(t, s) for _, t, s in ema], [(t, s) for _, t, s in copy]


def _extent(t: torch.Tensor):
    """(device index, first byte, one past the last byte) of t's elements; None for no memory.

    Strides are never negative in torch, so the elements lie between data_ptr() and the
    last one's address: views that interleave (t[::2] and t[1::2]) count as overlapping.
    get_device() and nbytes, not .device: on a Parameter they cost a tenth of it."""
    nbytes = t.nbytes  # numel() * element_size(), whatever the strides
    if nbytes == 0 or t.is_meta:
        return None
    start = t.data_ptr()
    if t.is_contiguous():
        return t.get_device(), start, start + nbytes
    span = 1 + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride(), strict=True))
    return t.get_device(), start, start + span * t.element_size()


def _check_no_aliasing(named_pairs) -> None:
    """No target's memory is another target's or a source's; raises naming the two.

    Two targets over the same elements (one tensor listed twice, two views of one storage)
    would be updated twice in one call; a target that overlaps a source changes what the
    update reads. Sources may overlap each other (they are only read); disjoint views of
    one flat buffer are fine. One sort of the address ranges, at validation only."""
    extents = []  # (device, start, end, j): tensor j is side j % 2 (0 target) of pair j // 2
    tensors = chain.from_iterable((t, s) for _, t, s in named_pairs)
    for j, x in enumerate(tensors):
        extent = _extent(x)
        if extent is not None:
            extents.append((*extent, j))
    extents.sort()
    device, reach, target_reach = None, (0, -1), (0, -1)  # (end, j) reaching furthest so far
    for dev, start, end, j in extents:
        if dev != device:
            device, reach, target_reach = dev, (0, -1), (0, -1)
        is_target = j % 2 == 0
        other_end, other = reach if is_target else target_reach
        if other_end > start:
            raise ValueError(_aliasing_message(named_pairs, other, j))
        if end > reach[0]:
            reach = (end, j)
        if is_target and end > target_reach[0]:
            target_reach = (end, j)


def _aliasing_message(named_pairs, *js) -> str:
    """Two overlapping tensors (flat indices j), named source first, else in list order."""
    (a, b) = sorted(js, key=lambda j: (j % 2 == 0, j // 2))
    (a_name, *a_pair), (b_name, *b_pair) = named_pairs[a // 2], named_pairs[b // 2]
    same = "is the same tensor as" if a_pair[a % 2] is b_pair[b % 2] else "shares memory with"
    if a % 2 == 0:  # the first in that order is a target: both are
        return (
            f"target {a_name} {same} target {b_name}: it would be updated twice in one call; "
            "pass each tensor once"
        )
    return (
        f"source {a_name} {same} target {b_name}: the update would read what it writes; "
        "the target must be a separate copy of the source (e.g. copy.deepcopy(model)), not "
        "the model itself"
    )


def _check_direction(named_pairs, what: str) -> None:
    """Refuse a reversed call: the target (an EMA, never trained) has tensors that require
    grad while the source (the trained model) has none."""
    trained = next((name for name, t, _ in named_pairs if t.requires_grad), None)
    if trained is None or any(s.requires_grad for _, _, s in named_pairs):
        return
    raise ValueError(
        f"momentum_update_(target, source, momentum) looks reversed: the target's tensors "
        f"require grad ({what} {trained}: a model the optimizer trains) and none of the "
        "source's do (a frozen momentum copy). The target is the copy that is written (the "
        "EMA, MoCo's key encoder), the source the trained model: call "
        "momentum_update_(model_ema, model, m), the reverse of lightly's "
        "update_momentum(model, model_ema, m). To pull a trained model toward a frozen one "
        "on purpose, pass detached tensors: [p.detach() for p in model.parameters()]"
    )


def _indexed(tensors, what: str):
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise ValueError(
            f"{what} must be an nn.Module or a sequence (list/tuple) of tensors, got "
            f"{type(tensors).__name__}; wrap a single tensor as [tensor]"
        )
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}[{i}] is a {type(t).__name__}, not a torch.Tensor")
    return [(f"[{i}]", t) for i, t in enumerate(tensors)]  # names for error messages only


def _matched(target_named, source_named, kind: str):
    """Zip named tensors, checking count, names, shapes, dtypes and devices pairwise."""
    targets, sources = list(target_named), list(source_named)
    for (t_name, t), (s_name, s) in zip(targets, sources, strict=False):
        if t_name != s_name:
            raise ValueError(
                f"{kind} names differ: target {t_name!r} vs source {s_name!r}; "
                "the two models must be built from the same architecture"
            )
        if t.dtype is s.dtype and t.device == s.device and t.shape == s.shape:
            continue  # the common case, without the per-attribute loop (per-step overhead)
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


def _check_momentum(momentum, devices: set, name: str = "momentum") -> None:
    """A float in [0, 1], or a 0-d floating tensor on the targets' device (never read here)."""
    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0 or not momentum.is_floating_point():
            raise ValueError(
                f"{name} tensor must be a 0-d floating tensor, got shape "
                f"{tuple(momentum.shape)} and dtype {momentum.dtype}"
            )
        if devices - {momentum.device}:
            raise ValueError(
                f"{name} is on {momentum.device} but the targets are on "
                f"{sorted(map(str, devices))}: keep the {name} tensor on the model's device "
                "(or pass a float when the model spans several devices)"
            )
        return
    bad_type = isinstance(momentum, bool) or not isinstance(momentum, (int, float))
    if bad_type or not 0.0 <= momentum <= 1.0:
        example = "0.999" if name == "momentum" else "0.001"
        raise ValueError(f"{name} must be a float in [0, 1] (e.g. {example}), got {momentum!r}")


def _grouped(pairs) -> dict[tuple, list[int]]:
    """{(device, dtype): indices of the pairs}: the lists one fused call can take."""
    groups: dict[tuple, list[int]] = {}
    for j, (t, _) in enumerate(pairs):
        groups.setdefault((t.device, t.dtype), []).append(j)
    return groups


def _group_backend(backend: str | None, device: torch.device) -> str:
    chosen = select_backend(backend, _BACKENDS, device)
    if chosen == "triton" and device.type != "cuda":
        from fastmoco.kernels import ema  # Triton is imported only when asked for

        if not ema._INTERPRET:
            raise ValueError(
                f"backend='triton' runs on CUDA tensors, got tensors on {device}; use "
                "backend=None (or 'torch') for CPU tensors (the kernel runs on CPU tensors "
                "only in the Triton interpreter, TRITON_INTERPRET=1)"
            )
    return chosen


def _dense_alike(t: torch.Tensor, s: torch.Tensor) -> bool:
    """Both tensors cover their numel() elements from data_ptr() in the same order."""
    if t.stride() != s.stride():
        return False
    if t.is_contiguous():
        return s.is_contiguous()
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def _triton_table(pairs, pair_ids):
    """(kernels/ema.py's table for the dense pairs of pair_ids or None, the other ids).

    Tables are also cached on the addresses, so that lists rebuilt every call (new tensor
    objects over the same storage) do not copy a new table to the device every step."""
    from fastmoco.kernels.ema import build_ema_plan

    dense, rest = [], []
    for j in pair_ids:
        t, s = pairs[j]
        is_dense = (t.is_contiguous() and s.is_contiguous()) or _dense_alike(t, s)
        (dense if is_dense else rest).append(j)
    pairs = [pairs[j] for j in dense]
    if not pairs:
        return None, rest
    device = pairs[0][0].device
    key = (
        device,
        pairs[0][0].dtype,
        tuple((t.data_ptr(), s.data_ptr(), t.numel()) for t, s in pairs),
    )
    table = _tables.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "momentum_update_ builds its device table on the first call for a model, a "
                "host-to-device copy that cannot be captured: call it once before capturing "
                "the CUDA graph (the usual warm-up step)"
            )
        if len(_tables) >= _TABLES_KEPT:
            _tables.pop(next(iter(_tables)))  # the oldest
        table = _tables[key] = build_ema_plan([t for t, _ in pairs], [s for _, s in pairs])
    return table, rest
