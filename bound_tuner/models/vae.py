"""VAEs with a Bernoulli likelihood for binarized images (docs/theory.md section 5).

Encoder q_phi(z|x) = N(mu(x), diag exp(logvar(x))), decoder p_theta(x|z) = Bernoulli(sigmoid(logits)),
prior N(0, I). Each model records its decoder's weights when it is built: ``initial_decoder()``
returns a frozen copy of that decoder theta_0, the generator that has seen no data, which the
bound's MI term compares against.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["MLPVAE", "ConvVAE", "VAEBase"]


class VAEBase(nn.Module):
    """Shared pieces: reparameterized sampling and the frozen initial decoder.

    Subclasses set ``self.encoder`` (x -> [b, 2 * latent]) and ``self.decoder`` (z -> logits)
    and call ``self._record_initial_decoder()`` at the end of ``__init__``.
    """

    latent: int
    encoder: nn.Module
    decoder: nn.Module

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x), each [b, latent]."""
        h = self.encoder(self._prepare(x))
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of p(x|z)."""
        return self.decoder(z)

    def sample_z(
        self,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """z = mu + exp(logvar / 2) * eps; eps drawn on mu's device from ``generator``."""
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, mu, logvar) with one z ~ q(z|x) per point."""
        mu, logvar = self.encode(x)
        return self.decode(self.sample_z(mu, logvar, generator=generator)), mu, logvar

    def _record_initial_decoder(self) -> None:
        self._decoder0_state = {
            k: v.detach().clone().cpu() for k, v in self.decoder.state_dict().items()
        }

    def reset_initial_decoder(self) -> None:
        """Take the current decoder as theta_0 (after loading weights saved at initialization)."""
        self._record_initial_decoder()

    def initial_decoder(self) -> nn.Module:
        """A frozen deep copy (eval mode, no gradients) of the decoder at initialization, theta_0.

        It lives on the decoder's current device and maps z to logits like ``decode``.
        """
        dec = copy.deepcopy(self.decoder)
        dec.load_state_dict(self._decoder0_state)
        dec.requires_grad_(False)
        return dec.eval()


class MLPVAE(VAEBase):
    """The paper's MLP VAE: input_dim -> 512 -> 256 -> (mu, logvar) in R^latent, mirrored decoder.

    ``input_dim`` is 784 for 28x28 images or 1024 for images padded to 32x32. Images [b, 1, H, W]
    are flattened; ``decode`` returns logits [b, input_dim].
    """

    def __init__(
        self, *, input_dim: int = 784, hidden: tuple[int, ...] = (512, 256), latent: int = 16
    ) -> None:
        super().__init__()
        if input_dim < 1 or latent < 1 or any(h < 1 for h in hidden):
            raise ValueError(
                f"input_dim={input_dim}, hidden={hidden}, latent={latent} must be >= 1"
            )
        self.input_dim, self.hidden, self.latent = input_dim, tuple(hidden), latent
        enc: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            enc += [nn.Linear(width, h), nn.ReLU()]
            width = h
        enc.append(nn.Linear(width, 2 * latent))
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = []
        width = latent
        for h in reversed(hidden):
            dec += [nn.Linear(width, h), nn.ReLU()]
            width = h
        dec.append(nn.Linear(width, input_dim))
        self.decoder = nn.Sequential(*dec)
        self._record_initial_decoder()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.input_dim:
            raise ValueError(
                f"MLPVAE(input_dim={self.input_dim}) got points of {x.shape[1]} values; "
                "use input_dim=784 for 28x28 images and 1024 for images padded to 32x32"
            )
        return x


class ConvVAE(VAEBase):
    """A small convolutional VAE for [b, 1, 28, 28] images (logits of the same shape).

    Encoder: conv 32 (stride 2, 14x14), conv 64 (stride 2, 7x7), dense 256, dense 2*latent.
    Decoder: the mirror image with transposed convolutions.
    """

    def __init__(self, *, latent: int = 16, channels: int = 1, width: int = 32) -> None:
        super().__init__()
        if latent < 1 or channels < 1 or width < 1:
            raise ValueError(f"latent={latent}, channels={channels}, width={width} must be >= 1")
        self.latent, self.channels, self.width = latent, channels, width
        c1, c2 = width, 2 * width
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, c1, 4, stride=2, padding=1),  # 14
            nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),  # 7
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c2 * 49, 256),
            nn.ReLU(),
            nn.Linear(256, 2 * latent),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent, 256),
            nn.ReLU(),
            nn.Linear(256, c2 * 49),
            nn.ReLU(),
            nn.Unflatten(1, (c2, 7, 7)),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),  # 14
            nn.ReLU(),
            nn.ConvTranspose2d(c1, channels, 4, stride=2, padding=1),  # 28
        )
        self._record_initial_decoder()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[1] == self.channels * 784:
            x = x.reshape(x.shape[0], self.channels, 28, 28)
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.channels, 28, 28):
            raise ValueError(
                f"ConvVAE expects [b, {self.channels}, 28, 28] images, got {tuple(x.shape)}"
            )
        return x
