"""Scheduler for Modular MeanFlow (MMF) models, which predict average velocities.

This file is self-contained: it imports only torch, numpy and diffusers, never anything from
`mmf_diffusers`, because it is also shipped as a remote-code file (`scheduler/scheduling_mmf.py`)
in Hub repositories for people who do not have the package installed.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

TimeLike = Union[float, torch.Tensor]


@dataclass
class MMFSchedulerOutput(BaseOutput):
    """
    Output class for [`MMFScheduler.step`].

    Args:
        prev_sample (`torch.Tensor` of the same shape as the `sample` given to `step`):
            The sample `z_r = z_t - (t - r) * u(z_t, r, t)` at the target time `r`, in the dtype of `model_output`.
            Feed it to the next step, or use it as the result when `r = 0`.
    """

    prev_sample: torch.Tensor


class MMFScheduler(SchedulerMixin, ConfigMixin):
    """
    Sampler for Modular MeanFlow (MMF) models, which learn the average velocity `u(z_t, r, t)`.

    Time convention: time runs from data to noise. `t = 0` is data, `t = 1` is pure noise, and the path is
    `z_t = (1 - t) * x + t * e` with `e ~ N(0, I)`. The average velocity over `[r, t]` (`0 <= r <= t <= 1`) moves
    a sample exactly: `z_r = z_t - (t - r) * u(z_t, r, t)`. One model call from `t = 1` to `r = 0` therefore
    generates a sample: `x = z_1 - u(z_1, 0, 1)`; more steps along a grid `1 = s_0 > s_1 > ... > s_N = 0` trade
    compute for quality.

    Times appear in two units, as in diffusers' flow-matching schedulers: *sigmas* in `[0, 1]` (the `t` above) and
    *timesteps* `= sigma * num_train_timesteps` (what `self.timesteps` holds and what `step` takes).

    The API and the numbers match diffusers' [`FlowMapEulerDiscreteScheduler`] wherever the two overlap, so either
    scheduler can drive an MMF model. Differences, all deliberate:
    - `self.sigmas` / `self.timesteps` are float32 (FlowMap keeps float64 except on MPS/NPU): the model consumes
      float32 timesteps, MPS and NPU have no float64, and one dtype on every device keeps results identical.
    - `step` rejects what FlowMap silently accepts: integer timesteps, `r > t`, times outside
      `[0, num_train_timesteps]`. It resolves 1-d per-sample timesteps element by element (FlowMap looks up only
      the first element).

    A new scheduler already has a grid, as every diffusers scheduler does (FlowMap, FlowMatchEuler, DDPM, DDIM...):
    the training grid of `num_train_timesteps` steps from 1 to 0 (with `shift` applied), the same as FlowMap's, so
    `timesteps`, `sigmas` and `num_inference_steps` are set (1000 by default) and `step` works before any
    `set_timesteps`. Pipelines call `set_timesteps(num_inference_steps)` before sampling and do not rely on it.

    This scheduler inherits from [`SchedulerMixin`] and [`ConfigMixin`]; see the superclass documentation for the
    generic methods (loading, saving, ...). It saves as `scheduler_config.json`.

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            The scale between sigmas and timesteps: `timestep = sigma * num_train_timesteps`.
        shift (`float`, defaults to 1.0):
            Timestep shift applied to the inference grid, `shift * s / (1 + (shift - 1) * s)`, as in
            [`FlowMapEulerDiscreteScheduler`]. `1.0` is the identity; values above 1 spend more steps near the noise
            end. Must be positive.
    """

    _compatibles = ["FlowMapEulerDiscreteScheduler"]
    order = 1
    # The initial sample is standard Gaussian noise, already at the scale z_1 = e.
    init_noise_sigma = 1.0
    # Absolute tolerance, in timestep units, for recognising a timestep as a grid point (FlowMap uses the same).
    _GRID_TOLERANCE = 1e-3

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)):
            raise ValueError(f"`num_train_timesteps` must be a positive integer, got {num_train_timesteps!r}.")
        if num_train_timesteps <= 0:
            raise ValueError(f"`num_train_timesteps` must be a positive integer, got {num_train_timesteps!r}.")
        if not shift > 0:
            raise ValueError(f"`shift` must be positive, got {shift!r}.")
        self.num_inference_steps: Optional[int] = None
        self.sigmas: Optional[torch.Tensor] = None
        self.timesteps: Optional[torch.Tensor] = None
        # Observable state only, as in FlowMap: `step` resolves its times from its arguments, never from here.
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None
        # diffusers' convention (see the class docstring): a scheduler has a grid from the start, the training grid.
        self.set_timesteps(int(num_train_timesteps), device="cpu")

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def step_index(self) -> Optional[int]:
        """Index of the current grid point; `None` until the first `step` after `set_timesteps`."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """Grid index the first `step` starts from, if set by `set_begin_index`; otherwise `None`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Anchor `step_index` for pipelines that start mid-grid; call it after `set_timesteps`."""
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[TimeLike] = None) -> torch.Tensor:
        """Return `sample` unchanged: MMF models take `z_t` as it is. Kept for the diffusers scheduler API."""
        return sample

    def apply_shift(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Apply the configured shift `shift * s / (1 + (shift - 1) * s)` to sigmas in `[0, 1]` (any shape)."""
        shift = self.config.shift
        if shift == 1.0:
            return sigmas
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    # ------------------------------------------------------------------------------------------------------------
    # Inference grid
    # ------------------------------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        sigmas: Optional[Union[Sequence[float], np.ndarray, torch.Tensor]] = None,
        timesteps: Optional[Union[Sequence[float], np.ndarray, torch.Tensor]] = None,
    ) -> None:
        """
        Build the inference grid.

        Sets `self.sigmas`, float32 of shape `(N + 1,)`, strictly decreasing from the first sigma (1 by default) to
        a terminal 0, and `self.timesteps = self.sigmas[:-1] * num_train_timesteps`, float32 of shape `(N,)`: one
        timestep per model call. `N = 1` is the one-step grid `[1, 0]`. The configured `shift` is applied to the
        default grid and to custom sigmas / timesteps alike.

        Args:
            num_inference_steps (`int`, *optional*):
                Number of steps `N`, a positive integer. Required unless `sigmas` or `timesteps` is given; if given
                with them, it must equal their length.
            device (`str` or `torch.device`, *optional*):
                Device for `self.sigmas` and `self.timesteps`.
            sigmas (sequence of `float`, *optional*):
                Custom grid of length `N` in `[0, 1]`, strictly decreasing and above 0; the terminal 0 is appended.
            timesteps (sequence of `float`, *optional*):
                Custom grid of length `N` in timestep units (`[0, num_train_timesteps]`), strictly decreasing and
                above 0; divided by `num_train_timesteps`, then treated like `sigmas`. Pass `sigmas` or
                `timesteps`, not both.
        """
        if sigmas is not None and timesteps is not None:
            raise ValueError("Pass either `sigmas` or `timesteps` to `set_timesteps`, not both.")
        if num_inference_steps is not None:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
                raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
            if num_inference_steps <= 0:
                raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
            num_inference_steps = int(num_inference_steps)

        if sigmas is not None or timesteps is not None:
            name = "sigmas" if sigmas is not None else "timesteps"
            values = self._to_float64_grid(sigmas if sigmas is not None else timesteps, name)
            if num_inference_steps is not None and num_inference_steps != len(values):
                raise ValueError(
                    f"`num_inference_steps` ({num_inference_steps}) must equal the length of `{name}` ({len(values)})."
                )
            upper = 1.0 if sigmas is not None else float(self.config.num_train_timesteps)
            if not bool(((values >= 0) & (values <= upper)).all()):
                raise ValueError(f"`{name}` must lie in [0, {upper:g}], got {_format_values(values)}.")
            working = values if sigmas is not None else values / self.config.num_train_timesteps
            if not _strictly_decreasing_to_zero(working):
                raise ValueError(
                    f"`{name}` must strictly decrease and stay above 0 (the terminal 0 is appended automatically), "
                    f"got {_format_values(values)}."
                )
            num_inference_steps = len(values)
        elif num_inference_steps is not None:
            working = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)[:-1]
        else:
            raise ValueError("`set_timesteps` needs `num_inference_steps`, `sigmas` or `timesteps`.")

        # Build in float64 on the CPU, then store float32 (see the class docstring for why float32).
        full = torch.cat([self.apply_shift(working), working.new_zeros(1)]).to(torch.float32)
        if not _strictly_decreasing_to_zero(full[:-1]):
            # Only reachable when distinct float64 grid points collapse to one float32 value.
            raise ValueError(f"The grid {_format_values(full)} is not strictly decreasing in float32.")

        self.num_inference_steps = num_inference_steps
        self.sigmas = full.to(device)
        self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps
        self._step_index = None
        self._begin_index = None

    @staticmethod
    def _to_float64_grid(values, name: str) -> torch.Tensor:
        if torch.is_tensor(values):
            grid = values.detach().to(device="cpu", dtype=torch.float64)
        else:
            grid = torch.as_tensor(np.asarray(values, dtype=np.float64))
        if grid.ndim != 1 or grid.numel() == 0:
            raise ValueError(f"`{name}` must be a non-empty 1-d sequence, got shape {tuple(grid.shape)}.")
        return grid

    def index_for_timestep(self, timestep: TimeLike) -> Optional[int]:
        """
        Index of `timestep` in `self.timesteps` (within 1e-3), or `None` if it is off the grid.

        For a 1-d tensor only its first element is looked up, as in FlowMap; `step` itself resolves every element.
        """
        if self.timesteps is None:
            return None
        value = timestep.reshape(-1)[0] if torch.is_tensor(timestep) else torch.tensor(float(timestep))
        _, index = self._resolve_sigmas(value)
        index = int(index)
        return None if index < 0 else index

    def _resolve_sigmas(self, timestep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Map timesteps (float tensor, 0-d or `(B,)`) to sigmas, element by element.

        A timestep within 1e-3 of a grid point takes that grid point's sigma, so a shifted or custom grid resolves
        to exactly the sigma it was built from; any other timestep falls back to `timestep / num_train_timesteps`.
        Returns `(sigmas, indices)` on the grid's device, float32 and int64, shaped like `timestep`; the index is -1
        off the grid.
        """
        flat = timestep.reshape(-1).to(device=self.timesteps.device, dtype=torch.float32)
        distance, index = (flat[:, None] - self.timesteps[None, :]).abs().min(dim=1)
        on_grid = distance <= self._GRID_TOLERANCE
        sigma = torch.where(on_grid, self.sigmas[index], flat / self.config.num_train_timesteps)
        index = torch.where(on_grid, index, torch.full_like(index, -1))
        return sigma.reshape(timestep.shape), index.reshape(timestep.shape)

    def _check_time(self, value: TimeLike, name: str, upper: float, batch_size: Optional[int]) -> torch.Tensor:
        """Validate a time argument and return it as a 0-d or 1-d float tensor (not moved, not cast)."""
        if isinstance(value, (bool, int, np.integer)) or (torch.is_tensor(value) and not value.is_floating_point()):
            # The classic bug: `for i, t in enumerate(scheduler.timesteps)` and passing `i`. Refuse every integer
            # rather than guess, so `step(u, 1000, z)` must be written `step(u, 1000.0, z)`.
            raise ValueError(
                f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `MMFScheduler.step()` "
                f"is not supported: `{name}` got {_format_values(value)}. Pass one of `scheduler.timesteps`, or "
                f"any time as a Python float or a floating-point tensor."
            )
        if torch.is_tensor(value):
            tensor = value
        elif isinstance(value, (float, np.floating)):
            tensor = torch.tensor(float(value), dtype=torch.float64)
        else:
            raise ValueError(f"`{name}` must be a float or a floating-point tensor, got {type(value).__name__}.")
        if tensor.ndim > 1:
            raise ValueError(f"`{name}` must be a scalar or a 1-d tensor of shape (B,), got shape {tuple(tensor.shape)}.")
        if tensor.ndim == 1 and batch_size is not None and tensor.shape[0] not in (1, batch_size):
            raise ValueError(
                f"`{name}` has {tensor.shape[0]} entries but the sample's batch size is {batch_size}; "
                f"pass one time per sample or a single time."
            )
        # Written as a negated "inside" test so that NaN is rejected too.
        if not bool(((tensor >= 0) & (tensor <= upper)).all()):
            raise ValueError(f"`{name}` must lie in [0, {upper:g}], got {_format_values(tensor)}.")
        return tensor

    # ------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimeLike,
        sample: torch.Tensor,
        r_timestep: Optional[TimeLike] = None,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> Union[MMFSchedulerOutput, Tuple[torch.Tensor]]:
        """
        Move `sample` from time `t` to time `r <= t` with the predicted average velocity:
        `prev_sample = sample - (t - r) * model_output`.

        `t` is the sigma of `timestep`: the grid's sigma when `timestep` is one of `self.timesteps` (within 1e-3),
        else `timestep / num_train_timesteps`. `r` is resolved the same way from `r_timestep`, or is the next grid
        point when `r_timestep` is `None`. Calling `step` twice with the same arguments gives the same result.

        Timesteps must be Python floats or floating-point tensors, in timestep units. Integers (`int` values or
        integer tensors) are refused, because an index from `enumerate(scheduler.timesteps)` looks the same; write
        `1000.0`, not `1000`.

        Args:
            model_output (`torch.Tensor` of shape `(B, ...)`):
                The model's average velocity `u(z_t, r, t)`.
            timestep (`float` or `torch.Tensor` of shape `()` or `(B,)`):
                Source time `t` in `[0, num_train_timesteps]`; a `(B,)` tensor gives each sample its own time.
            sample (`torch.Tensor` of shape `(B, ...)`):
                The current sample `z_t`.
            r_timestep (`float` or `torch.Tensor` of shape `()` or `(B,)`, *optional*):
                Target time `r`, with `r <= t` per element; `None` means the next grid point after `timestep`
                (then `timestep` must be on the grid). `r_timestep == timestep` returns `sample` unchanged.
            generator (`torch.Generator`, *optional*):
                Unused: the step is deterministic. Accepted so that pipelines passing one keep working.
            return_dict (`bool`, defaults to `True`):
                Return an [`MMFSchedulerOutput`] rather than a 1-tuple.

        Returns:
            [`MMFSchedulerOutput`] or `tuple`: `prev_sample`, shaped like `sample`, in the dtype of `model_output`.
            It is computed in float32 (float64 when an input is float64) whatever the input dtypes.
        """
        if self.sigmas is None:
            raise ValueError("`set_timesteps` must be called before `step`.")
        batch_size = sample.shape[0] if sample.ndim > 0 else None
        upper = float(self.config.num_train_timesteps)
        t = self._check_time(timestep, "timestep", upper, batch_size)
        sigma_t, t_index = self._resolve_sigmas(t)
        if r_timestep is None:
            off_grid = t_index < 0
            if bool(off_grid.any()):
                off_values = t.reshape(-1)[off_grid.reshape(-1).to(t.device)] if t.ndim else t
                raise ValueError(
                    f"`r_timestep` is None but `timestep` {_format_values(off_values)} is not on the current grid, so "
                    f"the next grid point is undefined; pass `r_timestep` explicitly."
                )
            sigma_r = self.sigmas[t_index + 1]
            r = None
        else:
            r = self._check_time(r_timestep, "r_timestep", upper, batch_size)
            sigma_r, _ = self._resolve_sigmas(r)
        reversed_interval = sigma_r > sigma_t
        if bool(reversed_interval.any()):
            # Name only the offending elements: with per-sample times the batch may be large.
            bad = reversed_interval.reshape(-1).cpu()
            r_bad = torch.broadcast_to(r.detach().cpu(), reversed_interval.shape).reshape(-1)[bad]
            t_bad = torch.broadcast_to(t.detach().cpu(), reversed_interval.shape).reshape(-1)[bad]
            raise ValueError(
                f"`r_timestep` must not exceed `timestep` (time runs from data at 0 to noise at "
                f"{self.config.num_train_timesteps}); got r = {_format_values(r_bad)} > t = {_format_values(t_bad)}."
            )

        if self._step_index is None:
            self._init_step_index(t)

        # Half-precision arithmetic would round (t - r) * u visibly, so compute in at least float32.
        compute_dtype = torch.promote_types(torch.promote_types(model_output.dtype, sample.dtype), torch.float32)
        interval = (sigma_t - sigma_r).to(device=sample.device, dtype=compute_dtype)
        # A (B,) interval scales each sample: broadcast it over the sample's other dimensions.
        interval = interval.reshape(*interval.shape, *([1] * (sample.ndim - interval.ndim)))
        prev_sample = sample.to(compute_dtype) - interval * model_output.to(compute_dtype)
        prev_sample = prev_sample.to(model_output.dtype)

        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return MMFSchedulerOutput(prev_sample=prev_sample)

    def _init_step_index(self, timestep: torch.Tensor) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        index = self.index_for_timestep(timestep)
        # Off-grid (any-step) sampling still gets a counter, starting at 0, as in FlowMap.
        self._step_index = 0 if index is None else index

    # ------------------------------------------------------------------------------------------------------------
    # Forward process (training)
    # ------------------------------------------------------------------------------------------------------------

    def interpolate(self, original_samples: torch.Tensor, noise: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """
        The path point `z_t = (1 - t) * x + t * e` for `t` in `[0, 1]` directly (no timestep units, no shift).

        This is the helper training code should use: MMF losses sample `t` and `r` in `[0, 1]`.

        Args:
            original_samples (`torch.Tensor` of shape `(B, ...)`): clean data `x`.
            noise (`torch.Tensor` of shape `(B, ...)`): Gaussian noise `e`.
            t (`float` or `torch.Tensor` of shape `()` or `(B,)`): time(s) in `[0, 1]`; integers are accepted here.

        Returns:
            `torch.Tensor`: `z_t`, shaped like `original_samples` and in its dtype (computed in at least float32).
        """
        t = self._check_noise_time(t, "t", 1.0, original_samples)
        return self._interpolate(original_samples, noise, t, scale=1.0)

    def scale_noise(self, sample: torch.Tensor, timestep: TimeLike, noise: torch.Tensor) -> torch.Tensor:
        """
        Noise `sample` to `timestep`, as [`FlowMapEulerDiscreteScheduler.scale_noise`] does:
        `(1 - s) * sample + s * noise` with `s = timestep / num_train_timesteps` (no grid lookup, no shift).

        Args:
            sample (`torch.Tensor` of shape `(B, ...)`): clean data `x`.
            timestep (`float` or `torch.Tensor` of shape `()` or `(B,)`): time(s) in `[0, num_train_timesteps]`.
            noise (`torch.Tensor` of shape `(B, ...)`): Gaussian noise `e`.

        Returns:
            `torch.Tensor`: the noisy sample, shaped like `sample` and in its dtype.
        """
        upper = float(self.config.num_train_timesteps)
        timestep = self._check_noise_time(timestep, "timestep", upper, sample)
        return self._interpolate(sample, noise, timestep, scale=upper)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: TimeLike
    ) -> torch.Tensor:
        """
        diffusers' training-time signature for [`scale_noise`]: `(1 - s) * x + s * e`, `s = timesteps /
        num_train_timesteps`.

        Args:
            original_samples (`torch.Tensor` of shape `(B, ...)`): clean data `x`.
            noise (`torch.Tensor` of shape `(B, ...)`): Gaussian noise `e`.
            timesteps (`float` or `torch.Tensor` of shape `()` or `(B,)`): time(s) in `[0, num_train_timesteps]`.

        Returns:
            `torch.Tensor`: the noisy samples, shaped like `original_samples` and in its dtype.
        """
        return self.scale_noise(original_samples, timesteps, noise)

    def _check_noise_time(self, value, name: str, upper: float, sample: torch.Tensor) -> torch.Tensor:
        # Unlike `step`, integer times are unambiguous here (no grid index is involved), so they are accepted.
        if isinstance(value, (bool, int, float, np.integer, np.floating)):
            value = torch.tensor(float(value), dtype=torch.float64)
        elif not torch.is_tensor(value):
            raise ValueError(f"`{name}` must be a number or a tensor, got {type(value).__name__}.")
        elif not value.is_floating_point():
            value = value.float()
        batch_size = sample.shape[0] if sample.ndim > 0 else None
        return self._check_time(value, name, upper, batch_size)

    @staticmethod
    def _interpolate(x: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor, scale: float) -> torch.Tensor:
        compute_dtype = torch.promote_types(torch.promote_types(x.dtype, noise.dtype), torch.float32)
        # Cast before moving: a float64 CPU tensor cannot be moved to MPS as it is.
        t = (timestep / scale).to(compute_dtype).to(x.device)
        t = t.reshape(*t.shape, *([1] * (x.ndim - t.ndim)))
        z = (1 - t) * x.to(compute_dtype) + t * noise.to(compute_dtype)
        return z.to(x.dtype)


def _strictly_decreasing_to_zero(values: torch.Tensor) -> bool:
    """Whether `values` followed by an appended 0 strictly decreases."""
    return bool((values[1:] < values[:-1]).all()) and bool(values[-1] > 0)


def _format_values(value, limit: int = 8) -> str:
    """Short text for a time value in an error message: a number, or a list cut after `limit` items."""
    if value is None:
        return "None"
    if torch.is_tensor(value):
        items: List = value.detach().reshape(-1).cpu().tolist()
        if value.ndim == 0:
            return f"{items[0]:g}" if isinstance(items[0], float) else repr(items[0])
    elif isinstance(value, (list, tuple, np.ndarray)):
        items = list(np.asarray(value).reshape(-1).tolist())
    else:
        return repr(value)
    text = ", ".join(f"{v:g}" if isinstance(v, float) else repr(v) for v in items[:limit])
    return f"[{text}{', ...' if len(items) > limit else ''}]"
