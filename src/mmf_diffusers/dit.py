"""DiT backbones for MMF: build, convert from a stock diffusers DiT, make class-conditional, evaluate ``u``.

Conventions (the same in every module of mmf_diffusers): ``t = 0`` is data, ``t = 1`` noise, ``0 <= r <= t <= 1``;
``u(z_t, r, t)`` is the average velocity, ``z_r = z_t - (t - r) u``. The model sees ``time_scale * t`` as its
timestep and ``time_scale * h`` as its second time, with ``h = t - r`` (or ``r``), exactly as a two-time
``UNet2DModel`` does (`mmf_diffusers.pipeline_mmf.unet_average_velocity` is the one mapping for both).

The model class is `MMFDiTTransformer2DModel` (`mmf_diffusers.transformer_mmf`: why a subclass of diffusers'
``DiTTransformer2DModel`` is needed, and what it changes). Pixel or latent space is only a matter of
``in_channels`` and ``sample_size``.

Attention and forward-mode AD (torch 2.13, CPU, checked): with diffusers' default SDPA processor,
``torch.func.jvp`` through the DiT fails (``_scaled_dot_product_flash_attention_for_cpu`` has no forward-AD formula,
in float32 and float64). With the math SDPA backend it works, with and without gradients through the tangent
(the DiT normalises with LayerNorm, so the non-contiguous-output problem of UNet2DModel's GroupNorm does not arise).
`prepare_dit_for_mmf` installs `mmf_diffusers.unet.ForwardADAttnProcessor` for that; finite differences need only
plain forwards, so they work with whichever attention kernel the processor dispatches to.

A second defect sits in LayerNorm: the gradient of a jvp's tangent with respect to the primal input is wrong through
``F.layer_norm`` in torch 2.13 (by 50-70% on random inputs in float64, through ``torch.func.jvp`` and the
double-backward trick alike; the tangent itself is right; upstream: pytorch/pytorch#196700). That gradient is what
the MMF loss needs with ``derivative="jvp"`` and ``lam > 0``. `ForwardADLayerNorm` computes LayerNorm from
elementary ops while a differentiable forward-mode derivative is being taken (fused kernel otherwise), and
`prepare_dit_for_mmf` installs it. Finite differences need only first-order backprop and are unaffected.
"""

from __future__ import annotations

import inspect
from typing import Dict, Optional, Sequence, Tuple

import torch
from diffusers import DiTTransformer2DModel

from .conditioning_mmf import MMFConditioner
from .pipeline_mmf import DEFAULT_TIME_SCALE
from .transformer_mmf import DIT_TIME_PROJ, MMFDiTTransformer2DModel
from .unet import ModelFn, _unwrap, check_label_init_std, conditioner_around, enable_forward_ad, unet_model_fn

#: The DiT paper's model sizes (Peebles & Xie, arXiv 2212.09748, Table 1): layers, heads, channels per head.
DIT_SIZES: Dict[str, Dict[str, int]] = {
    "S": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64),
    "B": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64),
    "L": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64),
    "XL": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72),
}


def _forward_ad_in_progress() -> bool:
    # Both torch.func.jvp and torch.autograd.forward_ad.dual_level enter a dual level of torch's forward AD.
    return torch.autograd.forward_ad._current_level >= 0


class ForwardADLayerNorm(torch.nn.LayerNorm):
    """`torch.nn.LayerNorm` that, under forward-mode AD with gradients enabled (``torch.func.jvp`` inside a
    differentiable loss), computes the normalisation from elementary ops (mean, variance, rsqrt), whose derivatives
    of every order are right; otherwise exactly ``F.layer_norm``. Same parameters and state dict as nn.LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_forward_ad_in_progress() and torch.is_grad_enabled()):
            return super().forward(x)
        dims = tuple(range(-len(self.normalized_shape), 0))
        centred = x - x.mean(dims, keepdim=True)
        y = centred * torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


def use_forward_ad_layer_norm(model: torch.nn.Module) -> int:
    """Replace every `torch.nn.LayerNorm` of ``model`` by a `ForwardADLayerNorm` with the same settings and
    parameters. Returns how many were replaced (already replaced ones are left)."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.LayerNorm:
                continue
            like = {} if child.weight is None else dict(device=child.weight.device, dtype=child.weight.dtype)
            new = ForwardADLayerNorm(child.normalized_shape, eps=child.eps, elementwise_affine=child.elementwise_affine,
                                     bias=child.bias is not None, **like)
            new.load_state_dict(child.state_dict())
            setattr(parent, name, new)
            count += 1
    return count


def prepare_dit_for_mmf(transformer: MMFDiTTransformer2DModel) -> MMFDiTTransformer2DModel:
    """Check that ``transformer`` is an `MMFDiTTransformer2DModel` and make ``torch.func.jvp`` through it work and
    be right: `mmf_diffusers.unet.ForwardADAttnProcessor` on its attention modules, `ForwardADLayerNorm` for its
    LayerNorms (plain forwards are unchanged). Returns the same module; needed after ``from_pretrained`` too (the
    processors and the LayerNorm class are not saved). A stock ``DiTTransformer2DModel`` is refused: convert it with
    `convert_stock_dit`."""
    if not isinstance(transformer, MMFDiTTransformer2DModel):
        hint = " (convert a stock DiT with convert_stock_dit)" if isinstance(transformer, DiTTransformer2DModel) else ""
        raise ValueError(f"Expected an MMFDiTTransformer2DModel, got {type(transformer).__name__}{hint}")
    enable_forward_ad(transformer)
    use_forward_ad_layer_norm(transformer)
    return transformer


def initialize_like_dit(transformer: MMFDiTTransformer2DModel) -> MMFDiTTransformer2DModel:
    """Re-initialise ``transformer`` in place the way the DiT paper's code does (diffusers' class keeps PyTorch's
    defaults): Xavier-uniform linear layers and patch projection with zero biases, ``N(0, 0.02)`` time-embedding
    MLPs, and zero adaLN modulations and output layer, so every block starts as the identity and ``u = 0``. The
    second-time MLP's output layer stays zero. Returns the same module."""
    with torch.no_grad():
        for module in transformer.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
        proj = transformer.pos_embed.proj
        torch.nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        proj.bias.zero_()
        embedders = [block.norm1.emb.timestep_embedder for block in transformer.transformer_blocks]
        if transformer.class_embedding is not None:
            embedders.append(transformer.class_embedding)
        for embedder in embedders:
            torch.nn.init.normal_(embedder.linear_1.weight, std=0.02)
            torch.nn.init.normal_(embedder.linear_2.weight, std=0.02)
        zero = [block.norm1.linear for block in transformer.transformer_blocks]
        zero += [transformer.proj_out_1, transformer.proj_out_2]
        if transformer.class_embedding is not None:
            zero.append(transformer.class_embedding.linear_2)
        for layer in zero:
            layer.weight.zero_()
            layer.bias.zero_()
    return transformer


def build_mmf_dit(
    sample_size: int = 32,
    in_channels: int = 4,
    out_channels: Optional[int] = None,
    patch_size: int = 2,
    num_layers: int = 12,
    num_attention_heads: int = 12,
    attention_head_dim: int = 64,
    dit_init: bool = False,
    **dit_kwargs,
) -> MMFDiTTransformer2DModel:
    """Build an unconditional two-time DiT for MMF (``class_embed_type="timestep"``), forward-AD-safe attention.

    The defaults are DiT-B/2 on 32x32x4 latents (ImageNet 256 through the Stable Diffusion VAE); ``DIT_SIZES``
    holds S / B / L / XL (``build_mmf_dit(**DIT_SIZES["S"], ...)``). For pixels, pass the image's channels and size.
    A class-conditional model is ``add_dit_class_conditioning(build_mmf_dit(...), num_classes, label_init_std=1.0)``.

    Args:
        sample_size: height and width of the (square) input; a multiple of ``patch_size``.
        in_channels / out_channels: channels of ``z`` (``out_channels`` defaults to ``in_channels``: ``u`` has the
            shape of ``z``).
        patch_size: side of the square patches (tokens = ``(sample_size / patch_size) ** 2``).
        num_layers, num_attention_heads, attention_head_dim: transformer size (width = heads * head_dim).
        dit_init: re-initialise as the DiT paper does (`initialize_like_dit`: zero adaLN and output, so ``u = 0``
            at the start), as for training from scratch at scale; False keeps diffusers' (PyTorch's) initialisation.
        **dit_kwargs: any other `MMFDiTTransformer2DModel` argument (``class_embed_type`` excepted).
    """
    for name, value in (("sample_size", sample_size), ("in_channels", in_channels), ("patch_size", patch_size),
                        ("num_layers", num_layers), ("num_attention_heads", num_attention_heads),
                        ("attention_head_dim", attention_head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if sample_size % patch_size:
        raise ValueError(f"sample_size={sample_size} is not divisible by patch_size={patch_size}")
    if not isinstance(dit_init, bool):
        raise ValueError(f"dit_init must be True or False, got {dit_init!r}")
    if "class_embed_type" in dit_kwargs:
        raise ValueError("build_mmf_dit builds an unconditional model; use add_dit_class_conditioning for labels")
    transformer = MMFDiTTransformer2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        patch_size=patch_size,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        **dit_kwargs,
    )
    if dit_init:
        initialize_like_dit(transformer)
    return prepare_dit_for_mmf(transformer)


def _rebuilt(transformer: torch.nn.Module, class_embed_type: str) -> MMFDiTTransformer2DModel:
    """A new MMF DiT with ``transformer``'s architecture (stock or MMF config) and ``class_embed_type``."""
    names = [name for name in inspect.signature(MMFDiTTransformer2DModel.__init__).parameters if name != "self"]
    # Explicit arguments rather than from_config, which would drop the keys listed in `_use_default_values`.
    config = {name: transformer.config[name] for name in names if name in transformer.config}
    config.update(class_embed_type=class_embed_type, num_embeds_ada_norm=None)
    new = MMFDiTTransformer2DModel(**config).to(device=transformer.device)
    return new if new.dtype == transformer.dtype else new.to(dtype=transformer.dtype)


def add_dit_class_conditioning(
    transformer: MMFDiTTransformer2DModel,
    num_classes: int,
    class_names: Optional[Sequence[str]] = None,
    label_init_std: float = 0.0,
) -> Tuple[MMFDiTTransformer2DModel, MMFConditioner]:
    """Turn an unconditional MMF DiT into a class-conditional one, keeping what it has learned.

    Returns ``(transformer, conditioner)``: a new `MMFDiTTransformer2DModel` with ``class_embed_type="identity"``
    carrying every weight of ``transformer`` except its second-time MLP, which moves unchanged into the
    `MMFConditioner` (256 sinusoid channels, DiT's conventions). With ``label_init_std = 0`` the label embedding
    starts at zero and the pair computes exactly what ``transformer`` computed for every label; a positive value
    draws it from ``N(0, label_init_std^2)`` (distinct codes per class from the start; 1.0 for a fresh model).
    """
    check_label_init_std(label_init_std)
    if not isinstance(transformer, MMFDiTTransformer2DModel) or transformer.config.class_embed_type != "timestep":
        raise ValueError("add_dit_class_conditioning takes an unconditional MMFDiTTransformer2DModel "
                         "(class_embed_type='timestep')")
    conditioner = conditioner_around(transformer.class_embedding, transformer, num_classes, class_names,
                                     label_init_std, projection_dim=DIT_TIME_PROJ["num_channels"],
                                     flip_sin_to_cos=DIT_TIME_PROJ["flip_sin_to_cos"],
                                     freq_shift=DIT_TIME_PROJ["downscale_freq_shift"])
    new = _rebuilt(transformer, "identity")
    state = {k: v for k, v in transformer.state_dict().items() if not k.startswith("class_embedding.")}
    new.load_state_dict(state, strict=True)
    return prepare_dit_for_mmf(new), conditioner


def _stock_tables(dit: DiTTransformer2DModel):
    if type(dit) is not DiTTransformer2DModel:
        raise ValueError(f"Expected a stock diffusers DiTTransformer2DModel, got {type(dit).__name__}")
    return [block.norm1.emb.class_embedder.embedding_table.weight for block in dit.transformer_blocks]


def _carry_stock_weights(dit: DiTTransformer2DModel, class_embed_type: str) -> MMFDiTTransformer2DModel:
    new = _rebuilt(dit, class_embed_type)
    state = {k: v for k, v in dit.state_dict().items() if ".class_embedder." not in k}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("class_embedding.") for k in missing):
        raise ValueError(f"Could not carry the DiT's weights over: missing={missing}, unexpected={unexpected}")
    return new


def convert_stock_dit(dit: DiTTransformer2DModel, label: Optional[int] = None) -> MMFDiTTransformer2DModel:
    """An unconditional MMF DiT that starts as ``dit`` evaluated at one fixed ``label``, keeping its weights.

    Each block's embedding of ``label`` (default: the "no label" row of classifier-free guidance, id
    ``num_embeds_ada_norm``) is a constant, folded into the bias of that block's timestep MLP; the new second-time
    MLP starts with a zero output. So at the start ``u(z, r, t) = dit(z, time_scale * t, label)`` for every ``r``.
    """
    tables = _stock_tables(dit)
    rows = tables[0].shape[0]
    label = rows - 1 if label is None else label
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < rows:
        raise ValueError(f"label must be an int id in [0, {rows - 1}], got {label!r}")
    new = _carry_stock_weights(dit, "timestep")
    with torch.no_grad():
        for block, table in zip(new.transformer_blocks, tables):
            block.norm1.emb.timestep_embedder.linear_2.bias.add_(table[label].to(new.dtype))
    return prepare_dit_for_mmf(new)


def convert_stock_dit_class_conditional(
    dit: DiTTransformer2DModel, class_names: Optional[Sequence[str]] = None
) -> Tuple[MMFDiTTransformer2DModel, MMFConditioner]:
    """A class-conditional MMF DiT that starts as ``dit`` (e.g. a pretrained ImageNet DiT), keeping its weights.

    Returns ``(transformer, conditioner)``: the label table moves into the `MMFConditioner` (the stock "no label"
    row, id ``num_embeds_ada_norm``, is its "no label" token), beside a second-time MLP with a zero output. The
    stock model keeps one label table per block; converted DiT checkpoints hold the same table in every block, and
    a model whose tables differ is refused (one shared table cannot reproduce it).
    """
    tables = _stock_tables(dit)
    if any(not torch.equal(table, tables[0]) for table in tables[1:]):
        raise ValueError("The DiT's blocks hold different label tables; an MMFConditioner has one shared table")
    num_classes = tables[0].shape[0] - 1
    new = _carry_stock_weights(dit, "identity")
    conditioner = MMFConditioner(
        num_classes=num_classes,
        time_embed_dim=new.inner_dim,
        projection_dim=DIT_TIME_PROJ["num_channels"],
        flip_sin_to_cos=DIT_TIME_PROJ["flip_sin_to_cos"],
        freq_shift=DIT_TIME_PROJ["downscale_freq_shift"],
        class_names=list(class_names) if class_names is not None else None,
    ).to(device=new.device)
    if conditioner.dtype != new.dtype:
        conditioner = conditioner.to(dtype=new.dtype)
    with torch.no_grad():
        conditioner.label_embedding.weight.copy_(tables[0])
        conditioner.time_embedding.linear_2.weight.zero_()
        conditioner.time_embedding.linear_2.bias.zero_()
    return prepare_dit_for_mmf(new), conditioner


def dit_model_fn(
    transformer: torch.nn.Module,
    time_scale: float = DEFAULT_TIME_SCALE,
    second_time: str = "h",
    conditioner: Optional[torch.nn.Module] = None,
) -> ModelFn:
    """Return ``model_fn(z, r, t, class_labels=None) -> u`` for `ModularMeanFlowLoss`, with the mapping of
    `unet_model_fn` (``timestep = time_scale * t``, second time ``time_scale * h`` with ``h = t - r``, or
    ``time_scale * r``). ``z`` is ``(B, C, S, S)``; ``r``, ``t`` float ``(B,)`` with ``0 <= r <= t <= 1``;
    ``class_labels`` long ``(B,)`` ids, only with a ``conditioner`` (``None``: "no label").

    ``transformer`` may be wrapped (``accelerator.prepare``, ``torch.compile``); a conditioner is required exactly
    when the model is class-conditional (``class_embed_type="identity"``).
    """
    inner = _unwrap(transformer)
    if not isinstance(inner, MMFDiTTransformer2DModel):
        raise ValueError(f"dit_model_fn needs an MMFDiTTransformer2DModel, got {type(inner).__name__}")
    if (inner.config.class_embed_type == "identity") != (conditioner is not None):
        raise ValueError(
            "A class-conditional MMF DiT (class_embed_type='identity') needs its conditioner, and an unconditional "
            f"one takes none (class_embed_type={inner.config.class_embed_type!r}, conditioner given: "
            f"{conditioner is not None})"
        )
    return unet_model_fn(transformer, time_scale=time_scale, second_time=second_time, conditioner=conditioner)
