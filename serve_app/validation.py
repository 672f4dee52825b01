"""Checks done on a request body before it crosses to a replica, and request errors in OpenAI's
shape. Pure functions: no I/O, no vLLM.

The ingress refuses what no route can serve (bytes that are not a UTF-8 JSON object, numbers
that are not finite or do not fit 64 bits, lone surrogates, absurd nesting) and the wrong JSON
type for the fields it reads itself. Everything else is validated where it is used: vLLM's own
models on the replica, whose failures of any exception type are the body's fault
(``request_error_body``).
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import ValidationError

from serve_app.errors import (
    BadRequestError,
    ServeError,
    error_body,
    to_error_body,
    validation_error_body,
)

# vLLM hands requests to its engine core as MessagePack, which carries 64-bit integers only;
# no field of any route needs more.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Far deeper than any real body (a JSON schema in ``response_format`` or a tool); the bound keeps
# every later parser (pydantic's is limited too) inside its own limits.
MAX_DEPTH = 64
MAX_ERROR_MESSAGE = 1000


def request_error_body(exc: BaseException) -> dict[str, Any]:
    """The 400 body for anything parsing or validating a request body raised.

    vLLM's protocol models run code before pydantic checks types: a wrong JSON type there raises
    ``TypeError``, ``ValueError`` or vLLM's ``VLLMValidationError``, not ``ValidationError``.
    All of them say the body is wrong, never the server."""
    if isinstance(exc, ValidationError):
        return validation_error_body(exc)
    if isinstance(exc, ServeError) and exc.status < 500:
        return to_error_body(exc)
    param = getattr(exc, "parameter", None)  # VLLMValidationError names the field
    message = f"Invalid request: {exc}" if str(exc) else f"Invalid request ({type(exc).__name__})."
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 3] + "..."
    return error_body(message, "invalid_request_error",
                      param=param if isinstance(param, str) else None, code="invalid_request")


def bad_request(exc: ValidationError) -> BadRequestError:
    err = validation_error_body(exc)["error"]
    return BadRequestError(err["message"], param=err["param"])


def _out_of_range(text: str) -> BadRequestError:
    shown = text if len(text) <= 40 else text[:37] + "..."
    return BadRequestError(
        f"The number {shown} is out of range: integers must fit in 64 bits and numbers must "
        "be finite.",
        code="number_out_of_range",
    )


def _parse_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # longer than Python's digit limit for int()
        raise _out_of_range(text) from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise _out_of_range(text)
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 overflows to inf
        raise _out_of_range(text)
    return value


def _parse_constant(name: str) -> Any:
    raise BadRequestError(f"{name} is not valid JSON: numbers must be finite.",
                          code="invalid_json")


def _check_strings_and_depth(body: Any) -> None:
    """Every string (keys too) must be encodable as UTF-8: a JSON ``\\ud800`` escape decodes to
    a lone surrogate, which tokenizers and every UTF-8 writer refuse."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise BadRequestError(
                        f"The request body holds a lone surrogate (\\u{ord(value[exc.start]):04x}):"
                        " strings must be valid Unicode.",
                        code="invalid_encoding",
                    ) from None
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise BadRequestError(
                    f"The request body is nested deeper than {MAX_DEPTH} levels.",
                    code="invalid_json",
                )
            if isinstance(value, dict):
                stack.extend((key, depth) for key in value)
                stack.extend((item, depth + 1) for item in value.values())
            else:
                stack.extend((item, depth + 1) for item in value)


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
        body = json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        raise BadRequestError(
            f"The request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise BadRequestError(
            f"The request body is nested deeper than {MAX_DEPTH} levels.", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise BadRequestError(
            f"The request body must be a JSON object, not {type(body).__name__}.",
            code="invalid_json",
        )
    _check_strings_and_depth(body)
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


def _check_input(body: dict[str, Any], endpoint: str) -> None:
    """The JSON type of the input field: a clear 400 here, before vLLM's models see it."""
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequestError("'messages' must be an array of message objects.",
                                  param="messages")
        return
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise BadRequestError(
            "'prompt' must be a string, an array of strings, or an array of token ids.",
            param="prompt",
        )


def check_generation_body(
    body: dict[str, Any], *, max_n: int, max_model_len: int, endpoint: str | None = None
) -> bool:
    """Refuse what vLLM would accept but should not (absurd ``n``, ``max_tokens`` past the
    context) and a wrong type for the input field of ``endpoint`` (``chat`` or
    ``completions``), and return the ``stream`` flag. The rest is validated by vLLM's own
    models."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequestError("'stream' must be true or false.", param="stream")
    if endpoint is not None:
        _check_input(body, endpoint)
    _positive_int(body, "n", upper=max_n)
    _positive_int(body, "best_of", upper=max_n)
    for key in ("max_tokens", "max_completion_tokens"):
        _positive_int(body, key, upper=max_model_len)
    return stream
