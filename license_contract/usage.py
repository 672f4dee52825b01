"""What the app's license actor sends the license server, and the limits both sides hold it to.

The server refuses a body that breaks these (``license_server.wire``); the actor seals its
reports within them (``serve_app.licensing.ledger``). Requests are strict: finite numbers,
bounded sizes, ids in printable ASCII.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from license_contract.keys import ID

# -- limits -------------------------------------------------------------------------------------

MAX_BODY_BYTES = 1 << 20  # the largest request body (413 above)
MAX_REPORT_INTERVALS = 2000  # intervals one usage report may carry
MAX_INTERVAL_S = 86400.0  # the longest interval: the actor splits longer ones
SKEW_S = 300.0  # clock disagreement allowed at both ends of an interval
OVERLAP_TOLERANCE_S = 0.001  # overlap ignored between an instance's intervals (float noise)

# Every server response carries its wall clock (Unix seconds); the actor stamps usage with it.
SERVER_TIME_HEADER = "X-Server-Time"

STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
VERSION = r"^[0-9A-Za-z.+_-]{1,64}$"


class ActivateRequest(BaseModel):
    model_config = STRICT

    cluster_id: str = Field(min_length=1, max_length=128, pattern=ID)


class HeartbeatRequest(ActivateRequest):
    """What a cluster says it runs, every heartbeat interval: the server integrates it over time
    and holds the usage reports against it."""

    instances: int = Field(ge=0, le=1_000_000, description="LLM replicas running now.")
    gpus: float = Field(ge=0, le=1_000_000, description="GPUs those replicas hold now.")
    development: bool = Field(description="The app trusts this license only as development: "
                              "its build does not pin the key that signed it.")
    version: str = Field(pattern=VERSION, description="The app's version.")
    stopping: bool = Field(False, description="The cluster's last heartbeat: it stops cleanly.")
    quarantined_reports: int | None = Field(None, ge=0, le=1_000_000_000)
    quarantined_seconds: float | None = Field(None, ge=0, le=1e12)


class HeartbeatResponse(BaseModel):
    model_config = STRICT

    license_id: str
    status: str = Field(description="active, revoked or expired.")
    lease: str | None = Field(description="The signed lease to serve under (``lease.py``); None "
                              "when the license may not serve.")


class IntervalModel(BaseModel):
    model_config = STRICT

    instance_id: str = Field(min_length=1, max_length=128, pattern=ID)
    start: float
    end: float
    gpus: float = Field(0.0, ge=0, le=100_000)


class UsageReport(ActivateRequest):
    report_id: str = Field(min_length=8, max_length=64, pattern=ID)
    license_id: str | None = Field(
        None, min_length=1, max_length=64, pattern=ID,
        description="The license the intervals accrued under, when it is not the one the "
        "report is sent with (an ended license's usage, sent with its renewal's key).")
    # MAX_REPORT_INTERVALS is checked after parsing, with its own message; this bounds the parse.
    intervals: list[IntervalModel] = Field(max_length=100_000)


class DownloadRequest(BaseModel):
    model_config = STRICT

    cluster_id: str | None = Field(None, min_length=1, max_length=128, pattern=ID)


# -- errors ---------------------------------------------------------------------------------------

ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_body(message: str, type: str, *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, which both the app and the license server answer with:
    ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
