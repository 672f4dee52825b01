"""Conversations that stay warm: the requests of one session go to one replica, whose vLLM
prefix cache then holds the conversation so far.

A session is the ``X-Session-Id`` header, else OpenAI's ``user`` field. At a cluster's front
door HAProxy hashes the header itself (``ray_internals.SESSION_AFFINITY_ENV``). Between the
replicas of one node that share a port (``listener.py``) the kernel picks a replica per
connection, not per request, and never looks at a header: so the replica that receives a
session owned by a sibling relays it over loopback to that sibling's private port, once (the
relayed request carries ``HOP``, and is served where it lands). The owner is chosen by
rendezvous hashing over the node's replicas, as the key actor lists them: every replica
computes the same owner, and a replica coming or going moves only the sessions it owns or
takes. If the owner cannot be reached the request is served where it arrived.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

logger = logging.getLogger("ray.serve")

SESSION_HEADER = "x-session-id"
HOP = "x-serve-app-hop"
MAX_SESSION = 256
# Hop-by-hop headers, and what the sibling computes itself.
_NOT_RELAYED = {"host", "content-length", "connection", "keep-alive", "transfer-encoding",
                "te", "upgrade", "proxy-connection", "x-request-id", HOP}


def session_of(headers: Mapping[str, str], body: Mapping[str, Any]) -> str | None:
    value = headers.get(SESSION_HEADER) or body.get("user")
    if not isinstance(value, str) or not value or len(value) > MAX_SESSION:
        return None
    return value


def owner(session: str, peers: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """The replica (id, url) that owns ``session`` among ``peers``: highest random weight."""
    if not peers:
        return None
    return max(peers, key=lambda p: hashlib.sha256(f"{p[0]}\0{session}".encode()).digest())


def relayed_headers(headers: Mapping[str, str], request_id: str | None) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k.lower() not in _NOT_RELAYED}
    out[HOP] = "1"
    if request_id:
        out["x-request-id"] = request_id  # the sibling logs and answers under the same id
    return out


def response_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items()
            if k.lower() not in _NOT_RELAYED | {"content-encoding", "date", "server"}}
