"""Two-time UNet2DModel backbones for MMF.

A stock diffusers `UNet2DModel` takes one timestep, but with ``class_embed_type="timestep"`` its ``class_labels``
input goes through the same sinusoidal projection plus a separate MLP, summed into the time embedding: a second
time input with no custom model code. `mmf_diffusers.pipeline_mmf.unet_average_velocity` is the one place that maps
``(z, r, t)`` to those inputs (``t`` and ``h = t - r``, both multiplied by ``time_scale``).

Forward-mode AD (``torch.func.jvp``) through UNet2DModel's attention fails on CPU in torch 2.13 twice over: the
fused SDPA kernel has no forward-AD formula, and ``group_norm``'s forward-AD rule fails on the non-contiguous
attention output. `ForwardADAttnProcessor` forces the math SDPA backend and returns a contiguous tensor while forward
AD is in progress, and is diffusers' SDPA processor otherwise: plain forwards (finite differences, sampling) keep the
fused kernels (flash / memory-efficient attention on GPUs).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from .conditioning_mmf import MMFConditioner
from .pipeline_mmf import DEFAULT_TIME_SCALE, install_class_embedding_cast, unet_average_velocity

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def forward_ad_in_progress() -> bool:
    """Whether a forward-mode derivative is being computed (inside ``torch.func.jvp`` or
    ``torch.autograd.forward_ad.dual_level``): both enter a dual level of torch's forward AD. A module-level integer,
    so torch.compile guards on it instead of breaking the graph."""
    return torch.autograd.forward_ad._current_level >= 0


class ForwardADAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA attention processor, which under forward-mode AD (``torch.func.jvp``) is restricted to the math
    backend and returns a contiguous output, so the jvp works through it (float64 inputs too). Otherwise it is exactly
    `AttnProcessor2_0`: the default SDPA dispatch (fused kernels) and the same output. Numerically the same attention
    either way, up to the kernels' rounding."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # float64 (reference computations) also takes the math kernel: the fused CPU kernel has no double backward
        # (torch.autograd.functional.jvp needs one), and GPUs' fused kernels do not take float64 anyway.
        if not (self.always_math or forward_ad_in_progress() or hidden_states.dtype == torch.float64):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        with sdpa_kernel(SDPBackend.MATH):
            out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return out.contiguous()

    #: True: the math backend for every call (benchmarks/attention_kernels.py measures what that costs).
    always_math = False


class MathAttnProcessor(ForwardADAttnProcessor):
    """`ForwardADAttnProcessor` on the math SDPA backend for every call, as the project's UNets ran before the fused
    kernels were kept for plain forwards; for comparisons (benchmarks/attention_kernels.py) and bit-exact checks."""

    always_math = True


def enable_forward_ad(model: torch.nn.Module, processor_class=None) -> int:
    """Give every `Attention` module of ``model`` a `ForwardADAttnProcessor` (or ``processor_class()``). Returns how
    many were changed.

    UNet2DModel has no ``set_attn_processor``, so this walks the modules.
    """
    processor_class = processor_class or ForwardADAttnProcessor
    count = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(processor_class())
            count += 1
    return count


def prepare_unet_for_mmf(unet: UNet2DModel) -> UNet2DModel:
    """Check that ``unet`` can serve as a two-time MMF backbone and make it ready for training.

    Raises a ValueError for a UNet without the second-time slot or with Fourier time features (they take
    ``log(t)`` and divide by ``t``, so ``t = 0`` or ``h = 0`` breaks). The slot is ``class_embed_type="timestep"``
    (unconditional) or ``"identity"`` (class-conditional, fed by an `MMFConditioner`). Installs
    `ForwardADAttnProcessor` (fused SDPA kernels, the math backend only under forward AD) and the class-embedding
    dtype cast (see `install_class_embedding_cast`). Returns the same
    module.
    """
    config = unet.config
    if config.class_embed_type not in ("timestep", "identity"):
        raise ValueError(
            "An MMF UNet2DModel needs class_embed_type='timestep' to carry the second time, or 'identity' for a "
            f"class-conditional model (got {config.class_embed_type!r}); build one with build_mmf_unet or "
            "add_second_time_embedding."
        )
    if config.time_embedding_type != "positional":
        raise ValueError(
            f"time_embedding_type={config.time_embedding_type!r} is not supported: use 'positional' "
            "(Fourier features divide by t and fail at t = 0 or h = 0)."
        )
    enable_forward_ad(unet)
    install_class_embedding_cast(unet)
    return unet


def build_mmf_unet(
    sample_size: int = 28,
    in_channels: int = 1,
    out_channels: int | None = None,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    attention_levels: Sequence[bool] | None = None,
    norm_num_groups: int = 8,
    attention_head_dim: int = 8,
    **unet_kwargs,
) -> UNet2DModel:
    """Build a `UNet2DModel` configured for MMF: positional time embedding, a second time via
    ``class_embed_type="timestep"``, forward-AD-safe attention.

    Args:
        sample_size: image height and width; each down block halves it, so it must be divisible by
            ``2 ** (len(block_out_channels) - 1)``.
        in_channels / out_channels: image channels (``out_channels`` defaults to ``in_channels``: ``u`` has the
            shape of the image).
        block_out_channels: channels per resolution level.
        attention_levels: one bool per level, True for a self-attention block (default: attention on the
            lowest-resolution level only).
        norm_num_groups, attention_head_dim, layers_per_block: passed to UNet2DModel.
        **unet_kwargs: any other UNet2DModel argument.
    """
    levels = len(block_out_channels)
    if attention_levels is None:
        attention_levels = [False] * (levels - 1) + [True]
    if len(attention_levels) != levels:
        raise ValueError(f"attention_levels needs one entry per level ({levels}), got {len(attention_levels)}")
    if sample_size % (2 ** (levels - 1)):
        raise ValueError(f"sample_size={sample_size} is not divisible by 2**{levels - 1} for {levels} levels")
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(f"every entry of block_out_channels={tuple(block_out_channels)} must divide by "
                         f"norm_num_groups={norm_num_groups}")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        block_out_channels=tuple(block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
        time_embedding_type="positional",
        class_embed_type="timestep",
        **unet_kwargs,
    )
    return prepare_unet_for_mmf(unet)


def add_second_time_embedding(unet: UNet2DModel) -> UNet2DModel:
    """Turn an ordinary diffusion `UNet2DModel` (one timestep) into a two-time MMF backbone, keeping its weights.

    The new second-time MLP has its output layer set to zero, so at the start the model computes exactly what the
    original UNet computed at timestep ``t`` (the second time contributes nothing until training moves it); the
    hidden layer keeps its random initialisation so gradients can flow. Returns a new UNet2DModel.
    """
    if unet.config.class_embed_type == "timestep":
        return prepare_unet_for_mmf(unet)
    if unet.config.class_embed_type is not None or unet.config.num_class_embeds is not None:
        raise ValueError("This UNet already uses its class-embedding slot for labels; it cannot carry a second time.")
    config = dict(unet.config)
    # from_config drops every key listed in `_use_default_values` (those the original left at their defaults, which
    # includes class_embed_type for a UNet built without it), so the override below would be lost.
    config.pop("_use_default_values", None)
    config["class_embed_type"] = "timestep"
    new = UNet2DModel.from_config(config).to(dtype=unet.dtype, device=unet.device)
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("class_embedding.") for k in missing):
        raise ValueError(f"Could not carry weights over: missing={missing}, unexpected={unexpected}")
    with torch.no_grad():
        new.class_embedding.linear_2.weight.zero_()
        new.class_embedding.linear_2.bias.zero_()
    return prepare_unet_for_mmf(new)


def check_label_init_std(label_init_std) -> None:
    if isinstance(label_init_std, bool) or not isinstance(label_init_std, (int, float)) or not label_init_std >= 0:
        raise ValueError(f"label_init_std must be a number >= 0, got {label_init_std!r}")


def conditioner_around(
    second_time_mlp: torch.nn.Module,
    backbone: torch.nn.Module,
    num_classes: int,
    class_names: Optional[Sequence[str]],
    label_init_std: float,
    *,
    projection_dim: int,
    flip_sin_to_cos: bool,
    freq_shift: float,
) -> MMFConditioner:
    """An `MMFConditioner` holding a copy of ``second_time_mlp`` (a backbone's second-time ``TimestepEmbedding``,
    whose sinusoid convention the other arguments give), on ``backbone``'s device and dtype, with its label embedding
    zero (``label_init_std = 0``: the pair computes what the backbone computed) or drawn from
    ``N(0, label_init_std^2)``. Shared by `add_class_conditioning` and `add_dit_class_conditioning`."""
    check_label_init_std(label_init_std)
    conditioner = MMFConditioner(
        num_classes=num_classes,
        time_embed_dim=second_time_mlp.linear_1.out_features,
        projection_dim=projection_dim,
        flip_sin_to_cos=flip_sin_to_cos,
        freq_shift=freq_shift,
        class_names=list(class_names) if class_names is not None else None,
    ).to(device=backbone.device)
    if conditioner.dtype != backbone.dtype:
        conditioner = conditioner.to(dtype=backbone.dtype)
    conditioner.time_embedding.load_state_dict(second_time_mlp.state_dict())
    with torch.no_grad():
        if label_init_std > 0:
            conditioner.label_embedding.weight.normal_(0.0, float(label_init_std))
        else:
            conditioner.label_embedding.weight.zero_()
    return conditioner


def add_class_conditioning(
    unet: UNet2DModel,
    num_classes: int,
    class_names: Optional[Sequence[str]] = None,
    label_init_std: float = 0.0,
) -> Tuple[UNet2DModel, MMFConditioner]:
    """Turn an unconditional two-time MMF UNet into a class-conditional one, keeping what it has learned.

    Returns ``(unet, conditioner)``: a new UNet2DModel with ``class_embed_type="identity"`` carrying every weight of
    ``unet`` except its second-time MLP, which moves into the `MMFConditioner` unchanged. With ``label_init_std = 0``
    (the default) the label embedding starts at zero, so the pair computes exactly what ``unet`` computed for every
    label (including the "no label" token) until training moves it. A positive value draws it from
    ``N(0, label_init_std^2)`` instead: distinct codes per class from the start, which training picks up much
    faster than it grows a zero embedding under Adam (whose steps are at most about the learning rate), at the price
    of perturbing the warm start. A fresh class-conditional model is
    ``add_class_conditioning(build_mmf_unet(...), num_classes, label_init_std=1.0)`` (nn.Embedding's own init).
    """
    check_label_init_std(label_init_std)
    config = dict(unet.config)
    if config.get("class_embed_type") != "timestep":
        raise ValueError(
            "add_class_conditioning takes an unconditional two-time UNet (class_embed_type='timestep'), got "
            f"{config.get('class_embed_type')!r}"
        )
    if config.get("time_embedding_type") != "positional":
        raise ValueError(f"time_embedding_type must be 'positional', got {config.get('time_embedding_type')!r}")
    conditioner = conditioner_around(unet.class_embedding, unet, num_classes, class_names, label_init_std,
                                     projection_dim=unet.class_embedding.linear_1.in_features,
                                     flip_sin_to_cos=config["flip_sin_to_cos"], freq_shift=config["freq_shift"])
    config.pop("_use_default_values", None)
    config["class_embed_type"] = "identity"
    new = UNet2DModel.from_config(config).to(device=unet.device)
    if new.dtype != unet.dtype:
        new = new.to(dtype=unet.dtype)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("class_embedding.")}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"Could not carry weights over: missing={missing}, unexpected={unexpected}")
    return prepare_unet_for_mmf(new), conditioner


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel-style (``.module``) and torch.compile (``._orig_mod``) wrappers,
    which hide its attributes."""
    while True:
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner


def unet_model_fn(
    unet: torch.nn.Module,
    time_scale: float = DEFAULT_TIME_SCALE,
    second_time: str = "h",
    conditioner: Optional[torch.nn.Module] = None,
) -> ModelFn:
    """Return ``model_fn(z, r, t, class_labels=None) -> u`` for `ModularMeanFlowLoss`, using the same mapping as
    `MMFPipeline` (``class_labels`` only with a ``conditioner``: long ``(B,)`` ids, ``None`` is "no label").

    ``unet`` and ``conditioner`` may be wrapped (e.g. by ``accelerator.prepare``, or ``torch.compile``); the wrappers'
    forwards are called, and the "no label" id is read from the wrapped module.
    """
    null_label = None if conditioner is None else _unwrap(conditioner).null_label

    def model_fn(
        z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if conditioner is not None and class_labels is None:
            class_labels = torch.full(t.shape, null_label, dtype=torch.long, device=t.device)
        return unet_average_velocity(
            unet, z, r, t, time_scale=time_scale, second_time=second_time,
            conditioner=conditioner, class_labels=class_labels,
        )

    return model_fn
