"""Licensing policy: whether new requests may be served. Pure: no I/O, the clock is an argument.

``decide``: a valid, unexpired, unrevoked license serves while the last successful
check-in with the license server is younger than the grace period; after that new requests get
503 ``license_checkin_overdue``. Revoked and expired licenses get 403. Requests already running
are never touched: the decision is consulted only when a request arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

from license_contract import License, iso


@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int  # HTTP status for refused requests
    code: str
    message: str
    grace_left_s: float


def decide(
    lic: License | None,
    *,
    now: float,
    last_checkin: float | None,
    revoked: bool = False,
    invalid_reason: str | None = None,
    started_at: float | None = None,
) -> Decision:
    """Whether new requests may be served.

    Grace counts from the last successful check-in; before the first one, from ``started_at``
    (so a cluster that boots while the license server is down still serves for the grace
    period).
    """
    if lic is None:
        return Decision(False, 403, "license_invalid", invalid_reason or "No valid license.", 0.0)
    if revoked:
        return Decision(False, 403, "license_revoked",
                        f"License {lic.license_id} was revoked by the vendor.", 0.0)
    if now >= lic.expires_at:
        return Decision(False, 403, "license_expired",
                        f"License {lic.license_id} expired at {iso(lic.expires_at)}.", 0.0)
    anchor = last_checkin if last_checkin is not None else started_at
    if anchor is None:
        anchor = now
    grace_left = anchor + lic.grace_period_s - now
    if grace_left <= 0:
        return Decision(
            False, 503, "license_checkin_overdue",
            f"The license server has not been reached since {iso(anchor)}, longer than the "
            f"grace period of {lic.grace_period_s / 3600:g} h. Restore connectivity to "
            f"{lic.server_url}; serving resumes at the next successful check-in.", 0.0,
        )
    return Decision(True, 200, "ok", "ok", grace_left)
