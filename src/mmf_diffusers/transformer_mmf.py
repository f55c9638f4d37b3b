"""`MMFDiTTransformer2DModel`: diffusers' DiT with a second time input, for MMF.

Conventions (the same in every module of mmf_diffusers): ``t = 0`` is data, ``t = 1`` noise, ``0 <= r <= t <= 1``;
the network predicts the average velocity ``u(z_t, r, t)`` and sees ``time_scale * t`` as its timestep and
``time_scale * h`` (``h = t - r``, or ``r``) as its second time.

Why a subclass and not a stock `DiTTransformer2DModel`: the stock model conditions through adaLN-zero, and every
transformer block owns its own ``CombinedTimestepLabelEmbeddings`` (a timestep MLP plus a label table; the converted
DiT checkpoints hold the same weights in every block). There is no slot for a second time, and the label tables
drop 10% of the labels at random, independently in each block, whenever the model is in training mode, so two
forwards of the same input differ and a finite-difference derivative is noise. This class keeps the stock model's
modules, state-dict names and forward, and changes one thing, exactly as ``UNet2DModel``'s ``class_embed_type``
does:

* each block's label table becomes an identity: the block adds the vector it is given as ``class_labels`` to its
  timestep embedding (``emb_i = TimestepMLP_i(sinusoid(t)) + class_labels``), and the output layer does the same;
* ``class_embed_type="timestep"`` (unconditional): ``class_labels`` is the second time, a float ``(B,)`` tensor; it
  goes through DiT's own sinusoid (256 channels) and a new MLP (``class_embedding``), whose output layer starts at
  zero, so a new model computes what the stock DiT computes and ignores the second time until training moves it;
* ``class_embed_type="identity"`` (class-conditional): ``class_labels`` is that vector already, ``(B, inner_dim)``,
  computed by an ``MMFConditioner`` (``MLP(sinusoid(h)) + E[label]``) saved as its own pipeline component.

The calls are those of a two-time ``UNet2DModel``: ``model(z, timestep=time_scale * t, class_labels=time_scale * h)``
or ``class_labels=conditioner(time_scale * h, labels)``, so the MMF mapping, pipeline and loss code serve both.

This file imports only torch and diffusers: it can be copied as ``transformer/transformer_mmf.py`` into Hub
repositories (diffusers' remote-code layout).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
# diffusers' pipeline loader finds how to load a component by looking up its base classes by name in the component's
# module (``["mmf_diffusers.transformer_mmf", "MMFDiTTransformer2DModel"]`` in model_index.json): ModelMixin must be
# importable from here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel

CLASS_EMBED_TYPES = ("timestep", "identity")

#: DiT's sinusoidal time features (`CombinedTimestepLabelEmbeddings`): 256 channels, cos first, frequency shift 1.
DIT_TIME_PROJ = dict(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=1)


class MMFDiTTransformer2DModel(DiTTransformer2DModel):
    r"""
    A DiT (`DiTTransformer2DModel`, adaLN-zero) that takes a second time, for Modular MeanFlow.

    The arguments are `DiTTransformer2DModel`'s (the model is one, with the same parameter names), plus:

    Args:
        class_embed_type (`str`, defaults to `"timestep"`): ``"timestep"``: ``class_labels`` is a second time,
            embedded by this model (unconditional MMF); ``"identity"``: ``class_labels`` is a ``(B, inner_dim)``
            vector added to the time embedding of every block (class-conditional MMF, with an ``MMFConditioner``).
        num_embeds_ada_norm (`int`, *optional*): must be ``None`` or ``1``: the stock label tables are replaced (see
            above), so the number of classes lives in the ``MMFConditioner``. Kept so that the saved config reads as
            a DiT's and loads without warnings.
        dropout (`float`, defaults to 0): keep it 0 for finite-difference training (two forwards must see the same
            network).

    Forward: ``model(hidden_states, timestep, class_labels, cross_attention_kwargs=None, return_dict=True)`` with
    ``hidden_states`` of shape ``(B, in_channels, S, S)`` (``S = sample_size``, a multiple of ``patch_size``),
    ``timestep`` a float ``(B,)`` tensor (or a number), and ``class_labels`` as set by ``class_embed_type``. Returns
    a `Transformer2DModelOutput` whose ``sample`` has shape ``(B, out_channels, S, S)``.
    """

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: Optional[int] = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: Optional[int] = None,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
        class_embed_type: str = "timestep",
    ):
        if class_embed_type not in CLASS_EMBED_TYPES:
            raise ValueError(f"class_embed_type must be one of {CLASS_EMBED_TYPES}, got {class_embed_type!r}")
        if num_embeds_ada_norm not in (None, 1):
            raise ValueError(
                f"num_embeds_ada_norm={num_embeds_ada_norm!r}: an MMF DiT takes its labels from an MMFConditioner "
                "(class_embed_type='identity'); leave num_embeds_ada_norm unset"
            )
        if norm_type != "ada_norm_zero":
            raise ValueError(f"DiT supports only norm_type='ada_norm_zero', got {norm_type!r}")
        if sample_size % patch_size:
            raise ValueError(f"sample_size={sample_size} must be a multiple of patch_size={patch_size}")
        # The stock constructor builds per-block label tables; one row each (they are replaced just below).
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            activation_fn=activation_fn,
            num_embeds_ada_norm=1,
            upcast_attention=upcast_attention,
            norm_type=norm_type,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
        )
        for block in self.transformer_blocks:
            block.norm1.emb.class_embedder = torch.nn.Identity()
        if class_embed_type == "timestep":
            self.second_time_proj = Timesteps(**DIT_TIME_PROJ)
            self.class_embedding = TimestepEmbedding(DIT_TIME_PROJ["num_channels"], self.inner_dim)
            # Zero output layer: the second time adds nothing at the start (its hidden layer keeps its random
            # initialisation, so the output layer still receives gradients).
            with torch.no_grad():
                self.class_embedding.linear_2.weight.zero_()
                self.class_embedding.linear_2.bias.zero_()
        else:
            self.second_time_proj = None
            self.class_embedding = None

    @staticmethod
    def _batch_times(value, batch: int, device, name: str) -> torch.Tensor:
        if value is None:
            raise ValueError(f"MMFDiTTransformer2DModel needs `{name}`")
        if not torch.is_tensor(value):
            value = torch.tensor(value, dtype=torch.float32, device=device)  # floats stay floats (no truncation)
        if value.dim() == 0:
            value = value.expand(batch)
        if value.shape != (batch,):
            raise ValueError(f"`{name}` must be a number or a tensor of shape ({batch},), got {tuple(value.shape)}")
        return value

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: Union[torch.Tensor, float, None] = None,
        class_labels: Union[torch.Tensor, float, None] = None,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        return_dict: bool = True,
    ) -> Union[Transformer2DModelOutput, tuple]:
        """The average velocity for ``hidden_states`` ``(B, C, S, S)`` at ``timestep`` ``(B,)`` and the second
        time or conditioning vector ``class_labels`` (see the class docstring)."""
        if hidden_states.dim() != 4:
            raise ValueError(f"hidden_states must have shape (B, C, H, W), got {tuple(hidden_states.shape)}")
        batch, _, height, width = hidden_states.shape
        patch = self.config.patch_size
        if height != width or height % patch:
            raise ValueError(
                f"hidden_states must be square with a side divisible by patch_size={patch}, got {height}x{width}"
            )
        timestep = self._batch_times(timestep, batch, hidden_states.device, "timestep")
        if self.config.class_embed_type == "timestep":
            if torch.is_tensor(class_labels) and not class_labels.is_floating_point():
                raise ValueError(
                    "This MMF DiT is unconditional (class_embed_type='timestep'): class_labels is the second time, a "
                    "float tensor, not label ids"
                )
            second = self._batch_times(class_labels, batch, hidden_states.device, "class_labels (the second time)")
            projected = self.second_time_proj(second).to(dtype=self.class_embedding.linear_1.weight.dtype)
            condition = self.class_embedding(projected)
        else:
            if not (torch.is_tensor(class_labels) and class_labels.is_floating_point()
                    and class_labels.shape == (batch, self.inner_dim)):
                got = tuple(class_labels.shape) if torch.is_tensor(class_labels) else type(class_labels).__name__
                raise ValueError(
                    "This MMF DiT is class-conditional (class_embed_type='identity'): class_labels must be the float "
                    f"({batch}, {self.inner_dim}) vector of its MMFConditioner, got {got}"
                )
            condition = class_labels
        return super().forward(
            hidden_states,
            timestep=timestep,
            class_labels=condition,
            cross_attention_kwargs=cross_attention_kwargs,
            return_dict=return_dict,
        )
