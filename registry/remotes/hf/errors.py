"""huggingface_hub's exceptions as adapterhub's, and the offline switches read now."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from adapterhub.errors import (
    AdapterhubError,
    ConflictError,
    InvalidNameError,
    NotFoundError,
    RemoteAuthError,
    RemoteError,
)
from adapterhub.registry.remotes.hf.layout import DEFAULT_ENDPOINT

def offline() -> bool:
    """``HF_HUB_OFFLINE`` read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str | None:
    """The HF cache location read now, not at huggingface_hub's import time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def is_network_error(e: BaseException) -> bool:
    """No connection, DNS failure or timeout, from whichever HTTP client huggingface_hub uses."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(e, (OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    names = {c.__name__ for c in type(e).__mro__}
    module = type(e).__module__.split(".")[0]
    return module.startswith(("httpx", "requests", "urllib3")) and bool(
        names & {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "ConnectionError", "Timeout", "ReadTimeout"}
    )


def hub_error(e: BaseException, where: str, endpoint: str | None = None) -> AdapterhubError | None:
    """An ``adapterhub.errors`` error for a huggingface_hub exception, or None if it is not one of those."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, HFValidationError):
        return InvalidNameError(f"{where}: {str(e).splitlines()[0]}")
    if isinstance(e, GatedRepoError):
        return RemoteAuthError(f"{where} is gated: the Hub refused access", hint=f"accept its conditions on the Hub, then {login}")
    if isinstance(e, RevisionNotFoundError):
        return NotFoundError(f"{where}: no such revision on the Hub", hint="check the branch, tag or commit after @")
    if isinstance(e, RepositoryNotFoundError):
        return NotFoundError(
            f"{where}: no such repo on the Hub, or it is private", hint=f"check the name; for a private repo, {login}"
        )
    if isinstance(e, LocalEntryNotFoundError):
        if type(e).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x knows partial snapshots
            return NotFoundError(
                f"{where} is only partly in the local Hugging Face cache (an interrupted download?)",
                hint="download it again with the network on (unset HF_HUB_OFFLINE)",
            )
        return NotFoundError(
            f"{where} is not in the local Hugging Face cache, and the Hub was not asked or could not be reached",
            hint="unset HF_HUB_OFFLINE (or check the network) to download it, or `hf download` it first",
        )
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        server = (getattr(e, "server_message", None) or "").strip()
        detail = f": {server}" if server else ""
        if status == 401:
            return RemoteAuthError(f"{where}: the Hub did not accept the credentials (401){detail}", hint=login)
        if status == 403:
            return RemoteAuthError(
                f"{where}: the Hub refused the operation (403){detail}",
                hint="the token needs write access to the organisation (a fine-grained or write token)",
            )
        if status == 404:
            return NotFoundError(f"{where}: not found on the Hub (404){detail}")
        if status == 409:
            return ConflictError(f"{where}: the Hub reports a conflict (409){detail}")
        return RemoteError(f"{where}: the Hub answered {status}{detail}", hint="retry later")
    if is_network_error(e):
        return RemoteError(
            f"cannot reach the Hub at {endpoint or os.environ.get('HF_ENDPOINT') or DEFAULT_ENDPOINT} ({type(e).__name__})",
            hint="check the network; an adapter already in the HF cache pulls offline (HF_HUB_OFFLINE=1)",
        )
    return None


def call(fn: Callable[..., Any], where: str, hub: str | None, /, *args: Any, **kw: Any) -> Any:
    """``fn(*args, **kw)`` with huggingface_hub's exceptions as adapterhub errors (``hub``: the endpoint)."""
    try:
        return fn(*args, **kw)
    except AdapterhubError:
        raise
    except Exception as e:  # mapped below, or re-raised as it was
        mapped = hub_error(e, where, hub)
        if mapped is None:
            raise
        raise mapped from e


def require_online(what: str) -> None:
    if offline():
        raise RemoteError(f"{what} needs the network, and HF_HUB_OFFLINE is set", hint="unset HF_HUB_OFFLINE")
