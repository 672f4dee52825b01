"""The server's side of the wire: the admin's issue request, a body parsed once the contract's
reader (``license_contract.read_bounded``) took it within its limit, errors in the contract's
shape, and the ``X-Server-Time`` header every response carries (the actor keeps its clock offset
from it). The client routes' schemas are the contract's (``license_contract.usage``)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from license_contract import (
    SERVER_TIME_HEADER,
    STRICT,
    BodyError,
    error_body,
    error_type,
    read_bounded,
)
from license_server.billing import Refusal

_TIME_HEADER = SERVER_TIME_HEADER.lower().encode()
# Free text an admin types: anything printable.
TEXT = r"^[^\x00-\x1f\x7f]+$"


class IssueRequest(BaseModel):
    model_config = STRICT

    customer: str = Field(min_length=1, max_length=256, pattern=TEXT)
    days: float = Field(30, gt=0, le=3660)
    models: tuple[str, ...] = Field(min_length=1, max_length=256,
                                    description="Entitled model names; '*' (written) is any.")
    max_instances: int | None = Field(None, ge=1, le=1_000_000)
    max_gpus: float | None = Field(None, gt=0, le=1_000_000)
    heartbeat_interval_s: float = Field(30.0, ge=0.1, le=86400)
    grace_period_s: float = Field(72 * 3600.0, ge=0, le=366 * 86400)

    @field_validator("models")
    @classmethod
    def _names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if any(not 1 <= len(n) <= 256 or re.search(r"[\x00-\x1f\x7f]", n) for n in names):
            raise ValueError("each model name is 1-256 printable characters")
        return names


async def read_model(request: Request, model: type[BaseModel], limit: int,
                     timeout_s: float | None = None) -> Any:
    """Parse the body as ``model``, refusing it as soon as it is known to exceed ``limit``
    bytes (413) or its Content-Length is not a number (400): ``license_contract.read_bounded``;
    and when it has not arrived whole within ``timeout_s`` (408: a client cannot hold a
    request open by sending slowly). A client that goes away mid-body raises starlette's
    ``ClientDisconnect``."""
    try:
        raw = await asyncio.wait_for(
            read_bounded(request.headers.get("content-length"), request.stream(), limit),
            timeout_s)
    except BodyError as exc:
        raise Refusal(exc.message, exc.code, exc.status) from None
    except asyncio.TimeoutError:
        raise Refusal(f"the request body did not arrive within {timeout_s:g} s",
                      "body_timeout", 408) from None
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise Refusal(f"{loc}: {first['msg']}" if loc else first["msg"]) from None


def error(status: int, message: str, code: str,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type(status), code=code), status_code=status,
                        headers=headers)


class ServerTime:
    """Outermost ASGI wrapper: every response, errors and 500s included, says the time."""

    def __init__(self, app: ASGIApp, now: Callable[[], float]) -> None:
        self.app = app
        self.now = now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [
                    *message.get("headers", []),
                    (_TIME_HEADER, f"{self.now():.3f}".encode())]}
            await send(message)

        await self.app(scope, receive, stamped)
