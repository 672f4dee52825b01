"""Safe by default: an app reachable from the network does not serve without a key.

``check_exposure`` runs where the app starts (the CLI before Ray, each ingress replica before
its engine loads): an address other than loopback with no key that could authenticate anyone is
refused, unless the operator said ``allow_unauthenticated`` (then it is logged as a warning).
While serving, a request needs a key when the app is reachable from the network, or when any key
exists at all (static or named, revoked ones included): on loopback an app without keys is open,
as a development server, until its first key is created.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


class UnauthenticatedExposureError(RuntimeError):
    """Serving on a network address with no way to authenticate a client."""


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def exposed(hosts: Iterable[str | None]) -> list[str]:
    """The addresses in ``hosts`` that are not loopback (None entries: nothing served)."""
    return sorted({h for h in hosts if h is not None and not is_loopback(h)})


def check_exposure(hosts: Iterable[str | None], active_keys: int,
                   allow_unauthenticated: bool) -> str | None:
    """Raise ``UnauthenticatedExposureError`` when refused; the warning to log, or None."""
    public = exposed(hosts)
    if not public or active_keys:
        return None
    where = ", ".join(public)
    if allow_unauthenticated:
        return (f"Serving on {where} WITHOUT AUTHENTICATION (allow_unauthenticated is set): "
                "anyone who can reach the port can use the model.")
    raise UnauthenticatedExposureError(
        f"Refusing to serve on {where} without an API key: anyone who can reach the port could "
        "use the model. Create a key first (python -m serve_app keys create --name NAME, on the "
        "head node), or set api_keys (SERVE_APP_API_KEYS), or bind 127.0.0.1, or set "
        "allow_unauthenticated: true (SERVE_APP_ALLOW_UNAUTHENTICATED=true) if something in "
        "front of the app authenticates.")
