"""Two gloo ranks on the CPU against one process on the same global batch."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from fastmoco.engine.distributed import launch
from fastmoco.engine.knn import build_knn_loaders, extract_features, knn_accuracy
from fastmoco.models import MoCo, build_backbone
from fastmoco.ops.distributed import world

GLOBAL_BATCH, STEPS = 8, 3


def run_moco_steps(out_dir: str, shuffle_bn: bool) -> None:
    """A few MoCo steps; rank r takes the r-th contiguous slice of each global batch."""
    rank, world_size = world()
    torch.manual_seed(0)
    # one process with 2 BN groups sees what 2 ranks with 1 group each see
    model = MoCo(
        "resnet-tiny",
        dim=16,
        K=40,
        m=0.9,
        T=0.2,
        mlp_hidden=32,
        small_images=True,
        shuffle_bn=shuffle_bn,
        bn_splits=2 // world_size,
        seed=7,
    )
    g = torch.Generator().manual_seed(123)
    x1 = torch.randn(STEPS, GLOBAL_BATCH, 3, 16, 16, generator=g)
    x2 = torch.randn(STEPS, GLOBAL_BATCH, 3, 16, 16, generator=g)
    B = GLOBAL_BATCH // world_size
    if world_size > 1:
        model.encoder_q = DDP(model.encoder_q)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for s in range(STEPS):
        loss, k, _ = model(x1[s, rank * B : (rank + 1) * B], x2[s, rank * B : (rank + 1) * B])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.momentum_update_key_encoder()
        model.dequeue_and_enqueue(k)
        global_loss = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(global_loss)
            global_loss /= world_size
        losses.append(global_loss)
    torch.save(
        {
            "queue": model.queue,
            "ptr": model.queue_ptr,
            "losses": torch.stack(losses),
            # parameters only: BN running stats are per rank, as in the official code
            "encoder_k": dict(model.encoder_k.named_parameters()),
        },
        f"{out_dir}/w{world_size}_r{rank}.pt",
    )


@pytest.mark.parametrize("shuffle_bn", [False, True])
def test_two_ranks_match_one_process(tmp_path, shuffle_bn):
    launch(run_moco_steps, (str(tmp_path), shuffle_bn), nprocs=2, device="cpu")
    r0 = torch.load(tmp_path / "w2_r0.pt")
    r1 = torch.load(tmp_path / "w2_r1.pt")
    assert torch.equal(r0["queue"], r1["queue"]) and torch.equal(r0["ptr"], r1["ptr"])
    assert int(r0["ptr"]) == (STEPS * GLOBAL_BATCH) % 40
    for name, t in r0["encoder_k"].items():
        assert torch.equal(t, r1["encoder_k"][name]), name
    # one process with 2 BN groups draws the same permutation and forms the same key groups
    run_moco_steps(str(tmp_path), shuffle_bn)
    one = torch.load(tmp_path / "w1_r0.pt")
    torch.testing.assert_close(r0["losses"], one["losses"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r0["queue"], one["queue"], rtol=1e-4, atol=1e-5)


def knn_on_ranks(out_dir: str, data: str) -> None:
    rank, world_size = world()
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet-tiny", small_images=True)
    loaders = build_knn_loaders(
        f"{data}/train",
        f"{data}/val",
        crop_size=16,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        batch_size=5,
        workers=0,
    )
    bank, labels = extract_features(backbone, loaders[0], "cpu")
    top1 = knn_accuracy(backbone, *loaders, "cpu", num_classes=3, k=5)
    path = f"{out_dir}/knn_w{world_size}_r{rank}.pt"
    torch.save({"top1": top1, "bank": bank, "labels": labels}, path)


def test_knn_shards_over_ranks(tmp_path, tiny_data):
    """Each rank encodes its shard; the gathered bank and the accuracy match one process."""
    launch(knn_on_ranks, (str(tmp_path), str(tiny_data)), nprocs=2, device="cpu")
    knn_on_ranks(str(tmp_path), str(tiny_data))
    one = torch.load(tmp_path / "knn_w1_r0.pt")
    for r in (0, 1):
        two = torch.load(tmp_path / f"knn_w2_r{r}.pt")
        assert two["top1"] == one["top1"]
        assert len(two["bank"]) == len(one["bank"]) == 36
        # rank 0 holds images 0, 2, 4, ...; rank 1 holds 1, 3, 5, ...
        order = torch.cat([torch.arange(0, 36, 2), torch.arange(1, 36, 2)])
        torch.testing.assert_close(two["bank"], one["bank"][order], rtol=1e-5, atol=1e-5)
        assert torch.equal(two["labels"], one["labels"][order])


def test_trainer_on_two_ranks(tmp_path, tiny_data):
    """The whole trainer under DDP on 2 gloo ranks: sharded data, gathered keys, one writer."""
    from conftest import tiny_train_config as tiny_cfg

    from fastmoco.engine.plan import RunPlan
    from fastmoco.engine.trainer import _train_rank

    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_data, out, epochs=1)
    plan = RunPlan(cfg, str(tiny_data / "train"), str(tiny_data / "val"), str(out), None)
    res = launch(_train_rank, (plan, None), nprocs=2, device="cpu")  # rank 0's results
    assert res["knn_random"] is not None and res["knn_final"] is not None
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    # 36 images, global batch 8: 4 steps of 8 keys each, all enqueued on every rank
    assert ck["global_step"] == 4 and int(ck["queue_ptr"]) == 32
    assert not any(k.startswith("module.") for k in ck["encoder_q"])
