"""Crash-safe training checkpoint folders: write into a temporary folder, then rename it into place.

A training run keeps its resumable state in ``<output_dir>/checkpoint-<step>/``. A checkpoint is first written
to ``<output_dir>/.tmp-checkpoint-<step>/``; the last file written is `METADATA_FILE` (the step and the resolved
training configuration), then the folder is renamed with `os.replace`, which is atomic on one file system. So a
folder named ``checkpoint-<step>`` is always complete, and a crash or a SIGKILL during a save leaves only a
``.tmp-`` folder, which `latest_checkpoint` ignores and the next save of that step clears (a crash between the two
renames of a re-saved step is repaired by `recover_interrupted_commits`). Old checkpoints are
removed only after the new one is in place (`rotate_checkpoints`), by first renaming them to ``.trash-...``
so that a half-deleted folder never looks like a checkpoint.

Only the main process calls the functions that change the file system; this module imports no torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

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


def safetensors_problem(path: str) -> Optional[str]:
    """Why the safetensors file ``path`` is damaged (missing, truncated, a bad header), or None if it looks whole.

    Checks the layout without reading the tensors: an 8-byte little-endian header length, a JSON header, and data
    offsets that end exactly at the end of the file.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return "truncated header"
            header = json.loads(f.read(n))
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "the header is not JSON"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"bad entry {name!r}"
        end = max(end, offsets[1])
    if 8 + n + end != size:
        return f"{size} bytes where the header describes {8 + n + end} (truncated?)"
    return None


def checkpoint_problem(path: str, required: Iterable[str] = (),
                       metadata_check: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None) -> Optional[str]:
    """Why the checkpoint folder ``path`` cannot be resumed, or None: `METADATA_FILE` must parse as a JSON object
    (that ``metadata_check``, if given, finds no problem with), every file of ``required`` must exist and be
    non-empty, and every ``*.safetensors`` file must be whole."""
    try:
        meta = read_metadata(path)
    except FileNotFoundError:
        return f"no {METADATA_FILE}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{METADATA_FILE} is unreadable ({error})"
    if not isinstance(meta, dict):
        return f"{METADATA_FILE} is not a JSON object"
    problem = metadata_check(meta) if metadata_check is not None else None
    if problem:
        return problem
    for name in required:
        file = os.path.join(path, name)
        if not os.path.isfile(file) or os.path.getsize(file) == 0:
            return f"{name} is missing or empty"
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            problem = safetensors_problem(os.path.join(path, name))
            if problem:
                return f"{name}: {problem}"
    return None


def latest_checkpoint(output_dir: str, required: Iterable[str] = (),
                      on_skip: Optional[Callable[[str, str], None]] = None,
                      metadata_check: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None) -> Optional[str]:
    """Path of the newest complete checkpoint that `checkpoint_problem` finds intact, or None.

    A damaged newer checkpoint (a file lost or truncated after its commit, e.g. by a full disk or a manual copy) is
    skipped: ``on_skip(path, reason)`` is called for it, and the next older one is tried.
    """
    required = tuple(required)
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path, required, metadata_check)
        if problem is None:
            return path
        if on_skip is not None:
            on_skip(path, problem)
    return None


def recover_interrupted_commits(output_dir: str) -> List[str]:
    """Finish what a crash in `commit_checkpoint` left half done. Call it (main process) before anything lists,
    saves or rotates checkpoints. Returns the checkpoint paths it restored.

    Re-saving an existing step moves the old ``checkpoint-<step>`` to ``.trash-checkpoint-<step>`` and then renames
    the new ``.tmp-checkpoint-<step>`` into place. A crash between the two renames leaves no ``checkpoint-<step>``;
    then the temporary folder is complete (its `METADATA_FILE` is written and flushed before the first rename), so
    it is renamed into place; if it is not, the old folder comes back from the trash.
    """
    if not os.path.isdir(output_dir):
        return []
    restored = []
    names = set(os.listdir(output_dir))
    for prefix in (TEMP_PREFIX, TRASH_PREFIX):  # the newer save first
        for name in sorted(names):
            step = name[len(prefix):]
            if not name.startswith(prefix) or not step.isdigit():
                continue
            final = checkpoint_dir(output_dir, int(step))
            source = os.path.join(output_dir, name)
            if os.path.exists(final) or checkpoint_problem(source) is not None:
                continue
            os.replace(source, final)
            _fsync_dir(output_dir)
            restored.append(final)
    return restored


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
    deleted. Leftover trash folders from an earlier crash are removed too (after `recover_interrupted_commits` has
    restored any that a crash left as the only copy of a step). Returns the removed checkpoint paths.
    """
    recover_interrupted_commits(output_dir)
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
        # The metadata goes first: a half-deleted trash folder must never look complete to
        # recover_interrupted_commits (which restores a whole one, harmlessly: it is rotated again).
        os.remove(os.path.join(trash, METADATA_FILE))
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    return removed
