"""The license server's HTTP API (starlette) and the service both it and the CLI use.

Client side (``Authorization: Bearer <license key>``): ``POST /v1/activate``,
``POST /v1/heartbeat``, ``POST /v1/usage`` (idempotent by ``report_id``), ``GET /v1/status``.
Admin side (``Authorization: Bearer <admin token>``): ``POST /admin/licenses`` (issue),
``GET /admin/licenses``, ``POST /admin/licenses/{id}/revoke``, ``GET /admin/usage`` (JSON or
``?format=csv``). ``GET /v1/public-key`` and ``GET /health`` are open.
"""

from __future__ import annotations

import csv
import hmac
import io
import time
import uuid
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from infra.license_server.db import Interval, LicenseStore
from serve_app.errors import error_body
from serve_app.licensing import License, LicenseError, public_key_text, sign_license, verify_key


class IssueRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer: str = Field(min_length=1, max_length=256)
    days: float = Field(30, gt=0, le=3660)
    models: tuple[str, ...] = ("*",)
    max_instances: int | None = Field(None, ge=1)
    heartbeat_interval_s: float = Field(30.0, gt=0)
    grace_period_s: float = Field(72 * 3600.0, ge=0)


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cluster_id: str = Field(min_length=1, max_length=128)


class HeartbeatRequest(ActivateRequest):
    instances: int = Field(ge=0)
    quarantined_reports: int = Field(0, ge=0)
    quarantined_seconds: float = Field(0.0, ge=0, allow_inf_nan=False)


class IntervalModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instance_id: str = Field(min_length=1, max_length=128)
    start: float
    end: float
    gpus: float = Field(0.0, ge=0)


class UsageReport(ActivateRequest):
    report_id: str = Field(min_length=8, max_length=64)
    intervals: list[IntervalModel] = Field(max_length=100_000)


class LicenseService:
    """Issue, check and account licenses; shared by the HTTP routes and the CLI."""

    def __init__(self, store: LicenseStore, signing_key: Ed25519PrivateKey, public_url: str,
                 now: Callable[[], float] = time.time) -> None:
        self.store = store
        self.signing_key = signing_key
        self.public_url = public_url
        self.now = now

    @property
    def public_key(self) -> str:
        return public_key_text(self.signing_key.public_key())

    def issue(self, req: IssueRequest) -> tuple[License, str]:
        now = self.now()
        lic = License(
            license_id=f"lic_{uuid.uuid4().hex[:20]}", customer=req.customer, models=req.models,
            issued_at=now, expires_at=now + req.days * 86400, max_instances=req.max_instances,
            heartbeat_interval_s=req.heartbeat_interval_s, grace_period_s=req.grace_period_s,
            server_url=self.public_url,
        )
        key = sign_license(lic, self.signing_key)
        self.store.add_license(license_id=lic.license_id, customer=lic.customer, key=key,
                               issued_at=lic.issued_at, expires_at=lic.expires_at,
                               max_instances=lic.max_instances)
        return lic, key

    def check(self, key: str) -> tuple[License, str]:
        """(license, status) for a presented key; status is active, revoked or expired."""
        lic = verify_key(key, self.signing_key.public_key(), check_expiry=False)
        if self.now() >= lic.expires_at:
            return lic, "expired"
        row = self.store.get_license(lic.license_id)
        if row is None:
            raise LicenseError("This license is unknown to the server.", "license_unknown")
        return lic, "revoked" if row["revoked_at"] is not None else "active"

    def usage(self, license_id: str | None) -> list[dict[str, Any]]:
        ids = [license_id] if license_id else [r["license_id"] for r in self.store.list_licenses()]
        rows: list[dict[str, Any]] = []
        for lid in ids:
            row = self.store.get_license(lid)
            if row is None:
                continue
            lic = verify_key(row["key"], self.signing_key.public_key(), check_expiry=False)
            # An instance counts as active while its cluster's heartbeats are fresh.
            rows += self.store.usage_per_day(lid, fresh_s=3 * lic.heartbeat_interval_s)
        return rows


def _error(status: int, message: str, code: str) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    return JSONResponse(error_body(message, kind, code=code), status_code=status)


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    if len(raw) > 64 << 20:
        raise HTTPException(413, "body too large")
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise _Invalid(f"{loc}: {first['msg']}" if loc else first["msg"]) from None


class _Invalid(Exception):
    pass


def build_app(service: LicenseService, admin_token: str) -> Starlette:
    def admin(request: Request) -> None:
        if not hmac.compare_digest(_bearer(request).encode(), admin_token.encode()):
            raise HTTPException(401, "admin token required")

    def client(request: Request) -> tuple[License, str]:
        key = _bearer(request)
        if not key:
            raise HTTPException(401, "send the license key as 'Authorization: Bearer <key>'")
        return service.check(key)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def public_key(request: Request) -> Response:
        return JSONResponse({"public_key": service.public_key})

    async def activate(request: Request) -> Response:
        lic, status = client(request)
        body = await _body(request, ActivateRequest)
        service.store.activate(lic.license_id, body.cluster_id)
        return JSONResponse({"license_id": lic.license_id, "status": status})

    async def heartbeat(request: Request) -> Response:
        lic, status = client(request)
        body = await _body(request, HeartbeatRequest)
        service.store.heartbeat(lic.license_id, body.cluster_id, body.instances)
        return JSONResponse({"license_id": lic.license_id, "status": status})

    async def usage_report(request: Request) -> Response:
        # Accepted whatever the license's status: usage already served is billed.
        lic, status = client(request)
        body = await _body(request, UsageReport)
        for it in body.intervals:
            if it.end < it.start:
                raise _Invalid("intervals: end before start")
        stored = service.store.add_report(
            report_id=body.report_id, license_id=lic.license_id, cluster_id=body.cluster_id,
            items=[Interval(i.instance_id, i.start, i.end, i.gpus) for i in body.intervals])
        return JSONResponse({"accepted": True, "duplicate": not stored, "status": status})

    async def status(request: Request) -> Response:
        lic, status = client(request)
        return JSONResponse({"license_id": lic.license_id, "status": status})

    async def issue(request: Request) -> Response:
        admin(request)
        lic, key = service.issue(await _body(request, IssueRequest))
        return JSONResponse({"license": lic.model_dump(mode="json"), "key": key}, status_code=201)

    async def list_licenses(request: Request) -> Response:
        admin(request)
        rows = service.store.list_licenses()
        return JSONResponse({"licenses": [{k: v for k, v in r.items() if k != "key"}
                                          for r in rows]})

    async def revoke(request: Request) -> Response:
        admin(request)
        lid = request.path_params["license_id"]
        if service.store.get_license(lid) is None:
            raise HTTPException(404, f"no license {lid}")
        service.store.revoke(lid)
        return JSONResponse({"license_id": lid, "status": "revoked"})

    async def usage(request: Request) -> Response:
        admin(request)
        rows = service.usage(request.query_params.get("license_id"))
        if request.query_params.get("format") == "csv":
            return Response(to_csv(rows), media_type="text/csv")
        return JSONResponse({"usage": rows})

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "invalid_request")
        return _error(exc.status_code, str(exc.detail), code)

    async def on_license(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LicenseError)
        return _error(401, str(exc), exc.code)

    async def on_invalid(request: Request, exc: Exception) -> Response:
        return _error(400, str(exc), "invalid_request")

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/public-key", public_key),
            Route("/v1/activate", activate, methods=["POST"]),
            Route("/v1/heartbeat", heartbeat, methods=["POST"]),
            Route("/v1/usage", usage_report, methods=["POST"]),
            Route("/v1/status", status),
            Route("/admin/licenses", issue, methods=["POST"]),
            Route("/admin/licenses", list_licenses, methods=["GET"]),
            Route("/admin/licenses/{license_id}/revoke", revoke, methods=["POST"]),
            Route("/admin/usage", usage),
        ],
        exception_handlers={HTTPException: on_http, LicenseError: on_license,
                            _Invalid: on_invalid},
    )


USAGE_COLUMNS = ["license_id", "day", "instance_seconds", "instance_hours", "gpu_seconds",
                 "active_instances_now"]


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=USAGE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
