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
    net = SmallUNet(base=8, time_dim=16)
    net(torch.randn(2, 1, 28, 28), torch.rand(2)).pow(2).mean().backward()
    assert all(p.grad is not None for p in net.parameters())
