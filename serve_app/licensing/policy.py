"""Licensing policy: whether new requests may be served. Pure: no I/O, the clock is an argument.

``decide``: a valid, unexpired, unrevoked license serves under an unexpired lease, the signed
permission each successful check-in with the license server returns, which lives for the
license's grace period: an honest outage of the server serves for that long after the last
check-in, then new requests get 503 ``license_checkin_overdue``. Without a lease (before the
first check-in, or with the ledger that held it deleted) new requests get 503
``license_pending``. Revoked and expired licenses get 403. Requests already running are never
touched: the decision is consulted only when a request arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

from license_contract import License, iso

# How soon a client may retry while the first check-in is under way (it takes one round trip).
PENDING_RETRY_S = 5.0
OVERDUE_RETRY_S = 60.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int  # HTTP status for refused requests
    code: str
    message: str
    grace_left_s: float
    retry_after_s: float | None = None


def decide(
    lic: License | None,
    *,
    now: float,
    lease_left_s: float | None,
    last_checkin: float | None,
    revoked: bool = False,
    invalid_reason: str | None = None,
    lease_problem: str | None = None,
) -> Decision:
    """Whether new requests may be served.

    ``lease_left_s``: the life left to the latest valid lease (None: there is none); it was
    granted at the last check-in for the grace period. ``lease_problem``: why the latest lease
    the server sent was not taken, if it was not.
    """
    if lic is None:
        return Decision(False, 403, "license_invalid", invalid_reason or "No valid license.", 0.0)
    if revoked:
        return Decision(False, 403, "license_revoked",
                        f"License {lic.license_id} was revoked by the vendor.", 0.0)
    if now >= lic.expires_at:
        return Decision(False, 403, "license_expired",
                        f"License {lic.license_id} expired at {iso(lic.expires_at)}.", 0.0)
    if lease_left_s is None:
        why = (f"the lease it sent was refused: {lease_problem}" if lease_problem else
               "serving starts when it grants a lease")
        return Decision(
            False, 503, "license_pending",
            f"Waiting for a check-in with the license server at {lic.server_url}: {why}.", 0.0,
            PENDING_RETRY_S)
    if lease_left_s <= 0:
        since = f"since {iso(last_checkin)}" if last_checkin is not None else "for too long"
        return Decision(
            False, 503, "license_checkin_overdue",
            f"The license server has not been reached {since}, longer than the grace period "
            f"of {lic.grace_period_s / 3600:g} h, and the lease it granted has run out. Restore "
            f"connectivity to {lic.server_url}; serving resumes at the next successful "
            "check-in.", 0.0, OVERDUE_RETRY_S,
        )
    return Decision(True, 200, "ok", "ok", lease_left_s)
