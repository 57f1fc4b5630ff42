"""contrastive_margin_loss (DrLIM) against the paper's formula, pair by pair; gradients."""

import pytest
import torch

from fastmoco.ops import contrastive_margin_loss
from fastmoco.ops.reference import contrastive_margin_loss_reference


def _pairs(N, C, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(N, C, generator=g, dtype=dtype) * 0.4
    x2 = torch.randn(N, C, generator=g, dtype=dtype) * 0.4
    y = (torch.rand(N, generator=g) < 0.5).to(dtype)
    return x1, x2, y


@pytest.mark.parametrize("N,C", [(1, 3), (7, 5), (64, 16)])
@pytest.mark.parametrize("margin", [0.5, 1.0, 2.0])
def test_matches_formula(N, C, margin):
    x1, x2, y = _pairs(N, C, seed=N * 10 + C)
    got = contrastive_margin_loss(x1, x2, y, margin)
    want = contrastive_margin_loss_reference(x1, x2, y, margin)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_terms_by_hand():
    """D = 0.6 for both pairs: similar 0.18; dissimilar (1 - 0.6)^2 / 2 = 0.08; far: 0."""
    x1 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    x2 = torch.tensor([[0.6, 0.0], [0.0, 0.6], [3.0, 4.0]])
    y = torch.tensor([0, 1, 1])
    terms = contrastive_margin_loss(x1, x2, y, 1.0, reduction="none")
    torch.testing.assert_close(terms, torch.tensor([0.18, 0.08, 0.0]))
    torch.testing.assert_close(contrastive_margin_loss(x1, x2, y, 1.0), terms.mean())
    total = contrastive_margin_loss(x1, x2, y, 1.0, reduction="sum")
    torch.testing.assert_close(total, terms.sum())


def test_gradcheck_fp64():
    x1, x2, y = _pairs(6, 4, seed=3)
    x1.requires_grad_()
    x2.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: contrastive_margin_loss(a, b, y, 1.0), (x1, x2))


def test_gradient_matches_reference_and_closed_form():
    x1, x2, y = _pairs(16, 8, seed=5)
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    contrastive_margin_loss(a, b, y, 1.0).backward()
    ra, rb = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    contrastive_margin_loss_reference(ra, rb, y, 1.0).backward()
    torch.testing.assert_close(a.grad, ra.grad)
    torch.testing.assert_close(b.grad, rb.grad)
    diff = x1 - x2
    D = diff.norm(dim=1, keepdim=True)
    yk = y[:, None]
    want = ((1 - yk) * diff - yk * (1.0 - D).clamp_min(0) * diff / D) / len(y)
    torch.testing.assert_close(a.grad, want)
    torch.testing.assert_close(b.grad, -want)


def test_identical_dissimilar_points_give_finite_gradient():
    x = torch.zeros(2, 3, requires_grad=True)
    loss = contrastive_margin_loss(x, x.detach().clone(), torch.ones(2), 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.5, abs=1e-5) and torch.isfinite(x.grad).all()


def test_fp32_and_bf16_inputs_accumulate_in_fp32():
    x1, x2, y = _pairs(32, 8, seed=7, dtype=torch.float32)
    want = contrastive_margin_loss_reference(x1.double(), x2.double(), y.double(), 1.0)
    got = contrastive_margin_loss(x1, x2, y, 1.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got_bf16 = contrastive_margin_loss(x1.bfloat16(), x2.bfloat16(), y, 1.0)
    assert got_bf16.dtype == torch.float32
    torch.testing.assert_close(got_bf16.double(), want, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize(
    "x1,x2,y,margin,match",
    [
        (torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(4), 1.0, "x1 and x2"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(3), 1.0, "one label per pair"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4), 0.0, "margin"),
        (torch.zeros(4), torch.zeros(4), torch.zeros(4), 1.0, r"\(N, C\)"),
    ],
)
def test_bad_input_is_a_clear_error(x1, x2, y, margin, match):
    with pytest.raises(ValueError, match=match):
        contrastive_margin_loss(x1, x2, y, margin)
