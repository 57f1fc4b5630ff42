import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmoco.models import MoCo, SplitBatchNorm2d, build_backbone


def test_split_batchnorm_equals_per_group_batchnorm():
    """Slice g of the batch is normalised with its own statistics, as on GPU g."""
    torch.manual_seed(0)
    s, N, C = 4, 12, 5
    x = torch.randn(N, C, 3, 3) * 3 + 1
    split = SplitBatchNorm2d(C, num_splits=s)
    nn.init.normal_(split.weight)
    nn.init.normal_(split.bias)
    y = split(x)
    refs = []
    for g in range(s):
        bn = nn.BatchNorm2d(C)
        bn.weight.data.copy_(split.weight)
        bn.bias.data.copy_(split.bias)
        refs.append((bn(x[g * N // s : (g + 1) * N // s]), bn.running_mean, bn.running_var))
    torch.testing.assert_close(y, torch.cat([r[0] for r in refs]))
    torch.testing.assert_close(split.running_mean, torch.stack([r[1] for r in refs]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([r[2] for r in refs]).mean(0))
    # the grouping is not the whole batch's: one BatchNorm over all of x differs
    assert not torch.allclose(y, F.batch_norm(x, None, None, split.weight, split.bias, True))


def test_split_batchnorm_channels_last_and_eval():
    torch.manual_seed(1)
    x = torch.randn(8, 4, 5, 5)
    split = SplitBatchNorm2d(4, num_splits=2)
    y = split(x)
    y_cl = SplitBatchNorm2d(4, num_splits=2)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, y_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    split.eval()
    bn = nn.BatchNorm2d(4).eval()
    bn.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), bn(x))
    with pytest.raises(ValueError, match="not divisible by num_splits"):
        SplitBatchNorm2d(4, num_splits=3)(x)


@pytest.mark.parametrize(
    "arch,small,dim",
    [("resnet18", True, 512), ("resnet-tiny", True, 128), ("resnet50", False, 2048)],
)
def test_backbones(arch, small, dim):
    net, d = build_backbone(arch, small_images=small, bn_splits=2)
    assert d == dim
    size = 32 if small else 64
    assert net(torch.randn(2, 3, size, size)).shape == (2, dim)
    assert any(isinstance(m, SplitBatchNorm2d) for m in net.modules())


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown --arch 'vgg'"):
        build_backbone("vgg")


def _tiny_moco(**kw):
    torch.manual_seed(0)
    return MoCo("resnet-tiny", dim=16, K=40, m=0.9, T=0.2, mlp_hidden=32, small_images=True, **kw)


def test_shuffle_bn_unshuffles_keys():
    """With per-sample BN (eval statistics), shuffling must return each key to its sample."""
    model = _tiny_moco(shuffle_bn=True)
    model.encoder_k.eval()
    x = torch.randn(6, 3, 16, 16)
    k_shuffled = model._keys(x)
    model.shuffle_bn = False
    k_plain = model._keys(x)
    torch.testing.assert_close(k_shuffled, k_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_plain.norm(dim=1), torch.ones(6))


def test_shuffle_bn_changes_key_bn_groups():
    """In train mode with split BN, shuffling changes which samples share BN statistics."""
    model = _tiny_moco(shuffle_bn=True, bn_splits=2)
    x = torch.randn(8, 3, 16, 16)
    k_shuffled = model._keys(x)
    model.shuffle_bn = False
    assert not torch.allclose(k_shuffled, model._keys(x), atol=1e-4)


def test_moco_step_semantics():
    model = _tiny_moco()
    q_params = [p.clone() for p in model.encoder_q.parameters()]
    k_params = [p.clone() for p in model.encoder_k.parameters()]
    queue0 = model.queue.clone()
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    loss, k, rank = model(x1, x2)
    assert loss.shape == () and loss.dtype == torch.float32
    assert k.shape == (8, 16) and rank.shape == (8,) and rank.dtype == torch.long
    loss.backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    torch.testing.assert_close(model.queue, queue0)  # forward never touches the queue
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.sub_(0.1 * p.grad)
    model.momentum_update_key_encoder()
    for pk, pk0, pq in zip(
        model.encoder_k.parameters(), k_params, model.encoder_q.parameters(), strict=True
    ):
        torch.testing.assert_close(pk, 0.9 * pk0 + 0.1 * pq)
    assert any(
        not torch.equal(p, p0) for p, p0 in zip(model.encoder_q.parameters(), q_params, strict=True)
    )
    for _ in range(5):  # 5 x 8 = 40 = K: wraps around exactly once
        model.dequeue_and_enqueue(k)
    assert int(model.queue_ptr) == 0
    torch.testing.assert_close(model.queue, k.repeat(5, 1))
