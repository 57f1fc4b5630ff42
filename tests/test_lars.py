"""LARS on foreach ops against the official per-parameter loop (moco-v3's optimizer.py)."""

import pytest
import torch
from torch import nn

from fastmoco.engine.optim import LARS, build_optimizer


class LoopLARS(torch.optim.Optimizer):
    """MoCo v3's LARS written plainly: one tensor at a time (the test oracle)."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:  # not a bias or a norm layer's gamma/beta
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(
                            update_norm > 0,
                            (g["trust_coefficient"] * param_norm / update_norm),
                            one,
                        ),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def _net(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)
    )
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)  # BN gamma away from 1: its update shows
    return net


@pytest.mark.parametrize("wd,tc", [(1e-6, 0.001), (0.1, 0.02)])
def test_lars_matches_per_parameter_loop(wd, tc):
    nets = [_net(0), _net(0)]
    with torch.no_grad():
        nets[1][0].bias.zero_()  # a zero tensor: ratio 1 branch, same in both
        nets[0][0].bias.zero_()
    opts = [
        LARS(nets[0].parameters(), lr=0.5, weight_decay=wd, momentum=0.9, trust_coefficient=tc),
        LoopLARS(nets[1].parameters(), lr=0.5, weight_decay=wd, momentum=0.9, trust_coefficient=tc),
    ]
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(6, 3, 6, 6, generator=g)
        for net, opt in zip(nets, opts, strict=True):
            opt.zero_grad()
            net(x).square().mean().backward()
            if step == 2:
                net[4].bias.grad = None  # a parameter without a gradient this step is skipped
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    start = list(_net(0).parameters())
    assert all(not torch.equal(a, b) for a, b in zip(start, nets[0].parameters(), strict=True))


def test_lars_excludes_1d_tensors_from_decay_and_adaptation():
    """A 1-d tensor takes plain momentum SGD steps; a 2-d one moves by eta * ||w|| * lr."""
    w = nn.Parameter(torch.full((4, 4), 2.0))  # ||w|| = 8
    b = nn.Parameter(torch.full((4,), 2.0))
    opt = LARS([w, b], lr=1.0, weight_decay=0.5, momentum=0.9, trust_coefficient=0.01)
    w.grad = torch.ones(4, 4)
    b.grad = torch.ones(4)
    opt.step()
    torch.testing.assert_close(b, torch.full((4,), 1.0))  # 2 - lr * g, no decay
    # d = 1 + 0.5 * 2 = 2 everywhere, ||d|| = 8, ratio = 0.01 * 8 / 8: step 0.01 * 2
    torch.testing.assert_close(w, torch.full((4, 4), 2.0 - 0.02))


def test_build_optimizer_and_frozen_params():
    net = _net(0)
    net[0].weight.requires_grad_(False)
    opt = build_optimizer("lars", net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    assert isinstance(opt, LARS)
    assert all(p is not net[0].weight for p in opt.param_groups[0]["params"])
    adamw = build_optimizer("adamw", net.parameters(), lr=1e-3, momentum=0.9, weight_decay=0.1)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.1
    sgd = build_optimizer("sgd", net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert isinstance(sgd, torch.optim.SGD)
    with pytest.raises(ValueError, match="choose one of"):
        build_optimizer("adam", net.parameters(), lr=0.1, momentum=0.9, weight_decay=0)
    with pytest.raises(ValueError, match="momentum"):
        LARS(net.parameters(), lr=0.1, momentum=1.5)


def test_lars_state_dict_round_trip():
    net = _net(0)
    opt = LARS(net.parameters(), lr=0.1, weight_decay=1e-6)
    net(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    opt2 = LARS(_net(0).parameters(), lr=0.1, weight_decay=1e-6)
    opt2.load_state_dict(opt.state_dict())
    mus = [opt2.state[p]["mu"] for p in opt2.param_groups[0]["params"]]
    want = [opt.state[p]["mu"] for p in opt.param_groups[0]["params"]]
    for a, b in zip(mus, want, strict=True):
        torch.testing.assert_close(a, b)
