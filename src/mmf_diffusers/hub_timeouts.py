"""A time limit on every request huggingface_hub makes, so a Hub endpoint that accepts connections but never
answers ends in an error instead of a hang.

huggingface_hub 2.4 bounds file downloads (``HF_HUB_DOWNLOAD_TIMEOUT``) and metadata requests
(``HF_HUB_ETAG_TIMEOUT``), but its shared HTTP client has no timeout, and ``HfApi`` calls (``whoami``,
``create_repo``, ``create_commit``, and ``model_info``, which diffusers' ``from_pretrained`` calls) pass
``timeout=None``, i.e. wait forever. `use_hub_timeouts` installs, through huggingface_hub's own
``set_client_factory``, a client whose request hook turns every missing limit into ``MMF_HUB_TIMEOUT`` seconds
(default 30, at most `MAX_TIMEOUT`) per connect / read / write. A client factory set by the user is left alone.

`hub_preflight` asks the Hub once, within that limit and without retries, whether a repository is there, so that a
command given a Hub id that cannot be reached says so at once instead of after huggingface_hub's five retries with
back-off (about half a minute, or minutes with a long limit).
"""

from __future__ import annotations

import os

TIMEOUT_ENV = "MMF_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 30.0
#: The longest limit accepted: it bounds each connect / read / write (not a whole upload), so ten minutes of silence
#: is a dead endpoint, not a slow one.
MAX_TIMEOUT = 600.0


def hub_timeout() -> float:
    """``MMF_HUB_TIMEOUT`` in seconds (default 30); ValueError for a value that is not a positive number or is above
    `MAX_TIMEOUT`."""
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    if value > MAX_TIMEOUT:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} is more than the {MAX_TIMEOUT:g} s accepted (a limit per request "
                         "step, not per upload)")
    return value


def _fill_missing_timeouts(request) -> None:
    limit = hub_timeout()
    timeout = dict(request.extensions.get("timeout") or {})
    for key in ("connect", "read", "write", "pool"):
        # A missing limit, and one longer than ours: huggingface_hub retries a failed metadata request with a fixed
        # 60 s (and five retries), which would let a silent Hub hold a model load for minutes.
        if timeout.get(key) is None or timeout[key] > limit:
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


def hub_preflight(repo_id: str, token=None, endpoint=None) -> "str | None":
    """One request, within `hub_timeout` and without retries: why ``repo_id`` cannot be loaded from the Hub (the Hub
    does not answer, the repository does not exist or is not readable with this token), or None if it is there.
    In offline mode (``HF_HUB_OFFLINE``) nothing is asked: loading then uses the local cache."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return None
    use_hub_timeouts()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.model_info(repo_id, timeout=hub_timeout())
    except RepositoryNotFoundError:
        return (f"{repo_id} is not a repository on the Hub at {api.endpoint} (or it is private: log in with "
                "`hf auth login` or set HF_TOKEN)")
    except GatedRepoError:
        return f"{repo_id} is gated on the Hub: accept its conditions on its page and log in"
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        return f"the Hub at {api.endpoint} refused {repo_id} (HTTP {status})"
    except Exception as error:  # noqa: BLE001 - the HTTP client's transport errors
        if not is_network_error(error):
            raise
        text = str(error).strip().splitlines()
        return (f"cannot reach the Hub at {api.endpoint} ({type(error).__name__}: {text[0] if text else ''}; no answer "
                f"within {hub_timeout():g} s: {TIMEOUT_ENV} sets the limit); check the network or HF_ENDPOINT, or give "
                "a local folder")
    return None


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
