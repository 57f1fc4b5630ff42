"""`fastmoco lincls`: the frozen backbone, the protocol, exact resume, two ranks, official
checkpoints in, and a trained backbone ahead of a random one."""

import json

import pytest
import torch
from test_checkpoint_io import fastmoco_checkpoint, official_moco_checkpoint

from fastmoco.cli import main
from fastmoco.config import TrainConfig
from fastmoco.data import DemoSpec, write_demo
from fastmoco.engine import train
from fastmoco.engine.distributed import launch
from fastmoco.eval.lincls import LinclsConfig, LinearProbe, _lincls_rank, lincls
from fastmoco.models import MoCo

# What the test checkpoints record: the 16-px crops the probes below run at (a probe at
# another crop than the checkpoint's is refused without --override-checkpoint-settings).
TINY = dict(arch="resnet-tiny", crop_size=16)


def probe_cfg(pretrained, data, out, **kw) -> LinclsConfig:
    base = LinclsConfig(
        preset="test",
        pretrained=str(pretrained),
        data=str(data),
        out=str(out),
        epochs=2,
        lr_steps=(1,),
        batch_size=12,
        lr=0.1,
        crop_size=16,
        crop_scale=(0.5, 1.0),
        workers=0,
        device="cpu",
        progress=False,
    )
    return base.replace(**kw)


def _backbone(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def test_backbone_frozen_protocol_and_exact_resume(tiny_data, tmp_path):
    """BN statistics included, the backbone is bit-identical after training (bf16 autocast
    and channels_last on); only fc is optimised; lr x0.1 at the step; resume is exact."""
    src = fastmoco_checkpoint(tmp_path / "pre.pt", **TINY)  # random BN stats
    want = {k[len("backbone.") :]: v for k, v in src["encoder_q"].items() if "backbone." in k}
    opts = dict(amp=True, channels_last=True)
    res = lincls(probe_cfg(tmp_path / "pre.pt", tiny_data, tmp_path / "full", **opts))
    ck = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    got = _backbone(ck["state_dict"])
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert ck["optimizer"]["param_groups"][0]["params"] == [0, 1]  # fc.weight, fc.bias
    assert ck["state_dict"]["fc.weight"].shape == (3, 128)
    assert abs(ck["state_dict"]["fc.bias"]).sum() > 0  # trained from its zero init
    assert [h["lr"] for h in res["history"]] == pytest.approx([0.1, 0.01])
    assert all(0 <= h["top1"] <= h["top5"] <= 100 for h in res["history"])
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["top1"] for r in recs] == [h["top1"] for h in res["history"]]

    # one epoch, then resume to two: the same fc, optimizer and history as the unbroken run
    half = tmp_path / "half"
    lincls(probe_cfg(tmp_path / "pre.pt", tiny_data, half, epochs=1, **opts))
    lincls(probe_cfg(tmp_path / "pre.pt", tiny_data, half, resume="auto", **opts))
    ck2 = torch.load(half / "checkpoint.pt", weights_only=False)
    for k in ("fc.weight", "fc.bias"):
        assert torch.equal(ck["state_dict"][k], ck2["state_dict"][k]), k
    assert [h["top1"] for h in ck2["history"]] == [h["top1"] for h in ck["history"]]


def test_sanity_check_catches_bn_in_train_mode(tiny_data, tmp_path):
    """The check can fail: with BN left in train mode, its running statistics move."""
    fastmoco_checkpoint(tmp_path / "pre.pt", **TINY)
    probe = LinearProbe(
        probe_cfg(tmp_path / "pre.pt", tiny_data, tmp_path / "o"), tiny_data, tmp_path / "o"
    )
    probe.sanity_check()
    probe.backbone.eval = lambda: probe.backbone.train(True)  # what the protocol forbids
    probe.train_epoch()
    with pytest.raises(RuntimeError, match="changed the frozen backbone: .*running_"):
        probe.sanity_check()
    probe.log.close()


def test_official_checkpoint_in_lincls_and_knn(tiny_data, tmp_path, capsys):
    q = official_moco_checkpoint(tmp_path / "moco_v2_200ep.pth.tar")
    args = ["--pretrained", str(tmp_path / "moco_v2_200ep.pth.tar"), "--data", str(tiny_data)]
    args += ["--workers", "0", "--device", "cpu", "--crop-size", "32"]
    code = main(["lincls", *args, "--epochs", "1", "--batch-size", "12", "--lr", "0.1",
                 "--out", str(tmp_path / "lc"), "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "moco layout, resnet18, epoch 200" in out
    assert ("dropped (projection head): module.encoder_q.fc.0.weight, module.encoder_q.fc.0.bias, "
            "module.encoder_q.fc.2.weight, module.encoder_q.fc.2.bias") in out  # fmt: skip
    assert "dropped (key encoder): module.encoder_k.* (" in out
    assert "dropped (queue): module.queue, module.queue_ptr" in out
    assert "missing: fc.weight, fc.bias (re-initialised" in out
    ck = torch.load(tmp_path / "lc" / "checkpoint.pt", weights_only=False)
    for k, v in q.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(ck["state_dict"][k], v), k
    code = main(["knn", *args, "--k", "5"])
    out = capsys.readouterr().out
    assert code == 0 and "kNN top-1:" in out and "moco layout" in out


def test_cli_errors(tiny_data, tmp_path, capsys):
    fastmoco_checkpoint(tmp_path / "pre.pt", **TINY)
    base = ["lincls", "--pretrained", str(tmp_path / "pre.pt"), "--workers", "0"]
    base += ["--device", "cpu", "--out", str(tmp_path / "o"), "--no-progress"]
    code = main([*base, "--data", str(tiny_data / "train")])
    assert code == 2 and "needs labelled train/ and val/" in capsys.readouterr().err
    code = main([*base, "--data", str(tiny_data), "--batch-size", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "larger than the train split (36 images" in err
    code = main([*base, "--data", str(tiny_data), "--arch", "resnet50"])
    assert code == 2 and "drop --arch" in capsys.readouterr().err
    code = main([*base[:2], str(tiny_data), *base[3:], "--data", str(tiny_data)])
    assert code == 2 and "a directory with no checkpoint.pt" in capsys.readouterr().err


def test_two_ranks_match_one_process(tiny_data, tmp_path):
    """--gpus 2 semantics on gloo: each rank half the global batch, fc's gradients
    all-reduced by DDP, val counts summed: the same fc and accuracies as one process."""
    norm = dict(mean=(0.5,) * 3, std=(0.25,) * 3)
    fastmoco_checkpoint(tmp_path / "pre.pt", **TINY, **norm)
    one = probe_cfg(tmp_path / "pre.pt", tiny_data, tmp_path / "w1", epochs=1, **norm)
    lincls(one)
    two = one.replace(out=str(tmp_path / "w2"), gpus=2)
    (tmp_path / "w2").mkdir()
    launch(_lincls_rank, (two, str(tiny_data), str(tmp_path / "w2"), None), nprocs=2,
           device="cpu")  # fmt: skip
    a = torch.load(tmp_path / "w1" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "w2" / "checkpoint.pt", weights_only=False)
    for k in ("fc.weight", "fc.bias"):
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-5, atol=1e-6)
    assert a["history"][0]["top1"] == b["history"][0]["top1"]
    assert a["history"][0]["top5"] == b["history"][0]["top5"]


def test_trained_backbone_ahead_of_random(tmp_path):
    """A short MoCo pre-training on a small demo set (10 shapes, 100 train / 30 val images
    each, 32 px) against its own random init, same protocol: the trained backbone is ahead.

    Measured in this setting (kNN monitor on, which changes no weights): random 10.0 %
    (chance: its features have norm ~0.4, fc barely moves), trained 16.7 % after 3
    pre-training epochs (45 steps)."""
    spec = DemoSpec(image_size=32, n_train_per_class=100, n_val_per_class=30)
    data = write_demo(tmp_path / "demo", seed=0, spec=spec, progress=False)
    cfg = TrainConfig(
        preset="test",
        arch="resnet-tiny",
        small_images=True,
        dim=64,
        mlp_hidden=128,
        queue_size=512,
        moco_m=0.9,
        bn_splits=4,
        crop_size=32,
        crop_scale=(0.5, 1.0),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        workers=0,
        epochs=3,
        batch_size=64,
        lr=0.06,
        weight_decay=5e-4,
        knn_every=0,
        data=str(data),
        out=str(tmp_path / "pre"),
        progress=False,
        device="cpu",
        seed=1,
    )
    train(cfg)
    trained = torch.load(tmp_path / "pre" / "checkpoint.pt", weights_only=False)
    torch.manual_seed(cfg.seed)  # the trained run's own starting point
    init = MoCo(
        cfg.arch, dim=cfg.dim, K=cfg.queue_size, mlp_hidden=cfg.mlp_hidden, small_images=True
    )
    torch.save({**trained, "encoder_q": init.encoder_q.state_dict()}, tmp_path / "random.pt")
    top1 = {}
    for name, ckpt in (
        ("random", tmp_path / "random.pt"),
        ("trained", tmp_path / "pre" / "checkpoint.pt"),
    ):
        res = lincls(
            probe_cfg(
                ckpt,
                data,
                tmp_path / name,
                epochs=5,
                lr_steps=(4,),
                batch_size=64,
                lr=0.3,
                crop_size=32,
            )
        )
        top1[name] = res["top1"]
    assert top1["random"] <= 12.0, top1
    assert top1["trained"] >= top1["random"] + 5.0, top1


def test_named_sets_and_unlabelled_splits(tmp_path, capsys, monkeypatch):
    """cifar10:DIR probes train -> test; an unlabelled train split or an image list is
    refused, naming the split and what a linear probe needs."""
    from conftest import write_image_folder
    from test_sources import _skip_md5, write_cifar10

    _skip_md5(monkeypatch)
    write_cifar10(tmp_path / "cifar")
    fastmoco_checkpoint(tmp_path / "pre.pt", **TINY)
    data = f"cifar10:{tmp_path / 'cifar'}"
    res = lincls(probe_cfg(tmp_path / "pre.pt", data, tmp_path / "c", batch_size=8))
    assert len(res["history"]) == 2 and 0 <= res["history"][-1]["top1"] <= 100
    ck = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)
    assert ck["state_dict"]["fc.weight"].shape == (10, 128)  # CIFAR-10's classes

    write_image_folder(tmp_path / "d" / "val", classes=3, per_class=4)
    (tmp_path / "d" / "train").mkdir()
    for f in sorted((tmp_path / "d" / "val").rglob("*.jpg")):  # a flat, unlabelled train/
        (tmp_path / "d" / "train" / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    base = ["lincls", "--pretrained", str(tmp_path / "pre.pt"), "--device", "cpu"]
    code = main([*base, "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o1")])
    err = capsys.readouterr().err
    assert code == 2 and "train has no class labels" in err and "subdirectory per class" in err
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(f) for f in sorted((tmp_path / "d" / "val").rglob("*.jpg"))))
    code = main([*base, "--data", str(lst), "--out", str(tmp_path / "o2")])
    assert code == 2 and "needs labelled train/ and val/" in capsys.readouterr().err
