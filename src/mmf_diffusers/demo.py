"""``mmf-demo``: a Gradio app for any MMF pipeline folder or Hub repo id, ready to become a Space.

    pip install -e ".[demo]"
    mmf-demo --pipeline pipelines/mmf-mnist [--server-name 127.0.0.1] [--server-port 7860]

Image pipelines (`MMFPipeline`): a class dropdown (class-conditional models only), the number of images, the steps
(1..8), the seed and, for class-conditional models, an optional sampling-time guidance scale; the page shows the grid
and how long generation took. Trajectory pipelines (`MMFTrajectoryPipeline`): the number of trajectories, steps, seed
and an optional start state; the page shows the sample plot (one panel per channel).

The generate function is also an API endpoint, ``api_name="generate"``, whose inputs are, in this order: the class
label (a class name, ``"none"`` for the "no label" token, or ``"each class in turn"``; unconditional and trajectory
models take ``"none"``), the number of images, the steps and the seed, then optionally the guidance scale (images) or
the start state as text such as ``"0.5, 0"`` (trajectories). It returns the image::

    from gradio_client import Client
    path = Client("http://127.0.0.1:7860/").predict("7", 16, 1, 0, api_name="/generate")  # a PNG file

The model is loaded once, when the app is built. This module imports gradio (an optional extra) only inside its
functions, so ``import mmf_diffusers`` never needs it. `write_space` writes the ``app.py`` and ``requirements.txt``
that turn the app into a Hugging Face Space for a pushed repository (``mmf-push ... --with-demo``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import numbers
import os
import socket
import sys
import time
from typing import List, Optional, Sequence

from .generate import cycled_labels, make_grid, pipeline_argument_problem
from .space import write_space  # noqa: F401  (mmf_diffusers.demo.write_space, as documented)

MAX_STEPS = 8
MAX_IMAGES = 64
#: Guidance scales beyond this are no longer guidance but noise (the training script bounds --cfg_w alike).
MAX_GUIDANCE = 100.0
DEFAULT_IMAGES = 16
NO_LABEL = "none"
#: The class choice that gives image ``i`` class ``i mod K`` (the grid shows every class).
EACH_CLASS = "each class in turn"
#: Small images are upscaled (nearest neighbour, an integer factor) to at least this many pixels in the grid.
MIN_DISPLAY_PX = 128
DEMO_INSTALL_HINT = 'pip install "mmf_diffusers[demo]"  (or pip install -e ".[demo]" in a checkout)'


# ---------------------------------------------------------------------------------------------------- requests
def whole_number(name: str, value, low: int, high: Optional[int] = None) -> int:
    """``value`` (an int, or a float with no fractional part, as a web form sends it) as an int in ``[low, high]``;
    a ValueError that says what was wanted otherwise."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        wanted = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {wanted}, got {value}")
    return value


def parse_start_state(text: Optional[str], channel_names: Sequence[str]) -> Optional[List[float]]:
    """The start state typed into the page, e.g. ``"0.5, 0"`` (one number per channel, physical units), or None for an
    empty field."""
    if text is None or not str(text).strip():
        return None
    parts = str(text).replace(";", " ").replace(",", " ").split()
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"the start state must be {len(channel_names)} numbers ({', '.join(channel_names)}), "
                         f"got {text!r}") from None
    if len(values) != len(channel_names) or not all(math.isfinite(v) for v in values):
        raise ValueError(f"the start state must be {len(channel_names)} finite numbers ({', '.join(channel_names)}), "
                         f"got {text!r}")
    return values


def parse_guidance_scale(value) -> Optional[float]:
    """The guidance scale typed into the page (a number, or empty / None for none) as a float or None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"the guidance scale must be a number (or empty), got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(scale):
        raise ValueError(f"the guidance scale must be a finite number (or empty), got {value!r}")
    if abs(scale) > MAX_GUIDANCE:
        raise ValueError(f"the guidance scale must be between -{MAX_GUIDANCE:g} and {MAX_GUIDANCE:g}, got {scale:g}")
    return scale


def _timed(device: str, fn):
    """``(fn(), seconds)``; waits for the device so the time is the work's, not the launch's."""
    import torch

    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _plural(n: int, word: str, plural: Optional[str] = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


class ImageDemo:
    """Generation for an `MMFPipeline` behind the page; ``generate`` raises ValueError with a readable message."""

    kind = "images"

    def __init__(self, pipe, device: str = "cpu"):
        self.pipe, self.device = pipe, device
        self.class_names = list(pipe.class_names) if pipe.is_class_conditional else None

    @property
    def label_choices(self) -> List[str]:
        return [NO_LABEL] if self.class_names is None else [EACH_CLASS, *self.class_names, NO_LABEL]

    def generate(self, class_label, num_images, steps, seed, guidance_scale=None):
        """``(grid PIL image, one line saying what was made and how long it took)``."""
        import torch

        num_images = whole_number("the number of images", num_images, 1, MAX_IMAGES)
        steps = whole_number("steps", steps, 1, MAX_STEPS)
        seed = whole_number("the seed", seed, 0, 2**63 - 1)
        label = NO_LABEL if class_label in (None, "") else str(class_label)
        extra, what = {}, ""
        if self.class_names is None:
            if label != NO_LABEL:
                raise ValueError(f"this model is unconditional: the class label must be {NO_LABEL!r}, got {label!r}")
            if parse_guidance_scale(guidance_scale) is not None:
                raise ValueError("this model is unconditional: guidance needs a class-conditional model")
        else:
            if label == EACH_CLASS:
                extra["class_labels"], what = cycled_labels(num_images, len(self.class_names)), ", each class in turn"
            elif label == NO_LABEL:
                extra["class_labels"], what = NO_LABEL, ", no label"
            elif label in self.class_names:
                extra["class_labels"], what = label, f", class {label}"
            else:
                raise ValueError(f"unknown class {label!r}; this model knows {self.class_names} (and {NO_LABEL!r})")
            guidance_scale = parse_guidance_scale(guidance_scale)
            if guidance_scale is not None:
                extra["guidance_scale"] = guidance_scale
                what += f", guidance scale {guidance_scale:g}"
        generator = torch.Generator(device=self.device).manual_seed(seed)
        images, seconds = _timed(self.device, lambda: self.pipe(
            num_images=num_images, num_inference_steps=steps, generator=generator, **extra).images)
        upscale = max(1, math.ceil(MIN_DISPLAY_PX / max(images[0].size)))
        grid = make_grid(images, upscale=upscale)
        evaluations = steps * (2 if "guidance_scale" in extra else 1)
        info = (f"{_plural(num_images, 'image')}, {_plural(steps, 'step')} ({_plural(evaluations, 'network evaluation')}"
                f" each), seed {seed}{what}: generated in {seconds * 1000:.0f} ms on {self.device}")
        return grid, info


class TrajectoryDemo:
    """Generation for an `MMFTrajectoryPipeline` behind the page; ``generate`` raises ValueError when asked wrongly."""

    kind = "trajectories"
    label_choices = [NO_LABEL]
    class_names = None

    def __init__(self, pipe, device: str = "cpu"):
        self.pipe, self.device = pipe, device
        channels = pipe.unet.config.in_channels
        names = pipe.config.channel_names
        self.channel_names = names.split(",") if names else [f"channel {c}" for c in range(channels)]

    def generate(self, class_label, num_samples, steps, seed, start_state=None):
        """``(plot PIL image, one line saying what was made and how long it took)``."""
        import torch

        from .trajectories import plot_trajectories

        num_samples = whole_number("the number of trajectories", num_samples, 1, MAX_IMAGES)
        steps = whole_number("steps", steps, 1, MAX_STEPS)
        seed = whole_number("the seed", seed, 0, 2**63 - 1)
        if class_label not in (None, "", NO_LABEL):
            raise ValueError(f"trajectory models take no class: the class label must be {NO_LABEL!r}, got "
                             f"{class_label!r}")
        start = parse_start_state(start_state, self.channel_names)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        out, seconds = _timed(self.device, lambda: self.pipe(
            num_samples=num_samples, num_inference_steps=steps, generator=generator, output_type="pt",
            start_state=None if start is None else torch.tensor(start, dtype=torch.float32)).trajectories)
        config = self.pipe.config
        title = "from " + ", ".join(f"{n} = {v:g}" for n, v in zip(self.channel_names, start)) if start else \
            "unconditional"
        # One panel per channel, left to right, each spanning mean +- 3 std of that channel.
        plot = plot_trajectories({f"{title}; panels, left to right: {', '.join(self.channel_names)}": out},
                                 torch.tensor(config.channel_mean), torch.tensor(config.channel_std),
                                 width=480, height=240)
        info = (f"{_plural(num_samples, 'trajectory', 'trajectories')}, {_plural(steps, 'step')}, seed {seed}, {title}: "
                f"generated in {seconds * 1000:.0f} ms on {self.device}")
        return plot, info


def load_demo(pipeline: str, device: str = "cpu"):
    """Load the pipeline once and wrap it: an `ImageDemo` or a `TrajectoryDemo`."""
    from .hub import load_pipeline
    from .pipeline_mmf_trajectory import MMFTrajectoryPipeline

    pipe = load_pipeline(pipeline).to(device)
    pipe.set_progress_bar_config(disable=True)
    return (TrajectoryDemo if isinstance(pipe, MMFTrajectoryPipeline) else ImageDemo)(pipe, device)


# ---------------------------------------------------------------------------------------------------- the page
def build_demo(pipeline, device: str = "cpu", title: Optional[str] = None):
    """The Gradio app (a ``gradio.Blocks``) for ``pipeline``: a folder, a Hub repo id, or a loaded `ImageDemo` /
    `TrajectoryDemo`. Call ``.launch()`` on it."""
    import gradio as gr

    model = load_demo(pipeline, device) if isinstance(pipeline, (str, os.PathLike)) else pipeline
    name = str(pipeline) if isinstance(pipeline, (str, os.PathLike)) else type(model.pipe).__name__
    images = model.kind == "images"
    conditional = model.class_names is not None

    def run(*request):
        try:
            return model.generate(*request)
        except ValueError as error:  # bad input, said in the page (and to API clients) instead of a traceback
            raise gr.Error(str(error), print_exception=False) from None

    # Named parameters: gradio_client shows them (``Client.view_api``) and takes them as keywords.
    def generate_images(class_label, num_images, steps, seed, guidance_scale=""):
        return run(class_label, num_images, steps, seed, guidance_scale)

    def generate_trajectories(class_label, num_trajectories, steps, seed, start_state=""):
        return run(class_label, num_trajectories, steps, seed, start_state)

    with gr.Blocks(title=title or f"Modular MeanFlow: {name}", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# Modular MeanFlow: `{name}`\n"
            f"One network evaluation turns noise into {'an image' if images else 'a trajectory'} "
            "(`x = z_1 - u(z_1, 0, 1)`, MMF, arXiv 2508.17426); more steps are optional."
        )
        with gr.Row():
            with gr.Column(scale=1):
                label = gr.Dropdown(model.label_choices, value=model.label_choices[0], label="Class",
                                    info=f"a class, {EACH_CLASS!r}, or {NO_LABEL!r} (the model's unconditional mode)",
                                    visible=conditional)
                count = gr.Slider(1, MAX_IMAGES, value=DEFAULT_IMAGES if images else 8, step=1,
                                  label="Number of images" if images else "Number of trajectories")
                steps = gr.Slider(1, MAX_STEPS, value=1, step=1, label="Steps (network evaluations)")
                seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                if images:
                    # A textbox, not a number field, so that "empty" (no sampling-time guidance) is its default.
                    extra = gr.Textbox("", label="Guidance scale (optional)", visible=conditional,
                                       placeholder="empty: the model as trained",
                                       info="sampling-time classifier-free guidance: two evaluations per step")
                else:
                    extra = gr.Textbox("", label=f"Start state ({', '.join(model.channel_names)}), optional",
                                       placeholder="e.g. 0.5, 0 (empty: unconditional)")
                button = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                output = gr.Image(label="Samples" if images else "Trajectories", type="pil", format="png",
                                  interactive=False, elem_id="mmf-output")
                info = gr.Markdown(elem_id="mmf-info")
        # The API endpoint returns only the image: the line about timing travels in a State (not part of the API),
        # which the page then shows (after a success only). preprocess=False: the inputs arrive as sent and
        # `generate` checks them itself, with messages that name the field (gradio's own checks would say "Value 0 is
        # less than minimum value 1").
        timing = gr.State("")
        button.click(generate_images if images else generate_trajectories, [label, count, steps, seed, extra],
                     [output, timing], api_name="generate", preprocess=False).success(
            lambda text: text, timing, info, api_visibility="private"
        )
    return demo


# ---------------------------------------------------------------------------------------------------- command
def port_number(text: str) -> int:
    """argparse type: a TCP port 1..65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number between 1 and 65535, got {value}")
    return value


def port_problem(host: str, port: int) -> Optional[str]:
    """Why ``host:port`` cannot be served (in use, unknown host), or None; checked before the model loads. The probe
    sets SO_REUSEADDR as the server (uvicorn) does, so only a port that is really taken is refused."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as error:  # socket.gaierror (an unknown host) is an OSError too
        return f"cannot serve on {host}:{port}: {error.strerror or error}"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmf-demo", description="Serve a Gradio app that samples from a Modular MeanFlow pipeline."
    )
    parser.add_argument("--pipeline", required=True,
                        help="a pipeline folder (with model_index.json), e.g. pipelines/mmf-mnist, or a Hub repo id")
    parser.add_argument("--server-name", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--server-port", type=port_number, default=7860, help="port (default 7860)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.epilog = (f"Bounds: at most {MAX_IMAGES} images and {MAX_STEPS} steps per request, one request at a time. "
                     "A Hub id is first checked with one request (no retries) that ends within MMF_HUB_TIMEOUT seconds "
                     "(default 30, at most 600).")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Check the request before the slow imports and the model load.
    if importlib.util.find_spec("gradio") is None:
        parser.exit(2, f"mmf-demo: error: the demo needs gradio: {DEMO_INSTALL_HINT}\n")
    problem = pipeline_argument_problem(args.pipeline) or port_problem(args.server_name, args.server_port)
    if problem:
        parser.exit(2, f"mmf-demo: error: {problem}\n")
    from .generate import device_problem

    problem = device_problem(args.device)
    if problem:
        parser.exit(2, f"mmf-demo: error: {problem}\n")
    if not os.path.isdir(args.pipeline):  # fail fast: one request, not five retries with back-off
        from .hub_timeouts import hub_preflight

        try:
            problem = hub_preflight(args.pipeline)
        except ValueError as error:  # e.g. a bad MMF_HUB_TIMEOUT
            problem = str(error)
        if problem:
            parser.exit(1, f"mmf-demo: error: cannot load {args.pipeline}: {problem}\n")
    try:
        demo = build_demo(args.pipeline, device=args.device)
    except Exception as error:  # noqa: BLE001 - a repo id that is not on the Hub, a folder of another class, ...
        text = str(error).strip().splitlines()
        parser.exit(1, f"mmf-demo: error: cannot load {args.pipeline}: {type(error).__name__}: "
                       f"{text[0] if text else ''}\n")
    demo.queue(default_concurrency_limit=1)  # one request at a time: a CPU has no room for two
    demo.launch(server_name=args.server_name, server_port=args.server_port, ssr_mode=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
