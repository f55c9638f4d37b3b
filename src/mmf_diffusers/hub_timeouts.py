"""A time limit on every request huggingface_hub makes, so a Hub endpoint that accepts connections but never
answers ends in an error instead of a hang.

huggingface_hub 2.4 bounds file downloads (``HF_HUB_DOWNLOAD_TIMEOUT``) and metadata requests
(``HF_HUB_ETAG_TIMEOUT``), but its shared HTTP client has no timeout, and ``HfApi`` calls (``whoami``,
``create_repo``, ``create_commit``, and ``model_info``, which diffusers' ``from_pretrained`` calls) pass
``timeout=None``, i.e. wait forever. `use_hub_timeouts` installs, through huggingface_hub's own
``set_client_factory``, a client whose request hook turns every missing limit into ``MMF_HUB_TIMEOUT`` seconds
(default 30) per connect / read / write. A client factory set by the user is left alone.
"""

from __future__ import annotations

import os

TIMEOUT_ENV = "MMF_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 30.0


def hub_timeout() -> float:
    """``MMF_HUB_TIMEOUT`` in seconds (default 30); ValueError for a value that is not a positive number."""
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return value


def _fill_missing_timeouts(request) -> None:
    limit = hub_timeout()
    timeout = dict(request.extensions.get("timeout") or {})
    for key in ("connect", "read", "write", "pool"):
        if timeout.get(key) is None:
            timeout[key] = limit
    request.extensions["timeout"] = timeout


def _client_with_timeouts():
    from huggingface_hub.utils import _http

    client = _http.default_client_factory()
    hooks = client.event_hooks
    client.event_hooks = {"request": list(hooks.get("request", [])) + [_fill_missing_timeouts],
                          "response": list(hooks.get("response", []))}
    return client


def use_hub_timeouts() -> None:
    """Give huggingface_hub's shared HTTP client the time limit above (idempotent; keeps a user's own factory)."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    hub_timeout()  # a bad MMF_HUB_TIMEOUT fails here, with its name
    if getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) is _http.default_client_factory:
        set_client_factory(_client_with_timeouts)


def is_network_error(error: BaseException) -> bool:
    """True for the HTTP client's transport errors (timeouts, refused connections, DNS), not for HTTP statuses."""
    try:
        import httpx2 as httpx
    except ImportError:  # huggingface_hub < 2.4 used httpx
        import httpx
    return isinstance(error, (httpx.TransportError, TimeoutError, ConnectionError))


class quiet_loading:
    """Context manager: no diffusers progress bar while a pipeline folder loads (three components take no time
    worth a bar); the previous setting comes back afterwards."""

    def __enter__(self):
        from diffusers.utils import logging as diffusers_logging

        self._logging = diffusers_logging
        self._was_enabled = diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        if self._was_enabled:
            self._logging.enable_progress_bar()
        return False
