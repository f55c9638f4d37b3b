"""Crash-safe training checkpoint folders: write into a temporary folder, then rename it into place.

A training run keeps its resumable state in ``<output_dir>/checkpoint-<step>/``. A checkpoint is first written
to ``<output_dir>/.tmp-checkpoint-<step>/``; the last file written is `METADATA_FILE` (the step and the resolved
training configuration), then the folder is renamed with `os.replace`, which is atomic on one file system. So a
folder named ``checkpoint-<step>`` is always complete, and a crash or a SIGKILL during a save leaves only a
``.tmp-`` folder, which `latest_checkpoint` ignores and the next save of that step clears. Old checkpoints are
removed only after the new one is in place (`rotate_checkpoints`), by first renaming them to ``.trash-...``
so that a half-deleted folder never looks like a checkpoint.

Only the main process calls the functions that change the file system; this module imports no torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

CHECKPOINT_PREFIX = "checkpoint-"
TEMP_PREFIX = ".tmp-checkpoint-"
TRASH_PREFIX = ".trash-checkpoint-"
#: Written last into a checkpoint before it is renamed into place: its presence marks a complete checkpoint.
METADATA_FILE = "training_state.json"

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(output_dir: str, step: int) -> str:
    """``<output_dir>/checkpoint-<step>``."""
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")


def temp_checkpoint_dir(output_dir: str, step: int) -> str:
    """``<output_dir>/.tmp-checkpoint-<step>``: where a checkpoint is written before it is renamed into place."""
    return os.path.join(output_dir, f"{TEMP_PREFIX}{step}")


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first.

    Only folders named exactly ``checkpoint-<digits>`` that hold `METADATA_FILE` count; temporary, trash and
    foreign folders are ignored.
    """
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, METADATA_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """Path of the complete checkpoint with the highest step, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def read_metadata(path: str) -> Dict[str, Any]:
    """The `METADATA_FILE` of a checkpoint folder, parsed. Raises FileNotFoundError for an incomplete folder."""
    with open(os.path.join(path, METADATA_FILE), encoding="utf-8") as f:
        return json.load(f)


def prepare_temp_dir(output_dir: str, step: int) -> str:
    """Create an empty temporary folder for the checkpoint of ``step`` (clearing one left by a crash). Returns it."""
    tmp = temp_checkpoint_dir(output_dir, step)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def _fsync_tree(path: str) -> None:
    # Flush file contents and directory entries, so the rename below cannot reach the disk before the data.
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_checkpoint(tmp_dir: str, output_dir: str, step: int, metadata: Dict[str, Any]) -> str:
    """Finish a checkpoint: write `METADATA_FILE` into ``tmp_dir``, flush, and rename it to ``checkpoint-<step>``.

    If ``checkpoint-<step>`` already exists (a resumed run saving the same step again), the old folder is moved
    aside first and removed only after the new one is in place. Returns the final path.
    """
    with open(os.path.join(tmp_dir, METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
        f.write("\n")
    _fsync_tree(tmp_dir)
    final = checkpoint_dir(output_dir, step)
    old = None
    if os.path.exists(final):
        old = os.path.join(output_dir, f"{TRASH_PREFIX}{step}")
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp_dir, final)
    _fsync_dir(output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def rotate_checkpoints(output_dir: str, total_limit: Optional[int]) -> List[str]:
    """Remove the oldest complete checkpoints so that at most ``total_limit`` remain (None: keep all).

    Call it after the newest checkpoint is in place. Each folder is renamed to ``.trash-...`` before it is
    deleted. Leftover trash folders from an earlier crash are removed too. Returns the removed checkpoint paths.
    """
    for name in os.listdir(output_dir):
        if name.startswith(TRASH_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = []
    for step, path in checkpoints[: max(len(checkpoints) - total_limit, 0)]:
        trash = os.path.join(output_dir, f"{TRASH_PREFIX}{step}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    return removed
