"""The license server's HTTP API (starlette).

Client side (``Authorization: Bearer <license key>``): ``POST /v1/activate``,
``POST /v1/heartbeat``, ``POST /v1/usage`` (idempotent by ``report_id``), ``GET /v1/status``,
``POST /v1/models/{name}/download`` (a model's manifest and presigned URLs, unmetered and
recorded).
Admin side (``Authorization: Bearer <admin token>``): ``POST /admin/licenses`` (issue),
``GET /admin/licenses``, ``POST /admin/licenses/{id}/revoke``,
``GET /admin/licenses/{id}/clusters``, ``GET /admin/usage`` (JSON or ``?format=csv``;
``from``/``to`` days, ``limit`` with ``cursor`` or ``offset``), ``GET /admin/downloads``.
``GET /v1/public-key`` and ``GET /health`` are open.

``build_app`` makes all of them (``listener="all"``), or the client side only, or the admin
side only (with ``/health``), for a server whose admin API listens on its own address.

Every response carries ``X-Server-Time``. Client routes are rate limited per address and per
license (429 with ``Retry-After``). Failed authentications are counted per address: past the
limit, further failures get 429, while valid credentials from that address still pass (they
are checked first). Bodies are refused above the policy's limit before they are read whole
(413), and when they do not arrive whole within the policy's time (408). A client that goes
away mid-body is logged in one line.
"""

from __future__ import annotations

import csv
import hmac
import io
import logging
from typing import Any, Literal

from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from license_contract import (
    MAX_BODY_BYTES,
    ActivateRequest,
    DownloadRequest,
    HeartbeatRequest,
    License,
    LicenseError,
    UsageReport,
)
from license_server.billing import Refusal
from license_server.crosscheck import USAGE_COLUMNS, csv_row
from license_server.limits import FailedAuth, RateLimiter, retry_after
from license_server.service import LICENSE_ID, LicenseService
from license_server.wire import IssueRequest, ServerTime, error, read_model

__all__ = ["IssueRequest", "LicenseService", "build_app", "to_csv"]

logger = logging.getLogger("license_server")


class _Limited(Exception):
    def __init__(self, message: str, wait_s: float) -> None:
        super().__init__(message)
        self.wait_s = wait_s


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def build_app(service: LicenseService, admin_token: str, *,
              listener: Literal["all", "client", "admin"] = "all") -> ASGIApp:
    policy = service.policy
    by_address = RateLimiter(policy.address_rate_per_s, policy.address_burst, service.now,
                             policy.tracked_keys)
    by_license = RateLimiter(policy.license_rate_per_s, policy.license_burst, service.now,
                             policy.tracked_keys)
    failures = FailedAuth(policy.auth_failures, policy.auth_window_s, service.now,
                          policy.tracked_keys)
    admin_token_bytes = admin_token.encode()

    def address(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def failed(addr: str) -> None:
        """Count a failed authentication, or, past the limit, answer 429 instead of 401."""
        wait = failures.blocked(addr)
        if wait > 0:
            raise _Limited("too many failed authentications from this address", wait)
        failures.failed(addr)

    def admin(request: Request) -> None:
        # Constant time: the comparison's duration says nothing about the token.
        if not hmac.compare_digest(_bearer(request).encode(), admin_token_bytes):
            failed(address(request))
            raise HTTPException(401, "admin token required")

    def client(request: Request) -> tuple[License, str]:
        addr = address(request)
        wait = by_address.take(addr)
        if wait > 0:
            raise _Limited("too many requests from this address", wait)
        key = _bearer(request)
        try:
            if not key:
                raise HTTPException(401, "send the license key as 'Authorization: Bearer <key>'")
            lic, status = service.check(key)
        except (HTTPException, LicenseError):
            failed(addr)
            raise
        wait = by_license.take(lic.license_id)
        if wait > 0:
            raise _Limited("too many requests for this license", wait)
        return lic, status

    async def body(request: Request, model: type) -> Any:
        return await read_model(request, model, MAX_BODY_BYTES, policy.body_timeout_s)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def public_key(request: Request) -> Response:
        return JSONResponse({"public_key": service.public_key})

    async def activate(request: Request) -> Response:
        lic, status = client(request)
        req = await body(request, ActivateRequest)
        service.activate(lic, status, req.cluster_id)
        return JSONResponse({"license_id": lic.license_id, "status": status})

    async def heartbeat(request: Request) -> Response:
        lic, status = client(request)
        answer = service.heartbeat(lic, status, await body(request, HeartbeatRequest))
        return JSONResponse(answer.model_dump(mode="json"))

    async def usage_report(request: Request) -> Response:
        # Accepted whatever the license's status: usage already served is billed.
        lic, status = client(request)
        stored = service.report(lic, await body(request, UsageReport))
        return JSONResponse({"accepted": True, "duplicate": not stored, "status": status})

    async def status(request: Request) -> Response:
        lic, status = client(request)
        return JSONResponse({"license_id": lic.license_id, "status": status})

    async def download(request: Request) -> Response:
        lic, status = client(request)
        req = await body(request, DownloadRequest)
        # Reading the manifest is a bucket round trip: off the event loop.
        grant = await run_in_threadpool(service.download, lic, status,
                                        request.path_params["name"], req.cluster_id)
        return JSONResponse(grant)

    async def issue(request: Request) -> Response:
        admin(request)
        lic, key = service.issue(await body(request, IssueRequest))
        return JSONResponse({"license": lic.model_dump(mode="json"), "key": key}, status_code=201)

    async def list_licenses(request: Request) -> Response:
        admin(request)
        rows = service.store.list_licenses()
        return JSONResponse({"licenses": [
            {**{k: v for k, v in r.items() if k not in ("key_sha256", "payload")},
             "models": list(service.stored_license(r).models),
             "clusters": service.store.clusters_of(r["license_id"])} for r in rows]})

    async def clusters(request: Request) -> Response:
        admin(request)
        return JSONResponse(service.clusters(request.path_params["license_id"]))

    async def download_log(request: Request) -> Response:
        admin(request)
        q = request.query_params
        try:
            limit = int(q.get("limit", "100"))
            before = int(q["before"]) if "before" in q else None
        except ValueError:
            raise Refusal("limit/before: whole numbers") from None
        return JSONResponse(service.downloads(q.get("license_id"), limit=limit, before=before))

    async def revoke(request: Request) -> Response:
        admin(request)
        lid = request.path_params["license_id"]
        if not LICENSE_ID.match(lid) or service.store.get_license(lid) is None:
            raise HTTPException(404, f"no license {lid[:64]}")
        service.store.revoke(lid)
        return JSONResponse({"license_id": lid, "status": "revoked"})

    async def usage(request: Request) -> Response:
        admin(request)
        q = request.query_params
        fmt = q.get("format", "json")
        if fmt not in ("json", "csv"):
            raise Refusal("format: json or csv")
        try:
            limit = int(q["limit"]) if "limit" in q else None
            offset = int(q.get("offset", "0"))
        except ValueError:
            raise Refusal("limit/offset: whole numbers") from None
        page = service.usage(q.get("license_id"), day_from=q.get("from"), day_to=q.get("to"),
                             limit=limit, cursor=q.get("cursor"), offset=offset)
        if fmt == "csv":
            headers = {"X-Next-Cursor": page["next_cursor"]} if page["next_cursor"] else None
            return Response(to_csv(page["usage"]), media_type="text/csv", headers=headers)
        return JSONResponse(page)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "invalid_request")
        return error(exc.status_code, str(exc.detail), code)

    async def on_license(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LicenseError)
        return error(401, str(exc), exc.code)

    async def on_refusal(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refusal)
        # A body still arriving cannot be skipped: the connection ends with the answer.
        return error(exc.status, str(exc), exc.code,
                     headers={"Connection": "close"} if exc.status == 408 else None)

    async def on_limited(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _Limited)
        return error(429, f"{exc}; retry after the Retry-After seconds", "rate_limited",
                     headers={"Retry-After": retry_after(exc.wait_s)})

    async def on_database(request: Request, exc: Exception) -> Response:
        logger.error("license server database unavailable: %r", exc)
        return error(503, "the license server's database is unavailable; retry later",
                     "database_unavailable", headers={"Retry-After": "30"})

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        # Nothing went wrong here: one line, no traceback. The answer reaches no one.
        logger.info("client %s went away before its request to %s was read whole",
                    address(request), request.url.path)
        return error(400, "the client went away mid-request", "client_disconnected")

    async def on_crash(request: Request, exc: Exception) -> Response:
        logger.exception("license server: unhandled error on %s", request.url.path)
        return error(500, "internal error", "internal_error")

    client_routes = [
        Route("/v1/public-key", public_key),
        Route("/v1/activate", activate, methods=["POST"]),
        Route("/v1/heartbeat", heartbeat, methods=["POST"]),
        Route("/v1/usage", usage_report, methods=["POST"]),
        Route("/v1/status", status),
        Route("/v1/models/{name}/download", download, methods=["POST"]),
    ]
    admin_routes = [
        Route("/admin/licenses", issue, methods=["POST"]),
        Route("/admin/licenses", list_licenses, methods=["GET"]),
        Route("/admin/licenses/{license_id}/revoke", revoke, methods=["POST"]),
        Route("/admin/licenses/{license_id}/clusters", clusters, methods=["GET"]),
        Route("/admin/usage", usage),
        Route("/admin/downloads", download_log, methods=["GET"]),
    ]
    app = Starlette(
        routes=[Route("/health", health),
                *(client_routes if listener in ("all", "client") else []),
                *(admin_routes if listener in ("all", "admin") else [])],
        exception_handlers={HTTPException: on_http, LicenseError: on_license,
                            Refusal: on_refusal, _Limited: on_limited,
                            OperationalError: on_database, ClientDisconnect: on_disconnect,
                            Exception: on_crash},
    )
    return ServerTime(app, service.now)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=USAGE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_row(r) for r in rows)
    return buf.getvalue()
