"""Shared pieces of the benchmark suite: where it ran, how much memory a call added
(fastmoco.experiments.measure.peak_extra_bytes, whose doc says how it is counted on CPU and CUDA),
and the comparison table printed after the timings."""

import os
import shutil

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any
# test module imports fastmoco.kernels. Without a GPU driver the kernels run in the
# interpreter on CPU tensors (backend="triton"); with one they compile for the GPU.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import platform
from pathlib import Path

import pytest
import torch

from fastmoco.experiments.measure import peak_extra_bytes

_PEAKS: list[tuple[str, int]] = []  # (test id, peak extra bytes), printed at the end


@pytest.fixture
def measure_peak(request):
    """peak_extra_bytes(fn, device), each measurement also kept for the summary printed
    after the timing tables."""

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

    The table gives each row's time against the group's `baseline` row(s) (same run, same
    inputs; a tuple names several, the first also for memory) and against the floor (the
    time the bytes and flops need at the copy bandwidth and bf16 matmul rate measured in
    this run: the `ceilings` fixture), and its peak extra memory against the baseline's."""

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
            names = row["baseline"] if isinstance(row["baseline"], tuple) else (row["baseline"],)
            bases = [(n, rows.get(n)) for n in names if n != impl]
            base = rows.get(names[0])
            t, f, peak = row["median_s"], row["floor_s"], row["peak"]
            x_floor = f"{t / f:.1f}" if (t and f) else "-"
            ratios = [f"{b['median_s'] / t:.2f}x vs {n}" for n, b in bases
                      if b and b["median_s"] and t]  # fmt: skip
            speed = ", ".join(ratios) or "-"
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


@pytest.fixture(scope="session")
def ceilings() -> dict:
    """The floors' rates, measured once per run on the GPU (bench/measure.py): bytes/s of a
    1 GiB device copy (read + written) and flop/s of an 8192^3 bf16 matmul on random data.
    None on CPU, where a shared machine gives no stable ceiling."""
    if not torch.cuda.is_available():
        return {"copy_bytes_per_s": None, "bf16_flops_per_s": None}
    from measure import copy_rate, matmul_rate

    device = torch.device("cuda")
    return {
        "copy_bytes_per_s": copy_rate(device, 2**30)[0],
        "bf16_flops_per_s": matmul_rate(device, 8192)[0],
    }


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


@pytest.fixture(scope="session")
def env_info() -> dict:
    """Device and versions, copied into every benchmark's extra_info."""
    from measure import git_commit

    info = {
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda or "none",
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "commit": git_commit(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def pytest_report_header(config):
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU: CPU cases only"
    return f"fastmoco bench: torch {torch.__version__}, triton {_triton_version()}, {gpu}"
