"""`MMFTrajectoryPipeline`: one-step generation of 1-D trajectories (optionally from a known start state) with a
Modular MeanFlow model on a stock diffusers `UNet1DModel`.

Conventions (the same in every module of mmf_diffusers):
    * time runs from data to noise: ``t = 0`` is data, ``t = 1`` is noise, and always ``0 <= r <= t <= 1``;
    * path ``z_t = (1 - t) * x + t * e`` with ``e ~ N(0, I)``;
    * the network predicts the *average* velocity ``u(z_t, r, t)``, so ``z_r = z_t - (t - r) * u(z_t, r, t)``
      and one step is ``x = z_1 - u(z_1, 0, 1)``.
    * a trajectory is a tensor ``(B, C, L)``: C state channels (e.g. angle and angular velocity) over L time points.

The second time. `UNet1DModel` takes one timestep and, unlike `UNet2DModel`, has no class-embedding slot. Its
``extra_in_channels`` option widens the first convolution to ``in_channels + extra_in_channels`` input channels; we
fill those extra channels with (1) a mask of *known* entries and (2) a sinusoidal embedding of ``h = t - r``,
broadcast along the sequence. ``t`` goes through the UNet's own timestep embedding (added in every residual block).
So the backbone is a stock `UNet1DModel` (it saves and loads with ``from_pretrained``); `trajectory_average_velocity`
below is the one place that packs ``(z, known_mask, r, t)`` into its input.

Conditioning on a start state, inpainting-style. For a conditioned trajectory the first time step is *known*: along
the whole path it stays at its clean value (``z_t[:, :, 0] = x[:, :, 0]`` for every t: the noise of the known entries
is set equal to the data, so their conditional velocity ``e - x`` is 0), the mask channel marks it, and the network's
velocity is multiplied by ``1 - mask``, so it is exactly 0 on known entries. Hence every sampler step leaves the known
entries untouched and one network call gives a trajectory whose first state *is* the given one (exactly in normalised
units; the physical value is copied back at the end so the round trip through the normalisation cannot perturb it
by a rounding error). Training mixes conditioned and unconditioned rows (mask all zero), so one model does both.
Why not overwrite ``z_t[..., 0]`` only at sampling time: a model trained unconditionally never learned that the first
state determines the rest, and one-step sampling has no later steps to propagate an overwrite.

Normalisation: the model works on per-channel standardised data ``(x - channel_mean) / channel_std``; both vectors are
stored in the pipeline configuration (``model_index.json``) and outputs come back in physical units.

This file imports only torch, numpy and diffusers (and huggingface_hub, which diffusers depends on): `mmf_diffusers.hub`
ships it as ``pipeline.py`` in Hub repositories (diffusers' remote-code layout), like ``pipeline_mmf.py``.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet1DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download

logger = logging.get_logger(__name__)

#: Scale of both times at the network input (the same measured default as `pipeline_mmf.DEFAULT_TIME_SCALE`; this
#: file cannot import it because it must stay self-contained).
DEFAULT_TIME_SCALE = 10.0
#: Sinusoid channels that carry ``h = t - r`` (half sines, half cosines).
DEFAULT_SECOND_TIME_CHANNELS = 8
#: Longest period of the ``h`` sinusoids, in units of ``time_scale * h``. The t path uses diffusers' 10000, but with
#: only a few frequencies a shorter range keeps each channel informative over ``time_scale * h`` in ``[0, 10]``.
SECOND_TIME_MAX_PERIOD = 100.0
#: ``"latent"``: the UNet's output space, the sample in normalised units (before `denormalize`), as a tensor.
OUTPUT_TYPES = ("np", "pt", "latent")
#: Where a remote-code ``model_index.json`` keeps the package's own entries (`pipeline_mmf.PACKAGE_LAYOUT_KEY`).
PACKAGE_LAYOUT_KEY = "_mmf_package_layout"
#: The pipelines of mmf_diffusers by class name, and what they make: loading one's folder with the other is refused.
MMF_PIPELINES = {"MMFPipeline": "images", "MMFTrajectoryPipeline": "trajectories"}



def trajectory_average_velocity(
    unet: UNet1DModel,
    z: torch.Tensor,
    known_mask: Optional[torch.Tensor],
    r: torch.Tensor,
    t: torch.Tensor,
    time_scale: float = DEFAULT_TIME_SCALE,
    second_time_channels: int = DEFAULT_SECOND_TIME_CHANNELS,
) -> torch.Tensor:
    """Evaluate the average velocity ``u(z, r, t)`` with a stock `UNet1DModel` whose ``extra_in_channels`` is
    ``1 + second_time_channels``.

    Args:
        unet: the backbone (``use_timestep_embedding=True``, positional time embedding).
        z: ``z_t``, shape ``(B, C, L)`` (normalised units).
        known_mask: ``(B, 1, L)``, 1 where the entry is known (conditioning), else 0; None means nothing is known.
        r, t: shape ``(B,)``, float, ``0 <= r <= t <= 1``.
        time_scale: the UNet's timestep is ``time_scale * t``; the sinusoids of ``h`` see ``time_scale * (t - r)``.
        second_time_channels: channels of the ``h`` embedding (even).

    Returns:
        ``u`` of shape ``(B, C, L)``; exactly 0 on known entries.
    """
    batch, _, length = z.shape
    if known_mask is None:
        known_mask = torch.zeros(batch, 1, length, dtype=z.dtype, device=z.device)
    known_mask = known_mask.to(dtype=z.dtype)
    h = (t - r) * time_scale
    # (B, K) sinusoids of h, the same formula as diffusers' Timesteps; broadcast along the sequence.
    h_embedding = get_timestep_embedding(h, second_time_channels, flip_sin_to_cos=True, downscale_freq_shift=0,
                                         max_period=SECOND_TIME_MAX_PERIOD)
    h_embedding = h_embedding.to(z.dtype)[:, :, None].expand(batch, second_time_channels, length)
    sample = torch.cat([z, known_mask, h_embedding], dim=1)
    # A float tensor timestep: a Python float would be turned into an integer tensor by UNet1DModel.
    u = unet(sample, t * time_scale).sample
    return u * (1 - known_mask)


def check_trajectory_unet(unet: UNet1DModel, second_time_channels: int) -> None:
    """Raise a ValueError unless ``unet`` can serve as an MMF trajectory backbone."""
    config = unet.config
    if "extra_in_channels" not in config:
        raise ValueError(f"MMFTrajectoryPipeline needs a UNet1DModel (see mmf_diffusers.build_mmf_unet1d), got a "
                         f"{type(unet).__name__}")
    if config.extra_in_channels != second_time_channels + 1:
        raise ValueError(
            f"The UNet1DModel needs extra_in_channels = 1 (known mask) + second_time_channels ({second_time_channels}) "
            f"= {second_time_channels + 1}, got {config.extra_in_channels}; build one with "
            "mmf_diffusers.build_mmf_unet1d."
        )
    if config.time_embedding_type != "positional" or not config.use_timestep_embedding:
        raise ValueError("The UNet1DModel needs time_embedding_type='positional' and use_timestep_embedding=True "
                         "(Fourier features take log(t) and fail at t = 0).")
    if config.in_channels != config.out_channels:
        raise ValueError(f"in_channels ({config.in_channels}) must equal out_channels ({config.out_channels}): "
                         "u has the shape of the trajectory")


@dataclass
class TrajectoryPipelineOutput(BaseOutput):
    """Output of [`MMFTrajectoryPipeline`].

    Args:
        trajectories (`np.ndarray` or `torch.Tensor` of shape `(batch_size, num_channels, length)`): in physical units.
    """

    trajectories: Union[np.ndarray, torch.Tensor]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return int(value)


class MMFTrajectoryPipeline(DiffusionPipeline):
    r"""
    Pipeline for trajectories ``(B, C, L)`` from a Modular MeanFlow model, unconditionally or from a known start state,
    in one (or a few) network evaluations.

    Args:
        unet ([`UNet1DModel`]): predicts ``u``; ``extra_in_channels = 1 + second_time_channels`` carry the known
            mask and the second time (see the module docstring).
        scheduler ([`MMFScheduler`] or [`FlowMapEulerDiscreteScheduler`]): applies ``z_r = z_t - (t - r) u``.
        time_scale (`float`): scale of both times at the network input.
        second_time_channels (`int`): channels of the sinusoidal embedding of ``h = t - r``.
        channel_mean, channel_std (list of `float`, one per channel): the model works on ``(x - mean) / std``;
            outputs are returned as ``x * std + mean``. Default: 0 and 1.
        channel_names (`str` or list of `str`, optional), dt (`float`, optional), system (`str`, optional):
            descriptive metadata (the state variables, the time between samples, the physical system), saved with the
            pipeline. The names are saved as one comma-separated string (``"theta,omega"``; a list is joined):
            diffusers' Hub download takes any list of strings in ``model_index.json`` for a ``[module, class]`` entry.

    Examples:
        ```py
        >>> import torch
        >>> from mmf_diffusers import MMFTrajectoryPipeline
        >>> pipe = MMFTrajectoryPipeline.from_pretrained("pipelines/mmf-pendulum")
        >>> out = pipe(num_samples=8, generator=torch.Generator().manual_seed(0))          # (8, 2, 64), one call
        >>> futures = pipe(num_samples=16, start_state=torch.tensor([0.5, 0.0])).trajectories  # all start at it
        ```
    """

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: UNet1DModel,
        scheduler,
        time_scale: float = DEFAULT_TIME_SCALE,
        second_time_channels: int = DEFAULT_SECOND_TIME_CHANNELS,
        channel_mean: Optional[Sequence[float]] = None,
        channel_std: Optional[Sequence[float]] = None,
        channel_names: Optional[Union[str, Sequence[str]]] = None,
        dt: Optional[float] = None,
        system: Optional[str] = None,
    ):
        super().__init__()
        if isinstance(time_scale, bool) or not isinstance(time_scale, numbers.Real) or not (
            math.isfinite(time_scale) and time_scale > 0
        ):
            raise ValueError(f"time_scale must be a positive finite number, got {time_scale!r}")
        second_time_channels = _positive_int("second_time_channels", second_time_channels)
        if second_time_channels % 2:
            raise ValueError(f"second_time_channels must be even, got {second_time_channels}")
        check_trajectory_unet(unet, second_time_channels)
        channels = unet.config.in_channels
        channel_mean = [0.0] * channels if channel_mean is None else [float(v) for v in channel_mean]
        channel_std = [1.0] * channels if channel_std is None else [float(v) for v in channel_std]
        if len(channel_mean) != channels or len(channel_std) != channels:
            raise ValueError(f"channel_mean and channel_std need {channels} entries (the UNet's in_channels), got "
                             f"{len(channel_mean)} and {len(channel_std)}")
        if not all(math.isfinite(s) and s > 0 for s in channel_std) or not all(map(math.isfinite, channel_mean)):
            raise ValueError("channel_std must be positive and channel_mean finite")
        if channel_names is not None:
            names = channel_names.split(",") if isinstance(channel_names, str) else list(channel_names)
            if len(names) != channels or not all(isinstance(n, str) and n and "," not in n for n in names):
                raise ValueError(f"channel_names needs {channels} non-empty names without commas, got "
                                 f"{channel_names!r}")
            channel_names = ",".join(names)
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(
            time_scale=float(time_scale), second_time_channels=second_time_channels, channel_mean=channel_mean,
            channel_std=channel_std, channel_names=channel_names,
            dt=float(dt) if dt is not None else None, system=system,
        )

    # --- Hub support -------------------------------------------------------------------------------------------
    # The same three methods as `MMFPipeline`'s (pipeline_mmf.py), which explains them. They are copied, not shared:
    # each pipeline file ships alone as a Hub repository's ``pipeline.py``, so neither can import the other (or a
    # mixin module) there. tests/test_hub.py checks that both behave the same.
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs
    ) -> "MMFTrajectoryPipeline":
        """[`DiffusionPipeline.from_pretrained`] that also takes a Hub repo id pushed by mmf_diffusers: a repo id is
        fetched whole with `snapshot_download` (``revision``, ``token``, ``cache_dir``, ``force_download``,
        ``local_files_only`` from ``kwargs``), then the local folder is loaded; see `MMFPipeline.from_pretrained`."""
        if not os.path.isdir(pretrained_model_name_or_path):
            pretrained_model_name_or_path = snapshot_download(
                str(pretrained_model_name_or_path),
                revision=kwargs.pop("revision", None),
                token=kwargs.pop("token", None),
                cache_dir=kwargs.get("cache_dir"),
                force_download=kwargs.pop("force_download", False),
                local_files_only=kwargs.pop("local_files_only", False),
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """[`ConfigMixin.load_config`] that reads a remote-code folder's `PACKAGE_LAYOUT_KEY` entries instead of its
        copied-file entries when the modules they name are imported, after `check_model_index`; see
        `MMFPipeline.load_config`."""
        outputs = super().load_config(*args, **kwargs)
        config = outputs[0] if isinstance(outputs, tuple) else outputs
        layout = config.pop(PACKAGE_LAYOUT_KEY, None)
        where = args[0] if args else kwargs.get("pretrained_model_name_or_path", "the pipeline folder")
        check_model_index(config, layout, where, cls.__name__)
        if isinstance(layout, dict) and all(
            entry[0] in sys.modules for name, entry in layout.items() if name != "_class_name"
        ):
            config.update(layout)
        return outputs

    def _upload_folder(self, working_dir, repo_id, **kwargs):
        """Add the remote-code layout and the model card (`mmf_diffusers.hub.prepare_folder_for_hub`) before every
        upload by `push_to_hub`; see `MMFPipeline._upload_folder` (why the import is deferred and not a statement)."""
        try:
            prepare_folder_for_hub = importlib.import_module("mmf_diffusers.hub").prepare_folder_for_hub
        except ImportError:
            logger.warning(
                "mmf_diffusers is not installed: the pushed repository gets no remote-code files and will only load "
                "where mmf_diffusers is installed. Push with mmf_diffusers installed (`mmf-push FOLDER REPO_ID`)."
            )
        else:
            prepare_folder_for_hub(working_dir, repo_id=repo_id, secrets=[kwargs.get("token")])
        return super()._upload_folder(working_dir, repo_id, **kwargs)

    # --- normalisation -------------------------------------------------------------------------------------------
    def _stats(self, device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.config.channel_mean, device=device, dtype=dtype)
        std = torch.tensor(self.config.channel_std, device=device, dtype=dtype)
        return mean, std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Physical units -> model units, per channel; ``x`` of shape ``(B, C, L)`` or ``(B, C)``."""
        mean, std = self._stats(x.device, x.dtype)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - mean.view(shape)) / std.view(shape)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model units -> physical units, per channel; ``x`` of shape ``(B, C, L)`` or ``(B, C)``."""
        mean, std = self._stats(x.device, x.dtype)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * std.view(shape) + mean.view(shape)

    def average_velocity(self, z, known_mask, r, t) -> torch.Tensor:
        """``u(z, r, t)`` (normalised units) with this pipeline's time mapping; see `trajectory_average_velocity`."""
        return trajectory_average_velocity(self.unet, z, known_mask, r, t, time_scale=self.config.time_scale,
                                           second_time_channels=self.config.second_time_channels)

    def _start_states(self, start_state, count: Optional[int], channels: int, device) -> torch.Tensor:
        if not torch.is_tensor(start_state):
            try:
                start_state = torch.as_tensor(np.asarray(start_state, dtype=np.float64))
            except (TypeError, ValueError) as error:  # complex numbers, ragged lists, strings
                raise ValueError(f"`start_state` must be real numbers of shape (B, {channels}) or ({channels},): "
                                 f"{error}") from None
        if not start_state.is_floating_point() or start_state.dim() not in (1, 2) or start_state.shape[-1] != channels:
            raise ValueError(f"`start_state` must be a float tensor of shape (B, {channels}) or ({channels},), got "
                             f"{tuple(start_state.shape)} {start_state.dtype}")
        if not bool(torch.isfinite(start_state).all()):
            raise ValueError("`start_state` must be finite")
        if start_state.dim() == 1:
            start_state = start_state.expand(count or 1, channels)
        elif count is not None and count != start_state.shape[0]:
            raise ValueError(f"`num_samples` ({count}) differs from the number of start states "
                             f"({start_state.shape[0]}); give one start state to repeat it")
        return start_state.to(device=device, dtype=torch.float32)

    # --- the state diffusers' pipelines expose during and after a call (see `MMFPipeline`) -------------------------
    _callback_tensor_inputs = ["latents"]
    _num_timesteps = 0
    _interrupt = False

    @property
    def num_timesteps(self) -> int:
        """Network steps of the latest call (its ``num_inference_steps``)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a ``callback_on_step_end`` to skip the remaining steps."""
        return self._interrupt

    @torch.no_grad()
    def __call__(
        self,
        num_samples: Optional[int] = None,
        start_state: Optional[Union[torch.Tensor, np.ndarray, Sequence[float]]] = None,
        num_inference_steps: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "np",
        return_dict: bool = True,
        length: Optional[int] = None,
        batch_size: Optional[int] = None,
        callback_on_step_end: Optional[Union[Callable, PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> Union[TrajectoryPipelineOutput, Tuple]:
        r"""
        Generate trajectories.

        Args:
            num_samples (`int`, defaults to 1, or the number of start states): how many trajectories. ``batch_size``
                is accepted as a synonym (diffusers' unconditional pipelines use it); give one or the other.
            start_state (tensor/array of shape `(B, C)` or `(C,)`, physical units, *optional*): the known first state
                of each trajectory; one state of shape `(C,)` is repeated ``num_samples`` times ("several futures from
                here"). The returned trajectories start exactly at it. Without it, generation is unconditional.
            num_inference_steps (`int`, defaults to 1): network evaluations; 1 is ``x = z_1 - u(z_1, 0, 1)``.
            generator (`torch.Generator` or a list of one per trajectory): makes the initial noise reproducible.
            latents (`torch.Tensor`, *optional*): initial noise ``z_1`` of shape `(B, C, L)` (its first time step is
                replaced by the normalised start state when one is given).
            output_type (`str`): ``"np"`` (float32 array) or ``"pt"`` (float32 tensor), both `(B, C, L)`, physical
                units; or ``"latent"``: the UNet's output space, the final sample in normalised units (a tensor in the UNet's
                dtype, before `denormalize`; known entries hold the normalised start state).
            return_dict (`bool`): return a [`TrajectoryPipelineOutput`] instead of a 1-tuple.
            length (`int`, *optional*): trajectory length L (default: the UNet's ``sample_size``); must be divisible by
                ``2 ** (number of UNet levels - 1)``.
            callback_on_step_end (`Callable`, [`PipelineCallback`] or [`MultiPipelineCallbacks`], *optional*): called
                after every step as ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs)``, as in
                `MMFPipeline`; a returned ``"latents"`` entry (same shape, normalised units) replaces the sample the
                next step starts from. Known entries are put back to the start state after it.
            callback_on_step_end_tensor_inputs (list of `str`): the tensors passed to the callback, from
                ``pipe._callback_tensor_inputs`` (``["latents"]``).

        Returns:
            [`TrajectoryPipelineOutput`] or `tuple` with the trajectories.

        Raises:
            ValueError: for any invalid argument, and when the model produces non-finite values (NaN or inf) from
            finite inputs.
        """
        # 0. check the request before doing any work
        if num_samples is not None and batch_size is not None and num_samples != batch_size:
            raise ValueError(f"Give `num_samples` or its synonym `batch_size`, not both ({num_samples} != {batch_size})")
        count = num_samples if num_samples is not None else batch_size
        if count is not None:
            count = _positive_int("num_samples", count)
        num_inference_steps = _positive_int("num_inference_steps", num_inference_steps)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        device = self._execution_device
        channels = self.unet.config.in_channels
        start = None
        if start_state is not None:
            start = self._start_states(start_state, count, channels, device)
            count = start.shape[0]
        if count is None:
            count = latents.shape[0] if torch.is_tensor(latents) else 1
        length = _positive_int("length", length if length is not None else self.unet.config.sample_size)
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if length % factor:
            raise ValueError(f"`length` {length} must be divisible by {factor} for this UNet")
        if isinstance(generator, list) and len(generator) != count:
            raise ValueError(f"Got a list of {len(generator)} generators for {count} trajectories; give one each")
        callback_on_step_end_tensor_inputs = _check_callback(
            callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
        )
        shape = (count, channels, length)
        dtype = self.unet.dtype

        # 1. sample the noise z_1; known entries sit at their clean value along the whole path
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if not torch.is_tensor(latents) or tuple(latents.shape) != shape:
                got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
                raise ValueError(f"`latents` must be a tensor of shape {shape}, got {got}")
            if not latents.is_floating_point():  # complex, integer or bool noise is a mistake, not a request
                raise ValueError(f"`latents` must be a real floating-point tensor, got {latents.dtype}")
            if not bool(torch.isfinite(latents).all()):
                raise ValueError("`latents` must be finite (it holds NaN or inf)")
            latents = latents.to(device=device, dtype=dtype).clone()
        known_mask = torch.zeros(count, 1, length, device=device, dtype=dtype)
        if start is not None:
            known_mask[:, :, 0] = 1
            latents[:, :, 0] = self.normalize(start).to(dtype)

        # 2. walk the grid 1 = s_0 > ... > s_N = 0; u is 0 on known entries, so every step keeps them
        self._interrupt = False
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        sigmas = self.scheduler.sigmas
        self._num_timesteps = len(self.scheduler.timesteps)
        for i, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                continue
            t = sigmas[i].to(dtype=torch.float32).expand(count)
            r = sigmas[i + 1].to(dtype=torch.float32).expand(count)
            u = self.average_velocity(latents, known_mask, r, t)
            latents = self.scheduler.step(u, timestep, latents).prev_sample
            if callback_on_step_end is not None:
                tensors = {"latents": latents}
                outputs = callback_on_step_end(
                    self, i, timestep, {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                )
                latents = _callback_latents(outputs, latents)
                if start is not None:  # a callback cannot move the known entries: they are data, not samples
                    latents[:, :, 0] = self.normalize(start).to(dtype)

        # 3. post-process: back to physical units; the known first state is copied back bit for bit
        _check_finite(latents, "the sample")
        if output_type == "latent":
            trajectories = latents
        else:
            trajectories = self.denormalize(latents.float())
            _check_finite(trajectories, "the trajectories in physical units")
            if start is not None:
                trajectories[:, :, 0] = start
            if output_type == "np":
                trajectories = trajectories.cpu().numpy()

        self.maybe_free_model_hooks()
        if not return_dict:
            return (trajectories,)
        return TrajectoryPipelineOutput(trajectories=trajectories)


# --- helpers: the same code as in pipeline_mmf.py (tests/test_pipeline_contracts.py checks that the copies agree);
# each pipeline file ships alone as a Hub repository's ``pipeline.py`` and cannot import the other.
def check_model_index(config: dict, layout, where, class_name: str) -> None:
    """Refuse a ``model_index.json`` (``config``, with the package ``layout`` popped from it) that ``class_name`` must
    not load: one that holds the other pipeline of mmf_diffusers, or whose component names or ``[module, class]``
    entries are not Python identifiers (component names are folders inside the pipeline folder; ``"../unet"`` would
    load files from outside it). Raises a one-line ValueError."""
    index = f"{where}/model_index.json"
    if layout is not None and not (
        isinstance(layout, dict) and all(
            isinstance(entry, str) if name == "_class_name" else isinstance(entry, (list, tuple)) and len(entry) == 2
            for name, entry in layout.items()
        )
    ):
        raise ValueError(f"{index}: {PACKAGE_LAYOUT_KEY} must map component names to [module, class] pairs, got "
                         f"{layout!r}")
    named = (layout or {}).get("_class_name", config.get("_class_name"))
    if isinstance(named, (list, tuple)) and len(named) == 2:
        named = named[1]
    if isinstance(named, str) and named in MMF_PIPELINES and named != class_name:
        raise ValueError(f"{where} holds an {named} ({MMF_PIPELINES[named]}), not an {class_name}: load it with "
                         f"{named}.from_pretrained, or with mmf_diffusers.hub.load_pipeline, which picks the class")
    for name, value in list(config.items()) + list((layout or {}).items()):
        if name.startswith("_"):
            continue
        if not name.isidentifier():
            raise ValueError(f"{index} names the component {name!r}, which is not a Python identifier (a component "
                             "is a folder inside the pipeline; path parts would reach outside it): refusing to load")
        if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str):
            module, component_class = value
            if not all(part.isidentifier() for part in module.split(".")) or not (
                isinstance(component_class, str) and component_class.isidentifier()
            ):
                raise ValueError(f"{index}: the component {name!r} is [{module!r}, {component_class!r}], which is not "
                                 "a [module, class] pair of Python names: refusing to load")


def _check_callback(callback, tensor_inputs, allowed: List[str]) -> List[str]:
    """The names of the tensors to pass to ``callback`` (diffusers' ``callback_on_step_end`` contract)."""
    if callback is None:
        return []
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        tensor_inputs = callback.tensor_inputs
    elif not callable(callback):
        raise ValueError(f"`callback_on_step_end` must be callable, got {type(callback).__name__}")
    if isinstance(tensor_inputs, str) or not isinstance(tensor_inputs, (list, tuple)):
        raise ValueError(f"`callback_on_step_end_tensor_inputs` must be a list of names from {allowed}, got "
                         f"{tensor_inputs!r}")
    unknown = [name for name in tensor_inputs if name not in allowed]
    if unknown:
        raise ValueError(f"`callback_on_step_end_tensor_inputs` must be names from {allowed}, got {unknown}")
    return list(tensor_inputs)


def _callback_latents(outputs, latents: torch.Tensor) -> torch.Tensor:
    """The sample to continue from after a ``callback_on_step_end`` returned ``outputs``."""
    if not isinstance(outputs, dict):
        raise ValueError("`callback_on_step_end` must return a dict (the callback_kwargs it was given, changed or "
                         f"not), got {type(outputs).__name__}")
    new = outputs.pop("latents", latents)
    if not torch.is_tensor(new) or new.shape != latents.shape:
        got = tuple(new.shape) if torch.is_tensor(new) else type(new).__name__
        raise ValueError(f"`callback_on_step_end` returned `latents` of shape {got}; it must keep the shape "
                         f"{tuple(latents.shape)}")
    return new.to(device=latents.device, dtype=latents.dtype)


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"The model produced non-finite values (NaN or inf) in {what} from finite inputs; nothing "
                         "is returned. Check `latents` (the model expects standard Gaussian noise) and the weights.")
