"""Every preset against the code it comes from, with the official formulas written out here
(never imported): facebookresearch/moco's main_moco.py and its CIFAR-10 colab for mocov1,
mocov2 and cifar; facebookresearch/moco-v3's main_moco.py, CONFIG.md and vits.py for mocov3
and mocov3-vit. docs/methods.md lists, per preset, every difference that remains."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmoco.config import PRESETS
from fastmoco.engine.optim import ema_weight_at, lr_at, momentum_at
from fastmoco.models import MoCo, build_model
from fastmoco.ops import momentum_update_
from fastmoco.ops.reference import info_nce_reference

ITERS = 1_281_167 // 4096  # ImageNet steps per epoch at the v3 presets' batch (drop_last)


def v3_adjust_learning_rate(lr, batch, epoch, warmup, epochs):
    """moco-v3 main_moco.py: init lr x batch / 256, linear warm-up, then a half cosine, at
    the fractional epoch `epoch + i / iters_per_epoch` of step i."""
    lr = lr * batch / 256
    if epoch < warmup:
        return lr * epoch / warmup
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def v3_adjust_moco_momentum(epoch, m, epochs):
    """moco-v3 main_moco.py's momentum at the fractional epoch of a step."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - m)


def exact_ema_weight(epoch, m, epochs):
    """1 - adjust_moco_momentum(epoch) in 50-digit arithmetic: the value float64 rounds."""
    import mpmath

    with mpmath.workdps(50):
        x = mpmath.pi * mpmath.mpf(epoch) / epochs
        return float(0.5 * (1 + mpmath.cos(x)) * (1 - mpmath.mpf(m)))


def v2_adjust_learning_rate(lr, epoch, epochs, cos, schedule):
    """moco main_moco.py: once per (whole) epoch, cosine (--cos) or x0.1 at the milestones."""
    if cos:
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    for milestone in schedule:
        lr *= 0.1 if epoch >= milestone else 1.0
    return lr


# --- crops ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, scale",
    [
        ("mocov1", (0.2, 1.0)),  # main_moco.py: RandomResizedCrop(224, scale=(0.2, 1.))
        ("mocov2", (0.2, 1.0)),
        ("cifar", (0.08, 1.0)),  # the colab: RandomResizedCrop(32), torchvision's default
        ("mocov3", (0.2, 1.0)),  # CONFIG.md's ResNet-50 commands: --crop-min=.2
        ("mocov3-vit", (0.08, 1.0)),  # CONFIG.md's ViT commands: main_moco.py's default
    ],
)
def test_crop_scale_is_the_official_commands(preset, scale):
    assert PRESETS[preset].crop_scale == scale


# --- learning rate -------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["mocov3", "mocov3-vit"])
def test_v3_lr_at_the_warm_up_steps_and_after(preset):
    cfg = PRESETS[preset]
    w, E = cfg.warmup_epochs, cfg.epochs
    last_warm = int(w * ITERS) - 1
    for step in (0, 1, 2, last_warm, last_warm + 1, last_warm + 2, E * ITERS // 2, E * ITERS - 1):
        want = v3_adjust_learning_rate(cfg.lr, cfg.batch_size, step / ITERS, w, E)
        assert lr_at(cfg, step, ITERS) == pytest.approx(want, rel=1e-12, abs=1e-15), step
    assert lr_at(cfg, 0, ITERS) == 0.0  # the official first step trains at lr 0


@pytest.mark.parametrize("preset", ["mocov1", "mocov2", "cifar"])
def test_v1_v2_lr_is_set_once_per_epoch(preset):
    """main_moco.py calls adjust_learning_rate(optimizer, epoch) at each epoch's start."""
    cfg = PRESETS[preset]
    iters = 17
    for epoch in (0, 1, 119, 120, 159, 160, cfg.epochs - 1):
        want = v2_adjust_learning_rate(
            cfg.lr, epoch, cfg.epochs, cfg.schedule == "cosine", cfg.lr_steps
        )
        for i in (0, iters // 2, iters - 1):  # the same lr through the epoch
            assert lr_at(cfg, epoch * iters + i, iters) == pytest.approx(want, rel=1e-12)


# --- momentum ------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["mocov3", "mocov3-vit"])
def test_v3_momentum_at_the_first_and_last_steps(preset):
    """The update after step s uses moco-v3's momentum at the start of step s + 1 (where the
    official code updates, before that step's keys); at step 0 both encoders are equal."""
    cfg = PRESETS[preset]
    total = cfg.epochs * ITERS
    for s in (0, 1, total // 2, total - 2):
        want = v3_adjust_moco_momentum((s + 1) / ITERS, cfg.moco_m, cfg.epochs)
        assert momentum_at(cfg, s, ITERS) == pytest.approx(want, rel=1e-15)
        assert ema_weight_at(cfg, s, ITERS) == pytest.approx(1 - want, rel=1e-9)
    assert v3_adjust_moco_momentum(0.0, cfg.moco_m, cfg.epochs) == pytest.approx(cfg.moco_m)


@pytest.mark.parametrize("preset, stops_at", [("mocov3", 34), ("mocov3-vit", 102)])
def test_the_ema_weight_is_exact_in_float32_where_m_is_not(preset, stops_at):
    """Over the last 200 steps: the weight 1 - m the update applies, against moco-v3's
    schedule computed exactly (50 digits). Held as 1 - m (fastmoco) it is within 2^-24 of
    itself at every step, through the update itself (lerp(0, 1, w) = w); held as m in
    float32 (before), 1 - m is percents off in these steps and zero for the last ones,
    where m rounds to 1."""
    cfg = PRESETS[preset]
    total = cfg.epochs * ITERS
    steps = range(total - 200, total - 1)  # the update after the last step is a no-op
    exact = np.array([exact_ema_weight((s + 1) / ITERS, 0.99, cfg.epochs) for s in steps])
    as_m = np.float32(1) - np.array([momentum_at(cfg, s, ITERS) for s in steps], np.float32)
    applied = []
    for s in steps:  # the step's device tensor through momentum_update_
        target, source = [torch.zeros(1)], [torch.ones(1)]
        w = torch.tensor(ema_weight_at(cfg, s, ITERS), dtype=torch.float32)
        momentum_update_(target, source, ema_weight=w)
        applied.append(float(target[0]))
    rel = np.abs(np.array(applied) - exact) / exact
    assert rel.max() <= 2**-24, rel.max()
    assert (as_m == 0).sum() == stops_at  # the old float32 m: no update at all there
    wrong = np.abs(as_m - exact) / exact  # before they reach 0, they are off by percents
    assert wrong[as_m > 0].max() > 0.01


# --- initialisation ------------------------------------------------------------------------


def _bottleneck_gammas(encoder):
    return [m.bn3.weight for m in encoder.backbone.modules() if hasattr(m, "bn3")]


def test_v3_resnet_starts_with_zero_residual_gammas():
    """moco-v3 builds torchvision's ResNet with zero_init_residual=True; v1/v2 do not."""
    torch.manual_seed(0)
    v3 = build_model(PRESETS["mocov3"].replace(mlp_hidden=64, dim=16))
    gammas = _bottleneck_gammas(v3.encoder_q) + _bottleneck_gammas(v3.encoder_k)
    assert len(gammas) == 2 * 16 and all(bool((g == 0).all()) for g in gammas)
    v2 = build_model(PRESETS["mocov2"].replace(queue_size=16, mlp_hidden=64))
    assert all(bool((g == 1).all()) for g in _bottleneck_gammas(v2.encoder_q))


def test_vit_starts_as_vits_py():
    """vits.py: qkv uniform in +-sqrt(6 / (out/3 + in)), other Linears Xavier, every Linear
    bias 0, class token N(0, 1e-6^2), the patch projection uniform in +-sqrt(6 / (3 * 16^2 +
    width)) with bias 0."""
    torch.manual_seed(0)
    model = build_model(PRESETS["mocov3-vit"].replace(mlp_hidden=64, dim=16))
    vit = model.encoder_q.backbone
    width = 384
    for block in vit.encoder.layers:
        attn = block.self_attention
        qkv = math.sqrt(6 / (3 * width // 3 + width))
        assert 0.99 * qkv < attn.in_proj_weight.abs().max() <= qkv
        assert bool((attn.in_proj_bias == 0).all())
        for linear in (attn.out_proj, block.mlp[0], block.mlp[3]):
            bound = math.sqrt(6 / sum(linear.weight.shape))  # Xavier-uniform
            assert 0.99 * bound < linear.weight.abs().max() <= bound
            assert bool((linear.bias == 0).all())
    assert 0.5e-6 < vit.class_token.std() < 2e-6
    patch = math.sqrt(6 / (3 * 16 * 16 + width))
    assert 0.99 * patch < vit.conv_proj.weight.abs().max() <= patch
    assert bool((vit.conv_proj.bias == 0).all())


# --- the CIFAR-10 demo's symmetric loss ----------------------------------------------------


def test_symmetric_loss_and_enqueue_are_the_colabs():
    """--symmetric: loss_12 + loss_21 against the same queue (each the colab's contrastive
    loss: CE of [q.k+, q.queue] / T, label 0), then both key sets cat([k1, k2]) enqueued."""
    torch.manual_seed(0)
    args = dict(dim=8, K=32, T=0.1, mlp_hidden=0, small_images=True, shuffle_bn=False)
    model = MoCo("resnet-tiny", symmetric=True, **args).double().train()
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64) for _ in "12")
    queue = model.queue.clone()
    loss, keys, _ = model(x1, x2)
    with torch.no_grad():  # the same encoders on the same batches (train-mode BN alike);
        q1, q2 = model.encoder_q(x1), model.encoder_q(x2)  # keys in float32, as the model's
        k1 = F.normalize(model.encoder_k(x1).float(), dim=1).double()
        k2 = F.normalize(model.encoder_k(x2).float(), dim=1).double()
    want = info_nce_reference(q1, k2, queue, 0.1) + info_nce_reference(q2, k1, queue, 0.1)
    assert abs(loss.item() - want.item()) / want.item() < 1e-12
    model.after_step(keys)
    assert int(model.queue_ptr) == 8  # 2N keys enqueued
    assert torch.allclose(model.queue[:8], torch.cat([k1, k2]), rtol=0, atol=1e-12)
    assert torch.equal(model.queue[8:], queue[8:])
    one_way = MoCo("resnet-tiny", **args).double().train()
    one_way.load_state_dict(model.state_dict())
    assert one_way.loss_ceiling(4) * 2 == pytest.approx(model.loss_ceiling(4))
