"""moco-v3 checkpoints in and out: the official ViT files (timm VisionTransformers, built
here key by key as moco-v3's vits.py names them, with a plain-PyTorch forward of timm's
ViT as the reference), the ResNet ones, and `fastmoco export --format mocov3` read the way
moco-v3's main_lincls.py reads it."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_checkpoint_io import assert_equal_states

from fastmoco.cli import main
from fastmoco.config import TrainConfig
from fastmoco.engine.checkpoint_io import (
    build_pretrained_backbone,
    export_checkpoint,
    image_settings,
    read_pretrained,
)
from fastmoco.errors import UsageError
from fastmoco.models import MoCoV3, vit
from fastmoco.models.vit import sincos_position_embedding

SMALL = (2, 4, 64, 128)  # blocks, heads, width, MLP width: a ViT-S shape scaled down
IMAGE = 32  # 2 x 2 patches


@pytest.fixture
def small_vit(monkeypatch):
    monkeypatch.setitem(vit.VIT_SIZES, "vit_small", SMALL)


def timm_vit_state(g: torch.Generator, blocks=2, width=64, mlp=128, image=IMAGE) -> dict:
    """A timm VisionTransformer's backbone state in moco-v3's names, random values."""
    n = (image // 16) ** 2

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {
        "cls_token": r(1, 1, width),
        "pos_embed": r(1, 1 + n, width),
        "patch_embed.proj.weight": r(width, 3, 16, 16) * 0.1,
        "patch_embed.proj.bias": r(width),
        "norm.weight": 1 + r(width),
        "norm.bias": r(width),
    }
    for i in range(blocks):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + r(width), b + "norm1.bias": r(width),
            b + "attn.qkv.weight": r(3 * width, width), b + "attn.qkv.bias": r(3 * width),
            b + "attn.proj.weight": r(width, width), b + "attn.proj.bias": r(width),
            b + "norm2.weight": 1 + r(width), b + "norm2.bias": r(width),
            b + "mlp.fc1.weight": r(mlp, width), b + "mlp.fc1.bias": r(mlp),
            b + "mlp.fc2.weight": r(width, mlp), b + "mlp.fc2.bias": r(width),
        })  # fmt: skip
    return sd


def timm_vit_features(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """timm's VisionTransformer.forward_features (moco-v3's ViT) from its state: patch
    conv, [cls] + patches + pos_embed, pre-norm blocks (qkv split q, k, v then heads),
    final norm, the class token."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], dim=1) + sd["pos_embed"]
    B, N, C = x.shape

    def norm(h, name):
        return F.layer_norm(h, (C,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    def linear(h, name):
        return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])

    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b = f"blocks.{i}."
        qkv = linear(norm(x, b + "norm1"), b + "attn.qkv")
        q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (C // heads) ** -0.5).softmax(dim=-1)
        x = x + linear((attn @ v).transpose(1, 2).reshape(B, N, C), b + "attn.proj")
        x = x + linear(F.gelu(linear(norm(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
        i += 1
    return norm(x, "norm")[:, 0]


def official_vit_checkpoint(path, g=None, arch="vit_small") -> dict:
    """What moco-v3's main_moco.py saves for a ViT: DDP-wrapped MoCo_ViT state, 'arch',
    'epoch', 'optimizer', 'scaler'. The projector (3 layers) and predictor (2) are
    Linear-BN-ReLU stacks; their values do not matter here, their names do."""
    g = g or torch.Generator().manual_seed(0)
    base = timm_vit_state(g)
    momentum = {k: v + 0.01 for k, v in base.items()}
    head = {"0.weight": torch.randn(32, 64, generator=g), "1.weight": torch.ones(32),
            "1.bias": torch.zeros(32), "1.running_mean": torch.zeros(32),
            "1.running_var": torch.ones(32), "1.num_batches_tracked": torch.tensor(5),
            "6.weight": torch.randn(16, 32, generator=g)}  # fmt: skip
    sd = {f"module.base_encoder.{k}": v for k, v in base.items()}
    sd.update({f"module.base_encoder.head.{k}": v for k, v in head.items()})
    sd.update({f"module.momentum_encoder.{k}": v for k, v in momentum.items()})
    sd.update({f"module.momentum_encoder.head.{k}": v for k, v in head.items()})
    sd["module.predictor.0.weight"] = torch.randn(32, 16, generator=g)
    obj = {"epoch": 300, "arch": arch, "state_dict": sd, "optimizer": {}, "scaler": {}}
    torch.save(obj, path)
    return obj


def test_vit_sizes_and_position_embedding_are_moco_v3s():
    """vits.py: ViT-S 12 blocks x 12 heads x 384 (DeiT-S has 6 heads: the same weights,
    other features), MLP ratio 4; the fixed 2-d sin-cos embedding, computed here as vits.py
    does (meshgrid 'ij' over (w, h), sin/cos of each axis, a zero class token)."""
    assert vit.VIT_SIZES["vit_small"] == (12, 12, 384, 1536)
    assert vit.VIT_SIZES["vit_base"] == (12, 12, 768, 3072)
    grid, width = 14, 384
    gw, gh = torch.meshgrid(
        torch.arange(grid.__float__()), torch.arange(float(grid)), indexing="ij"
    )
    omega = 1.0 / 10000.0 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    ow, oh = gw.flatten()[:, None] * omega, gh.flatten()[:, None] * omega
    want = torch.cat(
        [torch.zeros(1, width), torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], 1)]
    )
    torch.testing.assert_close(sincos_position_embedding(grid, width)[0], want, rtol=0, atol=1e-6)
    net, _ = vit.build_vit("vit_small", image_size=224)
    assert not net.encoder.pos_embedding.requires_grad
    torch.testing.assert_close(net.encoder.pos_embedding[0], want)


def test_official_vit_checkpoint_reads_and_computes_timms_features(tmp_path, small_vit):
    obj = official_vit_checkpoint(tmp_path / "vit-s-300ep.pth.tar")
    p = read_pretrained(tmp_path / "vit-s-300ep.pth.tar")
    assert (p.layout, p.arch, p.epoch, p.small_images) == ("mocov3", "vit_small", 300, False)
    assert set(p.dropped) == {"projector", "momentum encoder", "predictor"}
    assert p.dropped["projector"][0].startswith("module.base_encoder.head.")
    assert image_settings(p)["crop_size"] == IMAGE  # from the position embedding
    net, feat = build_pretrained_backbone(p)
    assert feat == 64

    base = {k[len("module.base_encoder.") :]: v.double() for k, v in obj["state_dict"].items()
            if k.startswith("module.base_encoder.") and ".head." not in k}  # fmt: skip
    x = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1)).double()
    want = timm_vit_features(base, x, heads=SMALL[1])
    with torch.no_grad():
        got = net.double().eval()(x)
    err = float((got - want).norm() / want.norm())
    assert err < 1e-12, err
    # the head count changes the features though not the weights' shapes: the check sees it
    other = timm_vit_features(base, x, heads=2)
    assert float((other - want).norm() / want.norm()) > 1e-3


def test_official_vit_in_knn_and_lincls(tmp_path, small_vit, capsys):
    from conftest import write_image_folder

    data = tmp_path / "d"
    write_image_folder(data / "train", classes=3, per_class=6, size=IMAGE)
    write_image_folder(data / "val", classes=3, per_class=3, size=IMAGE, seed=1)
    official_vit_checkpoint(tmp_path / "v.pth.tar")
    common = ["--pretrained", str(tmp_path / "v.pth.tar"), "--data", str(data)]
    common += ["--device", "cpu", "--workers", "0"]
    assert main(["knn", *common, "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert "mocov3 layout, vit_small, epoch 300" in out and "kNN top-1:" in out
    code = main(["lincls", *common, "--epochs", "1", "--batch-size", "9", "--crop-size",
                 str(IMAGE), "--out", str(tmp_path / "lin"), "--no-progress"])  # fmt: skip
    assert code == 0
    ck = torch.load(tmp_path / "lin" / "checkpoint.pt", weights_only=False)
    assert ck["state_dict"]["fc.weight"].shape == (3, 64)


def test_conv_stem_vit_is_refused_by_name(tmp_path, small_vit):
    obj = official_vit_checkpoint(tmp_path / "v.pth.tar", arch="vit_conv_small")
    sd = obj["state_dict"]
    sd["module.base_encoder.patch_embed.proj.0.weight"] = sd.pop(
        "module.base_encoder.patch_embed.proj.weight"
    )
    torch.save(obj, tmp_path / "conv.pth.tar")
    with pytest.raises(UsageError, match=r"patch_embed\.proj\.0\.weight.*vit_conv_small"):
        read_pretrained(tmp_path / "conv.pth.tar")


def fastmoco_v3_checkpoint(path, arch: str, image_size: int) -> dict:
    """A fastmoco MoCo v3 checkpoint.pt (encoder_q with predictor, encoder_k), no training."""
    torch.manual_seed(0)
    small = arch.startswith("resnet")
    model = MoCoV3(arch, dim=16, mlp_dim=32, small_images=small, image_size=image_size)
    with torch.no_grad():
        for t in model.encoder_k.parameters():
            t.add_(0.01)  # the momentum encoder lags the query one
    cfg = TrainConfig(method="mocov3", arch=arch, crop_size=image_size, small_images=small)
    obj = {
        "config": cfg.to_dict(),
        "epoch": 4,
        "encoder_q": model.encoder_q.state_dict(),
        "encoder_k": model.encoder_k.state_dict(),
    }
    torch.save(obj, path)
    return obj


def encoder_shapes(sd: dict) -> dict:
    """name -> shape of the base and momentum encoders' backbone tensors."""
    encoders = ("module.base_encoder.", "module.momentum_encoder.")
    return {k: v.shape for k, v in sd.items() if k.startswith(encoders) and ".head." not in k}


def main_lincls_backbone(path, linear_keyword: str) -> dict:
    """moco-v3 main_lincls.py's --pretrained: module.base_encoder.* minus the projector."""
    sd = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    prefix = "module.base_encoder."
    return {k[len(prefix) :]: v for k, v in sd.items()
            if k.startswith(prefix) and not k.startswith(prefix + linear_keyword)}  # fmt: skip


def test_export_mocov3_vit_is_what_main_lincls_loads_and_round_trips(tmp_path, small_vit):
    src = fastmoco_v3_checkpoint(tmp_path / "ours.pt", "vit_small", IMAGE)
    out = tmp_path / "mocov3.pth.tar"
    path, p, note = export_checkpoint(tmp_path / "ours.pt", "mocov3", out)
    assert "main_lincls.py -a vit_small" in note
    exported = torch.load(path, weights_only=False)
    assert exported["arch"] == "vit_small" and exported["epoch"] == 4
    # every name and shape of a moco-v3 ViT checkpoint, as built key by key above
    official = official_vit_checkpoint(tmp_path / "ref.pth.tar")["state_dict"]
    assert encoder_shapes(exported["state_dict"]) == encoder_shapes(official)
    backbone = main_lincls_backbone(path, "head")
    assert set(backbone) == set(timm_vit_state(torch.Generator()))  # vits.py minus head
    x = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2)).double()
    net, _ = build_pretrained_backbone(read_pretrained(tmp_path / "ours.pt"))
    with torch.no_grad():
        want = net.double().eval()(x)
    got = timm_vit_features({k: v.double() for k, v in backbone.items()}, x, heads=SMALL[1])
    assert float((got - want).norm() / want.norm()) < 1e-12
    # back in: every tensor as it was, projector, momentum encoder and predictor included
    q = read_pretrained(path)
    assert (q.layout, q.arch) == ("mocov3", "vit_small")
    enc_q = src["encoder_q"]
    assert_equal_states(
        q.backbone, {k[9:]: v for k, v in enc_q.items() if k.startswith("backbone.")}
    )
    assert_equal_states(q.head, {k[5:]: v for k, v in enc_q.items() if k.startswith("head.")})
    assert_equal_states(
        q.predictor, {k[10:]: v for k, v in enc_q.items() if k.startswith("predictor.")}
    )
    assert_equal_states(q.encoder_k, src["encoder_k"])
    assert q.config["crop_size"] == IMAGE


def test_export_mocov3_resnet(tmp_path):
    fastmoco_v3_checkpoint(tmp_path / "ours.pt", "resnet18", 32)
    path, _, note = export_checkpoint(tmp_path / "ours.pt", "mocov3", tmp_path / "r.pth.tar")
    backbone = main_lincls_backbone(path, "fc")
    r18 = torchvision.models.resnet18().state_dict()
    assert {k: v.shape for k, v in backbone.items() if k != "conv1.weight"} == {
        k: v.shape for k, v in r18.items() if not k.startswith("fc.") and k != "conv1.weight"
    }  # the small-image stem changes conv1 only, and the note says how to build it
    assert "small-image stem" in note
    sd = torch.load(path, weights_only=False)["state_dict"]
    assert "module.base_encoder.fc.0.weight" in sd and "module.predictor.0.weight" in sd
    assert "module.momentum_encoder.fc.0.weight" in sd
    q = read_pretrained(path)
    assert (q.layout, q.arch, q.small_images) == ("mocov3", "resnet18", True)
    assert main(["export", "--pretrained", str(path), "--format", "mocov3",
                 "--out", str(tmp_path / "again.pth.tar")]) == 0  # fmt: skip
    again = torch.load(tmp_path / "again.pth.tar", weights_only=False)["state_dict"]
    assert_equal_states(again, sd)
