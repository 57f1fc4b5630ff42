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
around each step). Memory: CUDA, the peak allocated over setup and steps (the whole
training state: weights, optimizer, queue, activations); CPU, the peak bytes of tensors a
step creates (fastmoco/engine/memory.py, a lower bound).
"""

import statistics
import time
from dataclasses import dataclass

import torch

from fastmoco.config import TrainConfig
from fastmoco.engine.memory import peak_extra_bytes
from fastmoco.engine.official_step import OfficialMoCo, OfficialStep
from fastmoco.engine.optim import build_optimizer
from fastmoco.engine.step import TrainStep
from fastmoco.models import build_model


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


def _timed(fn, device, steps, warmup) -> float:
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
    return statistics.median(times)


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
    sec = _timed(lambda: step(x_q, x_k), device, steps, warmup)
    return dict(row="official (fp32)", sec=sec, peak=_peak(lambda: step(x_q, x_k), device))


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
    step, (x_q, x_k) = fastmoco_step(size, device, K=K, queue_dtype=queue_dtype, graph=graph)
    run = lambda: step(x_q, x_k, lr=0.03)  # noqa: E731
    sec = _timed(run, device, steps, max(warmup, step.warmup_steps + 1 if graph else warmup))
    name = f"fastmoco {'graph' if graph else 'eager'} AMP bf16, queue {queue_dtype}"
    return dict(row=name, sec=sec, peak=_peak(run, device))


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

    sec = _timed(run, device, steps, warmup)
    return dict(row="networks only (floor)", sec=sec, peak=_peak(run, device))


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

    sec = _timed(run, device, steps, max(warmup, step.warmup_steps + 1 if graph else warmup))
    mode = "graph" if graph else "eager"
    return dict(row=f"fastmoco {mode} + real loader ({loader.description.split(' ')[0]})",
                sec=sec, peak=_peak(run, device))  # fmt: skip


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
    return rows


def markdown(rows: list[dict], device_name: str) -> str:
    lines = [
        f"Device: {device_name}. One MoCo v2 training step; images/s = per-device batch / "
        "median step time.",
        "",
        "| size | step | images/s | x official | floor share | peak MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['row']} | {r['images_per_s']:.0f} | {r['speedup']:.2f} | "
            f"{100 * r['floor_share']:.0f}% | {r['peak_mib']:.0f} |"
        )
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
