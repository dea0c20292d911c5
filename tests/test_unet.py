"""SmallUNet: size, shapes and dependence on time."""

from __future__ import annotations

import pytest
import torch

from bound_tuner.models.unet import SmallUNet, time_embedding


def test_parameter_count():
    n = sum(p.numel() for p in SmallUNet().parameters())
    assert 500_000 <= n <= 2_000_000, n
    assert sum(p.numel() for p in SmallUNet(base=8).parameters()) < n


def test_shapes_and_time():
    torch.manual_seed(0)
    net = SmallUNet(channels=1, base=8, time_dim=32)
    x = torch.randn(3, 1, 28, 28)
    out = net(x, torch.tensor([0.001, 0.5, 2.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    # a scalar time is broadcast; different times give different outputs
    a, b = net(x, 0.1), net(x, torch.full((3,), 0.1))
    assert torch.allclose(a, b)
    assert not torch.allclose(net(x, 0.1), net(x, 0.2))
    assert net(torch.randn(2, 1, 32, 32), 0.3).shape == (2, 1, 32, 32)
    assert SmallUNet(channels=3, base=8)(torch.randn(2, 3, 28, 28), 0.3).shape == (2, 3, 28, 28)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(2, 1, 30, 30), 0.3)


def test_time_embedding():
    e = time_embedding(torch.tensor([0.0, 1.0]), 16)
    assert e.shape == (2, 16) and torch.allclose(e[0, :8], torch.zeros(8))
    assert time_embedding(torch.tensor([0.5]), 7).shape == (1, 7)


def test_backward():
    """Every parameter gets a finite, non-zero gradient, and the gradient is the loss's own
    (a central difference along one parameter agrees with it)."""
    torch.manual_seed(0)
    net = SmallUNet(base=8, time_dim=16).double()
    x, t = torch.randn(2, 1, 28, 28, dtype=torch.float64), torch.rand(2, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return net(x, t).pow(2).mean()

    loss().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"{name} gets no gradient"
    p = next(net.parameters())  # the first layer: the gradient has passed through every other
    direction = torch.randn_like(p)
    eps = 1e-6
    with torch.no_grad():
        p += eps * direction
        up = loss().item()
        p -= 2 * eps * direction
        down = loss().item()
        p += eps * direction
    numeric = (up - down) / (2 * eps)
    assert numeric == pytest.approx(float((p.grad * direction).sum()), rel=1e-5)
