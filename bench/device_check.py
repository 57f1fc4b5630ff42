"""One prepared device check: correctness and timings of every fused op in one short call.

    bench/device_check.sh              on the GPU machine: install, then this file
    python bench/device_check.py --cpu the same code on CPU: Triton's interpreter, tiny sizes

Sections, in order (each writes its rows as they arrive, so a run cut short keeps them):
  env      device, versions, install result, which tiles are pinned
  check    correctness against float64 references, relative norm error ||out-ref||/||ref||,
           with freed allocator blocks filled with NaN first (an output element a kernel
           forgets to write then shows as NaN, and NaN never passes):
           - MoCo single pass (only q needs a gradient): bf16 and fp32, N=256, K=65536,
             C=128, queue (K, C) and buf.T of the official (C, K) buffer: loss rows, rank, dq
           - the general path (q, k and queue need gradients): N=300, K=10007, C=512:
             loss rows, dq, dk, dqueue, bf16 and fp32
           - in-batch negatives and NT-Xent (bf16): loss rows and every gradient
           - momentum_update_ over ResNet-50's parameters, and odd sizes in three dtypes
           - enqueue_ with wrap-around, both queue layouts (exact)
  time     medians by CUDA events (triton.testing.do_bench) or CUDA-graph replay:
           - the ceilings of this run: a 1 GiB device copy (bytes read + written) and an
             8192^3 bf16 matmul on random data
           - info_nce forward+backward, MoCo setting, fused vs MoCo's Algorithm 1 under bf16
             autocast vs the fp32 reference, with peak extra memory: N=256, K=65536 (bf16
             and fp32) and N=1024, K=1,048,576 (bf16), plus the fused step replayed from a
             CUDA graph; floor = max(bytes / copy rate, 4NKC / bf16 matmul rate)
           - the EMA kernel vs _foreach_lerp_ vs the per-parameter loop (ResNet-50, fp32)
           - 100 enqueues captured in one graph vs index_copy_ vs the official slice
  parity   graph == eager for every method: tests/test_step.py's GPU tests (-m gpu) in a
           pytest subprocess, one row per test (CPU: one of its CPU parity tests, so that
           the subprocess, the JUnit report and the rows run the same way)
  step     one training step of the end-to-end step benchmark (official, eager, graph, networks
           alone), each row with its spread, trust, use_graph and the step's reason
  train    `fastmoco train` end to end on a small demo set: --amp --cuda-graph on (CPU:
           off), loader workers, 2 epochs with a kNN pass and a mid-epoch checkpoint
           between replays, then --resume for a third epoch into a new graph; its log must
           say the graph ran, the loss be finite and falling, the resume line be there
  ddp      DDP with one rank (NCCL; CPU: gloo, eager only) under capture after 11 eager
           warm-up steps: parameters of the graphed step against the eager one

The fallback rule: a row measured in this process while fastmoco.ops._common.
kernel_failures() is non-empty fails (a Triton kernel fell back to the PyTorch path, so
the row timed or checked the wrong code), with the failures named; the subprocess sections
fail the same way when their output carries the fallback warning. A graph row of the step
section whose step did not end with use_graph=True fails.

The time budget: the whole call (install included, from DEVICE_CHECK_START) has
DEVICE_CHECK_BUDGET seconds (420, the 7 minutes); no section starts after
DEVICE_CHECK_LAST_START (360): it is skipped with a row saying so. The subprocess sections
get at most the time left before the budget's end, less 10 s for the report. Estimated GPU
time of each section (H200, 16 cores; none of it has run on a GPU yet, so these are
estimates, each section's docstring says from what): env 10 s with the imports, check
60 s, time 45 s, parity 50 s, step 50 s, train 45 s, ddp 20 s: about 280 s after an install
of up to 135 s. When the install takes its whole limit, ddp is the section that gets
skipped.

Results go to $OUT (the device tool's folder) or bench/out/: results.jsonl (one JSON object
per row, written as it is measured), results.md (the table printed last, ready to paste
into bench/RESULTS.md), subprocesses.log (the parity, train and ddp subprocesses' whole
output). Exit
status 0 when every check passed and no section failed; a skipped section fails nothing
(its row says why it did not run).

FASTMOCO_PIN_TILES=1 (set here unless given) makes the kernels compile one tile per kernel
instead of autotuning, so this call compiles a handful of variants, not a hundred; the env
section counts the compiled variants (cubins in a fresh TRITON_CACHE_DIR).

CPU mode (--cpu, or no CUDA device): TRITON_INTERPRET=1 before anything imports Triton, the
same sections at tiny sizes, perf_counter medians in place of CUDA events, plain calls in
place of graph replays. tests/test_device_check.py runs it end to end in CI.
"""

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("env", "check", "time", "parity", "step", "train", "ddp")  # the order they run in


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="CPU mode: interpreter, tiny sizes")
    p.add_argument("--out", default=None, help="results folder (default $OUT or bench/out)")
    p.add_argument("--install", default="", help="the install script's result line (env row)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset to run")
    p.add_argument("--ddp-worker", metavar="JSON", help=argparse.SUPPRESS)  # the ddp section's
    args = p.parse_args(argv)
    unknown = sorted(set(args.sections.split(",")) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {', '.join(unknown)}; choose from {','.join(SECTIONS)}")
    return args


ARGS = _parse(sys.argv[1:] if __name__ == "__main__" else [])
# GPU mode needs a driver; otherwise (or with --cpu) the kernels run in the interpreter.
GPU_MODE = not ARGS.cpu and shutil.which("nvidia-smi") is not None
# Both switches are read when the kernels are defined, so they are set before any import
# of triton or fastmoco.
if not GPU_MODE:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("FASTMOCO_PIN_TILES", "1")
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="fastmoco-triton-"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastmoco.experiments.measure import peak_extra_bytes  # noqa: E402
from fastmoco.ops import enqueue_, info_nce, momentum_update_, nt_xent  # noqa: E402
from fastmoco.ops import reference as ref  # noqa: E402
from fastmoco.ops._common import kernel_failures  # noqa: E402
from fastmoco.ops.enqueue import extension_has_cuda, extension_op  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402  (bench/measure.py: timing shared with the pytest benchmarks)

if GPU_MODE and not torch.cuda.is_available():
    sys.exit("nvidia-smi is here but torch sees no CUDA device: check the driver and torch")
CUDA = GPU_MODE
DEVICE = torch.device("cuda" if CUDA else "cpu")
T_MOCO, T_SIMCLR = 0.2, 0.5

# Sizes: the on a GPU; on CPU small enough for the interpreter, with ragged edges.
SIZES = {
    "moco": (256, 65536, 128) if CUDA else (40, 300, 32),  # N, K, C
    "general": (300, 10007, 512) if CUDA else (21, 157, 48),
    "in_batch": (256, 128) if CUDA else (24, 32),  # N, C
    "ema_model": "resnet50" if CUDA else "squeezenet1_1",
    "ema_odd": (1, 3, 4095, 4097, 65537, 1_000_003) if CUDA else (1, 3, 4097, 70001),
    "enqueue": (65536, 128, 256) if CUDA else (1000, 32, 64),  # K, C, B
    "time_moco": [
        (256, 65536, 128, "bf16"),
        (256, 65536, 128, "fp32"),
        (1024, 1_048_576, 128, "bf16"),
    ]
    if CUDA
    else [(16, 96, 16, "bf16"), (16, 96, 16, "fp32"), (16, 160, 16, "bf16")],
    "copy_bytes": 2**30 if CUDA else 2**23,
    "matmul": 8192 if CUDA else 256,
    "graph_enqueues": 100,
    "graph_emas": 10 if CUDA else 2,
    # tests/test_step.py: its GPU tests; on CPU its cheapest CPU parity test (~10 s)
    "parity": ["-m", "gpu"] if CUDA else ["-k", "bit_for_bit and membank"],
    # the trainer: demo images (DemoSpec fields), batch, K, loader workers; 10 steps/epoch.
    # Under 400 images the demo is drawn in this process, with no fork of it (CUDA is up).
    "train": dict(spec=dict(n_train_per_class=32, n_val_per_class=7), batch=32, K=64, workers=4)
    if CUDA
    else dict(
        spec=dict(image_size=32, n_train_per_class=16, n_val_per_class=4), batch=16, K=32, workers=2
    ),
    # DDP: 11 eager warm-up steps (the PyTorch CUDA-graphs notes), then 5 graphed
    "ddp_steps": 16,
}
# Sections whose rows this process measures: the fallback rule reads its kernel_failures().
# parity, train and ddp run in subprocesses, which report their own fallbacks.
IN_PROCESS = ("check", "time", "step")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}

# The time budget (module doc): seconds from DEVICE_CHECK_START (device_check.sh's start,
# the install included; else this process's start).
BUDGET_S = float(os.environ.get("DEVICE_CHECK_BUDGET") or 420)
LAST_START_S = float(os.environ.get("DEVICE_CHECK_LAST_START") or 360)
REPORT_S = 10.0  # kept back at the end for the table
STARTED = float(os.environ.get("DEVICE_CHECK_START") or time.time())


def elapsed() -> float:
    return time.time() - STARTED


# ---------------------------------------------------------------- results, as they arrive
class Results:
    """Rows appended to results.jsonl one line at a time, flushed at once. A row of a section
    measured in this process fails while any kernel has fallen back (the fallback rule)."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.rows: list[dict] = []
        self.file = open(out / "results.jsonl", "w", buffering=1)
        self.failed = False

    def add(self, section: str, **row) -> dict:
        row = {"section": section, **row}
        failures = kernel_failures()
        if section in IN_PROCESS and failures and "skipped" not in row:
            # The row may have checked or timed the PyTorch path in place of the kernels.
            row["passed"] = False
            row["kernel_failures"] = {
                op: {str(k): v for k, v in kinds.items()} for op, kinds in failures.items()
            }
        self.rows.append(row)
        self.file.write(json.dumps(row, default=str) + "\n")
        self.file.flush()
        if row.get("passed") is False or "error" in row:
            self.failed = True
        return row


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- measuring
def sync() -> None:
    measure.sync(DEVICE)


def median_seconds(fn, grad_to_none=None) -> float:
    return measure.median_seconds(fn, DEVICE, grad_to_none=grad_to_none)


# How graphed() runs: a CUDA graph's replay on GPU; on CPU the same calls, plainly.
REPLAY = "CUDA-graph replay" if CUDA else "plain calls (CPU mode)"


def graphed(fn, calls: int = 1):
    return measure.graphed(fn, DEVICE, calls)


def peak_bytes(fn) -> int:
    return peak_extra_bytes(fn, DEVICE)


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN in out gives NaN (which fails every check)."""
    out, expected = out.detach().double(), expected.detach().double().to(out.device)
    denom = expected.norm().item()
    return (out - expected).norm().item() / (denom if denom > 0 else 1.0)


def poison_allocator() -> None:
    """Fill blocks of the allocator with NaN and free them, so the next allocations (the
    kernels' outputs and scratch) start as NaN. On CUDA the caching allocator keeps and
    reuses these blocks (small pool < 1 MiB, large pool above); on CPU freed heap blocks
    are often reused too, but large allocations come back zeroed from the OS."""
    sizes = [2**16] * 16 + [2**20] * 8 + [2**24] * 4 + ([2**28] * 2 if CUDA else [])
    blocks = [torch.full((n // 4,), float("nan"), device=DEVICE) for n in sizes]
    del blocks
    sync()


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def unit(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return F.normalize(x.float(), dim=dim)


# ---------------------------------------------------------------- correctness
def check(res: Results, case: str, quantity: str, out, expected, tol: float) -> None:
    """One row: ||out - expected|| / ||expected|| against tol."""
    record(res, case, quantity, rel_err(out, expected), tol)


def record(res: Results, case: str, quantity: str, err: float, tol: float) -> None:
    row = res.add(
        "check", case=case, quantity=quantity, rel_err=err, tol=tol, passed=bool(err <= tol)
    )
    _log(
        f"  {case:<44} {quantity:<8} {err:10.3e}  (tol {tol:.0e})  "
        f"{'ok' if row['passed'] else 'FAIL'}"
    )


def _queue(K, C, layout, dtype, g):
    """Unit keys as (K, C) rows, or as buf.T of the official (C, K) buffer."""
    if layout == "rows":
        return unit(torch.randn(K, C, device=DEVICE, generator=g)).to(dtype)
    return unit(torch.randn(C, K, device=DEVICE, generator=g), dim=0).to(dtype).T


def check_moco(res: Results) -> None:
    """Single pass: loss rows, rank and dq, both dtypes, both queue layouts."""
    N, K, C = SIZES["moco"]
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for layout in ("rows", "buf.T"):
            g = gen(1)
            q = torch.randn(N, C, device=DEVICE, generator=g)
            # Keys loosely tied to their queries: about ten negatives score above the
            # positive (cosine ~0.3 against ~N(0, 1/C)), so ranks vary from row to row.
            k = unit(q + 3.0 * torch.randn(N, C, device=DEVICE, generator=g)).to(dtype)
            q = q.to(dtype).requires_grad_()
            queue = _queue(K, C, layout, dtype, g)
            poison_allocator()
            rows, rank = info_nce(
                q, k, queue, T_MOCO, reduction="none", return_stats=True, backend="triton"
            )
            rows.mean().backward()
            q64 = q.detach().double().requires_grad_()
            rows64 = ref.info_nce_reference(
                q64, k.double(), queue.double(), T_MOCO, reduction="none"
            )
            rows64.mean().backward()
            logits, _ = ref.info_nce_logits_reference(
                q64.detach(), k.double(), queue.double(), T_MOCO
            )
            rank64 = (logits[:, 1:] > logits[:, :1]).sum(dim=1)
            case = f"moco single pass {name} N={N} K={K} C={C} {layout}"
            tol = TOL[dtype]
            check(res, case, "loss", rows, rows64, tol)
            # A logit within rounding of the positive may count on either side: the share
            # of rows whose rank differs, at most 1 %.
            record(res, case, "rank", (rank != rank64).float().mean().item(), 0.01)
            check(res, case, "dq", q.grad, q64.grad, tol)


def check_general(res: Results) -> None:
    """The recompute backward (q, k and the queue need gradients): dq, dk, dqueue."""
    N, K, C = SIZES["general"]
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        g = gen(2)
        q = torch.randn(N, C, device=DEVICE, generator=g).to(dtype).requires_grad_()
        k = torch.randn(N, C, device=DEVICE, generator=g).to(dtype).requires_grad_()
        queue = _queue(K, C, "rows", dtype, g).requires_grad_()
        poison_allocator()
        rows = info_nce(q, k, queue, T_MOCO, reduction="none", backend="triton")
        w = torch.rand(N, device=DEVICE, generator=g)  # unequal row weights: g_i varies
        (rows * w).sum().backward()
        leaves = [t.detach().double().requires_grad_() for t in (q, k, queue)]
        rows64 = ref.info_nce_reference(*leaves, T_MOCO, reduction="none")
        (rows64 * w.double()).sum().backward()
        case = f"general {name} N={N} K={K} C={C}"
        check(res, case, "loss", rows, rows64, TOL[dtype])
        for label, t, t64 in zip(("dq", "dk", "dqueue"), (q, k, queue), leaves, strict=True):
            check(res, case, label, t.grad, t64.grad, TOL[dtype])


def check_in_batch_and_nt_xent(res: Results) -> None:
    N, C = SIZES["in_batch"]
    g = gen(3)
    q = torch.randn(N, C, device=DEVICE, generator=g).bfloat16().requires_grad_()
    k = torch.randn(N, C, device=DEVICE, generator=g).bfloat16().requires_grad_()
    poison_allocator()
    rows = info_nce(q, k, None, T_MOCO, reduction="none", backend="triton")
    rows.mean().backward()
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    rows64 = ref.info_nce_reference(q64, k64, None, T_MOCO, reduction="none")
    rows64.mean().backward()
    case = f"in-batch bf16 N={N} C={C}"
    check(res, case, "loss", rows, rows64, 1e-2)
    check(res, case, "dq", q.grad, q64.grad, 1e-2)
    check(res, case, "dk", k.grad, k64.grad, 1e-2)

    z1 = torch.randn(N, C, device=DEVICE, generator=g).bfloat16().requires_grad_()
    z2 = torch.randn(N, C, device=DEVICE, generator=g).bfloat16().requires_grad_()
    poison_allocator()
    rows = nt_xent(z1, z2, T_SIMCLR, reduction="none", backend="triton")
    rows.mean().backward()
    a64, b64 = (t.detach().double().requires_grad_() for t in (z1, z2))
    rows64 = ref.nt_xent_reference(a64, b64, T_SIMCLR, reduction="none")
    rows64.mean().backward()
    case = f"NT-Xent bf16 N={N} C={C}"
    check(res, case, "loss", rows, rows64, 1e-2)
    check(res, case, "dz1", z1.grad, a64.grad, 1e-2)
    check(res, case, "dz2", z2.grad, b64.grad, 1e-2)


def _model_parameters(name: str) -> list[torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    return [p.detach() for p in getattr(torchvision.models, name)().parameters()]


def _check_ema(res, case, targets, sources, momentum, tol):
    """The update itself (new - old) against fp64 lerp: a no-op or a wrong weight fails
    even where the update is small next to the parameter."""
    old = [t.double() for t in targets]
    m = float(momentum)
    expected = [o + (1 - m) * (s.double() - o) for o, s in zip(old, sources, strict=True)]
    poison_allocator()
    momentum_update_(targets, sources, momentum, backend="triton")
    delta = torch.cat([(t.double() - o).flatten() for t, o in zip(targets, old, strict=True)])
    want = torch.cat([(e - o).flatten() for e, o in zip(expected, old, strict=True)])
    check(res, case, "update", delta, want, tol)


def check_ema(res: Results) -> None:
    name = SIZES["ema_model"]
    params = _model_parameters(name)
    g = gen(4)
    targets = [p.to(DEVICE, copy=True) for p in params]
    sources = [t + torch.randn(t.shape, device=DEVICE, generator=g) for t in targets]
    n = sum(p.numel() for p in params)
    _check_ema(
        res,
        f"ema {name} fp32 ({len(params)} tensors, {n / 1e6:.1f}M)",
        targets,
        sources,
        0.99,
        1e-4,
    )
    m = torch.tensor(0.99, device=DEVICE)  # a momentum schedule kept on the device
    _check_ema(res, f"ema {name} fp32, momentum as a 0-d tensor", targets, sources, m, 1e-4)
    for dname, dtype in (
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
    ):
        sizes = SIZES["ema_odd"]
        # Each tensor one element into its storage: addresses off 16 bytes (unaligned loads).
        targets = [torch.randn(s + 1, device=DEVICE, generator=g).to(dtype)[1:] for s in sizes]
        sources = [torch.randn(s + 1, device=DEVICE, generator=g).to(dtype)[1:] for s in sizes]
        momentum = 0.99 if dtype == torch.float32 else 0.5  # a step well above the rounding
        _check_ema(
            res, f"ema odd sizes {dname} {sizes}, unaligned", targets, sources, momentum, TOL[dtype]
        )


def check_enqueue(res: Results) -> None:
    K, C, B = SIZES["enqueue"]
    available = extension_op() is not None and (not CUDA or extension_has_cuda())
    if not available:
        res.add(
            "check",
            case="enqueue (extension)",
            quantity="built",
            rel_err=None,
            tol=None,
            passed=False,
            note="fastmoco._C missing or built without CUDA: see install.log",
        )
        _log("  enqueue: the extension is not built (with CUDA): FAIL")
        return
    g = gen(5)
    for layout in ("rows", "buf.T"):
        for kname, kdtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            queue = _queue(K, C, layout, torch.float32, g)
            keys = torch.randn(B, C, device=DEVICE, generator=g).to(kdtype)
            ptr = torch.tensor([K - B // 2], device=DEVICE)  # runs past the end: wraps
            want_q, want_p = queue.clone(), ptr.clone()
            ref.enqueue_reference(want_q, want_p, keys)
            enqueue_(queue, ptr, keys, backend="cuda")
            case = f"enqueue K={K} C={C} B={B} {layout}, {kname} keys, wraps"
            wrong = int((queue != want_q).sum()) + int(ptr.item() != want_p.item())
            row = res.add(
                "check",
                case=case,
                quantity="exact",
                rel_err=float(wrong),
                tol=0.0,
                passed=wrong == 0,
            )
            _log(f"  {case:<44} exact    {wrong:10d}  {'ok' if row['passed'] else 'FAIL'}")


# ---------------------------------------------------------------- timings
class Ceilings:
    copy_bytes_per_s: float = math.nan
    bf16_flops_per_s: float = math.nan


def time_row(res, case, impl, seconds, floor=None, peak=None, baselines=None):
    row = dict(case=case, impl=impl, median_s=seconds, floor_s=floor, peak_bytes=peak)
    if floor:
        row["x_floor"] = seconds / floor
    for name, base in (baselines or {}).items():
        row[f"speedup_vs_{name}"] = base / seconds
    res.add("time", **row)
    extra = "".join(f"  {k}={v:.2f}" for k, v in row.items() if k.startswith(("x_", "speedup")))
    _log(f"  {case:<40} {impl:<28} {_fmt_time(seconds):>10}{extra}")
    return row


def time_ceilings(res: Results, ceil: Ceilings) -> None:
    nbytes = SIZES["copy_bytes"]
    ceil.copy_bytes_per_s, t = measure.copy_rate(DEVICE, nbytes)
    time_row(res, f"copy {nbytes / 2**30:.3g} GiB fp32", "copy_", t)
    res.add(
        "time",
        case="ceiling",
        impl="copy bandwidth (read + write)",
        value=ceil.copy_bytes_per_s,
        unit="B/s",
    )
    s = SIZES["matmul"]
    ceil.bf16_flops_per_s, t = measure.matmul_rate(DEVICE, s)
    time_row(res, f"matmul {s}^3 bf16", "torch.mm", t)
    res.add(
        "time", case="ceiling", impl="bf16 matmul rate", value=ceil.bf16_flops_per_s, unit="flop/s"
    )


def time_info_nce(res: Results, ceil: Ceilings) -> None:
    for N, K, C, dname in SIZES["time_moco"]:
        _time_info_nce_case(res, ceil, N, K, C, dname)
        if CUDA:
            torch.cuda.empty_cache()


def _time_info_nce_case(res: Results, ceil: Ceilings, N, K, C, dname) -> None:
    dtype = DTYPES[dname]
    g = gen(6)
    q = torch.randn(N, C, device=DEVICE, generator=g).to(dtype).requires_grad_()
    k = unit(torch.randn(N, C, device=DEVICE, generator=g)).to(dtype)
    buf = unit(torch.randn(C, K, device=DEVICE, generator=g), dim=0).to(dtype)
    impls = {  # baselines first, so the fused rows can carry both ratios
        "eager bf16 autocast": lambda: measure.algorithm1(q, k, buf, T_MOCO),
        "eager fp32 reference": lambda: ref.info_nce_reference(q, k, buf.T, T_MOCO),
        "fused": lambda: info_nce(q, k, buf.T, T_MOCO, backend="triton"),
    }
    floor = measure.info_nce_floor(N, K, C, dtype, ceil.copy_bytes_per_s, ceil.bf16_flops_per_s)
    case = f"info_nce fwd+bwd {dname} N={N} K={K} C={C}"
    base: dict[str, float] = {}
    for impl, fn in impls.items():

        def step(fn=fn):
            fn().backward()

        try:
            step()
            q.grad = None
            peak = peak_bytes(step)
            q.grad = None
            t = median_seconds(step, grad_to_none=[q])
        except torch.OutOfMemoryError:
            q.grad = None
            res.add("time", case=case, impl=impl, median_s=None, note="out of memory")
            continue
        fused = impl == "fused"
        time_row(res, case, impl, t, floor if fused else None, peak, base if fused else None)
        if not fused:
            base["autocast" if "autocast" in impl else "fp32"] = t
    # The fused step replayed from a CUDA graph: what a captured training step pays.
    try:
        q.grad = None
        replay = graphed(lambda: info_nce(q, k, buf.T, T_MOCO, backend="triton").backward())
        time_row(res, case, f"fused, {REPLAY}", median_seconds(replay), floor, baselines=base)
    except Exception as err:  # noqa: BLE001  (recorded: a capture failure is a finding)
        res.add("time", case=case, impl=f"fused, {REPLAY}", error=repr(err))


def time_ema(res: Results, ceil: Ceilings) -> None:
    from fastmoco.kernels.ema import build_ema_plan, ema_

    name = SIZES["ema_model"]
    params = _model_parameters(name)
    targets = [p.to(DEVICE, copy=True) for p in params]
    sources = [t + 0.01 for t in targets]
    numel = sum(p.numel() for p in params)
    case = f"ema {name} fp32 ({len(params)} tensors, {numel / 1e6:.1f}M)"
    floor = 12 * numel / ceil.copy_bytes_per_s  # read t and s, write t
    m = 0.999
    plan = build_ema_plan(targets, sources)
    # The official loop assigns new storage to .data: on copies, so that the plan's
    # addresses (targets) stay valid.
    loop_targets = [t.clone() for t in targets]
    impls = {
        "loop (official)": lambda: ref.momentum_update_reference(loop_targets, sources, m),
        "_foreach_lerp_": lambda: torch._foreach_lerp_(targets, sources, 1 - m),
        "momentum_update_": lambda: momentum_update_(targets, sources, m, backend="triton"),
        "kernel (plan built)": lambda: ema_(plan, m),
    }
    times = {}
    for impl, fn in impls.items():
        times[impl] = median_seconds(fn)
        base = {"loop": times["loop (official)"]} if impl != "loop (official)" else {}
        time_row(res, case, impl, times[impl], floor, baselines=base)
    calls = SIZES["graph_emas"]
    t = median_seconds(graphed(lambda: ema_(plan, m), calls=calls)) / calls
    time_row(
        res,
        case,
        f"kernel, {REPLAY}",
        t,
        floor,
        baselines={"loop": times["loop (official)"], "foreach": times["_foreach_lerp_"]},
    )


def time_enqueue(res: Results, ceil: Ceilings) -> None:
    K, C, B = SIZES["enqueue"]
    calls = SIZES["graph_enqueues"]
    g = gen(7)
    buf = torch.randn(C, K, device=DEVICE, generator=g)
    queue = buf.T  # the official (C, K) buffer
    keys = torch.randn(B, C, device=DEVICE, generator=g)
    ptr = torch.zeros(1, dtype=torch.long, device=DEVICE)
    case = f"enqueue K={K} C={C} B={B} fp32 buf.T"
    floor = 2 * B * C * 4 / ceil.copy_bytes_per_s
    base = median_seconds(lambda: ref.enqueue_reference(queue, ptr, keys))
    time_row(res, case, "slice (official, host sync)", base, floor)
    impls = {"index_copy_ (torch path)": "torch"}
    if extension_op() is not None and (not CUDA or extension_has_cuda()):
        impls["fastmoco extension"] = "cuda"
    for impl, backend in impls.items():
        replay = graphed(lambda b=backend: enqueue_(queue, ptr, keys, backend=b), calls=calls)
        t = median_seconds(replay) / calls
        label = f"{impl}, per call of {calls} in one {REPLAY}" if CUDA else f"{impl}, {REPLAY}"
        time_row(res, case, label, t, floor, baselines={"slice": base})


# ---------------------------------------------------------------------------- the step
def step_bench(res: Results) -> None:
    """One MoCo v2 training step, official vs fastmoco eager vs its CUDA graph vs the
    networks alone: the end-to-end step benchmark (fastmoco.experiments.step_bench), bf16 queue,
    ResNet-50 224 px batch 32 and ResNet-18 32 px batch 512 (CPU: its tiny size).

    The fastmoco rows go through MoCo.forward with backend=None, where a kernel failure
    falls back to the PyTorch path with only a warning: the fallback rule (Results) fails
    every row of a size measured while kernel_failures() is non-empty, and a graph row
    whose step did not end with use_graph=True fails (step_verdict). Each row records its
    spread, trust, use_graph and the step's reason.

    GPU estimate, 50 s: per size 4 rows of 13 steps (ResNet-50 at batch 32: ~30 ms a step,
    ResNet-18 32 px at 512: ~40 ms) plus model building, cuDNN's first calls and a capture,
    ~5 s a row; the Triton variants are those the check section compiled (pinned tiles)."""
    try:
        from fastmoco.experiments import step_bench as sb
    except ImportError:
        res.add("step", case="training step", note="fastmoco.experiments.step_bench not present")
        _log("  the step benchmark is not present")
        return
    if CUDA:
        sizes = (sb.Size("resnet50", 224, 32), sb.Size("resnet18", 32, 512, True))
        kw = dict(K=sb.GPU_K, steps=10, warmup=3)
    else:  # its CPU size at a quarter of the batch, one timed step: seconds, not minutes
        sizes = (sb.Size("resnet-tiny", 32, 8, True),)
        kw = dict(K=sb.CPU_K, steps=1, warmup=1)
    for size in sizes:
        for row in sb.bench_size(size, DEVICE, queues=("bf16",), **kw):
            why = step_verdict(row)
            r = res.add(
                "step",
                case=f"step {row['size']}",
                impl=row["row"],
                median_s=row["sec"],
                spread=row.get("spread"),
                trust=row.get("trust", ""),
                peak_bytes=row["peak"],
                images_per_s=row["images_per_s"],
                speedup_vs_official=row["speedup"],
                use_graph=row.get("use_graph"),
                graph_reason=row.get("graph_reason"),
                passed=not why,
                **({"why": why} if why else {}),
            )
            _log(
                f"  {r['case']:<40} {r['impl']:<40} {_fmt_time(r['median_s']):>10}  "
                f"{r['images_per_s']:.0f} img/s  {_step_result(r)}"
            )


def step_verdict(row: dict) -> str:
    """Why a step row fails, "" when it does not: a graph row must have run its graph (the
    kernel-fallback rule is applied to every row by Results.add)."""
    if row["row"].startswith("fastmoco graph") and row.get("use_graph") is not True:
        return f"the graph row ran eagerly ({row.get('graph_reason') or 'no use_graph recorded'})"
    return ""


# ---------------------------------------------------------------- subprocess sections
def seconds_left() -> float:
    """Seconds before the budget's end, less what the report needs."""
    return BUDGET_S - REPORT_S - elapsed()


def run_logged(cmd: list[str], log: Path, timeout: float, cwd: Path = ROOT):
    """(exit status or None when it ran past `timeout`, output): cmd in its own session
    (a timeout kills its whole process group, DataLoader workers too; so does this
    process's end, by SIGTERM from device_check.sh's timeout included: a new session would
    outlive the device tool's command), stdout and stderr together, appended to `log`
    under the command line."""
    timeout = max(1.0, timeout)
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc, out = None, out + f"\n[killed: ran past {timeout:.0f} s]\n"
    except BaseException:  # SystemExit from SIGTERM (main), KeyboardInterrupt
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n{out}\n[exit {rc}]\n\n")
    return rc, out


# One log for the parity, train and ddp subprocesses: the device tool returns 8 files.
SUBPROCESS_LOG = "subprocesses.log"
FALLBACK_WARNING = "kernels cannot run here"  # FusedKernels' warning (fastmoco.ops._common)


def fallback_lines(text: str) -> list[str]:
    """The lines of a subprocess's output that say a Triton kernel fell back."""
    return [line.strip() for line in text.splitlines() if FALLBACK_WARNING in line]


def verdict(res, section, case, quantity, value, want, passed, note=None) -> dict:
    """One row of the parity, train and ddp sections: what was measured against what was
    wanted."""
    row = res.add(
        section,
        case=case,
        quantity=quantity,
        value=value,
        want=want,
        passed=passed,
        **({"note": note} if note else {}),
    )
    shown = f"{value:.3e}" if isinstance(value, float) else str(value)
    _log(f"  {case:<44} {quantity:<22} {shown:<28} {_verdict_word(row)}")
    return row


def _verdict_word(row: dict) -> str:
    if row.get("passed") is None:
        return "skipped" + (f": {row['note']}" if row.get("note") else "")
    return "ok" if row["passed"] else "FAIL" + (f": {row['note']}" if row.get("note") else "")


def step_parity(res: Results) -> None:
    """Graph == eager for every method: `pytest tests/test_step.py -m gpu` in a subprocess
    (tests/test_step.py's GPU tests: each method's graph replays against its eager steps,
    a replay following a changing lr, fp16 refused, a failed capture falling back to the
    eager run), one row per test from its JUnit report, and a failing row when the tests'
    output carries a kernel fallback warning (their backend=None ops would then compare
    the PyTorch path with itself). CPU: one CPU parity test, the same machinery.

    GPU estimate, 50 s: pytest's start and torch's import ~10 s; 6 methods x 40 steps of
    2-block models plus a capture each, ~2 s a method; the Triton variants of the tests'
    tiny widths (C=16: the MoCo, in-batch, NT-Xent and EMA kernels, one pinned tile each)
    ~5 x 4 s, sharing this run's TRITON_CACHE_DIR."""
    log = res.out / SUBPROCESS_LOG
    with tempfile.TemporaryDirectory(prefix="fastmoco-parity-") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "tests/test_step.py", *SIZES["parity"], "-q",
               "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}"]  # fmt: skip
        rc, out = run_logged(cmd, log, seconds_left())
        cases = junit_cases(junit) if junit.is_file() else []
    for name, outcome, seconds, detail in cases:
        passed = {"passed": True, "skipped": None}.get(outcome, False)
        note = detail if outcome != "passed" else None
        verdict(
            res, "parity", name, "pytest", f"{outcome} ({seconds:.1f} s)", "passed", passed, note
        )
    if not cases or rc not in (0, 5) and all(c[1] in ("passed", "skipped") for c in cases):
        state = "ran past its time" if rc is None else f"exit status {rc}"
        res.add(
            "parity",
            case="pytest tests/test_step.py",
            error=f"{state}, "
            f"{len(cases)} tests reported: see subprocesses.log; {out.strip()[-300:]}",
        )
    lines = fallback_lines(out)
    verdict(
        res,
        "parity",
        "pytest tests/test_step.py",
        "kernel fallbacks",
        len(lines),
        0,
        not lines,
        "; ".join(lines)[:300] or None,
    )


def junit_cases(path: Path) -> list[tuple[str, str, float, str]]:
    """(test name, passed | failure | error | skipped, seconds, message) of a JUnit report."""
    import xml.etree.ElementTree as ET

    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, detail = tag, (found.get("message") or "").strip()[:300]
                break
        cases.append((case.get("name", "?"), outcome, float(case.get("time") or 0), detail))
    return cases


WINDOW = re.compile(r"^step (\d+) \| epoch \d+/\d+ \d+/\d+ \| loss (\S+) \|", re.M)
EPOCH = re.compile(r"^epoch (\d+)/\d+: loss (\S+?)(?:, kNN top-1 ([^%]+)%)? \(", re.M)
# "resume: RUN/checkpoint.pt (saved after step 20): continuing at epoch 3, step 1"
RESUMED = re.compile(
    r"^resume: .*\(saved after step (\d+)\): continuing at epoch (\d+), step 1$", re.M
)


def train_end_to_end(res: Results) -> None:
    """`fastmoco train` as a user runs it, twice: the demo preset on a small demo set
    (fastmoco.data.demo: on GPU 320 + 70 images of 64 px, 10 steps of batch 32 an epoch, K=64;
    CPU: 160 + 40 of 32 px, batch 16, K=32), --amp --cuda-graph on (CPU: off), the torch
    loader with workers, 2 epochs with a kNN pass after each and checkpoints every 6 steps
    (between replays: the graph is captured at step 4), then --resume for a third epoch,
    which captures a new graph.

    Checked from the output (subprocesses.log) and the run directory: both exit 0; both
    `step:` lines say "CUDA graph" and no capture failed (CPU: "eager (--cuda-graph off)");
    no kernel fell back; checkpoint.prev.pt of the first run was saved mid-epoch after the
    capture; each epoch line has a finite loss and a kNN top-1; the resume line names
    epoch 3 and step 20; every logged loss (a window of 2 steps) is finite, and the windows
    after the queue has filled once fall: the mean of their last third below that of
    their first third.

    GPU estimate, 45 s: drawing 390 images ~1 s (0.8 s on this project's CPU machine); per
    run ~8 s of imports and CUDA/cuDNN start, loader workers ~2 s, the capture ~2 s, 10-20
    steps of ResNet-tiny at 32 px (ms each) and a kNN pass per epoch over 70 + 320 images
    (~1 s each)."""
    from fastmoco.data.demo import DemoSpec, write_demo
    from fastmoco.engine.checkpoint import load_checkpoint

    cfg = SIZES["train"]
    log = res.out / SUBPROCESS_LOG
    train = [sys.executable, "-m", "fastmoco", "train"]
    common = ["--device", DEVICE.type, "--workers", str(cfg["workers"]),
              "--cuda-graph", "on" if CUDA else "off"]  # fmt: skip
    recipe = (f"--preset demo --epochs 2 --amp --loader torch --batch-size {cfg['batch']} "
              f"--queue-size {cfg['K']} --lr 0.06 --lr-scaling none --knn-every 1 "
              "--save-every 6 --log-every 2 --seed 0").split()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fastmoco-train-") as tmp:
        data = write_demo(Path(tmp) / "demo", 0, DemoSpec(**cfg["spec"]), progress=False)
        run = Path(tmp) / "run"
        first = [*train, *recipe, "--data", str(data), "--out", str(run), *common]
        rc1, out1 = run_logged(first, log, seconds_left())
        verdict(res, "train", "run 1: 2 epochs", "exit status", rc1, 0, rc1 == 0,
                None if rc1 == 0 else out1.strip()[-300:])  # fmt: skip
        if rc1 != 0:
            return
        saved = load_checkpoint(run / "checkpoint.prev.pt")  # now: run 2 rotates the chain
        second = [*train, "--resume", str(run), "--epochs", "3", *common]
        rc2, out2 = run_logged(second, log, seconds_left())
    verdict(res, "train", "run 2: --resume, epoch 3", "exit status", rc2, 0, rc2 == 0,
            None if rc2 == 0 else out2.strip()[-300:])  # fmt: skip
    for row in train_checks(out1, out2 if rc2 == 0 else "", saved, cfg["K"] // cfg["batch"]):
        verdict(res, "train", *row)


def train_checks(out1: str, out2: str, saved: dict, fill_steps: int) -> list[tuple]:
    """(case, quantity, value, want, passed, note) of train_end_to_end's checks (its doc),
    from the two runs' output and the first run's checkpoint.prev.pt; fill_steps: the steps
    after which the queue holds only keys of this run (K / batch). Both runs take 10 steps
    an epoch: 2 epochs, then the third resumed, 15 windows of 2 steps logged."""
    rows = []

    def add(case, quantity, value, want, passed, note=None):
        rows.append((case, quantity, value, want, bool(passed), note))

    want_step = "step: CUDA graph" if CUDA else "step: eager (--cuda-graph off)"
    for name, out in (("run 1", out1), ("run 2", out2)):
        # one line: a capture that failed would print a second, "step: eager (capture failed"
        lines = [x for x in out.splitlines() if x.startswith("step: ")]
        ok = len(lines) == 1 and lines[0].startswith(want_step)
        add(name, "step line", " / ".join(lines)[:200] or "none", want_step, ok)
    both = out1 + out2
    lines = fallback_lines(both)
    add("runs 1 and 2", "kernel fallbacks", len(lines), 0, not lines, "; ".join(lines)[:300])
    step, mid = saved.get("global_step", 0), saved.get("step_in_epoch", 0)
    add("run 1: checkpoint.prev.pt", "saved after (step, of its epoch)", f"{step}, {mid}",
        "mid-epoch, after step 4", mid > 0 and step > 4)  # fmt: skip
    epochs = {int(m[1]): (m[2], m[3]) for m in EPOCH.finditer(both)}
    shown = "; ".join(f"{e}: loss {v[0]}, kNN {v[1]}" for e, v in sorted(epochs.items()))
    ok = sorted(epochs) == [1, 2, 3] and all(_finite(a) and _finite(b) for a, b in epochs.values())
    add("epochs 1-3", "epoch loss, kNN top-1 %", shown or "none", "finite, a kNN pass each", ok)
    got = RESUMED.search(out2)
    add("run 2", "resume line", f"after step {got[1]}, at epoch {got[2]}" if got else "none",
        "after step 20, at epoch 3", got and (got[1], got[2]) == ("20", "3"))  # fmt: skip
    windows = [(int(s), float(v) if _finite(v) else math.nan) for s, v in WINDOW.findall(both)]
    n_finite = sum(math.isfinite(v) for _, v in windows)
    add("steps 1-30", "windows of finite loss", f"{n_finite} of {len(windows)}", "15 of 15",
        n_finite == len(windows) == 15)  # fmt: skip
    late = [v for s, v in windows if s > fill_steps]
    third = len(late) // 3
    if third and n_finite == len(windows):
        a, b = sum(late[:third]) / third, sum(late[-third:]) / third
        add("steps 1-30", "loss, first -> last third", f"{a:.4f} -> {b:.4f}", "falling", b < a)
    else:
        add("steps 1-30", "loss, first -> last third", "too few finite windows", "falling", False)
    return [(*r[:5], r[5] or None) for r in rows]


def _finite(text) -> bool:
    try:
        return text is not None and math.isfinite(float(text))
    except ValueError:
        return False


def ddp_section(res: Results) -> None:
    """DDP under capture: one rank (world_size 1, a file:// store) of NCCL on the GPU, gloo
    on CPU, in a subprocess (a hung collective costs its timeout, not the call). A tiny
    MoCo v2 (shuffle BN over 2 groups, K=64), encoder_q wrapped in DDP inside the step's
    ddp_context, 16 steps at a changing lr: eager without DDP, eager under DDP and (GPU)
    graphed under DDP after 11 eager warm-up steps. Rows: DDP eager against plain eager,
    DDP graph against DDP eager (relative norm error of the parameters and of their
    change over the run, queue exact in pointer), the graph ran, no kernel fell back.

    What one rank cannot show: that ranks agree on capture (TrainStep._agree, tested on
    CPU with two gloo ranks) and a multi-rank all-reduce inside the graph; bench/README.md
    gives the reasoning from torch's and NCCL's documents.

    GPU estimate, 20 s: imports ~8 s, NCCL's start ~3 s, 3 x 16 steps of a 2-layer ResNet
    at 16 px and one capture."""
    with tempfile.TemporaryDirectory(prefix="fastmoco-ddp-") as tmp:
        result = Path(tmp) / "ddp.json"  # the worker's file:// store goes beside it
        cmd = [sys.executable, str(Path(__file__).resolve()), "--ddp-worker", str(result)]
        cmd += [] if CUDA else ["--cpu"]
        rc, out = run_logged(cmd, res.out / SUBPROCESS_LOG, min(120.0, seconds_left()))
        got = json.loads(result.read_text()) if rc == 0 and result.is_file() else None
    if got is None:
        state = "ran past its time" if rc is None else f"exit status {rc}"
        res.add("ddp", case="DDP worker", error=f"{state}: {out.strip()[-400:]}")
        return
    backend = got["backend"]
    for name, errs in got["compare"].items():
        for quantity, err in errs.items():
            tol = DDP_TOL[quantity]
            verdict(
                res, "ddp", f"{backend}, 1 rank: {name}", quantity, err, f"<= {tol:.0e}", err <= tol
            )
    if "graph" in got:
        g = got["graph"]
        verdict(
            res,
            "ddp",
            f"{backend}, 1 rank: graphed step",
            "use_graph, warm-up steps",
            f"{g['use_graph']}, {g['warmup_steps']}",
            "True, 11",
            g["use_graph"] is True and g["warmup_steps"] == 11,
            g["reason"],
        )
    fails = got["kernel_failures"]
    verdict(
        res,
        "ddp",
        f"{backend}, 1 rank",
        "kernel fallbacks",
        len(fails),
        0,
        not fails,
        str(fails)[:300] if fails else None,
    )


# Parameters after 16 steps: the same kernels in the same order, up to the order of
# reductions (atomics) on the GPU; their change over the run, looser (a smaller norm);
# the queue pointer exact.
DDP_TOL = {"parameters": 1e-4, "parameter change": 1e-2, "queue": 1e-2, "queue pointer": 0.0}


def ddp_worker(result: Path) -> None:
    """The ddp section's process (see ddp_section): writes {backend, compare, graph,
    kernel_failures} as JSON to `result`."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastmoco.config import TrainConfig
    from fastmoco.engine.optim import build_optimizer
    from fastmoco.engine.step import TrainStep
    from fastmoco.models import build_model

    backend = "nccl" if CUDA else "gloo"
    if CUDA:
        torch.cuda.set_device(0)
    store = result.parent / "store"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    cfg = TrainConfig(
        seed=0,
        arch="resnet-tiny",
        small_images=True,
        dim=16,
        mlp_hidden=32,
        crop_size=16,
        batch_size=8,
        queue_size=64,
        bn_splits=2,
        moco_m=0.9,
        temperature=0.2,
    )
    g = torch.Generator().manual_seed(1)
    steps = SIZES["ddp_steps"]
    batches = [torch.randn(2, 8, 3, 16, 16, generator=g).to(DEVICE) for _ in range(steps)]

    def train(ddp: bool, graph: bool):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg).to(DEVICE).train()
        opt = build_optimizer(
            "sgd",
            model.encoder_q.parameters(),
            lr=0.03,
            momentum=0.9,
            weight_decay=1e-4,
            graph_safe=True,  # the same optimizer (torch's fused SGD on CUDA) in every run
        )
        step = TrainStep(
            model, opt, device=DEVICE, cuda_graph="on" if graph else "off", warmup_steps=11
        )
        start = [p.detach().clone() for p in model.query_encoder().parameters()]
        if ddp:
            with step.ddp_context():
                ids = [DEVICE.index or 0] if CUDA else None
                model.encoder_q = DDP(model.encoder_q, device_ids=ids)
        for t, x in enumerate(batches):
            step(x[0], x[1], lr=0.01 * (1 + t % 3))  # a changing lr: read at every replay
        sync()
        params = [p.detach().clone() for p in model.query_encoder().parameters()]
        return dict(
            start=start,
            params=params,
            queue=model.queue.detach().clone(),
            ptr=int(model.queue_ptr),
            step=step,
        )

    def compare(a, b) -> dict:
        flat = lambda ts: torch.cat([t.flatten().double() for t in ts])  # noqa: E731
        change = lambda r: flat(r["params"]) - flat(r["start"])  # noqa: E731
        return {
            "parameters": rel_err(flat(a["params"]), flat(b["params"])),
            "parameter change": rel_err(change(a), change(b)),
            "queue": rel_err(a["queue"], b["queue"]),
            "queue pointer": float(a["ptr"] != b["ptr"]),
        }

    try:
        plain, eager = train(ddp=False, graph=False), train(ddp=True, graph=False)
        out = {"backend": backend, "compare": {"DDP eager vs eager": compare(eager, plain)}}
        if CUDA:
            graphed = train(ddp=True, graph=True)
            out["compare"]["DDP graph vs DDP eager"] = compare(graphed, eager)
            s = graphed["step"]
            out["graph"] = dict(
                use_graph=s.use_graph and s._graph is not None,
                warmup_steps=s.warmup_steps,
                reason=s.reason,
            )
        out["kernel_failures"] = {
            op: {str(k): v for k, v in kinds.items()} for op, kinds in kernel_failures().items()
        }
        result.write_text(json.dumps(out, indent=1))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- env and report


def env_section(res: Results) -> dict:
    import triton

    info = {
        "device": torch.cuda.get_device_name() if CUDA else f"CPU ({platform.machine()})",
        "mode": "GPU" if CUDA else "CPU (Triton interpreter, tiny sizes)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": triton.__version__,
        "python": platform.python_version(),
        "commit": measure.git_commit(),
        "pin_tiles": os.environ.get("FASTMOCO_PIN_TILES"),
        # fp32 dots follow torch's flag: TF32 on gives ~1e-3 errors, above the fp32 tolerance.
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "install": ARGS.install or "not run by device_check.sh",
        "extension": "absent"
        if extension_op() is None
        else ("with CUDA" if extension_has_cuda() else "CPU only"),
    }
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        info["sms"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    res.add("env", **info)
    for key, value in info.items():
        _log(f"  {key}: {value}")
    return info


def compiled_variants() -> dict[str, int]:
    """Kernels compiled this run, by name: cubins in this run's Triton cache folder."""
    counts: dict[str, int] = {}
    for cubin in Path(os.environ["TRITON_CACHE_DIR"]).rglob("*.cubin"):
        counts[cubin.stem] = counts.get(cubin.stem, 0) + 1
    return counts


def _fmt_time(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def _cell(text) -> str:
    """Text for one markdown table cell: no pipes or line breaks."""
    return str(text).replace("|", "/").replace("\n", " ")


def _fallback_result(r: dict) -> str:
    if not r.get("kernel_failures"):
        return "ok"
    named = "; ".join(
        f"{op} {kind}: {cause}"
        for op, kinds in r["kernel_failures"].items()
        for kind, cause in kinds.items()
    )
    return _cell(f"FAIL: kernel fallback ({named})"[:300])


def _step_result(r: dict) -> str:
    """A step row's verdict, with its step's path and why, and the row's trust flag."""
    if r.get("kernel_failures"):
        return _fallback_result(r)
    text = "ok" if r.get("passed", True) else f"FAIL: {r.get('why', '')}"
    if r.get("use_graph") is not None:
        text += f" ({'graph' if r['use_graph'] else 'eager'}: {r.get('graph_reason')})"
    if r.get("trust"):
        text += f"; not trustworthy: {r['trust']}"
    return _cell(text)


def markdown(res: Results, info: dict, wall: float) -> str:
    since = os.environ.get("DEVICE_CHECK_START")  # set by device_check.sh
    if not info:
        info = {"device": "(env section not run)"}
    lines = [
        f"Device check on {info.get('device')}, {info.get('mode')}: torch {info.get('torch')}, "
        f"CUDA {info.get('cuda')}, Triton {info.get('triton')}, Python {info.get('python')}, "
        f"commit {info.get('commit')}; install: {info.get('install')}; extension "
        f"{info.get('extension')}; FASTMOCO_PIN_TILES={info.get('pin_tiles')}; "
        f"{sum(compiled_variants().values())} Triton variants compiled; wall {wall:.0f} s"
        + (f" ({time.time() - float(since):.0f} s with the install)." if since else "."),
        "",
        "error: ||out - ref|| / ||ref|| against float64; for rank the share of rows whose rank "
        "differs; for enqueue the number of elements (and pointer) that differ.",
        "",
        "| check | quantity | error | tol | result |",
        "|---|---|---|---|---|",
    ]
    for r in res.rows:
        if r["section"] == "check":
            err = "-" if r.get("rel_err") is None else f"{r['rel_err']:.2e}"
            tol = "-" if r.get("tol") is None else f"{r['tol']:.0e}"
            verdict = "ERROR " + r["error"] if "error" in r else ("ok" if r["passed"] else "FAIL")
            lines.append(
                f"| {r.get('case')} | {r.get('quantity', '-')} | {err} | {tol} | {verdict} |"
            )
    lines += [
        "",
        "| case | impl | median | floor | x floor | speed-up | peak extra MiB | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res.rows:
        if r["section"] not in ("time", "step") or "skipped" in r:
            continue
        if "value" in r:  # ceilings and ratios
            v = r["value"]
            text = {"B/s": f"{v / 1e9:.1f} GB/s", "flop/s": f"{v / 1e12:.2f} TFLOP/s"}.get(
                r.get("unit"), f"{v:.2f}x"
            )
            lines.append(f"| {r['case']} | {r['impl']} | {text} | | | | | |")
            continue
        if "error" in r or "note" in r:
            lines.append(
                f"| {r.get('case')} | {r.get('impl', '-')} | "
                f"{r.get('error') or r.get('note')} | | | | | |"
            )
            continue
        speed = ", ".join(
            f"{v:.2f}x vs {k[len('speedup_vs_') :]}"
            for k, v in r.items()
            if k.startswith("speedup_vs_")
        )
        xf = f"{r['x_floor']:.2f}" if r.get("x_floor") else "-"
        peak = "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.2f}"
        result = _step_result(r) if r["section"] == "step" else _fallback_result(r)
        lines.append(
            f"| {r['case']} | {r['impl']} | {_fmt_time(r['median_s'])} | "
            f"{_fmt_time(r.get('floor_s'))} | {xf} | {speed or '-'} | {peak} | {result} |"
        )
    verdicts = [
        r for r in res.rows if r["section"] in ("parity", "train", "ddp") and "quantity" in r
    ]
    if verdicts:
        lines += [
            "",
            "| section | check | quantity | measured | want | result |",
            "|---|---|---|---|---|---|",
        ]
        for r in verdicts:
            v = r["value"]
            shown = f"{v:.2e}" if isinstance(v, float) else str(v)
            lines.append(
                f"| {r['section']} | {r['case']} | {r['quantity']} | {_cell(shown)} | "
                f"{_cell(r['want'])} | {_cell(_verdict_word(r))} |"
            )
    skipped = [r for r in res.rows if "skipped" in r]
    if skipped:
        lines += ["", "Sections skipped (the time budget):"]
        lines += [f"- {r['section']} {r['case']}: {r['skipped']}" for r in skipped]
    errors = [r for r in res.rows if "error" in r]
    if errors:
        lines += ["", "Sections that raised:"]
        lines += [f"- {r['section']} {r.get('case', '')}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def main() -> int:
    if ARGS.ddp_worker:
        ddp_worker(Path(ARGS.ddp_worker))
        return 0
    # timeout's SIGTERM as SystemExit, so that run_logged ends the section's subprocess
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    start = time.perf_counter()
    out = Path(ARGS.out or os.environ.get("OUT") or ROOT / "bench" / "out")
    res = Results(out)
    (out / SUBPROCESS_LOG).unlink(missing_ok=True)
    sections = set(ARGS.sections.split(","))
    info: dict = {}
    ceil = Ceilings()

    def run(section: str, name: str, fn, *args):
        if section not in sections:
            return
        _log(f"== {section}: {name}")
        if elapsed() > LAST_START_S:
            why = (
                f"{elapsed():.0f} s of the {BUDGET_S:.0f} s budget gone; no section starts "
                f"after {LAST_START_S:.0f} s"
            )
            res.add(section, case=name, skipped=why)
            _log(f"  skipped: {why}")
            return
        t0 = time.perf_counter()
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001  (recorded, and the run goes on)
            traceback.print_exc()
            res.add(section, case=name, error=f"{type(err).__name__}: {err}"[:500])
        _log(f"   ({time.perf_counter() - t0:.1f} s)")

    if "env" in sections:
        _log("== env")
        info = env_section(res)
    run("check", "MoCo single pass", check_moco, res)
    run("check", "general path", check_general, res)
    run("check", "in-batch and NT-Xent", check_in_batch_and_nt_xent, res)
    run("check", "momentum update", check_ema, res)
    run("check", "enqueue", check_enqueue, res)
    run("time", "ceilings", time_ceilings, res, ceil)
    run("time", "info_nce", time_info_nce, res, ceil)
    run("time", "momentum update", time_ema, res, ceil)
    run("time", "enqueue", time_enqueue, res, ceil)
    run("parity", "graph == eager (tests/test_step.py)", step_parity, res)
    run("step", "training step", step_bench, res)
    run("train", "fastmoco train, then --resume", train_end_to_end, res)
    run("ddp", "DDP, one rank, under capture", ddp_section, res)
    variants = compiled_variants()
    res.add("env", case="compiled Triton variants", total=sum(variants.values()), by=variants)
    wall = time.perf_counter() - start
    res.add("env", case="wall time", seconds=wall)
    table = markdown(res, info, wall)
    (out / "results.md").write_text(table)
    _log("\n" + table)
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())
