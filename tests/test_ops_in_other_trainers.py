"""fastmoco's three ops in someone else's training loop: lightly's MoCo example, side by side.

The lightly loop is lightly's examples/pytorch/moco.py with what it imports written out in
plain PyTorch, with the semantics of lightly's source on main at commit e8d317f (August
2026, __version__ "1.5.26", the newest source read for this test; PyPI's lightly 1.6.0 is
later and was not inspected, and lightly is not a dependency):
  - MoCo: a backbone (torchvision's ResNet-18 without its fc) and MoCoProjectionHead(512,
    512, 128) (Linear, ReLU, Linear), plus deep copies of both with requires_grad off
    (lightly.models.utils.deactivate_requires_grad);
  - update_momentum(model, model_ema, m) (lightly.models.utils): parameters only,
    _foreach_mul_(ema, m) then _foreach_add_(ema, model, alpha=1 - m), called for backbone
    and head before each step's forward pass;
  - NTXentLoss(memory_bank_size=(K, C)) (lightly.loss, temperature 0.5): both outputs
    normalised; its MemoryBankModule (lightly.models.modules.memory_bank) draws the bank at
    construction as normalize(randn(K, C)) in fp32, returns a clone of it (transposed to
    (C, K)) as the negatives, then, because out0 requires grad, writes the normalised keys
    at bank_ptr: when ptr + B >= K it writes the K - ptr rows that fit and resets ptr to 0;
    logits = cat(<q, k>, q @ bank) / T, cross-entropy against label 0;
  - cosine_schedule(epoch, epochs, 0.996, 1) (lightly.utils.scheduler), per epoch.

The fastmoco loop is the same loop with momentum_update_(model_ema, model, m) (the target,
the EMA, first), info_nce(q, k, queue, 0.5), and enqueue_(queue, ptr, normalize(k)) after
the backward pass (info_nce's backward reads the queue; lightly's clone lets it write
before). info_nce uses the queue as given, so the keys are normalised before the enqueue,
as lightly's bank stores them. K is a multiple of B: otherwise lightly drops the keys past
the end of its bank, where enqueue_ wraps them to its start, and the queues part.

Everything runs in float64 (the criterion too: lightly's bank is an fp32 buffer, so its
loop needs criterion.double() to take fp64 outputs), a few steps over the wrap of the
queue: the same losses step by step and the same queue at the end to 1e-12 relative error
(seen: 1e-14), the same weights and BN statistics to 1e-11 per tensor (seen: 1e-12, on the
BN biases, which start at 0 so that their value is all accumulated gradient; the two
losses' gradients differ by float64 rounding, ~1e-15).
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_error
from torch import nn
from torchvision.models import resnet18

from fastmoco.ops import enqueue_, info_nce, momentum_update_

K, C, B = 32, 128, 8  # the bank wraps after 4 steps
EPOCHS, STEPS_PER_EPOCH = 3, 2
TOL = 1e-12  # losses and queue
WEIGHT_TOL = 1e-11  # per tensor; see the module doc


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


# ---- lightly's pieces, written out ----------------------------------------------------------


class LightlyMoCo(nn.Module):
    """examples/pytorch/moco.py's model."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.projection_head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, C))
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        for module in (self.backbone_momentum, self.projection_head_momentum):
            for param in module.parameters():  # deactivate_requires_grad
                param.requires_grad = False

    def forward(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward_momentum(self, x):
        key = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(key).detach()


@torch.no_grad()
def update_momentum(model: nn.Module, model_ema: nn.Module, m: float) -> None:
    """lightly.models.utils.update_momentum: the EMA second."""
    model_params, model_ema_params = list(model.parameters()), list(model_ema.parameters())
    torch._foreach_mul_(model_ema_params, m)
    torch._foreach_add_(model_ema_params, model_params, alpha=1.0 - m)


def cosine_schedule(step: int, max_steps: int, start_value: float, end_value: float) -> float:
    """lightly.utils.scheduler.cosine_schedule without a period."""
    if max_steps <= 1 or step >= max_steps - 1:
        return float(end_value)
    cos = np.cos(np.pi * step / (max_steps - 1))
    return float(end_value - (end_value - start_value) * (cos + 1) / 2)


class MemoryBankModule(nn.Module):
    """lightly's memory bank with size=(K, C) and feature_dim_first=True, one process."""

    def __init__(self, size):
        super().__init__()
        self.size = tuple(size)
        self.register_buffer("bank", torch.empty(self.size, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.empty(1, dtype=torch.long), persistent=False)
        self.bank = F.normalize(torch.randn(self.size).type_as(self.bank), dim=-1)
        self.bank_ptr = torch.zeros(1).type_as(self.bank_ptr)

    def forward(self, output, update=False):
        bank = self.bank.clone().detach().transpose(0, -1)  # (C, K), taken before the update
        if update:
            self._dequeue_and_enqueue(output)
        return output, bank

    @torch.no_grad()
    def _dequeue_and_enqueue(self, batch):
        batch_size, ptr = batch.shape[0], int(self.bank_ptr)
        if ptr + batch_size >= self.size[0]:
            self.bank[ptr:] = batch[: self.size[0] - ptr].detach()  # the rest is dropped
            self.bank_ptr.zero_()
        else:
            self.bank[ptr : ptr + batch_size] = batch.detach()
            self.bank_ptr[0] = ptr + batch_size


class NTXentLoss(nn.Module):
    """lightly.loss.NTXentLoss with a memory bank (the MoCo case)."""

    def __init__(self, temperature=0.5, memory_bank_size=(K, C)):
        super().__init__()
        self.memory_bank = MemoryBankModule(memory_bank_size)
        self.temperature = temperature
        self.cross_entropy = nn.CrossEntropyLoss(reduction="mean")

    def forward(self, out0, out1):
        out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        out1, negatives = self.memory_bank(out1, update=out0.requires_grad)
        sim_pos = torch.einsum("nc,nc->n", out0, out1).unsqueeze(-1)
        sim_neg = torch.einsum("nc,ck->nk", out0, negatives)
        logits = torch.cat([sim_pos, sim_neg], dim=1) / self.temperature
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        return self.cross_entropy(logits, labels)


# ---- the two loops --------------------------------------------------------------------------


def _model_and_batches():
    torch.manual_seed(0)
    resnet = resnet18()
    model = LightlyMoCo(nn.Sequential(*list(resnet.children())[:-1])).double()
    gen = torch.Generator().manual_seed(1)
    batches = [
        [torch.randn(2, B, 3, 32, 32, generator=gen, dtype=torch.float64) for _ in range(n)]
        for n in [STEPS_PER_EPOCH] * EPOCHS
    ]
    return model, batches


def lightly_loop(model, batches):
    """examples/pytorch/moco.py's loop; (losses, bank, bank_ptr)."""
    torch.manual_seed(2)  # the bank is drawn when the criterion is built
    criterion = NTXentLoss(memory_bank_size=(K, C)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)
    losses = []
    for epoch in range(EPOCHS):
        momentum_val = cosine_schedule(epoch, EPOCHS, 0.996, 1)
        for x_query, x_key in batches[epoch]:
            update_momentum(model.backbone, model.backbone_momentum, m=momentum_val)
            update_momentum(model.projection_head, model.projection_head_momentum, m=momentum_val)
            query = model(x_query)
            key = model.forward_momentum(x_key)
            loss = criterion(query, key)
            losses.append(loss.detach())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return torch.stack(losses), criterion.memory_bank.bank, criterion.memory_bank.bank_ptr


def fastmoco_loop(model, batches, *, normalize_keys=True):
    """The same loop with fastmoco's ops; (losses, queue, ptr)."""
    torch.manual_seed(2)  # the same initial bank: unit rows drawn in fp32
    queue = F.normalize(torch.randn(K, C), dim=-1).double()
    ptr = torch.zeros(1, dtype=torch.long)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)
    losses = []
    for epoch in range(EPOCHS):
        m = cosine_schedule(epoch, EPOCHS, 0.996, 1)
        for x_query, x_key in batches[epoch]:
            momentum_update_(model.backbone_momentum, model.backbone, m)  # target (EMA) first
            momentum_update_(model.projection_head_momentum, model.projection_head, m)
            query = model(x_query)
            key = model.forward_momentum(x_key)
            loss = info_nce(query, key, queue, temperature=0.5)  # normalises q and k only
            losses.append(loss.detach())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            enqueue_(queue, ptr, F.normalize(key, dim=1) if normalize_keys else key)
    return torch.stack(losses), queue, ptr


def test_lightly_moco_loop_with_fastmoco_ops_matches_lightly():
    model, batches = _model_and_batches()
    theirs, ours = model, copy.deepcopy(model)
    start = copy.deepcopy(model.state_dict())
    their_losses, bank, bank_ptr = lightly_loop(theirs, batches)
    our_losses, queue, ptr = fastmoco_loop(ours, batches)

    assert their_losses.dtype == our_losses.dtype == torch.float64
    for step, (a, b) in enumerate(zip(our_losses, their_losses, strict=True)):
        assert rel_error(a, b) <= TOL, f"step {step}: loss {a.item():.17g} vs {b.item():.17g}"
    assert torch.equal(ptr, bank_ptr) and ptr.item() == EPOCHS * STEPS_PER_EPOCH * B % K
    assert rel_error(queue, bank) <= TOL, f"queue: relative error {rel_error(queue, bank):.3g}"
    for name, want in theirs.state_dict().items():
        got = ours.state_dict()[name]
        if want.is_floating_point():
            err = rel_error(got, want)
            assert err <= WEIGHT_TOL, f"{name}: relative error {err:.3g}"
        else:
            assert torch.equal(got, want), name
    # the loop moved what it should: every row of the queue rewritten, both encoders changed
    torch.manual_seed(2)
    initial = F.normalize(torch.randn(K, C), dim=-1).double()
    assert (queue != initial).any(dim=1).all(), "rows of the queue never written"
    for name in ("backbone.0.weight", "backbone_momentum.0.weight",
                 "projection_head_momentum.2.weight"):  # fmt: skip
        assert rel_error(start[name], theirs.state_dict()[name]) > 1e-6, f"{name} did not move"


def test_unnormalised_keys_in_the_queue_part_the_losses():
    """The pitfall the README names: info_nce uses the queue as given, so enqueueing the raw
    keys (lightly's bank normalises them) changes every loss after the first step."""
    model, batches = _model_and_batches()
    their_losses, _, _ = lightly_loop(copy.deepcopy(model), batches)
    our_losses, _, _ = fastmoco_loop(model, batches, normalize_keys=False)
    assert rel_error(our_losses[0], their_losses[0]) <= TOL  # the same initial queue
    for step in range(1, len(our_losses)):
        assert rel_error(our_losses[step], their_losses[step]) > 1e-6, f"step {step}"


def test_lightly_argument_order_is_refused():
    """update_momentum(model, model_ema, m) copied as momentum_update_(model, model_ema, m)
    would pull the trained model toward its copy: refused, nothing written."""
    model, _ = _model_and_batches()
    before = copy.deepcopy(model.state_dict())
    right_call = r"looks reversed.*momentum_update_\(model_ema, model, m\)"
    with pytest.raises(ValueError, match=right_call):
        momentum_update_(model.backbone, model.backbone_momentum, 0.99)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} written"
