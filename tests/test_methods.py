"""MoCo v3, SimCLR end-to-end, memory bank and DrLIM: formulas, update rules, training."""

import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_train_config

from fastmoco.config import PRESETS, TrainConfig
from fastmoco.engine import Interrupted, train
from fastmoco.engine.optim import ema_weight_at, momentum_at
from fastmoco.engine.plan import check_config
from fastmoco.errors import UsageError
from fastmoco.models import DrLIM, MemoryBank, MoCoV3, SimCLR, build_model
from fastmoco.ops import contrastive_margin_loss, info_nce
from fastmoco.ops.reference import info_nce_reference

TINY = dict(small_images=True, dim=16, mlp_hidden=32)
V3_TINY = dict(small_images=True, dim=16, mlp_dim=32)


def tiny_cfg(data, out, method, **kw) -> TrainConfig:
    """tests/conftest.py's tiny run for `method`: one epoch, plain BN."""
    return tiny_train_config(data, out, method=method, bn_splits=1, epochs=1).replace(**kw)


def _images(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randn(n, 3, 16, 16, generator=g)


# --- MoCo v3 -------------------------------------------------------------------------------


def _v3_formula(q, k, T):
    """The paper's ctr: CE(normalize(q) @ normalize(k).T / T, arange(N)) * 2T, fp64."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    return F.cross_entropy(q @ k.T / T, torch.arange(q.shape[0])) * 2 * T


@pytest.mark.parametrize("T", [1.0, 0.2])
def test_v3_loss_is_the_paper_formula(T):
    torch.manual_seed(0)
    model = MoCoV3("resnet-tiny", T=T, **V3_TINY).train()
    x1, x2 = _images()
    loss, aux, rank = model(x1, x2)
    assert aux is None and rank.shape == (8,)
    # the same encoders again (train-mode BN uses the batch's statistics: same outputs)
    with torch.no_grad():
        q1, q2 = model.encoder_q(x1), model.encoder_q(x2)
        k1, k2 = model.encoder_k(x1), model.encoder_k(x2)
    want = _v3_formula(q1, k2, T) + _v3_formula(q2, k1, T)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_v3_ctr_across_ranks_is_the_gathered_formula():
    """Rank r's rows against the keys of all ranks, labels arange(N) + N r (moco-v3's
    contrastive_loss) is info_nce's gathered form (all_keys, offset = N r): loss, ranks and
    the query's gradient; and why the queue argument cannot express it (the rank's own
    other keys would be missing)."""
    g = torch.Generator().manual_seed(1)
    W, N, C, T = 3, 5, 8, 0.2
    q = torch.randn(W * N, C, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(W * N, C, generator=g, dtype=torch.float64), dim=1)
    logits = F.normalize(q, dim=1) @ k.T / T  # every rank's rows, all keys
    for r in range(W):
        rows = slice(r * N, (r + 1) * N)
        want = F.cross_entropy(logits[rows], torch.arange(N) + r * N)
        q_r = q[rows].clone().requires_grad_()
        got, rank = info_nce(q_r, k[rows], None, T, all_keys=k, offset=r * N, return_stats=True,
                             chunk_size=4)  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        (grad,) = torch.autograd.grad(got, q_r)
        q_w = q[rows].clone().requires_grad_()
        (grad_want,) = torch.autograd.grad(
            info_nce_reference(q_w, k[rows], None, T, all_keys=k, offset=r * N), q_w
        )
        assert (grad - grad_want).norm() / grad_want.norm() < 1e-12
        pos = logits[rows].gather(1, (torch.arange(N) + r * N)[:, None])
        assert torch.equal(rank, (logits[rows] > pos).sum(1))
        others = torch.cat([k[: r * N], k[(r + 1) * N :]])
        shortcut = info_nce(q[rows], k[rows], others, T)
        assert not torch.allclose(shortcut, want)  # lacks the rank's own other keys
    # one rank: the plain in-batch form
    got = info_nce(q[:N], k[:N], None, T, all_keys=k[:N], offset=0)
    torch.testing.assert_close(got, info_nce(q[:N], k[:N], None, T), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="offset 11.*in \\[0, 10\\]"):
        info_nce(q[:N], k[:N], None, T, all_keys=k, offset=11)


def test_v3_ctr_across_ranks_on_the_fused_kernel():
    """The fused kernels (stream column offset + i excluded, the positive from k) give the
    gathered formula's loss, ranks and query gradient, without the N x (N W) logits."""
    g = torch.Generator().manual_seed(2)
    W, N, C, T = 3, 4, 16, 0.2
    q = torch.randn(W * N, C, generator=g)
    k = F.normalize(torch.randn(W * N, C, generator=g), dim=1)
    for r in range(W):
        rows = slice(r * N, (r + 1) * N)
        q64 = q[rows].double().requires_grad_()
        want = info_nce_reference(q64, k[rows].double(), None, T, all_keys=k.double(),
                                  offset=r * N)  # fmt: skip
        want.backward()
        _, want_rank = info_nce(q64.detach(), k[rows].double(), None, T, all_keys=k.double(),
                                offset=r * N, return_stats=True)  # fmt: skip
        q32 = q[rows].clone().requires_grad_()
        got, rank = info_nce(q32, k[rows], None, T, all_keys=k, offset=r * N,
                             return_stats=True, backend="triton")  # fmt: skip
        got.backward()
        assert abs(got.item() - want.item()) / want.item() < 1e-5
        assert torch.equal(rank, want_rank)
        err = (q32.grad.double() - q64.grad).norm() / q64.grad.norm()
        assert err < 1e-5, err


def test_v3_heads_follow_the_official_code():
    torch.manual_seed(0)
    model = MoCoV3("resnet18", dim=256, mlp_dim=4096, small_images=True)
    head, pred = model.encoder_q.head, model.encoder_q.predictor
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 4096), (4096, 256)]
    assert all(m.bias is None for m in linears)
    assert isinstance(head[-1], torch.nn.BatchNorm1d) and not head[-1].affine  # last BN
    assert [type(m).__name__ for m in pred] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert not hasattr(model.encoder_k, "predictor")
    for pk, pq in zip(model.encoder_k.parameters(), model.encoder_q.base_parameters(), strict=True):
        assert torch.equal(pk, pq) and not pk.requires_grad


def test_v3_momentum_schedule_and_update():
    cfg = TrainConfig(moco_m=0.99, moco_m_cos=True, epochs=4)
    spe = 10
    assert momentum_at(cfg, -1, spe) == pytest.approx(0.99)  # the first step's m
    assert momentum_at(cfg, 19, spe) == pytest.approx(1 - 0.5 * 0.01)  # half-way
    assert momentum_at(cfg, 39, spe) == pytest.approx(1.0)
    ms = [momentum_at(cfg, s, spe) for s in range(40)]
    assert ms == sorted(ms)
    assert momentum_at(cfg.replace(moco_m_cos=False), 17, spe) == 0.99
    assert ema_weight_at(cfg, 19, spe) == pytest.approx(0.5 * 0.01)  # 1 - m, computed directly

    torch.manual_seed(0)
    model = MoCoV3("resnet-tiny", T=0.2, **V3_TINY)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    w = torch.tensor(0.25)  # the EMA weight 1 - m, a device scalar, as the trainer passes it
    model.after_step(None, None, w)
    for pk, old, pq in zip(
        model.encoder_k.parameters(), before_k, model.encoder_q.base_parameters(), strict=True
    ):
        torch.testing.assert_close(pk, 0.75 * old + 0.25 * pq)


def test_vit_small_with_frozen_patch_projection():
    torch.manual_seed(0)
    model = MoCoV3("vit_small", dim=32, mlp_dim=64, T=0.2, image_size=32, frozen_patch_proj=True)
    proj = model.encoder_q.backbone.conv_proj
    assert not proj.weight.requires_grad and not proj.bias.requires_grad
    bound = math.sqrt(6 / (3 * 16 * 16 + 384))
    assert proj.weight.abs().max() <= bound
    assert sum(isinstance(m, torch.nn.Linear) for m in model.encoder_q.head) == 3  # ViT: 3
    assert isinstance(model.encoder_q.predictor[-1], torch.nn.BatchNorm1d)
    x = torch.randn(4, 3, 32, 32)
    loss, _, _ = model(x, x.flip(3))
    loss.backward()
    assert proj.weight.grad is None
    assert model.encoder_q.backbone.encoder.layers[0].mlp[0].weight.grad is not None
    with pytest.raises(ValueError, match="multiple of 16"):
        MoCoV3("vit_small", image_size=30)


# --- every method: the loss falls on a fixed batch -----------------------------------------


def _method(name):
    torch.manual_seed(0)
    if name == "mocov3":
        return MoCoV3("resnet-tiny", T=0.2, **V3_TINY)
    if name == "simclr":
        return SimCLR("resnet-tiny", T=0.2, **TINY)
    if name == "membank":
        return MemoryBank("resnet-tiny", num_samples=32, K=64, T=0.2, **TINY)
    return DrLIM("resnet-tiny", **TINY)


@pytest.mark.parametrize("name", ["mocov3", "simclr", "membank", "drlim"])
def test_loss_falls_on_a_fixed_batch(name):
    model = _method(name).train()
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.05, momentum=0.9)
    x1, x2 = _images()
    index = torch.arange(8) * 3  # dataset rows of this batch (the memory bank's)
    losses = []
    for _ in range(12):
        loss, aux, rank = model(x1, x2, index)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step(aux, index, 0.9)
        losses.append(loss.item())
        assert rank.shape == (8,)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


def test_simclr_is_nt_xent_over_one_network():
    model = _method("simclr").train()
    x1, x2 = _images()
    loss, _, _ = model(x1, x2)
    with torch.no_grad():
        z = F.normalize(torch.cat([model.encoder_q(x1), model.encoder_q(x2)]).double(), dim=1)
    logits = (z @ z.T / 0.2).fill_diagonal_(float("-inf"))
    want = F.cross_entropy(logits, (torch.arange(16) + 8) % 16)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_drlim_pairs_are_views_and_shifted_views():
    model = _method("drlim").train()
    x1, x2 = _images()
    state = model.gen.get_state()
    loss, _, _ = model(x1, x2)
    model.gen.set_state(state)
    shift = torch.randint(1, 8, (1,), generator=model.gen)
    with torch.no_grad():
        z1 = F.normalize(model.encoder_q(x1), dim=1)
        z2 = F.normalize(model.encoder_q(x2), dim=1)
    neg = z2[(torch.arange(8) + shift) % 8]
    y = torch.cat([torch.zeros(8), torch.ones(8)])
    want = contrastive_margin_loss(torch.cat([z1, z1]), torch.cat([z2, neg]), y, 1.0)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


# --- memory bank ---------------------------------------------------------------------------


def test_membank_update_rule_and_sampling():
    model = _method("membank").train()
    bank0 = model.bank.clone()
    assert torch.allclose(bank0.norm(dim=1), torch.ones(32))
    x1, x2 = _images()
    index = torch.tensor([3, 0, 31, 7, 12, 5, 20, 9])
    state = model.gen.get_state()
    loss, q, rank = model(x1, x2, index)
    # the loss is info_nce of q against its stored row and K rows drawn from the bank
    model.gen.set_state(state)
    draw = torch.randint(0, 32, (64,), generator=model.gen)
    with torch.no_grad():
        q_raw = model.encoder_q(x1)
    want = info_nce(q_raw, bank0[index], bank0[draw], 0.2)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q, F.normalize(q_raw, dim=1))
    # after the step: rows of the batch move half-way to q and are re-normalised; others stay
    model.after_step(q, index)
    want_rows = F.normalize(0.5 * bank0[index] + 0.5 * q, dim=1)
    torch.testing.assert_close(model.bank[index], want_rows)
    rest = torch.ones(32, dtype=torch.bool)
    rest[index] = False
    assert torch.equal(model.bank[rest], bank0[rest])


# --- through the trainer -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["mocov3", "simclr", "membank", "drlim"])
def test_each_method_trains_on_images(tiny_data, tmp_path, method):
    kw = dict(optimizer="lars", moco_m_cos=True, lr=0.3) if method == "mocov3" else {}
    res = train(tiny_cfg(tiny_data, tmp_path / "run", method, **kw))
    assert res["knn_final"] is not None and math.isfinite(res["history"][0]["loss"])
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ck["config"]["method"] == method and "encoder_q" in ck
    model = build_model(TrainConfig.from_dict(ck["config"]), num_samples=36)
    model.query_encoder().load_state_dict(ck["encoder_q"])  # rebuildable from the config


def test_membank_resume_is_exact(tiny_data, tmp_path):
    """Stopped mid-epoch and resumed: the bank, the encoder, the optimizer and the sampling
    generator end bit-identical to an unbroken run (the batch indices are recomputed)."""
    cfg = dict(epochs=2, knn_every=0)
    train(tiny_cfg(tiny_data, tmp_path / "full", "membank", **cfg))

    def stop_at_step_6(step):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        train(tiny_cfg(tiny_data, tmp_path / "half", "membank", **cfg), on_step=stop_at_step_6)
    train(tiny_cfg(tiny_data, tmp_path / "half", "membank", resume="auto", **cfg))
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=False)
    assert torch.equal(a["model"]["bank"], b["model"]["bank"])
    for name, t in a["encoder_q"].items():
        assert torch.equal(t, b["encoder_q"][name]), name
    states = a["optimizer"]["state"], b["optimizer"]["state"]
    for sa, sb in zip(*(s.values() for s in states), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert torch.equal(a["rng"]["generators"][0], b["rng"]["generators"][0])


def test_presets_and_config_errors(tiny_data, tmp_path):
    v3 = PRESETS["mocov3"]
    assert (v3.method, v3.optimizer, v3.temperature, v3.moco_m, v3.moco_m_cos) == (
        "mocov3",
        "lars",
        1.0,
        0.99,
        True,
    )
    assert (v3.lr, v3.weight_decay, v3.batch_size, v3.dim, v3.mlp_hidden) == (
        0.6,
        1e-6,
        4096,
        256,
        4096,
    )
    vit = PRESETS["mocov3-vit"]
    assert (vit.arch, vit.optimizer, vit.lr, vit.weight_decay, vit.temperature) == (
        "vit_small",
        "adamw",
        1.5e-4,
        0.1,
        0.2,
    )
    check_config(v3)
    check_config(vit)
    # membank and the in-batch methods need no queue larger than the batch
    check_config(tiny_cfg(tiny_data, tmp_path, "membank", queue_size=4))
    with pytest.raises(UsageError, match="--method"):
        check_config(tiny_cfg(tiny_data, tmp_path, "byol"))
    with pytest.raises(UsageError, match="mocov3"):
        check_config(tiny_cfg(tiny_data, tmp_path, "simclr", arch="vit_small"))
    with pytest.raises(UsageError, match="multiple"):
        check_config(tiny_cfg(tiny_data, tmp_path, "mocov3", arch="vit_small", crop_size=40))
    with pytest.raises(UsageError, match="--optimizer"):
        check_config(tiny_cfg(tiny_data, tmp_path, "simclr", optimizer="adam"))


# --- the mechanisms comparison -------------------------------------------------------------


def test_compare_command_writes_plot_and_table(tiny_data, tmp_path, capsys):
    from fastmoco.cli import main
    from fastmoco.experiments.compare import mechanism_config

    e2e = mechanism_config(TrainConfig(batch_size=256), "end-to-end", 1024)
    assert (e2e.method, e2e.batch_size, 2 * e2e.batch_size - 2) == ("simclr", 513, 1024)
    assert mechanism_config(TrainConfig(), "memory bank", 1024).queue_size == 1024
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(tiny_data), "--preset", "demo", "--ks", "80"]
    args += ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    code = main([*args, "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((out / "compare.json").read_text())
    got = {(r["mechanism"], r["K"]): r for r in rows}
    assert set(got) == {(m, k) for m in ("end-to-end", "memory bank", "moco") for k in (80,)}
    assert "41 > 36" in got[("end-to-end", 80)]["skipped"]  # K = 80 needs a batch of 41
    done = [r for r in rows if "skipped" not in r]
    assert all(r["step_ms"] > 0 and r["peak_mib"] > 0 and 0 <= r["knn_top1"] <= 100 for r in done)
    table = (out / "compare.md").read_text()
    assert "| moco | 8 | 80 |" in table and "time / step" in table
    assert (out / "compare.png").stat().st_size > 1000


@pytest.mark.parametrize("method", ["mocov3", "membank"])
def test_methods_on_two_ranks(tiny_data, tmp_path, method):
    """DDP on 2 gloo ranks: v3 gathers keys across ranks (two forwards of the DDP module per
    step); the memory bank applies the whole global batch's update on every rank."""
    from fastmoco.engine.distributed import launch
    from fastmoco.engine.plan import RunPlan
    from fastmoco.engine.trainer import _train_rank

    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_data, out, method, knn_every=0)
    plan = RunPlan(cfg, str(tiny_data / "train"), str(tiny_data / "val"), str(out), None)
    res = launch(_train_rank, (plan, None), nprocs=2, device="cpu")  # rank 0's results
    assert math.isfinite(res["history"][0]["loss"])
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["global_step"] == 4  # 36 images, global batch 8
    if method == "membank":
        init = build_model(TrainConfig.from_dict(ck["config"]), num_samples=36).bank
        changed = (ck["model"]["bank"] != init).any(dim=1).sum().item()
        assert changed == 32  # 4 steps x 8 images of both ranks, each written once


def test_membank_trains_on_dali_with_the_samplers_indices(tiny_data, tmp_path):
    """Both loaders deal batches from one ShardedBatchSampler, so the bank rows a DALI
    (CPU mode) epoch updates are exactly that epoch's indices, as with the torch loader."""
    pytest.importorskip("nvidia.dali")
    from fastmoco.data.sampler import ShardedBatchSampler

    cfg = tiny_cfg(tiny_data, tmp_path / "run", "membank", loader="dali", queue_size=16)
    train(cfg)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    bank = state["model"]["bank"]
    fresh = build_model(cfg, num_samples=bank.shape[0]).bank
    moved = set(torch.nonzero((bank - fresh).norm(dim=1) > 0).flatten().tolist())
    sampler = ShardedBatchSampler(bank.shape[0], cfg.batch_size, cfg.seed, 0, 1)
    sampler.set_epoch(0)
    assert moved == set(sampler.epoch_indices())
