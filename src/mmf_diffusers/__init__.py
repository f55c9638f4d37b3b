"""mmf_diffusers: Modular MeanFlow (You, Liu & He, arXiv 2508.17426) as a Hugging Face diffusers integration.

Conventions used everywhere: ``t = 0`` is data, ``t = 1`` is noise, ``0 <= r <= t <= 1``;
``z_t = (1 - t) x + t e``; the model predicts the average velocity ``u(z_t, r, t)`` so that
``z_r = z_t - (t - r) u(z_t, r, t)`` and one step is ``x = z_1 - u(z_1, 0, 1)``.
"""

import importlib
from typing import TYPE_CHECKING

# Names are imported on first use (PEP 562), so that `mmf-generate --help` and argument errors come before torch
# and diffusers load (seconds). A module imported directly (`from mmf_diffusers.pipeline_mmf import MMFPipeline`)
# does not import the others; use the package's names (`from mmf_diffusers import MMFPipeline`) to load folders. diffusers resolves the classes named in model_index.json through this module
# (["mmf_diffusers", "MMFScheduler"]) with getattr, which imports them here; the mixins it checks against must be
# reachable from here too.
_EXPORTS = {
    "DiffusionPipeline": "diffusers", "ModelMixin": "diffusers", "SchedulerMixin": "diffusers",
    "MMFConditioner": ".conditioning_mmf",
    "LambdaSchedule": ".curriculum",
    "finite_difference_derivative": ".derivatives", "jvp_derivative": ".derivatives",
    "MMFLossOutput": ".loss", "ModularMeanFlowLoss": ".loss", "TimeSampler": ".loss", "sg_lambda": ".loss",
    "MMFPipeline": ".pipeline_mmf", "unet_average_velocity": ".pipeline_mmf",
    "MMFTrajectoryPipeline": ".pipeline_mmf_trajectory", "TrajectoryPipelineOutput": ".pipeline_mmf_trajectory",
    "trajectory_average_velocity": ".pipeline_mmf_trajectory",
    "MMFScheduler": ".scheduling_mmf", "MMFSchedulerOutput": ".scheduling_mmf",
    "ForwardADAttnProcessor": ".unet", "add_class_conditioning": ".unet", "add_second_time_embedding": ".unet",
    "build_mmf_unet": ".unet", "enable_forward_ad": ".unet", "prepare_unet_for_mmf": ".unet",
    "unet_model_fn": ".unet",
    "build_mmf_unet1d": ".unet1d", "trajectory_model_fn": ".unet1d",
    "DIT_SIZES": ".dit", "add_dit_class_conditioning": ".dit", "build_mmf_dit": ".dit", "convert_stock_dit": ".dit",
    "convert_stock_dit_class_conditional": ".dit", "dit_model_fn": ".dit", "initialize_like_dit": ".dit",
    "prepare_dit_for_mmf": ".dit",
    "MMFDiTTransformer2DModel": ".transformer_mmf",
}


def _import_all() -> None:
    # All at once, as an eager __init__ would: diffusers' from_pretrained resolves a saved component's module (e.g.
    # "mmf_diffusers.scheduling_mmf") only if it is imported already, so using one name must import them all.
    for name, module in _EXPORTS.items():
        globals()[name] = getattr(importlib.import_module(module, __name__), name)  # later lookups skip __getattr__


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _import_all()
    return globals()[name]


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin  # noqa: F401

    from .conditioning_mmf import MMFConditioner  # noqa: F401
    from .curriculum import LambdaSchedule  # noqa: F401
    from .derivatives import finite_difference_derivative, jvp_derivative  # noqa: F401
    from .loss import MMFLossOutput, ModularMeanFlowLoss, TimeSampler, sg_lambda  # noqa: F401
    from .pipeline_mmf import MMFPipeline, unet_average_velocity  # noqa: F401
    from .pipeline_mmf_trajectory import (MMFTrajectoryPipeline, TrajectoryPipelineOutput,  # noqa: F401
                                          trajectory_average_velocity)
    from .scheduling_mmf import MMFScheduler, MMFSchedulerOutput  # noqa: F401
    from .unet import (ForwardADAttnProcessor, add_class_conditioning, add_second_time_embedding,  # noqa: F401
                       build_mmf_unet, enable_forward_ad, prepare_unet_for_mmf, unet_model_fn)
    from .dit import (DIT_SIZES, add_dit_class_conditioning, build_mmf_dit, convert_stock_dit,  # noqa: F401
                      convert_stock_dit_class_conditional, dit_model_fn, initialize_like_dit,
                      prepare_dit_for_mmf)
    from .transformer_mmf import MMFDiTTransformer2DModel  # noqa: F401
    from .unet1d import build_mmf_unet1d, trajectory_model_fn  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "DIT_SIZES",
    "ForwardADAttnProcessor",
    "LambdaSchedule",
    "MMFConditioner",
    "MMFDiTTransformer2DModel",
    "MMFLossOutput",
    "MMFPipeline",
    "MMFScheduler",
    "MMFSchedulerOutput",
    "MMFTrajectoryPipeline",
    "ModularMeanFlowLoss",
    "TimeSampler",
    "TrajectoryPipelineOutput",
    "add_class_conditioning",
    "add_dit_class_conditioning",
    "add_second_time_embedding",
    "build_mmf_dit",
    "build_mmf_unet",
    "build_mmf_unet1d",
    "convert_stock_dit",
    "convert_stock_dit_class_conditional",
    "dit_model_fn",
    "enable_forward_ad",
    "finite_difference_derivative",
    "initialize_like_dit",
    "jvp_derivative",
    "prepare_dit_for_mmf",
    "prepare_unet_for_mmf",
    "sg_lambda",
    "trajectory_average_velocity",
    "trajectory_model_fn",
    "unet_average_velocity",
    "unet_model_fn",
]
