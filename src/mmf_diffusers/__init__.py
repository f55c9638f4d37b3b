"""mmf_diffusers: Modular MeanFlow (You, Liu & He, arXiv 2508.17426) as a Hugging Face diffusers integration.

Conventions used everywhere: ``t = 0`` is data, ``t = 1`` is noise, ``0 <= r <= t <= 1``;
``z_t = (1 - t) x + t e``; the model predicts the average velocity ``u(z_t, r, t)`` so that
``z_r = z_t - (t - r) u(z_t, r, t)`` and one step is ``x = z_1 - u(z_1, 0, 1)``.
"""

# diffusers resolves the classes named in model_index.json through this module (["mmf_diffusers", "MMFScheduler"]),
# so the mixins it checks against must be reachable from here.
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin  # noqa: F401

from .conditioning_mmf import MMFConditioner
from .curriculum import LambdaSchedule
from .derivatives import finite_difference_derivative, jvp_derivative
from .loss import MMFLossOutput, ModularMeanFlowLoss, TimeSampler, sg_lambda
from .pipeline_mmf import MMFPipeline, unet_average_velocity
from .pipeline_mmf_trajectory import MMFTrajectoryPipeline, TrajectoryPipelineOutput, trajectory_average_velocity
from .scheduling_mmf import MMFScheduler, MMFSchedulerOutput
from .unet import (
    ForwardADAttnProcessor,
    add_class_conditioning,
    add_second_time_embedding,
    build_mmf_unet,
    enable_forward_ad,
    prepare_unet_for_mmf,
    unet_model_fn,
)
from .unet1d import build_mmf_unet1d, trajectory_model_fn

__version__ = "0.1.0"

__all__ = [
    "ForwardADAttnProcessor",
    "LambdaSchedule",
    "MMFConditioner",
    "MMFLossOutput",
    "MMFPipeline",
    "MMFScheduler",
    "MMFSchedulerOutput",
    "MMFTrajectoryPipeline",
    "ModularMeanFlowLoss",
    "TimeSampler",
    "TrajectoryPipelineOutput",
    "add_class_conditioning",
    "add_second_time_embedding",
    "build_mmf_unet",
    "build_mmf_unet1d",
    "enable_forward_ad",
    "finite_difference_derivative",
    "jvp_derivative",
    "prepare_unet_for_mmf",
    "sg_lambda",
    "trajectory_average_velocity",
    "trajectory_model_fn",
    "unet_average_velocity",
    "unet_model_fn",
]
