"""``mmf-generate``: sample a grid of images from a saved MMF pipeline folder (or Hub repo id).

    mmf-generate --pipeline pipelines/mmf-digits --num-images 16 --steps 1 --output samples.png

Writes one PNG grid (and, with ``--save-individual``, one PNG per image next to it) and prints where it went.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from typing import List, Optional


def finite_float(text: str) -> float:
    """argparse type: a finite number, with a clear message otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


#: Seeds are whole numbers in [0, MAX_SEED] (what torch.Generator.manual_seed takes without wrapping around).
MAX_SEED = 2**63 - 1


def seed_int(text: str) -> int:
    """argparse type: a seed, a whole number in ``[0, MAX_SEED]``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed must be between 0 and 2**63 - 1, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a positive integer, with a clear message otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAX_GRID_PIXELS = 20000 * 20000  # a grid this big is a mistake (about 1.2 GB of RGB), not a request


def pipeline_argument_problem(pipeline: str) -> Optional[str]:
    """Why ``pipeline`` (a folder, or a Hub repo id ``user/name``) cannot be loaded, or None if it looks loadable.
    Checked before the slow imports by the commands that take ``--pipeline``.

    Something that looks like a local path is never sent to the Hub: it starts with ``.``, ``/`` or ``~``, has
    more or fewer than one ``/``, or its first part is an existing local folder (``pipelines/mmf-mnsit`` when
    ``pipelines/`` exists).
    """
    if os.path.exists(pipeline):
        if not os.path.isdir(pipeline):
            return f"{pipeline} is a file, not a pipeline folder"
        index = os.path.join(pipeline, "model_index.json")
        if not os.path.isfile(index):
            return f"{pipeline} is not a pipeline folder (no model_index.json)"
        try:
            with open(index, encoding="utf-8") as f:
                content = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            return f"{index} is not valid JSON ({error})"
        if not isinstance(content, dict):
            return f"{index} must hold a JSON object, not a {type(content).__name__}"
        return None
    looks_local = (pipeline.startswith((".", "/", "~")) or pipeline.count("/") != 1 or os.sep != "/" and os.sep in
                   pipeline or os.path.isdir(pipeline.split("/")[0]))
    if looks_local:
        return f"no such pipeline folder: {pipeline}"
    if not _REPO_ID.match(pipeline):
        return f"no such pipeline folder, and not a Hub repo id (user/name): {pipeline}"
    return None


def output_file_problem(output: str, extensions=IMAGE_EXTENSIONS) -> Optional[str]:
    """Why ``output`` cannot be written as a file of one of ``extensions``, or None. Checked before generating."""
    if os.path.isdir(output) or output.endswith(("/", os.sep)):
        return f"--output {output} is a folder; name a file, e.g. {os.path.join(output, 'samples' + extensions[0])}"
    if not output.lower().endswith(tuple(extensions)):
        return f"--output {output} must end in {', '.join(extensions)}"
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        return f"the folder of --output does not exist: {out_dir}"
    if not os.access(out_dir, os.W_OK):
        return f"the folder of --output is not writable: {out_dir}"
    return None


def device_problem(device: str) -> Optional[str]:
    """Why ``device`` cannot run a pipeline here (not a torch device, a backend this torch build lacks or has no
    device for, an index past the devices present), or None. Imports torch."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return f"--device {device!r} is not a torch device; e.g. cpu, cuda, cuda:1, mps"
    kind = parsed.type
    if kind == "cpu":
        return None
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None),
               "xpu": getattr(torch, "xpu", None)}.get(kind)
    if backend is None:
        return f"--device {device}: this command runs on cpu, cuda, mps or xpu, not {kind}"
    if not backend.is_available():
        if kind == "cuda" and torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            return f"--device {device}: this torch build has no CUDA (a CPU build); use --device cpu"
        return f"--device {device}: no {kind} device is available here; use --device cpu"
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        return f"--device {device}: there {'is' if count == 1 else 'are'} only {count} {kind} device(s)"
    return None


def pipeline_problem(pipe) -> Optional[str]:
    """Why a loaded folder is not a pipeline these commands can sample from (a scheduler of another kind, a UNet
    whose ``sample_size`` does not go through its own down- and up-sampling), or None. Checked before sampling so
    that the answer is one line, not a shape error from deep inside the UNet."""
    from .scheduling_mmf import MMFScheduler

    kinds = (MMFScheduler,)
    try:  # diffusers >= 0.39: the same z_r = z_t - (t - r) u step
        from diffusers import FlowMapEulerDiscreteScheduler

        kinds += (FlowMapEulerDiscreteScheduler,)
    except ImportError:
        pass
    scheduler = getattr(pipe, "scheduler", None)
    if not isinstance(scheduler, kinds):
        return (f"its scheduler is a {type(scheduler).__name__}, not the MMFScheduler (or FlowMapEulerDiscreteScheduler)"
                " that MMF sampling needs (scheduler/scheduler_config.json and the 'scheduler' entry of "
                "model_index.json)")
    config = getattr(getattr(pipe, "unet", None), "config", None)
    blocks = getattr(config, "down_block_types", None)
    size = getattr(config, "sample_size", None)
    if blocks is not None and getattr(config, "_class_name", "UNet2DModel") == "UNet2DModel":
        factor = 2 ** (len(blocks) - 1)
        sizes = size if isinstance(size, (list, tuple)) else (size, size)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 and s % factor == 0 for s in sizes):
            return (f"its UNet's sample_size {size!r} cannot go through its {len(blocks)} levels: it must be a "
                    f"positive multiple of 2**{len(blocks) - 1} = {factor} (unet/config.json)")
    return None


def load_pipeline(pipeline: str, device: str, prog: str):
    """``MMFPipeline.from_pretrained(pipeline).to(device)``, or SystemExit(2) with a one-line reason: an unknown or
    absent device (checked first), a damaged or foreign folder (`pipeline_problem`), a Hub repo that does not exist
    or does not answer (every Hub request has a time limit: `mmf_diffusers.hub_timeouts`, MMF_HUB_TIMEOUT)."""
    problem = device_problem(device)
    if problem:
        _fail(prog, problem)
    from . import MMFPipeline  # the package's name: imports every component class that a folder may name
    from .hub_timeouts import hub_preflight, quiet_loading, use_hub_timeouts

    try:
        use_hub_timeouts()
        problem = None if os.path.isdir(pipeline) else hub_preflight(pipeline)  # one try, not five with back-off
    except Exception as error:  # noqa: BLE001 - e.g. a bad MMF_HUB_TIMEOUT
        problem = _one_line(error)
    if problem:
        _fail(prog, f"cannot load the pipeline {pipeline}: {problem}")
    try:
        with quiet_loading() if os.path.isdir(pipeline) else contextlib.nullcontext():  # downloads keep their bars
            pipe = MMFPipeline.from_pretrained(pipeline)
    except Exception as error:  # noqa: BLE001 - diffusers and the Hub raise many kinds; each becomes one line
        _fail(prog, f"cannot load the pipeline {pipeline}: {_one_line(error)}")
    problem = pipeline_problem(pipe)
    if problem:
        _fail(prog, f"cannot use the pipeline {pipeline}: {problem}")
    try:
        return pipe.to(device)
    except (RuntimeError, ValueError, TypeError, AssertionError) as error:
        _fail(prog, f"--device {device}: {_one_line(error)}")


def is_non_finite_output(error: BaseException) -> bool:
    """Whether ``error`` is the pipelines' refusal of a non-finite sample made from finite inputs (a ValueError
    whose message says "non-finite values"), rather than a bad argument."""
    return isinstance(error, ValueError) and "produced non-finite values" in str(error)


def _fail(prog: str, message: str):
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


MAX_UPSCALE = 64
MAX_IMAGES = 10000
MAX_STEPS = 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmf-generate", description="Generate images with a Modular MeanFlow pipeline in one or a few steps."
    )
    parser.add_argument("--pipeline", required=True,
                        help="a pipeline folder (with model_index.json), e.g. pipelines/mmf-digits, or a Hub repo id")
    parser.add_argument("--num-images", type=positive_int, default=16,
                        help=f"how many images (default 16, at most {MAX_IMAGES})")
    parser.add_argument("--steps", type=positive_int, default=1,
                        help=f"network evaluations per image (default 1, at most {MAX_STEPS})")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of the initial noise, 0 .. 2**63 - 1 (default 0)")
    parser.add_argument("--output", default="samples.png", help="where to write the image grid, a .png (or .jpg, .webp) file (default samples.png)")
    parser.add_argument("--nrow", type=positive_int, default=None, help="images per row (default: about square)")
    parser.add_argument("--upscale", type=positive_int, default=None,
                        help="integer upscaling of each image in the grid, nearest neighbour "
                             f"(default: enough to make small images at least 64 px; at most {MAX_UPSCALE})")
    parser.add_argument("--save-individual", action="store_true", help="also write each image as its own PNG")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--class-labels", nargs="+", default=None, metavar="LABEL",
                        help="class-conditional pipelines: one class name (or id) for all images or one per image; "
                             "'none' for the 'no label' token, 'random' for classes drawn from the training data's "
                             "class frequencies (what the pipeline does without class_labels). Default: the classes in "
                             "turn (image i: class i mod K)")
    parser.add_argument("--guidance-scale", type=finite_float, default=None,
                        help="sampling-time classifier-free guidance, two network evaluations per step (default: none; "
                             "a model trained with guidance is guided in one evaluation)")
    return parser


def cycled_labels(num_images: int, num_classes: int) -> List[int]:
    """Class ``i mod num_classes`` for image ``i``: balanced classes in turn, the same for every step count."""
    return [i % num_classes for i in range(num_images)]


def resolve_class_labels(requested: Optional[List[str]], class_names: List[str], num_images: int):
    """What ``--class-labels`` asks a class-conditional pipeline for: names stay names, other integers become ids,
    ``none`` is the "no label" token, ``random`` draws the classes (``None`` for the pipeline), nothing given cycles
    through the classes."""
    if requested is None:
        return cycled_labels(num_images, len(class_names))
    if requested == ["random"] and "random" not in class_names:
        return None
    labels = [label if label in class_names or not label.lstrip("-").isdigit() else int(label) for label in requested]
    return labels[0] if len(labels) == 1 else labels


def make_grid(images, nrow: Optional[int] = None, upscale: int = 1, padding: int = 2):
    """Tile PIL images (all of one size and mode) into one PIL image, ``nrow`` per row."""
    from PIL import Image

    n = len(images)
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    w, h = images[0].size
    w, h = w * upscale, h * upscale
    grid = Image.new(images[0].mode, (nrow * (w + padding) + padding, rows * (h + padding) + padding))
    for i, image in enumerate(images):
        if upscale != 1:
            image = image.resize((w, h), Image.NEAREST)
        grid.paste(image, (padding + (i % nrow) * (w + padding), padding + (i // nrow) * (h + padding)))
    return grid


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    # Check the request before the slow imports.
    problem = pipeline_argument_problem(args.pipeline)
    if problem:
        parser.exit(2, f"mmf-generate: error: {problem}\n")
    problem = output_file_problem(args.output)
    if problem:
        parser.exit(2, f"mmf-generate: error: {problem}\n")
    if args.upscale is not None and args.upscale > MAX_UPSCALE:
        parser.exit(2, f"mmf-generate: error: --upscale must be <= {MAX_UPSCALE}, got {args.upscale}\n")
    if args.num_images > MAX_IMAGES:
        parser.exit(2, f"mmf-generate: error: --num-images must be <= {MAX_IMAGES}, got {args.num_images}\n")
    if args.steps > MAX_STEPS:
        parser.exit(2, f"mmf-generate: error: --steps must be <= {MAX_STEPS}, got {args.steps}\n")

    import numpy as np
    import torch

    pipe = load_pipeline(args.pipeline, args.device, "mmf-generate")
    pipe.set_progress_bar_config(disable=True)
    size = int(pipe.backbone.config.sample_size)
    upscale = args.upscale or max(1, math.ceil(64 / size))
    nrow = args.nrow or math.ceil(math.sqrt(args.num_images))
    width, height = nrow * (size * upscale + 2), math.ceil(args.num_images / nrow) * (size * upscale + 2)
    if width * height > MAX_GRID_PIXELS:
        parser.exit(2, f"mmf-generate: error: the grid would be {width}x{height} pixels; lower --upscale, "
                       "--num-images or --nrow\n")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    extra = {}
    if pipe.is_class_conditional:
        extra["class_labels"] = resolve_class_labels(args.class_labels, pipe.class_names, args.num_images)
        if args.guidance_scale is not None:
            extra["guidance_scale"] = args.guidance_scale
    elif args.class_labels is not None or args.guidance_scale is not None:
        parser.exit(2, f"mmf-generate: error: {args.pipeline} is unconditional: --class-labels / --guidance-scale "
                       "need a class-conditional pipeline\n")
    try:
        array = pipe(num_images=args.num_images, num_inference_steps=args.steps, generator=generator,
                     output_type="np", **extra).images
    except ValueError as error:  # e.g. an unknown class name: the pipeline's message lists the known ones
        if is_non_finite_output(error):  # broken weights or config, not a bad request: status 1, as below
            print("mmf-generate: error: the images are not finite (NaN/inf): the pipeline's weights or config are "
                  "broken; nothing written", file=sys.stderr)
            return 1
        parser.exit(2, f"mmf-generate: error: {_one_line(error).split(': ', 1)[-1]}\n")
    except (RuntimeError, TypeError) as error:  # e.g. out of memory, or a folder whose parts do not fit together
        parser.exit(1, f"mmf-generate: error: generation failed: {_one_line(error)}\n")
    bad = int((~np.isfinite(array).reshape(len(array), -1).all(axis=1)).sum())
    if bad:  # a NaN image would be written as black: say so instead, and write nothing
        print(f"mmf-generate: error: {bad} of {len(array)} images are not finite (NaN/inf): the pipeline's weights "
              "or config are broken; nothing written", file=sys.stderr)
        return 1
    images = pipe.numpy_to_pil(array)
    make_grid(images, nrow=args.nrow, upscale=upscale).save(args.output)
    what = ""
    if pipe.is_class_conditional:
        labels = extra["class_labels"]
        what = ", classes in turn" if args.class_labels is None else ", random classes" if labels is None else \
            f", class{'es' if isinstance(labels, list) else ''} {labels}"
        if args.guidance_scale is not None:
            what += f", guidance scale {args.guidance_scale}"
    print(f"wrote {args.num_images} images ({args.steps} step{'s' if args.steps > 1 else ''}, seed {args.seed}{what}) "
          f"to {os.path.abspath(args.output)}")
    if args.save_individual:
        stem, _ = os.path.splitext(args.output)
        for i, image in enumerate(images):
            image.save(f"{stem}_{i:03d}.png")
        print(f"and each image to {stem}_NNN.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
