"""The license server's HTTP API (starlette).

Client side (``Authorization: Bearer <license key>``): ``POST /v1/activate``,
``POST /v1/heartbeat``, ``POST /v1/usage`` (idempotent by ``report_id``), ``GET /v1/status``,
``POST /v1/models/{name}/download`` (a model's manifest and presigned URLs, unmetered).
Admin side (``Authorization: Bearer <admin token>``): ``POST /admin/licenses`` (issue),
``GET /admin/licenses``, ``POST /admin/licenses/{id}/revoke``, ``GET /admin/usage`` (JSON or
``?format=csv``; ``from``/``to`` days, ``limit`` with ``cursor`` or ``offset``).
``GET /v1/public-key`` and ``GET /health`` are open.

Every response carries ``X-Server-Time``. Client routes are rate limited per address and per
license, and failed authentications per address (429 with ``Retry-After``); bodies are refused
above the policy's limit before they are read whole (413).
"""

from __future__ import annotations

import csv
import hmac
import io
import logging
from typing import Any

from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from license_contract import (
    MAX_BODY_BYTES,
    ActivateRequest,
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


def build_app(service: LicenseService, admin_token: str) -> ASGIApp:
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

    def not_blocked(request: Request) -> str:
        addr = address(request)
        wait = failures.blocked(addr)
        if wait > 0:
            raise _Limited("too many failed authentications from this address", wait)
        return addr

    def admin(request: Request) -> None:
        addr = not_blocked(request)
        # Constant time: the comparison's duration says nothing about the token.
        if not hmac.compare_digest(_bearer(request).encode(), admin_token_bytes):
            failures.failed(addr)
            raise HTTPException(401, "admin token required")

    def client(request: Request) -> tuple[License, str]:
        addr = not_blocked(request)
        wait = by_address.take(addr)
        if wait > 0:
            raise _Limited("too many requests from this address", wait)
        key = _bearer(request)
        try:
            if not key:
                raise HTTPException(401, "send the license key as 'Authorization: Bearer <key>'")
            lic, status = service.check(key)
        except (HTTPException, LicenseError):
            failures.failed(addr)
            raise
        wait = by_license.take(lic.license_id)
        if wait > 0:
            raise _Limited("too many requests for this license", wait)
        return lic, status

    async def body(request: Request, model: type) -> Any:
        return await read_model(request, model, MAX_BODY_BYTES)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def public_key(request: Request) -> Response:
        return JSONResponse({"public_key": service.public_key})

    async def activate(request: Request) -> Response:
        lic, status = client(request)
        req = await body(request, ActivateRequest)
        service.store.activate(lic.license_id, req.cluster_id)
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
        # Reading the manifest is a bucket round trip: off the event loop.
        grant = await run_in_threadpool(service.download, lic, status,
                                        request.path_params["name"])
        return JSONResponse(grant)

    async def issue(request: Request) -> Response:
        admin(request)
        lic, key = service.issue(await body(request, IssueRequest))
        return JSONResponse({"license": lic.model_dump(mode="json"), "key": key}, status_code=201)

    async def list_licenses(request: Request) -> Response:
        admin(request)
        rows = service.store.list_licenses()
        return JSONResponse({"licenses": [
            {**{k: v for k, v in r.items() if k != "key"},
             "clusters": service.store.clusters_of(r["license_id"])} for r in rows]})

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
        return error(exc.status, str(exc), exc.code)

    async def on_limited(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _Limited)
        return error(429, f"{exc}; retry after the Retry-After seconds", "rate_limited",
                     headers={"Retry-After": retry_after(exc.wait_s)})

    async def on_database(request: Request, exc: Exception) -> Response:
        logger.error("license server database unavailable: %r", exc)
        return error(503, "the license server's database is unavailable; retry later",
                     "database_unavailable", headers={"Retry-After": "30"})

    async def on_crash(request: Request, exc: Exception) -> Response:
        logger.exception("license server: unhandled error on %s", request.url.path)
        return error(500, "internal error", "internal_error")

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/public-key", public_key),
            Route("/v1/activate", activate, methods=["POST"]),
            Route("/v1/heartbeat", heartbeat, methods=["POST"]),
            Route("/v1/usage", usage_report, methods=["POST"]),
            Route("/v1/status", status),
            Route("/v1/models/{name}/download", download, methods=["POST"]),
            Route("/admin/licenses", issue, methods=["POST"]),
            Route("/admin/licenses", list_licenses, methods=["GET"]),
            Route("/admin/licenses/{license_id}/revoke", revoke, methods=["POST"]),
            Route("/admin/usage", usage),
        ],
        exception_handlers={HTTPException: on_http, LicenseError: on_license,
                            Refusal: on_refusal, _Limited: on_limited,
                            OperationalError: on_database, Exception: on_crash},
    )
    return ServerTime(app, service.now)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=USAGE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_row(r) for r in rows)
    return buf.getvalue()
