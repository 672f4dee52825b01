"""The privacy canary: a unique string sent through every route of a running stack must never
reach the license server, in any byte it receives (paths, headers, bodies). Reports carry usage
time only; prompts, outputs and request ids stay on the customer's machines."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import wait_for
from tests.e2e.conftest import MODEL
from tests.strategies import ROUTES, valid_body

GET_ROUTES = ("/", "/health", "/metrics", "/license", "/v1/models")


def canary_requests(canary: str) -> list[tuple[str, str, dict | bytes | None, int]]:
    """(method, path, body, expected status) sending ``canary`` through every route: in each
    generation route's prompt or messages (whole, streamed, and in a body the route refuses),
    in the query of every GET route, and as a model name."""
    asked = f"Repeat after me: {canary}"
    out: list[tuple[str, str, dict | bytes | None, int]] = []
    for path in ROUTES:
        body = valid_body(path, MODEL)
        if "messages" in body:
            body["messages"] = [{"role": "user", "content": asked}]
        else:
            body["prompt"] = asked
        out.append(("POST", path, body, 200))
        if path.startswith("/v1/"):
            out.append(("POST", path, {**body, "stream": True}, 200))
        out.append(("POST", path, f'{{"prompt": "{canary}", "messages": 7'.encode(), 400))
    out += [("GET", f"{path}?q={canary}", None, 200) for path in GET_ROUTES]
    out.append(("GET", f"/v1/models/{canary}", None, 404))
    return out


def app_routes(stack) -> set[str]:
    """The paths the stack's app serves (its route table, built from the stack's config)."""
    from serve_app.ingress import IngressApp
    from tests.fakes import FakeLLMHandle, FakeLLMServer

    handles = {m.name: FakeLLMHandle(FakeLLMServer(m.name)) for m in stack.config.models}
    return {r.path.split("{")[0] for r in IngressApp(stack.config, handles).build().routes}


def assert_no_canary_reaches_the_license_server(stack) -> None:
    canary = f"CANARY-{uuid.uuid4().hex}"
    requests = canary_requests(canary)
    # Every route the app has is in the list: a new one cannot go unchecked.
    assert app_routes(stack) == {p.split("?")[0].removesuffix(canary)
                                 for _, p, _, _ in requests}
    start = len(stack.license_server.received)
    for method, path, body, expected in requests:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        resp = httpx.request(method, f"{stack.url}{path}", headers={"X-Request-Id": canary},
                             timeout=120, **kw)
        # Served, refused as broken, or not found as a model: each reached the app.
        assert resp.status_code == expected, (method, path, resp.status_code, resp.text[:300])
    # A usage report sent after the canary requests reached the server (the capture works).
    wait_for(lambda: any(b"/v1/usage" in c for c in stack.license_server.received[start:]),
             timeout=30, what="a usage report after the canary requests")
    totals = stack.flush_usage()
    assert totals["pending_seconds"] == 0 and totals["instance_seconds"] > 0
    for chunk in stack.license_server.received:
        assert canary.encode() not in chunk
        assert b"Repeat after me" not in chunk
    # The server billed exactly what the ledger holds.
    license_id = httpx.get(f"{stack.url}/license").json()["license_id"]
    server_total = stack.license_server.service.store.total_instance_seconds(license_id)
    assert server_total == pytest.approx(totals["instance_seconds"])
