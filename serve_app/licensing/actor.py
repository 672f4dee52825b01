"""The singleton license actor and the two small clients that talk to it.

One detached, named, restartable actor per cluster (``get_if_exists``, ``max_restarts=-1``,
``num_cpus=0``, on the head node) verifies the key, activates with the vendor's license server,
takes registrations and heartbeats from LLM replicas, accrues instance-seconds into the durable
ledger and reports them exactly once. A restart re-runs ``__init__``: everything that counts is
in the ledger, so nothing is lost.

Each check-in returns a lease (``license_contract.lease``), which the actor verifies (signed by
the license's signer, for this license and cluster, not from the future) and keeps in the
ledger: serving needs one that is unexpired. Its life is measured on the monotonic clock from
receipt, and against the server's time as ``ServerClock.latest`` judges it, which never goes
back. Registrations honour its grants (instances, GPUs).

Every second is delivered under the license it accrued under, with that license's key, which
the ledger keeps; if the server no longer takes an ended license's key, the report goes with the
key in force, naming the license (the server accepts that for a license of the same customer).
A clean stop (``stop``) delivers what is pending and says goodbye to the server.

Delivery never stalls on one report: a report the server refuses for good (a 4xx other than
401, 403 and 429) is quarantined with the server's reason and the ones after it go on; 429 waits
for ``Retry-After``; 401 and 403 are the license policy's business (revoked, expired); 5xx and
network errors back off. Intervals are stamped in the server's time (``server_clock.py``), so a
customer clock that is off or steps never gets a report refused.

An air-gapped license (``License.air_gapped``) never dials the server: each tick appends a beat
entry (what runs now) and the reports sealed since to the hash-chained usage log, a start and a
stop entry bracket each run, and the lease is the one last imported by file (``airgap.py``),
bound to the installation's key. The host's clock is then the only time there is, kept from
going back as the server's is.

Nothing on the request path calls the actor: the ingress polls ``state()`` in the background
(``LicenseGate``) and checks a cached decision; replicas heartbeat from a background task
(``InstanceReporter``).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from license_contract import (
    HeartbeatResponse,
    Lease,
    LeaseError,
    License,
    LicenseError,
    iso,
    verify_lease,
)
from serve_app.licensing import airgap
from serve_app.licensing.config import LicenseConfig
from serve_app.licensing.ledger import Report, UsageLedger
from serve_app.licensing.policy import Decision, decide
from serve_app.licensing.server_clock import HEADER, ServerClock
from serve_app.licensing.vendor import read_license

logger = logging.getLogger("ray.serve")

MAX_BACKOFF_S = 60.0
try:
    VERSION = importlib.metadata.version("serve-app")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
    VERSION = "0+unknown"
# Offsets beyond this between this host's clock and the server's are reported in status.
CLOCK_WARN_S = 60.0
# Statuses that mean "this report will never be accepted as it is"; the rest of 4xx are the key's
# (401, 403) or the rate limiter's (429).
NOT_REFUSALS = (401, 403, 429)
QUARANTINE_SHOWN = 20  # status lists the oldest ones; all are counted
CLOCK_META = "server_clock"
LEASE_META = "lease"  # + ":<license id>"
# An air-gapped installation is warned this long before its lease runs out (log and status).
AIRGAP_WARN_S = 7 * 86400.0
# A clean stop waits this long for the license server at most: an idle stop stays quick, and
# what is not delivered goes out at the next start.
STOP_TIMEOUT_S = 2.0


class RateLimitedError(Exception):
    """The server said 429: try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limited by the license server; retrying in {retry_after:.0f} s")
        self.retry_after = retry_after


def _retry_after(resp: httpx.Response, default: float) -> float:
    try:
        return max(0.0, float(resp.headers.get("retry-after", "")))
    except ValueError:
        return default


def _reason(resp: httpx.Response) -> str:
    """The server's own words for a refusal: its error's message and code."""
    try:
        error = resp.json()["error"]
        text = f"{error.get('message')} ({error.get('code') or error.get('type')})"
    except (ValueError, KeyError, TypeError, AttributeError):
        text = resp.text[:200] or resp.reason_phrase
    return f"HTTP {resp.status_code}: {text}"[:500]


class LicenseActor:
    """Counts instances, keeps the ledger, talks to the license server.

    ``now`` is the host's wall clock and ``monotonic`` its monotonic clock (both injected by
    tests); usage is stamped with the server's time estimated from them. ``boot_id`` names
    the host's boot (monotonic times compare only within one)."""

    def __init__(self, config: LicenseConfig, now: Callable[[], float] = time.time,
                 transport: httpx.AsyncBaseTransport | None = None,
                 autostart: bool = True,
                 monotonic: Callable[[], float] = time.monotonic,
                 boot_id: Callable[[], str | None] | None = None) -> None:
        self._config = config
        self._autostart = autostart  # tests drive _tick() themselves
        self._transport = transport  # the seam tests use to cut or watch the network
        self._boot_id = boot_id or _boot_id
        self._clock = ServerClock(now, monotonic)
        self._ledger = UsageLedger(config.ledger_path, now=self._clock.now).start()
        self._clock_saved = False  # the measured (not guessed) offset is in the ledger
        self._restore_clock()
        self._cluster_id = self._ledger.cluster_id()
        self._license: License | None = None
        self._invalid: str | None = None
        self._development = False
        try:
            self._license, self._development = read_license(config.key.get_secret_value(),
                                                            now=self._clock.now())
            if self._development:
                logger.warning("License %s is a development license: this build does not pin "
                               "the key that signed it, and the vendor's server refuses it.",
                               self._license.license_id)
        except LicenseError as exc:
            self._invalid = str(exc)
            logger.error("License refused, the app will not serve: %s", exc)
        if self._license is not None:  # its reports go out with it, even after a renewal
            self._ledger.remember_key(self._license.license_id, config.key.get_secret_value())
        # Check-in state belongs to one license: a new key starts clean.
        self._meta_suffix = f":{self._license.license_id}" if self._license else ":invalid"
        last = self._ledger.get_meta("last_checkin" + self._meta_suffix)
        self._last_checkin = float(last) if last else None
        self._server_status = self._ledger.get_meta("server_status" + self._meta_suffix) or "unknown"
        self._last_error: str | None = None
        self._lease: Lease | None = None
        self._lease_text: str | None = None
        self._lease_deadline: float | None = None  # monotonic; None after a reboot
        self._lease_problem: str | None = None
        # Air-gapped: no server is ever dialled; leases come by file (``airgap.py``).
        self._air_gapped = bool(self._license is not None and self._license.air_gapped)
        self._installation_key = (airgap.installation_public(config.ledger_path)
                                  if self._air_gapped else None)
        self._refused_import: str | None = None
        self._warned_day: int | None = None
        self._restore_lease()
        if self._air_gapped:
            assert self._license is not None
            logger.info("License %s is air-gapped: this installation never dials the license "
                        "server; usage is logged for bundles carried by hand.",
                        self._license.license_id)
            self._take_imported()
            self._ledger.log_event("start", self._license.license_id, self._cluster_id)
        self._last_seal = self._clock.monotonic()
        self._usage_not_before = 0.0  # monotonic; set by a 429's Retry-After
        self._heard = False  # a response from the server in this process
        self._stopped = False
        self._failures = 0  # check-ins failed in a row
        self._task: asyncio.Task[None] | None = None

    def _ensure_running(self) -> None:
        # Async actors have no running loop in __init__; the first call starts the loop.
        if self._autostart and not self._stopped and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run())

    # -- the lease -------------------------------------------------------------------------------

    def _take_lease(self, text: str) -> None:
        """Keep the lease the server sent, if it holds for this license and cluster now; a bad
        one is logged and the one before stands."""
        lic = self._license
        assert lic is not None
        try:
            lease = verify_lease(text, signer=lic.signer, license_id=lic.license_id,
                                 cluster_id=self._cluster_id, now=self._clock.latest(),
                                 installation_key=self._installation_key)
        except LeaseError as exc:
            self._lease_problem = f"{exc} ({exc.code})"
            logger.error("License: the lease the license server sent is refused: %s",
                         self._lease_problem)
            return
        self._clock.see(lease.issued_at)  # signed: the server's time was at least this
        self._lease, self._lease_text, self._lease_problem = lease, text, None
        self._lease_deadline = self._clock.monotonic() + lease.expires_at - self._clock.latest()
        self._ledger.set_meta(LEASE_META + self._meta_suffix, json.dumps({
            "lease": text, "boot": self._boot_id(), "deadline": self._lease_deadline}))

    def _restore_lease(self) -> None:
        """The lease of the process before, if it still holds: its monotonic deadline only
        within the same boot, else only its expiry against ``ServerClock.latest``."""
        lic = self._license
        raw = self._ledger.get_meta(LEASE_META + self._meta_suffix) if lic else None
        if lic is None or raw is None:
            return
        try:
            data = json.loads(raw)
            text, boot, deadline = str(data["lease"]), data.get("boot"), data.get("deadline")
            lease = verify_lease(text, signer=lic.signer, license_id=lic.license_id,
                                 cluster_id=self._cluster_id, now=self._clock.latest(),
                                 installation_key=self._installation_key)
        except (ValueError, KeyError, TypeError):
            logger.warning("License: ignoring an unreadable saved lease")
            return
        except LeaseError as exc:
            logger.info("License: the saved lease does not hold (%s): serving waits for a "
                        "check-in", exc.code)
            return
        self._clock.see(lease.issued_at)
        self._lease, self._lease_text = lease, text
        if boot and boot == self._boot_id() and isinstance(deadline, (int, float)):
            self._lease_deadline = float(deadline)

    def _take_imported(self) -> None:
        """Air-gapped: take the lease last imported by file (``license import``), once."""
        lic = self._license
        assert lic is not None
        text = airgap.imported_lease_text(self._ledger, lic)
        if text is None or text in (self._lease_text, self._refused_import):
            return
        if self._installation_key is None:  # made by `license request` after this started
            self._installation_key = airgap.installation_public(self._config.ledger_path)
        self._take_lease(text)
        self._refused_import = text if self._lease_text != text else None

    def _warn_expiry(self) -> str | None:
        """Air-gapped: from ``AIRGAP_WARN_S`` before the lease runs out, what the operator is
        told (logged once a day)."""
        left = self._lease_left_s()
        if not self._air_gapped or left is None or not 0 < left <= AIRGAP_WARN_S:
            return None
        assert self._lease is not None
        text = (f"the air-gapped lease expires at {iso(self._lease.expires_at)}, in "
                f"{left / 86400:.1f} days: carry a usage bundle to the vendor and import the "
                "renewal before then")
        day = int(self._clock.latest() // 86400)
        if self._warned_day != day:
            self._warned_day = day
            logger.warning("License: %s", text)
        return text

    def _lease_left_s(self) -> float | None:
        """The life left to the lease, judged both ways; None without one."""
        lease = self._lease
        if lease is None:
            return None
        left = lease.expires_at - self._clock.latest()
        if self._lease_deadline is not None:
            left = min(left, self._lease_deadline - self._clock.monotonic())
        return left

    # -- the server's time ---------------------------------------------------------------------

    def _restore_clock(self) -> None:
        """Continue the time base of the process before (the ledger's times are in it): exactly
        when the monotonic clock still counts from the same boot, else as a guess from the
        wall clock. A new base is saved at once, so a restart in this boot continues it even
        before the server has answered."""
        try:
            data = json.loads(self._ledger.get_meta(CLOCK_META) or "{}")
            floor = float(data.get("floor", 0.0))
            if data.get("boot") and data["boot"] == self._boot_id():
                error = data.get("error_s")
                self._clock.restore(float(data["offset"]),
                                    None if error is None else float(error), floor=floor)
                self._clock_saved = self._clock.synced
                return
            if "wall_offset" in data:
                self._clock.start_from_wall_offset(float(data["wall_offset"]), floor=floor)
        except (ValueError, KeyError, TypeError):
            logger.warning("License: ignoring an unreadable saved clock offset")
        self._save_clock()

    def _clock_meta(self) -> dict[str, str]:
        floor = max(self._clock.floor, self._clock.latest() if self._clock.synced else 0.0)
        return {CLOCK_META: json.dumps({
            "boot": self._boot_id(), "offset": self._clock.offset,
            "error_s": self._clock.error_s(), "wall_offset": self._clock.wall_offset_s(),
            "floor": floor})}

    def _save_clock(self) -> None:
        """Persist the time base and the floor of the server's time (done at every tick, so a
        restart rewinds leases by one heartbeat interval at most)."""
        for key, value in self._clock_meta().items():
            self._ledger.set_meta(key, value)

    async def _post(self, client: httpx.AsyncClient, path: str,
                    body: dict[str, Any]) -> httpx.Response:
        """One request to the server; its answer also measures the server's clock."""
        sent = self._clock.monotonic()
        resp = await client.post(path, json=body)
        received = self._clock.monotonic()
        self._heard = True
        # No await between the clock's jump and the ledger's rebase: a replica's heartbeat
        # handled in between would measure across two clocks.
        delta = self._clock.sample(sent, received, resp.headers.get(HEADER))
        if delta:
            logger.info("License: the server's clock is %.3f s from this host's; usage "
                        "re-stamped by %.3f s", self._clock.wall_offset_s(), delta)
            self._ledger.rebase(delta, meta=self._clock_meta())
            self._clock_saved = True
        elif self._clock.synced and not self._clock_saved:
            for key, value in self._clock_meta().items():
                self._ledger.set_meta(key, value)
            self._clock_saved = True
        return resp

    def _clock_status(self) -> str:
        offset = self._clock.wall_offset_s()
        if self._air_gapped:
            return ("air-gapped: usage is stamped with this host's clock, which never goes back "
                    "for leases; keep it synchronised with a local time source")
        if not self._clock.synced:
            if self._heard:
                return ("The license server does not send its time: usage is stamped with this "
                        "host's clock.")
            return ("The license server has not answered yet: usage is stamped with this "
                    "host's clock until it does, then re-stamped in the server's time.")
        if abs(offset) > CLOCK_WARN_S:
            side = "behind" if offset > 0 else "ahead of"
            return (f"This host's clock is {abs(offset):.0f} s {side} the license server's. "
                    "Usage is stamped in the server's time, so the bill is unaffected; fix this "
                    "host's time synchronisation (NTP).")
        return f"in step with the license server (within {self._clock.error_s():.3f} s)"

    # -- called by replicas ------------------------------------------------------------------

    async def register(self, instance_id: str, model: str, gpus: float) -> dict[str, Any]:
        """Admit a new LLM replica, or refuse it (invalid license, model not entitled, past
        the instances or GPUs the license, its lease or the customer's own cap allow)."""
        self._ensure_running()
        lic = self._license
        if lic is None:
            return {"ok": False, "reason": self._invalid or "no valid license"}
        if not lic.allows_model(model):
            return {"ok": False, "reason": f"license {lic.license_id} does not cover model "
                                           f"{model!r} (covers: {', '.join(lic.models)})"}
        self._expire()  # a lost node's replicas must not hold the places of their replacements
        live = self._ledger.live()
        others = [i for i in live if i["instance_id"] != instance_id]
        reason = None
        if len(others) == len(live):  # a running replica re-registering keeps its place
            reason = self._past_caps(len(others) + 1, sum(i["gpus"] for i in others) + gpus)
        if reason is not None:
            reason += ": not starting another replica; running ones are untouched"
            logger.warning("License: %s", reason)
            return {"ok": False, "reason": reason}
        self._ledger.register(instance_id, model, gpus, lic.license_id)
        return {"ok": True, "heartbeat_interval_s": lic.heartbeat_interval_s,
                "cluster_id": self._cluster_id}

    def _past_caps(self, instances: int, gpus: float) -> str | None:
        """Why ``instances`` replicas holding ``gpus`` GPUs would be too many, or None. The
        lease's grants count once there is one; the license's own caps always."""
        lic = self._license
        assert lic is not None
        lease = self._lease
        instance_caps = [c for c in (lic.max_instances, self._config.max_instances,
                                     lease.instances if lease else None) if c is not None]
        if instance_caps and instances > min(instance_caps):
            return (f"instance cap reached ({instances - 1} running, cap "
                    f"{min(instance_caps)})")
        gpu_caps = [c for c in (lic.max_gpus, lease.gpus if lease else None) if c is not None]
        if gpu_caps and gpus > min(gpu_caps) + 1e-9:
            return f"GPU cap reached ({gpus:g} GPUs with this replica, cap {min(gpu_caps):g})"
        return None

    async def heartbeat(self, instance_id: str, model: str, gpus: float) -> bool:
        self._ensure_running()
        lid = self._license.license_id if self._license else None
        if not self._ledger.heartbeat(instance_id, lid):
            # Unknown here (e.g. the ledger was lost): it is running, so count it again.
            self._ledger.register(instance_id, model, gpus, lid)
        return True

    async def deregister(self, instance_id: str) -> None:
        self._ledger.deregister(instance_id, self._license.license_id if self._license else None)

    # -- called by the ingress and operators ---------------------------------------------------

    async def state(self) -> dict[str, Any]:
        """The decision for new requests, computed now, with the lease it rests on: the
        ingress's gate checks the lease itself and stops at its expiry even if this actor is
        gone by then. ``server_now`` is the server's time the lease is judged against."""
        self._ensure_running()
        d = self._decision()
        lic = self._license
        return {"allowed": d.allowed, "status": d.status, "code": d.code, "message": d.message,
                "retry_after_s": d.retry_after_s,
                "license_id": lic.license_id if lic else None,
                "signer": lic.signer if lic else None, "cluster_id": self._cluster_id,
                "lease": self._lease_text if d.allowed else None,
                "lease_left_s": self._lease_left_s(), "server_now": self._clock.latest(),
                "air_gapped": self._air_gapped}

    async def status(self) -> dict[str, Any]:
        """The customer's view: what the status route and CLI print. Usage is the license's in
        force; seconds older licenses still have to deliver show apart, and quarantined
        reports are every license's."""
        self._ensure_running()
        lic = self._license
        d = self._decision()
        self._expire()
        totals = self._ledger.totals(lic.license_id if lic else None)
        everywhere = self._ledger.totals()
        quarantined = self._ledger.quarantined()
        live = self._ledger.live()
        lease = self._lease
        wait = self._usage_not_before - self._clock.monotonic()
        return {
            "license_id": lic.license_id if lic else None,
            "customer": lic.customer if lic else None,
            "expires_at": lic.expires_at if lic else None,
            "state": d.code,
            "message": d.message,
            "server_status": self._server_status,
            "grace_left_s": round(d.grace_left_s, 1),
            "last_checkin_at": self._last_checkin,
            "instances_now": len(live),
            "gpus_now": sum(i["gpus"] for i in live),
            "lease_id": lease.lease_id if lease else None,
            "lease_expires_at": lease.expires_at if lease else None,
            "lease_instances": lease.instances if lease else None,
            "lease_gpus": lease.gpus if lease else None,
            "instance_seconds_total": round(totals["instance_seconds"], 3),
            "seconds_pending_delivery": round(totals["pending_seconds"], 3),
            "older_licenses_pending_seconds": round(totals["other_pending_seconds"], 3),
            "last_report_at": totals["last_report_at"],
            "reports_rate_limited_for_s": round(wait, 1) if wait > 0 else 0.0,
            "quarantined_reports": everywhere["quarantined_reports"],
            "quarantined_seconds": round(everywhere["quarantined_seconds"], 3),
            "quarantined": quarantined[:QUARANTINE_SHOWN],
            "server_clock_offset_s": round(self._clock.wall_offset_s(), 3),
            "clock": self._clock_status(),
            "last_error": self._last_error,
            "cluster_id": self._cluster_id,
            "development": self._development,
            "air_gapped": self._air_gapped,
            **(self._air_gapped_status() if self._air_gapped else {}),
        }

    def _air_gapped_status(self) -> dict[str, Any]:
        lic = self._license
        assert lic is not None
        left = airgap.waiting(self._ledger, lic, self._clock.latest())
        return {"mode": "air-gapped: this installation never dials the license server; leases "
                        "and usage travel by file",
                "installation_key": self._installation_key,
                "usage_entries_waiting": left["entries"],
                "usage_days_waiting": left["days"],
                "lease_warning": self._warn_expiry()}

    async def flush(self) -> dict[str, Any]:
        """Seal and deliver now (tests and shutdown); returns the ledger totals for the license
        in force. A heartbeat handled while a report is on the wire accrues new time, so deliver
        until none is pending (a few rounds at most: heartbeats are seconds apart, reports
        milliseconds)."""
        lid = self._license.license_id if self._license else None
        if lid is not None and not (self._heard or self._clock.synced):
            await self._tick()  # the server's time first: a sealed report's stamps cannot move
        totals = self._ledger.totals(lid)
        for _ in range(5):
            await self._report(force=True)
            totals = self._ledger.totals(lid)
            if not (totals["pending_seconds"] or totals["other_pending_seconds"]):
                break
        return totals

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, Any]:
        """The app stops cleanly and its replicas are gone: count each one still live as
        stopped now, deliver what is pending and send a last heartbeat (``stopping``, no
        instances), within ``timeout_s``; what the server did not get by then goes out at the
        next start. Returns the ledger totals for the license in force."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
        lid = self._license.license_id if self._license else None
        for instance in self._ledger.live():
            self._ledger.deregister(instance["instance_id"], lid)
        if self._air_gapped:
            assert self._license is not None
            await self._report(force=True)
            self._ledger.log_event("stop", self._license.license_id, self._cluster_id)
        elif self._license is not None:
            try:
                await asyncio.wait_for(self._goodbye(), timeout_s)
            except Exception as exc:  # unreachable or slow: the ledger keeps it all
                logger.warning("License: usage not delivered on stop (%r); it is kept and "
                               "goes out at the next start", exc)
        self._save_clock()
        return self._ledger.totals(lid)

    async def _goodbye(self) -> None:
        await self.flush()
        async with self._client() as client:
            body = {**self._heartbeat_body([]), "stopping": True}
            _check(await self._post(client, "/v1/heartbeat", body))

    async def resend(self, report_id: str) -> dict[str, Any] | None:
        """Offer a quarantined report to the server again (same id and content, so a report it
        already holds is not counted twice); returns the report's state after the attempt."""
        if self._ledger.requeue(report_id):
            await self._report()
        return self._ledger.report_state(report_id)

    def _decision(self) -> Decision:
        return decide(self._license, now=self._clock.latest(), lease_left_s=self._lease_left_s(),
                      last_checkin=self._last_checkin,
                      revoked=self._server_status == "revoked", invalid_reason=self._invalid,
                      lease_problem=self._lease_problem)

    def _expire(self) -> None:
        """Stop counting replicas silent for two heartbeat intervals (their node is gone, or
        they are): done wherever the count is read, not only on the loop's ticks, so a lost
        node's replicas leave the count within two heartbeats of their last one."""
        if self._license is not None:
            self._ledger.expire(2 * self._license.heartbeat_interval_s)

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopped:
            await asyncio.sleep(await self._step())

    async def _step(self) -> float:
        """One turn of the loop: check in and report; returns how long to wait for the next."""
        lic = self._license
        interval = lic.heartbeat_interval_s if lic else 30.0
        try:
            await self._tick()
        except RateLimitedError as exc:
            self._last_error = str(exc)
            logger.warning("License server: %s", exc)
            return max(exc.retry_after, 1.0)
        except Exception as exc:  # the server is down or answers badly: back off, go on
            self._failures += 1
            refused = isinstance(exc, CheckInRefusedError)
            self._last_error = (str(exc) if refused else repr(exc))[:500]
            delay = min(interval * 2 ** min(self._failures, 6), max(MAX_BACKOFF_S, interval))
            logger.warning("License server %s (%s); retrying in %.0f s",
                           "refused the check-in" if refused else "unreachable",
                           self._last_error, delay)
            return delay
        self._failures = 0
        self._last_error = None if self._lease_problem is None else (
            f"lease refused: {self._lease_problem}")
        return interval

    def _client(self, key: str | None = None) -> httpx.AsyncClient:
        """A client of the license server, with the key in force unless told another."""
        assert self._license is not None
        key = key or self._config.key.get_secret_value()
        return httpx.AsyncClient(
            base_url=self._license.server_url, transport=self._transport, timeout=10.0,
            headers={"Authorization": f"Bearer {key}"})

    async def _tick(self) -> None:
        lic = self._license
        if lic is None:
            return
        if self._air_gapped:
            return await self._offline_tick()
        self._save_clock()  # before the network can fail: the floor of the server's time
        self._expire()
        live = self._ledger.live()
        async with self._client() as client:
            if self._ledger.get_meta("activated" + self._meta_suffix) is None:
                resp = await self._post(client, "/v1/activate", {"cluster_id": self._cluster_id})
                _check(resp)
                self._ledger.set_meta("activated" + self._meta_suffix, str(self._clock.now()))
            resp = await self._post(client, "/v1/heartbeat", self._heartbeat_body(live))
            _check(resp)
            answer = HeartbeatResponse.model_validate_json(resp.content)
            self._checked_in(answer.status, answer.lease)
        await self._report()

    async def _offline_tick(self) -> None:
        """Air-gapped: what a check-in does, written to the usage log instead of sent: a beat
        entry (what runs now) and the reports sealed at it; then the lease imported last and
        the warning before it runs out."""
        lic = self._license
        assert lic is not None
        # The host's clock is the only time there is: it may go forward, never back.
        self._clock.see(self._clock.now())
        self._save_clock()
        self._expire()
        self._take_imported()
        live = self._ledger.live()
        self._ledger.log_event("beat", lic.license_id, self._cluster_id, instances=len(live),
                               gpus=sum(i["gpus"] for i in live))
        # Sealed at every beat: a bundle's reports then cover its beats up to its last one.
        await self._report(force=True)
        self._warn_expiry()

    def _heartbeat_body(self, live: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {"cluster_id": self._cluster_id, "instances": len(live),
                                "gpus": sum(i["gpus"] for i in live),
                                "development": self._development, "version": VERSION}
        totals = self._ledger.totals()
        if totals["quarantined_reports"]:  # the vendor sees refused usage too
            body["quarantined_reports"] = totals["quarantined_reports"]
            body["quarantined_seconds"] = round(totals["quarantined_seconds"], 3)
        return body

    def _checked_in(self, server_status: str, lease: str | None) -> None:
        now = self._clock.now()
        self._last_checkin = now
        self._server_status = server_status
        self._ledger.set_meta("last_checkin" + self._meta_suffix, str(now))
        self._ledger.set_meta("server_status" + self._meta_suffix, server_status)
        if lease is not None:
            self._take_lease(lease)

    async def _report(self, force: bool = False) -> None:
        lic = self._license
        if lic is None:
            return
        # Seal only once the server has answered in this process: until then the intervals'
        # stamps may still move to the server's time, and sealed ones cannot.
        if (self._heard or self._clock.synced or self._air_gapped) and (
                force or self._clock.monotonic() - self._last_seal >= self._config.report_interval_s):
            self._ledger.seal_reports(lic.license_id)
            self._last_seal = self._clock.monotonic()
        if self._clock.monotonic() < self._usage_not_before:
            return
        pending = self._ledger.pending_reports()
        if not pending:
            return
        if self._air_gapped:  # nothing is sent: the usage log carries them
            for report in pending:
                self._ledger.keep_locally(report.report_id, self._cluster_id)
            return
        clients: dict[str, httpx.AsyncClient] = {}
        try:
            for report in pending:
                if not await self._deliver(report, clients):
                    return
        finally:
            for client in clients.values():
                await client.aclose()

    async def _deliver(self, report: Report, clients: dict[str, httpx.AsyncClient]) -> bool:
        """Offer one report under the license it accrued under; False when the server asks
        to wait (429). An older license's report goes with that license's key, and if the
        server no longer takes that key, with the key in force, naming the license."""
        lic = self._license
        assert lic is not None
        own = report.license_id or lic.license_id
        current = self._config.key.get_secret_value()
        key = current if own == lic.license_id else self._ledger.key_of(own) or current

        async def post(key: str) -> httpx.Response:
            if key not in clients:
                clients[key] = self._client(key)
            # Only ids, timestamps, durations and GPU counts leave the cluster.
            body: dict[str, Any] = {"cluster_id": self._cluster_id,
                                    "report_id": report.report_id, "intervals": report.intervals}
            if own != lic.license_id and key == current:
                body["license_id"] = own
            return await self._post(clients[key], "/v1/usage", body)

        resp = await post(key)
        if resp.status_code in (401, 403) and key != current:
            logger.info("License: the server no longer takes the key of license %s (%s); "
                        "delivering its report %s with the key of %s", own, _reason(resp),
                        report.report_id, lic.license_id)
            resp = await post(current)
        code = resp.status_code
        if resp.is_success:
            self._ledger.mark_delivered(report.report_id, own)
        elif code == 429:
            wait = _retry_after(resp, lic.heartbeat_interval_s)
            self._usage_not_before = self._clock.monotonic() + wait
            self._last_error = f"usage reports rate limited; next in {wait:.0f} s"
            logger.warning("License server: %s", self._last_error)
            return False
        elif 400 <= code < 500 and code not in NOT_REFUSALS:
            reason = _reason(resp)
            self._ledger.quarantine(report.report_id, reason)
            logger.error("License server refused usage report %s (%.1f s): %s. It is "
                         "quarantined; later reports go on. Re-send it with `python -m "
                         "serve_app usage-log resend %s` once the cause is fixed.",
                         report.report_id, report.seconds, reason, report.report_id)
        elif own != lic.license_id and code in (401, 403):
            # Another license's trouble must not hold up this one's reports: it is retried.
            self._last_error = f"report {report.report_id} of license {own}: {_reason(resp)}"
            logger.warning("License server: %s", self._last_error)
        else:  # the key's problem (401/403) or the server's (5xx): back off, retry
            resp.raise_for_status()
        return True


class CheckInRefusedError(Exception):
    """The server answered a check-in with an error; the message is its own reason."""


def _check(resp: httpx.Response) -> None:
    if resp.status_code == 429:
        raise RateLimitedError(_retry_after(resp, MAX_BACKOFF_S))
    if resp.is_error:
        raise CheckInRefusedError(f"{resp.request.url.path}: {_reason(resp)}")


def _boot_id() -> str | None:
    """This boot's id: monotonic time is comparable across processes of one boot only."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None
