"""Checkpoints in and out: export to torchvision / official MoCo layouts, re-import bit-exactly,
and official-layout files (built here the way facebookresearch/moco's builder names them)."""

import pytest
import torch
import torchvision
from torch import nn

from fastmoco.cli import main
from fastmoco.config import TrainConfig
from fastmoco.engine.checkpoint_io import (
    build_pretrained_backbone,
    detect_layout,
    export_checkpoint,
    infer_arch,
    read_pretrained,
)
from fastmoco.errors import UsageError
from fastmoco.models import MoCo


def _randomise_bn_stats(module: nn.Module, g: torch.Generator) -> None:
    """Fresh BN buffers are 0/1 everywhere; random ones make equality checks meaningful."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))


def fastmoco_checkpoint(path, arch="resnet18", mlp_hidden=32, small_images=False, K=40, **config):
    """A checkpoint.pt in the trainer's layout (Trainer.state()), without training; config:
    more TrainConfig fields it records (crop_size, mean, ...)."""
    cfg = TrainConfig(
        arch=arch, dim=16, mlp_hidden=mlp_hidden, queue_size=K, small_images=small_images, **config
    )
    torch.manual_seed(0)
    model = MoCo(arch, dim=16, K=K, mlp_hidden=mlp_hidden, small_images=small_images)
    g = torch.Generator().manual_seed(1)
    _randomise_bn_stats(model, g)
    with torch.no_grad():
        for p in model.encoder_k.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))  # key encoder != query encoder
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    model.encoder_q(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = {
        "config": cfg.to_dict(),
        "epoch": 7,
        "encoder_q": model.encoder_q.state_dict(),
        "encoder_k": model.encoder_k.state_dict(),
        "queue": model.queue,
        "queue_ptr": torch.tensor([24]),
        "optimizer": opt.state_dict(),
    }
    torch.save(state, path)
    return state


def official_moco_checkpoint(path, arch="resnet18", dim=16, mlp=True, K=40, prefix="module."):
    """What facebookresearch/moco main_moco.py saves: its builder makes encoder_q/encoder_k as
    torchvision.models.<arch>(num_classes=dim), wraps fc in Linear-ReLU-fc when mlp, and
    keeps a C x K queue; DDP adds 'module.'."""

    def encoder():
        net = getattr(torchvision.models, arch)(num_classes=dim)
        if mlp:
            d = net.fc.weight.shape[1]
            net.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), net.fc)
        return net

    torch.manual_seed(3)
    q, k = encoder(), encoder()
    _randomise_bn_stats(q, torch.Generator().manual_seed(4))
    sd = {f"{prefix}encoder_q.{n}": v for n, v in q.state_dict().items()}
    sd.update({f"{prefix}encoder_k.{n}": v for n, v in k.state_dict().items()})
    sd[f"{prefix}queue"] = nn.functional.normalize(torch.randn(dim, K), dim=0)
    sd[f"{prefix}queue_ptr"] = torch.zeros(1, dtype=torch.long)
    opt = torch.optim.SGD(q.parameters(), lr=0.03, momentum=0.9)
    torch.save({"epoch": 200, "arch": arch, "state_dict": sd, "optimizer": opt.state_dict()}, path)
    return q


def _split(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("mlp_hidden", [32, 0], ids=["v2-mlp-head", "v1-fc-head"])
def test_export_moco_round_trip(tmp_path, mlp_hidden):
    src = fastmoco_checkpoint(tmp_path / "checkpoint.pt", mlp_hidden=mlp_hidden)
    path, p, _ = export_checkpoint(tmp_path / "checkpoint.pt", "moco", tmp_path / "moco.pth")
    out = torch.load(path, weights_only=False)
    assert {"state_dict", "arch", "epoch", "optimizer"} <= out.keys()
    assert out["arch"] == "resnet18" and out["epoch"] == 7
    sd = out["state_dict"]
    # the official builder's names: fc for v1's head, fc.0 / fc.2 for v2's MLP
    head = {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"} if mlp_hidden else None
    assert set(_split(sd, "module.encoder_q.fc.")) == (
        {k[3:] for k in head} if head else {"weight", "bias"}
    )
    assert torch.equal(sd["module.queue"], src["queue"].T) and sd["module.queue"].shape == (16, 40)
    assert torch.equal(sd["module.queue_ptr"], src["queue_ptr"])
    opt = out["optimizer"]
    assert opt["param_groups"] == src["optimizer"]["param_groups"]
    for i, s in src["optimizer"]["state"].items():
        assert torch.equal(opt["state"][i]["momentum_buffer"], s["momentum_buffer"])

    # what the official main_lincls.py does with it: keep encoder_q minus fc, strict=False
    official = {
        k[len("module.encoder_q.") :]: v
        for k, v in sd.items()
        if k.startswith("module.encoder_q") and not k.startswith("module.encoder_q.fc")
    }
    msg = torchvision.models.resnet18().load_state_dict(official, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"} and not msg.unexpected_keys

    # re-import: every tensor bit-exact, and a second export is identical to the first
    back = read_pretrained(path)
    assert back.layout == "moco" and back.arch == "resnet18" and not back.small_images
    assert_equal_states(back.backbone, _split(src["encoder_q"], "backbone."))
    assert_equal_states(back.head, _split(src["encoder_q"], "head."))
    assert_equal_states(back.encoder_k, src["encoder_k"])
    assert torch.equal(back.queue, src["queue"])
    again, _, _ = export_checkpoint(path, "moco", tmp_path / "again.pth")
    assert_equal_states(torch.load(again, weights_only=False)["state_dict"], sd)


def test_export_torchvision_round_trip(tmp_path, capsys):
    src = fastmoco_checkpoint(tmp_path / "checkpoint.pt")
    code = main(
        [
            "export",
            "--pretrained",
            str(tmp_path / "checkpoint.pt"),
            "--format",
            "torchvision",
            "--out",
            str(tmp_path / "tv.pth"),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0 and "only fc.weight and fc.bias are missing" in text
    sd = torch.load(tmp_path / "tv.pth", weights_only=True)  # a plain state_dict
    net = torchvision.models.resnet18()
    msg = net.load_state_dict(sd, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"} and not msg.unexpected_keys
    want = _split(src["encoder_q"], "backbone.")
    assert_equal_states(sd, want)
    # re-import with no arch in the file: read off the keys (basic blocks 2-2-2-2)
    back = read_pretrained(tmp_path / "tv.pth")
    assert (back.layout, back.arch, back.small_images) == ("torchvision", "resnet18", False)
    net, _ = build_pretrained_backbone(back)
    assert_equal_states(net.state_dict(), want)


def test_export_small_images_and_tiny_say_what_they_map_to(tmp_path):
    fastmoco_checkpoint(tmp_path / "small.pt", small_images=True)
    path, p, note = export_checkpoint(tmp_path / "small.pt", "torchvision", tmp_path / "s.pth")
    assert p.small_images and "conv1 = nn.Conv2d(3, 64, 3, 1, 1" in note
    sd = torch.load(path, weights_only=True)
    net = torchvision.models.resnet18()
    net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    msg = net.load_state_dict(sd, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"}
    back = read_pretrained(path)
    assert back.arch == "resnet18" and back.small_images  # 3x3 conv1 read off the weights

    fastmoco_checkpoint(tmp_path / "tiny.pt", arch="resnet-tiny")
    path, p, note = export_checkpoint(tmp_path / "tiny.pt", "torchvision", tmp_path / "t.pth")
    assert "no torchvision counterpart" in note and "TinyResNet" in note
    assert read_pretrained(path).arch == "resnet-tiny"


def test_official_checkpoint_layouts_and_arch(tmp_path):
    q = official_moco_checkpoint(tmp_path / "moco_v2.pth.tar")
    p = read_pretrained(tmp_path / "moco_v2.pth.tar")
    assert (p.layout, p.arch, p.epoch) == ("moco", "resnet18", 200)
    want = {k: v for k, v in q.state_dict().items() if not k.startswith("fc.")}
    assert_equal_states(p.backbone, want)
    assert set(p.dropped["projection head"]) == {
        f"module.encoder_q.fc.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")
    }
    assert p.dropped["queue"] == ["module.queue", "module.queue_ptr"]
    with pytest.raises(UsageError, match="--arch resnet50 disagrees"):
        read_pretrained(tmp_path / "moco_v2.pth.tar", arch="resnet50")

    # saved without DDP (no 'module.'), v1's fc head
    official_moco_checkpoint(tmp_path / "v1.pth", mlp=False, prefix="")
    p = read_pretrained(tmp_path / "v1.pth")
    assert p.layout == "moco" and set(p.head) == {"weight", "bias"}

    # a torchvision classifier file: fc is dropped as the classifier
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    p = read_pretrained(tmp_path / "r34.pth")
    assert (p.layout, p.arch) == ("torchvision", "resnet34")
    assert p.dropped == {"classifier": ["fc.weight", "fc.bias"]}
    # MoCo v3 (ResNet): base_encoder minus its projector
    r18 = torchvision.models.resnet18().state_dict()
    sd = {f"module.base_encoder.{k}": v for k, v in r18.items()}
    sd["module.predictor.0.weight"] = torch.zeros(4, 4)
    torch.save({"arch": "resnet18", "epoch": 100, "state_dict": sd}, tmp_path / "v3.pth")
    p = read_pretrained(tmp_path / "v3.pth")
    assert p.layout == "mocov3" and "fc.weight" not in p.backbone
    assert p.dropped["predictor"] == ["module.predictor.0.weight"]


def test_bad_files_name_the_fix(tmp_path):
    with pytest.raises(UsageError, match="unrecognised checkpoint layout"):
        detect_layout({"model": torch.zeros(1)})
    with pytest.raises(UsageError, match="pass --arch"):
        infer_arch({"features.0.weight": torch.zeros(1)})
    sd = torchvision.models.resnet18().state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("layer4.1.")}  # 2-2-2-1 blocks
    with pytest.raises(UsageError, match="basic blocks 2-2-2-1"):
        infer_arch(sd)
    # the file's arch is trusted; weights of another arch then do not fit, with the fix named
    official_moco_checkpoint(tmp_path / "m.pth")
    obj = torch.load(tmp_path / "m.pth", weights_only=False)
    obj["arch"] = "resnet34"
    torch.save(obj, tmp_path / "wrong_arch.pth")
    with pytest.raises(UsageError, match="does not fit a resnet34.*--arch"):
        build_pretrained_backbone(read_pretrained(tmp_path / "wrong_arch.pth"))
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UsageError, match="does not fit a resnet34"):
        build_pretrained_backbone(read_pretrained(tmp_path / "r18.pth", arch="resnet34"))


def test_method_checkpoints_vit_and_predictor(tmp_path):
    """A MoCo v3 ViT run of ours: the predictor is reported as dropped, the ViT rebuilt at
    the run's crop size, and the export round-trips."""
    from fastmoco.models import build_vit

    vit, _ = build_vit("vit_small", image_size=32)
    _randomise_bn_stats(vit, torch.Generator().manual_seed(0))
    enc = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    enc["head.0.weight"] = torch.randn(8, 384)
    enc["predictor.0.weight"] = torch.randn(8, 8)
    cfg = TrainConfig(arch="vit_small", crop_size=32).to_dict()
    torch.save({"config": cfg, "epoch": 1, "encoder_q": enc}, tmp_path / "v3.pt")
    p = read_pretrained(tmp_path / "v3.pt")
    assert p.arch == "vit_small"
    assert p.dropped["predictor"] == ["encoder_q.predictor.0.weight"]
    net, feat_dim = build_pretrained_backbone(p)
    assert feat_dim == 384 and net(torch.randn(1, 3, 32, 32)).shape == (1, 384)
    path, _, note = export_checkpoint(tmp_path / "v3.pt", "torchvision", tmp_path / "vit.pth")
    assert "VisionTransformer" in note
    assert_equal_states(torch.load(path, weights_only=True), vit.state_dict())
