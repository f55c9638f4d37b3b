"""The model card (``README.md``) of a pushed MMF pipeline, written with huggingface_hub's `ModelCard` utilities.

The card says how the model was trained (the command line with every secret redacted, steps, curriculum, loss
settings, dataset, wall time), shows the sample grid (images) or plot (trajectories), lists measured metrics, and
shows how to load the model both with mmf_diffusers and with ``DiffusionPipeline.from_pretrained(...,
trust_remote_code=True)``.
Its tags, Hub task and loading snippets follow the pipeline class the folder's ``model_index.json`` names
(`MMFPipeline` or `MMFTrajectoryPipeline`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from huggingface_hub import ModelCard, ModelCardData, get_token


#: Tags an image pipeline's card carries; the Hub uses ``pipeline_tag`` for the task filter and ``library_name`` for
#: the "Use this model" snippet.
TAGS = ["mmf", "meanflow", "unconditional-image-generation"]
PIPELINE_TAG = "unconditional-image-generation"
CONDITIONAL_TAGS = ["mmf", "meanflow", "class-conditional-image-generation"]
#: The same for a trajectory pipeline. The Hub accepts only its own task names and has none for generating time series;
#: "time-series-forecasting" is the nearest (given a start state the pipeline samples futures from it).
TRAJECTORY_TAGS = ["mmf", "meanflow", "time-series", "trajectory-generation"]
TRAJECTORY_PIPELINE_TAG = "time-series-forecasting"
TRAJECTORY_PIPELINE = "MMFTrajectoryPipeline"

#: What ``info`` may hold (anything else is rejected, so a typo does not silently drop a section).
INFO_KEYS = (
    "title",
    "description",
    "repo_id",
    "command",
    "steps",
    "curriculum",
    "conditioning",
    "loss",
    "dataset",
    "wall_time_s",
    "sample_grid",
    "metrics",
    "license",
)

REDACTED = "***"
#: Key of a remote-code ``model_index.json`` that keeps the package's own entries (see `mmf_diffusers.hub`). The
#: pipeline modules (``pipeline_mmf.py``, ``pipeline_mmf_trajectory.py``) keep their own copy, since each ships alone
#: as Hub remote code; this module and `mmf_diffusers.hub` do not import them, so that the pipelines' deferred import
#: of `mmf_diffusers.hub` closes no import circle (tests/test_hub.py checks both).
PACKAGE_LAYOUT_KEY = "_mmf_package_layout"
#: What the loading snippets say when ``repo_id`` is unknown; `mmf_diffusers.hub` fills it in at push time.
REPO_PLACEHOLDER = "<user>/<repo>"
#: A command-line flag whose value is secret: ``--hub_token``, ``--token``, ``--api-key``, ``--password``, ...
_SECRET_FLAG = re.compile(r"^--?[\w-]*(token|secret|password|passwd|api[_-]?key)[\w-]*$", re.IGNORECASE)


def redact_command(command: Union[str, Sequence[str]], secrets: Iterable[Optional[str]] = ()) -> str:
    """The command line as one shell-quoted string, with the value of every secret-looking flag (``--hub_token X``,
    ``--hub_token=X``, ``--password X``, ...) and every occurrence of the given ``secrets`` replaced by ``***``."""
    args = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    words: List[str] = []  # shell-quoted, except the redaction marker, which reads better bare
    hide_next = False
    for arg in args:
        if hide_next and not arg.startswith("--"):
            words.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        flag, eq, _ = arg.partition("=")
        if _SECRET_FLAG.match(flag):
            if eq:
                words.append(f"{shlex.quote(flag)}={REDACTED}")
                continue
            hide_next = True
        words.append(shlex.quote(arg))
    return _scrub(" ".join(words), secrets)


def _scrub(text: str, secrets: Iterable[Optional[str]]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def _known_secrets(extra: Iterable[Optional[str]]) -> List[str]:
    """Secrets to scrub from anything written: the given ones plus the token huggingface_hub would use now."""
    found = [s for s in extra if s]
    for candidate in (get_token(), os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if candidate and candidate not in found:
            found.append(candidate)
    return found


def _format_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format_value(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {seconds:02d} s"
    return f"{seconds} s"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _trajectory_description(pipeline_config: Dict[str, Any]) -> str:
    names, dt, system = (pipeline_config.get(k) for k in ("channel_names", "dt", "system"))
    what = f"{system.capitalize()} trajectories" if system else "Trajectories"
    if isinstance(names, str):
        names = names.split(",")
    details = [", ".join(map(str, names))] if names else []
    details += [f"dt = {dt}"] if dt else []
    if details:
        what += f" ({'; '.join(details)})"
    return (
        f"{what}, generated with Modular MeanFlow (MMF, You, Liu & He, arXiv 2508.17426) on a stock diffusers "
        "`UNet1DModel`: the network predicts the average velocity `u(z_t, r, t)` between two times (t = 0 data, "
        "t = 1 noise), so one network evaluation turns noise into a trajectory `(C, L)`, `x = z_1 - u(z_1, 0, 1)`; "
        "more steps are optional. Unconditionally, or from a known start state: the returned trajectories start "
        "exactly there."
    )


def model_card_text(
    info: Dict[str, Any], secrets: Iterable[Optional[str]] = (), pipeline_config: Optional[Dict[str, Any]] = None
) -> str:
    """The full ``README.md`` text (YAML metadata + markdown) for ``info``; see `write_model_card`.

    ``pipeline_config`` is the folder's ``model_index.json``: a ``_class_name`` of ``MMFTrajectoryPipeline`` gives a
    trajectory card (tags, Hub task, description from ``channel_names`` / ``dt`` / ``system``, loading snippets);
    anything else, or None, an image card.
    """
    unknown = sorted(set(info) - set(INFO_KEYS))
    if unknown:
        raise ValueError(f"Unknown model card fields {unknown}; the known ones are {list(INFO_KEYS)}")
    secrets = _known_secrets(secrets)
    repo_id = info.get("repo_id") or REPO_PLACEHOLDER
    pipeline_config = pipeline_config or {}
    trajectories = pipeline_class_name(pipeline_config) == TRAJECTORY_PIPELINE
    conditioner_entry = pipeline_config.get("conditioner")
    class_conditional = isinstance(conditioner_entry, list) and bool(conditioner_entry) and conditioner_entry[0] is not None
    transformer_entry = pipeline_config.get("transformer")
    network = ("the diffusion transformer (DiT)" if isinstance(transformer_entry, list) and transformer_entry
               and transformer_entry[0] is not None else "the UNet")

    data = ModelCardData(
        library_name="diffusers",
        license=info.get("license"),
        tags=list(TRAJECTORY_TAGS if trajectories else CONDITIONAL_TAGS if class_conditional else TAGS),
        pipeline_tag=TRAJECTORY_PIPELINE_TAG if trajectories else PIPELINE_TAG,
    )
    if trajectories:
        title = "Modular MeanFlow one-step trajectory generator"
        description = _trajectory_description(pipeline_config)
    else:
        title, description = "Modular MeanFlow one-step image generator", (
            "An unconditional image generator trained with Modular MeanFlow (MMF, You, Liu & He, arXiv 2508.17426): "
            f"{network} predicts the average velocity `u(z_t, r, t)` between two times (t = 0 data, t = 1 noise), so "
            "one network evaluation turns noise into an image, `x = z_1 - u(z_1, 0, 1)`; more steps are optional."
        )
        if class_conditional:
            description = description.replace("An unconditional", "A class-conditional") + (
                " Give `class_labels` (ids or names, one for all images or one per image); classifier-free guidance "
                "was folded into training as the table below says, so guided samples still take one evaluation, and "
                "`guidance_scale` adds sampling-time guidance (two evaluations per step)."
            )
    lines = [f"# {info.get('title') or title}", "", info.get("description") or description, ""]

    if info.get("sample_grid") and trajectories:
        lines += ["## Samples", "", "Trajectories over time, one panel per channel.", "",
                  f"![trajectory samples]({info['sample_grid']})", ""]
    elif info.get("sample_grid"):
        lines += ["## Samples", "", f"![sample grid]({info['sample_grid']})", ""]

    training = [
        ("steps", info.get("steps")),
        ("curriculum", info.get("curriculum")),
        ("conditioning", info.get("conditioning")),
        ("loss", info.get("loss")),
        ("dataset", info.get("dataset")),
        ("wall time", _format_duration(info["wall_time_s"]) if info.get("wall_time_s") is not None else None),
    ]
    training = [(name, value) for name, value in training if value is not None]
    if training or info.get("command"):
        lines += ["## How it was trained", ""]
        if training:
            lines += ["| setting | value |", "| --- | --- |"]
            lines += [f"| {name} | {_cell(_format_value(value))} |" for name, value in training]
            lines += [""]
        if info.get("command"):
            lines += ["Command line (secrets redacted):", "", "```bash", redact_command(info["command"], secrets), "```", ""]

    if info.get("metrics"):
        lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {_cell(str(name))} | {_cell(_format_value(value))} |" for name, value in info["metrics"].items()]
        lines += [""]

    if trajectories:
        cls, what = TRAJECTORY_PIPELINE, "trajectories"
        sample = "x = pipe(num_samples=8, generator=generator).trajectories"
        extra = ["futures = pipe(num_samples=8, start_state=x[0, :, 0]).trajectories  # all start at x[0, :, 0]"]
    else:
        cls, sample, what = "MMFPipeline", "images = pipe(num_images=16, generator=generator).images", "images"
        if class_conditional:
            sample = "images = pipe(num_images=16, class_labels=pipe.class_names[0], generator=generator).images"
        extra = []
    lines += [
        "## How to load",
        "",
        "With the `mmf_diffusers` package installed:",
        "",
        "```python",
        "import torch",
        f"from mmf_diffusers import {cls}",
        "",
        f'pipe = {cls}.from_pretrained("{repo_id}")',
        "generator = torch.Generator().manual_seed(0)",
        f"{sample}  # one network evaluation",
        *extra,
        "```",
        "",
        "With diffusers alone: the repository carries its pipeline (`pipeline.py`) and scheduler "
        "(`scheduler/scheduling_mmf.py`) as remote code, which `trust_remote_code=True` runs (read them first):",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)',
        "generator = torch.Generator().manual_seed(0)",
        sample,
        "```",
        "",
        f"Both give the same {what} for the same seed. `num_inference_steps=2` (or more) trades time for quality.",
        "",
    ]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return _scrub(text, secrets)


def write_model_card(folder: Union[str, os.PathLike], info: Dict[str, Any], secrets: Iterable[Optional[str]] = ()) -> str:
    """Write ``folder/README.md`` for a pipeline folder and return its path.

    Args:
        folder: the pipeline folder; its ``model_index.json`` says whether the card is for images or trajectories
            (`model_card_text`).
        info: what to say; every field is optional. ``title``, ``description``, ``repo_id`` (used in the loading
            snippets), ``command`` (argv list or string; secret flag values are redacted), ``steps``, ``curriculum``
            and ``loss`` (dicts or strings), ``dataset``, ``wall_time_s`` (seconds), ``sample_grid`` (image path
            relative to ``folder``, the sample grid or trajectory plot; must exist), ``metrics`` (name -> value),
            ``license`` (a Hub licence id).
        secrets: strings that must not appear in the card (e.g. the Hub token); the token huggingface_hub would use
            now (``HF_TOKEN`` or the cached login) is always scrubbed too.
    """
    grid = info.get("sample_grid")
    if grid is not None:
        if os.path.isabs(grid) or not os.path.isfile(os.path.join(folder, grid)):
            raise ValueError(f"sample_grid must be a path relative to {folder} of an existing file, got {grid!r}")
        info = {**info, "sample_grid": grid.replace(os.sep, "/")}
    index_path = os.path.join(folder, "model_index.json")
    pipeline_config = None
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            pipeline_config = json.load(f)
    card = ModelCard(model_card_text(info, secrets, pipeline_config))
    path = os.path.join(folder, "README.md")
    card.save(path)
    return path


DEMO_HEADING = "## Demo"


def add_demo_section(readme: Union[str, os.PathLike], space_id: str, repo_id: str) -> None:
    """Link the Gradio Space ``space_id`` (written by `mmf_diffusers.demo.write_space`) from the card at ``readme``,
    in a "Demo" section before "How to load"; an earlier Demo section is replaced, so running it twice is harmless."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    section = (
        f"{DEMO_HEADING}\n\nTry it in the browser: [the Space](https://huggingface.co/spaces/{space_id}) (a Gradio app: "
        "class, number of images, steps, seed). The same app runs locally with `pip install \"mmf_diffusers[demo]\"`:"
        f"\n\n```bash\nmmf-demo --pipeline {repo_id}\n```\n\n"
    )
    start = text.find(f"{DEMO_HEADING}\n")
    if start >= 0:
        end = text.find("\n## ", start + len(DEMO_HEADING))
        text = text[:start] + (text[end + 1:] if end >= 0 else "")
    where = text.find("## How to load\n")
    text = text[:where] + section + text[where:] if where >= 0 else text.rstrip("\n") + "\n\n" + section
    with open(readme, "w", encoding="utf-8") as f:
        f.write(text)


def pipeline_class_name(pipeline_config: Dict[str, Any]) -> Optional[str]:
    """The package pipeline class a ``model_index.json`` names, in either layout (``"_class_name": "MMFPipeline"``,
    or ``["pipeline", "MMFPipeline"]`` with the remote-code files); None when it names none."""
    layout = pipeline_config.get(PACKAGE_LAYOUT_KEY) or {}
    name = layout.get("_class_name", pipeline_config.get("_class_name"))
    if isinstance(name, list) and len(name) == 2:
        name = name[1]
    return name if isinstance(name, str) else None


def is_mmf_card(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a model card written by `write_model_card` (it carries the ``mmf`` tag)."""
    if not os.path.isfile(path):
        return False
    card = ModelCard.load(path)
    return "mmf" in (card.data.tags or [])
