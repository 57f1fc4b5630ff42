"""Shared pieces of the benchmark suite: where it ran, and how much memory a call added.

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

import os
import shutil

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any
# test module imports fastmoco.kernels. Without a GPU driver the kernels run in the
# interpreter on CPU tensors (backend="triton"); with one they compile for the GPU.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import platform
import subprocess
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveStorageBytes(TorchDispatchMode):
    """Peak bytes of storages created by aten ops while the mode is active (see above)."""

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


_PEAKS: list[tuple[str, int]] = []  # (test id, peak extra bytes), printed at the end


@pytest.fixture
def measure_peak(request):
    """peak_extra_bytes(fn, device) as a fixture (bench/ is not a package to import from);
    every measurement also goes into the summary printed after the timing tables."""

    def measure(fn, device):
        peak = peak_extra_bytes(fn, device)
        _PEAKS.append((request.node.name, peak))
        return peak

    return measure


# Rows of the comparison table: one per (group, implementation), printed after the
# timing tables and, when FASTMOCO_BENCH_MD names a file, written there as markdown.
_ROWS: list[dict] = []


@pytest.fixture
def report_row():
    """report_row(group, impl, median_s, floor_s=None, peak_bytes=None, baseline="eager").

    The table gives each row's time against the group's `baseline` row (same run, same
    inputs) and against the floor (the time the bytes and flops need at the device's
    rated bandwidth and throughput), and its peak extra memory against the baseline's."""

    def add(group, impl, median_s, floor_s=None, peak_bytes=None, baseline="eager"):
        _ROWS.append(
            dict(group=group, impl=impl, median_s=median_s, floor_s=floor_s, peak=peak_bytes,
                 baseline=baseline)
        )  # fmt: skip

    return add


def _fmt_time(seconds):
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def _table() -> list[str]:
    lines = [
        "| case | impl | median | floor | x floor | speed-up vs baseline | peak extra MiB | "
        "memory vs baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_group: dict[str, dict[str, dict]] = {}
    for row in _ROWS:
        by_group.setdefault(row["group"], {})[row["impl"]] = row
    for group, rows in by_group.items():
        for impl, row in rows.items():
            base = rows.get(row["baseline"])
            t, f, peak = row["median_s"], row["floor_s"], row["peak"]
            x_floor = f"{t / f:.1f}" if (t and f) else "-"
            speed = f"{base['median_s'] / t:.2f}x" if (base and base["median_s"] and t) else "-"
            mib = "OOM" if t is None else ("-" if peak is None else f"{peak / 2**20:.2f}")
            mem = "-"
            if base and base["peak"] and peak is not None and t is not None:
                mem = f"{100 * peak / base['peak']:.1f} %"
            cells = [group, impl, "OOM" if t is None else _fmt_time(t), _fmt_time(f), x_floor,
                     speed, mib, mem]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def pytest_terminal_summary(terminalreporter):
    if _PEAKS:
        terminalreporter.section("peak extra memory per call (MiB)")
        width = max(len(name) for name, _ in _PEAKS)
        for name, peak in _PEAKS:
            terminalreporter.write_line(f"{name:<{width}}  {peak / 2**20:10.3f}")
    if _ROWS:
        terminalreporter.section("comparison (median, floor, speed-up and memory vs baseline)")
        lines = _table()
        for line in lines:
            terminalreporter.write_line(line)
        target = os.environ.get("FASTMOCO_BENCH_MD")
        if target:
            Path(target).write_text(pytest_report_header(None) + "\n\n" + "\n".join(lines) + "\n")


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


@pytest.fixture(scope="session")
def env_info() -> dict:
    """Device and versions, copied into every benchmark's extra_info."""
    info = {
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda or "none",
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "commit": _commit(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def pytest_report_header(config):
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU: CPU cases only"
    return f"fastmoco bench: torch {torch.__version__}, triton {_triton_version()}, {gpu}"
