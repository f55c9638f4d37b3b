"""What a training run finds in its ``--output_dir`` and what an interrupted run leaves there.

An earlier run's folder. ``train_mmf.py`` writes ``checkpoint-<step>/`` folders, the pipeline (``model_index.json``
and its component folders), ``README.md``, ``sample_grid.png``, ``samples/``, ``logs/`` and ``training_config.json``.
A new run into such a folder would overwrite ``checkpoint-5`` and the pipeline but leave the earlier run's
``checkpoint-10/15/20`` beside them, and a later ``--resume_from_checkpoint latest`` would resume the *earlier*
run. So `check_earlier_run` refuses, in one line, unless the command says what to do: ``--resume_from_checkpoint``
(continue that run) or ``--overwrite_output_dir`` (start afresh: `clear_earlier_run` removes the earlier run's
files first, checkpoints first). Other files in the folder are left alone, and so is ``latent_cache/`` (keyed by the
VAE and the data, and checked on use).

Interrupts. `interrupt_handlers` turns SIGINT (Ctrl-C) and SIGTERM into `Interrupted`, which the script
catches to print one line on how to resume and exit with ``128 + signal`` (130, 143). Inside `deferred_interrupts`
(a checkpoint or pipeline save) the signal is held back until the save is complete, so an interrupt never leaves a
half-written checkpoint or pipeline folder. A second Ctrl-C during a save still waits for it (SIGKILL does not, and
is safe too: checkpoints are committed by an atomic rename, ``mmf_diffusers.checkpointing``).

Standard library only (the checks run before torch is imported).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
from typing import List, Optional

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: Files of a run at the top of its folder (the pipeline's components are the folders its model_index.json names).
RUN_FILES = ("model_index.json", "training_config.json", "README.md", "sample_grid.png", "pipeline.py")
RUN_FOLDERS = ("samples", "logs")
_PARTIAL_PREFIXES = (".tmp-checkpoint-", ".trash-checkpoint-")


class EarlierRun(ValueError):
    """``--output_dir`` holds another run and the command does not say whether to resume or overwrite it."""


# ----------------------------------------------------------------------------------------------- the folder itself
def output_dir_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be a run's output folder (empty, a file, under a file, not writable), or None."""
    if not path or not path.strip():
        return "--output_dir is empty; name a folder, e.g. --output_dir runs/my-run"
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--output_dir {path!r} is a file, not a folder"
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"--output_dir {path!r} cannot be created: {parent!r} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--output_dir {path!r} is not writable ({parent!r})"
    return None


def _checkpoints(output_dir: str) -> List[int]:
    """Steps of the ``checkpoint-<step>`` folders (complete or not), sorted."""
    return sorted(int(m.group(1)) for m in map(CHECKPOINT_RE.match, _names(output_dir)) if m)


def _names(output_dir: str) -> List[str]:
    try:
        return sorted(os.listdir(output_dir))
    except OSError:
        return []


def _components(output_dir: str) -> List[str]:
    """The component folders that the pipeline's model_index.json names (``unet``, ``scheduler``, ...)."""
    try:
        with open(os.path.join(output_dir, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(index, dict):
        return []
    return sorted(name for name, entry in index.items() if isinstance(entry, list) and len(entry) == 2 and entry[0]
                  and isinstance(name, str) and os.sep not in name and name not in (".", "..")
                  and os.path.isdir(os.path.join(output_dir, name)))


def describe_earlier_run(output_dir: str) -> Optional[str]:
    """A short description of the earlier run in ``output_dir`` (its checkpoints, or its pipeline and config), or
    None if the folder holds nothing of a run."""
    steps = _checkpoints(output_dir)
    if steps:
        shown = ", ".join(f"checkpoint-{s}" for s in steps[:4]) + (f", ... ({len(steps)} in all)" if len(steps) > 4
                                                                    else "")
        what = f"the checkpoints of an earlier run ({shown}"
        try:
            with open(os.path.join(output_dir, f"checkpoint-{steps[-1]}", "training_state.json"),
                      encoding="utf-8") as f:
                total = (json.load(f).get("config") or {}).get("max_train_steps")
            if isinstance(total, int):
                what += "; finished" if steps[-1] >= total else f"; step {steps[-1]} of {total}"
        except (OSError, ValueError, AttributeError):
            pass
        return what + ")"
    names = set(_names(output_dir))
    found = [n for n in ("training_config.json", "model_index.json") if n in names]
    found += [f"{n}/" for n in (*RUN_FOLDERS, *_PARTIAL_PREFIXES) if any(x.startswith(n) for x in names)]
    if found:
        return f"the files of an earlier run ({', '.join(found)})"
    return None


def check_earlier_run(output_dir: str, resume: Optional[str], overwrite: bool) -> None:
    """Refuse (`EarlierRun`, one line) to train into a folder that holds another run, unless the command says what to
    do with it: ``resume`` (``--resume_from_checkpoint``: ``latest`` or a checkpoint folder) or ``overwrite``."""
    if overwrite:
        return
    earlier = describe_earlier_run(output_dir)
    if earlier is None:
        return
    hint = ("resume it with --resume_from_checkpoint latest, start afresh with --overwrite_output_dir (removes "
            "them first), or choose another --output_dir")
    if resume is None:
        raise EarlierRun(f"--output_dir {output_dir} holds {earlier}: {hint}")
    if resume == "latest":
        return
    resumed = os.path.realpath(resume)
    inside = os.path.dirname(resumed) == os.path.realpath(output_dir)
    match = CHECKPOINT_RE.match(os.path.basename(resumed))
    if not inside:
        raise EarlierRun(f"--output_dir {output_dir} holds {earlier}, and --resume_from_checkpoint {resume} is not "
                         "one of them: pass --overwrite_output_dir to remove them first, or choose another "
                         "--output_dir")
    newer = [s for s in _checkpoints(output_dir) if match and s > int(match.group(1))]
    if newer:
        raise EarlierRun(f"--output_dir {output_dir} holds checkpoints newer than {os.path.basename(resumed)} "
                         f"({', '.join(f'checkpoint-{s}' for s in newer)}), which a later --resume_from_checkpoint "
                         "latest would pick: pass --overwrite_output_dir to remove them, or resume with latest")


def clear_earlier_run(output_dir: str, keep: Optional[str] = None, logging_dir: Optional[str] = None) -> List[str]:
    """Remove what an earlier run left in ``output_dir``: its checkpoints first (each renamed to a ``.trash-`` name,
    its ``training_state.json`` removed, then deleted, so a half-removed one never looks complete), then its
    pipeline, card, samples, logs and config. ``keep`` (a checkpoint folder being resumed) stays, and with it the
    run's other files: only the checkpoints newer than it go. Returns the names removed."""
    removed = []
    kept = os.path.realpath(keep) if keep else None
    keep_run = kept is not None and os.path.dirname(kept) == os.path.realpath(output_dir)
    keep_match = CHECKPOINT_RE.match(os.path.basename(kept)) if keep_run else None
    for step in _checkpoints(output_dir):
        path = os.path.join(output_dir, f"checkpoint-{step}")
        if keep_run and (os.path.realpath(path) == kept or (keep_match and step < int(keep_match.group(1)))):
            continue
        trash = os.path.join(output_dir, f".trash-checkpoint-{step}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(trash, "training_state.json"))
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(f"checkpoint-{step}")
    if keep_run:
        return removed
    for name in _names(output_dir):
        if name.startswith(_PARTIAL_PREFIXES):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
            removed.append(name)
    folders = list(RUN_FOLDERS) + _components(output_dir)
    if logging_dir and not os.path.isabs(logging_dir) and os.path.normpath(logging_dir).split(os.sep)[0] not in ("..",):
        folders.append(os.path.normpath(logging_dir))
    for name in dict.fromkeys(folders):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
            removed.append(f"{name}/")
    for name in RUN_FILES:
        path = os.path.join(output_dir, name)
        if os.path.isfile(path) or os.path.islink(path):
            os.remove(path)
            removed.append(name)
    return removed


# ----------------------------------------------------------------------------------------------------- interrupts
class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, like KeyboardInterrupt: no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_status = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


_state = {"depth": 0, "pending": None}


def _handler(signum, frame):
    if _state["depth"] > 0:  # inside a save: finish it first
        _state["pending"] = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupt_handlers():
    """While the body runs, route SIGINT and SIGTERM to `Interrupted` (main thread only; a signal set to be ignored
    stays ignored, e.g. SIGINT of a job started in the background by a shell); the previous handlers come back
    afterwards (the script may run inside another program, e.g. a test runner)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if handler in (signal.default_int_handler, signal.SIG_DFL):
                previous[signum] = signal.signal(signum, _handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _state["depth"], _state["pending"] = 0, None


@contextlib.contextmanager
def deferred_interrupts():
    """Hold SIGINT/SIGTERM back while the body runs (a save); raise `Interrupted` after it if one came."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
    if _state["depth"] == 0 and _state["pending"] is not None:
        signum, _state["pending"] = _state["pending"], None
        raise Interrupted(signum)


def close_progress_bars() -> None:
    """Close tqdm's open progress bars now, so that their last redraw (at exit otherwise) comes before the line that
    says how to resume, not after it."""
    import sys

    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(tqdm, "_instances", None) or []):
        bar.close()


def resume_hint(output_dir: str, complete_checkpoints: List[int]) -> str:
    """What to do after an interrupt, given the steps of the complete checkpoints in ``output_dir``."""
    if complete_checkpoints:
        step = complete_checkpoints[-1]
        return (f"nothing half-written; checkpoint-{step} (step {step}) in {output_dir} is the last complete one: "
                "run the same command with --resume_from_checkpoint latest to continue")
    return (f"no checkpoint was complete yet in {output_dir}: run the same command with --overwrite_output_dir to "
            "start again")
