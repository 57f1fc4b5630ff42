"""Library use: an nn.Module as the backbone (timm-style: images -> pooled (N, D) features)
in MoCo and the other methods, trained in a plain loop with the public model and ops; and
v2's head width following the backbone's."""

import pytest
import torch
from torch import nn

from fastmoco.config import PRESETS
from fastmoco.models import DrLIM, MemoryBank, MoCo, MoCoV3, SimCLR, build_model


class TimmStyleNet(nn.Module):
    """What timm.create_model(name, num_classes=0) gives: forward -> pooled features."""

    def __init__(self, width=24):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = width

    def forward(self, x):
        return self.pool(self.stem(x)).flatten(1)


def test_custom_backbone_trains_in_moco_in_a_plain_loop():
    torch.manual_seed(0)
    net = TimmStyleNet()
    model = MoCo(net, dim=16, K=64, m=0.9, T=0.2, mlp_hidden=None, shuffle_bn=False)
    assert model.encoder_q.backbone is net  # the user's module is the one trained
    assert model.encoder_k.backbone is not net  # the key encoder is a copy
    assert model.encoder_q.head[0].in_features == 24 == model.encoder_q.head[0].out_features
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    images = torch.rand(8, 3, 16, 16)
    before = net.stem[0].weight.detach().clone()
    key_before = model.encoder_k.backbone.stem[0].weight.detach().clone()
    losses = []
    for _ in range(6):  # two noisy views of one batch
        x1 = images + 0.05 * torch.randn_like(images)
        x2 = images + 0.05 * torch.randn_like(images)
        loss, k, _ = model(x1, x2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.momentum_update_key_encoder()
        model.dequeue_and_enqueue(k)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(net.stem[0].weight, before)
    assert not torch.equal(model.encoder_k.backbone.stem[0].weight, key_before)
    assert int(model.queue_ptr) == 6 * 8 % 64


@pytest.mark.parametrize("cls", [SimCLR, MemoryBank, DrLIM, MoCoV3])
def test_custom_backbone_in_the_other_methods(cls):
    kw = dict(num_samples=16) if cls is MemoryBank else {}
    kw |= dict(mlp_dim=32) if cls is MoCoV3 else dict(mlp_hidden=None)
    model = cls(TimmStyleNet(), dim=16, **kw)
    x = torch.rand(4, 3, 16, 16)
    out = model(x, x.flip(3), torch.arange(4)) if cls is MemoryBank else model(x, x.flip(3))
    out[0].backward()
    assert torch.isfinite(out[0])


def test_feature_dim_given_or_refused_when_not_features():
    model = MoCo(TimmStyleNet(), dim=8, K=16, feat_dim=24, mlp_hidden=0)
    assert model.encoder_q.head.in_features == 24
    with pytest.raises(ValueError, match="num_classes=0"):
        MoCo(nn.Conv2d(3, 4, 3), dim=8, K=16)  # returns a feature map, not (N, D)
    with pytest.raises(ValueError, match="SplitBatchNorm2d"):
        MoCo(TimmStyleNet(), dim=8, K=16, bn_splits=2)


@pytest.mark.parametrize("arch, width", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_v2_head_hidden_width_is_the_backbones(arch, width):
    """The official v2: dim_mlp = fc.in_features; v3 keeps its 4096."""
    model = build_model(PRESETS["mocov2"].replace(arch=arch, queue_size=256))
    assert (model.encoder_q.head[0].in_features, model.encoder_q.head[0].out_features) == (
        width,
        width,
    )
    assert PRESETS["mocov3"].mlp_hidden == 4096


def test_readme_training_loop_runs(tmp_path):
    """The README's plain-loop example, shrunk (data, sizes, one epoch), runs as written."""
    from pathlib import Path

    from conftest import write_image_folder

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## The model in your training loop")[1]
    code = section.split("```python\n")[1].split("```")[0]
    write_image_folder(tmp_path / "train", classes=2, per_class=8, size=24)
    shrink = {
        '"/data/train"': repr(str(tmp_path / "train")),
        "crop_size=224": "crop_size=16",
        "K=4096": "K=32",
        "batch_size=256": "batch_size=8",
        "num_workers=8": "num_workers=0",
        "range(200)": "range(1)",
    }
    for a, b in shrink.items():
        assert a in code, a
        code = code.replace(a, b)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and int(scope["model"].queue_ptr) == 16 % 32
