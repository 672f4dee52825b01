"""One error tree, one mapper to OpenAI's error JSON.

    ServeError                      status  type                   code
    ├── ConfigError                 500     server_error           config_error   (raised at start-up)
    ├── InternalError               500     server_error           internal_error (a bug of ours)
    ├── BadRequestError             400     invalid_request_error  invalid_request (or a finer code)
    ├── AuthenticationError         401     authentication_error   invalid_api_key
    ├── PermissionDeniedError       403     permission_error       model_not_allowed
    ├── ModelNotFoundError          404     invalid_request_error  model_not_found
    ├── PayloadTooLargeError        413     invalid_request_error  request_too_large
    ├── RateLimitError              429     requests | tokens      rate_limit_exceeded (with
    │                                                              Retry-After, x-ratelimit-*)
    ├── OverloadedError             503     server_overloaded      overloaded (with Retry-After)
    └── LicenseRefusedError         403/503 license_error          license_revoked, license_expired,
                                                                   license_checkin_overdue, ...

OpenAI clients pick their exception class from the status, so statuses matter most; ``code`` is a
stable machine-readable string, ``param`` names the offending field when there is one.

``to_serve_error`` is the one mapper from anything a request can raise (our tree, pydantic's
``ValidationError``, Ray's handle errors, anything else) to a ``ServeError``; ``from_vllm_error``
maps the error values vLLM's OpenAI layer returns. A 5xx never carries details to the client:
its message names the request id, under which the traceback is logged.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from license_contract import error_body

RETRY_AFTER_S = "1"


class ServeError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}


class ConfigError(ServeError):
    code = "config_error"


class BadRequestError(ServeError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class AuthenticationError(ServeError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(ServeError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class RateLimitError(ServeError):
    """A key over one of its limits. ``type`` is the limit's kind, as OpenAI names it: requests
    (per minute, or at once) or tokens (per minute)."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, headers: dict[str, str]) -> None:
        super().__init__(message, headers=headers)
        self.type = kind


class ModelNotFoundError(ServeError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLargeError(ServeError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class OverloadedError(ServeError):
    status = 503
    type = "server_overloaded"
    code = "overloaded"


class LicenseRefusedError(ServeError):
    type = "license_error"

    def __init__(self, message: str, *, status: int, code: str,
                 retry_after_s: float | None = None) -> None:
        wait = f"{max(1, round(retry_after_s or 60))}"
        super().__init__(message, code=code,
                         headers={"Retry-After": wait} if status == 503 else None)
        self.status = status


class InternalError(ServeError):
    """Something failed that the client could not have caused: logged with its traceback."""


def internal_error(request_id: str | None) -> InternalError:
    """The one message a client gets for a failure of ours: no details, the id to report."""
    suffix = f" (request id {request_id})" if request_id else ""
    return InternalError(f"The server failed to process the request{suffix}.")


def to_serve_error(exc: BaseException, request_id: str | None = None) -> ServeError:
    """Map anything a request path raises to the error the client gets."""
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, ValidationError):
        err = validation_error_body(exc)["error"]
        return BadRequestError(err["message"], param=err["param"])
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, BackPressureError):
        return OverloadedError(
            "The server is at capacity; retry shortly.", headers={"Retry-After": RETRY_AFTER_S}
        )
    if isinstance(exc, (ActorDiedError, ActorUnavailableError, DeploymentUnavailableError)):
        return OverloadedError(
            "The model replica is restarting; retry shortly.",
            code="replica_unavailable",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    return internal_error(request_id)


def validation_error_body(exc: ValidationError) -> dict[str, Any]:
    """The first pydantic error as ``{"error": {...}}`` with ``param`` set to the field path."""
    first = exc.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = first.get("msg", "Invalid request.")
    if loc:
        message = f"{loc}: {message}"
    return error_body(message, "invalid_request_error", param=loc or None, code="invalid_request")



def to_error_body(exc: ServeError) -> dict[str, Any]:
    return error_body(exc.message, exc.type, param=exc.param, code=exc.code)


_CODE_BY_STATUS = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    413: "request_too_large",
    422: "invalid_request",
    429: "rate_limited",
}


# vLLM's messages name its `vllm serve` flags; here the same options are per-model settings.
_VLLM_FLAGS = {
    "--tool-call-parser": "the model's tool_call_parser (SERVE_APP_TOOL_CALL_PARSER)",
    "--enable-auto-tool-choice":
        "the model's enable_auto_tool_choice (SERVE_APP_ENABLE_AUTO_TOOL_CHOICE)",
    "--reasoning-parser": "the model's reasoning_parser (SERVE_APP_REASONING_PARSER)",
}


def _our_names(message: str) -> str:
    for flag, setting in _VLLM_FLAGS.items():
        message = message.replace(flag, setting)
    return message


def from_vllm_error(error: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Map vLLM's ``ErrorResponse.error`` (whose ``code`` is the HTTP status) to our shape."""
    status = int(error.get("code") or 500)
    if status == 501:
        # A feature this model or build does not offer: the request asked for it, so it is
        # the client's to change, and vLLM's message says which feature.
        return 400, error_body(_our_names(str(error.get("message") or "Not supported.")),
                               "invalid_request_error", param=error.get("param"),
                               code="not_supported")
    if status >= 500:
        # vLLM's 5xx messages can carry internals; clients get a generic message.
        return status, error_body(
            "The model server failed to process the request.", "server_error", code="internal_error"
        )
    code = _CODE_BY_STATUS.get(status, "invalid_request")
    message = _our_names(str(error.get("message") or "Invalid request."))
    if status == 400 and "maximum context length" in message:
        code = "context_length_exceeded"
    # vLLM names types after exception classes ("BadRequestError"); OpenAI's is one string.
    return status, error_body(message, "invalid_request_error", param=error.get("param"), code=code)


def sse_error(status: int, body: dict[str, Any]) -> str:
    """A mid-stream error, framed as vLLM does: an error event, then ``[DONE]``."""
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"
