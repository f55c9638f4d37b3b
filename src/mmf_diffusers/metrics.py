"""Cheap distribution distances for tests and toys (flattened samples ``(N, D)``)."""

from __future__ import annotations

from typing import Optional

import torch


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, generator: Optional[torch.Generator] = None
) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point clouds of shape ``(N, D)``.

    Projects both on ``num_projections`` random unit directions, sorts, and returns
    ``sqrt(mean over directions and points of (sorted_x - sorted_y)^2)``. It is 0 for identical sets and, for a
    shift ``c`` of one set, equals ``|c| / sqrt(D)`` on average over directions (tested).
    """
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    directions = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ directions, dim=0)
    py, _ = torch.sort(y @ directions, dim=0)
    return (px - py).pow(2).mean().sqrt().item()
