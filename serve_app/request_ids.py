"""Request ids and the logging of failures under them.

Every HTTP response carries ``X-Request-Id``: the caller's when it is safe to echo and log, else
a fresh one. A failure the client only sees as a 5xx is logged with its traceback and that id.
"""

from __future__ import annotations

import logging
import re
import sys
import uuid

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.errors import internal_error, to_error_body

# Failures go to Serve's logger (the replica's log file) and always to stderr, which Ray keeps in
# the worker's .err file and shows on the driver's terminal (what `make serve` shows): Serve's
# throughput-optimized mode stops its own logger writing to stderr.
failures = logging.getLogger("ray.serve.serve_app")

REQUEST_ID_HEADER = b"x-request-id"
# A caller's id is kept when it is short and made of characters safe in a header and a log line.
_CALLER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")


def request_id_for(incoming: str | None) -> str:
    """The caller's ``X-Request-Id`` when it is safe to echo and log, else a fresh one."""
    if incoming and _CALLER_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


def request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


class RequestIdMiddleware:
    """Gives every HTTP request an id and every response the ``X-Request-Id`` header.

    Also the last resort for an exception no handler took: it is logged with its traceback and
    the id, and the client gets a bare 500 naming the id. It sits inside starlette's own error
    middleware and takes the exception first, so that 500 carries the header too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                incoming = value.decode("latin-1")
                break
        rid = request_id_for(incoming)
        scope.setdefault("state", {})["request_id"] = rid
        header = (REQUEST_ID_HEADER, rid.encode())
        started = client_gone = False

        async def send_with_id(message: Message) -> None:
            nonlocal started, client_gone
            if message["type"] == "http.response.start":
                started = True
                headers = [h for h in message.get("headers", [])
                           if h[0].lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, header]}
            try:
                await send(message)
            except Exception:
                client_gone = True
                raise

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:  # left while sending its body: nobody to answer
            return
        except Exception:
            if client_gone:  # the server's to handle, and no fault of the request's
                raise
            to_stderr_too().exception("Unhandled error on %s %s (request id %s)",
                                       scope.get("method"), scope.get("path"), rid)
            if started:  # the status is gone; the response ends short
                return
            response = JSONResponse(to_error_body(internal_error(rid)), status_code=500)
            await response(scope, receive, send_with_id)


def to_stderr_too() -> logging.Logger:
    """``failures``, with a stderr handler of its own unless Serve's logger has one already
    (checked when first needed: Serve configures its logger after this module is imported)."""
    if not failures.handlers:
        serve_logger = logging.getLogger("ray.serve")
        on_stderr = any(
            type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout)
            for h in serve_logger.handlers
        )
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(levelname)s %(asctime)s %(name)s %(process)d -- %(message)s"))
        if on_stderr:
            handler = logging.NullHandler()  # marks the check done
        failures.addHandler(handler)
    return failures


def log_internal(cause: BaseException, rid: str | None, path: str) -> None:
    to_stderr_too().error("Request %s on %s failed", rid, path,
                           exc_info=(type(cause), cause, cause.__traceback__))
