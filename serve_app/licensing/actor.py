"""The singleton license actor and the two small clients that talk to it.

One detached, named, restartable actor per cluster (``get_if_exists``, ``max_restarts=-1``,
``num_cpus=0``, on the head node) verifies the key, activates with the vendor's license server,
takes registrations and heartbeats from LLM replicas, accrues instance-seconds into the durable
ledger and reports them exactly once. A restart re-runs ``__init__``: everything that counts is
in the ledger, so nothing is lost.

Delivery never stalls on one report: a report the server refuses for good (a 4xx other than
401, 403 and 429) is quarantined with the server's reason and the ones after it go on; 429 waits
for ``Retry-After``; 401 and 403 are the license policy's business (revoked, expired); 5xx and
network errors back off. Intervals are stamped in the server's time (``server_clock.py``), so a
customer clock that is off or steps never gets a report refused.

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

from license_contract import HeartbeatResponse, License, LicenseError
from serve_app.licensing.config import LicenseConfig
from serve_app.licensing.ledger import UsageLedger
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
    tests); usage is stamped with the server's time estimated from them."""

    def __init__(self, config: LicenseConfig, now: Callable[[], float] = time.time,
                 transport: httpx.AsyncBaseTransport | None = None,
                 autostart: bool = True,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._autostart = autostart  # tests drive _tick() themselves
        self._transport = transport  # the seam tests use to cut or watch the network
        self._clock = ServerClock(now, monotonic)
        self._ledger = UsageLedger(config.ledger_path, now=self._clock.now).start()
        self._clock_saved = False  # the measured (not guessed) offset is in the ledger
        self._restore_clock()
        self._cluster_id = self._ledger.cluster_id()
        started = self._ledger.get_meta("first_started_at")
        if started is None:
            started = str(self._clock.now())
            self._ledger.set_meta("first_started_at", started)
        self._started_at = float(started)
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
        # Check-in state belongs to one license: a new key starts clean.
        self._meta_suffix = f":{self._license.license_id}" if self._license else ":invalid"
        last = self._ledger.get_meta("last_checkin" + self._meta_suffix)
        self._last_checkin = float(last) if last else None
        self._server_status = self._ledger.get_meta("server_status" + self._meta_suffix) or "unknown"
        self._last_error: str | None = None
        self._last_seal = self._clock.monotonic()
        self._usage_not_before = 0.0  # monotonic; set by a 429's Retry-After
        self._heard = False  # a response from the server in this process
        self._task: asyncio.Task[None] | None = None

    def _ensure_running(self) -> None:
        # Async actors have no running loop in __init__; the first call starts the loop.
        if self._autostart and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run())

    # -- the server's time ---------------------------------------------------------------------

    def _restore_clock(self) -> None:
        """Continue the time base of the process before (the ledger's times are in it): exactly
        when the monotonic clock still counts from the same boot, else as a guess from the
        wall clock. A new base is saved at once, so a restart in this boot continues it even
        before the server has answered."""
        try:
            data = json.loads(self._ledger.get_meta(CLOCK_META) or "{}")
            if data.get("boot") and data["boot"] == _boot_id():
                error = data.get("error_s")
                self._clock.restore(float(data["offset"]),
                                    None if error is None else float(error))
                self._clock_saved = self._clock.synced
                return
            if "wall_offset" in data:
                self._clock.start_from_wall_offset(float(data["wall_offset"]))
        except (ValueError, KeyError, TypeError):
            logger.warning("License: ignoring an unreadable saved clock offset")
        for key, value in self._clock_meta().items():
            self._ledger.set_meta(key, value)

    def _clock_meta(self) -> dict[str, str]:
        return {CLOCK_META: json.dumps({
            "boot": _boot_id(), "offset": self._clock.offset,
            "error_s": self._clock.error_s(), "wall_offset": self._clock.wall_offset_s()})}

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
        """Admit a new LLM replica, or refuse it (invalid license, model not entitled, cap)."""
        self._ensure_running()
        lic = self._license
        if lic is None:
            return {"ok": False, "reason": self._invalid or "no valid license"}
        if not lic.allows_model(model):
            return {"ok": False, "reason": f"license {lic.license_id} does not cover model "
                                           f"{model!r} (covers: {', '.join(lic.models)})"}
        self._expire()  # a lost node's replicas must not hold the places of their replacements
        live = {i["instance_id"] for i in self._ledger.live()}
        caps = [c for c in (lic.max_instances, self._config.max_instances) if c]
        if instance_id not in live and caps and len(live) >= min(caps):
            reason = (f"instance cap reached ({len(live)} running, cap {min(caps)}): "
                      "not starting another replica; running ones are untouched")
            logger.warning("License: %s", reason)
            return {"ok": False, "reason": reason}
        self._ledger.register(instance_id, model, gpus)
        return {"ok": True, "heartbeat_interval_s": lic.heartbeat_interval_s}

    async def heartbeat(self, instance_id: str, model: str, gpus: float) -> bool:
        self._ensure_running()
        if not self._ledger.heartbeat(instance_id):
            # Unknown here (e.g. the ledger was lost): it is running, so count it again.
            self._ledger.register(instance_id, model, gpus)
        return True

    async def deregister(self, instance_id: str) -> None:
        self._ledger.deregister(instance_id)

    # -- called by the ingress and operators ---------------------------------------------------

    async def state(self) -> dict[str, Any]:
        """The decision for new requests, computed now."""
        self._ensure_running()
        d = self._decision()
        return {"allowed": d.allowed, "status": d.status, "code": d.code, "message": d.message}

    async def status(self) -> dict[str, Any]:
        """The customer's view: what the status route and CLI print. Usage is the license's in
        force (seconds not yet delivered count for it: they will be delivered with its key)."""
        self._ensure_running()
        lic = self._license
        d = self._decision()
        self._expire()
        totals = self._ledger.totals(lic.license_id if lic else None)
        quarantined = self._ledger.quarantined()
        live = self._ledger.live()
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
            "instance_seconds_total": round(totals["instance_seconds"], 3),
            "seconds_pending_delivery": round(totals["pending_seconds"], 3),
            "last_report_at": totals["last_report_at"],
            "reports_rate_limited_for_s": round(wait, 1) if wait > 0 else 0.0,
            "quarantined_reports": totals["quarantined_reports"],
            "quarantined_seconds": round(totals["quarantined_seconds"], 3),
            "quarantined": quarantined[:QUARANTINE_SHOWN],
            "server_clock_offset_s": round(self._clock.wall_offset_s(), 3),
            "clock": self._clock_status(),
            "last_error": self._last_error,
            "cluster_id": self._cluster_id,
            "development": self._development,
        }

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
            if not totals.get("pending_seconds"):
                break
        return totals

    async def resend(self, report_id: str) -> dict[str, Any] | None:
        """Offer a quarantined report to the server again (same id and content, so a report it
        already holds is not counted twice); returns the report's state after the attempt."""
        if self._ledger.requeue(report_id):
            await self._report()
        return self._ledger.report_state(report_id)

    def _decision(self) -> Decision:
        return decide(self._license, now=self._clock.now(), last_checkin=self._last_checkin,
                      revoked=self._server_status == "revoked", invalid_reason=self._invalid,
                      started_at=self._started_at)

    def _expire(self) -> None:
        """Stop counting replicas silent for two heartbeat intervals (their node is gone, or
        they are): done wherever the count is read, not only on the loop's ticks, so a lost
        node's replicas leave the count within two heartbeats of their last one."""
        if self._license is not None:
            self._ledger.expire(2 * self._license.heartbeat_interval_s)

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            lic = self._license
            interval = lic.heartbeat_interval_s if lic else 30.0
            try:
                await self._tick()
                failures = 0
                self._last_error = None
                delay = interval
            except RateLimitedError as exc:
                self._last_error = str(exc)
                delay = max(exc.retry_after, 1.0)
                logger.warning("License server: %s", exc)
            except Exception as exc:  # the server is down or answers badly: back off, go on
                failures += 1
                self._last_error = repr(exc)[:300]
                delay = min(interval * 2 ** min(failures, 6), max(MAX_BACKOFF_S, interval))
                logger.warning("License server unreachable (%s); retrying in %.0f s",
                               self._last_error, delay)
            await asyncio.sleep(delay)

    def _client(self) -> httpx.AsyncClient:
        assert self._license is not None
        return httpx.AsyncClient(
            base_url=self._license.server_url, transport=self._transport, timeout=10.0,
            headers={"Authorization": f"Bearer {self._config.key.get_secret_value()}"})

    async def _tick(self) -> None:
        lic = self._license
        if lic is None:
            return
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
            self._ledger.set_meta("lease" + self._meta_suffix, lease)

    async def _report(self, force: bool = False) -> None:
        lic = self._license
        if lic is None:
            return
        # Seal only once the server has answered in this process: until then the intervals'
        # stamps may still move to the server's time, and sealed ones cannot.
        if (self._heard or self._clock.synced) and (
                force or self._clock.monotonic() - self._last_seal >= self._config.report_interval_s):
            self._ledger.seal_reports(lic.license_id)
            self._last_seal = self._clock.monotonic()
        if self._clock.monotonic() < self._usage_not_before:
            return
        pending = self._ledger.pending_reports()
        if not pending:
            return
        async with self._client() as client:
            for report in pending:
                # Only ids, timestamps, durations and GPU counts leave the cluster.
                resp = await self._post(client, "/v1/usage", {
                    "cluster_id": self._cluster_id, "report_id": report.report_id,
                    "intervals": report.intervals})
                code = resp.status_code
                if resp.is_success:
                    self._ledger.mark_delivered(report.report_id, lic.license_id)
                elif code == 429:
                    wait = _retry_after(resp, lic.heartbeat_interval_s)
                    self._usage_not_before = self._clock.monotonic() + wait
                    self._last_error = f"usage reports rate limited; next in {wait:.0f} s"
                    logger.warning("License server: %s", self._last_error)
                    return
                elif 400 <= code < 500 and code not in NOT_REFUSALS:
                    reason = _reason(resp)
                    self._ledger.quarantine(report.report_id, reason)
                    logger.error("License server refused usage report %s (%.1f s): %s. It is "
                                 "quarantined; later reports go on. Re-send it with `python -m "
                                 "serve_app usage-log resend %s` once the cause is fixed.",
                                 report.report_id, report.seconds, reason, report.report_id)
                else:  # the key's problem (401/403) or the server's (5xx): back off, retry
                    resp.raise_for_status()


def _check(resp: httpx.Response) -> None:
    if resp.status_code == 429:
        raise RateLimitedError(_retry_after(resp, MAX_BACKOFF_S))
    resp.raise_for_status()


def _boot_id() -> str | None:
    """This boot's id: monotonic time is comparable across processes of one boot only."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None
