"""Reading a request body against a byte limit: the customer's ingress and the vendor's license
server both read theirs this way, and refuse the same bodies with the same statuses.

Pure: the caller passes the Content-Length header and the body's chunks (starlette's
``request.stream()``), and maps ``BodyError`` to its own error type.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable

# Not str.isdigit: it also takes digits such as "²" that int() refuses.
_DIGITS = re.compile(r"[0-9]+")


class BodyError(Exception):
    """A body refused before it was read in full: 400 ``invalid_content_length`` or 413
    ``request_too_large``; ``message`` is for the client."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


async def read_bounded(content_length: str | None, chunks: AsyncIterable[bytes],
                       limit: int) -> bytes:
    """The body, or ``BodyError`` as soon as it is known to be refused: a Content-Length that
    is not a whole number of bytes (400; the HTTP server in front usually refuses it first, but
    the app does not rely on that), or a body above ``limit`` bytes, by its Content-Length
    before any of it is read or while it streams in without one (413)."""
    if content_length is not None:
        if not _DIGITS.fullmatch(content_length):
            raise BodyError(400, "invalid_content_length",
                            f"The Content-Length header {content_length[:40]!r} is not a whole "
                            "number of bytes.")
        # Compared as text first: int() refuses numbers of more than 4,300 digits.
        digits = content_length.lstrip("0") or "0"
        if len(digits) > len(str(limit)) or int(digits) > limit:
            raise _too_large(limit)
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def _too_large(limit: int) -> BodyError:
    return BodyError(413, "request_too_large", f"The request body is above the {limit} byte limit.")
