"""How long one call takes and how much memory it adds: the one measuring helper of
`fastmoco bench` (step_bench.py), `fastmoco compare` and the benchmarks of bench/.

Time (time_calls): `warmup` untimed calls, then `steps` timed ones, each between two
synchronisations of the device (CUDA: torch.cuda.synchronize; the CPU runs in order), on
perf_counter. A Timing keeps every call's seconds: the median to quote, and the 20th and
80th percentiles for the spread (a wide one says the machine was busy).

Peak extra memory, per device:
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus what was
        allocated before the call: the caching allocator's own count of live bytes.
  CPU:  PyTorch has no allocator statistics for CPU tensors, and tracemalloc does not see
        them (their memory comes from c10's allocator, not Python's). LiveStorageBytes
        below counts them one level up: every storage that an aten op creates during the
        call adds its bytes, and subtracts them when the storage is freed. Views and
        in-place results add nothing. It does not see scratch memory that a kernel takes
        internally (oneDNN/BLAS workspaces) or allocator caching, so it is a lower bound
        of the process's growth; it is exactly the tensors the algorithm keeps alive,
        which is what distinguishes a chunked loss from one that builds N x K logits.
"""

import statistics
import time
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveStorageBytes(TorchDispatchMode):
    """Peak bytes of storages created by aten ops while the mode is active (module doc)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = tree_flatten((args, kwargs))[0]
        seen = {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, storage.nbytes())
        return out


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak memory that one call of fn adds on top of what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveStorageBytes() as tracker:
        fn()
    return tracker.peak


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed call."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100), interpolated between the sorted calls."""
        s = sorted(self.seconds)
        x = (len(s) - 1) * q / 100
        lo = int(x)
        return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (x - lo)

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: 0.1 means the middle 60 % of the calls lie within 10 %."""
        return (self.percentile(80) - self.percentile(20)) / self.median


def time_calls(fn, device, *, steps: int, warmup: int) -> Timing:
    """Timing of `steps` calls of fn after `warmup` untimed ones (module doc)."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times))
