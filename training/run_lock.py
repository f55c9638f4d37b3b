"""One training run per output folder: an exclusive ``fcntl.flock`` on ``<output_dir>/.mmf-train.lock``.

The kernel releases a flock when the last descriptor of the open file closes, so the lock ends with the process
however it ends (normal exit, exception, SIGKILL, out-of-memory kill): there is no stale lock to detect or break.
A lock file left behind by a dead run is therefore just a file; whether a run holds it is what ``flock`` answers.
The file's text (pid, host, start time, command) only serves the message. ``accelerate launch`` runs the script in a
child process: the child takes the lock, so killing the launcher while the child trains leaves the folder locked,
as it should be. flock works between processes of one machine; on a network file system it may not (NFS without
lock support), so do not share an output folder across machines.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from typing import Dict, Optional

LOCK_FILE = ".mmf-train.lock"

_held: Dict[str, object] = {}  # output_dir (absolute) -> the open lock file, kept open for the process's lifetime


class OutputDirLocked(RuntimeError):
    """Another process holds the lock of this output folder."""


def acquire(output_dir: str) -> str:
    """Create ``output_dir`` if needed and take its lock, at once or not at all. Returns the lock file's path.

    Raises OutputDirLocked, naming the holder, if another process has it; OSError if the folder cannot be written.
    """
    key = os.path.abspath(output_dir)
    path = os.path.join(key, LOCK_FILE)
    if key in _held:
        return path
    os.makedirs(key, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # not "w": the holder's text must survive a refused attempt
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown process"
        handle.close()
        raise OutputDirLocked(f"{output_dir} is in use by another training run ({holder}); wait for it to end, or "
                              "choose another --output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{' '.join(sys.argv[:1])}\n")
    handle.flush()
    _held[key] = handle
    return path


def holder(output_dir: str) -> Optional[str]:
    """The text of the lock file if a live process holds the lock, else None (tests, messages)."""
    path = os.path.join(output_dir, LOCK_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            return handle.read().strip()
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return None
