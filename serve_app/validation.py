"""Checks done on a request body before it crosses to a replica, and pydantic errors in
OpenAI's shape. Pure functions: no I/O, no vLLM.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from serve_app.errors import BadRequestError, error_body


def validation_error_body(exc: ValidationError) -> dict[str, Any]:
    """The first pydantic error as ``{"error": {...}}`` with ``param`` set to the field path."""
    first = exc.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = first.get("msg", "Invalid request.")
    if loc:
        message = f"{loc}: {message}"
    return error_body(message, "invalid_request_error", param=loc or None, code="invalid_request")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be a UTF-8 JSON object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError(
            f"The request body is not valid UTF-8 (byte {exc.start}).", code="invalid_encoding"
        ) from None
    if not text.strip():
        raise BadRequestError("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequestError(
            f"The request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise BadRequestError(
            f"The request body must be a JSON object, not {type(body).__name__}.",
            code="invalid_json",
        )
    return body


def _positive_int(body: dict[str, Any], key: str, *, upper: int | None = None) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequestError(f"'{key}' must be an integer.", param=key)
    if value < 1:
        raise BadRequestError(f"'{key}' must be at least 1, got {value}.", param=key)
    if upper is not None and value > upper:
        raise BadRequestError(f"'{key}' must be at most {upper}, got {value}.", param=key)


def check_generation_body(body: dict[str, Any], *, max_n: int, max_model_len: int) -> bool:
    """Refuse what vLLM would accept but should not (absurd ``n``, ``max_tokens`` past the
    context) and return the ``stream`` flag. The rest is validated by vLLM's own models."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequestError("'stream' must be true or false.", param="stream")
    _positive_int(body, "n", upper=max_n)
    _positive_int(body, "best_of", upper=max_n)
    for key in ("max_tokens", "max_completion_tokens"):
        _positive_int(body, key, upper=max_model_len)
    return stream
