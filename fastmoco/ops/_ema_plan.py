"""momentum_update_'s per-structure plan: what one validated call launches, kept for the next.

Validating two ResNet-50s (names, shapes, dtypes, devices of 161 tensor pairs, and the
traversal of ~150 modules) costs several hundred microseconds of Python, far more than the
update itself on a GPU. A plan keeps the result of that validation with a signature that is
cheap to check every call, so later calls only check it and launch.

Signature (a few microseconds per hundred tensors):
  - the identity of every tensor passed; for modules, of every entry of every submodule's
    _modules, _parameters (and, unless buffers="skip", _buffers) dict, read from those
    dicts directly, so adding, removing or replacing a submodule, parameter or buffer shows;
  - every tensor's data_ptr(), so `.to()`, `.cuda()`, `.half()`, `.data = ...` and
    `set_()` (which keep the Parameter object and change its storage) show.
A call whose signature differs validates from scratch, so a mismatch raises before any
write, as on the first call. Not seen: in-place metadata changes that keep the address
(resize_, or `.data = p.view(...)` / a transpose on one side only): parameters are not
reshaped in place between updates in any training loop we know of.

A module's plan lives as long as the target module (a WeakKeyDictionary entry); it holds
the modules' tensors but not the target module. A plan for tensor lists holds weak
references only, so it keeps no tensor alive; at most _LIST_PLANS_KEPT of them are kept,
so an evicted plan's device table dies with it unless momentum_update.hold_device_tables()
holds it (what a captured CUDA graph needs: it reads the table by address).
"""

import operator
import weakref
from itertools import chain

import torch
from torch import nn

_LIST_PLANS_KEPT = 16
_list_plans: dict[tuple, "ListPlan"] = {}  # (id(targets[0]), len(targets)) -> plan
_module_plans: "weakref.WeakKeyDictionary[nn.Module, ModulePlan]" = weakref.WeakKeyDictionary()
_data_ptr = torch.Tensor.data_ptr


class Work:
    """What a call runs, over a flat list of tensors in which pair j is (t[j], s[j]) at
    the indices given: kernels (kernels/ema.py tables: addresses, no tensors),
    foreach groups (index lists of targets and sources), copies (index pairs)."""

    def __init__(self, kernels, foreach, copies, devices):
        self.kernels, self.foreach, self.copies, self.devices = kernels, foreach, copies, devices

    def run(self, tensors, momentum, weight=None) -> None:
        """The update with w = 1 - momentum, or w = weight when given (float or 0-d tensor)."""
        if self.kernels:
            from fastmoco.kernels.ema import ema_

            for table in self.kernels:
                ema_(table, momentum, weight=weight)
        if self.foreach or self.copies:
            with torch.no_grad():  # in-place on parameters (leaves that need a gradient)
                for t_index, s_index in self.foreach:
                    targets = [tensors[i] for i in t_index]
                    sources = [tensors[i] for i in s_index]
                    lerp_foreach(targets, sources, momentum, weight)
                for ti, si in self.copies:
                    tensors[ti].copy_(tensors[si])


def lerp_foreach(targets, sources, momentum, weight=None) -> None:
    """torch._foreach_lerp_ over one (device, dtype) group, weight w = 1 - momentum (or the
    given weight).

    A tensor weight goes through the List overload (one 0-d weight per tensor, broadcast),
    present since torch 2.0: the Scalar overload would call .item() on it, a host sync.
    """
    if not targets:
        return
    if weight is None:
        weight = 1.0 - momentum if isinstance(momentum, torch.Tensor) else 1.0 - float(momentum)
    if isinstance(weight, torch.Tensor):
        w = weight.to(targets[0].dtype)  # on the device; lerp wants the tensors' dtype
        torch._foreach_lerp_(targets, sources, [w] * len(targets))
    else:
        torch._foreach_lerp_(targets, sources, float(weight))


class ListPlan:
    """Two tensor sequences: flat = [*target, *source]."""

    def __init__(self, target, source, buffers, backend, work: Work):
        self.buffers, self.backend, self.work = buffers, backend, work
        self.length = len(target)
        self.refs = [weakref.ref(t) for t in chain(target, source)]
        self.data_ptrs = [t.data_ptr() for t in chain(target, source)]

    def current(self, target, source, buffers, backend) -> list | None:
        """The flat tensor list if the signature holds, else None."""
        if buffers != self.buffers or backend != self.backend or len(source) != self.length:
            return None
        held = [ref() for ref in self.refs]
        if not all(map(operator.is_, held, chain(target, source))):
            return None
        return held if list(map(_data_ptr, held)) == self.data_ptrs else None


class ModulePlan:
    """Two modules: flat = the validated tensors, pair j at (2 j, 2 j + 1)."""

    def __init__(self, target, source, buffers, backend, work: Work, tensors):
        self.buffers, self.backend, self.work = buffers, backend, work
        self.tensors = tensors
        self.data_ptrs = [t.data_ptr() for t in tensors]
        self.source_ref = weakref.ref(source)
        # The dicts nn.Module keeps its children and tensors in: reading their values is
        # the cheap way to see the structure (module.named_parameters() walks it in Python).
        kinds = ("_modules", "_parameters") + (() if buffers == "skip" else ("_buffers",))
        self.dicts = [getattr(m, kind) for m in (*target.modules(), *source.modules())
                      for kind in kinds]  # fmt: skip
        self.entries = self._entries()

    def _entries(self) -> list:
        return list(chain.from_iterable(map(dict.values, self.dicts)))

    def current(self, target, source, buffers, backend) -> list | None:
        """The flat tensor list if the signature holds, else None."""
        if buffers != self.buffers or backend != self.backend or self.source_ref() is not source:
            return None
        entries = self._entries()
        if len(entries) != len(self.entries) or not all(map(operator.is_, entries, self.entries)):
            return None
        return self.tensors if list(map(_data_ptr, self.tensors)) == self.data_ptrs else None


def cached_plan(target, source):
    """The plan last built for this target (module) or tensor list, or None."""
    if isinstance(target, nn.Module):
        return _module_plans.get(target)
    if isinstance(target, (list, tuple)) and target and isinstance(source, (list, tuple)):
        return _list_plans.get((id(target[0]), len(target)))
    return None


def plans() -> list:
    """Every cached plan, of tensor lists and of modules."""
    return [*_list_plans.values(), *list(_module_plans.values())]


def remember(target, plan) -> None:
    if isinstance(target, nn.Module):
        _module_plans[target] = plan
    elif target:
        if len(_list_plans) >= _LIST_PLANS_KEPT:
            _list_plans.pop(next(iter(_list_plans)))  # the oldest
        _list_plans[(id(target[0]), len(target))] = plan


def clear() -> None:
    _list_plans.clear()
    _module_plans.clear()
