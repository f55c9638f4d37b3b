"""`MMFPipeline`: one-step (or few-step) image generation with a Modular MeanFlow model.

Conventions (the same in every module of mmf_diffusers):
    * time runs from data to noise: ``t = 0`` is data, ``t = 1`` is noise, and always ``0 <= r <= t <= 1``;
    * path ``z_t = (1 - t) * x + t * e`` with ``e ~ N(0, I)``;
    * the network predicts the *average* velocity ``u(z_t, r, t)``, so ``z_r = z_t - (t - r) * u(z_t, r, t)``
      and one step is ``x = z_1 - u(z_1, 0, 1)``.

With a ``vae`` component (latent MMF, as diffusers' latent-diffusion pipelines), ``x`` is a scaled latent:
``x = (E(image) - shift_factor) * scaling_factor`` with the VAE config's factors (`encode_images`), and images come
back as ``D(x / scaling_factor + shift_factor)`` (`decode_latents`); one step is one UNet call plus one decode.

This file imports only torch and diffusers (and huggingface_hub, which diffusers depends on): it is also copied as
``pipeline.py`` into Hub repositories (diffusers' remote-code layout), so people without mmf_diffusers installed can load
a pushed model.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DiffusionPipeline, ImagePipelineOutput, UNet2DModel, VQModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.modeling_utils import get_parameter_dtype
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download

logger = logging.get_logger(__name__)

#: The second time the UNet is given besides ``t``. ``"h"`` is the interval ``h = t - r`` (MeanFlow's best
#: choice, and ours); ``"r"`` is the start of the interval itself.
SECOND_TIME_CHOICES = ("h", "r")

#: Scale applied to both times before UNet2DModel's sinusoidal embedding: the UNet sees
#: ``timestep = time_scale * t`` and ``class_labels = time_scale * h``. Measured at initialisation on a
#: (32, 64, 64) UNet (``python benchmarks/time_scale.py``): mean |d_t u| is 0.018 / 0.17 / 1.6 / 16 at scales
#: 1 / 10 / 100 / 1000 (against 0.59 for the spatial part d_z u . v), and a forward finite difference at
#: eps = 1e-3 is off the exact jvp by 0.4% / 0.4% / 4% / 46%. At 1000 (diffusers' usual timestep units) the
#: derivative target is dominated by the highest sinusoid frequencies; at 1 the embedding barely moves over
#: [0, 1]. 10 keeps finite differences exact to 0.4% while the time input still spans several frequencies.
DEFAULT_TIME_SCALE = 10.0

#: ``"latent"`` is the UNet's output space before any decoding, as in diffusers' pipelines: the sample ``x`` itself
#: (pixels in about ``[-1, 1]``, or the scaled latent of a latent model), neither decoded, rescaled nor clipped.
OUTPUT_TYPES = ("pil", "np", "pt", "latent")

#: Key of ``model_index.json`` under which a folder in diffusers' remote-code layout (see `mmf_diffusers.hub`) keeps
#: the package's own entries, e.g. ``{"_class_name": "MMFPipeline", "scheduler": ["mmf_diffusers.scheduling_mmf",
#: "MMFScheduler"]}``. diffusers ignores keys that start with ``_``.
PACKAGE_LAYOUT_KEY = "_mmf_package_layout"

#: The autoencoders a latent MMFPipeline takes as its ``vae`` (all map images in ``[-1, 1]`` to latents and back).
VAE_CLASSES = (AutoencoderKL, AutoencoderTiny, VQModel)


def check_vae(vae) -> None:
    """Raise a ValueError unless ``vae`` is one of `VAE_CLASSES` with a finite non-zero ``scaling_factor`` and a
    finite (or missing) ``shift_factor``: latents are ``(E(x) - shift) * scale`` and decode as
    ``D(x / scale + shift)``, so any other factor makes every latent or every image NaN (or constant)."""
    if not isinstance(vae, VAE_CLASSES):
        names = ", ".join(cls.__name__ for cls in VAE_CLASSES)
        raise ValueError(f"vae must be one of {names} from diffusers, got {type(vae).__name__}")

    def finite(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    scale, shift = vae.config.get("scaling_factor"), vae.config.get("shift_factor")
    if not finite(scale) or scale == 0:
        raise ValueError(f"The VAE's scaling_factor is {scale!r}: it must be a finite non-zero number (latents are "
                         "(E(x) - shift_factor) * scaling_factor and decode as D(x / scaling_factor + shift_factor)); "
                         "set it in the VAE's config.json")
    if shift is not None and not finite(shift):
        raise ValueError(f"The VAE's shift_factor is {shift!r}: it must be a finite number (or null) in the VAE's "
                         "config.json")


def vae_latent_channels(vae) -> int:
    """Channels of the latent the UNet works on (a VQModel's codebook vectors have ``vq_embed_dim`` of them)."""
    check_vae(vae)
    if isinstance(vae, VQModel):
        return int(vae.config.vq_embed_dim or vae.config.latent_channels)
    return int(vae.config.latent_channels)


def vae_scale_factor(vae) -> int:
    """How many pixels one latent position covers along each side: ``image size = latent size * factor``."""
    check_vae(vae)
    if isinstance(vae, AutoencoderTiny):
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_scaling(vae) -> Tuple[float, float]:
    """``(scaling_factor, shift_factor)`` from the VAE's config (a missing or ``None`` shift is 0)."""
    check_vae(vae)
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, C, H, W)`` in ``[-1, 1]`` -> scaled latents ``(B, c, H / f, W / f)``: ``(E(x) - shift) * scale``.

    ``E`` is the posterior mean for an `AutoencoderKL` (deterministic: the same image always gives the same latent),
    the encoder output for `AutoencoderTiny`, and the unquantised encoder output for a `VQModel` (its decoder
    quantises). Runs in the VAE's dtype; no gradients are kept.
    """
    scale, shift = vae_scaling(vae)
    with torch.no_grad():
        out = vae.encode(images.to(device=vae.device, dtype=vae.dtype))
        latents = out.latent_dist.mean if isinstance(vae, AutoencoderKL) else out.latents
    return (latents - shift) * scale


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents ``(B, c, h, w)`` -> images ``(B, C, h * f, w * f)``, about ``[-1, 1]``: ``D(x / scale + shift)``."""
    scale, shift = vae_scaling(vae)
    return vae.decode(latents.to(dtype=vae.dtype) / scale + shift).sample


def unet_average_velocity(
    unet: UNet2DModel,
    z: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor,
    time_scale: float = DEFAULT_TIME_SCALE,
    second_time: str = "h",
    conditioner: Optional[torch.nn.Module] = None,
    class_labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Evaluate the average velocity ``u(z, r, t)`` (or ``u(z, r, t | c)``) with a stock `UNet2DModel`.

    This is the one place where ``(z, r, t[, c])`` is mapped to the UNet's inputs. Unconditional: the UNet was built
    with ``class_embed_type="timestep"``, so its ``class_labels`` input (the second time) goes through the same
    sinusoidal projection as the timestep, followed by its own MLP, and the two embeddings are summed.
    Class-conditional: the UNet has ``class_embed_type="identity"`` and ``conditioner`` (an ``MMFConditioner``) turns
    the second time and the label ids into the vector the UNet adds to its time embedding.

    Args:
        unet: a UNet2DModel with ``class_embed_type="timestep"`` (or ``"identity"`` with a ``conditioner``).
        z: noisy sample ``z_t``, shape ``(B, C, H, W)``.
        r: start of the interval, shape ``(B,)``, float, in ``[0, 1]``.
        t: end of the interval (current time), shape ``(B,)``, float, in ``[0, 1]``, ``r <= t``.
        time_scale: the UNet sees ``time_scale * t`` and ``time_scale * (second time)``.
        second_time: ``"h"`` feeds ``h = t - r``; ``"r"`` feeds ``r``.
        conditioner: the ``MMFConditioner`` of a class-conditional model, else ``None``.
        class_labels: long ``(B,)`` label ids for the conditioner (``conditioner.null_label`` is "no label";
            ``None`` means "no label" for every row). Only with a ``conditioner``.

    Returns:
        ``u``, shape ``(B, C, H, W)``, in the UNet's dtype.
    """
    if second_time == "h":
        second = t - r
    elif second_time == "r":
        second = r
    else:
        raise ValueError(f"second_time must be one of {SECOND_TIME_CHOICES}, got {second_time!r}")
    # Float tensors of shape (B,): a Python float timestep would be truncated to an int by UNet2DModel.
    if conditioner is None:
        if class_labels is not None:
            raise ValueError("class_labels were given but the model is unconditional (it has no conditioner)")
        return unet(z, t * time_scale, class_labels=second * time_scale).sample
    if class_labels is None:
        class_labels = torch.full(t.shape, conditioner.null_label, dtype=torch.long, device=t.device)
    embedding = conditioner(second * time_scale, class_labels)
    return unet(z, t * time_scale, class_labels=embedding).sample


#: The pipelines of mmf_diffusers by class name, and what they make: loading one's folder with the other is refused.
MMF_PIPELINES = {"MMFPipeline": "images", "MMFTrajectoryPipeline": "trajectories"}


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


def _cast_to_compute_dtype(module: torch.nn.Module, args: tuple) -> tuple:
    # diffusers' `get_parameter_dtype` is the dtype the module computes in: its weights' dtype, or the compute dtype
    # of layerwise casting (`enable_layerwise_casting`), whose weights are stored in another dtype (e.g. float8).
    dtype = get_parameter_dtype(module)
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def install_class_embedding_cast(unet: UNet2DModel) -> None:
    """Make UNet2DModel's ``class_embed_type="timestep"`` path work in bfloat16/float16/float64 and under layerwise
    casting.

    UNet2DModel casts the sinusoid of the timestep to the model dtype but not the sinusoid of ``class_labels``, so
    a model whose weights are not float32 fails in its class-embedding MLP. A forward pre-hook casts that input to
    the MLP's compute dtype (its weights' dtype, or the ``compute_dtype`` of ``enable_layerwise_casting``, never the
    storage dtype). Idempotent; hooks are not saved, so pipelines install it when they are built.
    """
    embedding = getattr(unet, "class_embedding", None)
    if embedding is None or not hasattr(embedding, "linear_1"):
        return
    if getattr(embedding, "_mmf_cast_hook", None) is None:
        embedding._mmf_cast_hook = embedding.register_forward_pre_hook(_cast_to_compute_dtype)


class MMFPipeline(DiffusionPipeline):
    r"""
    Pipeline for image generation with a Modular MeanFlow (MMF) model in one or a few steps, unconditional or
    class-conditional (with classifier-free guidance folded into training, or applied at sampling time).

    The UNet predicts the average velocity ``u(z_t, r, t)`` between times ``r <= t`` (``t = 0`` data, ``t = 1``
    noise); one step maps noise to an image as ``x = z_1 - u(z_1, 0, 1)``, and ``N`` steps follow the grid of the
    scheduler from 1 down to 0.

    Args:
        unet ([`UNet2DModel`]): a two-time UNet predicting ``u``: ``class_embed_type="timestep"`` for an
            unconditional model, ``"identity"`` for a class-conditional one (fed by ``conditioner``).
        scheduler ([`MMFScheduler`] or [`FlowMapEulerDiscreteScheduler`]): applies ``z_r = z_t - (t - r) u``.
        conditioner ([`MMFConditioner`], *optional*): embeds the second time and a class label for a class-conditional
            UNet; it keeps the class names. ``None`` (the default) for an unconditional model.
        vae ([`AutoencoderKL`], [`AutoencoderTiny`] or [`VQModel`], *optional*): a latent model. The UNet then works
            on latents scaled by the VAE config's ``scaling_factor`` (and ``shift_factor``), with as many channels as
            the latent and ``sample_size`` the latent size, and every output is decoded once. ``None`` (the default):
            the UNet works on pixels.
        time_scale (`float`): scale of both times at the UNet's input; saved in ``model_index.json`` so that sampling
            always uses the mapping the model was trained with.
        second_time (`str`): ``"h"`` (the UNet's second time is ``t - r``) or ``"r"``.
        transformer ([`MMFDiTTransformer2DModel`], *optional*): a two-time DiT in the UNet's place (give exactly one
            of ``unet`` and ``transformer``); the same calls, conditioner and VAE. A DiT makes images of its
            ``sample_size`` (times the VAE's factor) only. `backbone` is whichever of the two the pipeline holds.

    Examples:
        ```py
        >>> import torch
        >>> from mmf_diffusers import MMFPipeline
        >>> pipe = MMFPipeline.from_pretrained("pipelines/mmf-mnist")
        >>> images = pipe(num_images=8, generator=torch.Generator().manual_seed(0)).images  # one network call
        >>> images = pipe(num_images=8, num_inference_steps=2).images  # two calls
        >>> eights = pipe(num_images=8, class_labels=8 * [8]).images  # class-conditional model: eights, one call
        ```
    """

    model_cpu_offload_seq = "conditioner->unet->transformer->vae"
    # The backbone is a ``unet`` or a ``transformer`` (exactly one, checked in __init__); the scheduler is listed
    # only because its argument needs a default after ``unet=None`` (diffusers treats defaulted arguments as
    # modules only when they are optional components); __init__ refuses a pipeline without one.
    _optional_components = ["conditioner", "vae", "unet", "transformer", "scheduler"]

    def __init__(
        self,
        unet: Optional[UNet2DModel] = None,
        scheduler=None,
        conditioner=None,
        vae=None,
        transformer=None,
        time_scale: float = DEFAULT_TIME_SCALE,
        second_time: str = "h",
    ):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("MMFPipeline takes exactly one backbone: a two-time UNet2DModel as `unet` or an "
                             "MMFDiTTransformer2DModel as `transformer` (got "
                             f"{'both' if unet is not None else 'neither'})")
        if scheduler is None:
            raise ValueError("MMFPipeline needs a scheduler (an MMFScheduler or FlowMapEulerDiscreteScheduler)")
        is_dit = transformer is not None
        backbone = transformer if is_dit else unet
        kind = "DiT" if is_dit else "UNet"
        if is_dit and not all(hasattr(backbone.config, key) for key in ("patch_size", "num_attention_heads",
                                                                         "attention_head_dim", "sample_size")):
            raise ValueError(f"transformer must be an MMFDiTTransformer2DModel, got {type(backbone).__name__}")
        if second_time not in SECOND_TIME_CHOICES:
            raise ValueError(f"second_time must be one of {SECOND_TIME_CHOICES}, got {second_time!r}")
        if (
            isinstance(time_scale, bool)
            or not isinstance(time_scale, numbers.Real)
            or not math.isfinite(time_scale)
            or time_scale <= 0
        ):
            raise ValueError(f"time_scale must be a positive finite number, got {time_scale!r}")
        embed_type = getattr(backbone.config, "class_embed_type", None)
        if conditioner is None and embed_type != "timestep":
            builder = "mmf_diffusers.build_mmf_dit" if is_dit else "mmf_diffusers.build_mmf_unet"
            raise ValueError(
                f"MMFPipeline needs a two-time {kind} built with class_embed_type='timestep' "
                f"(got class_embed_type={embed_type!r}); see {builder}. A class-conditional {kind} "
                "(class_embed_type='identity') needs its conditioner."
            )
        if conditioner is not None:
            if embed_type != "identity":
                adder = "add_dit_class_conditioning" if is_dit else "add_class_conditioning"
                raise ValueError(
                    f"A conditioner feeds a {kind} built with class_embed_type='identity', got "
                    f"{embed_type!r}; see mmf_diffusers.{adder}."
                )
            if not all(hasattr(conditioner, name) for name in ("label_ids", "null_label", "class_names")):
                raise ValueError(f"conditioner must be an MMFConditioner, got {type(conditioner).__name__}")
            if is_dit:  # the DiT adds the vector to each block's time embedding, of the transformer's width
                width = backbone.config.num_attention_heads * backbone.config.attention_head_dim
            else:  # UNet2DModel's own rule for its time-embedding width
                width = getattr(unet.config, "time_embedding_dim", None) or 4 * unet.config.block_out_channels[0]
            if conditioner.config.time_embed_dim != width:
                raise ValueError(
                    f"The conditioner makes {conditioner.config.time_embed_dim}-dim embeddings but the {kind}'s time "
                    f"embedding has {width}"
                )
        if not is_dit and getattr(unet.config, "time_embedding_type", "positional") != "positional":
            raise ValueError(
                f"time_embedding_type={unet.config.time_embedding_type!r} is not supported: MMF needs 'positional' "
                "(Fourier features take log(t) and fail at t = 0 or h = 0)."
            )
        if vae is not None:
            check_vae(vae)
            channels = vae_latent_channels(vae)
            # A converted stock DiT may carry out_channels=None, which means in_channels.
            out_channels = backbone.config.out_channels or backbone.config.in_channels
            if backbone.config.in_channels != channels or out_channels != channels:
                raise ValueError(
                    f"The VAE's latents have {channels} channels but the {kind} takes {backbone.config.in_channels} "
                    f"and gives {out_channels}"
                )
        if not is_dit:
            install_class_embedding_cast(unet)
        self.register_modules(unet=unet, transformer=transformer, scheduler=scheduler, conditioner=conditioner,
                              vae=vae)
        self.register_to_config(time_scale=float(time_scale), second_time=second_time)

    @property
    def backbone(self) -> torch.nn.Module:
        """The network predicting ``u``: the ``unet`` component, or the ``transformer`` (a DiT) of a DiT pipeline."""
        unet = getattr(self, "unet", None)
        return unet if unet is not None else self.transformer

    @property
    def is_class_conditional(self) -> bool:
        """Whether the model takes class labels (it has a conditioner)."""
        return getattr(self, "conditioner", None) is not None

    @property
    def is_latent(self) -> bool:
        """Whether the UNet works in the latent space of a VAE (the pipeline has a ``vae``)."""
        return getattr(self, "vae", None) is not None

    @property
    def image_size(self) -> Union[int, Tuple[int, int]]:
        """Size of the images this pipeline makes: the UNet's ``sample_size`` times the VAE's factor (1 on pixels)."""
        factor = vae_scale_factor(self.vae) if self.is_latent else 1
        size = self.backbone.config.sample_size
        return size * factor if isinstance(size, int) else tuple(s * factor for s in size)

    @property
    def class_names(self) -> Optional[List[str]]:
        """The class names of a class-conditional model (index = class id), else ``None``."""
        return self.conditioner.class_names if self.is_class_conditional else None

    def average_velocity(
        self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``u(z, r, t [| c])`` with this pipeline's time mapping; ``r`` and ``t`` of shape ``(B,)`` in ``[0, 1]``;
        ``class_labels`` long ``(B,)`` ids (class-conditional models only; ``None`` is "no label")."""
        return unet_average_velocity(
            self.backbone, z, r, t, time_scale=self.config.time_scale, second_time=self.config.second_time,
            conditioner=getattr(self, "conditioner", None), class_labels=class_labels,
        )

    def guided_average_velocity(
        self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """Classifier-free guidance at sampling time: ``u_none + guidance_scale * (u_c - u_none)``.

        Both branches go through the UNet as one batch of ``2B`` (two network evaluations' worth of work). Rows whose
        label is already "no label" get their unconditional velocity. A model trained with guidance (``guidance_w``,
        ``guidance_kappa`` in the conditioner's config) has scale ``s = w / (1 - kappa)`` built in; this multiplies on
        top of it for the instantaneous velocity, so ``guidance_scale = 1 / s`` approximately undoes it.
        """
        null = torch.full_like(class_labels, self.conditioner.null_label)
        both = self.average_velocity(
            torch.cat([z, z]), torch.cat([r, r]), torch.cat([t, t]), torch.cat([class_labels, null])
        )
        u_cond, u_none = both.chunk(2)
        return u_none + guidance_scale * (u_cond - u_none)

    # Hub support. diffusers' own download step rejects a repository whose components live in a pip package, and a
    # repository in the remote-code layout would otherwise run its copied files instead of the installed classes.
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "MMFPipeline":
        """[`DiffusionPipeline.from_pretrained`] that also takes a Hub repo id pushed by mmf_diffusers.

        A repo id (anything that is not a local directory) is fetched whole with `huggingface_hub.snapshot_download`
        (given ``revision``, ``token``, ``cache_dir``, ``force_download`` and ``local_files_only`` from ``kwargs``) and
        the local snapshot is loaded; diffusers' own download step would reject the repository's package components.
        A local folder is loaded as it is: one written by `save_pretrained`, or one in the remote-code layout (then
        `load_config` makes the installed classes load it and nothing from the folder runs).
        """
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
        """[`ConfigMixin.load_config`] that reads a remote-code ``model_index.json`` as the package layout.

        A folder in the remote-code layout names its copied files (``"_class_name": ["pipeline", "MMFPipeline"]``,
        ``"scheduler": ["scheduling_mmf", "MMFScheduler"]``), which ``DiffusionPipeline.from_pretrained(...,
        trust_remote_code=True)`` needs, and keeps the package's entries under `PACKAGE_LAYOUT_KEY`. When the modules
        those entries name are imported, this class reads them instead, so it loads the folder with its own classes.
        """
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
        """Add the remote-code layout (`mmf_diffusers.hub.prepare_folder_for_hub`) before every Hub upload.

        `push_to_hub` and ``save_pretrained(..., push_to_hub=True)`` both upload through this method, so a pipeline
        pushed either way loads with ``MMFPipeline.from_pretrained`` and with ``DiffusionPipeline.from_pretrained(...,
        trust_remote_code=True)``. The import is deferred so that this file still works without mmf_diffusers, and
        is not an import statement so that diffusers' remote-code check does not ask its users to install it.
        """
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

    @staticmethod
    def _check_positive_int(name: str, value) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        return int(value)

    # --- the state diffusers' pipelines expose during and after a call ------------------------------------------
    _callback_tensor_inputs = ["latents"]
    _num_timesteps = 0
    _interrupt = False
    _guidance_scale = None

    @property
    def num_timesteps(self) -> int:
        """Network steps of the latest call (its ``num_inference_steps``)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a ``callback_on_step_end`` to skip the remaining steps (diffusers'
        convention); the call then returns the sample as it stands."""
        return self._interrupt

    @property
    def guidance_scale(self) -> Optional[float]:
        """The sampling-time guidance scale of the latest call (``None``: no guidance at sampling time). A
        ``callback_on_step_end`` may change ``pipe._guidance_scale``; the next steps use the new value."""
        return self._guidance_scale

    def _image_shape(self, count: int, height, width) -> Tuple[int, ...]:
        """``(count, C, h, w)``: the UNet's sample shape for images of ``height x width`` pixels (default: the
        `image_size` the model was trained at). Each side must be a multiple of the VAE's factor times the UNet's
        downsampling factor, so that the convolutions line up."""
        factor = vae_scale_factor(self.vae) if self.is_latent else 1
        default = self.image_size if isinstance(self.image_size, tuple) else (self.image_size, self.image_size)
        if getattr(self, "unet", None) is None:
            # A DiT's positional embedding is fixed to its square sample_size: it makes images of one size only.
            for name, value in (("height", height), ("width", width)):
                if value is not None and self._check_positive_int(name, value) != default[0]:
                    raise ValueError(f"`{name}` must be {default[0]} for this DiT model (its positional embedding "
                                     f"is fixed to {default[0]}x{default[1]} images), got {value!r}")
            return (count, self.backbone.config.in_channels, default[0] // factor, default[1] // factor)
        multiple = factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        sides = []
        for name, value, fallback in (("height", height, default[0]), ("width", width, default[1])):
            if value is None:
                if fallback % multiple:
                    levels = len(self.unet.config.block_out_channels)
                    raise ValueError(f"The UNet's sample_size makes {default[0]}x{default[1]} images, which its "
                                     f"{levels} levels cannot run on (each side must be a multiple of {multiple}): the "
                                     "folder's unet/config.json does not fit its UNet")
                value = fallback
            value = self._check_positive_int(name, value)
            if value % multiple:
                raise ValueError(f"`{name}` must be a multiple of {multiple} for this model (it makes {default[0]}x"
                                 f"{default[1]} images by default), got {value}")
            sides.append(value // factor)
        return (count, self.backbone.config.in_channels, *sides)

    @torch.no_grad()
    def __call__(
        self,
        num_images: Optional[int] = None,
        num_inference_steps: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: Optional[int] = None,
        class_labels=None,
        guidance_scale: Optional[float] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        callback_on_step_end: Optional[Union[Callable, PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> Union[ImagePipelineOutput, Tuple]:
        r"""
        Generate images.

        Args:
            num_images (`int`, *optional*): how many images. ``batch_size`` is accepted as a synonym (the name
                diffusers' unconditional pipelines use); give one or the other. Default: one per entry of
                ``class_labels`` when it is a list (as diffusers' DiT pipeline), else the batch of ``latents``, else 1.
            num_inference_steps (`int`, defaults to 1): network evaluations; 1 is ``x = z_1 - u(z_1, 0, 1)``.
            generator (`torch.Generator` or a list of one per image): makes the initial noise reproducible; with a
                list, image ``i`` depends only on generator ``i``.
            latents (`torch.Tensor`, *optional*): initial noise ``z_1`` of shape ``(num_images, C, h, w)``, the UNet's
                input (for a latent model: latent channels and latent size). Must be finite.
            output_type (`str`): ``"pil"``, ``"np"`` (float array ``(B, H, W, C)`` in ``[0, 1]``), ``"pt"`` (float
                tensor ``(B, C, H, W)`` in ``[0, 1]``) or ``"latent"`` (the UNet's output space before any decoding:
                the final sample ``x``, a tensor ``(B, C, h, w)`` in the UNet's dtype; pixels in about ``[-1, 1]``
                for a pixel model, scaled latents for a latent model, which `decode_latents` turns into images).
            return_dict (`bool`): return an [`ImagePipelineOutput`] instead of a 1-tuple.
            class_labels (class-conditional models only): one label for all images or one per image; class ids
                (``int``) or names (``str``, see `class_names`), as a list or a 1-D integer tensor (a column of
                shape ``(B, 1)`` is read as ``B`` labels); ``"none"`` is the "no label" token (the model's
                unconditional branch, which guidance uses). A one-element list is used for every image. ``None`` (the
                default) draws each image's class from the training data's class frequencies (the conditioner's
                `class_prior`, after the noise, with ``generator``): a sample of the data distribution
                ``sum_c p(c) p(x | c)``.
            guidance_scale (`float`, *optional*): classifier-free guidance at sampling time,
                ``u = u_none + guidance_scale * (u_c - u_none)``: two network evaluations per step. ``None`` (the
                default) is one evaluation of the conditional model, which is already guided when it was trained with
                guidance. Needs a class-conditional model.
            height, width (`int`, *optional*): image size in pixels; default the size the model was trained at
                (`image_size`). Other sizes must be multiples of the model's downsampling factor; the UNet is
                convolutional and runs on them, but it only learned images of its training size.
            callback_on_step_end (`Callable`, [`PipelineCallback`] or [`MultiPipelineCallbacks`], *optional*): called
                after every step as ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs)``, where
                ``timestep`` is the scheduler's timestep the step started from and ``callback_kwargs`` holds the
                tensors named in ``callback_on_step_end_tensor_inputs`` after the step. It returns a dict; a
                ``"latents"`` entry replaces the sample the next step starts from (same shape).
            callback_on_step_end_tensor_inputs (list of `str`): the tensors passed to the callback, from
                ``pipe._callback_tensor_inputs`` (``["latents"]``).

        Returns:
            [`ImagePipelineOutput`] or `tuple` with the images.

        Raises:
            ValueError: for any invalid argument, and when the model produces non-finite values (NaN or inf) from
            finite inputs; nothing is returned as a success then.
        """
        # 0. check the request before doing any work
        if num_images is not None and batch_size is not None and num_images != batch_size:
            raise ValueError(f"Give `num_images` or its synonym `batch_size`, not both ({num_images} != {batch_size})")
        if not self.is_class_conditional and (class_labels is not None or guidance_scale is not None):
            given = "class_labels" if class_labels is not None else "guidance_scale"
            raise ValueError(f"`{given}` was given, but this model is unconditional (it has no conditioner)")
        count = num_images if num_images is not None else batch_size
        label_count = _count_labels(class_labels)
        if label_count == 0:
            raise ValueError("`class_labels` is empty: give one label per image, or a single label for all")
        if count is not None:
            source = f"num_images={count}" if num_images is not None else f"batch_size={count}"
        elif label_count is not None:
            count, source = label_count, f"one per class label, {label_count} given"
        elif torch.is_tensor(latents) and latents.dim() > 0:
            count, source = latents.shape[0], "the batch of `latents`"
        else:
            count, source = 1, "the default"
        count = self._check_positive_int("num_images", count)
        num_inference_steps = self._check_positive_int("num_inference_steps", num_inference_steps)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(generator, list) and len(generator) != count:
            raise ValueError(f"Got a list of {len(generator)} generators for {count} images ({source}); give one "
                             "generator per image, or a single one")
        if label_count is not None and label_count not in (1, count):
            raise ValueError(f"Got {label_count} class labels for {count} images ({source}); give one per image "
                             "or one for all")
        labels = None
        if self.is_class_conditional and class_labels is not None:
            labels = self.conditioner.label_ids(class_labels, count, device=self._execution_device)
        if guidance_scale is not None:
            if (
                isinstance(guidance_scale, bool)
                or not isinstance(guidance_scale, numbers.Real)
                or not math.isfinite(guidance_scale)
            ):
                raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}")
            if labels is not None and bool((labels == self.conditioner.null_label).all()):
                raise ValueError("`guidance_scale` needs class labels: the 'no label' token cannot be guided")
            guidance_scale = float(guidance_scale)
        callback_on_step_end_tensor_inputs = _check_callback(
            callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
        )
        shape = self._image_shape(count, height, width)
        dtype = self.backbone.dtype

        # 1. sample the noise z_1
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)
        else:
            if not torch.is_tensor(latents) or tuple(latents.shape) != shape:
                got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
                raise ValueError(f"`latents` must be a tensor of shape {shape} ({count} images: {source}), got {got}")
            if not latents.is_floating_point():  # complex, integer or bool noise is a mistake, not a request
                raise ValueError(f"`latents` must be a real floating-point tensor, got {latents.dtype}")
            if not bool(torch.isfinite(latents).all()):
                raise ValueError("`latents` must be finite (it holds NaN or inf)")
            latents = latents.to(device=self._execution_device, dtype=dtype)
        if self.is_class_conditional and labels is None:
            # no class asked for: draw the classes from the data's class frequencies
            labels = self.conditioner.sample_labels(count, generator=generator, device=self._execution_device)

        # 2. walk the grid 1 = s_0 > s_1 > ... > s_N = 0 with one network call per interval
        self._guidance_scale = guidance_scale
        self._interrupt = False
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        sigmas = self.scheduler.sigmas
        self._num_timesteps = len(self.scheduler.timesteps)
        for i, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                continue
            t = sigmas[i].to(dtype=torch.float32).expand(count)
            r = sigmas[i + 1].to(dtype=torch.float32).expand(count)
            if self._guidance_scale is None:  # read at every step: a callback may change it
                u = self.average_velocity(latents, r, t, labels)
            else:
                u = self.guided_average_velocity(latents, r, t, labels, float(self._guidance_scale))
            latents = self.scheduler.step(u, timestep, latents).prev_sample
            if callback_on_step_end is not None:
                tensors = {"latents": latents}
                outputs = callback_on_step_end(
                    self, i, timestep, {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                )
                latents = _callback_latents(outputs, latents)

        # 3. post-process: decode a latent model's sample (one VAE call); images are in [-1, 1]
        _check_finite(latents, "the sample")
        if output_type == "latent":
            images = latents
        else:
            image = decode_latents(self.vae, latents) if self.is_latent else latents
            _check_finite(image, "the VAE's decoding of a finite sample")
            image = (image.float() / 2 + 0.5).clamp(0, 1)
            if output_type == "pt":
                images = image
            else:
                images = image.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


# --- helpers of `MMFPipeline.__call__`. pipeline_mmf_trajectory.py has its own copies: each pipeline file ships alone
# as a Hub repository's ``pipeline.py`` and cannot import the other.
def _count_labels(class_labels) -> Optional[int]:
    """How many labels ``class_labels`` lists (a list, tuple, 1-D tensor/array, or a ``(B, 1)`` column), or ``None``
    for no labels or a single label (an int, a name, a 0-D tensor)."""
    if class_labels is None or isinstance(class_labels, (str, numbers.Integral)):
        return None
    if isinstance(class_labels, (list, tuple)):
        return len(class_labels)
    shape = getattr(class_labels, "shape", None)  # a tensor or a numpy array
    if shape is not None and len(shape) in (1, 2):
        return int(shape[0])
    return None  # a 0-D tensor is one label; anything else is refused by the conditioner with its reason


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
