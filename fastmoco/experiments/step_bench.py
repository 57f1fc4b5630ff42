"""The end-to-end step benchmark: images per second and peak memory of one MoCo v2 training
step, fastmoco's step object against the official step (official_step.py) in the same
run. `fastmoco bench` prints it; bench/test_step.py and bench/device_check.py call it.

Rows, per size (arch, crop, per-device batch):
  official        main_moco.py's step, fp32 (the baseline)
  eager  q=fp32   fastmoco's step run eagerly: AMP bf16, channels_last on CUDA, fp32 queue
  eager  q=bf16   the same with the queue in bf16 (the fused InfoNCE on bf16 tensor cores)
  graph  q=...    the same steps captured as one CUDA graph and replayed (CUDA only)
  networks only   the floor: encoder_q forward + backward and encoder_k forward, AMP bf16,
                  nothing else (no loss, optimizer, momentum update or queue); "floor %"
                  is this time over each row's
  loader          the fastmoco step fed by the real loader (decode + augmentation), when a
                  data folder is given; the other rows use device-resident random images

Timing: median seconds per step over `steps` timed steps after `warmup` (CUDA: synchronized
around each step; measure.time_calls), with the spread of the steps. Memory: CUDA, the
peak allocated over setup and steps (the whole training state: weights, optimizer, queue,
activations); CPU, the peak bytes of tensors a step creates (measure.py, a lower bound).

A row is flagged as not trustworthy when its steps spread widely (another job took the
machine's cores while it ran) or when it runs faster than the networks-only floor (which
a step cannot: it does that work and more); the table says so under it.
"""

from dataclasses import dataclass

import torch

from fastmoco.config import TrainConfig
from fastmoco.engine.optim import build_optimizer
from fastmoco.engine.step import TrainStep
from fastmoco.models import build_model
from fastmoco.ops._common import kernel_failures

from .measure import peak_extra_bytes, time_calls
from .official_step import OfficialMoCo, OfficialStep

SPREAD_LIMIT = 0.25  # (p80 - p20) / median above this: the machine was not quiet


@dataclass(frozen=True)
class Size:
    arch: str
    crop: int
    batch: int
    small_images: bool = False

    def __str__(self):
        return f"{self.arch} {self.crop}px batch {self.batch}"


# ResNet-50 at the official per-GPU batch (32 on 8 GPUs) and at 256; ResNet-18 on CIFAR
GPU_SIZES = (Size("resnet50", 224, 32), Size("resnet50", 224, 256), Size("resnet18", 32, 512, True))
CPU_SIZES = (Size("resnet-tiny", 32, 32, True),)  # seconds on 2 cores, so CI keeps it alive
GPU_K, CPU_K = 65536, 4096


def _config(size: Size, K: int, queue_dtype: str, amp: bool) -> TrainConfig:
    """MoCo v2 at this size; bn_splits 1 (one device's BN, as the official step on it)."""
    return TrainConfig(
        arch=size.arch,
        small_images=size.small_images,
        crop_size=size.crop,
        batch_size=size.batch,
        queue_size=K,
        queue_dtype=queue_dtype,
        amp=amp,
        bn_splits=1,
        mlp_hidden=512 if size.arch == "resnet-tiny" else 2048,
    )


def _timed(fn, device, steps, warmup) -> tuple[float, float]:
    """(median seconds, spread) of one step."""
    t = time_calls(fn, device, steps=steps, warmup=warmup)
    return t.median, t.spread


def _peak(fn, device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_extra_bytes(fn, device)


def _images(size: Size, device, channels_last: bool, dtype=torch.float32):
    mf = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator(device=device).manual_seed(0)
    shape = (size.batch, 3, size.crop, size.crop)
    return [
        torch.randn(shape, device=device, generator=g).to(dtype, memory_format=mf) for _ in "qk"
    ]


def _fresh(device):
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def official_row(size: Size, device, *, K, steps, warmup) -> dict:
    _fresh(device)
    cfg = _config(size, K, "fp32", amp=False)
    model = OfficialMoCo(
        cfg.arch, K=K, T=cfg.temperature, mlp_hidden=cfg.mlp_hidden, small_images=cfg.small_images
    ).to(device)
    step = OfficialStep(model)
    x_q, x_k = _images(size, device, channels_last=False)
    sec, spread = _timed(lambda: step(x_q, x_k), device, steps, warmup)
    return dict(row="official (fp32)", sec=sec, spread=spread,
                peak=_peak(lambda: step(x_q, x_k), device))  # fmt: skip


def fastmoco_step(size: Size, device, *, K, queue_dtype: str, graph: bool, amp=True):
    """(step, inputs) of fastmoco's step object at this size; graph: --cuda-graph on."""
    cfg = _config(size, K, queue_dtype, amp)
    model = build_model(cfg).to_device(device).train()
    channels_last = amp and device.type == "cuda"  # the --amp rule (step.resolve_channels_last)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(
        "sgd", model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4
    )
    step = TrainStep(
        model, opt, device=device, amp=amp, cuda_graph="on" if graph else "off", warmup_steps=2
    )
    return step, _images(size, device, channels_last)


def fastmoco_row(size: Size, device, *, K, queue_dtype, graph, steps, warmup) -> dict:
    _fresh(device)
    failures_before = kernel_failures()
    step, (x_q, x_k) = fastmoco_step(size, device, K=K, queue_dtype=queue_dtype, graph=graph)
    run = lambda: step(x_q, x_k, lr=0.03)  # noqa: E731
    sec, spread = _timed(
        run, device, steps, max(warmup, step.warmup_steps + 1 if graph else warmup)
    )
    name = f"fastmoco {'graph' if graph else 'eager'} AMP bf16, queue {queue_dtype}"
    # A fused kernel that failed and fell back to torch makes this row time another path.
    fell_back = sorted(
        op for op, kinds in kernel_failures().items() if kinds.keys() - failures_before.get(op, {})
    )
    return dict(row=name, sec=sec, spread=spread, peak=_peak(run, device),
                use_graph=step.use_graph, graph_reason=step.reason,
                fell_back=fell_back)  # fmt: skip


def networks_row(size: Size, device, *, K, steps, warmup) -> dict:
    """The floor: the two encoders' forward (+ the query's backward), AMP bf16."""
    _fresh(device)
    step, (x_q, x_k) = fastmoco_step(size, device, K=K, queue_dtype="bf16", graph=False)
    enc_q, enc_k = step.model.encoder_q, step.model.encoder_k

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            q = enc_q(x_q)
            with torch.no_grad():
                enc_k(x_k)
        q.float().sum().backward()

    sec, spread = _timed(run, device, steps, warmup)
    return dict(row="networks only (floor)", sec=sec, spread=spread, peak=_peak(run, device))


def loader_row(size: Size, device, data, *, K, steps, warmup, graph) -> dict:
    """fastmoco's step fed by the real loader (the torch DataLoader or DALI, --loader auto)."""
    from fastmoco.data import build_train_loader

    _fresh(device)
    step, _ = fastmoco_step(size, device, K=K, queue_dtype="bf16", graph=graph)
    cl = device.type == "cuda"
    loader = build_train_loader(
        data, loader="auto", device=device, dtype=torch.bfloat16, channels_last=cl,
        recipe="v2", crop_size=size.crop, crop_scale=(0.2, 1.0), batch_size=size.batch,
        workers=4 if device.type == "cuda" else 0, seed=0, rank=0, world_size=1,
        skip_bad_images=False, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    )  # fmt: skip
    mf = torch.channels_last if cl else torch.contiguous_format
    batches = iter(_forever(loader))

    def run():
        x_q, x_k, *_ = next(batches)
        step(x_q.to(device, non_blocking=True, memory_format=mf),
             x_k.to(device, non_blocking=True, memory_format=mf), lr=0.03)  # fmt: skip

    sec, spread = _timed(
        run, device, steps, max(warmup, step.warmup_steps + 1 if graph else warmup)
    )
    mode = "graph" if graph else "eager"
    return dict(row=f"fastmoco {mode} + real loader ({loader.description.split(' ')[0]})",
                sec=sec, spread=spread, peak=_peak(run, device))  # fmt: skip


def _forever(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch, 0)
        yield from loader
        epoch += 1


def bench_size(size: Size, device, *, K, steps, warmup, data=None, queues=("fp32", "bf16")):
    """Every row of one size (module doc); each row a dict with images_per_s, the peak in
    MiB, speed-up over the official row and the floor's share of the row's time."""
    device = torch.device(device)
    kw = dict(K=K, steps=steps, warmup=warmup)
    rows = [official_row(size, device, **kw)]
    graphs = (False, True) if device.type == "cuda" else (False,)
    for graph in graphs:
        for q in queues:
            rows.append(fastmoco_row(size, device, queue_dtype=q, graph=graph, **kw))
    floor = networks_row(size, device, **kw)
    if data is not None:
        rows.append(loader_row(size, device, data, graph=graphs[-1], **kw))
    rows.append(floor)
    base = rows[0]["sec"]
    for r in rows:
        r.update(size=str(size), images_per_s=size.batch / r["sec"], peak_mib=r["peak"] / 2**20,
                 speedup=base / r["sec"], floor_share=floor["sec"] / r["sec"])  # fmt: skip
        r["trust"] = _doubt(r)
    return rows


def _doubt(row: dict) -> str:
    """ "" for a row to believe, else why not (module doc)."""
    if row.get("fell_back"):
        return "fell back to torch: " + ", ".join(row["fell_back"])
    if row["spread"] > SPREAD_LIMIT:
        return f"steps spread {100 * row['spread']:.0f}%"
    if row["floor_share"] > 1.05 and not row["row"].startswith("networks"):
        return "faster than the networks alone"
    return ""


def markdown(rows: list[dict], device_name: str) -> str:
    lines = [
        f"Device: {device_name}. One MoCo v2 training step; images/s = per-device batch / "
        "median step time; spread = (p80 - p20) / median of the timed steps.",
        "",
        "| size | step | images/s | spread | x official | floor share | peak MiB | |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        flag = f"not trustworthy: {r['trust']}" if r["trust"] else ""
        lines.append(
            f"| {r['size']} | {r['row']} | {r['images_per_s']:.0f} | {100 * r['spread']:.0f}% | "
            f"{r['speedup']:.2f} | {100 * r['floor_share']:.0f}% | {r['peak_mib']:.0f} | {flag} |"
        )
    doubtful = [r for r in rows if r["trust"]]
    if doubtful:
        lines += [
            "",
            f"{len(doubtful)} of {len(rows)} rows are not trustworthy (marked): the machine was "
            "busy while they ran. Rerun on a quiet machine (or with more --steps) before "
            "quoting them.",
        ]
    return "\n".join(lines) + "\n"


def parse_size(text: str) -> Size:
    """ "arch:crop:batch" (e.g. resnet50:224:32); crops under 64 px use the small-image stem."""
    try:
        arch, crop, batch = text.split(":")
        return Size(arch, int(crop), int(batch), small_images=int(crop) < 64)
    except ValueError:
        raise ValueError(f"--size {text!r}: write arch:crop:batch, e.g. resnet50:224:32") from None


def run_bench(device="auto", *, sizes=None, K=None, steps=None, warmup=None, data=None):
    """(rows, markdown table) for `fastmoco bench` and the device check: on CUDA the GPU
    sizes at K 65536 (20 steps after 5), on the CPU the tiny size (3 after 1)."""
    cuda = device != "cpu" and torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sizes = sizes or (GPU_SIZES if cuda else CPU_SIZES)
    K = K or (GPU_K if cuda else CPU_K)
    steps, warmup = steps or (20 if cuda else 3), warmup or (5 if cuda else 1)
    rows = []
    for size in sizes:
        rows += bench_size(size, dev, K=K, steps=steps, warmup=warmup, data=data)
    name = torch.cuda.get_device_name(dev) if cuda else f"CPU, {torch.get_num_threads()} threads"
    return rows, markdown(rows, name)
