"""Where the Hub token comes from, and where it must not go.

A token is read from the environment (``HF_TOKEN``), from a file the user names (``--hub_token_file`` in training,
``--token-file`` in ``mmf-push``), or from the cached login (``hf auth login``), never from the command line: a
process's arguments are readable by every local user (``ps``, ``/proc/PID/cmdline``) for as long as it runs, and a
Python program cannot erase them there (``sys.argv`` is a copy), so a token flag is refused before anything else
happens (`command_line_refusal`).

Before an upload the files are searched for the token in plain and encoded forms (`encoded_forms`: base64 and
base64url at every byte alignment, so also inside a longer encoded blob, hex, URL-encoded, UTF-16; `token_leaks`).

Standard library only (the training script checks its arguments before the heavy imports).
"""

from __future__ import annotations

import base64
import os
import stat
from typing import Dict, Iterable, List, Optional
from urllib.parse import quote, quote_plus

#: A token file larger than this is not a token file.
TOKEN_FILE_MAX_BYTES = 4096
#: Encoded forms shorter than this are left out of the search (too short to be told apart from chance); a real Hub
#: token (``hf_`` and 34 characters) gives forms of 40 bytes and more.
MIN_FORM_BYTES = 12
#: Files up to this size are also searched with line breaks (and JSON's ``\\n`` escapes) removed: base64 wrapped at
#: 64 or 76 columns.
UNWRAP_MAX_BYTES = 64 << 20


class TokenError(ValueError):
    """A token flag on the command line, or a token file that cannot be used."""


def command_line_refusal(flag: str, file_flag: str) -> str:
    """The one-line reason a token given as ``flag`` on the command line is refused."""
    return (f"{flag} is refused: a token on the command line is readable by every user of this machine in the "
            f"process list (ps, /proc/PID/cmdline) while the program runs. Set HF_TOKEN, pass {file_flag} FILE (a "
            "file holding only the token), or log in once with `hf auth login`")


def read_token_file(path: str, flag: str = "--token-file") -> str:
    """The token in the file ``path``: one line of printable ASCII without spaces (surrounding whitespace and a final
    newline are dropped). A `TokenError` naming ``flag`` for a missing, non-regular, empty, oversized or malformed
    file; the message never holds the file's content."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise TokenError(f"{flag} {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(info.st_mode):
        raise TokenError(f"{flag} {path} is not a regular file")
    if info.st_size > TOKEN_FILE_MAX_BYTES:
        raise TokenError(f"{flag} {path} holds {info.st_size} bytes: a token file holds only the token")
    try:
        with open(path, "rb") as f:
            raw = f.read(TOKEN_FILE_MAX_BYTES + 1)
    except OSError as error:
        raise TokenError(f"{flag} {path}: {error.strerror or error}") from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenError(f"{flag} {path} holds non-ASCII bytes: a token file holds only the token") from None
    if not token:
        raise TokenError(f"{flag} {path} is empty")
    if any(not (33 <= ord(c) <= 126) for c in token):
        raise TokenError(f"{flag} {path} holds more than one word or line: a token file holds only the token")
    return token


def resolve_token(token_file: Optional[str] = None, flag: str = "--token-file") -> Optional[str]:
    """The token from ``token_file`` if given, else ``HF_TOKEN`` or the cached login (huggingface_hub's
    ``get_token``), else None."""
    if token_file is not None:
        return read_token_file(token_file, flag)
    from huggingface_hub import get_token

    return get_token()


def _base64_cores(data: bytes, altchars: Optional[bytes]) -> Dict[str, bytes]:
    """The characters of ``data``'s base64 that do not depend on its neighbours, at each of the 3 byte alignments
    it can have inside a longer encoded string (character j covers bits [6j, 6j + 6) of the stream)."""
    cores = {}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + data, altchars=altchars)
        first = -(-8 * offset // 6)  # ceil: the first character made of ``data``'s bits only
        last = 8 * (offset + len(data)) // 6  # floor: one past the last such character
        cores[f"{'base64url' if altchars else 'base64'} (alignment {offset})"] = encoded[first:last]
    return cores


def encoded_forms(token: str) -> Dict[str, bytes]:
    """``{name: bytes}``: the forms of ``token`` to look for in a file: plain, base64 and base64url (each at the 3
    alignments, so a token inside a longer encoded blob is found too), hex (lower and upper case), URL-encoded
    (``quote``, ``quote_plus``, and every byte as ``%XX``), UTF-16 (little and big endian). Forms shorter than
    `MIN_FORM_BYTES` are left out, except the plain one."""
    raw = token.encode("utf-8")
    forms = {"plain": raw}
    forms.update(_base64_cores(raw, None))
    forms.update(_base64_cores(raw, b"-_"))
    forms.update({
        "hex": raw.hex().encode(), "hex (upper case)": raw.hex().upper().encode(),
        "URL-encoded": quote(token, safe="").encode(), "URL-encoded (form)": quote_plus(token, safe="").encode(),
        "URL-encoded (every byte)": "".join(f"%{b:02X}" for b in raw).encode(),
        "URL-encoded (every byte, lower case)": "".join(f"%{b:02x}" for b in raw).encode(),
        "UTF-16-LE": token.encode("utf-16-le"), "UTF-16-BE": token.encode("utf-16-be"),
    })
    unique: Dict[bytes, str] = {}
    for name, form in forms.items():
        if form and (name == "plain" or len(form) >= MIN_FORM_BYTES):
            unique.setdefault(form, name)
    return {name: form for form, name in unique.items()}


def _found_in(path: str, forms: Dict[str, bytes], chunk_size: int = 1 << 20) -> Optional[str]:
    """The name of the first form found in the file ``path`` (read in chunks), or None."""
    overlap = max(len(form) for form in forms.values()) - 1
    size = os.path.getsize(path)
    tail = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                break
            window = tail + chunk
            for name, form in forms.items():
                if form in window:
                    return name
            tail = window[-overlap:] if overlap else b""
    if size <= UNWRAP_MAX_BYTES:  # base64 or hex wrapped over several lines, or over "\n" escapes in a JSON string
        with open(path, "rb") as f:
            unwrapped = f.read()
        for line_break in (b"\r", b"\n", b"\\r", b"\\n"):
            unwrapped = unwrapped.replace(line_break, b"")
        for name, form in forms.items():
            if form in unwrapped:
                return f"{name}, over line breaks"
    return None


def token_leaks(folder: str, paths: Iterable[str], token: str) -> List[str]:
    """``"PATH (form)"`` for each of ``paths`` (relative to ``folder``) whose bytes or name hold ``token`` in one of
    its `encoded_forms`; the message names the form, never the token."""
    forms = encoded_forms(token)
    leaks = []
    for path in paths:
        in_name = next((name for name, form in forms.items() if form in path.encode("utf-8", "surrogateescape")), None)
        if in_name is not None:
            leaks.append(f"{path.replace(token, '***')} (its name: {in_name})")
            continue
        found = _found_in(os.path.join(folder, path), forms)
        if found is not None:
            leaks.append(f"{path} ({found})")
    return leaks
