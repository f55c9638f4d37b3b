"""`MMFConditioner`: the second time and a class label, embedded for a stock `UNet2DModel`.

Conventions (the same in every module of mmf_diffusers): ``t = 0`` is data, ``t = 1`` noise, ``0 <= r <= t <= 1``;
the network predicts the average velocity ``u(z_t, r, t | c)``.

An unconditional MMF UNet carries the second time in its one extra embedding slot (``class_embed_type="timestep"``).
A class-conditional one needs that slot for two things, so the UNet is built with ``class_embed_type="identity"``
(it adds whatever vector it is given to its time embedding) and this module computes that vector:

    embedding(h, c) = MLP(sinusoid(h)) + E[c],     E has num_classes + 1 rows; the last one is "no label".

The sinusoid and the MLP have the shapes of UNet2DModel's own timestep-class embedding, so an unconditional model's
weights move over unchanged (`mmf_diffusers.unet.add_class_conditioning`, with ``E`` starting at zero). The module
is saved as its own pipeline component (``conditioner/config.json`` + weights) and keeps the class names.

This file imports only torch and diffusers: it is also copied as ``conditioner/conditioning_mmf.py`` into Hub
repositories (diffusers' remote-code layout).
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin, get_parameter_dtype

LabelsLike = Union[int, str, Sequence[Union[int, str]], torch.Tensor, None]


class MMFConditioner(ModelMixin, ConfigMixin):
    r"""
    Embeds the UNet's second time (``h = t - r``, scaled) and a class label into one vector of the UNet's time-embedding
    width, for a UNet2DModel built with ``class_embed_type="identity"``.

    Args:
        num_classes (`int`): number of real classes; label id ``num_classes`` is the "no label" token (classifier-free
            guidance drops labels to it during training, and the pipeline uses it for unconditional samples).
        time_embed_dim (`int`): the UNet's time-embedding width (``4 * block_out_channels[0]`` for UNet2DModel).
        projection_dim (`int`): sinusoid channels (UNet2DModel uses ``block_out_channels[0]``).
        flip_sin_to_cos (`bool`), freq_shift (`int`): the sinusoid's conventions, as the UNet's ``config``.
        class_names (`List[str]`, *optional*): one name per class id (defaults to ``"0"``, ``"1"``, ...).
        guidance_w (`float`, *optional*), guidance_kappa (`float`, *optional*): the training-time guidance the model
            was trained with (``v_tilde = w (e - x) + kappa u(z,t,t|c) + (1 - w - kappa) u(z,t,t|none)``), kept as a
            record; its effective scale is ``w / (1 - kappa)``. ``None`` when trained without it.
        class_prior (`List[float]`, *optional*): how often each class occurs in the training data (one non-negative
            weight per class); the pipeline draws the classes of a call without ``class_labels`` from it. ``None``:
            uniform.
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int,
        time_embed_dim: int,
        projection_dim: int,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        class_names: Optional[List[str]] = None,
        guidance_w: Optional[float] = None,
        guidance_kappa: Optional[float] = None,
        class_prior: Optional[List[float]] = None,
    ):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("time_embed_dim", time_embed_dim),
                            ("projection_dim", projection_dim)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if class_names is not None:
            names = [str(n) for n in class_names]
            if len(names) != num_classes:
                raise ValueError(f"Got {len(names)} class_names for num_classes={num_classes}")
            if len(set(names)) != len(names):
                raise ValueError(f"class_names must be distinct, got {names}")
        if class_prior is not None:
            weights = [float(w) for w in class_prior]
            if len(weights) != num_classes or not all(w >= 0 and w < float("inf") for w in weights) or sum(weights) <= 0:
                raise ValueError(f"class_prior must hold {num_classes} finite non-negative weights with a positive sum, "
                                 f"got {class_prior!r}")
        self.time_proj = Timesteps(projection_dim, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(projection_dim, time_embed_dim)
        self.label_embedding = torch.nn.Embedding(num_classes + 1, time_embed_dim)

    @property
    def null_label(self) -> int:
        """The id of the "no label" token: ``num_classes``."""
        return self.config.num_classes

    @property
    def class_names(self) -> List[str]:
        """One name per class id."""
        names = self.config.class_names
        return [str(n) for n in names] if names is not None else [str(i) for i in range(self.config.num_classes)]

    @property
    def class_prior(self) -> torch.Tensor:
        """The class frequencies of the training data as a float ``(num_classes,)`` tensor summing to 1 (uniform
        when the config has none)."""
        weights = self.config.get("class_prior") if hasattr(self.config, "get") else None
        prior = torch.ones(self.config.num_classes) if weights is None else torch.tensor(weights, dtype=torch.float)
        return prior / prior.sum()

    def sample_labels(self, batch_size: int, generator=None, device=None) -> torch.Tensor:
        """``batch_size`` class ids drawn from `class_prior` (with ``generator``, or one generator per row)."""
        prior = self.class_prior
        if isinstance(generator, list):
            ids = [torch.multinomial(prior.to(g.device), 1, generator=g) for g in generator]
            return torch.cat(ids).to(device)
        gen_device = generator.device if generator is not None else "cpu"
        return torch.multinomial(prior.to(gen_device), batch_size, replacement=True, generator=generator).to(device)

    def label_ids(self, class_labels: LabelsLike, batch_size: int, device=None) -> torch.Tensor:
        """Turn what a user gives into a LongTensor of ``batch_size`` label ids.

        ``None`` is "no label" for every row; one int or name, or a list of one, is used for every row; a longer
        list/tuple/1-D tensor must have one entry per row (a numpy array of ids works too). A column of shape ``(B, 1)``
        (a tensor, or a list of one-element lists, as diffusers' batch tests make from ``[label]``) is read as ``B``
        labels. Strings are class names (``"none"`` is the "no label" token unless a class has that name), integers are
        class ids; anything else, an unknown name or an id outside ``[0, num_classes)`` raises a ValueError that lists
        the valid labels.
        """
        if class_labels is None:
            return torch.full((batch_size,), self.null_label, dtype=torch.long, device=device)
        if not torch.is_tensor(class_labels) and hasattr(class_labels, "dtype") and hasattr(class_labels, "shape"):
            class_labels = torch.as_tensor(class_labels)  # a numpy array (or numpy integer) of ids
        if torch.is_tensor(class_labels):
            if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
                raise ValueError(f"class_labels as a tensor must hold integer ids, got dtype {class_labels.dtype}")
            if class_labels.dim() == 2 and class_labels.shape[1] == 1:
                class_labels = class_labels[:, 0]
            if class_labels.dim() > 1:
                raise ValueError(f"class_labels must be 0-D, 1-D or a (B, 1) column, got shape "
                                 f"{tuple(class_labels.shape)}")
            class_labels = class_labels.tolist()
        if isinstance(class_labels, (str, numbers.Integral)):
            class_labels = [class_labels]
        if not isinstance(class_labels, (list, tuple)):
            raise ValueError(f"class_labels must be an int, a name, or a list of them; got {type(class_labels).__name__}")
        # A column [[a], [b], ...] is a list of labels.
        class_labels = [label[0] if isinstance(label, (list, tuple)) and len(label) == 1 else label
                        for label in class_labels]
        if len(class_labels) == 1:
            class_labels = list(class_labels) * batch_size
        if len(class_labels) != batch_size:
            raise ValueError(f"Got {len(class_labels)} class labels for {batch_size} images; give one per image or one "
                             "for all")
        names = self.class_names
        index = {"none": self.null_label, **{name: i for i, name in enumerate(names)}}
        ids = []
        for label in class_labels:
            if isinstance(label, str):
                if label not in index:
                    raise ValueError(f"Unknown class name {label!r}; this model knows {names}")
                ids.append(index[label])
            elif isinstance(label, numbers.Integral) and not isinstance(label, bool):
                if not 0 <= int(label) < len(names):
                    raise ValueError(
                        f"Class id {int(label)} is out of range: this model has {len(names)} classes (0..{len(names) - 1})"
                    )
                ids.append(int(label))
            else:
                raise ValueError(f"A class label must be an int id or a name, got {label!r}")
        return torch.tensor(ids, dtype=torch.long, device=device)

    def forward(self, second_time: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """``MLP(sinusoid(second_time)) + E[class_labels]``: shape ``(B, time_embed_dim)``.

        Args:
            second_time: float ``(B,)``, already multiplied by the pipeline's ``time_scale``.
            class_labels: long ``(B,)`` ids in ``[0, num_classes]`` (``num_classes`` is "no label").
        """
        # The MLP's compute dtype: its weights' dtype, or the compute dtype of layerwise casting (never the storage
        # dtype, e.g. float8, in which layerwise casting keeps the weights between calls).
        projected = self.time_proj(second_time).to(dtype=get_parameter_dtype(self.time_embedding))
        return self.time_embedding(projected) + self.label_embedding(class_labels)
