"""Sharing MMF pipelines (`MMFPipeline` for images, `MMFTrajectoryPipeline` for trajectories) on the Hugging Face Hub.

A pushed repository loads two ways, with the same samples for the same seed:

* ``MMFPipeline.from_pretrained("user/repo")`` / ``MMFTrajectoryPipeline.from_pretrained("user/repo")`` (or
  `load_pipeline`, which picks the class the repository names) where mmf_diffusers is installed;
* ``DiffusionPipeline.from_pretrained("user/repo", trust_remote_code=True)`` with diffusers alone.

For the second, the folder carries diffusers' remote-code layout (`add_remote_code`): a copy of the module of the
pipeline class that ``model_index.json`` names (``pipeline_mmf.py`` or ``pipeline_mmf_trajectory.py``; both are
self-contained) as ``pipeline.py`` at the top level, a copy of ``scheduling_mmf.py`` as
``scheduler/scheduling_mmf.py``, and a ``model_index.json`` that names them (``"_class_name": ["pipeline",
"MMFPipeline"]``, ``"scheduler": ["scheduling_mmf", "MMFScheduler"]``). diffusers resolves ``_class_name[0]`` as
``<folder>/<name>.py`` and a component ``[module, class]`` as ``<folder>/<component>/<module>.py`` before looking for
an installed library. The package's own entries are kept under ``_mmf_package_layout``, which the pipelines'
``load_config`` reads back, so the same folder still loads with the installed classes.

Components from diffusers (the UNet2DModel / UNet1DModel, or a FlowMapEulerDiscreteScheduler) need no copied code.

Command line: ``mmf-push FOLDER REPO_ID [--private] [--token-file FILE] [--endpoint URL] [--with-demo]``; ``--with-demo``
also writes the files of a Gradio Space that serves ``mmf-demo`` for the repository (`mmf_diffusers.space.write_space`)
and links it from the card.
"""

from __future__ import annotations

import argparse
import ast
import glob
import importlib
import inspect
import json
import os
import shlex
import shutil
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from huggingface_hub import HfApi, get_token, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects  # upload_folder's own ignores

from .checkpointing import safetensors_problem
from .hub_timeouts import hub_preflight, hub_timeout, is_network_error, quiet_loading, use_hub_timeouts
from .hub_token import command_line_refusal, read_token_file, token_leaks
from .model_card import PACKAGE_LAYOUT_KEY, REPO_PLACEHOLDER, add_demo_section, is_mmf_card, write_model_card

PathLike = Union[str, os.PathLike]

MODEL_INDEX = "model_index.json"
REMOTE_PIPELINE_MODULE = "pipeline"  # diffusers' documented name for a repository's own pipeline file
PACKAGE = (__package__ or __name__).split(".")[0]  # also when run as python -m mmf_diffusers.hub

AUTH_HELP = ("set HF_TOKEN, log in once with `hf auth login`, or name a file holding the token (--token-file / "
             "--hub_token_file; token=... in Python)")
#: What a pipeline folder pushes besides its components: the index, the card, its images, the remote-code module.
TOP_LEVEL_FILES = (MODEL_INDEX, "README.md", f"{REMOTE_PIPELINE_MODULE}.py")
TOP_LEVEL_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif")
#: Files of a component folder that are pushed: configs, safetensors weights, remote-code modules.
COMPONENT_FILE_EXTENSIONS = (".json", ".safetensors", ".py")


# ---------------------------------------------------------------------------------------------------- loading
def load_pipeline(repo_id_or_path: PathLike, **kwargs) -> DiffusionPipeline:
    """Load an MMF pipeline from a local folder or a Hub repo id, with the class its ``model_index.json`` names
    (`MMFPipeline` or `MMFTrajectoryPipeline`; see their ``from_pretrained``).

    Works for folders written by ``save_pretrained`` and for folders and repositories in the remote-code layout;
    ``kwargs`` go to ``from_pretrained`` (``revision``, ``token``, ``torch_dtype``, ...).
    """
    if os.path.isdir(repo_id_or_path):
        index = _read_model_index(repo_id_or_path)
    else:
        # As in the command-line tools: one request first, without huggingface_hub's five retries, so a Hub that does
        # not answer (or a repository that is not there) is an error within MMF_HUB_TIMEOUT; then every request of the
        # load has that limit (use_hub_timeouts), the metadata request too, which has its own (10 s).
        problem = None
        if not kwargs.get("local_files_only"):
            problem = hub_preflight(str(repo_id_or_path), token=kwargs.get("token"))
        if problem:
            raise OSError(f"Cannot load {repo_id_or_path}: {problem}")
        use_hub_timeouts()
        path = hf_hub_download(
            str(repo_id_or_path),
            MODEL_INDEX,
            revision=kwargs.get("revision"),
            token=kwargs.get("token"),
            cache_dir=kwargs.get("cache_dir"),
            local_files_only=kwargs.get("local_files_only", False),
            etag_timeout=hub_timeout(),
        )
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    return _pipeline_class(index, repo_id_or_path).from_pretrained(repo_id_or_path, **kwargs)


def _pipeline_class(index: Dict[str, Any], where: PathLike) -> type:
    """The pipeline class of this package that a ``model_index.json`` (either layout) names."""
    class_name = (index.get(PACKAGE_LAYOUT_KEY) or {}).get("_class_name", index.get("_class_name"))
    if not isinstance(class_name, str):
        raise ValueError(f"{where}/{MODEL_INDEX} has _class_name {class_name!r} and no {PACKAGE_LAYOUT_KEY} entry")
    from diffusers import DiffusionPipeline  # here, not at import: `mmf-push --help` needs neither torch nor diffusers

    cls = getattr(importlib.import_module(PACKAGE), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)):
        raise ValueError(f"{where} holds a {class_name}, which is not a pipeline of {PACKAGE}")
    return cls


# ---------------------------------------------------------------------------------------------------- layout
def _read_model_index(folder: PathLike) -> Dict[str, Any]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a directory")
    path = os.path.join(folder, MODEL_INDEX)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} is not a saved pipeline: it has no {MODEL_INDEX} (write one with save_pretrained)")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(index).__name__}")
    return index


def _write_model_index(folder: PathLike, index: Dict[str, Any]) -> None:
    # The same format as diffusers' save_config.
    with open(os.path.join(folder, MODEL_INDEX), "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _check_self_contained(path: str) -> None:
    """Refuse to ship a module that imports mmf_diffusers or anything relative: it would not run as remote code."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise ValueError(f"{path} has a relative import (line {node.lineno}); it cannot ship as remote code")
            names = [node.module or ""]
        for name in names:
            if name.split(".")[0] == PACKAGE:
                raise ValueError(f"{path} imports {name} (line {node.lineno}); it cannot ship as remote code")


def _package_class(library: str, class_name: str) -> type:
    """The class an entry of a saved ``model_index.json`` names inside this package."""
    if library.split(".")[0] != PACKAGE:
        raise ValueError(
            f"[{library!r}, {class_name!r}] is neither from a library diffusers loads nor from {PACKAGE}: "
            "it cannot be shipped as remote code"
        )
    cls = getattr(importlib.import_module(library), class_name, None)
    if not isinstance(cls, type):
        raise ValueError(f"{library} has no class {class_name}")
    return cls


def _copy_source(cls: type, destination: str) -> None:
    source = inspect.getsourcefile(cls)
    _check_self_contained(source)
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    shutil.copyfile(source, destination)


def add_remote_code(folder: PathLike) -> Dict[str, Any]:
    """Give a saved MMF pipeline folder diffusers' remote-code layout, in place; returns the new ``model_index.json``.

    Copies the module of the pipeline class the folder names (``pipeline_mmf.py`` for `MMFPipeline`,
    ``pipeline_mmf_trajectory.py`` for `MMFTrajectoryPipeline`) to ``pipeline.py`` and the module of every component
    that is not from a library diffusers loads (the MMFScheduler) to ``<component>/<module>.py``, rewrites
    ``model_index.json`` to name those files, and keeps the package entries under ``_mmf_package_layout``. The folder
    then loads both with the pipeline class's ``from_pretrained(folder)`` and with
    ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``. Running it again refreshes the copies from
    the installed package.
    """
    from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES

    index = _read_model_index(folder)
    layout = dict(index.get(PACKAGE_LAYOUT_KEY) or {})

    pipeline_cls = _pipeline_class(index, folder)
    _copy_source(pipeline_cls, os.path.join(folder, f"{REMOTE_PIPELINE_MODULE}.py"))
    layout["_class_name"] = pipeline_cls.__name__
    index["_class_name"] = [REMOTE_PIPELINE_MODULE, pipeline_cls.__name__]

    # Only the pipeline's modules, as diffusers tells them apart: configuration values can be 2-lists too
    # (MMFTrajectoryPipeline's channel_mean [0.0, 0.0]).
    modules, _ = pipeline_cls._get_signature_keys(pipeline_cls)
    for name, value in index.items():
        if name[0] != "_" and name not in modules and isinstance(value, list) and value and isinstance(value[0], str):
            raise ValueError(
                f"{folder}/{MODEL_INDEX}: the configuration value {name}={value!r} is a list of strings, which "
                "diffusers' Hub download takes for a [module, class] component; load the pipeline and save it again "
                f"with this version of {PACKAGE} (it stores such values as one string)"
            )
    for name in modules:
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        library, component_class = layout.get(name, entry)
        if library.split(".")[0] in LOADABLE_CLASSES:
            continue  # diffusers (or transformers, ...) loads it without any copied code
        cls = _package_class(library, component_class)
        module = cls.__module__.rsplit(".", 1)[-1]
        _copy_source(cls, os.path.join(folder, name, f"{module}.py"))
        layout[name] = [library, component_class]
        index[name] = [module, component_class]

    index[PACKAGE_LAYOUT_KEY] = layout
    _write_model_index(folder, index)
    return index


def prepare_folder_for_hub(
    folder: PathLike, repo_id: Optional[str] = None, card_info: Optional[Dict[str, Any]] = None, secrets: Iterable[Optional[str]] = ()
) -> None:
    """Make a saved pipeline folder ready to upload: the remote-code layout, and a model card.

    ``card_info`` (see `write_model_card`) rewrites ``README.md``; without it a card is written only when the folder
    has none or only diffusers' generic one, so a card written by the training script is kept.
    """
    add_remote_code(folder)
    readme = os.path.join(folder, "README.md")
    if card_info is not None or not is_mmf_card(readme):
        info = dict(card_info or {})
        if repo_id and "/" in repo_id:
            info.setdefault("repo_id", repo_id)
        write_model_card(folder, info, secrets=secrets)
    elif repo_id and "/" in repo_id:
        # A card written before the repository was known (e.g. by the training script) loads "<user>/<repo>".
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        if REPO_PLACEHOLDER in text:
            with open(readme, "w", encoding="utf-8") as f:
                f.write(text.replace(REPO_PLACEHOLDER, repo_id))


# ---------------------------------------------------------------------------------------------------- auth
def check_hub_auth(token: Optional[str] = None, *, endpoint: Optional[str] = None, validate: bool = False) -> str:
    """The token to push with: ``token`` if given, else ``HF_TOKEN``, else the cached login (``hf auth login``).

    Raises a ValueError when there is none, so a training run with ``--push_to_hub`` fails before any work. With
    ``validate=True`` the Hub (``endpoint``) is asked who the token belongs to, and a rejected token raises too. The
    token never appears in a message.
    """
    token = token or get_token()
    if not token:
        raise ValueError(f"Pushing to the Hugging Face Hub needs a token and none was found: {AUTH_HELP}.")
    if validate:
        use_hub_timeouts()
        api = HfApi(endpoint=endpoint)
        try:
            api.whoami(token=token)
        except HfHubHTTPError as error:
            status = getattr(error.response, "status_code", None)
            raise ValueError(f"The Hub rejected the token (HTTP {status}): {AUTH_HELP}.") from None
        except Exception as error:  # connection refused, DNS, timeout, ...: whatever the HTTP client raises
            raise ValueError(f"Could not reach the Hub at {api.endpoint} to check the token: "
                             f"{_network_message(error)}") from None
    return token


def _files_to_upload(folder: PathLike, ignore_patterns: Optional[List[str]]) -> List[str]:
    """Paths (relative, ``/``-separated) that `upload_folder` would send, with the same default ignores."""
    paths = []
    for root, _, files in os.walk(folder):
        for name in files:
            paths.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    ignore = list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS
    return sorted(filter_repo_objects(paths, ignore_patterns=ignore))


def _network_message(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {text[0] if text else ''}"
    if is_network_error(error):
        reason += f" (no answer within {hub_timeout():g} s: MMF_HUB_TIMEOUT sets the limit)"
    return reason


def pipeline_files(folder: PathLike) -> List[str]:
    """The files that make up the saved pipeline in ``folder`` (relative, ``/``-separated): `TOP_LEVEL_FILES`, images
    at the top level (the card's sample grid), and in the folder of each component that ``model_index.json`` names
    its configs, ``.safetensors`` weights and remote-code modules. Nothing else is pushed: not checkpoints, logs,
    samples, hidden or temporary files (``unet/.tmpXXXX``, ``.trash-checkpoint-N``, ``.mmf-train.lock``), nor
    pickled ``.bin`` weights.

    Raises ValueError for a symlink that points outside ``folder`` and for a component without safetensors weights
    when its config says it is a model (has ``_diffusers_version`` and is not a scheduler).
    """
    index = _read_model_index(folder)
    root = os.path.realpath(folder)
    chosen = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        if name in TOP_LEVEL_FILES or name.lower().endswith(TOP_LEVEL_IMAGE_EXTENSIONS):
            chosen.append(name)
    # Only the pipeline's modules, as diffusers tells them apart (configuration values can be 2-lists too).
    modules, _ = _pipeline_class(index, folder)._get_signature_keys(_pipeline_class(index, folder))
    for component in sorted(modules):
        entry = index.get(component)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0]):
            continue
        directory = os.path.join(folder, component)
        if not os.path.isdir(directory):
            raise ValueError(f"{folder}/{MODEL_INDEX} names the component {component!r}, but {directory} is missing")
        names = [n for n in sorted(os.listdir(directory)) if not n.startswith(".")
                 and n.endswith(COMPONENT_FILE_EXTENSIONS) and os.path.isfile(os.path.join(directory, n))]
        has_weights = any(n.endswith(".safetensors") for n in names)
        is_scheduler = any(n == "scheduler_config.json" for n in names)
        if not is_scheduler and not has_weights:
            bins = [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            raise ValueError(f"{directory} has no .safetensors weights" + (
                f" (only pickled {', '.join(sorted(bins))}: load and save the pipeline again with "
                "safe_serialization=True)" if bins else ""))
        chosen += [f"{component}/{n}" for n in names]
    for relative in chosen:
        path = os.path.join(folder, relative)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise ValueError(f"Refusing to upload {folder}: {relative} is a symlink to {real}, outside the folder")
        # A hard link is the same file under a second name, which may lie anywhere on the file system: what is
        # uploaded must be the folder's own content.
        links = os.lstat(path).st_nlink
        if links > 1:
            raise ValueError(f"Refusing to upload {folder}: {relative} has {links} hard links, so its content may "
                             "belong to a file outside the folder; replace it with a copy (cp --no-preserve=links)")
    return chosen


def printable(text: object) -> str:
    """``text`` with every character that could start a new line or steer a terminal (newline, carriage return,
    escape, other control characters) written as its escape (``\\n``): echoed input stays one line of data."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


def repo_id_problem(repo_id: str, what: str, full: bool = False) -> Optional[str]:
    """Why ``repo_id`` is not a repository id the Hub accepts (huggingface_hub's own `validate_repo_id`, and
    ``user/name`` when ``full``), or None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        return f"{what} {printable(repr(repo_id))} is not a valid repository id: {printable(str(error))}"
    if full and repo_id.count("/") != 1:
        return f"{what} {printable(repr(repo_id))} must be user/name"
    return None


def validate_pipeline_folder(folder: PathLike, files: Iterable[str]) -> None:
    """Refuse to push a pipeline that is broken: every ``.safetensors`` file must be whole, the folder must load with
    its pipeline class, and every weight must be finite. Raises ValueError with the reason."""
    import torch

    for relative in files:
        if relative.endswith(".safetensors"):
            problem = safetensors_problem(os.path.join(folder, relative))
            if problem:
                raise ValueError(f"Refusing to upload {folder}: {relative} is damaged ({problem})")
    try:
        with quiet_loading():
            pipe = load_pipeline(str(folder))
    except Exception as error:  # noqa: BLE001 - whatever diffusers raises, the folder does not load
        text = str(error).strip().splitlines()
        raise ValueError(f"Refusing to upload {folder}: it does not load ({type(error).__name__}: "
                         f"{text[0] if text else ''})") from None
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            bad = [n for n, p in component.named_parameters() if not bool(torch.isfinite(p).all())]
            if bad:
                raise ValueError(f"Refusing to upload {folder}: {name} has non-finite weights ({bad[0]}, ...)")


# ---------------------------------------------------------------------------------------------------- push
def push_pipeline_folder(
    folder: PathLike,
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: bool = False,
    commit_message: str = "Upload MMF pipeline",
    endpoint: Optional[str] = None,
    card_info: Optional[Dict[str, Any]] = None,
    ignore_patterns: Optional[List[str]] = None,
    demo_space: Optional[str] = None,
) -> str:
    """Upload a saved MMF pipeline folder to the Hub repository ``repo_id``; returns the commit URL.

    The repository is created if needed (private when ``private``; an existing one keeps its visibility). The folder
    first gets the remote-code layout and a model card, in place (`prepare_folder_for_hub`), so the local folder and the
    repository both load with ``MMFPipeline.from_pretrained`` (``MMFTrajectoryPipeline.from_pretrained`` for a
    trajectory pipeline) and with ``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)``. ``repo_id`` may
    omit the namespace (the token's user). Only the files of the pipeline are sent (`pipeline_files`); ``ignore_patterns``
    (fnmatch, relative to ``folder``) leaves more out. The upload is refused if the token appears in a file of the
    folder or a pushed file's name, if a pushed file is a symlink out of the folder, or if the pipeline does not load or
    has non-finite weights (`validate_pipeline_folder`). ``endpoint`` defaults to ``HF_ENDPOINT`` / huggingface.co;
    every request has a time limit (`use_hub_timeouts`, ``MMF_HUB_TIMEOUT``).
    ``demo_space`` (a Space id) adds a Demo section that links it to the card
    (`mmf_diffusers.model_card.add_demo_section`).
    """
    _read_model_index(folder)  # a clear error for a missing folder or one without a pipeline, before anything else
    token = check_hub_auth(token)
    use_hub_timeouts()
    api = HfApi(endpoint=endpoint, token=token)
    if "/" not in repo_id:
        repo_id = f"{api.whoami()['name']}/{repo_id}"
    prepare_folder_for_hub(folder, repo_id=repo_id, card_info=card_info, secrets=[token])
    if demo_space:
        add_demo_section(os.path.join(folder, "README.md"), demo_space, repo_id)
    ignore = list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS
    files = sorted(filter_repo_objects(pipeline_files(folder), ignore_patterns=ignore))
    # The token is looked for, plain and encoded (base64, hex, URL-encoded, ...: `hub_token.encoded_forms`), in every
    # file that is not ignored, pushed or not (a token lying in the folder is a mistake worth stopping for), and in
    # the names of the files.
    leaked = token_leaks(str(folder), sorted(set(files) | set(_files_to_upload(folder, ignore_patterns))), token)
    if leaked:
        raise ValueError(f"Refusing to upload {folder}: the Hub token appears in {leaked}".replace(token, "***"))
    validate_pipeline_folder(folder, files)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        allow_patterns=[glob.escape(path) for path in files],  # exactly these files
        ignore_patterns=list(ignore_patterns or []),  # a copy: upload_folder appends its defaults to the list
    )
    return commit.commit_url


def make_push_fn(
    args: argparse.Namespace, *, ignore_patterns: Optional[List[str]] = None, validate: bool = False
) -> Optional[Callable[..., str]]:
    """For a training script: None without ``args.push_to_hub``, else ``push(folder, commit_message, card_info=None)``
    returning the commit URL (see `push_pipeline_folder`; ``ignore_patterns`` applies to every push).

    Reads ``args.hub_model_id`` (default: the name of ``args.output_dir``, in the token's namespace),
    ``args.hub_token`` (a token object set in Python) or ``args.hub_token_file`` (a file holding it; else HF_TOKEN or
    the cached login), ``args.hub_private_repo`` and ``args.hub_endpoint`` when the script has them. Checks the token
    at once (`check_hub_auth`; with ``validate=True`` the Hub is asked too), so call it before training starts.
    """
    if not getattr(args, "push_to_hub", False):
        return None
    repo_id = getattr(args, "hub_model_id", None) or os.path.basename(os.path.normpath(getattr(args, "output_dir", "")))
    if not repo_id:
        raise ValueError("--push_to_hub needs --hub_model_id (user/name)")
    endpoint = getattr(args, "hub_endpoint", None)
    token = getattr(args, "hub_token", None)
    if token is None and getattr(args, "hub_token_file", None) is not None:
        token = read_token_file(args.hub_token_file, "--hub_token_file")
    token = check_hub_auth(token, endpoint=endpoint, validate=validate)
    private = bool(getattr(args, "hub_private_repo", False))

    def push(folder: PathLike, commit_message: str, card_info: Optional[Dict[str, Any]] = None) -> str:
        return push_pipeline_folder(
            folder,
            repo_id,
            token=token,
            private=private,
            commit_message=commit_message,
            endpoint=endpoint,
            card_info=card_info,
            ignore_patterns=ignore_patterns,
        )

    return push


# ---------------------------------------------------------------------------------------------------- command
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmf-push",
        description=(
            "Push a saved MMF pipeline folder to the Hugging Face Hub, with the remote-code files that let "
            "`DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` load it without mmf_diffusers."
        ),
    )
    parser.add_argument("folder", help="pipeline folder written by save_pretrained (has model_index.json)")
    parser.add_argument("repo_id", help="Hub repository, user/name (created if it does not exist)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help="a file holding only the Hub token (write access). Default: HF_TOKEN, else the cached login "
        "(`hf auth login`). The files to upload are searched for the token, plain and encoded (base64, base64url, "
        "hex, URL-encoded, UTF-16), and the upload is refused if it is found.",
    )
    parser.add_argument(
        "--token",
        default=None,
        metavar="TOKEN",
        help="REFUSED, with exit status 2 before anything else: a token on the command line is readable by every "
        "user of the machine (ps, /proc/PID/cmdline) and cannot be erased there. Use HF_TOKEN, --token-file or "
        "`hf auth login`.",
    )
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--commit-message", default="Upload MMF pipeline", help="commit message")
    parser.add_argument("--with-demo", action="store_true",
                        help="also write the app.py, requirements.txt and README.md of a Gradio Space that serves "
                             "`mmf-demo` for REPO_ID (to --demo-dir), and link the Space (--space-id) from the card")
    parser.add_argument("--space-id", default=None, help="the Space's id (default: REPO_ID-demo)")
    parser.add_argument("--demo-dir", default=None, help="where to write the Space's files (default: FOLDER-space)")
    parser.add_argument("--demo-requirement", default=None,
                        help="pip requirement of mmf_diffusers in the Space (default: mmf_diffusers[demo]==VERSION; "
                             "e.g. a git+https URL)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """``mmf-push FOLDER REPO_ID [--private] [--token-file FILE] [--endpoint URL] [--with-demo ...]``; returns the
    exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.token is not None:
        parser.exit(2, f"mmf-push: error: {command_line_refusal('--token', '--token-file')}\n")
    space_id = demo_dir = None
    problem = repo_id_problem(args.repo_id, "REPO_ID") or (
        repo_id_problem(args.space_id, "--space-id", full=True) if args.space_id is not None else None)
    if problem:
        parser.exit(2, f"mmf-push: error: {problem}\n")
    if args.with_demo:
        if args.repo_id.count("/") != 1:
            parser.exit(2, "mmf-push: error: --with-demo needs REPO_ID as user/name (the Space loads it by that id)\n")
        space_id = args.space_id or f"{args.repo_id}-demo"
        problem = repo_id_problem(space_id, "the Space id", full=True)
        if problem:
            parser.exit(2, f"mmf-push: error: {problem}\n")
        demo_dir = args.demo_dir or os.path.normpath(args.folder) + "-space"
        if os.path.abspath(demo_dir).startswith(os.path.abspath(args.folder) + os.sep):
            parser.exit(2, "mmf-push: error: --demo-dir must lie outside FOLDER (it would be uploaded with the model)\n")
    try:
        _read_model_index(args.folder)
        pipeline_files(args.folder)
        token = check_hub_auth(read_token_file(args.token_file, "--token-file") if args.token_file else None)
    except (OSError, ValueError) as error:  # TokenError is a ValueError
        parser.exit(2, f"mmf-push: error: {printable(error)}\n")
    if args.with_demo:
        from .space import write_space

        write_space(demo_dir, args.repo_id, requirement=args.demo_requirement)
    try:
        check_hub_auth(token, endpoint=args.endpoint, validate=True)  # a bad token or a dead endpoint, before work
        url = push_pipeline_folder(
            args.folder,
            args.repo_id,
            token=token,
            private=args.private,
            commit_message=args.commit_message,
            endpoint=args.endpoint,
            demo_space=space_id,
        )
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        parser.exit(1, f"mmf-push: error: the Hub refused the upload (HTTP {status}): "
                       f"{str(error).splitlines()[0]}\n".replace(token, "***"))
    except (OSError, ValueError) as error:
        parser.exit(1, f"mmf-push: error: {printable(error)}\n".replace(token, "***"))
    except Exception as error:  # noqa: BLE001 - the HTTP client's timeouts and connection errors
        if not is_network_error(error):
            raise
        parser.exit(1, f"mmf-push: error: could not reach the Hub: {_network_message(error)}\n".replace(token, "***"))
    # Echoed names are data: quoted for the shell, control characters escaped, so none can add a line.
    print(f"Pushed {printable(shlex.quote(args.folder))} to {args.repo_id}: {printable(url)}")
    if args.with_demo:
        print(f"Wrote the Space's files to {printable(shlex.quote(demo_dir))}; create the Space (linked from the card) "
              f"with:\n  hf upload {shlex.quote(space_id)} {printable(shlex.quote(demo_dir))} --repo-type space")
    return 0


if __name__ == "__main__":
    sys.exit(main())
