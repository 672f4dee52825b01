"""A failure that repeats while something is down, logged without flooding the log.

Background loops that retry every second (the license gate, the ingress's readiness watch) log
the first failure at once with its traceback, then at most one line per ``every_s`` seconds
with the count of failures since the last line, and one line when it stops. It lives in the
licensing package because licensing may import no serving module; the ingress uses it too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class FailureLog:
    """Logs the failures of one attempt that repeats (``what``, e.g. "Reading the license
    state"): call ``failed`` on each failure, ``recovered`` on each success."""

    def __init__(self, logger: logging.Logger, what: str, *, every_s: float = 60.0,
                 now: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._what = what
        self._every_s = every_s
        self._now = now
        self._since: float | None = None  # when the outage began
        self._logged_at = 0.0
        self._total = 0  # failures in this outage
        self._unlogged = 0  # failures since the last line

    def failed(self, exc: BaseException) -> None:
        t = self._now()
        self._total += 1
        if self._since is None:
            self._since = self._logged_at = t
            self._logger.warning("%s failed: %r", self._what, exc, exc_info=exc)
            return
        self._unlogged += 1
        if t - self._logged_at >= self._every_s:
            self._logger.warning("%s still fails (%d more in %.0f s): %r", self._what,
                                 self._unlogged, t - self._logged_at, exc)
            self._logged_at, self._unlogged = t, 0

    def recovered(self) -> None:
        if self._since is None:
            return
        self._logger.info("%s works again after %d %s in %.0f s", self._what, self._total,
                          "failure" if self._total == 1 else "failures", self._now() - self._since)
        self._since, self._total, self._unlogged = None, 0, 0
