"""A 2-D toy problem for tests and benchmarks: the checkerboard distribution and a small two-time MLP.

Conventions: ``t = 0`` data, ``t = 1`` noise, ``0 <= r <= t <= 1``; the MLP predicts the average velocity
``u(z, r, t)`` from ``(z, t, t - r)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def sample_checkerboard(n: int, generator: Optional[torch.Generator] = None, squares: int = 4) -> torch.Tensor:
    """``n`` points, shape ``(n, 2)``, uniform on the black squares of a ``squares x squares`` board on
    ``[-2, 2]^2`` (every other unit square), so the mean is 0 and the coordinates have unit-ish scale."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    half = squares // 2
    cell = torch.randint(0, squares, (n, 2), generator=generator)
    # Move the column so that row + column is even: black squares only.
    cell[:, 1] = (cell[:, 1] - ((cell[:, 0] + cell[:, 1]) % 2)) % squares
    offset = torch.rand(n, 2, generator=generator)
    return (cell + offset - half) * (2.0 / half)


class TwoTimeMLP(nn.Module):
    """``u(z, r, t)`` for flattened data: an MLP on ``[z, t, t - r]`` with SiLU activations.

    Input ``z`` of shape ``(B, dim)``, ``r`` and ``t`` of shape ``(B,)``; output ``(B, dim)``."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 4):
        super().__init__()
        layers, width = [], dim + 2
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, t[:, None].to(z.dtype), (t - r)[:, None].to(z.dtype)], dim=1))


@torch.no_grad()
def sample_average_velocity(model, noise: torch.Tensor, num_steps: int = 1) -> torch.Tensor:
    """Generate from ``noise`` (``z_1``) with ``num_steps`` uniform steps of ``z_r = z_t - (t - r) u(z_t, r, t)``."""
    grid = torch.linspace(1.0, 0.0, num_steps + 1)
    z = noise
    for t, r in zip(grid[:-1], grid[1:]):
        b = z.shape[0]
        z = z - (t - r) * model(z, r.expand(b).to(z), t.expand(b).to(z))
    return z


@torch.no_grad()
def sample_euler(model, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Euler integration of the instantaneous velocity ``u(z, t, t)`` from ``t = 1`` to 0 in ``num_steps`` steps."""
    grid = torch.linspace(1.0, 0.0, num_steps + 1)
    z = noise
    for t, r in zip(grid[:-1], grid[1:]):
        b = z.shape[0]
        tt = t.expand(b).to(z)
        z = z - (t - r) * model(z, tt, tt)
    return z
