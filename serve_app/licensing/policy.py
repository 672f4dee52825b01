"""Licensing policy: whether new requests may be served. Pure: no I/O, the clock is an argument.

``decide``: a valid, unexpired, unrevoked license serves under an unexpired lease, the signed
permission each successful check-in with the license server returns, which lives for the
license's grace period: an honest outage of the server serves for that long after the last
check-in, then new requests get 503 ``license_checkin_overdue``. Without a lease (before the
first check-in, or with the ledger that held it deleted) new requests get 503
``license_pending``. Revoked and expired licenses get 403. An air-gapped license
(``License.air_gapped``) serves under a lease imported by file: without one 503
``license_airgap_no_lease``, after it 503 ``license_airgap_lease_expired``, each saying which
commands bring the next. Requests already running are never touched: the decision is consulted
only when a request arrives.
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
    if lic.air_gapped:
        return _air_gapped(lic, lease_left_s)
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


# What an operator of an air-gapped installation does about a missing or lapsed lease.
AIRGAP_ACTIVATE = ("run `python -m serve_app license request > request.json`, have the vendor "
                   "answer it (`python -m license_server activate request.json`), then `python "
                   "-m serve_app license import lease.json`")
AIRGAP_RENEW = ("export the usage (`python -m serve_app usage-log export > bundle.json`), carry "
                "it to the vendor (`python -m license_server import-usage bundle.json`), and "
                "import the renewal (`python -m serve_app license import renewal.json`); "
                "serving resumes at once")


def _air_gapped(lic: License, lease_left_s: float | None) -> Decision:
    """An air-gapped license never waits for a check-in: it serves under a lease imported by
    file, and says how to get the next one."""
    if lease_left_s is None:
        return Decision(False, 503, "license_airgap_no_lease",
                        f"Air-gapped license {lic.license_id} has no lease imported: "
                        f"{AIRGAP_ACTIVATE}.", 0.0, OVERDUE_RETRY_S)
    if lease_left_s <= 0:
        return Decision(False, 503, "license_airgap_lease_expired",
                        f"The lease of air-gapped license {lic.license_id} has run out: "
                        f"{AIRGAP_RENEW}.", 0.0, OVERDUE_RETRY_S)
    return Decision(True, 200, "ok", "ok", lease_left_s)
