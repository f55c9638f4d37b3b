"""Two-time `UNet1DModel` backbones for MMF on trajectories ``(B, C, L)``.

A stock diffusers `UNet1DModel` (the residual temporal U-Net of Janner et al.'s Diffuser: ``DownResnetBlock1D``,
``MidResTemporalBlock1D``, ``UpResnetBlock1D``, ``OutConv1DBlock``) takes one timestep ``t``, embedded and added in
every residual block. Its ``extra_in_channels`` widen the first convolution; they carry a known-entries mask and the
second time ``h = t - r`` as broadcast sinusoids. `mmf_diffusers.pipeline_mmf_trajectory.trajectory_average_velocity`
is the one place that packs ``(z, known_mask, r, t)`` into those inputs; see that module for why.

The loss (`ModularMeanFlowLoss`) calls ``model_fn(z, r, t)`` on row subsets, so per-row conditioning cannot be a
side argument. `trajectory_model_fn` therefore works on *augmented* samples ``(B, C + 1, L)``: the last channel is the
known mask. Its noise equals its data (`freeze_known_entries`), so it stays fixed along the path, its target velocity
is 0 and the model returns 0 for it: it adds nothing to the loss but an exact 0 (the per-sample mean is over
``C + 1`` channels, a constant factor ``C / (C + 1)`` on the rest).

Forward-mode AD: these blocks have no attention (the Dance-Diffusion blocks ``AttnDownBlock1D`` do, with a plain
matmul attention, no SDPA); ``group_norm`` runs on ``(B, C, 1, L)`` views, which torch.func.jvp handles (tested in
float64 against `torch.autograd.functional.jvp`, ``tests/test_trajectory.py``). No processor swap is needed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import UNet1DModel

from .pipeline_mmf_trajectory import (
    DEFAULT_SECOND_TIME_CHANNELS,
    DEFAULT_TIME_SCALE,
    check_trajectory_unet,
    trajectory_average_velocity,
)

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: GroupNorm in diffusers' ``Conv1dBlock`` always uses 8 groups, so every level's channel count must divide by 8.
_CONV1D_BLOCK_GROUPS = 8


def build_mmf_unet1d(
    channels: int,
    length: int,
    block_out_channels: Sequence[int] = (32, 64, 128),
    layers_per_block: int = 1,
    second_time_channels: int = DEFAULT_SECOND_TIME_CHANNELS,
) -> UNet1DModel:
    """A stock `UNet1DModel` (Diffuser-style residual temporal blocks, Mish, positional time embedding) with
    ``extra_in_channels = 1 + second_time_channels`` for the known mask and the second time.

    Args:
        channels: state channels C (``in_channels = out_channels = C``).
        length: trajectory length L (the config's ``sample_size``); each level but the last halves it, so it must be
            divisible by ``2 ** (len(block_out_channels) - 1)``.
        block_out_channels: channels per level; each must be divisible by 8 (diffusers' Conv1dBlock GroupNorm).
        layers_per_block: extra residual blocks per level.
        second_time_channels: sinusoid channels of ``h = t - r`` (even).
    """
    levels = len(block_out_channels)
    if levels < 2:
        raise ValueError("block_out_channels needs at least two levels")
    if length % 2 ** (levels - 1):
        raise ValueError(f"length={length} is not divisible by 2**{levels - 1} for {levels} levels")
    if any(c % _CONV1D_BLOCK_GROUPS for c in block_out_channels):
        raise ValueError(f"every entry of block_out_channels={tuple(block_out_channels)} must divide by 8 "
                         "(diffusers' Conv1dBlock uses GroupNorm with 8 groups)")
    if second_time_channels <= 0 or second_time_channels % 2:
        raise ValueError(f"second_time_channels must be a positive even number, got {second_time_channels}")
    unet = UNet1DModel(
        sample_size=length,
        in_channels=channels,
        out_channels=channels,
        extra_in_channels=1 + second_time_channels,
        time_embedding_type="positional",
        use_timestep_embedding=True,
        flip_sin_to_cos=False,
        freq_shift=1,
        down_block_types=("DownResnetBlock1D",) * levels,
        up_block_types=("UpResnetBlock1D",) * (levels - 1),
        mid_block_type="MidResTemporalBlock1D",
        out_block_type="OutConv1DBlock",
        block_out_channels=tuple(block_out_channels),
        act_fn="mish",
        norm_num_groups=_CONV1D_BLOCK_GROUPS,
        layers_per_block=layers_per_block,
    )
    check_trajectory_unet(unet, second_time_channels)
    return unet


def split_augmented(z_aug: torch.Tensor):
    """``(B, C + 1, L)`` -> ``(z (B, C, L), known_mask (B, 1, L))``. The mask is rounded to 0/1: along the path it is
    ``(1 - t) m + t m``, which is ``m`` only up to rounding, and u must be exactly 0 on known entries."""
    return z_aug[:, :-1], (z_aug[:, -1:] > 0.5).to(z_aug.dtype)


def trajectory_model_fn(
    unet: torch.nn.Module,
    time_scale: float = DEFAULT_TIME_SCALE,
    second_time_channels: int = DEFAULT_SECOND_TIME_CHANNELS,
) -> ModelFn:
    """``model_fn(z_aug, r, t) -> u_aug`` for `ModularMeanFlowLoss`, on augmented samples ``(B, C + 1, L)`` whose last
    channel is the known mask; ``u_aug`` is the UNet's ``u`` (0 on known entries) with a zero mask channel appended.
    Same time mapping as `MMFTrajectoryPipeline`. ``unet`` may be wrapped (its forward is called)."""

    def model_fn(z_aug: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z, known_mask = split_augmented(z_aug)
        u = trajectory_average_velocity(unet, z, known_mask, r, t, time_scale=time_scale,
                                        second_time_channels=second_time_channels)
        return torch.cat([u, torch.zeros_like(known_mask)], dim=1)

    return model_fn


def augment(x: torch.Tensor, known_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x (B, C, L)`` and ``known_mask (B, 1, L)`` (default: nothing known) -> augmented ``(B, C + 1, L)``."""
    if known_mask is None:
        known_mask = torch.zeros_like(x[:, :1])
    return torch.cat([x, known_mask.to(x.dtype)], dim=1)


def freeze_known_entries(x_aug: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The noise for an augmented batch: equal to the data on the mask channel and on known entries, so that
    ``z_t = (1 - t) x + t e`` keeps them at their clean values for every t and their target velocity ``e - x`` is 0.
    ``x_aug`` and ``noise`` of shape ``(B, C + 1, L)``; returns a new tensor."""
    known = split_augmented(x_aug)[1].bool()
    known = torch.cat([known.expand_as(x_aug[:, :-1]), torch.ones_like(known)], dim=1)
    return torch.where(known, x_aug, noise)
