"""``--backbone dit`` for train_mmf.py: the DiT's flags, their checks, and building the model.

The DiT (`mmf_diffusers.MMFDiTTransformer2DModel`, diffusers' `DiTTransformer2DModel` with a second time) takes the
UNet's place everywhere in the script: it is called like the two-time UNet (``timestep = time_scale * t``,
``class_labels = time_scale * h`` or a conditioner's vector), so the loss, the engines, EMA, checkpoints and the saved
pipeline (its ``transformer`` component) work unchanged. Only argparse is imported at module level (the script
validates its flags before any heavy import).
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence, Set

BACKBONES = ("unet", "dit")
#: Flags that size or load a UNet; given with --backbone dit they would be silently ignored, so they are refused.
UNET_FLAGS = ("block_out_channels", "layers_per_block", "attention_levels", "norm_num_groups", "attention_head_dim",
              "pretrained_unet", "pretrained_unet_subfolder")
#: Flags of the DiT, refused with the UNet for the same reason.
DIT_FLAGS = ("dit_size", "dit_layers", "dit_heads", "dit_head_dim", "patch_size", "dit_init", "pretrained_dit",
             "pretrained_dit_subfolder")
#: The DiT's size and initialisation flags: a pretrained DiT brings its own, so they are refused beside it.
DIT_SIZE_FLAGS = ("dit_size", "dit_layers", "dit_heads", "dit_head_dim", "patch_size", "dit_init")
DEFAULT_DIT_SIZE = "S"
DEFAULT_PATCH_SIZE = 2
#: mmf_diffusers.DIT_SIZES's keys (written out here so that the flags parse without importing diffusers; a test
#: checks that they agree).
DIT_SIZE_NAMES = ("S", "B", "L", "XL")


def _bool01(value: str) -> bool:
    if value not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {value!r}")
    return value == "1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("DiT backbone (--backbone dit)")
    g.add_argument("--backbone", choices=BACKBONES, default="unet",
                   help="unet: a two-time diffusers UNet2DModel (the UNet flags above); dit: diffusers' DiT "
                        "(mmf_diffusers.build_mmf_dit, adaLN-zero; the flags below), saved as the pipeline's "
                        "'transformer' component. The loss, estimators, engines and Hub support are the same.")
    g.add_argument("--dit_size", choices=DIT_SIZE_NAMES, default=None,
                   help=f"The DiT paper's sizes (layers, heads x channels per head): S 12, 6x64; B 12, 12x64; L 24, "
                        f"16x64; XL 28, 16x72. Default {DEFAULT_DIT_SIZE}; --dit_layers / --dit_heads / --dit_head_dim "
                        "override its values one by one.")
    g.add_argument("--dit_layers", type=int, default=None, help="Transformer blocks of the DiT.")
    g.add_argument("--dit_heads", type=int, default=None, help="Attention heads of the DiT.")
    g.add_argument("--dit_head_dim", type=int, default=None,
                   help="Channels per attention head of the DiT (width = heads x channels per head).")
    g.add_argument("--patch_size", type=int, default=None,
                   help=f"Side of the DiT's square patches (default {DEFAULT_PATCH_SIZE}); the resolution (or the "
                        "latent size) must be a multiple of it.")
    g.add_argument("--dit_init", type=_bool01, default=None,
                   help="1: the DiT paper's initialisation (zero adaLN modulation and output layer, so u = 0 at the "
                        "start); 0 (default): diffusers' (PyTorch's) initialisation.")
    g.add_argument("--pretrained_dit", type=str, default=None,
                   help="Warm-start from a DiT (local folder or Hub id) instead of building one: diffusers' own "
                        "DiTTransformer2DModel (e.g. a converted ImageNet DiT; its label table becomes the "
                        "conditioner with --class_conditional when the data has as many classes, else it is folded "
                        "in at the 'no label' row, mmf_diffusers.convert_stock_dit) or an unconditional "
                        "MMFDiTTransformer2DModel. The new second-time MLP starts at zero, so the model starts as the "
                        "pretrained one. The size flags above are then refused (the model brings its own).")
    g.add_argument("--pretrained_dit_subfolder", type=str, default=None,
                   help="Subfolder of --pretrained_dit holding the DiT (e.g. 'transformer' for a pipeline repository).")


def given_flags(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> Set[str]:
    """The destinations of the flags written on the command line ``argv`` (``None``: ``sys.argv``), even those given
    their default value: parsed again with every default suppressed."""
    saved = [(action, action.default) for action in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults.update(saved_defaults)


def check_flags(args: argparse.Namespace, given: Set[str]) -> None:
    """Refuse the other backbone's flags (they would be silently ignored). Raises a one-line ValueError."""
    if args.backbone == "dit":
        wrong = [f"--{name}" for name in UNET_FLAGS if name in given]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} size or load a UNet and do not apply with --backbone dit (size the "
                             "DiT with --dit_size or --dit_layers / --dit_heads / --dit_head_dim, --patch_size)")
        sized = [f"--{name}" for name in DIT_SIZE_FLAGS if name in given]
        if sized and "pretrained_dit" in given:
            raise ValueError(f"{', '.join(sized)} size a new DiT and do not apply with --pretrained_dit (the "
                             "pretrained model brings its own size and weights)")
        if getattr(args, "modality", None) == "trajectory":
            raise ValueError("--backbone dit applies to images; --modality trajectory builds a UNet1DModel")
    else:
        wrong = [f"--{name}" for name in DIT_FLAGS if name in given]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} only apply with --backbone dit")


def validate(args: argparse.Namespace, need: Callable[[bool, str], None]) -> None:
    """Checks that need no import (``need(condition, message)`` raises the one-line error)."""
    for name in ("dit_layers", "dit_heads", "dit_head_dim", "patch_size"):
        value = getattr(args, name)
        need(value is None or value >= 1, f"--{name} must be a positive integer, got {value}")
    if args.pretrained_dit is not None or args.pretrained_dit_subfolder is not None:
        need(args.pretrained_dit is not None and bool(args.pretrained_dit.strip()),
             "--pretrained_dit_subfolder needs --pretrained_dit" if args.pretrained_dit is None
             else "--pretrained_dit is empty")
        need(args.pretrained_dit_subfolder is None or bool(args.pretrained_dit_subfolder.strip()),
             "--pretrained_dit_subfolder is empty")
        return  # the size is the pretrained model's (checked against the data by `load_pretrained`)
    patch = args.patch_size or DEFAULT_PATCH_SIZE
    # Latents: the latent size is known once the VAE is loaded (checked by `build`).
    need(args.vae_name_or_path is not None or args.resolution % patch == 0,
         f"--resolution {args.resolution} is not a multiple of the DiT's --patch_size {patch}")


def dit_config(args: argparse.Namespace) -> dict:
    """``num_layers``, ``num_attention_heads``, ``attention_head_dim`` from --dit_size and the explicit flags."""
    from mmf_diffusers import DIT_SIZES

    config = dict(DIT_SIZES[args.dit_size or DEFAULT_DIT_SIZE])
    for flag, key in (("dit_layers", "num_layers"), ("dit_heads", "num_attention_heads"),
                      ("dit_head_dim", "attention_head_dim")):
        if getattr(args, flag) is not None:
            config[key] = getattr(args, flag)
    return config


def build(args: argparse.Namespace, sample_size: int, in_channels: int, error_cls=ValueError):
    """A new unconditional MMF DiT for ``(in_channels, sample_size, sample_size)`` inputs (pixels or latents), with
    forward-AD-safe attention and LayerNorm (`mmf_diffusers.prepare_dit_for_mmf`)."""
    from mmf_diffusers import build_mmf_dit

    patch = args.patch_size or DEFAULT_PATCH_SIZE
    if sample_size % patch:
        raise error_cls(f"The latent size {sample_size} is not a multiple of the DiT's --patch_size {patch}")
    return build_mmf_dit(sample_size=sample_size, in_channels=in_channels, patch_size=patch,
                         dit_init=bool(args.dit_init), **dit_config(args))


def load_pretrained(args: argparse.Namespace, sample_size: int, in_channels: int,
                    class_names: Optional[Sequence[str]], error_cls=ValueError, log: Callable[[str], None] = print):
    """``(transformer, conditioner)`` warm-started from ``--pretrained_dit``; ``conditioner`` is the stock DiT's own
    label table when ``class_names`` (class-conditional training) has as many classes, else None (the caller adds
    one). The model starts as the pretrained one: the second-time MLP's output is zero."""
    from diffusers import DiTTransformer2DModel

    from mmf_diffusers import MMFDiTTransformer2DModel

    where = f"--pretrained_dit {args.pretrained_dit!r}" + (
        f" (subfolder {args.pretrained_dit_subfolder!r})" if args.pretrained_dit_subfolder else "")
    classes = {cls.__name__: cls for cls in (DiTTransformer2DModel, MMFDiTTransformer2DModel)}
    try:
        name = DiTTransformer2DModel.load_config(args.pretrained_dit,
                                                 subfolder=args.pretrained_dit_subfolder).get("_class_name")
        if name not in classes:
            raise ValueError(f"it holds a {name}, not a DiTTransformer2DModel or an MMFDiTTransformer2DModel")
        model = classes[name].from_pretrained(args.pretrained_dit, subfolder=args.pretrained_dit_subfolder)
    except (OSError, ValueError) as error:
        raise error_cls(f"Could not load a DiT from {where}: {str(error).strip().splitlines()[0]}")
    data = "latents" if args.vae_name_or_path else "images"
    if model.config.in_channels != in_channels:
        raise error_cls(f"The pretrained DiT takes {model.config.in_channels} channels, the {data} have {in_channels}")
    if model.config.sample_size != sample_size:
        raise error_cls(f"The pretrained DiT was built for {model.config.sample_size}x{model.config.sample_size} "
                        f"inputs, the {data} are {sample_size}x{sample_size}")
    try:
        return _convert_pretrained(model, class_names, log)
    except ValueError as error:
        raise error_cls(f"Could not use the DiT of {where}: {error}")


def _convert_pretrained(model, class_names: Optional[Sequence[str]], log: Callable[[str], None]):
    from mmf_diffusers import (MMFDiTTransformer2DModel, convert_stock_dit, convert_stock_dit_class_conditional,
                               prepare_dit_for_mmf)

    if isinstance(model, MMFDiTTransformer2DModel):
        if model.config.class_embed_type != "timestep":
            raise ValueError("it is a class-conditional MMF DiT, whose labels live in the pipeline's conditioner, "
                             "which a warm start does not load: resume that run, or start from an unconditional one")
        return prepare_dit_for_mmf(model), None
    stock_classes = model.config.num_embeds_ada_norm
    if class_names is not None and len(class_names) == stock_classes:
        log(f"The pretrained DiT's {stock_classes} label embeddings become the conditioner's (in the data's class "
            "order).")
        return convert_stock_dit_class_conditional(model, class_names)
    if class_names is not None:
        log(f"Note: the pretrained DiT knows {stock_classes} classes, the data has {len(class_names)}: its labels are "
            "dropped (folded in at 'no label') and new ones are learned.")
    return convert_stock_dit(model), None


def add_class_conditioning(transformer, class_names: Sequence[str], label_init_std: float):
    """``(transformer, conditioner)``: the class-conditional DiT and its `MMFConditioner`."""
    from mmf_diffusers import add_dit_class_conditioning

    return add_dit_class_conditioning(transformer, len(class_names), class_names, label_init_std)


def model_fn(fwd, time_scale: float, second_time: str):
    """The loss's ``model_fn`` for an unconditional DiT (``fwd`` may be accelerate's wrapper)."""
    from mmf_diffusers import dit_model_fn

    return dit_model_fn(fwd, time_scale, second_time)
