"""Trajectory data with a known ground truth, and trajectory metrics.

Layout everywhere: a batch of trajectories is ``(N, C, L)``: N trajectories, C state channels, L time points spaced
``dt`` apart (the layout of `UNet1DModel`). `load_trajectories_npy` also reads ``(N, L, C)`` when told so.

Systems (`SYSTEMS`), simulated on the fly with RK4 in float64 (``substeps`` RK4 steps per sample interval):
    * ``pendulum``: state ``(theta, omega)``; ``theta' = omega``, ``omega' = -(g / l) sin(theta) - gamma * omega``
      with ``g / l = 9.81`` and a damping ``gamma`` drawn per trajectory from ``[0.1, 0.5]`` (unobserved, so the
      future from a start state is a *distribution*). Training starts: ``|theta0| <= 1.2`` rad, ``|omega0| <= 1.5``;
      out-of-range starts: ``1.6 <= |theta0| <= 2.4`` (large swings where ``sin`` is far from linear).
    * ``spring``: two unit masses between walls, three springs ``k = 4``: state ``(x1, x2, v1, v2)``;
      ``x' = v``, ``v1' = -k x1 + k (x2 - x1) - gamma v1``, ``v2' = -k x2 - k (x2 - x1) - gamma v2``, ``gamma`` per
      trajectory in ``[0.1, 0.5]``. Training starts: positions and velocities in ``[-1, 1]``; out-of-range starts:
      positions with ``1.5 <= |x| <= 2.5``.

Metrics: `dynamics_residual` (how well a trajectory obeys the known ODE, ~0 for ground truth, O(1) for noise) and
`mmf_diffusers.metrics.sliced_wasserstein` on flattened normalised trajectories (`distribution_distance`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from .metrics import sliced_wasserstein


@dataclass(frozen=True)
class PhysicalSystem:
    """A damped ODE ``s' = f(s; gamma)`` with per-trajectory damping ``gamma`` and boxes of initial states.

    ``train_box`` / ``ood_box``: per channel ``(low, high)`` of ``|s0|`` (a random sign is applied when ``symmetric``),
    i.e. the out-of-range box excludes the training box where their ranges do not overlap.
    """

    name: str
    channel_names: Tuple[str, ...]
    dt: float
    damping_range: Tuple[float, float]
    train_box: Tuple[Tuple[float, float], ...]
    ood_box: Tuple[Tuple[float, float], ...]

    @property
    def channels(self) -> int:
        return len(self.channel_names)

    def rhs(self, s: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """``f(s; gamma)`` for states ``s`` of shape ``(N, C, ...)`` and damping ``gamma`` of shape ``(N,)``."""
        g = gamma.view((-1,) + (1,) * (s.dim() - 2))
        if self.name == "pendulum":
            theta, omega = s[:, 0], s[:, 1]
            return torch.stack([omega, -9.81 * torch.sin(theta) - g * omega], dim=1)
        if self.name == "spring":
            k = 4.0
            x1, x2, v1, v2 = s[:, 0], s[:, 1], s[:, 2], s[:, 3]
            a1 = -k * x1 + k * (x2 - x1) - g * v1
            a2 = -k * x2 - k * (x2 - x1) - g * v2
            return torch.stack([v1, v2, a1, a2], dim=1)
        raise ValueError(f"unknown system {self.name!r}")

    def damping_term(self, s: torch.Tensor) -> torch.Tensor:
        """The damping enters ``f`` linearly, ``f(s; gamma) = f(s; 0) - gamma * D(s)``; returns ``D(s)`` (the shape of
        ``s``): the velocity channels (the second half) on the acceleration rows, 0 elsewhere."""
        d = torch.zeros_like(s)
        half = self.channels // 2
        d[:, half:] = s[:, half:]
        return d


SYSTEMS = {
    "pendulum": PhysicalSystem(
        name="pendulum", channel_names=("theta", "omega"), dt=0.05, damping_range=(0.1, 0.5),
        train_box=((0.0, 1.2), (0.0, 1.5)), ood_box=((1.6, 2.4), (0.0, 1.5)),
    ),
    "spring": PhysicalSystem(
        name="spring", channel_names=("x1", "x2", "v1", "v2"), dt=0.05, damping_range=(0.1, 0.5),
        train_box=((0.0, 1.0), (0.0, 1.0), (0.0, 1.0), (0.0, 1.0)),
        ood_box=((1.5, 2.5), (1.5, 2.5), (0.0, 1.0), (0.0, 1.0)),
    ),
}


def get_system(name: str) -> PhysicalSystem:
    if name not in SYSTEMS:
        raise ValueError(f"Unknown trajectory system {name!r}; choose one of {tuple(SYSTEMS)}")
    return SYSTEMS[name]


def sample_initial_states(system: PhysicalSystem, n: int, split: str = "train",
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``(n, C)`` float64 initial states: per channel ``sign * U(low, high)`` from ``system.train_box`` (``split=
    "train"``) or ``system.ood_box`` (``split="ood"``)."""
    if split not in ("train", "ood"):
        raise ValueError(f"split must be 'train' or 'ood', got {split!r}")
    box = torch.tensor(system.train_box if split == "train" else system.ood_box, dtype=torch.float64)
    u = torch.rand(n, system.channels, generator=generator, dtype=torch.float64)
    sign = torch.where(torch.rand(n, system.channels, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return sign * (box[:, 0] + u * (box[:, 1] - box[:, 0]))


def sample_damping(system: PhysicalSystem, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    low, high = system.damping_range
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def simulate(system: PhysicalSystem, initial_states: torch.Tensor, damping: torch.Tensor, length: int,
             substeps: int = 10) -> torch.Tensor:
    """Integrate with classical RK4 (``substeps`` steps per ``dt``) in float64. Returns ``(N, C, length)``, whose
    first time point is ``initial_states``."""
    s = initial_states.to(torch.float64)
    damping = damping.to(torch.float64)
    h = system.dt / substeps
    out = [s]
    for _ in range(length - 1):
        for _ in range(substeps):
            k1 = system.rhs(s, damping)
            k2 = system.rhs(s + 0.5 * h * k1, damping)
            k3 = system.rhs(s + 0.5 * h * k2, damping)
            k4 = system.rhs(s + h * k3, damping)
            s = s + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(s)
    return torch.stack(out, dim=-1)


def make_trajectories(system: PhysicalSystem, n: int, length: int, split: str = "train", seed: int = 0,
                      initial_states: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``n`` ground-truth trajectories ``(n, C, length)`` (float64, physical units) from ``split``'s initial states
    (or the given ones, ``(n, C)``) with random damping; deterministic given ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    if initial_states is None:
        initial_states = sample_initial_states(system, n, split, generator)
    return simulate(system, initial_states, sample_damping(system, initial_states.shape[0], generator), length)


def load_trajectories_npy(path: str, layout: str = "NCL") -> torch.Tensor:
    """Read user trajectories from a ``.npy`` file: an array ``(N, C, L)`` (``layout="NCL"``, the default) or
    ``(N, L, C)`` (``layout="NLC"``). Returns float64 ``(N, C, L)``; raises ValueError on anything else."""
    if layout not in ("NCL", "NLC"):
        raise ValueError(f"layout must be 'NCL' or 'NLC', got {layout!r}")
    array = np.load(path, allow_pickle=False)
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{path}: expected a numeric array (N, C, L) or (N, L, C), got shape {array.shape} "
                         f"{array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: the trajectories contain NaN or infinity")
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
    return x if layout == "NCL" else x.transpose(1, 2).contiguous()


def channel_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over trajectories and time of ``x (N, C, L)``; a constant channel gets std 1."""
    mean = x.mean(dim=(0, 2))
    std = x.std(dim=(0, 2))
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))


class TrajectoryDataset:
    """Map-style dataset of normalised trajectories for the training script's `ShardedBatchSampler`.

    Items are addressed by ``(index, epoch)``; with probability ``condition_prob`` (decided by
    ``np.random.default_rng([seed, epoch, index])``) the item is *conditioned*: its first time step is marked known.
    Returns float32 arrays ``(C + 1, L)``: the normalised trajectory plus the known-mask channel (see
    `mmf_diffusers.unet1d`).
    """

    def __init__(self, trajectories: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, condition_prob: float = 0.5,
                 seed: int = 0):
        if not 0.0 <= condition_prob <= 1.0:
            raise ValueError(f"condition_prob must be in [0, 1], got {condition_prob}")
        normalised = (trajectories - mean[None, :, None]) / std[None, :, None]
        self.data = normalised.to(torch.float32).numpy()
        self.condition_prob = float(condition_prob)
        self.seed = seed

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, item) -> np.ndarray:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        x = self.data[index]
        mask = np.zeros((1, x.shape[1]), dtype=np.float32)
        if np.random.default_rng([self.seed, epoch, index]).random() < self.condition_prob:
            mask[0, 0] = 1.0
        return np.concatenate([x, mask], axis=0)


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def derivative_scale(system: PhysicalSystem, length: int, n: int = 256, seed: int = 12345) -> torch.Tensor:
    """Per-channel RMS of ``ds/dt`` over ground-truth trajectories from the training range ``(C,)``: the unit in which
    `dynamics_residual` reports residuals (fixed, so it means the same for every set of trajectories)."""
    x = make_trajectories(system, n, length, "train", seed=seed)
    return system.rhs(x, torch.full((n,), float(np.mean(system.damping_range)), dtype=torch.float64)).pow(2).mean(
        dim=(0, 2)).sqrt()


def dynamics_residual(system: PhysicalSystem, x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How well each trajectory ``x (N, C, L)`` (physical units) obeys the system's ODE: the trapezoidal residual
    ``(s[k+1] - s[k]) / dt - (f(s[k]) + f(s[k+1])) / 2``, with the unknown damping fitted per trajectory by least
    squares (clipped to ``system.damping_range``), divided per channel by ``scale`` (default `derivative_scale`),
    RMS over channels and time. Returns ``(N,)``; ground truth gives ~1e-3 (the trapezoid rule's own error at this
    ``dt``), white noise O(10).
    """
    x = x.to(torch.float64)
    if scale is None:
        scale = derivative_scale(system, x.shape[-1])
    scale = scale.to(torch.float64).view(1, -1, 1)
    zero = torch.zeros(x.shape[0], dtype=torch.float64)
    f0 = system.rhs(x, zero)
    d = system.damping_term(x)
    dx = (x[..., 1:] - x[..., :-1]) / system.dt
    # residual(gamma) = a + gamma * c, linear in gamma: least squares per trajectory, then clipped to the known range.
    a = (dx - 0.5 * (f0[..., 1:] + f0[..., :-1])) / scale
    c = 0.5 * (d[..., 1:] + d[..., :-1]) / scale
    gamma = -(a * c).sum(dim=(1, 2)) / (c * c).sum(dim=(1, 2)).clamp_min(1e-12)
    gamma = gamma.clamp(*system.damping_range)
    residual = a + gamma.view(-1, 1, 1) * c
    return residual.pow(2).mean(dim=(1, 2)).sqrt()


def distribution_distance(x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                          num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 between two equal-size sets of trajectories ``(N, C, L)`` (physical units), computed on
    per-channel normalised, flattened trajectories (`mmf_diffusers.metrics.sliced_wasserstein`)."""
    def norm(a):
        return ((a.to(torch.float64) - mean.view(1, -1, 1)) / std.view(1, -1, 1)).flatten(1)

    return sliced_wasserstein(norm(x), norm(y), num_projections, torch.Generator().manual_seed(seed))


def plot_trajectories(rows, mean: torch.Tensor, std: torch.Tensor, width: int = 360, height: int = 110):
    """A PIL image: one row of panels per entry of ``rows`` (a dict ``title -> (N, C, L)`` trajectories in physical
    units), one panel per channel, the vertical axis spanning ``mean +- 3 std`` of that channel."""
    from PIL import Image, ImageDraw

    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127)]
    channels = next(iter(rows.values())).shape[1]
    title_h = 16
    image = Image.new("RGB", (width * channels, (height + title_h) * len(rows)), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, x) in enumerate(rows.items()):
        x = x.detach().to(torch.float64).cpu()
        top = i * (height + title_h)
        draw.text((4, top + 2), title, fill="black")
        for c in range(channels):
            left = c * width
            lo, hi = float(mean[c] - 3 * std[c]), float(mean[c] + 3 * std[c])
            draw.rectangle([left + 2, top + title_h, left + width - 3, top + title_h + height - 3], outline="grey")
            length = x.shape[-1]
            for n in range(x.shape[0]):
                ys = ((x[n, c] - lo) / (hi - lo)).clamp(0, 1)
                points = [(left + 4 + k * (width - 10) / max(length - 1, 1), top + title_h + (height - 6) * (1 - y))
                          for k, y in enumerate(ys.tolist())]
                draw.line(points, fill=colours[n % len(colours)], width=1)
    return image


__all__ = [
    "SYSTEMS", "PhysicalSystem", "TrajectoryDataset", "channel_stats", "derivative_scale", "distribution_distance",
    "dynamics_residual", "get_system", "plot_trajectories", "load_trajectories_npy", "make_trajectories", "sample_damping",
    "sample_initial_states", "simulate",
]
