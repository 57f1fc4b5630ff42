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
  step     one training step of issue 11's step benchmark, when it is present

Results go to $OUT (the device tool's folder) or bench/out/: results.jsonl (one JSON object
per row, written as it is measured), results.md (the table printed last, ready to paste
into bench/RESULTS.md). Exit status 0 when every check passed and no section failed.

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
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="CPU mode: interpreter, tiny sizes")
    p.add_argument("--out", default=None, help="results folder (default $OUT or bench/out)")
    p.add_argument("--install", default="", help="the install script's result line (env row)")
    p.add_argument(
        "--sections", default="env,check,time,step", help="comma-separated subset to run"
    )
    return p.parse_args(argv)


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

from fastmoco.engine.memory import peak_extra_bytes  # noqa: E402
from fastmoco.ops import enqueue_, info_nce, momentum_update_, nt_xent  # noqa: E402
from fastmoco.ops import reference as ref  # noqa: E402
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
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}


# ---------------------------------------------------------------- results, as they arrive
class Results:
    """Rows appended to results.jsonl one line at a time, flushed at once."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.rows: list[dict] = []
        self.file = open(out / "results.jsonl", "w", buffering=1)
        self.failed = False

    def add(self, section: str, **row) -> dict:
        row = {"section": section, **row}
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


# ---------------------------------------------------------------- the step (issue 11)
def step_bench(res: Results) -> None:
    """One MoCo v2 training step, official vs fastmoco eager vs its CUDA graph vs the
    networks alone: issue 11's step benchmark (fastmoco.engine.step_bench), bf16 queue,
    ResNet-50 224 px batch 32 and ResNet-18 32 px batch 512 (CPU: its tiny size)."""
    try:
        from fastmoco.engine import step_bench as sb
    except ImportError:
        res.add("step", case="training step", note="fastmoco.engine.step_bench not present")
        _log("  the step benchmark (issue 11) is not present")
        return
    if CUDA:
        sizes = (sb.Size("resnet50", 224, 32), sb.Size("resnet18", 32, 512, True))
        kw = dict(K=sb.GPU_K, steps=10, warmup=3)
    else:  # its CPU size at a quarter of the batch, one timed step: seconds, not minutes
        sizes = (sb.Size("resnet-tiny", 32, 8, True),)
        kw = dict(K=sb.CPU_K, steps=1, warmup=1)
    for size in sizes:
        for row in sb.bench_size(size, DEVICE, queues=("bf16",), **kw):
            r = res.add(
                "step",
                case=f"step {row['size']}",
                impl=row["row"],
                median_s=row["sec"],
                peak_bytes=row["peak"],
                images_per_s=row["images_per_s"],
                speedup_vs_official=row["speedup"],
            )
            _log(
                f"  {r['case']:<40} {r['impl']:<40} {_fmt_time(r['median_s']):>10}  "
                f"{r['images_per_s']:.0f} img/s"
            )


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
        "| case | impl | median | floor | x floor | speed-up | peak extra MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res.rows:
        if r["section"] not in ("time", "step"):
            continue
        if "value" in r:  # ceilings and ratios
            v = r["value"]
            text = {"B/s": f"{v / 1e9:.1f} GB/s", "flop/s": f"{v / 1e12:.2f} TFLOP/s"}.get(
                r.get("unit"), f"{v:.2f}x"
            )
            lines.append(f"| {r['case']} | {r['impl']} | {text} | | | | |")
            continue
        if "error" in r or "note" in r:
            lines.append(
                f"| {r.get('case')} | {r.get('impl', '-')} | "
                f"{r.get('error') or r.get('note')} | | | | |"
            )
            continue
        speed = ", ".join(
            f"{v:.2f}x vs {k[len('speedup_vs_') :]}"
            for k, v in r.items()
            if k.startswith("speedup_vs_")
        )
        xf = f"{r['x_floor']:.2f}" if r.get("x_floor") else "-"
        peak = "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.2f}"
        lines.append(
            f"| {r['case']} | {r['impl']} | {_fmt_time(r['median_s'])} | "
            f"{_fmt_time(r.get('floor_s'))} | {xf} | {speed or '-'} | {peak} |"
        )
    errors = [r for r in res.rows if "error" in r]
    if errors:
        lines += ["", "Sections that raised:"]
        lines += [f"- {r['section']} {r.get('case', '')}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def main() -> int:
    start = time.perf_counter()
    out = Path(ARGS.out or os.environ.get("OUT") or ROOT / "bench" / "out")
    res = Results(out)
    sections = set(ARGS.sections.split(","))
    info: dict = {}
    ceil = Ceilings()

    def run(section: str, name: str, fn, *args):
        if section not in sections:
            return
        _log(f"== {section}: {name}")
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
    run("step", "training step", step_bench, res)
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
